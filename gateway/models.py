"""The models this gateway serves: per model, the parts that stay at the gateway.

Those are the tokenizer (with chat template), the embeddings and the LM head, read from a local
checkpoint folder (one per `--model`). Several base models share one gateway: each is loaded on
first use (in a worker thread) and kept in a least-recently-used set of at most
`Settings.max_loaded_models`; loading one more evicts the least recently used (a request still
holding an evicted model finishes with it; its memory goes when the request does). The first
`max_loaded_models` are loaded at startup, so a one-model gateway's first request pays nothing.

A tenant's fine-tuned model (`ft:<base>:...`) is its base model plus the tenant's LoRA adapter,
which the swarm applies on every span; it resolves only for its own tenant, and only while its
base is one of this gateway's models.

`/v1/models` also lists the base models the swarm serves (from the servers' records) that this
gateway has no folder for, or whose servers announce another checkpoint than the local folder's:
those are listed with `servable: false` and a note saying why, and requests for them get a 404
(`model_not_servable`) saying how to serve them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from anyio.to_thread import run_sync
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from blocks.checkpoint import checkpoint_hash, load_config
from gateway.protocol.errors import APIError, ModelNotFound
from gateway.inference.tokens import TokenPieces
from blocks.lora_weights import LoraWeights

if TYPE_CHECKING:
    from gateway.agents.guided import GrammarLibrary
    from gateway.storage.fine_tuned import FineTunedModel, FineTunedModels


class Head(Protocol):
    """`blocks.head.ModelHead`, as the gateway uses it."""

    config: Any
    vocab_size: int
    device: torch.device

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
    context_length: int | None  # None: a swarm model this gateway has no config of
    owned_by: str
    parent: str | None = None  # a fine-tuned model's base (vLLM's field for LoRA models)
    servable: bool = True  # this gateway answers requests for it
    note: str | None = None  # why it is not servable here
    coverage: SwarmCoverage | None = None  # base models: the swarm's servers for it


@dataclass(frozen=True)
class SwarmCoverage:
    """A base model's blocks as the servers' records show them (`swarm.health.swarm_state`)."""

    num_blocks: int
    missing_blocks: tuple[int, ...]
    checkpoints: tuple[str, ...]  # announced checkpoint hashes
    servers: int

    @property
    def complete(self) -> bool:
        return not self.missing_blocks

    @classmethod
    def from_state(cls, info: Mapping[str, Any]) -> SwarmCoverage:
        return cls(int(info["num_blocks"]), tuple(info.get("missing_blocks", ())),
                   tuple(info.get("checkpoints", ())), len(info.get("servers", ())))


class ModelNotServable(ModelNotFound):
    """A model the swarm serves but this gateway cannot: no local folder, or another checkpoint."""

    code = "model_not_servable"

    def __init__(self, model: str, reason: str):
        APIError.__init__(self, f"The model '{model}' is not servable by this gateway: {reason}", param="model")


@dataclass(frozen=True)
class LocalModel:
    """A `--model` of this gateway: its folder and what is known without loading it."""

    id: str
    path: Path
    context_length: int
    checkpoint: str  # `blocks.checkpoint.checkpoint_hash`, compared with the servers' records
    created: int

    @classmethod
    def read(cls, model_id: str, path: Path) -> LocalModel:
        config = load_config(path)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return cls(model_id, path, int(text.max_position_embeddings), checkpoint_hash(path), int(time.time()))


NO_FOLDER_NOTE = ("served by the swarm, but this gateway has no checkpoint folder for its tokenizer and head; "
                  "start the gateway with --model <its folder>")


def mismatch_note(local: LocalModel, coverage: SwarmCoverage) -> str:
    return (f"the swarm's servers announce checkpoint {', '.join(coverage.checkpoints)}, "
            f"this gateway's folder {local.path} is {local.checkpoint}")


class ModelRegistry:
    """This gateway's base models (loaded lazily, at most `max_loaded` at once) and tenants' fine-tunes."""

    def __init__(
        self,
        local: Mapping[str, LocalModel],
        loader: Callable[[LocalModel], ServedModel],
        fine_tuned: FineTunedModels | None = None,
        *,
        max_loaded: int = 4,
        swarm_models: Callable[[], Mapping[str, Any]] = dict,
    ):
        self.local = dict(local)
        self.fine_tuned = fine_tuned
        self.max_loaded = max(1, max_loaded)
        self._loader = loader
        self._swarm_models = swarm_models  # `swarm_state()["models"]`: name -> per-model info
        self._loaded: OrderedDict[str, ServedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards `_loaded`; never held during a load
        self._loading: dict[str, threading.Lock] = {model_id: threading.Lock() for model_id in self.local}
        self.loads = 0  # heads and tokenizers loaded so far (evictions make it exceed the models)

    @classmethod
    def load(
        cls, paths: Mapping[str, Path], head_loader: HeadLoader, fine_tuned: FineTunedModels | None = None,
        *, max_loaded: int = 4, swarm_models: Callable[[], Mapping[str, Any]] = dict, preload: bool = True,
    ) -> ModelRegistry:
        """A registry of the folders in `paths`; `preload` loads the first `max_loaded` now."""
        local = {model_id: LocalModel.read(model_id, Path(path)) for model_id, path in paths.items()}

        def loader(model: LocalModel) -> ServedModel:
            return replace(ServedModel.load(model.id, model.path, head_loader), created=model.created)

        registry = cls(local, loader, fine_tuned, max_loaded=max_loaded, swarm_models=swarm_models)
        if preload:
            for model_id in list(local)[: registry.max_loaded]:
                registry.get(model_id)
        return registry

    def __iter__(self) -> Iterator[LocalModel]:
        """This gateway's base models (loaded or not)."""
        return iter(self.local.values())

    def loaded(self) -> list[str]:
        """Ids of the models whose head and tokenizer are in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def get(self, model_id: str) -> ServedModel:
        """A base model, loaded if it is not (blocking then: `resolve` does it in a worker thread)."""
        if model_id not in self.local:
            raise self._not_found(model_id)
        if (model := self._cached(model_id)) is not None:
            return model
        with self._loading[model_id]:  # one load per model, however many requests wait for it
            if (model := self._cached(model_id)) is not None:
                return model
            model = self._loader(self.local[model_id])
            with self._lock:
                self.loads += 1
                self._loaded[model_id] = model
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)  # the least recently used
            return model

    def _cached(self, model_id: str) -> ServedModel | None:
        with self._lock:
            model = self._loaded.get(model_id)
            if model is not None:
                self._loaded.move_to_end(model_id)
            return model

    def swarm_coverage(self) -> dict[str, SwarmCoverage]:
        """Each base model some server announces, with its coverage."""
        try:
            models = self._swarm_models()
        except Exception:  # a backend without records (tests' local one): no swarm models
            return {}
        return {name: SwarmCoverage.from_state(info) for name, info in models.items()}

    def cards(self, tenant: str) -> list[ModelCard]:
        """This gateway's base models, the swarm's other base models, then the tenant's fine-tunes."""
        swarm = self.swarm_coverage()
        cards = [self._local_card(model, swarm.get(model.id)) for model in self.local.values()]
        started = min((model.created for model in self.local.values()), default=int(time.time()))
        cards += [
            ModelCard(name, started, None, "swarmgate", servable=False, note=NO_FOLDER_NOTE, coverage=coverage)
            for name, coverage in sorted(swarm.items())
            if name not in self.local
        ]
        if self.fine_tuned is not None:
            cards += [self._fine_tuned_card(ft, tenant) for ft in self.fine_tuned.listed(tenant) if ft.base in self.local]
        return cards

    def card(self, model_id: str, tenant: str) -> ModelCard:
        swarm = self.swarm_coverage()
        if model_id in self.local:
            return self._local_card(self.local[model_id], swarm.get(model_id))
        if model_id in swarm:
            return ModelCard(model_id, int(time.time()), None, "swarmgate", servable=False, note=NO_FOLDER_NOTE,
                             coverage=swarm[model_id])
        return self._fine_tuned_card(self._fine_tuned(model_id, tenant), tenant)

    def _local_card(self, model: LocalModel, coverage: SwarmCoverage | None) -> ModelCard:
        mismatch = coverage is not None and model.checkpoint not in coverage.checkpoints
        return ModelCard(model.id, model.created, model.context_length, "swarmgate", servable=not mismatch,
                         note=mismatch_note(model, coverage) if mismatch and coverage else None, coverage=coverage)

    def _fine_tuned_card(self, ft: FineTunedModel, tenant: str) -> ModelCard:
        return ModelCard(ft.id, ft.created_at, self.local[ft.base].context_length, tenant, parent=ft.base)

    async def resolve(self, model_id: str, tenant: str) -> ServedModel:
        """A base model, or the tenant's fine-tuned model with its adapter loaded (404 otherwise).

        Loads the base's head and tokenizer in a worker thread when they are not in memory.
        """
        if model_id in self.local:
            return self._cached(model_id) or await run_sync(self.get, model_id)
        ft = self._fine_tuned(model_id, tenant)
        assert self.fine_tuned is not None
        try:
            adapter = await run_sync(self.fine_tuned.weights, ft)
        except FileNotFoundError:  # a checkpoint pruned since it was looked up
            raise ModelNotFound(model_id) from None
        base = self._cached(ft.base) or await run_sync(self.get, ft.base)
        return replace(base, id=ft.id, created=ft.created_at, base_id=ft.base, adapter=adapter)

    def _fine_tuned(self, model_id: str, tenant: str) -> FineTunedModel:
        ft = self.fine_tuned.find(model_id, tenant) if self.fine_tuned is not None else None
        if ft is None or ft.base not in self.local:
            raise self._not_found(model_id)
        return ft

    def _not_found(self, model_id: str) -> ModelNotFound:
        if model_id in self.swarm_coverage():
            return ModelNotServable(model_id, NO_FOLDER_NOTE)
        return ModelNotFound(model_id)
