"""The client's end of the model: token embeddings in, final norm and LM head out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from blocks import family
from blocks.checkpoint import load_config, read_tensors


class ModelHead:
    """Embeddings, final norm and LM head of a checkpoint, and nothing else of it.

    With tied embeddings the LM head shares the embedding matrix (the checkpoint has no
    `lm_head.weight`).
    """

    def __init__(
        self, model_path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ):
        config = load_config(model_path)
        model = family.skeleton(config)
        self.config = model.config
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        self.num_layers: int = config.num_hidden_layers
        self.dtype = dtype
        self.device = torch.device(device)

        tied = config.tie_word_embeddings
        names = [family.EMBED, family.NORM] + ([] if tied else [family.LM_HEAD])
        tensors = read_tensors(model_path, names, dtype, device)
        self.embed_tokens: nn.Module = model.model.embed_tokens
        self.norm: nn.Module = model.model.norm
        self.lm_head: nn.Module = model.lm_head
        for module, name in (
            (self.embed_tokens, family.EMBED),
            (self.norm, family.NORM),
            (self.lm_head, family.EMBED if tied else family.LM_HEAD),
        ):
            module.load_state_dict({"weight": tensors[name]}, strict=True, assign=True)
            module.eval()
            module.requires_grad_(False)  # frozen: fine-tuning trains LoRA weights only

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [b, t] -> hidden states [b, t, h]."""
        with torch.inference_mode():
            return self.embed_tokens(input_ids.to(self.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last span's hidden states [b, t, h] (any float dtype) -> float32 logits [b, t, vocab]."""
        with torch.inference_mode():
            return self.differentiable_logits(hidden)

    def differentiable_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`logits` under the caller's grad mode: fine-tuning backpropagates a loss into `hidden`."""
        return self.lm_head(self.norm(hidden.to(self.device, self.dtype))).float()
