"""Gateway configuration; the CLI fills it from flags and their environment twins."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field


class Settings(BaseModel):
    models: dict[str, Path] = Field(
        description="Served model id -> local checkpoint folder holding its tokenizer, embeddings and LM head."
    )
    data_dir: Path = Field(
        Path(".swarmgate"),
        description="The SQLite database (tenants, keys, files, jobs), uploaded files and tenants' adapters.",
    )
    api_key: str | None = Field(None, description="Single static key all requests must carry (tenant 'default').")
    require_auth: bool = Field(
        True, description="Without a static key: True checks per-tenant keys; False lets anyone in as 'default'."
    )
    max_concurrent_requests: int = Field(16, ge=1, description="Per tenant; more get 429.")
    max_n: int = Field(16, ge=1, description="Most choices (`n`) per request; each is a batch row in the swarm.")
    max_upload_bytes: int = Field(
        64 * 2**20, ge=1, description="Largest file (or adapter archive) a tenant may upload."
    )
    fine_tune_learning_rate: float = Field(
        2e-4, gt=0, description="Base learning rate of LoRA fine-tuning; a job's learning_rate_multiplier scales it."
    )
    fine_tune_max_tokens: int = Field(
        2048, ge=16,
        description="Tokens (rows x length) per training forward through the swarm, so also the longest example; "
        "keep it within the servers' --max-train-tokens.",
    )
    head_device: str = "cpu"
    head_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.head_dtype)
