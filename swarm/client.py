"""The swarm client (trio side): inference sessions over a chain of servers, and plain forwards.

The gateway keeps embeddings and the LM head; this module only moves hidden states. A session
sends each step to the first server of its chain with the rest of the chain as a route; every
server pushes its output to the next one and also back here, so the client holds each span's
inputs (as the exact wire bytes) for replay, while a token costs one pass along the chain.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import trio

from swarm import codec, protocol
from swarm.lora import LoraWeights
from swarm.node import SwarmNode
from swarm.records import ServerRecord
from swarm.routing import choose_chain
from swarm.uploads import AdapterUploads

DEFAULT_STEP_TIMEOUT = 60.0
MAX_REPLY_FRAME = 1024 * 1024 * 1024


@dataclass
class _Hop:
    record: ServerRecord
    session: str
    stream: Any
    inputs: list[dict[str, Any]] = field(default_factory=list)  # wire tensors sent into this span


class InferenceSession:
    """A stateful generation session: ``step`` hidden states through every block, in order."""

    def __init__(self, client: "SwarmClient", hops: list[_Hop], *, batch: int, max_length: int, wire_codec: str):
        self._client = client
        self._hops = hops
        self.batch = batch
        self.max_length = max_length
        self.codec = wire_codec
        self.position = 0

    @property
    def chain(self) -> list[ServerRecord]:
        return [hop.record for hop in self._hops]

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, hidden] in, same out; prefill first, then one token at a time."""
        if hidden.dim() != 3 or hidden.shape[0] != self.batch:
            raise ValueError(f"expected hidden states [{self.batch}, tokens, hidden], got {list(hidden.shape)}")
        if self.position + hidden.shape[1] > self.max_length:
            raise ValueError(f"session is limited to {self.max_length} tokens")
        wire = codec.encode(hidden, self.codec)
        route = [
            {"peer": hop.record.peer_id, "session": hop.session, "addrs": list(hop.record.addrs)}
            for hop in self._hops[1:]
        ]
        first = self._hops[0]
        started = time.perf_counter()
        await protocol.write_frame(
            first.stream, {"type": "step", "position": self.position, "hidden": wire, "route": route}
        )
        first.inputs.append(wire)
        output: dict[str, Any] = wire
        with trio.fail_after(self._client.step_timeout):
            for index, hop in enumerate(self._hops):
                reply = protocol.expect(await self._read(hop), "output")
                if protocol.field(reply, "position", int) != self.position:
                    raise protocol.ProtocolError(f"server {hop.record.peer_id} answered for another step")
                output = protocol.field(reply, "hidden", dict)
                if index + 1 < len(self._hops):
                    self._hops[index + 1].inputs.append(output)
        self._client.node.observe_rtt(first.record.peer_id, (time.perf_counter() - started) / len(self._hops))
        self.position += hidden.shape[1]
        result = codec.decode(output, max_elements=self.batch * self.max_length * hidden.shape[2])
        if list(result.shape) != list(hidden.shape):
            raise protocol.ProtocolError(f"chain returned shape {list(result.shape)}, sent {list(hidden.shape)}")
        return result.to(hidden.dtype)

    async def _read(self, hop: _Hop) -> dict[str, Any]:
        return await protocol.read_frame(hop.stream, max_bytes=MAX_REPLY_FRAME)

    async def close(self) -> None:
        """Closing the streams frees every server's cache for this session."""
        for hop in self._hops:
            try:
                await hop.stream.close()
            except Exception:
                pass  # server already gone
        self._hops = []

    async def __aenter__(self) -> "InferenceSession":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SwarmClient:
    def __init__(self, node: SwarmNode, *, step_timeout: float = DEFAULT_STEP_TIMEOUT):
        self.node = node
        self.step_timeout = step_timeout
        self.uploads = AdapterUploads(node, timeout=step_timeout)

    def servers(self, model: str) -> list[ServerRecord]:
        return sorted(self.node.records.live(model), key=lambda r: (r.start, r.end, r.peer_id))

    def chain(self, model: str, num_blocks: int) -> list[ServerRecord]:
        return choose_chain(model, self.node.records.live(model), num_blocks, rtt=self.node.rtt)

    async def open_session(
        self,
        model: str,
        num_blocks: int,
        *,
        batch: int = 1,
        max_length: int,
        wire_codec: str = "int8",
        checkpoint: str | None = None,
        adapter: LoraWeights | None = None,  # LoRA on every span; each server gets its span's tensors
    ) -> InferenceSession:
        hops: list[_Hop] = []
        try:
            for record in self.chain(model, num_blocks):
                hops.append(await self.uploads.run(record, adapter, lambda digest: self._open_hop(
                    record, batch, max_length, wire_codec, checkpoint, digest)))
        except BaseException:
            await InferenceSession(self, hops, batch=batch, max_length=max_length, wire_codec=wire_codec).close()
            raise
        return InferenceSession(self, hops, batch=batch, max_length=max_length, wire_codec=wire_codec)

    async def _open_hop(
        self, record: ServerRecord, batch: int, max_length: int, wire_codec: str, checkpoint: str | None,
        adapter: str | None,
    ) -> _Hop:
        session = secrets.token_hex(16)
        stream = await self.node.open_stream(record.peer_id, protocol.INFERENCE, record.addrs)
        try:
            request = {"type": "open", "session": session, "batch": batch, "max_length": max_length,
                       "codec": wire_codec}
            if checkpoint is not None:
                request["checkpoint"] = checkpoint
            if adapter is not None:
                request["adapter"] = adapter
            await protocol.write_frame(stream, request)
            with trio.fail_after(self.step_timeout):
                protocol.expect(await protocol.read_frame(stream), "opened")
        except BaseException:
            await stream.close()
            raise
        return _Hop(record, session, stream)

    async def forward(self, model: str, num_blocks: int, hidden: torch.Tensor, *, wire_codec: str = "int8") -> torch.Tensor:
        """Cache-less forward of full sequences through every block (one request per span)."""
        wire = codec.encode(hidden, wire_codec)
        for record in self.chain(model, num_blocks):
            stream = await self.node.open_stream(record.peer_id, protocol.FORWARD, record.addrs)
            try:
                await protocol.write_frame(stream, {"type": "forward", "codec": wire_codec, "hidden": wire})
                with trio.fail_after(self.step_timeout):
                    reply = protocol.expect(await protocol.read_frame(stream, max_bytes=MAX_REPLY_FRAME), "output")
            finally:
                await stream.close()
            wire = protocol.field(reply, "hidden", dict)
        result = codec.decode(wire, max_elements=hidden.numel())
        if list(result.shape) != list(hidden.shape):
            raise protocol.ProtocolError(f"chain returned shape {list(result.shape)}, sent {list(hidden.shape)}")
        return result.to(hidden.dtype)
