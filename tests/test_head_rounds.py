"""The gateway's head rounds (gateway/inference/head_rounds.py): concurrent generations get
exactly their own rows' logits, in fewer head calls than generations under contention, on one
thread; a head failure reaches every generation of its call, a generation's own failure only it.
Greedy generations get their rows' argmax, computed for the round at once, and the ids they hand
back are embedded in one call per width, landing on the host.
A gathering round (a CPU head's) waits for a batch of 4 rows while 4 or more generations are
decoding (joined and sampled once), and never otherwise; one that leaves stops counting."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import pytest
import torch

from blocks.head import ModelHead
from gateway.inference.generation import Generation, GenerationJob
from gateway.inference.head_rounds import HeadRounds, Member, head_rounds
from gateway.inference.sampling import SamplingParams
from gateway.models import ServedModel
from tests.support import LocalBackend

WEIGHT = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))


def slow_head(hidden: torch.Tensor) -> torch.Tensor:
    time.sleep(0.02)  # long enough that generations pile up behind a round
    return hidden @ WEIGHT.T


def run(*coroutines):
    async def main():
        return await asyncio.gather(*coroutines, return_exceptions=True)
    return asyncio.run(main())


def test_concurrent_generations_get_their_own_logits_in_fewer_calls_on_one_thread():
    rounds = HeadRounds(slow_head)
    inputs = [torch.randn(1 + i % 3, 1, 8, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    threads = set()

    def then(logits):
        threads.add(threading.get_ident())
        return logits

    outputs = run(*(rounds.sample(hidden, then) for hidden in inputs))
    for hidden, logits in zip(inputs, outputs):
        torch.testing.assert_close(logits, hidden @ WEIGHT.T, atol=1e-5, rtol=0)
    assert rounds.rounds < len(inputs) and rounds.calls == len(inputs)
    assert len(threads) == 1 and threading.get_ident() not in threads


def test_a_rounds_answers_wake_the_event_loop_once_not_once_per_generation():
    rounds = HeadRounds(slow_head)
    inputs = [torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    wakeups = []

    async def main():
        loop = asyncio.get_running_loop()
        post = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args, **kwargs: (wakeups.append(1), post(*args, **kwargs))[1]
        return await asyncio.gather(*(rounds.sample(hidden, lambda logits: logits) for hidden in inputs))

    outputs = asyncio.run(main())
    for hidden, logits in zip(inputs, outputs):
        torch.testing.assert_close(logits, hidden @ WEIGHT.T, atol=1e-5, rtol=0)
    assert rounds.calls == len(inputs) and len(wakeups) < len(inputs)  # a round's answers ride along together


def test_inputs_of_other_shapes_get_their_own_head_calls():
    rounds = HeadRounds(slow_head)
    inputs = [torch.randn(1, 1 + i % 2, 8) for i in range(8)]
    outputs = run(*(rounds.sample(hidden, lambda logits: logits) for hidden in inputs))
    for hidden, logits in zip(inputs, outputs):
        assert logits.shape == (1, hidden.shape[1], 50)
        torch.testing.assert_close(logits, hidden @ WEIGHT.T, atol=1e-5, rtol=0)


def test_a_head_failure_reaches_its_call_and_a_generations_own_failure_only_it():
    failing = threading.Event()
    failing.set()

    def head(hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        if failing.is_set():
            raise RuntimeError("head failed")
        return hidden @ WEIGHT.T

    rounds = HeadRounds(head)
    results = run(*(rounds.sample(torch.randn(1, 1, 8), lambda logits: logits) for _ in range(4)))
    assert all(isinstance(r, RuntimeError) and "head failed" in str(r) for r in results)
    failing.clear()

    def broken(logits):
        raise ValueError("this generation's sampler failed")

    hidden = torch.randn(2, 1, 8)
    good, bad, plain = run(rounds.sample(hidden, lambda logits: logits), rounds.sample(hidden, broken),
                           rounds.call(lambda: "embedded"))
    torch.testing.assert_close(good, hidden @ WEIGHT.T, atol=1e-5, rtol=0)
    assert isinstance(bad, ValueError) and plain == "embedded"


EMBEDDING = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))


def test_greedy_rows_get_their_argmax_and_their_next_ids_embedded_in_one_call_per_width():
    """The argmax of every row is embedded ahead, in one call (on a GPU, copied to the host with the
    ids: one synchronisation a round); next ids that are that argmax take it, others (drafts,
    or other ids) are embedded in one call per width."""
    embedded_calls = []

    def embed(ids: torch.Tensor) -> torch.Tensor:
        embedded_calls.append(ids.shape)
        return EMBEDDING[ids]

    started, release = threading.Event(), threading.Event()
    rounds = HeadRounds(_gated_head(started, release), embed=embed)
    inputs = [torch.randn(1 + i % 3, 1, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    widths = [1, 1, 3, 1, 3, 1, None, "other"]  # None: the generation is done; "other": feeds other ids

    def then(width):
        def advance(logits, ids):
            assert ids == logits[:, -1, :].argmax(dim=-1).tolist()
            if width == "other":
                return ids, (torch.tensor(ids).unsqueeze(1) + 1) % WEIGHT.shape[0]
            return ids, None if width is None else torch.tensor(ids).unsqueeze(1).repeat(1, width)
        return advance

    async def main():
        blocker = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: None))
        await asyncio.to_thread(started.wait, 5)  # the rest pile up for one round
        calls = [rounds.sample(hidden, then(width), greedy=True, embeds=True) for hidden, width in zip(inputs, widths)]
        tasks = [asyncio.create_task(call) for call in calls]
        await asyncio.sleep(0.05)
        release.set()
        await blocker
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for hidden, width, (ids, embedded) in zip(inputs, widths, results):
        assert ids == (hidden @ WEIGHT.T)[:, -1, :].argmax(dim=-1).tolist()
        if width is None:
            assert embedded is None
        elif width == "other":
            torch.testing.assert_close(embedded, EMBEDDING[(torch.tensor(ids) + 1) % WEIGHT.shape[0]].unsqueeze(1))
        else:
            assert embedded.device.type == "cpu"
            torch.testing.assert_close(embedded, EMBEDDING[torch.tensor(ids)].unsqueeze(1).repeat(1, width, 1))
    # ahead: all 15 rows; then rows of width 3 (3 + 2) and the 2 rows of other ids of width 1
    assert embedded_calls == [(15, 1), (5, 3), (2, 1)]


def test_greedy_rows_skip_their_suppressed_ids_and_their_logits_stay_as_computed():
    """A sampler holding EOS back (min_tokens, ignore_eos) is still plain: the round's argmax skips
    its ids on its rows only, in the same head call as the others'."""
    started, release = threading.Event(), threading.Event()
    rounds = HeadRounds(_gated_head(started, release))
    hidden = torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(3))
    logits = (hidden @ WEIGHT.T)[:, -1, :]
    best = logits.argmax(dim=-1)
    suppress = torch.tensor([int(best[0]), int(best[1]), int(best[2])])  # every row's best

    async def main():
        blocker = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: None))
        await asyncio.to_thread(started.wait, 5)  # both pile up for one round
        tasks = [asyncio.create_task(rounds.sample(hidden[:2], lambda lg, ids: (lg, ids), greedy=True, suppress=suppress)),
                 asyncio.create_task(rounds.sample(hidden[2:], lambda lg, ids: (lg, ids), greedy=True))]
        await asyncio.sleep(0.05)
        release.set()
        await blocker
        return await asyncio.gather(*tasks)

    (held_logits, held), (free_logits, free) = asyncio.run(main())
    masked = logits[:2].clone()
    masked[:, suppress] = float("-inf")
    assert held == masked.argmax(dim=-1).tolist() and held[0] != int(best[0]) and free == [int(best[2])]
    torch.testing.assert_close(held_logits[:, -1, :], logits[:2])  # the works get the logits as computed
    torch.testing.assert_close(free_logits[:, -1, :], logits[2:])


