"""The models this gateway serves: per model, the parts that stay at the gateway.

Those are the tokenizer (with chat template), the embeddings and the LM head. They are loaded
once at startup from a local checkpoint folder, so the first request pays nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from gateway.errors import ModelNotFound
from gateway.tokens import TokenPieces


class Head(Protocol):
    """`blocks.head.ModelHead`, as the gateway uses it."""

    config: Any
    vocab_size: int

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


HeadLoader = Callable[[Path], Head]


@dataclass(frozen=True)
class ServedModel:
    id: str
    head: Head
    tokenizer: PreTrainedTokenizerBase
    pieces: TokenPieces
    context_length: int
    eos_token_ids: frozenset[int]
    created: int

    @classmethod
    def load(cls, model_id: str, path: Path, head_loader: HeadLoader) -> ServedModel:
        head = head_loader(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(
            id=model_id,
            head=head,
            tokenizer=tokenizer,
            pieces=TokenPieces(tokenizer),
            context_length=int(head.config.max_position_embeddings),
            eos_token_ids=_eos_token_ids(path, head.config, tokenizer),
            created=int(time.time()),
        )


def _eos_token_ids(path: Path, config: Any, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends generation: generation_config's, the model config's and the tokenizer's.

    Chat models often end turns with a token (`<|im_end|>`, `<|eot_id|>`) listed only in
    generation_config.json, so all sources count.
    """
    ids: set[int] = set()
    try:
        sources = [GenerationConfig.from_pretrained(path).eos_token_id]
    except OSError:  # no generation_config.json
        sources = []
    sources += [getattr(config, "eos_token_id", None), tokenizer.eos_token_id]
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)


class ModelRegistry:
    def __init__(self, models: Mapping[str, ServedModel]):
        self._models = dict(models)

    @classmethod
    def load(cls, paths: Mapping[str, Path], head_loader: HeadLoader) -> ModelRegistry:
        return cls({model_id: ServedModel.load(model_id, Path(path), head_loader) for model_id, path in paths.items()})

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def get(self, model_id: str) -> ServedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFound(model_id) from None
