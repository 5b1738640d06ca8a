"""Several base models in one swarm and one gateway.

Fast: the registry's least-recently-used heads (one load per model however many wait for it),
`/v1/models` with the swarm's other models and a checkpoint mismatch, and the CLI's repeated
`--model`. e2e: two tiny checkpoints of different configs served by real server processes in one
swarm (plus a third model the gateway has no folder of), one `swarmgate gateway` with both
`--model`s and `--max-loaded-models 1`, and the openai SDK: `/v1/models` lists them, and
interleaved concurrent requests to both give each model's own greedy tokens (transformers').
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from blocks.tiny_checkpoints import build_checkpoint
from gateway.models import LocalModel, ModelNotServable, ModelRegistry, ServedModel
from gateway.protocol.errors import ModelNotFound
from gateway.storage.tenants import KeyStore
from swarmgate import cli
from swarmgate.launcher import start_swarm, stop_all
from tests.support import wait_until
from tests.swarm_harness import FAST_ANNOUNCE, reference_model, start_gateway, wait_covered

# Two base models of different shapes (family, depth, width, tied embeddings) and a third that only
# the swarm serves.
MODELS = {
    "tiny-llama": dict(family="llama", num_layers=4, hidden_size=64, num_kv_heads=2, seed=11),
    "tiny-qwen": dict(family="qwen2", num_layers=3, hidden_size=96, intermediate_size=192, num_heads=4,
                      num_kv_heads=4, tie_word_embeddings=True, seed=12),
    "tiny-other": dict(family="llama", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, seed=13),
}
SPANS = {"tiny-llama": ["0:2", "2:4"], "tiny-qwen": ["0:1", "1:3"], "tiny-other": ["0:2"]}
PROMPTS = ["The quick brown fox", "Once upon a time there was", "Networks of computers share"]
MAX_TOKENS = 12


# --- fast: the registry ------------------------------------------------------------------------------


class _FakeModel:
    def __init__(self, model_id: str):
        self.id = model_id


def _registry(tmp_path: Path, ids: list[str], *, max_loaded: int, swarm: dict | None = None,
              delay: float = 0.0) -> tuple[ModelRegistry, list[str]]:
    loads: list[str] = []

    def loader(model: LocalModel) -> ServedModel:
        loads.append(model.id)
        time.sleep(delay)
        return _FakeModel(model.id)  # type: ignore[return-value]

    local = {i: LocalModel(i, tmp_path / i, 128, f"hash-{i}", 1) for i in ids}
    return ModelRegistry(local, loader, max_loaded=max_loaded, swarm_models=lambda: swarm or {}), loads


def test_heads_load_on_first_use_and_the_least_recently_used_goes(tmp_path):
    registry, loads = _registry(tmp_path, ["a", "b", "c"], max_loaded=2)
    assert registry.loaded() == [] and loads == []
    assert registry.get("a").id == "a" and registry.get("b").id == "b"
    registry.get("a")  # a is now the most recently used
    assert loads == ["a", "b"] and registry.loaded() == ["b", "a"]
    registry.get("c")  # evicts b
    assert registry.loaded() == ["a", "c"] and loads == ["a", "b", "c"]
    assert asyncio.run(registry.resolve("b", "acme")).id == "b"  # loaded again, in a worker thread
    assert loads == ["a", "b", "c", "b"] and registry.loaded() == ["c", "b"]
    with pytest.raises(ModelNotFound):
        registry.get("nope")


def test_concurrent_first_uses_load_once(tmp_path):
    registry, loads = _registry(tmp_path, ["a", "b"], max_loaded=2, delay=0.2)
    results: list[str] = []
    threads = [threading.Thread(target=lambda m=m: results.append(registry.get(m).id)) for m in "abab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == ["a", "a", "b", "b"] and sorted(loads) == ["a", "b"]


def test_listing_names_the_swarms_models_and_why_some_are_not_servable(tmp_path):
    swarm = {
        "a": {"num_blocks": 4, "missing_blocks": [], "checkpoints": ["hash-a"], "servers": [{}, {}]},
        "b": {"num_blocks": 2, "missing_blocks": [1], "checkpoints": ["other"], "servers": [{}]},
        "elsewhere": {"num_blocks": 3, "missing_blocks": [], "checkpoints": ["x"], "servers": [{}]},
    }
    registry, loads = _registry(tmp_path, ["a", "b", "c"], max_loaded=1, swarm=swarm)
    cards = {card.id: card for card in registry.cards("acme")}
    assert list(cards) == ["a", "b", "c", "elsewhere"] and loads == []  # listing loads nothing
    assert cards["a"].servable and cards["a"].coverage.complete and cards["a"].coverage.servers == 2
    assert cards["a"].context_length == 128
    assert not cards["b"].servable and "announce checkpoint other" in cards["b"].note
    assert cards["b"].coverage.missing_blocks == (1,)
    assert cards["c"].servable and cards["c"].coverage is None  # no server announces it yet
    assert not cards["elsewhere"].servable and "--model" in cards["elsewhere"].note
    assert cards["elsewhere"].context_length is None
    with pytest.raises(ModelNotServable, match="no checkpoint folder"):
        asyncio.run(registry.resolve("elsewhere", "acme"))


# --- fast: the CLI -----------------------------------------------------------------------------------


def test_model_flag_repeats_and_its_env_twin_is_a_list(monkeypatch):
    parser = cli.build_parser()
    args = parser.parse_args(["gateway", "--model", "a", "--model", "b", "--max-loaded-models", "3"])
    assert args.model == ["a", "b"] and args.max_loaded_models == 3
    assert parser.parse_args(["up"]).model is None and parser.parse_args(["up"]).max_loaded_models == 4
    assert parser.parse_args(["up", "--model", "x", "--model", "y"]).model == ["x", "y"]
    monkeypatch.setenv("SWARMGATE_MODEL", "/m/one /m/two")
    parser = cli.build_parser()
    assert parser.parse_args(["gateway"]).model == ["/m/one", "/m/two"]
    assert parser.parse_args(["gateway", "--model", "z"]).model == ["z"]  # flags replace the env's list
    assert parser.parse_args(["up"]).model == ["/m/one", "/m/two"]


def test_gateway_models_from_flags(tmp_path):
    from swarmgate.commands.gateway import served_models

    a = build_checkpoint(tmp_path / "m-a", **MODELS["tiny-other"])
    b = build_checkpoint(tmp_path / "m-b", **MODELS["tiny-other"] | {"seed": 2})
    assert served_models([str(a), str(b)]) == {"m-a": a, "m-b": b}
    assert served_models([str(a)], "renamed") == {"renamed": a}
    with pytest.raises(SystemExit, match="single --model"):
        served_models([str(a), str(b)], "renamed")
    with pytest.raises(SystemExit, match="both named"):
        served_models([str(a), str(a)])


# --- e2e: a two-model swarm ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_model_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-models")
    paths = {name: build_checkpoint(root / name, **kwargs) for name, kwargs in MODELS.items()}
    data_dir = tmp_path_factory.mktemp("multi-gateway")
    key = KeyStore(data_dir).create_key("acme")
    servers: list = []
    gateway = None
    try:
        for index, name in enumerate(MODELS):
            servers += start_swarm(paths[name], SPANS[name], extra_args=FAST_ANNOUNCE, log_dir=data_dir,
                                   initial_peers=servers[0].addrs if servers else (), log_prefix=name)
        gateway, base = start_gateway(
            paths["tiny-llama"], servers[0].addrs, data_dir, "--model", str(paths["tiny-qwen"]),
            "--wire-codec", "none", "--max-loaded-models", "1",
        )
        view = wait_covered(base, key)
        assert [m["id"] for m in view["models"]] == ["tiny-llama", "tiny-qwen"]
        assert all(m["complete"] for m in view["models"]), view["models"]
        wait_until(lambda: "tiny-other" in httpx.get(f"{base}/v1/swarm", headers={"Authorization": f"Bearer {key}"})
                   .json()["swarm"]["models"], 60, message="the third model's server never showed up")
        yield {"paths": paths, "base": base, "key": key}
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        stop_all(servers)


def _local_greedy(path: Path, prompt: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    output = reference_model(path).generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.e2e
def test_models_lists_both_models_and_the_swarms_third(two_model_stack):
    client = openai.OpenAI(base_url=two_model_stack["base"] + "/v1", api_key=two_model_stack["key"], max_retries=0)
    listed = {m.id: m for m in client.models.list().data}
    assert list(listed) == ["tiny-llama", "tiny-qwen", "tiny-other"]
    for name in ("tiny-llama", "tiny-qwen"):
        model = listed[name]
        assert model.servable and model.coverage["complete"] and model.coverage["servers"] == 2
        assert model.coverage["num_blocks"] == MODELS[name]["num_layers"] and model.max_model_len == 2048
        assert client.models.retrieve(name).id == name
    other = listed["tiny-other"]
    assert not other.servable and "no checkpoint folder" in other.note and other.coverage["complete"]
    with pytest.raises(openai.NotFoundError) as error:
        client.completions.create(model="tiny-other", prompt="Hello", max_tokens=2)
    assert error.value.code == "model_not_servable" and "--model" in error.value.message


@pytest.mark.e2e
def test_interleaved_concurrent_requests_get_each_models_own_tokens(two_model_stack):
    """Requests to both models at once (with one head in memory at a time: each load evicts the other)
    answer each model's own greedy tokens."""
    paths = two_model_stack["paths"]
    expected = {(name, prompt): _local_greedy(paths[name], prompt) for name in ("tiny-llama", "tiny-qwen")
                for prompt in PROMPTS}
    assert all(expected.values()) and all(expected["tiny-llama", p] != expected["tiny-qwen", p] for p in PROMPTS)

    async def run() -> dict:
        client = openai.AsyncOpenAI(base_url=two_model_stack["base"] + "/v1", api_key=two_model_stack["key"],
                                    max_retries=0)

        async def complete(name: str, prompt: str, stream: bool) -> str:
            if not stream:
                reply = await client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                                        temperature=0)
                return reply.choices[0].text
            chunks = await client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                                     temperature=0, stream=True)
            return "".join([chunk.choices[0].text async for chunk in chunks if chunk.choices])

        keys = [(name, prompt) for prompt in PROMPTS for name in ("tiny-llama", "tiny-qwen")]  # interleaved
        texts = await asyncio.gather(*(complete(name, prompt, i % 3 == 2) for i, (name, prompt) in enumerate(keys)))
        return dict(zip(keys, texts))

    for _ in range(2):  # twice: the second round finds the heads evicted and loaded again in turn
        assert asyncio.run(run()) == expected

    client = openai.OpenAI(base_url=two_model_stack["base"] + "/v1", api_key=two_model_stack["key"], max_retries=0)
    for name in ("tiny-llama", "tiny-qwen"):  # chat too, through each model's own template
        tokenizer = AutoTokenizer.from_pretrained(paths[name])
        messages = [{"role": "user", "content": "Hello! How are you today?"}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        output = reference_model(paths[name]).generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        reply = client.chat.completions.create(model=name, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].message.content == tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