def test_an_embedding_failure_reaches_the_works_of_its_call_only():
    def embed(ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] == 2:
            raise RuntimeError("embedding failed")
        return EMBEDDING[ids]

    rounds = HeadRounds(slow_head, embed=embed)
    hidden = torch.randn(1, 1, 8)
    wide, narrow = run(rounds.sample(hidden, lambda logits: ("wide", torch.zeros(1, 2, dtype=torch.long)), embeds=True),
                       rounds.sample(hidden, lambda logits: ("narrow", torch.zeros(1, 1, dtype=torch.long)), embeds=True))
    assert isinstance(wide, RuntimeError) and narrow[0] == "narrow" and narrow[1].shape == (1, 1, 8)


def test_a_failed_embedding_ahead_leaves_the_round_to_embed_as_before():
    """Embedding a round's argmax ahead is a shortcut: when it fails, the works' ids are embedded
    by the usual call, and no work of the round fails for it."""
    calls = []

    def embed(ids: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape)
        if len(calls) == 1:
            raise RuntimeError("embedding ahead failed")
        return EMBEDDING[ids]

    rounds = HeadRounds(slow_head, embed=embed)
    hidden = torch.randn(2, 1, 8, generator=torch.Generator().manual_seed(5))
    greedy = lambda logits, ids: (ids, torch.tensor(ids).unsqueeze(1))  # noqa: E731
    [(ids, embedded)] = run(rounds.sample(hidden, greedy, greedy=True, embeds=True))
    torch.testing.assert_close(embedded, EMBEDDING[torch.tensor(ids)].unsqueeze(1))
    assert calls == [(2, 1), (2, 1)]  # ahead (failed), then the usual call


