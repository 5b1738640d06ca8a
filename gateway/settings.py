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
    data_dir: Path = Field(Path(".swarmgate"), description="Where the SQLite database (tenants, keys) lives.")
    api_key: str | None = Field(None, description="Single static key all requests must carry (tenant 'default').")
    require_auth: bool = Field(
        True, description="Without a static key: True checks per-tenant keys; False lets anyone in as 'default'."
    )
    max_concurrent_requests: int = Field(16, ge=1, description="Per tenant; more get 429.")
    max_n: int = Field(16, ge=1, description="Most choices (`n`) per request; each is a batch row in the swarm.")
    head_device: str = "cpu"
    head_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.head_dtype)
