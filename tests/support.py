"""Shared by the tests: the in-process backend, the one wait helper, free ports, uvicorn in a thread.

``LocalBackend`` computes exactly what block servers do (``BlockSpan`` over every block, LoRA per
session and per training call, forward and backward), so the gateway's API, jobs and fine-tuned
models are tested without a swarm; its knobs (``missing``, ``busy``, ``step_delay``, ...) make the
swarm's failures on demand.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
import uvicorn
from fastapi import FastAPI

from blocks.cache import keep_past, rollback, trim_windows
from blocks.checkpoint import load_config
from blocks.lora import SpanLora
from blocks.lora_weights import LoraWeights
from blocks.span import BlockSpan
from gateway.backend import Coverage, SwarmBusy

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 120.0, interval: float = 0.2,
               message: str | Callable[[], object] = "timed out waiting") -> T:
    """Poll ``condition()`` until it returns something truthy; that value. Fails with ``message``
    (called for the failure's detail when it is a function)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, message() if callable(message) else message
        time.sleep(interval)
    return value


def random_span_lora(span: BlockSpan, generator: torch.Generator, rank: int = 4) -> SpanLora:
    """A LoRA adapter of small random weights on every target of `span`."""
    pairs = {prefix: (torch.randn(rank, module.in_features, generator=generator) * 0.1,
                      torch.randn(module.out_features, rank, generator=generator) * 0.1)
             for prefix, module in span.lora_targets.items()}
    return SpanLora(pairs, scaling=2.0)


def counted_runs(fused: Any) -> list[int]:
    """The rows of each `fused.run` call from now on (a span's `FusedDecode`: tests assert the fused
    layers ran, or not)."""
    calls: list[int] = []
    run = fused.run

    def counting(hidden: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(hidden.shape[0])
        return run(hidden, *args)

    fused.run = counting
    return calls


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` (lifespan included) on a real uvicorn in a thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout=30, interval=0.01)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def small_id(tokenizer: Any) -> int:
    """A token that is a whole word, to force with logit_bias."""
    (token_id,) = tokenizer.encode(" small")
    return token_id


# --- the in-process backend -----------------------------------------------------------------------


class _SpanBlocks(torch.autograd.Function):
    """The span as servers run it: forward, then backward recomputing it with the same LoRA."""

    @staticmethod
    def forward(ctx: Any, span: BlockSpan, names: tuple[str, ...], scaling: float, hidden: torch.Tensor,
                *tensors: torch.Tensor) -> torch.Tensor:
        weights = LoraWeights(dict(zip(names, (t.detach() for t in tensors))), scaling)
        ctx.span, ctx.names, ctx.hidden = span, names, hidden.detach().clone()
        ctx.lora = SpanLora.build(span.lora_targets, weights, span.device)
        return span.forward(ctx.hidden, adapter=ctx.lora).clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_input, grads = ctx.span.backward(ctx.hidden, grad, ctx.lora)
        return (None, None, None, grad_input, *(grads[name] for name in ctx.names))


class LocalSession:
    def __init__(self, backend: LocalBackend, batch: int, max_length: int, lora: SpanLora | None):
        self.backend, self.batch, self.max_length, self.lora = backend, batch, max_length, lora
        self.cache = backend.span.new_cache()
        keep_past(self.cache)
        self.length = 0
        self.steps = 0
        self.closed = False

    async def step(self, hidden: torch.Tensor, tail: int | None = None) -> torch.Tensor:
        assert not self.closed and hidden.shape[0] == self.batch
        assert tail is None or 1 <= tail <= hidden.shape[1]
        position = self.length
        self.length += hidden.shape[1]
        assert self.length <= self.max_length, "gateway fed more tokens than it reserved"
        self.steps += 1
        trim_windows(self.cache)
        await asyncio.sleep(self.backend.step_delay)  # also lets concurrent requests interleave step by step
        if self.backend.fail_at_step == self.steps:
            raise RuntimeError("secret internal detail")
        output = self.backend.span.forward(hidden, cache=self.cache, position=position, adapter=self.lora)
        return output if tail is None else output[:, -tail:]

    async def truncate(self, position: int) -> None:
        assert 0 <= position <= self.length
        rollback(self.cache, position)
        self.length = position

    async def close(self) -> None:
        assert not self.closed, "session closed twice"
        self.closed = True


class LocalBackend:
    """Every block of the checkpoint in one local span, serving the model ``model``."""

    def __init__(self, path: Path, model: str):
        self.model = model
        self.num_blocks = load_config(path).num_hidden_layers
        self.span = BlockSpan(path, 0, self.num_blocks)
        self.sessions: list[LocalSession] = []
        self.reset()

    def reset(self) -> None:
        self.missing: tuple[int, ...] = ()
        self.busy = False
        self.step_delay = 0.0
        self.fail_at_step: int | None = None
        self.train_delay = 0.0
        self.train_failures = 0  # the next this many training calls fail
        self.adapters: list[LoraWeights | None] = []  # of each session opened since

    async def open_session(self, model: str, *, batch: int, max_length: int,
                           adapter: LoraWeights | None = None, cache_salt: str | None = None) -> LocalSession:
        assert model == self.model
        if self.busy:
            raise SwarmBusy("All chains for this model are at capacity.")
        self.adapters.append(adapter)
        lora = SpanLora.build(self.span.lora_targets, adapter, self.span.device) if adapter is not None else None
        session = LocalSession(self, batch, max_length, lora)
        self.sessions.append(session)
        return session

    def differentiable_blocks(self, model: str, hidden: torch.Tensor, adapter: LoraWeights) -> torch.Tensor:
        assert model == self.model
        time.sleep(self.train_delay)
        if self.train_failures:
            self.train_failures -= 1
            raise ConnectionError("a server went away")
        names = tuple(adapter.tensors)
        return _SpanBlocks.apply(self.span, names, adapter.scaling, hidden, *(adapter.tensors[n] for n in names))

    def coverage(self, model: str) -> Coverage:
        return Coverage(self.num_blocks, self.missing)

    def swarm_state(self) -> dict[str, Any]:
        return {"servers": [{"peer": "local", "blocks": [0, self.num_blocks]}]}
