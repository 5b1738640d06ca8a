"""The TRAIN protocol of a block server: adapter uploads, and forward/backward with LoRA.

No state between requests is needed: ``backward`` can carry the span's input again, and the
server recomputes the forward (activation recomputation: one more forward per step) rather than
keeping activations from the client's ``forward`` until its ``backward``. So memory is bounded per
request and any server of the same span can answer a backward.

What a server may keep, only to save bytes: a forward's input, when it asks (``keep``), for its
backward to name (``kept``) instead of sending it again. Kept inputs are bounded (``--train-kept-mb``)
and expire after the idle timeout (checked every second, so a client that vanishes costs nothing
for long); a server that has dropped one (bound, expiry, restart) answers ``unknown_input`` and
gets it sent.

Requests, any number per stream, each answered by one frame and each due within the read
timeout of the stream's opening or the previous answer:
- ``upload`` {adapter: digest, scaling, tensors: {PEFT name: tensor (codec none)}} -> ``stored``
- ``forward`` {adapter, codec, hidden[, keep]} -> ``output`` {hidden[, kept: key]}
- ``backward`` {adapter, codec, hidden or kept, grad[, input_grad]} -> ``grads`` {grad_input, grads: {name: tensor}}
  (``input_grad`` false: no ``grad_input``, e.g. for the first span, whose input needs none)
(``adapter`` null: the span has no LoRA tensors, e.g. an adapter limited to other layers.)
Every request may carry ``blocks`` [start, end], the span the client believes it addresses; a
server that has moved since refuses it (code ``error``: another server may do). A request naming
an adapter this server does not hold gets code ``unknown_adapter``; a malformed or oversized one
code ``invalid``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from typing import Any

import torch
import trio

from blocks.lora import LoraError, SpanLora
from blocks.lora_weights import LoraWeights
from blocks.span import BlockSpan
from blockserver import incoming
from blockserver.drill import Drill
from blockserver.limits import ServerLimits
from blockserver.metrics import ServerMetrics
from swarm import codec, protocol
from swarm.node_options import fitted
from swarm.protocol import ProtocolError, Stream, field as require

logger = logging.getLogger(__name__)


class UnknownAdapterError(LookupError):
    """No adapter with this digest here (never uploaded, or evicted): upload it, then retry."""

    def __str__(self) -> str:
        return f"unknown adapter {self.args[0]!r}: upload this span's tensors, then retry"


class AdapterCache:
    """A server's LoRA adapters by content digest, least recently used evicted first: adapters are
    small and many (one per tenant model, a new one per training step), so the recent ones are kept
    within a byte budget; a client naming a forgotten one gets ``UnknownAdapterError`` and uploads
    it again. Sessions keep a reference to theirs: eviction never changes a running session. Used
    from the event loop only."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, SpanLora] = OrderedDict()

    @property
    def used_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, digest: str, adapter: SpanLora) -> None:
        if adapter.nbytes > self.max_bytes:
            raise LoraError(f"adapter of {adapter.nbytes} bytes exceeds this server's cache of {self.max_bytes}")
        self._entries[digest] = adapter
        self._entries.move_to_end(digest)
        while self.used_bytes > self.max_bytes:
            self._entries.popitem(last=False)

    def get(self, digest: str) -> SpanLora:
        adapter = self._entries.get(digest)
        if adapter is None:
            raise UnknownAdapterError(digest)
        self._entries.move_to_end(digest)
        return adapter


