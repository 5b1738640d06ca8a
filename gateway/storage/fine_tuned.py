"""A tenant's fine-tuned model ids: each names a served base model and an adapter folder.

Three kinds: a job's final model (`ft:<base>:<tenant>:<suffix>:<job-id>`), a job's checkpoints
(`...:ckpt-step-N`) and imported adapters; only finals and imports are listed in `/v1/models`,
all of them work in chat/completions. Ids are looked up whole with their tenant, never parsed,
so another tenant's id is simply unknown. Adapter folders are write-once, so the LoRA weights
read for a model can be cached by folder for as long as the model exists.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from adapters import AdapterStore, LoraAdapter
from gateway.storage.database import Database
from blocks.lora_weights import LoraWeights

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fine_tuned_models (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    base TEXT NOT NULL,
    adapter TEXT NOT NULL,
    kind TEXT NOT NULL,
    job_id TEXT,
    step INTEGER,
    metrics TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS fine_tuned_models_by_tenant ON fine_tuned_models (tenant, seq);
CREATE INDEX IF NOT EXISTS fine_tuned_models_by_job ON fine_tuned_models (job_id, seq);
"""

Kind = Literal["job", "checkpoint", "import"]
CACHED_ADAPTERS = 32


@dataclass(frozen=True)
class FineTunedModel:
    id: str
    tenant: str
    base: str  # a served base model id
    adapter: str  # folder name in the tenant's AdapterStore
    kind: Kind
    created_at: int
    job_id: str | None = None
    step: int | None = None
    metrics: dict[str, Any] | None = None


def model_id(base: str, tenant: str, suffix: str | None, name: str) -> str:
    """OpenAI's form, `ft:<base>:<org>:<suffix>:<id>`, with the tenant as the org."""
    return f"ft:{base}:{tenant}:{suffix or ''}:{name}"


def checkpoint_name(job_id: str, step: int) -> str:
    """A checkpoint's adapter folder, also its `fine_tuning.job.checkpoint` id."""
    return f"ftckpt-{job_id.removeprefix('ftjob-')}-step-{step}"


class FineTunedModels:
    def __init__(self, db: Database, store: AdapterStore) -> None:
        self.db = db
        self.store = store
        db.register(_SCHEMA)
        self._cache: OrderedDict[tuple[str, str], LoraWeights] = OrderedDict()
        self._lock = threading.Lock()

    def add(
        self, tenant: str, model_id: str, base: str, adapter: LoraAdapter, *, name: str, kind: Kind,
        job_id: str | None = None, step: int | None = None, metrics: dict[str, Any] | None = None,
    ) -> FineTunedModel:
        """Write the adapter (atomically, as folder `name`), then register the id (blocking)."""
        self.store.save(tenant, name, adapter)
        model = FineTunedModel(model_id, tenant, base, name, kind, int(time.time()), job_id, step, metrics)
        self.db.execute(
            "INSERT INTO fine_tuned_models (id, tenant, base, adapter, kind, job_id, step, metrics, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (model.id, tenant, base, name, kind, job_id, step, json.dumps(metrics) if metrics else None,
             model.created_at),
        )
        return model

    def find(self, model_id: str, tenant: str) -> FineTunedModel | None:
        row = self.db.one("SELECT * FROM fine_tuned_models WHERE id = ? AND tenant = ?", (model_id, tenant))
        return _model(row) if row else None

    def listed(self, tenant: str) -> list[FineTunedModel]:
        """The tenant's final and imported models, oldest first (checkpoints are found per job)."""
        return [_model(row) for row in self.db.query(
            "SELECT * FROM fine_tuned_models WHERE tenant = ? AND kind != 'checkpoint' ORDER BY seq", (tenant,)
        )]

    def checkpoints(self, job_id: str, *, limit: int, after: str | None) -> tuple[list[FineTunedModel], bool]:
        """A page of a job's checkpoints, newest first; `after` is a checkpoint's id (its folder)."""
        rows, has_more = self.db.page(
            "fine_tuned_models", {"job_id": job_id, "kind": "checkpoint"}, owner="job_id", cursor="adapter",
            limit=limit, after=after,
        )
        return [_model(row) for row in rows], has_more

    def remove(self, model: FineTunedModel) -> None:
        """Unregister first (no new request finds it), then delete the folder (blocking)."""
        self.db.execute("DELETE FROM fine_tuned_models WHERE id = ?", (model.id,))
        self.store.delete(model.tenant, model.adapter)
        with self._lock:
            self._cache.pop((model.tenant, model.adapter), None)

    def prune_checkpoints(self, job_id: str, keep: int) -> None:
        """Keep a job's `keep` newest checkpoints (OpenAI keeps the last three epochs')."""
        older, _ = self.checkpoints(job_id, limit=1_000_000, after=None)
        for model in older[keep:]:
            self.remove(model)

    def remove_job(self, tenant: str, job_id: str) -> None:
        """Every model and adapter folder a job has produced, also a crashed run's unregistered ones."""
        for row in self.db.query("SELECT * FROM fine_tuned_models WHERE job_id = ?", (job_id,)):
            self.remove(_model(row))
        prefixes = (job_id, checkpoint_name(job_id, 0).removesuffix("0"))
        for name in self.store.names(tenant):
            if name.startswith(prefixes):
                self.store.delete(tenant, name)

    def weights(self, model: FineTunedModel) -> LoraWeights:
        """The model's LoRA as the swarm applies it (blocking: reads the folder unless cached)."""
        key = (model.tenant, model.adapter)
        with self._lock:
            if (cached := self._cache.get(key)) is not None:
                self._cache.move_to_end(key)
                return cached
        weights = self.store.load(model.tenant, model.adapter).weights()
        with self._lock:
            self._cache[key] = weights
            while len(self._cache) > CACHED_ADAPTERS:
                self._cache.popitem(last=False)
        return weights


def _model(row: Any) -> FineTunedModel:
    return FineTunedModel(
        id=row["id"], tenant=row["tenant"], base=row["base"], adapter=row["adapter"], kind=row["kind"],
        created_at=row["created_at"], job_id=row["job_id"], step=row["step"],
        metrics=json.loads(row["metrics"]) if row["metrics"] else None,
    )
