"""Speculative decoding across the swarm: drafts, rollback, exactness, and replay after truncation.

Unit level: prompt-lookup drafts; caches rolled back mid-sequence (DynamicCache with and without
sliding windows, the static cache) continue exactly as an uninterrupted pass; the gateway's loop
with speculation gives plain decoding's tokens for every sampling feature; and, on a bigram model
whose distribution is known in closed form, speculative sampling's acceptance rule and output
distribution are checked statistically. End to end (real server processes, a real gateway, the
openai SDK): greedy output with speculation equals plain decoding through the same servers and
transformers' ``generate``, where drafts hit and where they miss; and a session truncated and then
hit by a SIGKILLed server replays into the same tokens.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from blocks.cache import SessionCaches, StaticKV
from blocks.head import ModelHead
from blocks.span import BlockSpan
from gateway.agents.guided import grammar_library, json_object
from gateway.inference.generation import Generation, GenerationJob, Guide
from gateway.inference.sampling import SamplingParams
from gateway.inference.speculative import ngram_draft
from gateway.inference.tokens import TokenPieces
from gateway.models import ServedModel
from gateway.storage.tenants import KeyStore
from swarm.session import InferenceSession
from tests.support import LocalBackend
from tests.swarm_harness import reference_model, running_swarm, start_gateway, swarm_greedy, wait_covered

SPECULATIVE = 4


# --- drafting -------------------------------------------------------------------------------------


def test_prompt_lookup_drafts():
    assert ngram_draft([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]  # what followed the earlier "1 2"
    assert ngram_draft([7, 1, 2, 9, 5, 1, 2, 8, 1, 2], 2) == [8, 1]  # the latest match wins
    assert ngram_draft([5, 6, 7, 0, 6, 7, 1, 5, 6, 7], 2) == [0, 6]  # the longest suffix wins ("5 6 7")
    assert ngram_draft([4, 9, 9, 9], 5) == [9, 9, 9, 9, 9]  # a loop continues into the draft itself
    assert ngram_draft([1, 2, 3, 4, 5], 4) == []  # nothing repeats
    assert ngram_draft([1, 2, 1, 2], 0) == [] and ngram_draft([3], 4) == []


# --- rolling caches back --------------------------------------------------------------------------


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("kind", ["dynamic", "sliding", "static", pytest.param("cuda", marks=GPU),
                                  pytest.param("cuda-sliding", marks=GPU)])
def test_rolled_back_cache_continues_exactly(tiny_models, kind):
    """Verification-like steps (1 + 4 tokens, a random number of them right) with the wrong tail
    rolled back, between one-token steps, give at every kept position what one uninterrupted pass
    gives: DynamicCache (the sliding-window model, window 48, rolled back across its window), the
    static cache on the CPU (eager), and on a GPU (its one-token steps replay CUDA graphs)."""
    device = "cuda" if kind.startswith("cuda") else "cpu"
    span = BlockSpan(tiny_models["mistral" if kind.endswith("sliding") else "llama"], 0, 4, device=device)
    cache = span.new_cache() if kind != "static" else StaticKV(
        start=0, num_layers=4, kv_heads=span.family.kv_heads(span.config), head_dim=span.family.head_dim(span.config),
        dtype=span.dtype, device=span.device)
    assert isinstance(cache, StaticKV) == (kind != "dynamic" and kind != "sliding")
    session = SessionCaches(max_sessions=1, max_tokens=256, idle_timeout=60).open("s", batch=1, max_length=128,
                                                                                  cache=cache)
    generator = torch.Generator().manual_seed(0)
    sequence = torch.randn(1, 100, span.hidden_size, generator=generator).to(device)
    expected = span.forward(sequence)

    session.advance(40)
    outputs = [span.forward(sequence[:, :40], cache=cache, position=0)]
    truncations = 0
    while session.position < 100:
        position = session.position
        if len(outputs) % 3 == 0:  # a plain one-token step
            session.advance(1)
            outputs.append(span.forward(sequence[:, position:position + 1], cache=cache, position=position))
            continue
        right = min(int(torch.randint(0, 5, (1,), generator=generator)), 99 - position)
        wrong = torch.randn(1, 4 - right, span.hidden_size, generator=generator).to(device)
        fed = torch.cat([sequence[:, position:position + 1 + right], wrong], dim=1)
        session.advance(fed.shape[1])
        outputs.append(span.forward(fed, cache=cache, position=position)[:, :1 + right])
        truncations += 1
        session.truncate(position + 1 + right, truncations)
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, atol=1e-4 if device == "cuda" else 1e-5,
                               rtol=1e-4 if device == "cuda" else 1e-5)
    assert device == "cpu" or span._gpu.captures > 0  # the one-token steps were graph replays
    with pytest.raises(ValueError):
        session.truncate(session.position + 1, truncations + 1)  # nothing to keep there


# --- the gateway's loop: speculation changes nothing but the number of steps ------------------------


async def _generate(job: GenerationJob, backend: Any, speculative_tokens: int) -> tuple[list[Any], Generation]:
    generation = Generation(job, backend, speculative_tokens=speculative_tokens)
    await generation.open()
    try:
        return await generation.collect(), generation
    finally:
        await generation.close()


def _run(job: GenerationJob, backend: Any, speculative_tokens: int) -> tuple[list[Any], Generation]:
    return asyncio.run(_generate(job, backend, speculative_tokens))


@pytest.fixture(scope="module")
def local(tiny_models) -> tuple[ServedModel, LocalBackend]:
    path = tiny_models["llama"]
    head = ModelHead(path)
    return ServedModel.load("tiny", path, lambda _: head), LocalBackend(path, "tiny")


CASES = {
    "greedy": (1, SamplingParams(temperature=0), []),
    "seeded": (1, SamplingParams(temperature=0.7, top_p=0.9, seed=7), []),
    "processed": (1, SamplingParams(temperature=0.9, top_k=40, min_p=0.01, presence_penalty=0.4,
                                    frequency_penalty=0.3, repetition_penalty=1.2, logit_bias={168: 2.0},
                                    min_tokens=12, seed=3, logprobs=3), []),
    "stop": (1, SamplingParams(temperature=0, logprobs=0), ["an"]),
    "n=2": (2, SamplingParams(temperature=0.8, seed=11), []),
    "guided": (1, SamplingParams(temperature=0.8, seed=5), []),
}


@pytest.mark.parametrize("case", CASES)
def test_speculation_gives_plain_decodings_tokens(local, case):
    """Same tokens, text, finish reasons and (to float32 rounding) logprobs as plain decoding, for
    greedy, seeded sampling, penalties/bias/min_tokens, stop strings, `n` > 1 and a grammar; on a
    prompt where drafts hit, so steps are saved."""
    model, backend = local
    n, params, stops = CASES[case]
    prompt = model.tokenizer("Hello! How are you today? Hello! How are")["input_ids"]
    guide = None
    if case == "guided":
        library = grammar_library(model.tokenizer, vocab_size=model.head.vocab_size, stop_token_ids=model.eos_token_ids)
        guide = Guide(library, json_object())
    job = GenerationJob(model=model, prompt_ids=prompt, n=n, max_tokens=40, params=params, stops=stops, guide=guide)
    plain, plain_run = _run(job, backend, 0)
    plain_steps = backend.sessions[-1].steps
    speculative, speculative_run = _run(job, backend, SPECULATIVE)
    for got, want in zip(speculative, plain):
        assert [t.token_id for t in got.tokens] == [t.token_id for t in want.tokens]
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
        for a, b in zip(got.tokens, want.tokens):
            assert [i for i, _ in a.top] == [i for i, _ in b.top]
            if a.logprob is not None:
                assert abs(a.logprob - b.logprob) < 1e-4
    assert speculative_run.usage() == plain_run.usage()
    assert plain_run.drafted == 0 and speculative_run.drafted >= speculative_run.accepted
    if case == "greedy":  # the tiny model loops: drafts hit
        assert speculative_run.accepted > 0 and backend.sessions[-1].steps < plain_steps


# --- speculative sampling is exact ----------------------------------------------------------------

A, B, C = 40, 41, 42  # the bigram model's alphabet
NEXT = {A: (0.2, 0.5, 0.3), B: (0.1, 0.3, 0.6), C: (0.5, 0.25, 0.25)}  # p(next | token) over A, B, C


class _BigramHead:
    """A model whose hidden state is its token, one-hot, and whose logits are log NEXT[token]."""

    device = torch.device("cpu")

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.table = torch.full((vocab_size, vocab_size), float("-inf"))
        for token, probs in NEXT.items():
            self.table[token, [A, B, C]] = torch.tensor(probs).log()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids, self.vocab_size).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.table[hidden.argmax(dim=-1)]


class _EchoSession:
    """A swarm of no blocks: the output is the input."""

    position = 0

    async def step(self, hidden: torch.Tensor, tail: int | None = None) -> torch.Tensor:
        self.position += hidden.shape[1]
        return hidden if tail is None else hidden[:, -tail:]

    async def truncate(self, position: int) -> None:
        assert position < self.position
        self.position = position

    async def close(self) -> None:
        pass


class _EchoBackend:
    async def open_session(self, model: str, **kwargs: Any) -> _EchoSession:
        return _EchoSession()


def test_speculative_sampling_matches_the_model_distribution(tiny_models):
    """Prompt "A B C A B" drafts "C A" after "A B": the first draft must be kept with probability
    p(C | B) = 0.6 and a rejection must emit p(. | B) without C, normalised (A 0.25, B 0.75), each
    within about 4 standard deviations; the three emitted tokens must follow the chain's
    distribution (chi-square, 26 degrees of freedom, at the 1e-4 level); and with a given seed,
    speculation emits plain sampling's very tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    head = _BigramHead(len(tokenizer))
    model = ServedModel(id="bigram", head=head, tokenizer=tokenizer, pieces=TokenPieces(tokenizer), context_length=64,
                        eos_token_ids=frozenset({tokenizer.eos_token_id}), created=0)
    backend, runs = _EchoBackend(), 1500

    async def sample(seeds: range, speculative_tokens: int) -> list[tuple[int, ...]]:
        outcomes = []
        for seed in seeds:  # one event loop for all: a loop (and its worker threads) per run costs more than it
            job = GenerationJob(model=model, prompt_ids=[A, B, C, A, B], n=1, max_tokens=3,
                                params=SamplingParams(temperature=1.0, seed=seed))
            (result,), generation = await _generate(job, backend, speculative_tokens)
            assert generation.drafted >= 2 or speculative_tokens == 0
            outcomes.append(tuple(token.token_id for token in result.tokens))
        return outcomes

    outcomes = Counter(asyncio.run(sample(range(runs), SPECULATIVE)))
    first = Counter(tokens[0] for tokens in outcomes.elements())
    assert abs(first[C] / runs - 0.6) < 0.05  # the draft C kept with probability p(C | B)
    rejected = first[A] + first[B]
    assert abs(first[A] / rejected - 0.25) < 0.07  # the residual: p(. | B) without C, normalised
    chi_square = 0.0
    for t1 in (A, B, C):
        for t2 in (A, B, C):
            for t3 in (A, B, C):
                expected = runs * NEXT[B][t1 - A] * NEXT[t1][t2 - A] * NEXT[t2][t3 - A]
                chi_square += (outcomes[(t1, t2, t3)] - expected) ** 2 / expected
    assert chi_square < 62.0, (chi_square, outcomes)  # the chi-square(26) 0.9999 quantile is ~61.9
    assert asyncio.run(sample(range(100), SPECULATIVE)) == asyncio.run(sample(range(100), 0))


