"""CUDA graphs of a span's steps: capturing one, replaying it, keeping the captured ones, and the
fused layer math a one-token step captures (`FusedDecode`).

A captured step reads fixed addresses: its inputs are static tensors that each replay fills
first, and its output tensor is overwritten by the next replay. What varies between replays
(hidden states, positions, the pool rows a session sits in) must therefore be such an input.
"""

from __future__ import annotations

import copy
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from blocks.family import LLAMA_FAMILY

SEEN_KEYS = 256  # keys a GraphCache remembers having been asked about (`first_use`)


def switched_on(variable: str) -> bool:
    """A GPU fast path's switch (``SWARMGATE_CUDA_GRAPHS``, ``SWARMGATE_FUSED_DECODE``): on
    unless the environment sets it to 0, false, no or off."""
    return os.environ.get(variable, "1").lower() not in ("0", "false", "no", "off")


@dataclass
class CapturedStep:
    """One captured step with its static inputs and output."""

    graph: Any
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    adapter: Any  # kept alive: the graph reads its tensors

    def replay(self, *values: torch.Tensor | int) -> torch.Tensor:
        """The step on `values` (one per input: a tensor to copy in, or an int to fill it with)."""
        for static, value in zip(self.inputs, values, strict=True):
            if isinstance(value, int):
                static.fill_(value)
            else:
                static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.output.clone()  # the graph's own output tensor is overwritten by its next replay


