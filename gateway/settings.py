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
    max_loaded_models: int = Field(
        4, ge=1,
        description="Most models whose head and tokenizer are in memory at once; one more loads on first use "
        "and evicts the least recently used.",
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
    max_fine_tuning_jobs: int = Field(
        4, ge=1, description="Per tenant: jobs validating, queued or running at once; more get 429 (they share the "
        "gateway's worker threads and the trainer's queue with every tenant)."
    )
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
    share_prefix_cache: bool = Field(
        False,
        description="Let tenants reuse each other's cached prompt starts on the servers. Off (as OpenAI's prompt "
        "caching, never shared between organizations): each tenant's prompts carry a salt of its own, so no "
        "tenant can learn from its TTFT what another's prompts began with.",
    )
    speculative_tokens: int = Field(
        0, ge=0, le=32,
        description="Most tokens drafted per step by prompt lookup and verified by the swarm in the same pass "
        "(speculative decoding, exact: outputs are plain decoding's); 0 turns it off.",
    )
    head_device: str = Field(
        "cpu", description="Where embeddings, final norm, LM head and sampling run: cpu or cuda (resolved, not auto)."
    )
    head_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="The head's dtype; `resolve_head` picks the checkpoint's on a GPU, float32 on a CPU."
    )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.head_dtype)


def resolve_device(name: str) -> str:
    """``auto``: cuda when a GPU is visible, else cpu; ``cuda`` without one is a clear error."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA GPU")
    return name


def checkpoint_dtype(model_path: Path) -> str:
    """The checkpoint's own floating dtype (config ``dtype``/``torch_dtype``), bfloat16 if it names none."""
    from blocks.checkpoint import load_config

    config = load_config(model_path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "bfloat16"
    return name if name in ("float32", "bfloat16", "float16") else "bfloat16"


def resolve_head(device: str, dtype: str, model_path: Path) -> tuple[str, str]:
    """(head_device, head_dtype) from the ``--device``/``--dtype`` flags: on a GPU ``auto`` is the
    checkpoint's dtype (what it was trained in), on a CPU float32 (exact, and fast there)."""
    device = resolve_device(device)
    if dtype == "auto":
        dtype = checkpoint_dtype(model_path) if device == "cuda" else "float32"
    return device, dtype