# --- end to end -----------------------------------------------------------------------------------

HIT = "Hello! How are you today?"  # the tiny Llama's greedy output loops: drafts hit
MISS = "rock red blue moon rock red blue"  # drafts "moon rock ..." from the prompt; the model says otherwise


@pytest.fixture(scope="module")
def swarm(llama_path, tmp_path_factory):
    """Two servers for each half of the tiny Llama (so one of each can die) and a client bridge."""
    log_dir = tmp_path_factory.mktemp("speculative")
    with running_swarm(llama_path, ["0:2", "2:4", "0:2", "2:4"], log_dir=log_dir) as (servers, bridge):
        yield llama_path, servers, bridge, log_dir


@pytest.fixture(scope="module")
def gateway(swarm):
    path, servers, _, data_dir = swarm
    key = KeyStore(data_dir).create_key("acme")
    process, base = start_gateway(path, servers[0].addrs, data_dir, "--wire-codec", "none",
                                  "--speculative-tokens", str(SPECULATIVE))
    try:
        wait_covered(base, key)
        yield base, key
    finally:
        process.terminate()
        process.wait(30)


def _counter(metrics: str, name: str) -> float:
    return sum(float(value) for value in re.findall(rf"^{name}_total{{[^}}]*}} (\S+)$", metrics, re.M))


