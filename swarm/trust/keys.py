"""A node's key files: its identity (``--identity FILE``) and a private swarm's key (``--swarm-key FILE``).

**Identity.** The peer id is derived from the node's libp2p private key, so a node that keeps its
key keeps its peer id and, with a fixed listen port, its multiaddr: other nodes'
``--initial-peers`` stay valid across restarts, and clients keep routing to it. The file holds
libp2p's own protobuf serialization of the private key (the format go-libp2p's
``crypto.MarshalPrivateKey`` writes), never a pickle.

**Private swarms.** Every connection of a node started with a swarm key is encrypted with that
pre-shared key below everything else (py-libp2p's pnet), so a node without the same key cannot
complete even the first handshake: it can neither join the swarm nor be routed to. Key files use
go-libp2p's (and IPFS's) ``swarm.key`` format::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>
"""

from __future__ import annotations

import secrets
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType, PrivateKey
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

from common.secret_file import read_secret_file, write_secret_file

_ED25519_SEED = 32


def load_identity(path: str | Path) -> KeyPair:
    """The key pair stored at ``path``; a clear ``ValueError`` if it is missing or not a key."""
    data = read_secret_file(path, "node identity")
    try:
        message = PrivateKey.deserialize_from_protobuf(data)
        if message.key_type == KeyType.Ed25519.value and len(message.data) == 2 * _ED25519_SEED:
            # go-libp2p stores seed + public key; PyNaCl wants the 32-byte seed alone.
            message.data = message.data[:_ED25519_SEED]
        private_key = deserialize_private_key(message.SerializeToString())
    except Exception as error:
        raise ValueError(f"{path} is not a libp2p private key file: {error!r}") from error
    return KeyPair(private_key, private_key.get_public_key())


def load_or_create_identity(path: str | Path) -> KeyPair:
    """The identity at ``path``, or a new ed25519 one written there (mode 0600) on first start."""
    path = Path(path)
    if path.exists():
        return load_identity(path)
    key_pair = create_new_key_pair()
    write_secret_file(path, key_pair.private_key.serialize())
    return key_pair


def peer_id_of(key_pair: KeyPair) -> str:
    return ID.from_pubkey(key_pair.public_key).to_base58()


# -- private swarms ----------------------------------------------------------------------------
HEADER = "/key/swarm/psk/1.0.0/"
ENCODING = "/base16/"
KEY_BYTES = 32


def new_swarm_key() -> str:
    """A fresh random key as the 64 hex digits py-libp2p's ``new_host(psk=...)`` takes."""
    return secrets.token_hex(KEY_BYTES)


def format_swarm_key(key: str) -> str:
    return f"{HEADER}\n{ENCODING}\n{key}\n"


def parse_swarm_key(text: str) -> str:
    """The 64 hex digits of a ``swarm.key`` file's text; ``ValueError`` names what is wrong."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) != 3 or lines[0] != HEADER:
        raise ValueError(f"a swarm key file has 3 lines: {HEADER!r}, {ENCODING!r} and the key in hex")
    if lines[1] != ENCODING:
        raise ValueError(f"unsupported swarm key encoding {lines[1]!r}; only {ENCODING!r} is read")
    key = lines[2].lower()
    try:
        if len(bytes.fromhex(key)) != KEY_BYTES:
            raise ValueError
    except ValueError:
        raise ValueError(f"a swarm key is {2 * KEY_BYTES} hex digits") from None
    return key


def read_swarm_key(path: str | Path) -> str:
    text = read_secret_file(path, "swarm key").decode("ascii", errors="replace")
    try:
        return parse_swarm_key(text)
    except ValueError as error:
        raise ValueError(f"bad swarm key file {path}: {error}") from error


def write_swarm_key(path: str | Path, key: str | None = None) -> str:
    """Write a key (a new one unless given) to ``path`` with mode 0600; returns it."""
    key = parse_swarm_key(format_swarm_key(key or new_swarm_key()))
    write_secret_file(path, format_swarm_key(key).encode("ascii"))
    return key
