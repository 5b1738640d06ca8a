"""The swarm client (trio side): choosing chains, opening inference sessions, plain forwards.

The gateway keeps embeddings and the LM head; this module only moves hidden states. Sessions
(swarm/session.py) survive servers that die; forwards go span by span and retry a failed span on
another server. Every choice routes around peers that failed recently (swarm/backoff.py) and
counts this client's own sessions per server, so concurrent sessions spread at once rather than
after the servers' next announcements.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from typing import Awaitable, Callable, Iterable, TypeVar

import torch

from blocks.lora_weights import LoraWeights
from swarm import codec, protocol
from swarm.backoff import PeerBackoff
from swarm.node import SwarmNode
from swarm.records import ServerRecord
from swarm.routing import NoChainError, choose_chain
from swarm.session import Hop, InferenceSession, RetriesExhausted, SessionConfig, SessionRequest
from swarm.uploads import AdapterUploads

T = TypeVar("T")


class SwarmClient:
    """A ``ChainProvider`` for sessions (swarm/session.py), and forwards span by span."""

    def __init__(
        self,
        node: SwarmNode,
        *,
        step_timeout: float = SessionConfig.step_timeout,
        max_retries: int = SessionConfig.max_retries,
        replace_wait: float = SessionConfig.replace_wait,
        backoff: PeerBackoff | None = None,
        push: bool = SessionConfig.push,
    ):
        self.node = node
        self.step_timeout = step_timeout
        self.max_retries = max_retries  # server failures one step or one forward survives
        self.replace_wait = replace_wait  # seconds a session waits for some server to take over a lost span
        self.backoff = backoff or PeerBackoff()
        self.push = push  # sessions' servers push along the chain (else this client relays each hop)
        self.uploads = AdapterUploads(node, timeout=step_timeout)
        self._load: Counter[str] = Counter()  # this client's open sessions per server
        self.replays = 0  # failed hops replaced and replayed in any session (for metrics)

    # -- choosing servers ------------------------------------------------------------------------
    def choose(
        self, model: str, start: int, end: int, *, avoid: Iterable[str] = (), partial: bool = True
    ) -> list[ServerRecord]:
        """The cheapest chain over blocks [start, end) without the peers in `avoid`, and without
        recently failed peers unless only they can serve (routing.choose_chain on ``partial``)."""
        records = self.node.records.live(model)
        avoid = frozenset(avoid)
        options = dict(start=start, partial=partial, rtt=self.node.rtt, load=self._load.__getitem__)
        try:
            return choose_chain(model, records, end, exclude=avoid | self.backoff.avoided(), **options)
        except NoChainError:
            return choose_chain(model, records, end, exclude=avoid, **options)  # a flaky server beats none

    def chain(self, model: str, num_blocks: int) -> list[ServerRecord]:
        """Whole spans only: for requests that do not name their blocks."""
        return self.choose(model, 0, num_blocks, partial=False)

    def reserve(self, chain: Iterable[ServerRecord]) -> None:
        self._load.update(record.peer_id for record in chain)

    def release(self, *peer_ids: str) -> None:
        self._load.subtract(peer_ids)
        for peer_id in peer_ids:
            if self._load[peer_id] <= 0:
                del self._load[peer_id]

    def failed(self, peer_id: str) -> float:
        return self.backoff.failed(peer_id)

    def succeeded(self, peer_id: str) -> None:
        self.backoff.succeeded(peer_id)

    def replayed(self) -> None:
        self.replays += 1

    # -- inference sessions ----------------------------------------------------------------------
    async def open_session(
        self,
        model: str,
        num_blocks: int,
        *,
        max_length: int,
        batch: int = 1,
        wire_codec: str = "int8",
        checkpoint: str | None = None,
        adapter: LoraWeights | None = None,
    ) -> InferenceSession:
        """``start`` for a ``SessionRequest`` of these fields."""
        return await self.start(SessionRequest(model, num_blocks, max_length, batch, wire_codec, checkpoint, adapter))

    async def start(self, request: SessionRequest) -> InferenceSession:
        """Open a session over every block of `request.model`."""
        config = SessionConfig(self.step_timeout, self.max_retries, self.replace_wait, self.push)
        session = InferenceSession(self, request, config)
        await session.open()
        return session

    async def open_hop(self, record: ServerRecord, request: SessionRequest) -> Hop:
        """`request`'s session on `record`'s server, its span's adapter uploaded there first."""
        return await self.uploads.run(record, request.adapter, lambda digest: self._open_hop(record, request, digest))

    async def _open_hop(self, record: ServerRecord, request: SessionRequest, adapter: str | None) -> Hop:
        session = secrets.token_hex(16)
        stream = await self.node.open_stream(record.peer_id, protocol.INFERENCE, record.addrs)
        message = {"type": "open", "session": session, "batch": request.batch, "max_length": request.max_length,
                   "codec": request.wire_codec, "blocks": [record.start, record.end]}
        if request.checkpoint is not None:
            message["checkpoint"] = request.checkpoint
        if adapter is not None:
            message["adapter"] = adapter
        started = time.perf_counter()
        await protocol.request(stream, message, "opened", timeout=self.step_timeout, keep_open=True)
        self.node.observe_rtt(record.peer_id, time.perf_counter() - started)  # one round trip, no compute
        return Hop(record, session, stream)

    # -- span by span ----------------------------------------------------------------------------
    async def along_chain(
        self,
        model: str,
        num_blocks: int,
        call: Callable[[ServerRecord, T], Awaitable[T]],
        value: T,
        *,
        partial: bool = False,
    ) -> T:
        """``value = await call(record, value)`` for each span of a chain over every block, in order.

        A server that fails is avoided and the walk goes on from the same block on another chain;
        an ``invalid`` error reply means the request itself is wrong, and is raised at once. With
        ``partial``, records may be narrowed to part of a server's span: `call` must then send
        ``blocks`` [record.start, record.end] so the server computes just those.
        """
        block, failed, last_error = 0, set(), None
        while block < num_blocks:
            try:
                chain = self.choose(model, block, num_blocks, avoid=failed, partial=partial)
            except NoChainError as error:
                raise error from last_error
            for record in chain:
                try:
                    value = await call(record, value)
                except Exception as error:
                    if isinstance(error, protocol.RemoteError) and error.code == protocol.INVALID:
                        raise
                    last_error = error
                    failed.add(record.peer_id)
                    self.failed(record.peer_id)
                    if len(failed) > self.max_retries:
                        raise RetriesExhausted(f"gave up after {len(failed)} server failures: {error!r}") from error
                    break
                self.succeeded(record.peer_id)
                block = record.end
        return value

    async def forward(
        self, model: str, num_blocks: int, hidden: torch.Tensor, *, wire_codec: str = "int8"
    ) -> torch.Tensor:
        """Cache-less forward of full sequences through every block (one request per span)."""

        async def through(record: ServerRecord, wire: dict) -> dict:
            stream = await self.node.open_stream(record.peer_id, protocol.FORWARD, record.addrs)
            message = {"type": "forward", "codec": wire_codec, "hidden": wire, "blocks": [record.start, record.end]}
            reply = await protocol.request(
                stream, message, "output", timeout=self.step_timeout, max_bytes=protocol.MAX_REPLY_FRAME
            )
            return protocol.field(reply, "hidden", dict)

        wire = await self.along_chain(model, num_blocks, through, codec.encode(hidden, wire_codec), partial=True)
        result = codec.decode(wire, max_elements=hidden.numel())
        if list(result.shape) != list(hidden.shape):
            raise protocol.ProtocolError(f"chain returned shape {list(result.shape)}, sent {list(hidden.shape)}")
        return result.to(hidden.dtype)
