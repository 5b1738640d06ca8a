"""Continuous batching and prefix caching through the real path: concurrent streams through a
`swarmgate gateway` and two server processes give each exactly what it gives alone, and the
servers did batch them; a prompt sharing an earlier one's start reuses it and stays exact.

Codec none, float32, the tiny Llama. Requests differ in prompt length, `n`, sampling (greedy,
and seeded sampling with penalties) and stop strings; each is first sent alone, then all at once
(twice, so sessions join and leave batches at different steps), each request twice over. The
servers' Prometheus histogram `swarmgate_server_batch_rows` must show forwards of more than 4
rows, which a CPU computes with oneDNN's packed weights (blocks/packed_linears.py). The servers
compute prompts in chunks of 16 tokens (`--prefill-chunk`), so prompts interleave with decode steps.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from gateway.storage.tenants import KeyStore
from swarmgate.launcher import start_swarm, stop_all
from tests.support import free_port
from tests.swarm_harness import FAST_ANNOUNCE, start_gateway, wait_covered

pytestmark = pytest.mark.e2e

REQUESTS = [
    dict(prompt="Hello", max_tokens=12, temperature=0),
    dict(prompt="The quick brown fox jumps over the lazy dog and then it", max_tokens=16, temperature=0),
    dict(prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=7, n=2),
    dict(prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15", max_tokens=14, temperature=0,
         frequency_penalty=0.5),
    dict(prompt="A", max_tokens=8, temperature=1.0, seed=3, top_p=0.9),
    dict(prompt="To be or not to be, that is", max_tokens=12, temperature=0, stop=["e"]),
]


@pytest.fixture(scope="module")
def stack(tiny_models, tmp_path_factory):
    path = tiny_models["llama"]
    data_dir = tmp_path_factory.mktemp("batching")
    key = KeyStore(data_dir).create_key("acme")
    ports = [free_port(), free_port()]
    chunks = ["--prefill-chunk", "16"]  # prompts are computed in chunks, after the prefix cache's blocks too
    servers = [*start_swarm(path, ["0:2"], extra_args=[*FAST_ANNOUNCE, *chunks, "--metrics-port", str(ports[0])],
                            log_dir=data_dir, log_prefix="first")]
    gateway = None
    try:
        servers += start_swarm(path, ["2:4"], extra_args=[*FAST_ANNOUNCE, *chunks, "--metrics-port", str(ports[1])],
                               log_dir=data_dir, initial_peers=servers[0].addrs, log_prefix="second")
        # no spot checks (as in `swarmgate up`): with them, prompts go whole, as every position is compared
        gateway, base = start_gateway(path, servers[0].addrs, data_dir, "--max-concurrent-requests", "32",
                                      "--wire-codec", "none", "--verify-fraction", "0")
        wait_covered(base, key)
        yield {"base": base, "key": key, "model": path.name, "metrics": ports, "path": path, "data_dir": data_dir,
               "peers": servers[0].addrs}
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        stop_all(servers)


def _batched_forwards(port: int) -> dict[str, float]:
    """Cumulative bucket counts of swarmgate_server_batch_rows, by upper bound."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.split('le="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("swarmgate_server_batch_rows_bucket")}


