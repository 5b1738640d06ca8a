"""Shared fixtures: tiny random-weight checkpoints of real architectures, built once per run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI

from blocks.tiny_checkpoints import build_checkpoint
from tests.support import serve

# family -> build_checkpoint kwargs; each exercises something the others do not.
TINY_MODELS = {
    # GQA, sharded so that span loading must pick shards.
    "llama": dict(family="llama", num_kv_heads=2, max_shard_size="200KB"),
    # Sliding attention on every layer, with a window far shorter than the long tests.
    "mistral": dict(family="mistral", num_kv_heads=2, sliding_window=48),
    # Attention bias, tied embeddings, full layers below and sliding layers above, no GQA.
    "qwen2": dict(family="qwen2", num_kv_heads=4, sliding_window=48, tie_word_embeddings=True),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {name: build_checkpoint(root / name, **kwargs) for name, kwargs in TINY_MODELS.items()}


@pytest.fixture(scope="session")
def llama_path(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def base_url(app: FastAPI) -> Iterator[str]:
    """The module's `app` on a real uvicorn (each gateway test module defines its own `app`)."""
    with serve(app) as url:
        yield url