class KeptInputs:
    """Training forwards' inputs kept for their backward, so that it sends only its gradient: one
    hidden-state-sized transfer less per span and step (16.8 MB for 4 x 512 tokens of an 8B model).
    Bounded in bytes (least recently kept go first) and in time; taken once, by the peer that kept
    it (keys are random besides)."""

    def __init__(self, max_bytes: int, ttl: float) -> None:
        self.max_bytes, self.ttl = max_bytes, ttl
        self._entries: OrderedDict[str, tuple[str, torch.Tensor, float]] = OrderedDict()  # key -> peer, input, when
        self.bytes = 0

    def put(self, peer: str, hidden: torch.Tensor) -> str | None:
        """A key for `hidden`, or None when it alone exceeds the bound."""
        size = hidden.numel() * hidden.element_size()
        if size > self.max_bytes:
            return None
        self.expire()
        while self.bytes + size > self.max_bytes:
            self._drop(next(iter(self._entries)))
        key = secrets.token_hex(16)
        self._entries[key] = (peer, hidden, time.monotonic())
        self.bytes += size
        return key

    def take(self, peer: str, key: str) -> torch.Tensor | None:
        self.expire()
        entry = self._entries.get(key)
        if entry is None or entry[0] != peer:
            return None
        self._drop(key)
        return entry[1]

    def expire(self) -> None:
        """Drop what has outlived the ttl (called on every use, and every second by the server)."""
        deadline = time.monotonic() - self.ttl
        while self._entries and next(iter(self._entries.values()))[2] < deadline:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _, hidden, _ = self._entries.pop(key)
        self.bytes -= hidden.numel() * hidden.element_size()


