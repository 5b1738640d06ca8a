"""Gateway API layer against an in-process backend that runs the model's layers locally.

Most end-to-end tests use the official `openai` SDK against a real uvicorn in a thread, so the
wire format is checked by the client that matters; raw SSE framing is checked with httpx.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import trio
from fastapi import FastAPI
from transformers import AutoModelForCausalLM, AutoTokenizer

from blocks.head import ModelHead
from blocks.tiny_checkpoints import build_checkpoint
from gateway.app import create_app
from gateway.backend import SwarmBusy, SwarmUnreachable
from gateway.protocol.errors import from_exception
from gateway.tenancy import tenant_salt
from gateway.settings import Settings
from gateway.storage.tenants import KeyStore
from gateway.swarm_backend import SwarmBackend, SwarmModel
from swarm.protocol import RemoteError
from tests.support import LocalBackend, small_id, wait_until

pytestmark = pytest.mark.e2e  # the API through a real uvicorn

MODEL = "tiny-llama"
CONTEXT = 256


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("gateway") / "tiny", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    """The unmodified HF model, for `generate` comparisons."""
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def backend(checkpoint: Path) -> LocalBackend:
    return LocalBackend(checkpoint, MODEL)


@pytest.fixture(scope="module")
def head_loader(checkpoint: Path):
    head = ModelHead(checkpoint)
    return lambda path: head


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def app(checkpoint: Path, backend: LocalBackend, head_loader, data_dir: Path) -> FastAPI:
    settings = Settings(models={MODEL: checkpoint}, data_dir=data_dir, max_concurrent_requests=2, max_n=4)
    return create_app(settings, backend, head_loader=head_loader)


@pytest.fixture(scope="module")
def api_key(app: FastAPI, data_dir: Path) -> str:
    return KeyStore(data_dir).create_key("acme")


@pytest.fixture(autouse=True)
def _reset_backend(backend: LocalBackend) -> Iterator[None]:
    yield
    backend.reset()


@pytest.fixture
def client(base_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture
def http(base_url: str, api_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http:
        yield http


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the sea."}]


def hf_greedy(reference, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, int, str]:
    """HF `generate`'s greedy text, its token count (EOS included) and the finish reason."""
    with torch.inference_mode():
        out = reference.generate(
            torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    new = out[0, len(prompt_ids) :].tolist()
    ended = new[-1] in set(reference.generation_config.eos_token_id)
    return tokenizer.decode(new, skip_special_tokens=True), len(new), "stop" if ended else "length"


# --- chat and completions -------------------------------------------------------------------------


def test_chat_greedy_matches_hf_generate(client, reference, tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    prompt_ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected, count, finish = hf_greedy(reference, tokenizer, prompt_ids, 20)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == MODEL and response.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == expected and expected
    assert choice.finish_reason == finish
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == count
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first, finish, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert finish.choices[0].finish_reason == full.choices[0].finish_reason
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    assert usage.choices == [] and usage.usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == full.choices[0].message.content


def test_chat_content_parts_equal_string_content(client):
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "about the sea."}]
    a = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0
    )
    b = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me\nabout the sea."}], max_tokens=8, temperature=0
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage


def test_completion_greedy_matches_hf_generate_and_stream(client, reference, tokenizer):
    prompt = "Once upon a time there was"
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected, count, finish = hf_greedy(reference, tokenizer, prompt_ids, 12)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.choices[0].text == expected and response.choices[0].finish_reason == finish
    assert response.usage.prompt_tokens == len(prompt_ids) and response.usage.completion_tokens == count

    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks[:-1]) == expected
    assert chunks[-2].choices[0].finish_reason == response.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == response.usage


def test_completion_default_max_tokens_is_16_and_token_prompt(client, tokenizer):
    ids = tokenizer("The weather is")["input_ids"]
    by_text = client.completions.create(model=MODEL, prompt="The weather is", temperature=0, extra_body={"ignore_eos": True})
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, extra_body={"ignore_eos": True})
    assert by_text.usage.completion_tokens == 16 and by_text.choices[0].finish_reason == "length"
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_chat_default_max_tokens_fills_the_context(client, tokenizer):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True}
    )
    prompt = response.usage.prompt_tokens
    assert response.usage.completion_tokens == CONTEXT - prompt
    assert response.choices[0].finish_reason == "length"