def _gated_head(started: threading.Event, release: threading.Event):
    def head(hidden: torch.Tensor) -> torch.Tensor:
        started.set()
        release.wait(5)
        return hidden @ WEIGHT.T
    return head


def test_a_cancelled_generation_is_skipped_and_the_others_still_run():
    started, release, ran = threading.Event(), threading.Event(), []
    rounds = HeadRounds(_gated_head(started, release))

    async def main():
        first = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: ran.append("first")))
        await asyncio.to_thread(started.wait, 5)  # the first round is computing: the next two wait for the next
        cancelled = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: ran.append("cancelled")))
        kept = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: ran.append("kept")))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.wait([cancelled])  # gone before the round it waited for begins
        release.set()
        await asyncio.gather(first, kept)
        assert cancelled.cancelled()

    asyncio.run(main())
    assert ran == ["first", "kept"]


def test_a_generation_cancelled_while_its_work_runs_waits_for_it_to_end():
    """As with a worker thread: the caller goes on only once its begun work is over, so a
    cancelled generation is never closed while the head thread still updates it."""
    started, release, ran = threading.Event(), threading.Event(), []
    rounds = HeadRounds(_gated_head(started, release))

    async def main():
        task = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: ran.append("done")))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # its round is computing: the cancellation waits for it
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ran == ["done"]

    asyncio.run(main())


def _decoding(rounds: HeadRounds, members: int, body) -> Any:
    """Run `body(members)` with `members` generations joined and decoding (each sampled once)."""
    async def main() -> Any:
        gather, rounds.gather = rounds.gather, 0.0  # their first samples: no gathering yet
        with contextlib.ExitStack() as joined:
            ms = [joined.enter_context(rounds.join()) for _ in range(members)]
            await asyncio.gather(*(rounds.sample(torch.randn(1, 1, 8), lambda logits: logits, m) for m in ms))
            rounds.gather = gather
            return await body(ms)
    return asyncio.run(main())


def _staggered(rounds: HeadRounds, members: int, submit: int, gap: float) -> int:
    """`members` generations decoding, `submit` of them handing in a row `gap` seconds apart: the
    rounds those rows took."""
    async def body(ms: list[Member]) -> int:
        before = rounds.rounds

        async def one(i: int) -> torch.Tensor:
            await asyncio.sleep(i * gap)
            return await rounds.sample(torch.randn(1, 1, 8), lambda logits: logits, ms[i])

        outputs = await asyncio.gather(*(one(i) for i in range(submit)))
        assert all(logits.shape == (1, 1, 50) for logits in outputs)
        return rounds.rounds - before
    return _decoding(rounds, members, body)


def test_a_gathering_round_waits_for_the_rest_of_a_batch_of_four():
    assert _staggered(HeadRounds(lambda hidden: hidden @ WEIGHT.T), members=8, submit=4, gap=0.02) == 4
    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=5.0)
    started = time.monotonic()
    assert _staggered(gathering, members=8, submit=4, gap=0.02) == 1  # ended by the 4th row, not the 5 s
    assert time.monotonic() - started < 4


