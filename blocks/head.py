"""The client's end of the model: token embeddings in, final norm and LM head out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from blocks import family, packed_linears
from blocks.checkpoint import load_config, read_tensors


class ModelHead:
    """Embeddings, final norm and LM head of a checkpoint, and nothing else of it.

    With tied embeddings the LM head shares the embedding matrix (the checkpoint has no LM head
    tensor). What a family adds on this side comes with its modules or its `Family`: Gemma's
    embedding scale (inside its embedding module), BLOOM's `word_embeddings_layernorm`, Gemma's
    final logit soft-capping.
    """

    def __init__(
        self, model_path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ):
        config = load_config(model_path)
        model = family.skeleton(config)
        self.config = model.config
        self.family = family.of(self.config)
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.num_layers: int = config.num_hidden_layers
        self.dtype = dtype
        self.device = torch.device(device)

        fam = self.family
        lm_head_name = f"{fam.lm_head}.weight"
        tied = config.tie_word_embeddings
        self.embed_tokens: nn.Module = model.get_submodule(fam.embed)
        self.embed_norm: nn.Module | None = model.get_submodule(fam.embed_norm) if fam.embed_norm else None
        self.norm: nn.Module = model.get_submodule(fam.norm)
        self.lm_head: nn.Module = model.get_submodule(fam.lm_head)
        sources = {fam.embed: self.embed_tokens, fam.norm: self.norm}
        if self.embed_norm is not None:
            sources[fam.embed_norm] = self.embed_norm
        names = {f"{path}.{key}" for path, module in sources.items() for key in module.state_dict()}
        tensors = read_tensors(model_path, sorted(names | {f"{fam.embed}.weight" if tied else lm_head_name}), dtype, device)
        for path, module in sources.items():
            module.load_state_dict({key: tensors[f"{path}.{key}"] for key in module.state_dict()}, strict=True, assign=True)
        self.lm_head.load_state_dict(
            {"weight": tensors[f"{fam.embed}.weight" if tied else lm_head_name]}, strict=True, assign=True
        )
        for module in (self.embed_tokens, self.embed_norm, self.norm, self.lm_head):
            if module is None:
                continue
            _rebuild_meta_buffers(module, self.device)
            module.eval()
            module.requires_grad_(False)  # frozen: fine-tuning trains LoRA weights only
        if packed_linears.enabled(self.device, dtype):
            packed_linears.pack(self.lm_head)  # for the gateway's head rounds (blocks/packed_linears.py)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [b, t] -> hidden states [b, t, h]."""
        with torch.inference_mode():
            hidden = self.embed_tokens(input_ids.to(self.device))
            return self.embed_norm(hidden) if self.embed_norm is not None else hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last span's hidden states [b, t, h] (any float dtype) -> float32 logits [b, t, vocab]."""
        with torch.inference_mode():
            return self.differentiable_logits(hidden)

    def differentiable_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`logits` under the caller's grad mode: fine-tuning backpropagates a loss into `hidden`."""
        logits = self.lm_head(self.norm(hidden.to(self.device, self.dtype)))
        return self.family.logits(self.config, logits).float()


def _rebuild_meta_buffers(module: nn.Module, device: torch.device) -> None:
    """Buffers computed at init are still on the meta device in the skeleton: compute them anew.

    The only one today is Gemma's embedding scale (sqrt(hidden), kept as a Python float too)."""
    for name, buffer in list(module.named_buffers(recurse=False)):
        if not buffer.is_meta:
            continue
        if name == "embed_scale" and hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)
        else:
            raise ValueError(f"{type(module).__name__}.{name}: a buffer computed at init that the head cannot rebuild")