def test_raw_sse_framing(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: {") and "\n" not in event and "\r" not in event
        chunk = json.loads(event.removeprefix("data: "))
        assert "usage" not in chunk  # only with stream_options.include_usage
        assert set(chunk) == {"id", "object", "created", "model", "choices", "system_fingerprint"}
    last = json.loads(events[-3].removeprefix("data: "))
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_string_spanning_token_boundary(client, tokenizer):
    # Forcing " small" makes the output " small small ..."; the stop "ll s" spans two tokens.
    kwargs = dict(model=MODEL, prompt="The quick brown fox", max_tokens=8, logit_bias={str(small_id(tokenizer)): 100})
    stopped = client.completions.create(**kwargs, stop=["ll s", "never-there"])
    assert stopped.choices[0].text == " sma" and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens == 2  # the token completing the stop counts

    deltas = [c.choices[0].text for c in client.completions.create(**kwargs, stop="ll s", stream=True)]
    assert "".join(deltas) == " sma" and not any("l" in d for d in deltas)  # "ll" was held back

    not_matched = client.completions.create(**kwargs, stop="ll sx")
    assert not_matched.choices[0].text == " small" * 8 and not_matched.choices[0].finish_reason == "length"

    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    content = chat.choices[0].message.content
    stop = content[2:4]
    cut = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0, stop=stop)
    assert cut.choices[0].message.content == content[: content.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_reproducibility(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=24, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kwargs, seed=1234)
    b = client.chat.completions.create(**kwargs, seed=1234)
    c = client.chat.completions.create(**kwargs, seed=4321)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content


def test_n_choices_share_a_session_and_sum_usage(client, backend):
    before = len(backend.sessions)
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=7, logprobs=True, extra_body={"ignore_eos": True}
    )
    assert len(backend.sessions) == before + 1 and backend.sessions[-1].batch == 2
    assert [c.index for c in response.choices] == [0, 1]
    assert response.choices[0].message.content != response.choices[1].message.content
    assert all(len(c.logprobs.content) == 8 for c in response.choices)
    assert response.usage.completion_tokens == 16

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, n=2, seed=7, stream=True, extra_body={"ignore_eos": True}
        )
    )
    for index, choice in enumerate(response.choices):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content


def test_chat_logprobs_shape(client):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    joined = b"".join(bytes(t.bytes) for t in content).decode(errors="replace")
    assert content and joined == response.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and (entry.bytes == list(entry.token.encode()) or "\\x" in entry.token)
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy

    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=0, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)
    none = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert none.choices[0].logprobs is None

    streamed = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True
        )
    )
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.model_dump() for t in tokens] == [t.model_dump() for t in content]


def test_completion_logprobs_shape(client):
    response = client.completions.create(model=MODEL, prompt="Hello!", max_tokens=6, temperature=0, logprobs=2)
    lp = response.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == response.usage.completion_tokens or response.choices[0].finish_reason == "stop"
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and top[token] == logprob == max(top.values())

    streamed = list(client.completions.create(model=MODEL, prompt="Hello!", max_tokens=6, temperature=0, logprobs=2, stream=True))
    offsets = [o for c in streamed if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_logit_bias_forces_a_token(client, tokenizer):
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=5, logit_bias={str(small_id(tokenizer)): 100}
    )
    assert response.choices[0].message.content == " small" * 5


def test_eos_ends_a_choice_and_counts_as_a_token(client, tokenizer):
    eos = {str(tokenizer.eos_token_id): 100}
    ended = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, logit_bias=eos)
    assert ended.choices[0].message.content == "" and ended.choices[0].finish_reason == "stop"
    assert ended.usage.completion_tokens == 1
    later = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=10, logit_bias=eos, logprobs=True, extra_body={"min_tokens": 3}
    )
    assert later.choices[0].finish_reason == "stop" and later.usage.completion_tokens == 4
    assert len(later.choices[0].logprobs.content) == 3  # EOS itself is not reported


def test_penalties_and_vllm_extras_are_accepted(client):
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 8, "ignore_eos": False},
    )
    assert response.usage.completion_tokens == 8 and response.choices[0].finish_reason == "length"


# --- models, health, swarm ------------------------------------------------------------------------


def test_models_health_and_swarm(client, http, base_url, backend):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}  # no key needed
    backend.missing = (2,)
    view = http.get("/v1/swarm").json()
    assert view["models"] == [{"id": MODEL, "num_blocks": 4, "missing_blocks": [2], "complete": False}]
    assert view["swarm"] == backend.swarm_state()