def test_a_round_unfilled_waits_for_every_decoding_generation():
    """A GPU head's rounds (`fill=None`) wait for all of the batch, not for 4 rows: 6 generations
    decoding, handing in rows 20 ms apart, take one round."""
    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=5.0, fill=None)
    started = time.monotonic()
    assert _staggered(gathering, members=6, submit=6, gap=0.02) == 1  # ended by the 6th row, not the 5 s
    assert time.monotonic() - started < 4
    assert _staggered(HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=5.0), members=6, submit=6, gap=0.02) > 1


def test_a_round_never_waits_with_fewer_than_four_generations_decoding():
    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=30.0)
    started = time.monotonic()
    assert _staggered(gathering, members=3, submit=1, gap=0) == 1
    assert time.monotonic() - started < 10


def test_joined_generations_count_only_once_they_sample():
    """A prompt computing (joined, not sampled yet) is no company to wait for."""
    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=30.0)

    async def main() -> None:
        with contextlib.ExitStack() as joined:
            decoding = [joined.enter_context(gathering.join()) for _ in range(3)]
            [joined.enter_context(gathering.join()) for _ in range(5)]  # in their prompts
            await gathering.sample(torch.randn(1, 1, 8), lambda logits: logits, decoding[0])

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 10


def test_a_gathering_round_stops_waiting_when_every_generation_decoding_handed_in_work():
    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T, gather=30.0)

    async def body(ms: list[Member]) -> None:  # 3 rows and an embedding: all 4 in, no wait for a 4th row
        rows = [gathering.sample(torch.randn(1, 1, 8), lambda logits: logits, m) for m in ms[:3]]
        await asyncio.gather(*rows, gathering.call(lambda: "an embedding"))

    started = time.monotonic()
    _decoding(gathering, 4, body)
    assert time.monotonic() - started < 10


def test_a_generation_leaving_wakes_a_round_waiting_for_it():
    gathering = HeadRounds(lambda hidden: hidden @ WEIGHT.T)  # gathering from their second samples

    async def main() -> None:
        with contextlib.ExitStack() as staying:
            first = staying.enter_context(gathering.join())
            leaving = contextlib.ExitStack()
            with leaving:
                ms = [first] + [leaving.enter_context(gathering.join()) for _ in range(3)]
                await asyncio.gather(*(gathering.sample(torch.randn(1, 1, 8), lambda x: x, m) for m in ms))
                gathering.gather = 30.0
                waiting = asyncio.ensure_future(gathering.sample(torch.randn(1, 1, 8), lambda x: x, first))
                await asyncio.sleep(0.2)
                assert not waiting.done()  # 4 decoding, 1 row in: the round waits
            await asyncio.wait_for(waiting, 10)  # 3 left: 1 decoding, the round runs

    asyncio.run(main())


def test_a_generation_closed_early_stops_counting(tiny_models):
    """A client that leaves mid-stream: the generation's steps are closed, and it is no longer
    company its head's rounds wait for."""
    path = tiny_models["llama"]
    head = ModelHead(path)
    model = ServedModel.load("tiny", path, lambda _: head)
    job = GenerationJob(model=model, prompt_ids=model.tokenizer("Hello there")["input_ids"], n=1, max_tokens=20,
                        params=SamplingParams(temperature=0, ignore_eos=True))
    rounds = head_rounds(head)

    async def main() -> list[int]:
        generation = Generation(job, LocalBackend(path, "tiny"))
        await generation.open()
        seen = []
        try:
            async with contextlib.aclosing(generation.steps()) as steps:
                async for _ in steps:
                    seen.append(rounds._members)
                    if len(seen) == 3:
                        break
        finally:
            await generation.close()
        return seen

    assert asyncio.run(main()) == [1, 1, 1]
    assert rounds._members == 0


