"""Server records: what each block server announces, and the table of live ones.

A record is short-lived: it lives a TTL from its arrival, but never past a TTL and one announce
interval (a third of the TTL) from when its server signed it (``issued_at``, the server's wall
clock). So a server that stops refreshing vanishes by itself; a record that a busy receiver took
late loses none of its life; and a copy handed on later (pulled from a peer's table, replayed from
gossip's message cache) expires about when the first copy did instead of starting a fresh TTL.
This asks that clocks agree to well within an interval, as NTP gives; a record stamped in the
receiver's future counts from its arrival.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from swarm.protocol import PROTOCOL_VERSION, ProtocolError


# A server announces its record this many times per TTL, so a live server's record never lapses
# between announces; a record's age past one interval (TTL / this) counts against its life.
ANNOUNCES_PER_TTL = 3


@dataclass(frozen=True)
class ServerRecord:
    peer_id: str
    addrs: tuple[str, ...]
    model: str
    checkpoint: str
    start: int
    end: int
    throughput: float  # tokens/s through the whole span, measured by the server
    free_tokens: int
    sessions: int
    ttl: float
    version: str = PROTOCOL_VERSION
    block_bytes: int = 0  # weight memory per block on the server, as loaded (quantized or not); 0: unknown
    quant: str = "none"  # weight quantization: none, int8, nf4
    model_blocks: int = 0  # blocks of the whole model, so coverage can name missing tail blocks; 0: unknown
    issued_at: float = 0.0  # the announcer's wall clock when it signed the record; 0: unknown (counts from arrival)
    received_at: float = field(default=0.0, compare=False)  # local monotonic clock, back-dated by the record's age

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def expired(self, now: float) -> bool:
        return now > self.received_at + self.ttl

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire.pop("received_at")
        wire["addrs"] = list(self.addrs)
        return wire

    @classmethod
    def from_wire(cls, wire: Any, *, received_at: float, wall_clock: float | None = None) -> "ServerRecord":
        """Parse a record that arrived at `received_at` (monotonic) when the wall clock read
        `wall_clock` (default: now); its age since `issued_at` is taken off its life."""
        if not isinstance(wire, dict):
            raise ProtocolError("record must be a map")
        try:
            record = cls(
                peer_id=str(wire["peer_id"]),
                addrs=tuple(str(a) for a in wire["addrs"]),
                model=str(wire["model"]),
                checkpoint=str(wire["checkpoint"]),
                start=int(wire["start"]),
                end=int(wire["end"]),
                throughput=float(wire["throughput"]),
                free_tokens=int(wire["free_tokens"]),
                sessions=int(wire["sessions"]),
                ttl=min(float(wire["ttl"]), 600.0),
                version=str(wire["version"]),
                block_bytes=int(wire.get("block_bytes", 0)),  # absent from older servers' records
                quant=str(wire.get("quant", "none")),
                model_blocks=int(wire.get("model_blocks", 0)),
                issued_at=float(wire.get("issued_at", 0.0)),
                received_at=received_at,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ProtocolError(f"malformed record: {error}") from error
        if not 0 <= record.start < record.end:
            raise ProtocolError(f"record has an empty span [{record.start}, {record.end})")
        if record.model_blocks and record.end > record.model_blocks:
            raise ProtocolError(
                f"record's span [{record.start}, {record.end}) exceeds the model's {record.model_blocks} blocks"
            )
        if record.issued_at > 0:  # the part of its age past one announce interval counts
            age = (time.time() if wall_clock is None else wall_clock) - record.issued_at - record.ttl / ANNOUNCES_PER_TTL
            record = replace(record, received_at=received_at - min(max(age, 0.0), record.ttl))
        return record


MAX_RECORDS = 1024


class RecordTable:
    """The live records this node knows, one per server peer, at most `max_records` of them.

    Keys are free, so anyone can sign records of made-up servers: a full table refuses records
    of peers it does not hold yet (known peers still refresh), and expired ones make room. This
    bounds memory; it does not stop a flood from crowding out servers that join during it.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_records: int = MAX_RECORDS) -> None:
        self._clock = clock
        self._max_records = max_records
        self._records: dict[str, ServerRecord] = {}
        self._stale_until: dict[str, float] = {}  # peer -> issued_at of a record found stale (`forget`)

    def add(self, record: ServerRecord) -> bool:
        """Store `record`; False when the table is full of other live peers' records, or holds a
        record of the peer issued later (an older announcement arriving late, by gossip's lazy
        delivery or a pull, must not roll a server back to a span it has left)."""
        if (held := self._records.get(record.peer_id)) is not None and record.issued_at < held.issued_at:
            return False
        if record.issued_at <= self._stale_until.get(record.peer_id, -1.0):
            return False  # that record, or an older one, again
        self._stale_until.pop(record.peer_id, None)
        if record.peer_id not in self._records and len(self._records) >= self._max_records:
            self.live()  # drop the expired
            if len(self._records) >= self._max_records:
                return False
        self._records[record.peer_id] = record
        return True

    def forget(self, peer_id: str) -> None:
        """Drop a peer's record that proved stale (its server moved): the peer is unknown until a
        record issued later arrives."""
        if (held := self._records.pop(peer_id, None)) is not None:
            self._stale_until[peer_id] = held.issued_at

    def live(self, model: str | None = None) -> list[ServerRecord]:
        now = self._clock()
        for peer_id in [p for p, r in self._records.items() if r.expired(now)]:
            del self._records[peer_id]
        return [r for r in self._records.values() if model is None or r.model == model]
