"""`POST /v1/embeddings` through the real path: uvicorn in a thread, the in-process backend
(`tests.support.LocalBackend`: every block as servers run them) and the official `openai` SDK.

The reference is plain transformers on the same checkpoint: `AutoModel`'s `last_hidden_state`
(the decoder's output after its final norm) for the input alone, mean over its tokens, L2
normalised. The gateway batches inputs as right-padded rows of one session, embeds and norms at
the gateway and runs the blocks in the backend, all float32, so every component agrees within
`ATOL` (observed ~1e-7).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from fastapi import FastAPI
from transformers import AutoModel, AutoTokenizer

from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from gateway.app import create_app
from gateway.embeddings.pooling import MAX_ROWS, batches
from gateway.settings import Settings
from gateway.storage.tenants import KeyStore
from tests.support import LocalBackend

pytestmark = pytest.mark.e2e

MODEL = "tiny-embed"
CONTEXT = 128
ATOL = 1e-5
TEXTS = [
    "The capital of France is Paris.",
    "hi",
    "Embeddings are mean-pooled final hidden states, normalised to unit length.",
    "A swarm of block servers, each running a span of the model's layers, one after another.",
] + [f"sentence number {i} " * (1 + i % 5) for i in range(20)]  # 24 inputs: more than one session's rows


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("embeddings") / "tiny", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def backend(checkpoint: Path) -> LocalBackend:
    return LocalBackend(checkpoint, MODEL)


@pytest.fixture(scope="module")
def app(checkpoint: Path, backend: LocalBackend, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    data_dir = tmp_path_factory.mktemp("embeddings-data")
    head = ModelHead(checkpoint)
    settings = Settings(models={MODEL: checkpoint}, data_dir=data_dir, max_concurrent_requests=2)
    app = create_app(settings, backend, head_loader=lambda path: head)
    app.state.test_key = KeyStore(data_dir).create_key("acme")
    return app


@pytest.fixture
def client(base_url: str, app: FastAPI, backend: LocalBackend) -> Iterator[openai.OpenAI]:
    backend.reset()
    yield openai.OpenAI(base_url=f"{base_url}/v1", api_key=app.state.test_key, max_retries=0, timeout=60)
    backend.reset()


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint: Path, tokenizer):
    """Token ids -> transformers' embedding of that input alone."""
    model = AutoModel.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def embed(ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            hidden = model(torch.tensor([ids])).last_hidden_state[0]  # after the final norm
        return F.normalize(hidden.mean(dim=0), dim=-1).numpy()

    return embed


def vectors(response) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.array([item.embedding for item in response.data], dtype=np.float32)


# --- values ---------------------------------------------------------------------------------------


def test_one_text_matches_transformers(client, tokenizer, reference):
    response = client.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float")
    ids = tokenizer(TEXTS[0])["input_ids"]
    (vector,) = vectors(response)
    assert vector.shape == (64,)
    np.testing.assert_allclose(vector, reference(ids), atol=ATOL)
    assert abs(np.linalg.norm(vector) - 1) < 1e-5
    assert response.model == MODEL and response.object == "list"
    assert response.usage.prompt_tokens == response.usage.total_tokens == len(ids)


def test_batch_of_texts_each_matches_transformers(client, backend, tokenizer, reference):
    """Different lengths share sessions as padded rows; each row still equals its input alone."""
    before = len(backend.sessions)
    response = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    rows = [tokenizer(text)["input_ids"] for text in TEXTS]
    got = vectors(response)
    for vector, ids in zip(got, rows, strict=True):
        np.testing.assert_allclose(vector, reference(ids), atol=ATOL)
    assert response.usage.prompt_tokens == sum(map(len, rows))
    sessions = [session.batch for session in backend.sessions[before:]]
    assert sum(sessions) == len(TEXTS) and max(sessions) <= MAX_ROWS and len(sessions) >= 2
    assert all(session.closed for session in backend.sessions)
    assert not np.allclose(got[0], got[1], atol=1e-3)  # different texts, different vectors


def test_token_ids_equal_texts(client, tokenizer):
    rows = [tokenizer(text)["input_ids"] for text in TEXTS[:3]]
    by_text = vectors(client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float"))
    by_ids = vectors(client.embeddings.create(model=MODEL, input=rows, encoding_format="float"))
    one = vectors(client.embeddings.create(model=MODEL, input=rows[2], encoding_format="float"))
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)
    np.testing.assert_allclose(one[0], by_text[2], atol=1e-6)


def test_base64_round_trip(client, base_url, app):
    """The SDK asks for base64 by default and decodes it; raw base64 is little-endian float32."""
    floats = vectors(client.embeddings.create(model=MODEL, input=TEXTS[:2], encoding_format="float"))
    by_default = vectors(client.embeddings.create(model=MODEL, input=TEXTS[:2]))
    np.testing.assert_array_equal(by_default, floats)
    raw = httpx.post(f"{base_url}/v1/embeddings", headers={"Authorization": f"Bearer {app.state.test_key}"},
                     json={"model": MODEL, "input": TEXTS[:2], "encoding_format": "base64"}, timeout=60).json()
    decoded = np.array([np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in raw["data"]])
    np.testing.assert_array_equal(decoded, floats)


def test_dimensions_equal_to_hidden_size(client):
    response = client.embeddings.create(model=MODEL, input="hi", dimensions=64, encoding_format="float")
    assert len(response.data[0].embedding) == 64


def test_batching_plan():
    assert batches([]) == []
    assert batches([5, 1, 3]) == [[1, 2, 0]]
    assert batches([10] * 20, max_rows=16) == [list(range(16)), list(range(16, 20))]
    assert batches([600, 600, 600, 600, 3000], max_tokens=2048) == [[0, 1, 2], [3], [4]]


# --- errors ---------------------------------------------------------------------------------------


def error(client: openai.OpenAI, status: type[openai.APIStatusError], **kwargs) -> dict:
    with pytest.raises(status) as caught:
        client.embeddings.create(**{"model": MODEL, "input": "hi", "encoding_format": "float", **kwargs})
    return caught.value.body


@pytest.mark.parametrize("bad_input", ["", [], [""], [[]], [[1, 2], []]])
def test_empty_inputs_are_400(client, bad_input):
    assert error(client, openai.BadRequestError, input=bad_input)["param"] == "input"


def test_request_errors(client, backend):
    before = len(backend.sessions)
    body = error(client, openai.BadRequestError, dimensions=32)
    assert body["param"] == "dimensions" and "64" in body["message"]
    assert "must be in [0," in error(client, openai.BadRequestError, input=[[1, 10**6]])["message"]
    assert error(client, openai.BadRequestError, input=[1] * (CONTEXT + 1))["code"] == "context_length_exceeded"
    assert error(client, openai.BadRequestError, input=["x"] * 2049)["param"] == "input"
    assert error(client, openai.BadRequestError, encoding_format="int8")["param"] == "encoding_format"
    assert error(client, openai.NotFoundError, model="nope")["code"] == "model_not_found"
    assert len(backend.sessions) == before  # nothing was taken for any of them


def test_swarm_errors(client, backend, app):
    backend.missing = (1, 2)
    assert "1-2" in error(client, openai.InternalServerError)["message"]  # 503
    backend.missing = ()
    backend.busy = True
    assert error(client, openai.RateLimitError)["code"] == "swarm_busy"
    backend.busy = False
    limiter = app.state.gateway.limiter
    leases = [limiter.acquire("acme") for _ in range(limiter.limit)]
    try:
        assert error(client, openai.RateLimitError)["code"] == "rate_limit_exceeded"
    finally:
        for lease in leases:
            lease.release()
    assert limiter.active("acme") == 0
    client.embeddings.create(model=MODEL, input="hi")  # and all is well again
    assert limiter.active("acme") == 0


def test_needs_a_key(base_url):
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model=MODEL, input="hi")