def _streams_reused(port: int) -> dict[str, float]:
    """swarmgate_server_streams_reused_total by protocol."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "swarmgate_server_streams_reused")
    return {s.labels["protocol"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_requests_through_the_gateway_reuse_the_streams_of_earlier_ones(stack):
    """Sessions end with a ``close`` and leave their streams to the next (swarm/transport/stream_pool.py):
    through the gateway, each new request's session is served on streams an earlier one used, on
    both servers, and the first server pushes on a stream an earlier session left; answers unchanged."""
    client = openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=stack["key"], max_retries=0)
    before = [_streams_reused(port) for port in stack["metrics"]]
    texts = [client.completions.create(model=stack["model"], prompt="Hello there", max_tokens=6,
                                       temperature=0).choices[0].text for _ in range(3)]
    after = [_streams_reused(port) for port in stack["metrics"]]
    assert texts[0] == texts[1] == texts[2]
    assert all(a.get("inference", 0) - b.get("inference", 0) >= 2 for a, b in zip(after, before))
    assert after[0].get("push", 0) - before[0].get("push", 0) >= 2


def test_concurrent_streams_equal_their_solo_runs_and_were_batched(stack):
    client = openai.AsyncOpenAI(base_url=f"{stack['base']}/v1", api_key=stack["key"], max_retries=0, timeout=300)

    async def one(request: dict) -> list[tuple[str, str]]:
        completion = await client.completions.create(model=stack["model"], **request)
        return [(choice.text, choice.finish_reason) for choice in completion.choices]

    async def run() -> tuple[list, list]:
        alone = [await one(request) for request in REQUESTS]
        together = [await asyncio.gather(*(one(request) for request in REQUESTS * 2)) for _ in range(2)]
        return alone, together

    before = [_batched_forwards(port) for port in stack["metrics"]]
    head_before = _gateway_metrics(stack["base"])
    alone, together = asyncio.run(run())
    for round_ in together:
        assert round_ == alone * 2
    after = [_batched_forwards(port) for port in stack["metrics"]]
    head = {name: value - head_before[name] for name, value in _gateway_metrics(stack["base"]).items()}
    # the gateway's LM head served several generations per round, and nothing is left in flight
    assert head["swarmgate_head_calls_total"] > head["swarmgate_head_rounds_total"] > 0, head
    assert _gateway_metrics(stack["base"])["swarmgate_active_generations"] == 0
    for port_before, port_after in zip(before, after):
        multi_row = (port_after["+Inf"] - port_after["1.0"]) - (port_before["+Inf"] - port_before["1.0"])
        assert multi_row > 0, f"no forward of more than one row: {port_after}"
        packed = (port_after["+Inf"] - port_after["4.0"]) - (port_before["+Inf"] - port_before["4.0"])
        assert packed > 0, f"no forward of more than 4 rows (oneDNN's packed weights): {port_after}"
    print(f"\nbatched forwards (more than one row) per server: "
          f"{[a['+Inf'] - a['1.0'] for a in after]} of {[a['+Inf'] for a in after]}")


def _gateway_metrics(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(("swarmgate_head_", "swarmgate_active_generations"))}


def test_a_prompt_sharing_an_earlier_ones_start_reuses_it_exactly(stack, tiny_models):
    """Token-id prompts of 150 tokens, the second sharing the first's 130: each server serves the
    second's first 128 tokens (its whole blocks within the shared start) from its prefix cache,
    named by their keys rather than sent, and the greedy tokens equal transformers' on the whole prompt."""
    from tests.swarm_harness import reference_model

    client = openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=stack["key"], max_retries=0, timeout=120)
    generator = torch.Generator().manual_seed(5)
    first = torch.randint(10, 500, (150,), generator=generator).tolist()
    second = first[:130] + torch.randint(10, 500, (20,), generator=generator).tolist()
    hits_before = [_prefix_tokens(port).get("hit", 0.0) for port in stack["metrics"]]
    named_before = [_prefix_tokens(port, "named") for port in stack["metrics"]]
    model, tokenizer = reference_model(tiny_models["llama"]), AutoTokenizer.from_pretrained(tiny_models["llama"])
    for prompt in (first, second):
        completion = client.completions.create(model=stack["model"], prompt=prompt, max_tokens=8, temperature=0)
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        assert completion.choices[0].text == tokenizer.decode(expected[0, len(prompt):], skip_special_tokens=True)
    hits = [_prefix_tokens(port)["hit"] - before for port, before in zip(stack["metrics"], hits_before)]
    assert hits == [128, 128], hits
    # and named them by their keys: the gateway to the first server, the first to the second
    named = [_prefix_tokens(port, "named") - before for port, before in zip(stack["metrics"], named_before)]
    assert named == [128, 128], named


def test_prompts_share_cached_starts_only_under_the_same_cache_salt(stack):
    """vLLM's `cache_salt`: a prompt repeated under another salt, or none, reuses nothing of it
    (so a tenant cannot learn by timing what another's prompts began with); under the same salt
    each server serves its whole blocks from the cache. The answers are the same throughout."""
    client = openai.OpenAI(base_url=f"{stack['base']}/v1", api_key=stack["key"], max_retries=0, timeout=120)
    prompt = torch.randint(10, 500, (150,), generator=torch.Generator().manual_seed(11)).tolist()
    texts, hits = [], []
    for salt in ("alice", "bob", "alice", None):
        before = [_prefix_tokens(port).get("hit", 0.0) for port in stack["metrics"]]
        completion = client.completions.create(model=stack["model"], prompt=prompt, max_tokens=4, temperature=0,
                                               extra_body={"cache_salt": salt} if salt else None)
        texts.append(completion.choices[0].text)
        hits.append([_prefix_tokens(port).get("hit", 0.0) - b for port, b in zip(stack["metrics"], before)])
    whole_blocks = (len(prompt) - 1) // 16 * 16  # a prompt's last token is always computed
    assert hits == [[0, 0], [0, 0], [whole_blocks] * 2, [0, 0]], hits
    assert len(set(texts)) == 1
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=stack["model"], prompt="Hi", max_tokens=1, extra_body={"cache_salt": ""})


