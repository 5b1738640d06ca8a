"""LoRA training through the swarm, client side (trio): forward and backward over a chain of spans.

The gateway holds the adapter and its optimizer state (DESIGN.md §6); servers compute.
``forward`` sends hidden states span by span with the adapter applied and keeps what went into
each span; ``backward`` walks the chain in reverse, sending each span the gradient of its output
(and its input again, unless the server kept it from the forward), and collects the gradient of
the input and of that span's LoRA tensors.
``remote_blocks`` wraps the pair as an autograd function, so a local loop calls
``loss.backward()`` and finds the gradients on its LoRA tensors. Exact by default: codec ``none``
sends the hidden states in their own dtype (the head's: bf16 from a GPU gateway, float32 from a
CPU one). The adapter goes to the host once per step, its per-span parts (and their digests,
which name it on every request of the step) are computed once, and they are uploaded to every
server of the chain at once as the forward starts. Batches are right-padded (the blocks see no
padding mask; causal attention keeps real tokens blind to the padding after them, and the loss
must ignore it).
From asyncio, await these through ``SwarmBridge.run``; from a plain thread, ``SwarmBridge.call``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch
import trio

from swarm import codec, protocol
from swarm.client import Checked, SwarmClient
from blocks.lora_weights import LoraWeights
from swarm.records import ServerRecord
from swarm.routing import NoChainError

logger = logging.getLogger(__name__)

Runner = Callable[[Callable[[], Awaitable[Any]]], Any]  # e.g. SwarmBridge.call


@dataclass(frozen=True)
class _Hop:
    record: ServerRecord
    inputs: dict[str, Any]  # the wire tensor sent into this span
    kept: str | None = None  # the server's key for them, if it keeps them for the backward


@dataclass(frozen=True)
class TrainContext:
    """What ``backward`` needs from ``forward``: the chain, each span's input, the adapter."""

    client: SwarmClient
    adapter: _StepAdapter
    hops: tuple[_Hop, ...]  # the spans' servers as the forward used them (honest ones, after a check)
    wire_codec: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device  # the forward's input's: its gradient goes back there


async def forward(
    client: SwarmClient,
    model: str,
    num_blocks: int,
    hidden: torch.Tensor,
    adapter: LoraWeights,
    *,
    wire_codec: str = "none",
    keep: bool = False,
) -> tuple[torch.Tensor, TrainContext]:
    """Hidden states [b, t, h] through every block with `adapter` applied; no gradients kept here.

    A span whose server fails is retried on another (``SwarmClient.along_chain``). `keep`: a
    backward follows, so servers may keep each span's input for it (not for evaluation).
    """
    if hidden.dim() != 3:
        raise ValueError(f"expected hidden states [batch, tokens, hidden], got {list(hidden.shape)}")
    adapter = adapter if isinstance(adapter, _StepAdapter) else _StepAdapter.of(adapter)

    async with trio.open_nursery() as nursery:
        uploaded = _upload_ahead(nursery, client, model, num_blocks, adapter)

        async def through(record: ServerRecord, value: _Walk) -> _Walk:
            """No side effects but a cache entry the server may drop (a kept input): a spot check
            may run it again on other servers and keep theirs."""
            wire, hops = value
            if record.peer_id in uploaded:
                await uploaded[record.peer_id].wait()
            request = {"type": "forward", "codec": wire_codec, "hidden": wire, "keep": keep}
            reply = await _call(client, record, adapter, request, "output")
            kept = reply.get("kept")
            hop = _Hop(record, wire, kept if isinstance(kept, str) else None)
            return protocol.field(reply, "hidden", dict), (*hops, hop)

        checked = Checked("training forward", wire_codec, lambda value: codec.decode(value[0], max_elements=hidden.numel()),
                          whole_spans=True)
        wire, hops = await client.along_chain(model, num_blocks, through, (codec.encode(hidden, wire_codec), ()),
                                              checked=checked)
    output = _decode(wire, hidden.shape, hidden.dtype, hidden.device)
    return output, TrainContext(client, adapter, hops, wire_codec, hidden.shape, hidden.dtype, hidden.device)


