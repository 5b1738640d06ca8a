"""Networking only: the libp2p swarm's wire protocol, discovery, routing, and the client that moves hidden states.

protocol: frames, the typed ``Stream``, the ``request`` helper · codec: tensors on the wire ·
node/records/identity/pnet: a swarm member, its signed server records, keys · routing/backoff:
choosing chains · client/session/uploads/training: inference sessions, forwards, LoRA training
over a chain · bridge: asyncio meets trio · health: the swarm's state per model.
"""