# --- errors ---------------------------------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, type_: str, param: str | None = None, code: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == type_ and error["param"] == param and error["code"] == code
    return error


def test_validation_errors_are_openai_400s(http):
    def post(body: Any) -> httpx.Response:
        return http.post("/v1/chat/completions", json=body)

    assert_error(post({"model": MODEL, "messages": MESSAGES, "temperature": 5}), 400, "invalid_request_error", "temperature")
    assert_error(post({"model": MODEL}), 400, "invalid_request_error", "messages")
    assert_error(post({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}), 400, "invalid_request_error", "messages[0].role")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert_error(post({"model": MODEL, "messages": image}), 400, "invalid_request_error", "messages[0].content[0].type")
    assert_error(post({"model": MODEL, "messages": MESSAGES, "top_logprobs": 2}), 400, "invalid_request_error")
    assert_error(post({"model": MODEL, "messages": MESSAGES, "logit_bias": {"99999": 5}}), 400, "invalid_request_error", "logit_bias")
    assert_error(post({"model": MODEL, "messages": MESSAGES, "n": 5}), 400, "invalid_request_error", "n")
    bad_json = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(bad_json, 400, "invalid_request_error")
    echo = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "echo": True})
    assert_error(echo, 400, "invalid_request_error", "echo")


def test_prompt_too_long_is_400(client, http):
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL, prompt="hello " * CONTEXT, max_tokens=4)
    assert raised.value.code == "context_length_exceeded" and raised.value.param == "prompt"
    too_much = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": CONTEXT})
    error = assert_error(too_much, 400, "invalid_request_error", "messages", "context_length_exceeded")
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]


def test_authentication_errors(base_url, http):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic abc"}):
        response = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES}, headers=headers)
        assert_error(response, 401, "invalid_request_error", code="invalid_api_key")
    bad = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert raised.value.code == "model_not_found"
    assert_error(http.get("/v1/models/gpt-9"), 404, "invalid_request_error", "model", "model_not_found")
    assert_error(http.get("/v1/nothing-here"), 404, "invalid_request_error")


def test_uncovered_model_is_503_naming_missing_blocks(client, backend):
    backend.missing = (1, 2, 3)
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert raised.value.status_code == 503 and "blocks 1-3" in raised.value.message


def test_tenant_limit_and_swarm_capacity_are_429(client, base_url, http, backend, app):
    backend.step_delay = 0.05
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "stream": True, "ignore_eos": True}
    limiter = app.state.gateway.limiter
    with ExitStack() as stack:
        for _ in range(2):  # the tenant's limit is 2
            response = stack.enter_context(http.stream("POST", "/v1/chat/completions", json=body))
            lines = response.iter_lines()  # keep it: a dropped iterator disconnects
            stack.callback(lines.close)
            assert next(lines).startswith("data: {")
        with pytest.raises(openai.RateLimitError) as raised:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        assert raised.value.code == "rate_limit_exceeded"
        other = KeyStore(app.state.gateway.settings.data_dir).create_key("other-tenant")
        other_client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=other, max_retries=0)
        assert other_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
    wait_until(lambda: limiter.active("acme") == 0)

    backend.step_delay = 0.0
    backend.busy = True
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert raised.value.code == "swarm_busy"
    assert limiter.active("acme") == 0


def test_stop_strings_are_bounded(client):
    """Every token's text is checked against them on the head's thread all tenants share."""
    for stop in (["x"] * 17, ["x" * 1001]):
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stop=stop)
        assert "at most 16 stop strings" in raised.value.message
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, stop=["x" * 1000] * 16).choices


def test_a_generation_that_fails_to_start_gives_the_tenants_slot_back(client, app, monkeypatch):
    """A request whose generation cannot even be set up (a bug, a guide that fails to build) is a
    500; the tenant's slot taken for it comes back (else two such requests locked the tenant out)."""
    def broken(*args, **kwargs):
        raise RuntimeError("the sampler could not be built")

    monkeypatch.setattr("gateway.inference.serving.Generation", broken)
    for _ in range(3):  # more than the tenant's limit of 2
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert app.state.gateway.limiter.active("acme") == 0


