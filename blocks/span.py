"""A contiguous span of a model's decoder layers, run exactly as the whole model would run them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache

from blocks import family, lora
from blocks.checkpoint import load_config, read_tensors
from blocks.quant import check_quant, quantize_linears, weight_bytes


class BlockSpan:
    """Decoder layers [start, end) of a checkpoint, holding only their own weights.

    Layers keep their global indices: a cache is indexed by them and a layer's attention kind
    (full or sliding) depends on them.
    """

    def __init__(
        self,
        model_path: str | Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quant: str = "none",
    ):
        check_quant(quant, device)
        config = load_config(model_path)
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(f"span [{start}, {end}) is outside the model's {config.num_hidden_layers} layers")
        model = family.skeleton(config)
        self.config = model.config
        self.start, self.end = start, end
        self.num_layers = end - start
        self.hidden_size: int = config.hidden_size
        self.dtype = dtype
        self.device = torch.device(device)

        self.layers = nn.ModuleList(model.model.layers[start:end])
        names = {
            f"{i}.{key}": family.layer_prefix(start + i) + key
            for i, layer in enumerate(self.layers)
            for key in layer.state_dict()
        }
        # Quantized weights are read to the CPU: bitsandbytes quantizes them on their way to the GPU.
        tensors = read_tensors(model_path, names.values(), dtype, self.device if quant == "none" else "cpu")
        self.layers.load_state_dict({local: tensors[name] for local, name in names.items()}, strict=True, assign=True)
        if quant != "none":
            quantize_linears(self.layers, quant, dtype)
            self.layers.to(self.device)
        self.layers.eval()
        self.layers.requires_grad_(False)  # frozen: only LoRA weights supplied per request are trained
        self.lora_targets = lora.attach(self.layers, start)  # module prefix -> module, per-request LoRA
        self.quant = quant
        self.block_bytes = weight_bytes(self.layers) // self.num_layers  # announced: memory per block
        # Rotary buffers are computed at init, so the meta skeleton's cannot be loaded: build anew.
        with self.device:
            self.rotary_emb = type(model.model.rotary_emb)(config=self.config)

        self.layer_types = family.layer_types(self.config)[start:end]
        self._mask_layer = _mask_layers(start, self.layer_types)

    def view(self, start: int, end: int) -> "BlockSpan":
        """Layers [start, end) of this span, sharing its weights: a server computes any part of
        its span, so spans that overlap without meeting at a boundary still chain."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"blocks [{start}, {end}) are not within this span [{self.start}, {self.end})")
        if (start, end) == (self.start, self.end):
            return self
        part = copy.copy(self)
        local = slice(start - self.start, end - self.start)
        part.start, part.end, part.num_layers = start, end, end - start
        part.layers = nn.ModuleList(self.layers[local])
        part.layer_types = self.layer_types[local]
        part._mask_layer = _mask_layers(start, part.layer_types)
        return part

    def new_cache(self) -> Cache:
        """A fresh per-session KV cache; indexed by global layer, only this span's layers fill."""
        return DynamicCache(config=self.config)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        cache: Cache | None = None,
        position: int = 0,
        adapter: lora.SpanLora | None = None,
    ) -> torch.Tensor:
        """Hidden states [b, t, h] of tokens at positions [position, position + t) through the span.

        Without a cache it is a cache-less pass over a whole sequence (position 0); with one,
        `position` must equal the tokens the cache already holds, and the new ones are appended.
        `adapter` applies LoRA for this call only.
        """
        with torch.inference_mode(), lora.applied(adapter):
            return self._forward(hidden, cache, position)

    def backward(
        self, hidden: torch.Tensor, grad_output: torch.Tensor, adapter: lora.SpanLora | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Gradients of a cache-less forward with `adapter`, given the gradient of its output.

        Returns the gradient for `hidden` and for each LoRA tensor (PEFT names). The forward is
        recomputed here, so nothing is kept between a client's forward and backward requests.
        """
        if grad_output.shape != hidden.shape:
            raise ValueError(f"output gradient {list(grad_output.shape)} does not match the input {list(hidden.shape)}")
        trainable = adapter.trainable() if adapter is not None else None
        leaves = dict(trainable.named_tensors()) if trainable is not None else {}
        hidden = hidden.detach().clone().requires_grad_(True)  # a leaf, even from an inference tensor
        with torch.enable_grad(), lora.applied(trainable):
            output = self._forward(hidden, None, 0)
        grad_input, *grads = torch.autograd.grad(output, [hidden, *leaves.values()], grad_output.to(output.dtype))
        return grad_input, dict(zip(leaves, grads))

    def _forward(self, hidden: torch.Tensor, cache: Cache | None, position: int) -> torch.Tensor:
        """The computation itself, under whatever grad mode the caller chose."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.hidden_size or hidden.dtype != self.dtype:
            raise ValueError(
                f"expected {self.dtype} hidden states [batch, tokens, {self.hidden_size}], "
                f"got {hidden.dtype} {list(hidden.shape)}"
            )
        seen = cache.get_seq_length(self.start) if cache is not None else 0
        if position != seen:
            raise ValueError(f"position {position} does not follow the {seen} tokens already seen")
        position_ids = torch.arange(position, position + hidden.shape[1], device=hidden.device).unsqueeze(0)
        masks = {
            kind: family.MASK_FUNCTIONS[kind](
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=None,
                past_key_values=cache,
                position_ids=position_ids,
                layer_idx=layer_idx,
            )
            for kind, layer_idx in self._mask_layer.items()
        }
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer, kind in zip(self.layers, self.layer_types):
            hidden = layer(
                hidden,
                attention_mask=masks[kind],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
            )
        return hidden


def _mask_layers(start: int, layer_types: list[str]) -> dict[str, int]:
    """Masks are sized from the cache, so each kind is sized by one of *our* layers of that kind."""
    return {kind: start + layer_types.index(kind) for kind in dict.fromkeys(layer_types)}