class GraphCache:
    """Captured steps by key; past `max_graphs` (if any) the least recently used go."""

    def __init__(self, max_graphs: int | None = None) -> None:
        self.max_graphs = max_graphs
        self._steps: OrderedDict[Any, CapturedStep] = OrderedDict()
        self._seen: OrderedDict[Any, None] = OrderedDict()  # keys `first_use` was asked about, latest last

    def __len__(self) -> int:
        return len(self._steps)

    def get(self, key: Any) -> CapturedStep | None:
        found = self._steps.get(key)
        if found is not None:
            self._steps.move_to_end(key)
        return found

    def keep(self, key: Any, step: CapturedStep) -> None:
        self._steps[key] = step
        while self.max_graphs is not None and len(self._steps) > self.max_graphs:
            self._steps.popitem(last=False)

    def first_use(self, key: Any) -> bool:
        """Whether `key` comes for the first time lately (then noted): a caller may run such a
        step eagerly and capture it only when it comes again, as a capture costs more than an
        eager run and a one-off key would evict one in use."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        while len(self._seen) > SEEN_KEYS:
            self._seen.popitem(last=False)
        return True

    def clear(self) -> None:
        self._steps.clear()


@dataclass
class GpuState:
    """Shared by a span and its views: one lock around GPU work (a capture must not overlap
    other work of this process's spans), the side stream captures run on, and a positions
    vector for masks."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    stream: Any = None
    positions: torch.Tensor | None = None
    retired: list = field(default_factory=list)
    captures: int = 0  # graphs captured so far (tests, metrics)

    def capture(self, device: torch.device, inputs: tuple[torch.Tensor, ...], body: Callable[..., torch.Tensor],
                adapter: Any, memory: Any = None) -> tuple[torch.Tensor, CapturedStep]:
        """Run `body(*inputs)` once for real (the warm-up: cuBLAS workspaces, lazy inits; it is
        this step's result), then capture it: (result, the captured step). `memory` (a
        `graph_pool_handle()`) is a memory pool shared with other graphs, else the graph gets its own."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=device)
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            result = body(*inputs).clone()
            graph = torch.cuda.CUDAGraph()
            graph.capture_begin(pool=memory, capture_error_mode="thread_local")
            try:
                output = body(*inputs)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.captures += 1
        return result, CapturedStep(graph, inputs, output, adapter)


# -- the fused one-token step ----------------------------------------------------------------
def fused_decode_supported(layers: nn.ModuleList, model_type: str) -> bool:
    """Whether every layer is the Llama layer (Llama, Mistral, Qwen2's biases, Qwen3's q/k norms)
    with plain linear projections (biases on all or none of those concatenated together) and a
    SiLU MLP."""
    if model_type not in LLAMA_FAMILY:
        return False
    groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    return all(
        all(type(layer.get_submodule(n)) is nn.Linear for group in groups for n in group)
        and all(len({layer.get_submodule(n).bias is None for n in group}) == 1 for group in groups)
        and type(layer.mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
        for layer in layers
    )


def _concatenate(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections of one input; theirs become views of it."""
    weight = torch.cat([linear.weight for linear in linears])
    has_bias = linears[0].bias is not None
    bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
    start = 0
    for linear in linears:
        end = start + linear.out_features
        linear.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if has_bias:
            linear.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


class FusedDecode:
    """One-token steps of a span's Llama-layout layers in fewer, larger kernels; built once per
    span (`fused_decode_supported` first), used by its one-token graphs without an adapter.

    Inside a CUDA graph a step costs what its kernels cost: transformers' decoder layer launched
    ~51 per token on a GPU (transformers 5.17; this, ~39), and repeated each KV head's keys and
    values for its query heads, a copy of the attended cache per layer (a 32-row step of 16
    8B-shaped layers took 10.9 ms, 4.8 ms this way, on an H100). This runs the same math with q/k/v and gate/up each as
    one matmul over weights concatenated once (the modules' own weights become views of them: no
    memory added), rotary over queries and keys at once, and attention over the key/value heads
    (a group's query heads as its rows, as transformers' `pack_gqa`: no repeated keys); norms and
    the output projections are the layers' own modules. LoRA sessions keep transformers' layers:
    their hooks live on the projections' modules. The concatenated tensors are the weights: a
    span never moves its layers after building this (`.to()` would leave these behind).
    """

    def __init__(self, layers: nn.ModuleList, start: int) -> None:
        self.layers, self.start = layers, start
        attention = layers[0].self_attn
        self.head_dim = attention.head_dim
        self.q_heads = attention.q_proj.out_features // self.head_dim
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.qkv = [_concatenate([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in layers]
        self.gate_up = [_concatenate([l.mlp.gate_proj, l.mlp.up_proj]) for l in layers]

    def part(self, local: slice, start: int) -> "FusedDecode":
        """Layers `local` of these, from global index `start` (a span's view), sharing their weights."""
        part = copy.copy(self)
        part.layers, part.start = self.layers[local], start
        part.qkv, part.gate_up = self.qkv[local], self.gate_up[local]
        return part

    def run(self, hidden: torch.Tensor, cache: Any, masks: dict, position_embeddings: dict,
            kinds: list[str]) -> torch.Tensor:
        """`hidden` [rows, 1, hidden] through the layers; `cache` as HF attention sees it
        (`update` writes and returns the attended keys/values), masks [rows, 1, 1, length]."""
        rows, d, q_heads, kv_heads = hidden.shape[0], self.head_dim, self.q_heads, self.kv_heads
        for i, (layer, kind) in enumerate(zip(self.layers, kinds)):
            attention, mlp = layer.self_attn, layer.mlp
            cos, sin = (t.unsqueeze(2) for t in position_embeddings[kind])  # [rows, 1, 1, d]
            qkv = F.linear(layer.input_layernorm(hidden), *self.qkv[i]).view(rows, 1, q_heads + 2 * kv_heads, d)
            query, key, value = qkv.split([q_heads, kv_heads, kv_heads], dim=2)  # [rows, 1, heads, d]
            if hasattr(attention, "q_norm"):  # Qwen3
                query, key = attention.q_norm(query), attention.k_norm(key)
                query_key = torch.cat([query, key], dim=2)
            else:
                query_key = qkv[:, :, : q_heads + kv_heads]
            query_key = query_key * cos + rotate_half(query_key) * sin
            query, key = query_key.split([q_heads, kv_heads], dim=2)
            keys, values = cache.update(key.transpose(1, 2), value.transpose(1, 2), self.start + i)
            attended = F.scaled_dot_product_attention(
                query.reshape(rows, kv_heads, q_heads // kv_heads, d), keys, values, attn_mask=masks[kind],
                scale=attention.scaling,
            )  # query head h is row h % groups of key/value head h // groups, as repeat_kv pairs them
            # reshape: some SDPA kernels (memory-efficient attention) return a transposed layout
            hidden = hidden + attention.o_proj(attended.reshape(rows, 1, q_heads * d))
            gate, up = F.linear(layer.post_attention_layernorm(hidden), *self.gate_up[i]).chunk(2, dim=-1)
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return hidden
