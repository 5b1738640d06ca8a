"""The models this gateway serves: per model, the parts that stay at the gateway.

Those are the tokenizer (with chat template), the embeddings and the LM head. They are loaded
once at startup from a local checkpoint folder, so the first request pays nothing. A tenant's
fine-tuned model (`ft:...`) is its base model plus the tenant's LoRA adapter, which the swarm
applies on every span; it resolves only for its own tenant.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from anyio.to_thread import run_sync
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from gateway.protocol.errors import ModelNotFound
from gateway.inference.tokens import TokenPieces
from blocks.lora_weights import LoraWeights

if TYPE_CHECKING:
    from gateway.agents.guided import GrammarLibrary
    from gateway.storage.fine_tuned import FineTunedModel, FineTunedModels


class Head(Protocol):
    """`blocks.head.ModelHead`, as the gateway uses it."""

    config: Any
    vocab_size: int

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def differentiable_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


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
    base_id: str | None = None  # fine-tuned: the served base model the swarm runs
    adapter: LoraWeights | None = None  # fine-tuned: the tenant's LoRA, applied on every span

    @property
    def swarm_id(self) -> str:
        """The model id the swarm serves: the base of a fine-tuned model."""
        return self.base_id or self.id

    def grammars(self) -> GrammarLibrary:
        """The model's grammar library (xgrammar vocabulary + compiled-grammar cache), built on first
        use and shared by every model with this tokenizer (a base model and its fine-tunes).
        Blocking on first use: call it from a worker thread."""
        from gateway.agents.guided import grammar_library  # xgrammar loads only when guided decoding is used

        return grammar_library(self.tokenizer, vocab_size=self.head.vocab_size, stop_token_ids=self.eos_token_ids)

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


@dataclass(frozen=True)
class ModelCard:
    """What `/v1/models` shows of a model."""

    id: str
    created: int
    context_length: int
    owned_by: str


class ModelRegistry:
    def __init__(self, models: Mapping[str, ServedModel], fine_tuned: FineTunedModels | None = None):
        self._models = dict(models)
        self.fine_tuned = fine_tuned

    @classmethod
    def load(
        cls, paths: Mapping[str, Path], head_loader: HeadLoader, fine_tuned: FineTunedModels | None = None
    ) -> ModelRegistry:
        return cls(
            {model_id: ServedModel.load(model_id, Path(path), head_loader) for model_id, path in paths.items()},
            fine_tuned,
        )

    def __iter__(self) -> Iterator[ServedModel]:
        """The base models (what the swarm serves)."""
        return iter(self._models.values())

    def get(self, model_id: str) -> ServedModel:
        """A base model."""
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelNotFound(model_id) from None

    def cards(self, tenant: str) -> list[ModelCard]:
        """The base models, then the tenant's fine-tuned models (whose base is served)."""
        cards = [_card(model) for model in self._models.values()]
        if self.fine_tuned is not None:
            cards += [
                ModelCard(ft.id, ft.created_at, self._models[ft.base].context_length, tenant)
                for ft in self.fine_tuned.listed(tenant)
                if ft.base in self._models
            ]
        return cards

    def card(self, model_id: str, tenant: str) -> ModelCard:
        if model_id in self._models:
            return _card(self._models[model_id])
        ft = self._fine_tuned(model_id, tenant)
        return ModelCard(ft.id, ft.created_at, self._models[ft.base].context_length, tenant)

    async def resolve(self, model_id: str, tenant: str) -> ServedModel:
        """A base model, or the tenant's fine-tuned model with its adapter loaded (404 otherwise)."""
        if model_id in self._models:
            return self._models[model_id]
        ft = self._fine_tuned(model_id, tenant)
        assert self.fine_tuned is not None
        try:
            adapter = await run_sync(self.fine_tuned.weights, ft)
        except FileNotFoundError:  # a checkpoint pruned since it was looked up
            raise ModelNotFound(model_id) from None
        return replace(
            self._models[ft.base], id=ft.id, created=ft.created_at, base_id=ft.base, adapter=adapter
        )

    def _fine_tuned(self, model_id: str, tenant: str) -> FineTunedModel:
        ft = self.fine_tuned.find(model_id, tenant) if self.fine_tuned is not None else None
        if ft is None or ft.base not in self._models:
            raise ModelNotFound(model_id)
        return ft


def _card(model: ServedModel) -> ModelCard:
    return ModelCard(model.id, model.created, model.context_length, "swarmgate")
