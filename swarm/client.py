"""The swarm client (trio side): choosing chains, opening inference sessions, plain forwards.

The gateway keeps embeddings and the LM head; this module only moves hidden states. Sessions
(swarm/session.py) survive servers that die; forwards go span by span and retry a failed span on
another server. Every choice routes around peers that failed recently (swarm/routing.py) and
counts this client's own sessions per server, so concurrent sessions spread at once rather than
after the servers' next announcements.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import torch
import trio

from blocks.lora_weights import LoraWeights
from swarm import codec, protocol
from swarm.node import CONNECT_TIMEOUT, SwarmNode
from swarm.prompt_names import PrefixMemory
from swarm.records import ServerRecord
from swarm.routing import NoChainError, PeerBackoff, choose_chain
from swarm.trust.bans import BanList
from swarm.trust.verification import VerificationStats, judge
from swarm.hops import Hop, RetriesExhausted, SessionConfig, SessionRequest
from swarm.session import InferenceSession
from swarm.step_groups import StepGroups
from swarm.transport.stream_pool import StreamPool
from swarm.uploads import AdapterUploads

T = TypeVar("T")
logger = logging.getLogger(__name__)
IDLE_STREAMS_PER_SERVER = 64  # INFERENCE streams kept open per server between sessions (a server's sessions, by default)
STREAM_MAX_IDLE = 60.0  # seconds one may idle there (and at most half the time its server waits for a next session)
SHADOW_ATTEMPTS = 3  # shadows tried per spot check before it is skipped (a failed one is not drawn again)
_draw = random.SystemRandom()  # which spans are checked: servers must not be able to predict it


@dataclass(frozen=True)
class Checked:
    """How ``along_chain`` spot-checks a span: what the call computes, and its result as a tensor."""

    what: str  # for ban reasons: "cache-less forward", "training backward", ...
    wire_codec: str
    as_tensor: Callable[[Any], torch.Tensor]
    single_server: bool = False  # the call can't be split along a chain: only one server may recompute it
    whole_spans: bool = False  # the call can't name part of a server's span (TRAIN): recompute on whole spans


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
        verify_fraction: float = SessionConfig.verify_fraction,
    ):
        self.node = node
        self.step_timeout = step_timeout
        self.max_retries = max_retries  # server failures one step or one forward survives
        self.replace_wait = replace_wait  # seconds a session waits for some server to take over a lost span
        self.backoff = backoff or PeerBackoff()
        self.verify_fraction = verify_fraction  # chance that a session's hop is checked at a step
        self.bans = BanList()  # peers caught returning wrong outputs: never chosen again
        self.verification = VerificationStats()
        self.push = push  # sessions' servers push along the chain (else this client relays each hop)
        self.uploads = AdapterUploads(node, timeout=step_timeout)
        self.prefixes = PrefixMemory()  # which prompt blocks servers hold: sessions name them (swarm/prompt_names.py)
        self.groups = StepGroups(node, timeout=step_timeout)  # sessions' one-token steps together, while it runs
        # INFERENCE streams that ended sessions cleanly, for later sessions on the same servers
        self.inference_streams = StreamPool(lambda peer, addrs: node.open_stream(peer, protocol.INFERENCE, addrs),
                                            per_peer=IDLE_STREAMS_PER_SERVER, max_idle=STREAM_MAX_IDLE)
        self._load: Counter[str] = Counter()  # this client's open sessions per server
        self.replays = 0  # failed hops replaced and replayed in any session (for metrics)

    # -- choosing servers ------------------------------------------------------------------------
    def choose(
        self, model: str, start: int, end: int, *, avoid: Iterable[str] = (), partial: bool = True
    ) -> list[ServerRecord]:
        """The cheapest chain over blocks [start, end) without the peers in `avoid` or banned ones,
        and without recently failed peers unless only they can serve (routing.choose_chain on ``partial``)."""
        records = self.node.records.live(model)
        avoid = frozenset(avoid) | self.bans.banned()
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

    def forget(self, peer_id: str) -> None:
        self.node.records.forget(peer_id)

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

    def shadow_chain(self, like: ServerRecord, *, avoid: Iterable[str], whole_spans: bool = False) -> list[ServerRecord]:
        """Other servers for `like`'s blocks: one that holds them all, drawn at random (a server
        must not know whether it will check or be checked, nor by whom) and of the same weight
        quantization when there is one, else the cheapest chain; recently failed servers only
        through the chain's fallback. `whole_spans`: only servers whose whole span they are (for
        requests that cannot name part of a span)."""
        avoid = frozenset(avoid) | self.bans.banned()
        unwanted = avoid | self.backoff.avoided()
        holders = [r for r in self.node.records.live(like.model) if r.checkpoint == like.checkpoint
                   and r.start <= like.start and like.end <= r.end and r.peer_id not in unwanted
                   and (not whole_spans or (r.start, r.end) == (like.start, like.end))]
        alike = [r for r in holders if r.quant == like.quant] or holders
        if alike:
            return [dataclasses.replace(secrets.choice(alike), start=like.start, end=like.end)]
        return self.choose(like.model, like.start, like.end, avoid=avoid, partial=not whole_spans)

    def ban(self, peer_id: str, reason: str) -> None:
        if peer_id not in self.bans:
            logger.warning("banning server %s: %s", peer_id, reason)
            self.verification.bans += 1
        self.bans.ban(peer_id, reason)

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
        config = SessionConfig(self.step_timeout, self.max_retries, self.replace_wait, self.push, self.verify_fraction)
        session = InferenceSession(self, request, config, self.prefixes, self.groups)
        await session.open()
        return session

    async def open_hop(self, record: ServerRecord, request: SessionRequest, push_to: ServerRecord | None = None) -> Hop:
        """`request`'s session on `record`'s server, its span's adapter uploaded there first; the
        server is told `push_to`, the next server of the chain, to open its push stream ahead."""
        return await self.uploads.run(record, request.adapter,
                                      lambda digest: self._open_hop(record, request, digest, push_to))

    async def _open_hop(self, record: ServerRecord, request: SessionRequest, adapter: str | None,
                        push_to: ServerRecord | None) -> Hop:
        message = {"type": "open", "batch": request.batch, "max_length": request.max_length,
                   "codec": request.wire_codec, "blocks": [record.start, record.end]}
        if push_to is not None:
            message["push_to"] = {"peer": push_to.peer_id, "addrs": list(push_to.addrs)}
        if request.checkpoint is not None:
            message["checkpoint"] = request.checkpoint
        if request.cache_salt is not None:
            message["cache_salt"] = request.cache_salt
        if adapter is not None:
            message["adapter"] = adapter
        for fresh in (False, True):
            stream, reused = await self.inference_streams.take(record.peer_id, record.addrs, fresh=fresh)
            session, started = secrets.token_hex(16), time.perf_counter()
            try:  # a reused stream skips the negotiation whose timeout caught a hung server: as short a one
                opened = await protocol.request(stream, {**message, "session": session}, "opened", keep_open=True,
                                                timeout=CONNECT_TIMEOUT if reused else self.step_timeout)
                break
            except (protocol.RemoteError, trio.TooSlowError):
                raise  # the server's answer, or its silence: not a stale stream's
            except Exception:
                if not reused:
                    raise  # else a stream its server ended as it was taken: a fresh one, once
        self.node.observe_rtt(record.peer_id, time.perf_counter() - started)  # one round trip, no compute
        reuse_within = opened.get("reuse_within")
        return Hop(record, session, stream, names=opened.get("prefix_names") is True,
                   reuse_within=float(reuse_within) if type(reuse_within) in (int, float) and reuse_within > 0 else 0.0)

    async def end_hop(self, hop: Hop, *, clean: bool) -> None:
        """End `hop`'s session on its server. A `clean` hop (every step sent to it answered) of a
        server that reuses streams is ended by a ``close`` frame, and its stream kept for a next
        session there (for half the time that server waits); any other is closed, which ends the
        session as well."""
        if clean and hop.reuse_within:
            closed = False
            with trio.CancelScope(shield=True), trio.move_on_after(protocol.CLOSE_TIMEOUT):  # as close_quietly
                try:
                    await protocol.write_frame(hop.stream, {"type": "close"})
                    closed = True
                except Exception:
                    pass
            if closed:
                await self.inference_streams.give_back(hop.record.peer_id, hop.stream, max_idle=hop.reuse_within / 2)
                return
        await protocol.close_quietly(hop.stream)

    # -- span by span ----------------------------------------------------------------------------
    async def along_chain(
        self,
        model: str,
        num_blocks: int,
        call: Callable[[ServerRecord, T], Awaitable[T]],
        value: T,
        *,
        partial: bool = False,
        checked: Checked | None = None,
    ) -> T:
        """``value = await call(record, value)`` for each span of a chain over every block, in order.

        A server that fails is avoided and the walk goes on from the same block on another chain;
        an ``invalid`` error reply means the request itself is wrong, and is raised at once. With
        ``partial``, records may be narrowed to part of a server's span: `call` must then send
        ``blocks`` [record.start, record.end] so the server computes just those (and ``checked``
        needs that). With ``checked``, each span is spot-checked with probability
        ``verify_fraction`` (``spot_check``).
        """
        block, failed, last_error = 0, set(), None
        while block < num_blocks:
            try:
                chain = self.choose(model, block, num_blocks, avoid=failed, partial=partial)
            except NoChainError as error:
                raise error from last_error
            for record in chain:
                try:
                    result = await call(record, value)
                    if checked is not None and self.check_drawn():
                        result = await self.spot_check(record, call, value, result, checked)
                    value = result
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

    def check_drawn(self) -> bool:
        """Whether to spot-check the span at hand: true with probability ``verify_fraction``."""
        return bool(self.verify_fraction) and _draw.random() < self.verify_fraction

    async def spot_check(
        self, record: ServerRecord, call: Callable[[ServerRecord, T], Awaitable[T]], value: T, result: T,
        checked: Checked,
    ) -> T:
        """`result` of ``call(record, value)``, checked: recomputed by other servers of the same
        blocks and compared (swarm/trust/verification.py); when a third server sides against
        `record`'s, its server is banned and the majority's result returned instead. A shadow
        server that fails is avoided and another drawn, up to SHADOW_ATTEMPTS. `call` must have
        no side effects beyond its result (cache entries a server may drop aside)."""

        async def recompute(avoid: set[str]) -> tuple[T, list[ServerRecord]]:
            records, output = self.shadow_chain(record, avoid=avoid, whole_spans=checked.whole_spans), value
            if checked.single_server and len(records) > 1:
                raise NoChainError(record.model, list(range(record.start, record.end)))  # nobody holds them all
            for shadow in records:
                try:
                    output = await call(shadow, output)
                except Exception:
                    self.failed(shadow.peer_id)  # not drawn again while it backs off
                    raise
            return output, records

        for attempt in range(1, SHADOW_ATTEMPTS + 1):
            try:
                shadow_result, shadows = await recompute({record.peer_id})
                break
            except Exception as error:  # no other server, or it failed (and is avoided from now on)
                if isinstance(error, NoChainError) or attempt == SHADOW_ATTEMPTS:
                    logger.info("spot check of %s skipped: %r", record.peer_id, error)
                    return result

        async def referee() -> tuple[torch.Tensor, list[str]]:
            reference, referees = await recompute({record.peer_id, *(r.peer_id for r in shadows)})
            return checked.as_tensor(reference), [r.peer_id for r in referees]

        quants = (record.quant, *(r.quant for r in shadows))
        verdict = await judge(checked.as_tensor(result), checked.as_tensor(shadow_result), checked.wire_codec, quants,
                              referee, self.verification)
        where = f"wrong outputs on blocks [{record.start}, {record.end}) ({checked.what})"
        if verdict.hop_wrong:
            self.ban(record.peer_id, f"{where}, outvoted by {[r.peer_id for r in shadows] + verdict.referee}")
            return shadow_result
        for shadow in shadows if verdict.shadow_wrong else ():
            self.ban(shadow.peer_id, f"{where}, outvoted by {[record.peer_id] + verdict.referee}")
        return result

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

        checked = Checked("cache-less forward", wire_codec, lambda wire: codec.decode(wire, max_elements=hidden.numel()))
        wire = await self.along_chain(model, num_blocks, through, codec.encode(hidden, wire_codec), partial=True,
                                      checked=checked)
        result = codec.decode(wire, max_elements=hidden.numel())
        if list(result.shape) != list(hidden.shape):
            raise protocol.ProtocolError(f"chain returned shape {list(result.shape)}, sent {list(hidden.shape)}")
        return result.to(hidden.dtype)
