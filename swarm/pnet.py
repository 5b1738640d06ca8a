"""Private swarms: the pre-shared key of a libp2p private network (``--swarm-key FILE``).

Every connection of a node started with a swarm key is encrypted with it below everything else
(py-libp2p's pnet), so a node without the same key cannot complete even the first handshake:
it can neither join the swarm nor be routed to. Key files use go-libp2p's (and IPFS's)
``swarm.key`` format::

    /key/swarm/psk/1.0.0/
    /base16/
    <64 hex digits>
"""

from __future__ import annotations

import secrets
from pathlib import Path

from common.secret_file import read_secret_file, write_secret_file

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
