"""A node's stable identity: its libp2p private key kept in a file (``--identity FILE``).

The peer id is derived from the key, so a node that keeps its key keeps its peer id and, with
a fixed listen port, its multiaddr: other nodes' ``--initial-peers`` stay valid across restarts,
and clients keep routing to it. The file holds libp2p's own protobuf serialization of the
private key (the format go-libp2p's ``crypto.MarshalPrivateKey`` writes), never a pickle.
"""

from __future__ import annotations

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
