"""The OpenAI API through the real stack: server processes, a `swarmgate gateway` process, the SDK."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from gateway.storage.tenants import KeyStore
from swarmgate.launcher import start_swarm, stop_all
from tests.support import wait_until
from tests.swarm_harness import FAST_ANNOUNCE, reference_model, start_gateway, wait_covered

pytestmark = pytest.mark.e2e

MAX_CONCURRENT = 2


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    path = tiny_models["llama"]
    data_dir = tmp_path_factory.mktemp("gateway-data")
    keys = KeyStore(data_dir)
    tenant_keys = {"acme": keys.create_key("acme"), "globex": keys.create_key("globex")}
    servers = start_swarm(path, ["0:2", "2:4"], extra_args=FAST_ANNOUNCE, log_dir=data_dir)
    gateway = None
    try:
        gateway, base = start_gateway(path, servers[0].addrs, data_dir,
                                       "--max-concurrent-requests", str(MAX_CONCURRENT), "--wire-codec", "none")
        assert all(m["complete"] for m in wait_covered(base, tenant_keys["acme"])["models"])
        yield {"path": path, "base": base, "keys": tenant_keys, "model": path.name, "servers": servers,
               "data_dir": data_dir}
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        stop_all(servers)


@pytest.fixture
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["base"] + "/v1", api_key=stack["keys"]["acme"], max_retries=0)


MESSAGES = [{"role": "user", "content": "Hello! How are you today?"}]


def _local_chat_greedy(path: Path, messages: list[dict], max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    output = reference_model(path).generate(prompt, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)


def test_models_listing(client, stack):
    assert [m.id for m in client.models.list().data] == [stack["model"]]
    assert client.models.retrieve(stack["model"]).id == stack["model"]


def test_greedy_chat_equals_local_generate(client, stack):
    reply = client.chat.completions.create(model=stack["model"], messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == _local_chat_greedy(stack["path"], MESSAGES, 12)
    assert reply.choices[0].message.role == "assistant"
    tokenizer = AutoTokenizer.from_pretrained(stack["path"])
    prompt_tokens = len(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert reply.usage.prompt_tokens == prompt_tokens
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_matches_plain(client, stack):
    plain = client.chat.completions.create(model=stack["model"], messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(
        model=stack["model"], messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_async_client_completions(stack):
    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=stack["base"] + "/v1", api_key=stack["keys"]["acme"], max_retries=0)
        plain = await client.completions.create(model=stack["model"], prompt="The quick brown fox", max_tokens=8,
                                                temperature=0)
        stream = await client.completions.create(model=stack["model"], prompt="The quick brown fox", max_tokens=8,
                                                 temperature=0, stream=True)
        streamed = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
        return plain.choices[0].text, streamed

    plain, streamed = asyncio.run(run())
    assert plain == streamed and plain


def test_sampling_seed_n_stop_logprobs(client, stack):
    args = dict(model=stack["model"], messages=MESSAGES, max_tokens=12, temperature=1.0, seed=7)
    first = client.chat.completions.create(**args)
    assert first.choices[0].message.content == client.chat.completions.create(**args).choices[0].message.content

    two = client.chat.completions.create(**args | {"n": 2}, extra_body={"ignore_eos": True})
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.finish_reason for c in two.choices] == ["length", "length"]
    assert two.usage.completion_tokens == 24

    greedy = client.chat.completions.create(model=stack["model"], messages=MESSAGES, max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[3:6]
    stopped = client.chat.completions.create(model=stack["model"], messages=MESSAGES, max_tokens=12, temperature=0,
                                             stop=[stop])
    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"

    with_logprobs = client.chat.completions.create(model=stack["model"], messages=MESSAGES, max_tokens=4,
                                                   temperature=0, logprobs=True, top_logprobs=3)
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob == max(t.logprob for t in entry.top_logprobs) for entry in content)


def test_curl_streams_line_by_line(stack):
    body = json.dumps({"model": stack["model"], "messages": MESSAGES, "max_tokens": 5, "stream": True})
    output = subprocess.run(
        ["curl", "-sN", f"{stack['base']}/v1/chat/completions", "-H", f"Authorization: Bearer {stack['keys']['acme']}",
         "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    events = [line for line in output.splitlines() if line]
    assert all(line.startswith("data: ") or line.startswith(":") for line in events)
    data = [line[len("data: "):] for line in events if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_error_statuses(client, stack):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=stack["model"], messages=MESSAGES, temperature=5)
    assert bad.value.body["param"] and "temperature" in bad.value.body["param"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=stack["model"], messages=[{"role": "user", "content": "hi " * 5000}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=stack["base"] + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert missing.value.body["code"] == "model_not_found"


def test_tenant_concurrency_limit_is_429(stack):
    """MAX_CONCURRENT open streams of one tenant; the next request of that tenant gets 429."""
    headers = {"Authorization": f"Bearer {stack['keys']['globex']}"}
    body = {"model": stack["model"], "messages": MESSAGES, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=stack["base"], headers=headers, timeout=60) as http:
        streams = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(MAX_CONCURRENT)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [response.status_code for response in responses] == [200] * MAX_CONCURRENT
            readers = [response.iter_lines() for response in responses]  # kept: a dropped one disconnects
            for lines in readers:
                assert all(next(lines) is not None for _ in range(6))  # generating
            refused = http.post("/v1/chat/completions", json=body | {"stream": False, "max_tokens": 2})
            assert refused.status_code == 429, refused.text[:500]
            assert refused.json()["error"]["type"]
            other = httpx.post(stack["base"] + "/v1/chat/completions",
                               headers={"Authorization": f"Bearer {stack['keys']['acme']}"},
                               json=body | {"stream": False, "max_tokens": 2}, timeout=60)
            assert other.status_code == 200  # another tenant is not affected
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)


def _server_sessions(stack) -> list[int]:
    view = httpx.get(stack["base"] + "/v1/swarm", headers={"Authorization": f"Bearer {stack['keys']['acme']}"}).json()
    return [server["sessions"] for info in view["swarm"]["models"].values() for server in info["servers"]]


def _wait_sessions(stack, condition, message: str, timeout: float = 20.0) -> None:
    wait_until(lambda: condition(_server_sessions(stack)), timeout, message=message)


def test_disconnect_mid_stream_frees_the_session(stack):
    _wait_sessions(stack, lambda sessions: not any(sessions), "earlier tests' sessions never ended")
    body = {"model": stack["model"], "messages": MESSAGES, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", stack["base"] + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {stack['keys']['acme']}"}) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        _wait_sessions(stack, all, "the session never showed up in the servers' records")
    _wait_sessions(stack, lambda sessions: not any(sessions),
                   "the servers still hold the disconnected session's cache")


def test_uncovered_model_is_503_naming_blocks(tiny_models, tmp_path):
    path = tiny_models["llama"]
    servers = start_swarm(path, ["0:2"], extra_args=FAST_ANNOUNCE, log_dir=tmp_path)
    gateway = None
    try:
        gateway, base = start_gateway(path, servers[0].addrs, tmp_path, "--api-key", "sk-static")
        wait_covered(base, "sk-static", timeout=3)
        client = openai.OpenAI(base_url=base + "/v1", api_key="sk-static", max_retries=0)
        with pytest.raises(openai.APIStatusError) as unavailable:
            client.chat.completions.create(model=path.name, messages=MESSAGES, max_tokens=2)
        assert unavailable.value.status_code == 503
        assert "2-3" in unavailable.value.message
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        stop_all(servers)


def test_prometheus_metrics(client, stack):
    client.chat.completions.create(model=stack["model"], messages=MESSAGES, max_tokens=3)
    text = httpx.get(stack["base"] + "/metrics").text
    assert f'swarmgate_swarm_coverage_ratio{{model="{stack["model"]}"}} 1.0' in text
    assert 'swarmgate_requests_total{method="POST",path="/v1/chat/completions",status="200"}' in text
    assert f'swarmgate_time_to_first_token_seconds_count{{model="{stack["model"]}"}}' in text
    assert "swarmgate_replays_total" in text
