"""``InferenceBackend`` over the real swarm, through ``swarm.bridge.SwarmBridge``.

Translates the swarm's failures into the backend's vocabulary: no chain covering the model ->
``BlocksUnavailable`` (503), every candidate server full -> ``SwarmBusy`` (429), every chain's
servers failing -> ``SwarmUnreachable`` (503); as a session opens and at any of its steps (a
generation whose servers all died is a 503, not a 500). Fine-tuning's
forward and backward go through ``swarm.training`` in float32 (codec ``none``): gradients are
exact, and a training step's activations are few next to a generation's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import trio
from libp2p.exceptions import BaseLibp2pError

from gateway.backend import BlocksUnavailable, Coverage, InferenceSession, SwarmBusy, SwarmUnreachable
from swarm import training
from swarm.bridge import SwarmBridge
from swarm.health import swarm_state
from swarm.node_options import configure_threads
from blocks.lora_weights import LoraWeights
from swarm.protocol import BUSY, ProtocolError, RemoteError
from swarm.routing import NoChainError, missing_blocks
from swarm.hops import SessionRequest


@dataclass(frozen=True)
class SwarmModel:
    name: str
    num_blocks: int
    checkpoint: str


@contextmanager
def _swarm_errors(served: SwarmModel, doing: str) -> Iterator[None]:
    """The swarm's failures while `doing` something as the backend's errors."""
    try:
        yield
    except NoChainError as error:
        raise BlocksUnavailable(served.name, Coverage(served.num_blocks, tuple(error.missing))) from error
    except RemoteError as error:
        if error.code == BUSY:
            raise SwarmBusy(f"the swarm has no capacity for this request now: {error}") from error
        raise SwarmUnreachable(f"the swarm failed {doing}: {error}") from error
    except (OSError, trio.TooSlowError, BaseLibp2pError, ProtocolError) as error:  # ConnectionError is an OSError
        raise SwarmUnreachable(f"servers of model '{served.name}' failed {doing} ({error!r}); retry shortly") from error


class _Session:
    """A session whose steps fail with the backend's errors, as its opening does."""

    def __init__(self, served: SwarmModel, session: InferenceSession) -> None:
        self._served = served
        self._session = session

    async def step(self, hidden: torch.Tensor, tail: int | None = None) -> torch.Tensor:
        with _swarm_errors(self._served, "during a step"):
            return await self._session.step(hidden, tail)

    async def truncate(self, position: int) -> None:
        await self._session.truncate(position)

    async def close(self) -> None:
        await self._session.close()


class SwarmBackend:
    def __init__(self, bridge: SwarmBridge, models: list[SwarmModel], *, wire_codec: str = "int8") -> None:
        configure_threads()  # $SWARMGATE_TORCH_THREADS for the head's compute, like the servers'
        self.bridge = bridge
        self.models = {model.name: model for model in models}
        self.wire_codec = wire_codec

    async def open_session(
        self, model: str, *, batch: int, max_length: int, adapter: LoraWeights | None = None,
        cache_salt: str | None = None,
    ) -> InferenceSession:
        served = self.models[model]
        with _swarm_errors(served, "opening a session"):
            return _Session(served, await self.bridge.open_session(SessionRequest(
                model, served.num_blocks, batch=batch, max_length=max_length,
                wire_codec=self.wire_codec, checkpoint=served.checkpoint, adapter=adapter, cache_salt=cache_salt,
            )))

    def differentiable_blocks(self, model: str, hidden: torch.Tensor, adapter: LoraWeights) -> torch.Tensor:
        served = self.models[model]
        assert self.bridge.client is not None, "bridge not started"
        try:
            return training.remote_blocks(
                self.bridge.call, self.bridge.client, model, served.num_blocks, hidden, adapter, wire_codec="none"
            )
        except NoChainError as error:
            raise BlocksUnavailable(model, Coverage(served.num_blocks, tuple(error.missing))) from error

    def coverage(self, model: str) -> Coverage:
        served = self.models[model]
        records = [r for r in self.bridge.servers(model) if r.checkpoint == served.checkpoint]  # other weights: no cover
        return Coverage(served.num_blocks, tuple(missing_blocks(records, served.num_blocks)))

    def swarm_state(self) -> dict[str, Any]:
        """The swarm as this gateway sees it (``swarm.health.swarm_state``, with the round trips it
        measured), plus its replays, its step groups, its verification counts and the peers it banned."""
        return swarm_state(self.bridge.servers(), rtt=self.bridge.rtts()) | {
            "replays": self.bridge.replays(), "step_groups": self.bridge.step_groups(),
            "verification": self.bridge.verification(), "banned": self.bridge.banned(),
        }
