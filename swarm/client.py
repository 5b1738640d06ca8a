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
import trio

from swarm import codec, protocol
from swarm.backoff import PeerBackoff
from blocks.lora_weights import LoraWeights
from swarm.node import SwarmNode
from swarm.records import ServerRecord
from swarm.routing import NoChainError, choose_chain
from swarm.session import MAX_REPLY_FRAME, Hop, InferenceSession, RetriesExhausted
from swarm.uploads import AdapterUploads

__all__ = ["MAX_REPLY_FRAME", "InferenceSession", "RetriesExhausted", "SwarmClient"]

DEFAULT_STEP_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 8
DEFAULT_REPLACE_WAIT = 10.0
T = TypeVar("T")


class SwarmClient:
    def __init__(
        self,
        node: SwarmNode,
        *,
        step_timeout: float = DEFAULT_STEP_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        replace_wait: float = DEFAULT_REPLACE_WAIT,
        backoff: PeerBackoff | None = None,
    ):
        self.node = node
        self.step_timeout = step_timeout
        self.max_retries = max_retries  # server failures one step or one forward survives
        self.replace_wait = replace_wait  # seconds a session waits for some server to take over a lost span
        self.backoff = backoff or PeerBackoff()
        self.uploads = AdapterUploads(node, timeout=step_timeout)
        self._load: Counter[str] = Counter()  # this client's open sessions per server
        self.replays = 0  # failed hops replaced and replayed in any session (for metrics)

    def servers(self, model: str) -> list[ServerRecord]:
        return sorted(self.node.records.live(model), key=lambda r: (r.start, r.end, r.peer_id))

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

    # -- inference sessions ----------------------------------------------------------------------
    async def open_session(
        self,
        model: str,
        num_blocks: int,
        *,
        batch: int = 1,
        max_length: int,
        wire_codec: str = "int8",
        checkpoint: str | None = None,
        adapter: LoraWeights | None = None,  # LoRA on every span; each server gets its span's tensors
    ) -> InferenceSession:
        async def open_hop(record: ServerRecord) -> Hop:
            return await self.uploads.run(record, adapter, lambda digest: self._open_hop(
                record, batch, max_length, wire_codec, checkpoint, digest))

        session = InferenceSession(self, model, open_hop, batch=batch, max_length=max_length, wire_codec=wire_codec)
        await session.open(num_blocks)
        return session

    async def _open_hop(
        self, record: ServerRecord, batch: int, max_length: int, wire_codec: str, checkpoint: str | None,
        adapter: str | None,
    ) -> Hop:
        session = secrets.token_hex(16)
        stream = await self.node.open_stream(record.peer_id, protocol.INFERENCE, record.addrs)
        try:
            request = {"type": "open", "session": session, "batch": batch, "max_length": max_length,
                       "codec": wire_codec, "blocks": [record.start, record.end]}
            if checkpoint is not None:
                request["checkpoint"] = checkpoint
            if adapter is not None:
                request["adapter"] = adapter
            started = time.perf_counter()
            await protocol.write_frame(stream, request)
            with trio.fail_after(self.step_timeout):
                protocol.expect(await protocol.read_frame(stream), "opened")
            self.node.observe_rtt(record.peer_id, time.perf_counter() - started)  # one round trip, no compute
        except BaseException:
            await stream.close()
            raise
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
                    self.backoff.failed(record.peer_id)
                    if len(failed) > self.max_retries:
                        raise RetriesExhausted(f"gave up after {len(failed)} server failures: {error!r}") from error
                    break
                self.backoff.succeeded(record.peer_id)
                block = record.end
        return value

    async def forward(
        self, model: str, num_blocks: int, hidden: torch.Tensor, *, wire_codec: str = "int8"
    ) -> torch.Tensor:
        """Cache-less forward of full sequences through every block (one request per span)."""

        async def through(record: ServerRecord, wire: dict) -> dict:
            stream = await self.node.open_stream(record.peer_id, protocol.FORWARD, record.addrs)
            try:
                request = {"type": "forward", "codec": wire_codec, "hidden": wire, "blocks": [record.start, record.end]}
                await protocol.write_frame(stream, request)
                with trio.fail_after(self.step_timeout):
                    reply = protocol.expect(await protocol.read_frame(stream, max_bytes=MAX_REPLY_FRAME), "output")
            finally:
                await stream.close()
            return protocol.field(reply, "hidden", dict)

        wire = await self.along_chain(model, num_blocks, through, codec.encode(hidden, wire_codec), partial=True)
        result = codec.decode(wire, max_elements=hidden.numel())
        if list(result.shape) != list(hidden.shape):
            raise protocol.ProtocolError(f"chain returned shape {list(result.shape)}, sent {list(hidden.shape)}")
        return result.to(hidden.dtype)
