"""How a node joins the swarm: listen addresses, entry peers, identity, private swarm key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from libp2p.crypto.keys import KeyPair

DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)


@dataclass(frozen=True)
class NodeOptions:
    """``start_node``/``SwarmBridge`` keyword arguments; the caller has already read the key files."""

    listen: list[str] = field(default_factory=lambda: list(DEFAULT_LISTEN))
    initial_peers: list[str] = field(default_factory=list)
    key_pair: KeyPair | None = None  # the node's identity; None: a new one each start
    psk: str | None = None  # a private swarm's pre-shared key

    def kwargs(self) -> dict[str, Any]:
        return dict(listen=self.listen, initial_peers=self.initial_peers, key_pair=self.key_pair, psk=self.psk)