def test_a_rounds_launches_reach_the_loop_before_any_of_its_answers():
    """`launch(result, hidden states)` runs on the awaiting loop for every work of the round that
    has hidden states, with what its `sample` then returns, before any of the round's generations
    resumes (so each can start its next swarm step there, together); a work without hidden states
    (done) launches nothing."""
    started, release = threading.Event(), threading.Event()
    rounds = HeadRounds(_gated_head(started, release), embed=lambda ids: EMBEDDING[ids])
    inputs = [torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    events: list[tuple[str, int, Any]] = []

    def advance(index: int):
        def then(logits, ids):
            return index, None if index == 5 else torch.tensor(ids).unsqueeze(1)
        return then

    async def generation(index: int, hidden: torch.Tensor) -> None:
        result, embedded = await rounds.sample(hidden, advance(index), greedy=True, embeds=True,
                                               launch=lambda result, hidden: events.append(("launch", result, hidden)))
        events.append(("resumed", result, embedded))

    async def main():
        blocker = asyncio.create_task(rounds.sample(torch.randn(1, 1, 8), lambda logits: None))
        await asyncio.to_thread(started.wait, 5)  # the six pile up for one round
        tasks = [asyncio.create_task(generation(i, hidden)) for i, hidden in enumerate(inputs)]
        await asyncio.sleep(0.05)
        release.set()
        await blocker
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert [kind for kind, _, _ in events] == ["launch"] * 5 + ["resumed"] * 6
    launched = {index: hidden for _, index, hidden in events[:5]}
    for _, index, embedded in events[5:]:
        assert (embedded is None) if index == 5 else embedded is launched[index]


def test_a_generation_starts_its_next_step_before_its_chunk_is_consumed_and_ends_it_when_left(tiny_models):
    """The round starts each generation's next swarm step (the swarm computes while the chunk is
    written); a client that leaves cancels that step before the session closes, and the tokens
    equal those of a generation never left."""
    path = tiny_models["llama"]
    job = _greedy_job(path, max_tokens=8)
    backend = LocalBackend(path, "tiny")
    backend.step_delay = 0.01

    async def main() -> tuple[list[int], list[int], list[bool]]:
        generation = Generation(job, backend)
        await generation.open()
        session, steps_seen, tokens, cancelled = backend.sessions[-1], [], [], []
        launched = None
        try:
            async with contextlib.aclosing(generation.steps()) as steps:
                async for deltas in steps:
                    tokens.extend(token.token_id for token in deltas[0].tokens)
                    await asyncio.sleep(0)  # the launched step has started by now
                    steps_seen.append(session.steps)
                    if len(tokens) == 4:
                        launched = generation._next_step
                        break
        finally:
            await generation.close()
        cancelled.append(launched is not None and launched.cancelled())
        return tokens, steps_seen, cancelled

    tokens, steps_seen, cancelled = asyncio.run(main())
    assert steps_seen == [2, 3, 4, 5]  # the prompt's step, then each token's next step already under way
    assert cancelled == [True]

    async def whole() -> list[int]:
        generation = Generation(job, LocalBackend(path, "tiny"))
        await generation.open()
        try:
            return [token.token_id for result in await generation.collect() for token in result.tokens]
        finally:
            await generation.close()

    assert asyncio.run(whole())[:4] == tokens


def test_a_generation_closed_while_its_steps_wait_at_a_yield_ends_its_launched_step_first(tiny_models):
    """`close()` without leaving `steps()` first (its consumer holds a chunk): the step the round
    launched is cancelled and over before the session closes."""
    path = tiny_models["llama"]
    job = _greedy_job(path, max_tokens=8)
    backend = LocalBackend(path, "tiny")
    backend.step_delay = 0.05

    async def main() -> tuple[bool, bool]:
        generation = Generation(job, backend)
        await generation.open()
        session = backend.sessions[-1]
        steps = generation.steps()
        await steps.__anext__()  # the first token's chunk; its next step is under way
        launched = generation._next_step
        assert launched is not None and not launched.done()
        seen_at_close = []
        close = session.close

        async def recording_close() -> None:
            seen_at_close.append(launched.done())
            await close()

        session.close = recording_close
        await generation.close()
        await steps.aclose()
        return seen_at_close == [True], launched.cancelled()

    assert asyncio.run(main()) == (True, True)


def _greedy_job(path, max_tokens: int) -> GenerationJob:
    """A greedy job of one row on the tiny checkpoint at `path`, EOS ignored."""
    head = ModelHead(path)
    model = ServedModel.load("tiny", path, lambda _: head)
    return GenerationJob(model=model, prompt_ids=model.tokenizer("Hello there")["input_ids"], n=1,
                         max_tokens=max_tokens, params=SamplingParams(temperature=0, ignore_eos=True))
