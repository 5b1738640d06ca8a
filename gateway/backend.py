"""What the gateway needs from the swarm, as small asyncio-facing interfaces.

The gateway keeps tokens, embeddings, LM head and sampling; everything between embeddings and
LM head runs behind `InferenceBackend`. Coding against these Protocols keeps the API layer
testable with an in-process backend and free of any trio/libp2p knowledge (DESIGN.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from blocks.lora_weights import LoraWeights
from swarm.routing import format_blocks


@dataclass(frozen=True)
class Coverage:
    """Which of a model's transformer blocks some live server currently serves."""

    num_blocks: int
    missing: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.missing

    def describe_missing(self) -> str:
        """Missing blocks as compact ranges ("3, 5-7"), for error messages people read."""
        return format_blocks(list(self.missing))


class InferenceSession(Protocol):
    """One generation's path through the swarm; the servers keep its attention caches."""

    async def step(self, hidden: torch.Tensor, tail: int | None = None) -> torch.Tensor:
        """Hidden states [b, t, h] in, last block's output [b, t, h] out (before the final norm),
        or only its last `tail` positions.

        The first call is the prefill (t >= 1), later calls feed one token per row (t = 1), or
        more with speculative drafts; the session tracks positions itself.
        """
        ...

    async def truncate(self, position: int) -> None:
        """Forget the positions from `position` on (rejected drafts); the next step starts there."""
        ...

    async def close(self) -> None:
        """Free the servers' caches; called exactly once, also after failures and cancellation."""
        ...


class InferenceBackend(Protocol):
    async def open_session(
        self, model: str, *, batch: int, max_length: int, adapter: LoraWeights | None = None,
        cache_salt: str | None = None,
    ) -> InferenceSession:
        """Reserve a chain for `batch` rows of up to `max_length` tokens each.

        With `adapter` (a fine-tuned model), every span applies that LoRA for this session only;
        with `cache_salt`, servers reuse only cached prompt starts of sessions with the same salt.
        Raises `SwarmBusy` when no chain has room now and `BlocksUnavailable` when no chain
        covers the model.
        """
        ...

    def differentiable_blocks(self, model: str, hidden: torch.Tensor, adapter: LoraWeights) -> torch.Tensor:
        """Every block of `model` with `adapter` on [b, t, h] hidden states, for fine-tuning.

        Differentiable in `hidden` and in `adapter.tensors`: `backward()` through the result
        computes their gradients (in the swarm: a backward pass along the chain). Blocking:
        call it from a worker thread, never from the event loop.
        """
        ...

    def coverage(self, model: str) -> Coverage:
        """The model's block coverage right now (cheap, non-blocking)."""
        ...

    def swarm_state(self) -> dict[str, Any]:
        """A JSON-serializable view of the swarm for `GET /v1/swarm`."""
        ...


class BackendError(Exception):
    """Base of the failures a backend reports in terms the API can answer with."""


class SwarmBusy(BackendError):
    """Every chain that could serve the request is at capacity; worth retrying later (429)."""


class SwarmUnreachable(BackendError):
    """Servers that cover the model failed while the session opened, and no other chain took over
    in time (a kill or a restart under way); worth retrying shortly (503)."""


class BlocksUnavailable(BackendError):
    """No chain of live servers covers the model (503)."""

    def __init__(self, model: str, coverage: Coverage):
        super().__init__(f"No chain of servers covers model '{model}': blocks {coverage.describe_missing()} are not served")
        self.coverage = coverage
