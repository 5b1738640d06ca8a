"""A swarm member: a libp2p host (TCP, noise, yamux) plus the shared view of server records.

Every process in a swarm — block server, gateway, health probe — runs one ``SwarmNode``.
Discovery is gossipsub: servers publish signed records on one topic and every node keeps the
live ones in a ``RecordTable``; a node that joins also pulls the records its first peer knows,
so it does not wait a whole announce interval to see the swarm (ARCHITECTURE.md says why).
Records are taken by the topic's validator, so gossipsub forwards only records a node took:
a flood or a forgery stops at the first honest node, and only the peer that sent it loses score.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Collection, Sequence

import cbor2
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.custom_types import TProtocol
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_PROTOCOL
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from swarm import protocol
from swarm.protocol import ProtocolError
from swarm.records import MAX_RECORDS, RecordTable, ServerRecord
from swarm.routing import RttEstimates
from swarm.transport import tuning
from swarm.trust.rate import PeerBuckets

logger = logging.getLogger(__name__)
tuning.install()

CONNECT_TIMEOUT = 10.0
MAX_RECORD_FRAME = 4 * 1024 * 1024
# One record, as signed: a server's is ~0.5 KiB with a few addresses. Every node keeps up to
# MAX_RECORDS of them, adds their addresses to its peerstore and serves them to joining nodes.
MAX_RECORD_BYTES = 8 * 1024
MAX_RECORD_ADDRS = 16
RECORDS_REQUEST_TIMEOUT = 10.0  # a peer that opens a RECORDS stream must ask within it
# A RECORDS reply carries every live record (up to MAX_RECORDS x MAX_RECORD_BYTES): a node asks
# once when it joins and a health probe once per run, so a peer gets a few at once, then one per 10 s.
RECORDS_BURST, RECORDS_RATE = 4, 0.1
# Gossipsub penalises a neighbour that forwards more messages than this per second on a topic; an
# honest relay forwards every server's records (one per server per announce interval, 5 s by default).
GOSSIP_FORWARD_RATE = 100.0
MIN_RECORD_INTERVAL = 0.1  # a peer's records closer together than this are dropped (servers send one per 5 s)
# A client pings this many servers (those measured least recently) per interval: 48 servers are
# all measured within 2 minutes, for ~0.1 KB/s of pings.
RTT_PROBE_INTERVAL = 30.0
RTT_PROBE_BATCH = 16
PING_TIMEOUT = 5.0
PINGS_PER_PROBE = 3
_ADDR_TTL = 3600


def _guarded(handler: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    """`handler`, except that a peer's bad frame resets its stream instead of ending this node.

    py-libp2p's pubsub lets a ``DecodeError`` from one malformed RPC escape its stream handler, and
    from there the host's nursery: 9 bytes on ``/meshsub/1.0.0`` from anyone who can dial stopped a
    server (benchmarks/swarm_scale.py met it at 24 servers; docs/scaling.md).
    """

    async def handle(stream: Any) -> None:
        try:
            await handler(stream)
        except Exception as error:
            logger.warning("reset a gossip stream of %s: %r", stream.muxed_conn.peer_id, error)
            await stream.reset()

    return handle


def _signed_payload(wire: dict[str, Any]) -> bytes:
    return cbor2.dumps({k: v for k, v in wire.items() if k != "signature"}, canonical=True)


class SwarmNode:
    def __init__(
        self,
        host: Any,
        pubsub: Pubsub,
        key_pair: KeyPair,
        *,
        announce_addrs: Sequence[str] = (),
        allow_peers: Collection[str] | None = None,
    ) -> None:
        self.host = host
        self.pubsub = pubsub
        self.key_pair = key_pair
        self.announce_addrs = list(announce_addrs)  # public addresses, when the listen ones are not
        self.allow_peers = None if allow_peers is None else frozenset(allow_peers)
        self.records = RecordTable()
        self._raw_records: dict[str, dict[str, Any]] = {}
        self._accepted_at: dict[str, float] = {}  # peer -> when its last record was accepted
        self._rtt = RttEstimates()
        self._records_asks = PeerBuckets(RECORDS_BURST, RECORDS_RATE)

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    def multiaddrs(self) -> list[str]:
        """Full dialable addresses, ``/p2p/<peer id>`` included: the announced ones if given."""
        suffix = f"/p2p/{self.peer_id}"
        addrs = self.announce_addrs or self.host.get_addrs()
        return [str(a) if str(a).endswith(suffix) else f"{a}{suffix}" for a in addrs]

    # -- connections ---------------------------------------------------------------------------
    async def connect(self, address: str) -> str:
        """Dial a full multiaddr; returns the peer id."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        with trio.fail_after(CONNECT_TIMEOUT):
            await self.host.connect(info)
        return info.peer_id.to_base58()

    async def open_stream(
        self, peer_id: str, proto: TProtocol, addrs: Sequence[str] = (), timeout: float = CONNECT_TIMEOUT
    ) -> protocol.Stream:
        peer = ID.from_base58(peer_id)
        if addrs:
            self.host.get_peerstore().add_addrs(peer, [multiaddr.Multiaddr(a) for a in addrs], _ADDR_TTL)
        with trio.fail_after(timeout):
            return await self.host.new_stream(peer, [proto])

    def observe_rtt(self, peer_id: str, seconds: float) -> None:
        self._rtt.observe(peer_id, seconds)

    def rtt(self, peer_id: str) -> float | None:
        return self._rtt.get(peer_id)

    def rtts(self) -> dict[str, float]:
        return self._rtt.all()

    async def ping(self, peer_id: str, addrs: Sequence[str] = (), timeout: float = PING_TIMEOUT) -> float:
        """The fastest of `PINGS_PER_PROBE` libp2p ping round trips to the peer, in seconds (recorded
        as an RTT sample)."""
        with trio.fail_after(timeout):
            stream = await self.open_stream(peer_id, PING_PROTOCOL, addrs, timeout)
            try:  # the fastest of a few: a busy moment on either side only delays a ping
                seconds = math.inf
                for _ in range(PINGS_PER_PROBE):
                    started = time.perf_counter()
                    await perform_ping_roundtrip(stream)
                    seconds = min(seconds, time.perf_counter() - started)
            finally:
                await stream.close()
        self.observe_rtt(peer_id, seconds)
        return seconds

    async def probe_rtts(self, interval: float = RTT_PROBE_INTERVAL, batch: int = RTT_PROBE_BATCH) -> None:
        """Forever: every `interval` s, ping the `batch` servers measured least recently, at once.

        Opens of sessions are samples too, but only of servers in use and with the server's work
        in them: pings keep the other candidates' estimates fresh and clean."""
        while True:
            addrs = {record.peer_id: record.addrs for record in self.records.live() if record.peer_id != self.peer_id}
            async with trio.open_nursery() as nursery:
                for peer_id in self._rtt.stalest(addrs.keys(), batch):
                    nursery.start_soon(self._quiet_ping, peer_id, addrs[peer_id])
            await trio.sleep(interval)

    async def _quiet_ping(self, peer_id: str, addrs: Sequence[str]) -> None:
        try:
            await self.ping(peer_id, addrs)
        except Exception as error:  # down or slow: routing learns that from sessions and backoff
            logger.debug("ping of %s failed: %r", peer_id, error)

    # -- records -------------------------------------------------------------------------------
    def sign_record(self, record: ServerRecord) -> dict[str, Any]:
        wire = dataclasses.replace(record, issued_at=round(time.time(), 3)).to_wire()
        wire["signature"] = self.key_pair.private_key.sign(_signed_payload(wire))
        return wire

    async def announce(self, record: ServerRecord) -> None:
        wire = self.sign_record(record)
        self._accept(wire)
        await self.pubsub.publish(protocol.RECORDS_TOPIC, cbor2.dumps(wire))

    def _accept(self, wire: Any, publisher: str | None = None) -> bool:
        """Validate a record (signed by the peer it describes) and store it; raises ProtocolError
        on a bad one. Returns whether it may travel on (gossip forwards only those).

        `publisher` is the gossipsub originator of an announcement (None for a pulled record): a
        server announces only itself, so a record published by another peer is refused — one
        identity cannot flood records of many made-up servers. A peer's records closer together
        than MIN_RECORD_INTERVAL are dropped and not forwarded; only accepted (validly signed)
        records count, so a forger cannot crowd out a real server's records.
        """
        now = time.monotonic()
        record = ServerRecord.from_wire(wire, received_at=now)  # a replayed copy keeps its first expiry
        if publisher is not None and publisher != record.peer_id:
            raise ProtocolError(f"record of {record.peer_id} published by {publisher}: servers announce themselves")
        payload = _signed_payload(wire)
        if len(payload) > MAX_RECORD_BYTES or len(record.addrs) > MAX_RECORD_ADDRS:
            raise ProtocolError(f"record of {record.peer_id} is oversized: {len(payload)} bytes, "
                                f"{len(record.addrs)} addresses (at most {MAX_RECORD_BYTES}, {MAX_RECORD_ADDRS})")
        signature = wire.get("signature")
        public_key = ID.from_base58(record.peer_id).extract_public_key()
        if not isinstance(signature, bytes) or public_key is None or not public_key.verify(payload, signature):
            raise ProtocolError(f"record of {record.peer_id} has a bad signature")
        last = self._accepted_at.get(record.peer_id)
        if last is not None and now - last < MIN_RECORD_INTERVAL:
            logger.debug("ignored the record of %s: it announces too often", record.peer_id)
            return self._raw_records.get(record.peer_id) == wire  # the same one again (pulled, then gossiped) is no spam
        if self.allow_peers is not None and record.peer_id not in self.allow_peers | {self.peer_id}:
            logger.debug("ignored the record of %s: not in the allowed peers", record.peer_id)
            return True  # valid, only not for this node
        if not self.records.add(record):
            logger.debug("ignored the record of %s: the record table is full, or holds a later one", record.peer_id)
            return True
        self._raw_records[record.peer_id] = wire
        self._accepted_at[record.peer_id] = now
        if len(self._raw_records) > MAX_RECORDS:
            self._live_wires()
        # Not into libp2p's peerstore: its AutoConnector dials peers found there until a node holds
        # 200 connections, so every node would connect to every server (docs/scaling.md). Every
        # stream to a server is opened with the addresses of its record (open_stream).
        return True

    def _live_wires(self) -> dict[str, dict[str, Any]]:
        """The signed wires of live records; expired ones are dropped, so both tables stay bounded."""
        live = {r.peer_id for r in self.records.live()}
        for gone in self._raw_records.keys() - live:
            del self._raw_records[gone]
            self._accepted_at.pop(gone, None)
        return self._raw_records

    def _validate_announcement(self, forwarder: ID, message: Any) -> bool:
        """Gossipsub's validator of the records topic: take the record; forward it only if taken.

        This node's own announcements were taken by ``announce`` already. A bad record never
        stops discovery: it is dropped, and counts against the peer that forwarded it.
        """
        publisher = ID(message.from_id).to_base58()
        if publisher == self.peer_id:
            return True
        try:
            return self._accept(protocol.decode_cbor(message.data), publisher=publisher)
        except Exception as error:
            logger.info("dropped a bad record from %s: %s", forwarder, error)
            return False

    @staticmethod
    async def _drain(subscription: Any) -> None:
        """The subscription keeps this node in the topic's mesh; its records were taken by the validator."""
        while True:
            await subscription.get()

    async def _serve_records(self, stream: protocol.Stream) -> None:
        try:
            with trio.fail_after(RECORDS_REQUEST_TIMEOUT):  # a peer that asks nothing holds no handler
                await protocol.read_frame(stream, max_bytes=1024)
            if not self._records_asks.take(stream.muxed_conn.peer_id.to_base58()):
                await protocol.write_frame(stream, protocol.error_frame(
                    "too many records requests from this peer; retry later", protocol.BUSY))
                return
            live = {r.peer_id for r in self.records.live()}
            await protocol.write_frame(stream, {"type": "records", "records": [
                wire for peer, wire in self._live_wires().items() if peer in live]})
        except Exception as error:
            logger.debug("records request failed: %s", error)
        finally:
            await stream.close()

    async def pull_records(self, peer_id: str) -> int:
        """Ask one peer for all records it knows; returns how many were accepted."""
        stream = await self.open_stream(peer_id, protocol.RECORDS)
        reply = await protocol.request(
            stream, {"type": "records?"}, "records", timeout=CONNECT_TIMEOUT, max_bytes=MAX_RECORD_FRAME
        )
        accepted = 0
        for wire in protocol.field(reply, "records", list):
            try:
                self._accept(wire)
                accepted += 1
            except Exception as error:
                logger.warning("dropped a bad pulled record: %s", error)
        return accepted