async def backward(
    context: TrainContext, grad_output: torch.Tensor, *, input_grad: bool = True
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """Gradients for the forward's input (None unless `input_grad`) and for every LoRA tensor of the
    adapter (PEFT names).

    Each span goes to the server that did its forward; if one has failed since, this raises and
    the step is best redone, forward included (its new chain avoids the failed server). Without
    `input_grad` (the gateway's embeddings are frozen) the first span returns no input gradient: one
    hidden-state-sized transfer less per step, and no request at all when it has no LoRA tensors.
    """
    if grad_output.shape != context.shape:
        raise ValueError(f"grad_output {list(grad_output.shape)} must have the output's shape {list(context.shape)}")
    client, grad = context.client, codec.encode(grad_output.to(context.dtype), context.wire_codec)
    grads: dict[str, torch.Tensor] = {}
    devices = {name: t.device for name, t in context.adapter.source.items()}
    for index in reversed(range(len(context.hops))):
        hop, wants_input = context.hops[index], input_grad or index > 0
        expected = context.adapter.span(hop.record.start, hop.record.end).tensors
        if not wants_input and not expected:
            return None, grads

        async def span_backward(record: ServerRecord, grad_wire: dict[str, Any]) -> _Grads:
            request = {"type": "backward", "codec": context.wire_codec, "grad": grad_wire, "input_grad": wants_input}
            reply = None
            if hop.kept is not None and record.peer_id == hop.record.peer_id:  # not a spot check's other server
                try:
                    reply = await _call(client, record, context.adapter, {**request, "kept": hop.kept}, "grads")
                except protocol.RemoteError as error:
                    if error.code != protocol.UNKNOWN_INPUT:
                        raise
            if reply is None:
                reply = await _call(client, record, context.adapter, {**request, "hidden": hop.inputs}, "grads")
            received = protocol.field(reply, "grads", dict)
            if set(received) != set(expected):
                raise protocol.ProtocolError(f"server {record.peer_id} returned gradients for other tensors")
            names = sorted(received)
            tensors = [_decode(received[name], expected[name].shape, expected[name].dtype, torch.device("cpu"))
                       for name in names]
            grad_input = (_decode(protocol.field(reply, "grad_input", dict), context.shape, context.dtype,
                                  torch.device("cpu")) if wants_input else None)
            return _Grads(grad_input, dict(zip(names, tensors)))

        result = await span_backward(hop.record, grad)
        if client.check_drawn():
            checked = Checked("training backward", context.wire_codec, _Grads.as_rows, single_server=True,
                              whole_spans=True)
            result = await client.spot_check(hop.record, span_backward, grad, result, checked)
        for name, tensor in result.lora.items():
            grads[name] = tensor.to(devices[name])
        if result.grad_input is None:
            return None, grads
        grad = codec.encode(result.grad_input, context.wire_codec)
    return _decode(grad, context.shape, context.dtype, context.device), grads


_Walk = tuple[dict[str, Any], tuple[_Hop, ...]]  # a forward's wire tensor so far, and the spans it went through


@dataclass(frozen=True)
class _Grads:
    """One span's backward: the gradient of its input and of its LoRA tensors (on the host)."""

    grad_input: torch.Tensor | None  # None where not asked for
    lora: dict[str, torch.Tensor]

    def as_rows(self) -> torch.Tensor:
        """Everything as rows of one [1, rows, width] tensor for ``judge``: the input gradient's
        token rows, and each LoRA gradient's rows along its longer side, zero-padded (which
        leaves every row's norm, so its relative error, unchanged)."""
        rows = [] if self.grad_input is None else [self.grad_input.reshape(-1, self.grad_input.shape[-1]).float()]
        rows += [(t if t.shape[-1] >= t.shape[0] else t.T).float() for t in self.lora.values()]
        width = max(r.shape[-1] for r in rows)
        return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in rows]).unsqueeze(0)


def remote_blocks(
    run: Runner,
    client: SwarmClient,
    model: str,
    num_blocks: int,
    hidden: torch.Tensor,
    adapter: LoraWeights,
    *,
    wire_codec: str = "none",
) -> torch.Tensor:
    """The swarm's blocks as a differentiable function of `hidden` and `adapter.tensors`.

    `run` executes a trio coroutine function from the calling thread and returns its result
    (``SwarmBridge.call``); forward and backward each make one pass along the chain.
    """
    names = tuple(adapter.tensors)
    # servers keep the spans' inputs for a backward only when one may follow (not under no_grad)
    spec = _Spec(run, client, model, num_blocks, names, adapter.scaling, wire_codec, keep=torch.is_grad_enabled())
    return _RemoteBlocks.apply(spec, hidden, *(adapter.tensors[n] for n in names))


