"""Prometheus metrics of the gateway, served at ``GET /metrics`` (prometheus-client).

Each app has its own registry (several apps can live in one process, as in tests). Request
counts come from a middleware; generation timings from ``inference.serving.start_generation``;
swarm coverage, replays and verification counts are read from the backend at scrape time, so they
are never stale, and so are generations in flight and the LM head's batching (per process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.backend import Coverage
from gateway.inference.head_rounds import head_load


SwarmState = Callable[[], dict[str, Any]]  # the backend's ``swarm_state``
VERIFICATION = {
    "checks": "Hop outputs recomputed by another server and compared",
    "mismatches": "Checks whose outputs disagreed beyond the tolerance",
    "undecided": "Mismatches no third server could settle",
    "bans": "Servers banned for wrong outputs",
}


class _SwarmCollector(Collector):
    def __init__(self, coverage: Callable[[], Iterable[tuple[str, Coverage]]], swarm_state: SwarmState):
        self._coverage = coverage
        self._swarm_state = swarm_state

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        gauge = GaugeMetricFamily("swarmgate_swarm_coverage_ratio", "Share of the model's blocks some server serves",
                                  labels=["model"])
        for model, coverage in self._coverage():
            served = coverage.num_blocks - len(coverage.missing)
            gauge.add_metric([model], served / max(coverage.num_blocks, 1))
        yield gauge
        state = self._swarm_state()
        yield CounterMetricFamily("swarmgate_replays", "Sessions rebuilt on another server after a failure",
                                  value=int(state.get("replays", 0)))
        groups = state.get("step_groups", {})
        yield CounterMetricFamily("swarmgate_step_groups", "Step groups sent: sessions' one-token steps in one frame "
                                  "per hop", value=int(groups.get("groups", 0)))
        yield CounterMetricFamily("swarmgate_step_group_rows", "Sessions' steps those step groups carried",
                                  value=int(groups.get("rows", 0)))
        counts = state.get("verification", {})
        for name, documentation in VERIFICATION.items():
            yield CounterMetricFamily(f"swarmgate_verification_{name}", documentation, value=int(counts.get(name, 0)))


class _LoadCollector(Collector):
    """How busy the gateway is, read at scrape time: generations in flight, and the LM head's
    rounds and the calls they served (calls / rounds: how many generations share one head call)."""

    def __init__(self, active_generations: Callable[[], int]):
        self._active_generations = active_generations

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily("swarmgate_active_generations", "Generations in flight, all tenants",
                                value=self._active_generations())
        rounds, calls = head_load()
        yield CounterMetricFamily("swarmgate_head_rounds", "LM head computations (one per round of concurrent "
                                  "generations)", value=rounds)
        yield CounterMetricFamily("swarmgate_head_calls", "Generations' LM head calls those rounds served",
                                  value=calls)


class GatewayMetrics:
    def __init__(self, coverage: Callable[[], Iterable[tuple[str, Coverage]]], swarm_state: SwarmState,
                 active_generations: Callable[[], int] = lambda: 0):
        self.registry = CollectorRegistry()
        self.requests = Counter("swarmgate_requests", "HTTP requests by route and status",
                                ["method", "path", "status"], registry=self.registry)
        self.time_to_first_token = Histogram(
            "swarmgate_time_to_first_token_seconds", "From swarm session open to the first generated token",
            ["model"], registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.tokens = Counter("swarmgate_generated_tokens", "Completion tokens generated", ["model"],
                              registry=self.registry)
        self.tokens_per_second = Histogram(
            "swarmgate_decode_tokens_per_second", "Per-request decode speed after the first token", ["model"],
            registry=self.registry, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
        )
        self.drafted = Counter("swarmgate_speculative_drafted_tokens", "Draft tokens sent through the swarm",
                               ["model"], registry=self.registry)
        self.accepted = Counter("swarmgate_speculative_accepted_tokens",
                                "Draft tokens the sampler agreed with (each saved a step)", ["model"],
                                registry=self.registry)
        self.registry.register(_SwarmCollector(coverage, swarm_state))
        self.registry.register(_LoadCollector(active_generations))

    def observe_generation(self, model: str, started: float, first_token: float | None, tokens: int) -> None:
        self.tokens.labels(model).inc(tokens)
        if first_token is None:
            return
        self.time_to_first_token.labels(model).observe(first_token - started)
        decode_time = time.monotonic() - first_token
        if tokens > 1 and decode_time > 0:
            self.tokens_per_second.labels(model).observe((tokens - 1) / decode_time)

    def observe_speculation(self, model: str, drafted: int, accepted: int) -> None:
        if drafted:
            self.drafted.labels(model).inc(drafted)
            self.accepted.labels(model).inc(accepted)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting responses by route template (not raw path: ids stay out of labels)."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