@asynccontextmanager
async def start_node(
    *,
    listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
    initial_peers: Sequence[str] = (),
    key_pair: KeyPair | None = None,
    psk: str | None = None,
    announce_addrs: Sequence[str] = (),
    allow_peers: Collection[str] | None = None,
) -> AsyncIterator[SwarmNode]:
    """Run a node until the context exits: listen, join through ``initial_peers``, discover.

    ``key_pair`` is the node's identity (swarm/trust/keys.py), ``psk`` a private swarm's key
    (swarm/trust/keys.py); ``allow_peers``, when given, limits the servers this node routes through.
    """
    key_pair = key_pair or create_new_key_pair()
    host = new_host(key_pair=key_pair, psk=psk)
    gossipsub = GossipSub(
        protocols=[GOSSIPSUB_PROTOCOL], degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
        max_messages_per_topic_per_second=GOSSIP_FORWARD_RATE,
    )
    pubsub = Pubsub(host, gossipsub)
    for proto in gossipsub.get_protocols():
        host.set_stream_handler(proto, _guarded(pubsub.stream_handler))
    node = SwarmNode(host, pubsub, key_pair, announce_addrs=announce_addrs, allow_peers=allow_peers)
    pubsub.set_topic_validator(protocol.RECORDS_TOPIC, node._validate_announcement, False)
    host.set_stream_handler(protocol.RECORDS, node._serve_records)
    async with host.run([multiaddr.Multiaddr(a) for a in listen]):
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            await pubsub.wait_until_ready()
            subscription = await pubsub.subscribe(protocol.RECORDS_TOPIC)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(node._drain, subscription)
                await _join(node, initial_peers)
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()


async def _join(node: SwarmNode, initial_peers: Sequence[str]) -> None:
    if not initial_peers:
        return
    errors = []
    for address in initial_peers:
        try:
            peer_id = await node.connect(address)
            await node.pull_records(peer_id)
        except Exception as error:
            errors.append(f"{address}: {error!r}")
            logger.warning("could not join through %s: %r", address, error)
    if len(errors) == len(initial_peers):
        raise ConnectionError(
            "could not reach any initial peer (down, unreachable, or of a private swarm whose key this node "
            "lacks: see --swarm-key): " + "; ".join(errors)
        )