def test_internal_errors_do_not_leak(client, http, backend):
    backend.fail_at_step = 2  # the first decode step: every request gets there (greedy, EOS ignored)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    response = http.post("/v1/chat/completions", json=body)
    error = assert_error(response, 500, "server_error")
    assert "secret" not in response.text and "Traceback" not in response.text
    assert backend.sessions[-1].closed

    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
        events = [line for line in streamed.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["message"] == error["message"]
    assert "secret" not in "".join(events) and backend.sessions[-1].closed
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))


def test_disconnect_mid_stream_closes_the_session(base_url, api_key, backend, app):
    backend.step_delay = 0.02
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            for _ in range(6):
                next(lines)
            session = backend.sessions[-1]
            assert not session.closed
    wait_until(lambda: session.closed)
    assert session.steps < 200
    wait_until(lambda: app.state.gateway.limiter.active("acme") == 0)


def test_disconnect_while_waiting_for_a_non_streamed_answer_closes_the_session(base_url, api_key, backend, app):
    backend.step_delay = 0.02
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {api_key}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, headers=headers, timeout=0.5)
    session = backend.sessions[-1]
    wait_until(lambda: session.closed)
    assert session.steps < 200
    wait_until(lambda: app.state.gateway.limiter.active("acme") == 0)


def test_keep_alive_pings_do_not_disturb_clients(client, http, backend, monkeypatch):
    monkeypatch.setattr("gateway.inference.streaming.PING_SECONDS", 0.01)
    backend.step_delay = 0.03
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[-1].choices[0].finish_reason and len(chunks) >= 3
    with http.stream("POST", "/v1/chat/completions", json={**kwargs, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert any(line.startswith(": ping") for line in lines)
    assert all(line.startswith(("data: ", ": ping")) for line in lines)


def test_static_api_key_mode(checkpoint, backend, head_loader, tmp_path):
    settings = Settings(models={MODEL: checkpoint}, data_dir=tmp_path, api_key="sk-static")
    app = create_app(settings, backend, head_loader=head_loader)
    transport = httpx.ASGITransport(app=app)

    async def go() -> tuple[int, int, int]:
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
            ok = await http.get("/v1/models", headers={"Authorization": "Bearer sk-static"})
            wrong = await http.get("/v1/models", headers={"Authorization": "Bearer sk-other"})
            missing = await http.get("/v1/models")
            return ok.status_code, wrong.status_code, missing.status_code

    assert asyncio.run(go()) == (200, 401, 401)
    assert not (tmp_path / "gateway.sqlite3").exists()


def test_keys_are_stored_hashed(tmp_path):
    store = KeyStore(tmp_path)
    key = store.create_key("acme")
    assert key.startswith("sk-") and len(key) > 40
    assert store.tenant_for_key(key) == "acme" and store.tenant_for_key(key + "x") is None
    assert store.create_key("acme") != key
    db = sqlite3.connect(store.path)
    dump = "\n".join(db.iterdump())
    assert db.execute("SELECT count(*) FROM keys WHERE tenant = 'acme'").fetchone() == (2,)
    db.close()
    assert key not in dump and key[3:] not in dump


@pytest.mark.parametrize("failure", [trio.TooSlowError(), ConnectionError("reset"), RemoteError("refused")])
def test_swarm_failures_while_opening_answer_503(failure):
    """Servers that die while a session opens (after the session's own retries) are a 503 the
    client may retry, not an internal error; a full swarm stays a 429."""

    class FailingBridge:
        async def open_session(self, request: Any) -> None:
            raise failure

    backend = SwarmBackend(FailingBridge(), [SwarmModel("m", 4, "digest")])  # type: ignore[arg-type]
    with pytest.raises(SwarmUnreachable) as raised:
        asyncio.run(backend.open_session("m", batch=1, max_length=8))
    assert from_exception(raised.value).status_code == 503
    assert from_exception(SwarmBusy("full")).status_code == 429


def test_tenant_salts_part_tenants_and_salts_and_name_neither():
    """The salt a request reaches the swarm with: equal for one tenant and request salt (so its
    prompts share cached starts), different across tenants or salts, and neither name readable in it."""
    salts = {(tenant, salt): tenant_salt(tenant, salt) for tenant in ("acme", "globex") for salt in (None, "alice")}
    assert len(set(salts.values())) == 4
    assert tenant_salt("acme", None) == salts["acme", None]
    assert tenant_salt("acme", "") != salts["acme", None]  # a request's empty salt is refused anyway (400)
    assert all(1 <= len(salt) <= 256 and "acme" not in salt and "globex" not in salt for salt in salts.values())