@dataclass(frozen=True)
class _Spec:
    run: Runner
    client: SwarmClient
    model: str
    num_blocks: int
    names: tuple[str, ...]
    scaling: float
    wire_codec: str
    keep: bool


class _RemoteBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, spec: _Spec, hidden: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        adapter = LoraWeights(dict(zip(spec.names, (t.detach() for t in tensors))), spec.scaling)
        output, context = spec.run(
            lambda: forward(spec.client, spec.model, spec.num_blocks, hidden.detach(), adapter,
                            wire_codec=spec.wire_codec, keep=spec.keep)
        )
        ctx.spec, ctx.context = spec, context
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec, context = ctx.spec, ctx.context
        grad_input, grads = spec.run(lambda: backward(context, grad_output, input_grad=ctx.needs_input_grad[1]))
        return (None, grad_input, *(grads[name] for name in spec.names))


def _upload_ahead(
    nursery: trio.Nursery, client: SwarmClient, model: str, num_blocks: int, adapter: LoraWeights
) -> dict[str, trio.Event]:
    """Start uploading the adapter's part to every server of the chain the forward will most likely
    take, all at once, so later servers receive theirs while earlier ones compute (a step's adapter
    is new, ~27 MB per half of an 8B model: uploaded one after the other, about a fifth of a step
    through two servers on an H200, benchmarks/gpu_training.py). Returns peer id -> set once that upload ended. A failed one, or one to a server the
    forward does not take, costs only its bytes: a request's own upload-and-retry covers it."""
    try:
        chain = client.choose(model, 0, num_blocks, partial=False)
    except NoChainError:
        return {}  # along_chain raises it, with the waiting it does
    ended: dict[str, trio.Event] = {}

    async def upload(record: ServerRecord, part: LoraWeights, done: trio.Event) -> None:
        try:
            await client.uploads.upload(record, part)
        except Exception as error:
            logger.debug("upload ahead to %s failed: %r", record.peer_id, error)
        finally:
            done.set()

    for record in chain:
        part = adapter.span(record.start, record.end)
        if part.tensors:
            ended[record.peer_id] = trio.Event()
            nursery.start_soon(upload, record, part, ended[record.peer_id])
    return ended


async def _call(
    client: SwarmClient, record: ServerRecord, adapter: LoraWeights, request: dict[str, Any], reply_type: str
) -> dict[str, Any]:
    """One TRAIN request to `record`'s server naming its span of `adapter`, uploaded if need be."""

    async def attempt(digest: str | None) -> dict[str, Any]:
        stream = await client.node.open_stream(record.peer_id, protocol.TRAIN, record.addrs)
        message = {**request, "adapter": digest, "blocks": [record.start, record.end]}
        return await protocol.request(
            stream, message, reply_type, timeout=client.step_timeout, max_bytes=protocol.MAX_REPLY_FRAME
        )

    return await client.uploads.run(record, adapter, attempt)


def _decode(wire: Any, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    tensor = codec.decode(wire, max_elements=shape.numel())
    if tensor.shape != shape:
        raise protocol.ProtocolError(f"expected a tensor of shape {list(shape)}, got {list(tensor.shape)}")
    return tensor.to(device, dtype)


class _StepAdapter(LoraWeights):
    """One step's adapter: its tensors copied to the host once (they are hashed and sent from
    there), each span's part made once, so its digest (a hash of ~27 MB per span of an 8B model's
    rank-16 attention adapter) is computed once per step rather than once per request.
    ``source`` keeps the caller's tensors: gradients go to their devices."""

    source: dict[str, torch.Tensor]
    _parts: dict[tuple[int, int], LoraWeights]

    @classmethod
    def of(cls, adapter: LoraWeights) -> "_StepAdapter":
        on_host = cls({name: t.detach().to("cpu") for name, t in adapter.tensors.items()}, adapter.scaling)
        object.__setattr__(on_host, "source", dict(adapter.tensors))
        object.__setattr__(on_host, "_parts", {})
        return on_host

    def span(self, start: int, end: int) -> LoraWeights:
        if (start, end) not in self._parts:
            self._parts[(start, end)] = super().span(start, end)
        return self._parts[(start, end)]