@pytest.mark.e2e
@pytest.mark.parametrize("prompt, hits", [(HIT, True), (MISS, False)])
def test_gateway_speculation_equals_plain_and_generate(swarm, gateway, prompt, hits):
    path, _, bridge, _ = swarm
    base, key = gateway
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    tokens = 24 if hits else 8
    expected = reference_model(path).generate(prompt_ids, max_new_tokens=tokens, do_sample=False,
                                              min_new_tokens=tokens)[0, prompt_ids.shape[1]:].tolist()
    (plain,), _ = swarm_greedy(bridge, ModelHead(path), path.name, prompt_ids, tokens, wire_codec="none")
    assert plain == expected
    before = httpx.get(f"{base}/metrics").text
    reply = client.completions.create(model=path.name, prompt=prompt, max_tokens=tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
    after = httpx.get(f"{base}/metrics").text
    assert reply.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    drafted, accepted = (_counter(after, f"swarmgate_speculative_{name}_tokens")
                         - _counter(before, f"swarmgate_speculative_{name}_tokens") for name in ("drafted", "accepted"))
    assert drafted > 0
    assert accepted >= tokens // 3 if hits else accepted == 0, (drafted, accepted)


def _speculate(bridge, head: ModelHead, model: str, prompt: torch.Tensor, reference: list[int], *,
               wire_codec: str, kill=None) -> tuple[list[int], int]:
    """Greedy speculative decoding at the client: drafts are the reference's next three tokens with
    the third made wrong, so every full round truncates one position (the split step's records);
    `kill(round, session)` runs before each round. Returns the tokens and the truncations."""

    async def run() -> tuple[list[int], int]:
        session = await bridge.client.open_session(model, head.num_layers, max_length=prompt.shape[1] + len(reference),
                                                   wire_codec=wire_codec)
        async with session:
            tokens: list[int] = []
            pending, rounds, truncations = prompt, 0, 0
            while len(tokens) < len(reference):
                drafts = reference[len(tokens):len(tokens) + min(3, len(reference) - len(tokens) - 1)]
                if len(drafts) == 3:
                    drafts[2] = (drafts[2] + 1) % head.vocab_size
                if kill is not None:
                    kill(rounds, session)
                fed = torch.cat([pending, torch.tensor([drafts], dtype=torch.long)], dim=1)
                logits = head.logits(await session.step(head.embed(fed)))[0, -len(drafts) - 1:]
                for i in range(len(drafts) + 1):
                    tokens.append(int(logits[i].argmax()))
                    if i == len(drafts) or tokens[-1] != drafts[i]:
                        break
                if i < len(drafts):
                    await session.truncate(session.position - len(drafts) + i)
                    truncations += 1
                pending, rounds = torch.tensor([[tokens[-1]]]), rounds + 1
            return tokens, truncations

    return bridge.call(run)


@pytest.mark.e2e
@pytest.mark.parametrize("wire_codec, hop", [("none", 1), ("int8", 0)])
def test_truncated_session_replays_after_a_sigkill(swarm, wire_codec, hop):
    """Truncations (every round cuts its last step short), then the server of one hop SIGKILLed:
    the replacement is replayed the cut records and the tokens equal the undisturbed run's (and,
    over the lossless codec, transformers' greedy ones)."""
    path, servers, bridge, _ = swarm
    head = ModelHead(path)
    prompt = torch.randint(3, head.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    reference = reference_model(path).generate(prompt, max_new_tokens=20, do_sample=False,
                                               min_new_tokens=20)[0, 12:].tolist()
    undisturbed, truncations = _speculate(bridge, head, path.name, prompt, reference, wire_codec=wire_codec)
    assert truncations >= 4
    if wire_codec == "none":
        assert undisturbed == reference
    by_peer = {server.peer_id: server for server in servers}
    replays = bridge.snapshot(lambda: bridge.client.replays)

    def kill(round: int, session: InferenceSession) -> None:
        if round == 3:
            by_peer[session.chain[hop].peer_id].stop(signal.SIGKILL)

    tokens, _ = _speculate(bridge, head, path.name, prompt, reference, wire_codec=wire_codec, kill=kill)
    assert tokens == undisturbed
    assert bridge.snapshot(lambda: bridge.client.replays) > replays
