"""Peers this client caught returning wrong outputs: banned for the client's lifetime.

Unlike a failure (swarm/routing.py), a wrong output is no accident of the network: the server
computes something other than the model (a bug, other weights or quantization, or malice), and it
will do so again. So a ban is permanent for this client; restarting the gateway forgets it. A
banned peer can come back under a new identity — keys are free — which only costs it the trust
it had to earn again: it is checked like any other server (docs: VERIFICATION in README).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ban:
    peer_id: str
    reason: str
    since: float  # unix time

    def to_json(self) -> dict[str, Any]:
        return {"peer_id": self.peer_id, "reason": self.reason, "since": self.since}


class BanList:
    def __init__(self) -> None:
        self._bans: dict[str, Ban] = {}

    def ban(self, peer_id: str, reason: str) -> Ban:
        """Ban `peer_id` (the first reason stays: later ones are the same incident seen again)."""
        return self._bans.setdefault(peer_id, Ban(peer_id, reason, time.time()))

    def banned(self) -> frozenset[str]:
        return frozenset(self._bans)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._bans

    def entries(self) -> list[Ban]:
        return sorted(self._bans.values(), key=lambda ban: ban.since)
