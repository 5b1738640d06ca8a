"""What an inference session is made of (swarm/session.py): its request and settings, its hops (a
session on one server each, with the records replay needs), and what it needs of its client."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import trio

from blocks.lora_weights import LoraWeights
from swarm import protocol
from swarm.records import ServerRecord
from swarm.trust.checks import Chains


@dataclass(frozen=True)
class SessionRequest:
    """A session's request: what every hop's ``open`` asks of its server."""

    model: str
    num_blocks: int
    max_length: int
    batch: int = 1
    wire_codec: str = "int8"
    checkpoint: str | None = None
    adapter: LoraWeights | None = None  # LoRA on every span; each server gets its span's tensors
    cache_salt: str | None = None  # servers' prefix caches serve this session only prompts of the same salt


@dataclass(frozen=True)
class SessionConfig:
    """How long a session waits, and how many server failures it survives."""

    step_timeout: float = 60.0
    max_retries: int = 8  # server failures one step survives
    replace_wait: float = 10.0  # seconds to wait for some server to take over a lost span
    push: bool = True  # servers push outputs along the chain; False: this client relays every hop (as Petals does)
    verify_fraction: float = 0.0  # chance that a step's hop is recomputed on another server and compared


@dataclass(eq=False)
class Hop:
    """This client's session on one server, for one span of the chain."""

    record: ServerRecord
    session: str
    stream: protocol.Stream
    # wire input of each step, as far as known: a tensor map, or {prefix, rest} (swarm/prompt_names.py)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)  # wire output of each step, as far as known
    # (the last hop's cut to the step's tail when one was asked)
    done: int = 0  # steps whose output came back
    reader: trio.CancelScope | None = None
    names: bool = False  # its server keeps prompt blocks, and takes steps naming them (swarm/prompt_names.py)
    reuse_within: float = 0.0  # seconds its server waits for a next ``open`` on the stream after a ``close`` (0: none)

    def route_entry(self, tail: int | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"peer": self.record.peer_id, "session": self.session, "addrs": list(self.record.addrs)}
        if self.names:
            entry["names"] = True
        return entry if tail is None else {**entry, "tail": tail}


class ChainProvider(Chains, Protocol):
    """What a session needs of its client (what its spot checks need, too)."""

    def choose(self, model: str, start: int, end: int, *, avoid: Iterable[str] = ()) -> list[ServerRecord]:
        """A chain over blocks [start, end) without the peers in `avoid`; raises NoChainError."""
        ...

    def reserve(self, chain: Iterable[ServerRecord]) -> None:
        """Count a session on each server of `chain` (until ``release``)."""
        ...

    def release(self, *peer_ids: str) -> None: ...

    def forget(self, peer_id: str) -> None:
        """Drop the peer's record: its server moved since (until it announces again)."""
        ...

    def succeeded(self, peer_id: str) -> None: ...

    def replayed(self) -> None: ...  # count a failed hop replaced and replayed

    async def open_hop(self, record: ServerRecord, request: SessionRequest, push_to: ServerRecord | None = None) -> Hop:
        """Open `request`'s session on `record`'s server, for `record`'s blocks; `push_to`: the
        server its outputs will be pushed to (a hint, so it can connect ahead)."""
        ...

    async def end_hop(self, hop: Hop, *, clean: bool) -> None:
        """End `hop`'s session; `clean`: every step sent to it was answered (its stream may be reused)."""
        ...


class RetriesExhausted(ConnectionError):
    """A step failed on too many servers in a row."""