class TrainingService:
    def __init__(
        self, span: BlockSpan, limits: ServerLimits, compute: trio.CapacityLimiter,
        metrics: ServerMetrics | None = None, drill: Drill | None = None,
    ) -> None:
        self.limits = limits
        self.compute = compute  # shared with inference: one computation at a time
        self.metrics = metrics or ServerMetrics()
        self.metrics.train_kept_bytes.set_function(lambda: self.kept.bytes)  # read when scraped
        self.drill = drill or Drill()  # --drill-corrupt: corrupts a fraction of outputs on purpose
        self.span = span

    @property
    def span(self) -> BlockSpan:
        return self._span

    @span.setter
    def span(self, span: BlockSpan) -> None:
        """Serve another span (the server moved): adapters built for the old one's layers go."""
        self._span = span
        self.adapters = AdapterCache(self.limits.adapter_cache_bytes)
        self.kept = KeptInputs(self.limits.train_kept_bytes, self.limits.idle_timeout)

    async def expire_forever(self) -> None:
        """Kept inputs whose backward never came go after the idle timeout, even with no more
        training requests to notice it."""
        while True:
            await trio.sleep(1.0)
            self.kept.expire()

    def session_adapter(self, request: dict[str, Any]) -> SpanLora | None:
        """The adapter an ``open`` frame (or a training request) names in its ``adapter`` field.

        None where the field is absent or null: a span the adapter has no tensors for runs bare.
        """
        digest = request.get("adapter")
        if digest is None:
            return None
        if not isinstance(digest, str):
            raise ProtocolError("field 'adapter' must be an adapter digest")
        return self.adapters.get(digest)

    async def handle(self, stream: Stream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        try:
            while True:
                request = await incoming.read(stream, self.limits, self.limits.read_timeout)
                await protocol.write_frame(stream, await self._answer(request, peer))
        except EOFError:
            pass
        except incoming.ReadTimeout as error:
            self.metrics.errors.labels("read_timeout").inc()
            await incoming.try_send(stream, protocol.error_frame(str(error)))
        except ProtocolError as error:  # an unreadable frame: the stream is out of step, end it
            await incoming.try_send(stream, protocol.error_frame(str(error)))
        except Exception as error:
            logger.info("train stream ended: %r", error)
        finally:
            await incoming.try_close(stream)

    async def _answer(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        handlers = {"upload": self._upload, "forward": self._forward, "backward": self._backward}
        blocks = request.get("blocks")
        if blocks is not None and blocks != [self.span.start, self.span.end]:
            return protocol.error_frame(f"this server serves blocks [{self.span.start}, {self.span.end}) now, not {blocks}")
        try:
            if request["type"] not in handlers:
                raise ProtocolError(f"unknown request {request['type'][:40]!r}; expected one of {', '.join(handlers)}")
            return await handlers[request["type"]](request, peer)
        except UnknownAdapterError as error:
            return protocol.error_frame(str(error), protocol.UNKNOWN_ADAPTER)
        except _UnknownInput as error:
            return protocol.error_frame(str(error), protocol.UNKNOWN_INPUT)
        except (ProtocolError, ValueError) as error:  # codec and LoRA errors are ValueErrors too
            return protocol.error_frame(str(error), protocol.INVALID)
        except Exception as error:
            logger.exception("training request failed")
            return protocol.error_frame(f"training request failed: {error!r}")

    async def _upload(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        span, adapters = self.span, self.adapters  # a pair, even if the server moves meanwhile
        claimed = require(request, "adapter", str)
        scaling = require(request, "scaling", float)
        wires = require(request, "tensors", dict)
        if len(wires) > 2 * len(span.lora_targets):
            raise LoraError(f"{len(wires)} tensors, but this span has {len(span.lora_targets)} LoRA targets")
        tensors = {}
        for name, wire in wires.items():
            if not isinstance(name, str) or not isinstance(wire, dict) or wire.get("codec") != "none":
                raise ProtocolError("tensors must map names to uncompressed tensors (codec 'none')")
            tensors[name] = codec.decode(wire, max_elements=self.limits.max_frame_bytes)
        weights = LoraWeights(tensors, scaling)

        def check() -> SpanLora:
            if weights.digest != claimed:
                raise ProtocolError(f"adapter digest mismatch: the tensors hash to {weights.digest}, not {claimed}")
            return SpanLora.build(span.lora_targets, weights, span.device)

        adapters.put(claimed, await trio.to_thread.run_sync(check))
        return {"type": "stored", "adapter": claimed}

    async def _forward(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        span, adapter, kept = self.span, self.session_adapter(request), self.kept
        wire_codec = incoming.wire_codec(request)
        hidden = self._hidden(request, "hidden", span)
        output = await trio.to_thread.run_sync(
            fitted(lambda: self.drill(span.forward(hidden, adapter=adapter), "forward")), limiter=self.compute
        )
        reply = {"type": "output", "hidden": codec.encode(output, wire_codec)}
        if request.get("keep") is True and (key := kept.put(peer, hidden)) is not None:
            reply["kept"] = key
        return reply

    async def _backward(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        span, adapter = self.span, self.session_adapter(request)
        wire_codec = incoming.wire_codec(request)
        input_grad = request.get("input_grad", True)
        if not isinstance(input_grad, bool):
            raise ProtocolError("field 'input_grad' must be a boolean")
        grad = self._hidden(request, "grad", span)
        if "hidden" in request:
            hidden = self._hidden(request, "hidden", span)
        elif not isinstance(key := request.get("kept"), str):
            raise ProtocolError("a backward carries its input ('hidden') or names a kept one ('kept')")
        elif (hidden := self.kept.take(peer, key)) is None:
            raise _UnknownInput("this server no longer holds that input: send it (field 'hidden')")
        if grad.shape != hidden.shape:
            raise ProtocolError(f"grad {list(grad.shape)} must have the shape of hidden {list(hidden.shape)}")
        grad_input, grads = await trio.to_thread.run_sync(
            fitted(lambda: self.drill(span.backward(hidden, grad, adapter, input_grad=input_grad), "backward")),
            limiter=self.compute,
        )
        reply = {"type": "grads", "grads": {name: codec.encode(g, "none") for name, g in grads.items()}}
        if grad_input is not None:
            reply["grad_input"] = codec.encode(grad_input, wire_codec)
        return reply

    def _hidden(self, request: dict[str, Any], key: str, span: BlockSpan) -> torch.Tensor:
        """Hidden states (or their gradient) [batch, tokens, hidden] within the per-request token limit."""
        # The frame limit already bounds the bytes; the token limit bounds the compute's memory.
        hidden = incoming.expect_hidden(request, key, span, max_elements=self.limits.max_frame_bytes)
        tokens = hidden.shape[0] * hidden.shape[1]
        if tokens > self.limits.max_train_tokens:
            raise ProtocolError(
                f"{tokens} tokens (batch x length) exceed this server's limit of {self.limits.max_train_tokens} "
                "per training request: split the batch"
            )
        return hidden


class _UnknownInput(Exception):
    """A backward names a kept input this server does not hold (any more)."""
