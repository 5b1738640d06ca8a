"""Prometheus metrics of a block server, served on an optional port (``--metrics-port``).

Always counted (a few increments per step), exported only when a port is given. Each server has a
registry of its own, so servers that share a process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.sessions = Gauge("swarmgate_server_sessions", "Open inference sessions", registry=registry)
        self.steps = Counter("swarmgate_server_steps", "Inference steps computed", registry=registry)
        self.tokens = Counter("swarmgate_server_tokens", "Tokens computed by inference steps", registry=registry)
        self.step_seconds = Histogram("swarmgate_server_step_seconds", "Compute time of one inference step",
                                      registry=registry)
        self.batch_rows = Histogram("swarmgate_server_batch_rows", "Rows of one batched decode forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.group_rows = Histogram("swarmgate_server_group_rows",
                                    "Sessions' decode steps computed, pushed on and answered together as one step group",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.queued_steps = Gauge("swarmgate_server_queued_steps", "Decode steps waiting for the compute slot",
                                  registry=registry)
        self.prefix_tokens = Counter("swarmgate_server_prefix_cache_tokens",
                                     "Prompt tokens of cacheable prefills, by whether the prefix cache held them",
                                     ["result"], registry=registry)
        self.prefix_named = Counter("swarmgate_server_prefix_named_tokens",
                                    "Prompt tokens whose inputs a step named by cached blocks' keys instead of sending",
                                    registry=registry)
        self.streams_reused = Counter("swarmgate_server_streams_reused",
                                      "Sessions begun on a stream an earlier session ended with, by protocol",
                                      ["protocol"], registry=registry)
        self.errors = Counter("swarmgate_server_errors", "Requests answered with an error or ended by one",
                              ["kind"], registry=registry)
        self.span_start = Gauge("swarmgate_server_span_start", "First block served", registry=registry)
        self.span_end = Gauge("swarmgate_server_span_end", "Block after the last one served", registry=registry)
        self.throughput = Gauge("swarmgate_server_throughput", "Measured tokens/s through the span",
                                registry=registry)
        self.moves = Counter("swarmgate_server_span_moves", "Moves to another span (rebalancing)", registry=registry)
        self.refused = Counter("swarmgate_server_refused_streams", "Streams refused to a peer over its per-peer limits",
                               ["protocol", "reason"], registry=registry)
        self.train_kept_bytes = Gauge("swarmgate_server_train_kept_bytes",
                                      "Bytes of training forwards' inputs kept for their backward",
                                      registry=registry)
        self.drill_corrupted = Gauge("swarmgate_server_drill_corrupted",
                                     "Outputs corrupted on purpose (--drill-corrupt: a drill, never in production)",
                                     registry=registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Answer ``GET /metrics`` on `port` from a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)