def test_tenants_share_cached_starts_only_with_themselves_unless_the_gateway_lets_them(stack):
    """As OpenAI's prompt caching (never shared between organizations): the same prompt from two
    tenants reuses only what the same tenant computed before, in completions and embeddings alike.
    A gateway started with `--share-prefix-cache` lets the second tenant reuse the first's."""
    other = KeyStore(stack["data_dir"]).create_key("globex")
    prompt = torch.randint(10, 500, (150,), generator=torch.Generator().manual_seed(12)).tolist()
    embedded = torch.randint(10, 500, (100,), generator=torch.Generator().manual_seed(13)).tolist()
    whole_blocks = (len(prompt) - 1) // 16 * 16

    def hits(base: str, key: str, embeddings: bool = False) -> list[float]:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
        before = [_prefix_tokens(port).get("hit", 0.0) for port in stack["metrics"]]
        if embeddings:
            client.embeddings.create(model=stack["model"], input=[embedded])
        else:
            client.completions.create(model=stack["model"], prompt=prompt, max_tokens=2, temperature=0)
        return [_prefix_tokens(port).get("hit", 0.0) - b for port, b in zip(stack["metrics"], before)]

    assert [hits(stack["base"], key) for key in (stack["key"], other, stack["key"], other)] == \
        [[0, 0], [0, 0], [whole_blocks] * 2, [whole_blocks] * 2]
    assert [hits(stack["base"], key, embeddings=True) for key in (stack["key"], other, stack["key"])] == \
        [[0, 0], [0, 0], [96, 96]]
    sharing, base = start_gateway(stack["path"], stack["peers"], stack["data_dir"], "--wire-codec", "none",
                                  "--verify-fraction", "0", "--share-prefix-cache")
    try:
        wait_covered(base, other)  # unsalted now: nothing of the prompt is cached that way yet
        assert [hits(base, key) for key in (stack["key"], other)] == [[0, 0], [whole_blocks] * 2]
    finally:
        sharing.terminate()
        sharing.wait(30)


def _prefix_tokens(port: int, kind: str = "cache") -> Any:
    """Prefix cache tokens by result ("hit", "miss"); with kind "named", the tokens steps named."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    if kind == "named":
        return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                    if line.startswith("swarmgate_server_prefix_named_tokens_total"))
    return {line.split('result="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("swarmgate_server_prefix_cache_tokens_total")}


def test_requests_without_max_tokens_share_a_small_cache(tiny_models, tmp_path):
    """A request without `max_tokens` may run to the end of the context (2,048 tokens here), but a
    server reserves cache as a session grows: six such streams open at once on a server of 4,096
    cache tokens (reserving the whole context, two did: the others were refused)."""
    path, data_dir = tiny_models["llama"], tmp_path
    key = KeyStore(data_dir).create_key("acme")
    servers = start_swarm(path, ["0:4"], extra_args=[*FAST_ANNOUNCE, "--max-cache-tokens", "4096"], log_dir=data_dir)
    gateway = None
    try:
        gateway, base = start_gateway(path, servers[0].addrs, data_dir, "--verify-fraction", "0")
        wait_covered(base, key)
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)

        async def first_chunks(index: int, started: asyncio.Event, held: list[int]) -> int:
            stream = await client.chat.completions.create(  # chat: no max_tokens is no limit (completions': 16)
                model=path.name, messages=[{"role": "user", "content": f"{index}: once upon a time"}], temperature=0,
                stream=True, extra_body={"ignore_eos": True})
            chunks = 0
            async for _ in stream:
                chunks += 1
                if chunks == 3:
                    held.append(index)
                    if len(held) == 6:
                        started.set()
                    await started.wait()  # every stream holds its session until all six have theirs
                    break
            await stream.close()
            return chunks

        async def run() -> list[int]:
            started, held = asyncio.Event(), []
            return await asyncio.wait_for(asyncio.gather(*(first_chunks(i, started, held) for i in range(6))), 120)

        assert asyncio.run(run()) == [3] * 6
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        stop_all(servers)
