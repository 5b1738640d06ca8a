"""A session's spot checks: each hop, at a random step, recomputed by an independent server.

Per checked hop a shadow chain (other servers holding the hop's blocks, fed the hop's recorded
inputs lazily, swarm/trust/verification.py) gives the expected outputs; a mismatch beyond the
tolerance goes to a third server, and whoever it disagrees with is banned. Which steps are
checked is drawn from the OS's entropy, so a server cannot predict when it is watched.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Awaitable, Callable, Iterable, Protocol

import torch
import trio

from swarm.records import ServerRecord
from swarm.routing import NoChainError
from swarm.trust.verification import OpenHop, ShadowChain, VerificationStats, concat, judge

logger = logging.getLogger(__name__)

_draw = random.SystemRandom()  # which steps are checked: servers must not be able to predict it


class Hop(Protocol):
    """A session's hop as checks see it (swarm/session.py's ``Hop``): its server and its records."""

    record: ServerRecord
    inputs: list[dict[str, Any]]  # each step's input, as the exact wire bytes
    outputs: list[dict[str, Any]]


class Chains(Protocol):
    """What checks need of the session's client (swarm/session.py's ``ChainProvider`` extends it)."""

    async def open_hop(self, record: ServerRecord, request: Any) -> OpenHop: ...

    def failed(self, peer_id: str) -> float:
        """Back off from a failed server; returns for how many seconds it is avoided."""
        ...

    def shadow_chain(self, like: ServerRecord, *, avoid: Iterable[str]) -> list[ServerRecord]:
        """Other servers for `like`'s blocks and checkpoint, to check it; raises NoChainError."""
        ...

    def ban(self, peer_id: str, reason: str) -> None:
        """Never route through `peer_id` again: it returned wrong outputs."""
        ...

    @property
    def verification(self) -> VerificationStats: ...


class SpotChecks:
    """The shadows of one session's checked hops, and the checks themselves.

    `close_streams(streams, background=)` closes streams the way the session does (in its nursery
    while a step runs).
    """

    def __init__(self, chains: Chains, request: Any, *, fraction: float, timeout: float,
                 close_streams: Callable[..., Awaitable[None]]) -> None:
        self._chains = chains
        self._request = request
        self._fraction = fraction
        self._timeout = timeout
        self._close_streams = close_streams
        self._shadows: dict[Hop, ShadowChain] = {}

    async def liars(self, hops: list[Hop], offsets: list[int], max_elements: int) -> list[Hop]:
        """Check each hop with probability `fraction` (all up to the current step); the hops
        caught lying, their servers banned already."""
        checked = [hop for hop in hops if self._fraction > 0 and _draw.random() < self._fraction]
        liars: list[Hop] = []
        async with trio.open_nursery() as nursery:
            for hop in checked:
                nursery.start_soon(self._check, hop, offsets, max_elements, liars)
        return liars

    async def _check(self, hop: Hop, offsets: list[int], max_elements: int, liars: list[Hop]) -> None:
        """Compare `hop`'s outputs since its last check with its shadow's; a third server referees
        a mismatch, and whoever it disagrees with is banned."""
        steps, shadow = len(offsets), self._shadows.get(hop)
        try:
            if shadow is None:
                shadow = self._shadows[hop] = await self._open_shadow(hop, {hop.record.peer_id}, max_elements)
            first = shadow.fed
            expected = await shadow.feed(hop.inputs, offsets, steps)
        except NoChainError:
            return  # no other server holds these blocks: nothing to compare with
        except Exception as error:  # the shadow failed, not the hop: another one next time
            logger.info("check of %s skipped: its shadow failed (%r)", hop.record.peer_id, error)
            if shadow is not None:
                await self.drop(hop, failed=True)
            return

        async def referee() -> tuple[torch.Tensor, list[str]]:
            chain = await self._open_shadow(hop, {hop.record.peer_id, *shadow.peers}, max_elements)
            try:
                return (await chain.feed(hop.inputs, offsets, steps))[:, offsets[first]:], chain.peers
            finally:
                await chain.close()

        quants = (hop.record.quant, *(h.record.quant for h in shadow.hops))
        where = f"blocks [{hop.record.start}, {hop.record.end}), steps {first}-{steps - 1}"
        verdict = await judge(concat(hop.outputs[first:steps], max_elements), expected, self._request.wire_codec,
                              quants, referee, self._chains.verification)
        if verdict.hop_wrong:
            self._chains.ban(hop.record.peer_id, f"wrong outputs on {where}, outvoted by {shadow.peers + verdict.referee}")
            liars.append(hop)
        elif verdict.shadow_wrong:
            for peer in shadow.peers:
                self._chains.ban(peer, f"wrong outputs on {where}, outvoted by {[hop.record.peer_id] + verdict.referee}")
            await self.drop(hop)

    async def _open_shadow(self, hop: Hop, avoid: set[str], max_elements: int) -> ShadowChain:
        request = dataclasses.replace(self._request, wire_codec="none")  # a swarm/session.py SessionRequest  # exact: tolerances pay for one codec
        records = self._chains.shadow_chain(hop.record, avoid=avoid)
        return await ShadowChain.open(records, lambda record: self._chains.open_hop(record, request),
                                      timeout=self._timeout, max_elements=max_elements)

    async def truncated(self, keep: int, cut: bool) -> None:
        """The session kept its first `keep` steps (the last of them `cut` short): shadows that
        computed a forgotten position are closed; the next check rebuilds them."""
        for hop in [hop for hop, shadow in self._shadows.items() if shadow.fed > keep or (cut and shadow.fed == keep)]:
            await self.drop(hop)

    async def drop(self, hop: Hop, *, failed: bool = False, background: bool = True) -> None:
        """Close `hop`'s shadow, if it has one (`failed`: its servers failed, avoid them a while)."""
        shadow = self._shadows.pop(hop, None)
        if shadow is None:
            return
        for peer in shadow.peers if failed else ():
            self._chains.failed(peer)
        await self._close_streams([shadow_hop.stream for shadow_hop in shadow.hops], background=background)
