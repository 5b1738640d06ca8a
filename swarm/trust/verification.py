"""Spot-checks of untrusted servers: recompute a hop's outputs elsewhere and compare.

A checked hop's blocks get a *shadow*: a session on another server holding the same blocks, fed
the very inputs the hop was fed (the session records them, as wire bytes, for replay anyway). The
shadow is fed lazily — at a check it catches up on every step since the last check as one
multi-token step — so a check at step t compares *all* of the hop's outputs up to t, not just
step t's: a server cannot lie only on the steps it guesses are unwatched, since any later check
covers them (it can only hope that no later check comes, and checks are drawn at random by the
client). On a mismatch a third server, a fresh shadow fed everything at once, referees: the side it
disagrees with is banned (swarm/trust/bans.py). With fewer than three servers for a span nobody
can be told apart, and the mismatch is only counted.

Outputs are compared per token row by relative L2 error, within a tolerance built from the
dtypes, the wire codec and the weight quantization involved (``tolerance``): honest servers differ
by rounding — batched against one-token kernels, other GPUs, int8 wire blocks — far less than a
corrupted or substituted computation. What this cannot catch: a colluding majority of a span's
servers, and deviations smaller than the tolerance (a subtle bias well under the hidden states'
rounding noise).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import torch
import trio

from swarm import codec, protocol
from swarm.records import ServerRecord

logger = logging.getLogger(__name__)

# Relative L2 error per token row between honest computations, by source of rounding.
DTYPE_ERROR = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 5e-2, torch.float16: 3e-2}
CODEC_ERROR = {"none": 0.0, "int8": 3e-2, "bfloat16": 1e-2, "float16": 5e-3}  # on the compared output
QUANT_ERROR = {"none": 0.0, "int8": 5e-2, "nf4": 0.15}
PUBLIC_VERIFY_FRACTION = 0.05  # gateways' default in swarms anyone can join (no swarm key, no --allow-peers)
FEED_BYTES = 32 * 2**20  # largest catch-up frame: longer catch-ups go in several steps


def tolerance(dtypes: tuple[torch.dtype, ...], wire_codec: str, quants: tuple[str, ...]) -> float:
    """Largest relative L2 error per token row that honest servers may show between them."""
    return (max(DTYPE_ERROR.get(dtype, 5e-2) for dtype in dtypes) + CODEC_ERROR.get(wire_codec, 3e-2)
            + max(QUANT_ERROR.get(quant, 0.15) for quant in quants))


def relative_errors(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """||output - reference|| / ||reference|| per [batch, token] row, in float32."""
    output, reference = output.float(), reference.float()
    return (output - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)


@dataclass
class VerificationStats:
    """What this client's checks found (for /metrics and GET /v1/swarm)."""

    checks: int = 0  # hop outputs recomputed elsewhere and compared (one per checked hop and step)
    mismatches: int = 0  # checks that disagreed beyond the tolerance
    undecided: int = 0  # mismatches no third server could settle
    bans: int = 0  # servers banned (each once, however many checks caught it)

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def concat(wires: list[dict[str, Any]], max_elements: int) -> torch.Tensor:
    """Recorded steps' tensors, one after the other along tokens."""
    return torch.cat([codec.decode(wire, max_elements=max_elements) for wire in wires], dim=1)


@dataclass(frozen=True)
class Verdict:
    hop_wrong: bool = False
    shadow_wrong: bool = False
    referee: list[str] = field(default_factory=list)  # the third server's peers, when one was asked


Referee = Callable[[], Awaitable[tuple[torch.Tensor, list[str]]]]


async def judge(
    got: torch.Tensor, expected: torch.Tensor, wire_codec: str, quants: tuple[str, ...], referee: Referee,
    stats: VerificationStats,
) -> Verdict:
    """Compare a hop's outputs (`got`, through `wire_codec`) with its shadow's (`expected`); on a
    mismatch ask `referee` for a third computation and side with the majority."""
    stats.checks += 1
    limit = tolerance((got.dtype, expected.dtype), wire_codec, quants)
    if relative_errors(got, expected).max() <= limit:
        return Verdict()
    stats.mismatches += 1
    try:
        reference, peers = await referee()
    except Exception as error:
        stats.undecided += 1
        logger.warning("a hop and its shadow disagree and no third server can decide (%r)", error)
        return Verdict()
    hop_right = bool(relative_errors(got, reference).max() <= limit)
    shadow_right = bool(relative_errors(expected, reference).max() <= limit)
    if hop_right == shadow_right:
        stats.undecided += 1
        logger.warning("no majority between a hop, its shadow and referee %s", peers)
        return Verdict(referee=peers)
    return Verdict(hop_wrong=shadow_right, shadow_wrong=hop_right, referee=peers)


class OpenHop(Protocol):
    """A session on one server (swarm/session.py's ``Hop``)."""

    record: ServerRecord
    stream: protocol.Stream


class ShadowChain:
    """Blocks of a session recomputed on other servers, fed the session's recorded inputs.

    Its sessions use wire codec ``none``: its outputs are exact, so the comparison's tolerance
    pays for the checked hop's codec once, not twice.
    """

    def __init__(self, hops: list[OpenHop], *, timeout: float, max_elements: int) -> None:
        self.hops = hops
        self.fed = 0  # recorded steps computed so far
        self._timeout = timeout
        self._max_elements = max_elements

    @classmethod
    async def open(
        cls, records: list[ServerRecord], open_hop: Callable[[ServerRecord], Awaitable[OpenHop]], *, timeout: float,
        max_elements: int,
    ) -> "ShadowChain":
        hops: list[OpenHop] = []
        try:
            for record in records:
                hops.append(await open_hop(record))
        except BaseException:
            await cls(hops, timeout=timeout, max_elements=max_elements).close()
            raise
        return cls(hops, timeout=timeout, max_elements=max_elements)

    @property
    def peers(self) -> list[str]:
        return [hop.record.peer_id for hop in self.hops]

    async def feed(self, inputs: list[dict[str, Any]], offsets: list[int], upto: int) -> torch.Tensor:
        """Outputs of recorded steps [fed, upto), concatenated along tokens.

        Steps are fed together (a catch-up is a prefill of what the shadow missed), in frames of at
        most ``FEED_BYTES``.
        """
        hidden = concat(inputs[self.fed:upto], self._max_elements)
        position = offsets[self.fed]
        per_token = hidden.shape[0] * hidden.shape[2] * hidden.element_size()
        chunk = max(1, FEED_BYTES // per_token)
        outputs = []
        for begin in range(0, hidden.shape[1], chunk):
            outputs.append(await self._step(hidden[:, begin:begin + chunk], position + begin))
        self.fed = upto
        return torch.cat(outputs, dim=1)

    async def _step(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        wire = codec.encode(hidden, "none")
        with trio.fail_after(self._timeout):
            for hop in self.hops:
                await protocol.write_frame(hop.stream, {"type": "step", "position": position, "hidden": wire})
                reply = protocol.expect(
                    await protocol.read_frame(hop.stream, max_bytes=protocol.MAX_REPLY_FRAME), "output"
                )
                if protocol.field(reply, "position", int) != position:
                    raise protocol.ProtocolError(f"shadow server {hop.record.peer_id} answered for another step")
                wire = protocol.field(reply, "hidden", dict)
        output = codec.decode(wire, max_elements=hidden.numel())
        if output.shape != hidden.shape:
            raise protocol.ProtocolError(f"shadow returned shape {list(output.shape)}, sent {list(hidden.shape)}")
        return output

    async def close(self) -> None:
        for hop in self.hops:
            await protocol.close_quietly(hop.stream)
