"""The generation loop: embed -> swarm step -> logits -> sample, for `n` choices at once.

Choices are the rows of one batch in one swarm session, so they share the prompt's prefill.
All head compute (embeddings, LM head, sampling, detokenization) runs on the head's thread, in
rounds shared by the generations that reach it together (gateway/inference/head_rounds.py: one
LM head call per round), so the event loop keeps serving other requests and streams. A round
starts its generations' next swarm steps (`_launch`) before any of them resumes to hand out its
deltas: the swarm computes while the chunks are written, and the round's steps reach the swarm
in one moment, as one step group (swarm/step_groups.py). `steps()` yields the same per-step
deltas to the streaming and the non-streaming path.

Guided rows (a `Guide` on the job) are masked by their grammar in the sampler; each step their
next masks are filled in a worker thread while the swarm computes the step, off the critical
path. Text is decoded without special tokens, except the tool-call markers the request's tool
parser needs (`GenerationJob.keep_markers`, e.g. Mistral's `[TOOL_CALLS]`).

Speculative decoding (`speculative_tokens` > 0, gateway/inference/speculative.py): a step feeds
the tokens the servers lack (the prompt, then the last sampled token) plus up to k drafted ones;
the sampler then runs on each position's logits in order, exactly as it would have one step at a
time, and the round stops at the first position where a row's sampled token is not its draft
(or all rows finished); the session is truncated to the positions whose inputs were right. The
token at each position is thus the very token plain decoding samples there — same processing
(penalties, logit bias, min_tokens), same grammar masks, same raw logprobs, same draws from the
request's seeded generator — so nothing falls back to plain decoding: greedy output, seeded
output, guided output and logprobs are those of plain decoding, up to the floating-point
rounding of a multi-token step against one-token steps on the servers (a near-tie can flip).
For a sampled row this *is* standard speculative sampling with a point-mass draft: the draft x
is kept with probability p(x), and a rejection emits a token drawn from p without x, normalised.
Rows share one session and so one truncation: a round keeps the drafts every unfinished row
accepted, and `n` > 1 gains only where the rows' drafts agree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import torch

from gateway.backend import InferenceBackend, InferenceSession
from gateway.models import ServedModel
from gateway.inference.sampling import SampledToken, Sampler, SamplingParams
from gateway.inference.head_rounds import head_rounds
from gateway.inference.speculative import ngram_draft
from gateway.protocol.schemas import FinishReason, Usage
from gateway.inference.stops import TextStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationJob:
    """A validated request: what to generate, decided before any swarm resource is taken."""

    model: ServedModel
    prompt_ids: list[int]
    n: int
    max_tokens: int
    params: SamplingParams
    stops: list[str] = field(default_factory=list)
    guide: Guide | None = None  # every row follows this grammar
    keep_markers: tuple[str, ...] = ()  # special tokens whose text the output keeps
    tool_parser: Any = None  # `gateway.agents.tool_parsers.ToolParser` when tools are active
    cache_salt: str | None = None  # servers reuse cached prompt starts only of sessions with the same salt


@dataclass(frozen=True)
class Guide:
    """A grammar spec every row follows, and the `GrammarLibrary` (vocabulary) that compiled it."""

    library: Any
    spec: Any  # `gateway.agents.guided.GrammarSpec`

    @property
    def kind(self) -> str:
        return self.spec.kind  # "json_schema" | "json_object" | "tool_calls"

    def matchers(self, n: int) -> list[Any]:
        return self.library.matchers(self.spec, n)


def marker_decoder(tokenizer: Any, markers: tuple[str, ...]) -> Callable[[list[int]], str]:
    """`decode(ids)` that skips special tokens, except those spelling one of `markers`."""
    if not markers:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    special -= {tokenizer.convert_tokens_to_ids(marker) for marker in markers}
    return lambda ids: tokenizer.decode([i for i in ids if i not in special], skip_special_tokens=False)


@dataclass(frozen=True)
class ChoiceDelta:
    """What one step added to one choice."""

    index: int
    text: str
    tokens: tuple[SampledToken, ...]  # the step's token (not EOS), for logprobs
    finish_reason: FinishReason | None = None


@dataclass
class ChoiceResult:
    """A whole choice, for non-streaming responses."""

    text: str = ""
    tokens: list[SampledToken] = field(default_factory=list)
    finish_reason: FinishReason | None = None


class Generation:
    """One generation's swarm session and loop: `open()`, then `steps()` or `collect()`, `close()`.

    `close()` is idempotent, shielded from cancellation and runs `on_close` (e.g. releasing the
    tenant's concurrency slot), so every exit path may call it. `speculative_tokens`: most draft
    tokens per step (0: plain decoding); `drafted`/`accepted` count them.
    """

    def __init__(self, job: GenerationJob, backend: InferenceBackend, *, on_close: Callable[[], None] | None = None,
                 speculative_tokens: int = 0):
        self.job = job
        self.speculative_tokens = speculative_tokens
        self._draft_length = speculative_tokens  # adapts to how often drafts are right (see _count_drafts)
        self.drafted = 0  # draft tokens sent through the swarm
        self.accepted = 0  # of them, those the sampler agreed with
        self._backend = backend
        self._on_close = on_close
        self._session: InferenceSession | None = None
        self._closed = False
        self.opened_at: float | None = None  # monotonic times, for metrics
        self.first_token_at: float | None = None
        model = job.model
        self._sampler = Sampler(
            job.params,
            prompt_ids=job.prompt_ids,
            batch=job.n,
            vocab_size=model.head.vocab_size,
            eos_token_ids=model.eos_token_ids,
            matchers=job.guide.matchers(job.n) if job.guide is not None else None,
        )
        decode = marker_decoder(model.tokenizer, job.keep_markers)
        self._streams = [TextStream(decode, job.stops) for _ in range(job.n)]
        self._finished: list[FinishReason | None] = [None] * job.n
        self._completion_tokens = [0] * job.n
        self._contexts = [list(job.prompt_ids) for _ in range(job.n)]  # what drafts are looked up in
        self._position = 0  # tokens the servers' caches hold
        self._next_step: asyncio.Future[torch.Tensor] | None = None  # launched by the head's round (_launch)

    async def open(self) -> None:
        """Reserve the swarm chain; `SwarmBusy`/`BlocksUnavailable` surface here, before any output."""
        self.opened_at = time.monotonic()
        self._session = await self._backend.open_session(
            self.job.model.swarm_id, batch=self.job.n, max_length=len(self.job.prompt_ids) + self.job.max_tokens,
            adapter=self.job.model.adapter, cache_salt=self.job.cache_salt,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        try:
            if session is not None:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._end_launched()  # e.g. closed while its steps() waits at a yield
                    finally:
                        await session.close()
        except Exception:
            log.warning("closing the inference session failed", exc_info=True)
        finally:
            if self._on_close is not None:
                self._on_close()

    def usage(self) -> Usage:
        """Exact usage so far: the prompt once, completion tokens (EOS included) over all choices."""
        prompt, completion = len(self.job.prompt_ids), sum(self._completion_tokens)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def steps(self) -> AsyncIterator[list[ChoiceDelta]]:
        """Run to the end, yielding each token's deltas (only for choices that changed)."""
        assert self._session is not None, "open() the generation first"
        prompt = torch.tensor([self.job.prompt_ids] * self.job.n, dtype=torch.long)
        drafts = self._drafts()
        rounds = head_rounds(self.job.model.head)
        with rounds.join() as member:  # decoding: a CPU head's rounds may wait for it (head_rounds.py)
            hidden = await rounds.call(lambda: self.job.model.head.embed(torch.cat([prompt, drafts], dim=1)))
            guided = self._sampler.matchers is not None
            try:
                while hidden is not None:
                    launched, self._next_step = self._next_step, None
                    step = launched if launched is not None else self._session.step(hidden, drafts.shape[1] + 1)
                    if guided:  # the next masks are filled in a thread while the swarm computes
                        masks = asyncio.get_running_loop().run_in_executor(None, self._sampler.prepare)
                        output = await step
                        await masks
                    else:
                        output = await step
                    self._position += hidden.shape[1]
                    first = output.shape[1] - drafts.shape[1] - 1  # the position that predicts the first new token
                    (per_token, drafts, kept), hidden = await rounds.sample(
                        output[:, first:first + 1], partial(self._advance, output, drafts), member,
                        greedy=self._sampler.plain, suppress=self._sampler.suppressed(), embeds=True,
                        launch=self._launch)
                    if kept < self._position:  # positions fed rejected drafts
                        await self._session.truncate(kept)
                        self._position = kept
                    self.first_token_at = self.first_token_at or time.monotonic()
                    for deltas in per_token:
                        if deltas:
                            yield deltas
            finally:
                await self._end_launched()  # left (cancelled, closed) with a step under way

    async def _end_launched(self) -> None:
        """Cancel a launched step nobody awaits and wait, through further cancellations, until it
        ended: its cancellation reaches the swarm before the session's close does (a close that
        meets a step still unwinding there is handled by the session)."""
        launched, self._next_step = self._next_step, None
        if launched is None:
            return
        launched.cancel()
        interrupted = False
        while not launched.done():
            try:
                await asyncio.wait([launched])
            except asyncio.CancelledError:
                interrupted = True  # honoured once the step ended
        if not launched.cancelled():
            launched.exception()  # retrieved: nobody awaits it
        if interrupted:
            raise asyncio.CancelledError

    def _launch(self, result: tuple[Any, torch.Tensor, int], hidden: torch.Tensor) -> None:
        """(Event loop, as the head's round answers.) Start the next swarm step now, before any of
        the round's generations resumes to write its chunks: the swarm computes while they do, and
        the round's steps reach the swarm together (one step group). Not after rejected drafts: the
        session is truncated first."""
        _, drafts, kept = result
        if self._session is not None and not self._closed and kept >= self._position:
            self._next_step = asyncio.ensure_future(self._session.step(hidden, drafts.shape[1] + 1))

    async def collect(self) -> list[ChoiceResult]:
        """Run to the end and return the whole choices."""
        results = [ChoiceResult() for _ in range(self.job.n)]
        async with aclosing(self.steps()) as steps:  # cancelled: its end runs now, not at collection
            async for deltas in steps:
                for delta in deltas:
                    result = results[delta.index]
                    result.text += delta.text
                    result.tokens.extend(delta.tokens)
                    result.finish_reason = delta.finish_reason or result.finish_reason
        return results

    def _advance(
        self, output: torch.Tensor, drafts: torch.Tensor, first_logits: torch.Tensor, first_argmax: list[int] | None = None
    ) -> tuple[tuple[list[list[ChoiceDelta]], torch.Tensor, int], torch.Tensor | None]:
        """Head thread: sample the step's positions from the first one after the fed tokens (whose
        logits, and for a plain greedy sampler their argmax, the round computed), in order, while
        every unfinished row's token is its draft; update the choices and draft anew. Returns the
        deltas per sampled token, the next step's drafts and how many positions of the servers'
        caches stay valid; then the ids the next step feeds (None when done), which the round embeds.

        Each position's logits go through the head alone, the shape plain decoding uses.
        """
        head, count = self.job.model.head, drafts.shape[1]
        first = output.shape[1] - count - 1  # the position that predicts the first draft
        proposed, per_token = drafts.tolist(), []
        for i in range(count + 1):
            logits = first_logits if i == 0 else head.logits(output[:, first + i:first + i + 1, :])
            sampled = self._sampler.sample(logits[:, -1, :], first_argmax if i == 0 else None)
            for context, token in zip(self._contexts, sampled):
                context.append(token.token_id)
            per_token.append([delta for row, token in enumerate(sampled) if (delta := self._update(row, token))])
            if all(self._finished):
                self._count_drafts(count, i)
                return (per_token, drafts, self._position), None
            if i == count or any(not self._finished[row] and token.token_id != proposed[row][i]
                                 for row, token in enumerate(sampled)):
                break
        self._count_drafts(count, i)
        kept = self._position - count + i  # the fed tokens and the drafts that were right
        drafts = self._drafts()
        next_ids = torch.cat([torch.tensor([[token.token_id] for token in sampled], dtype=torch.long), drafts], dim=1)
        return (per_token, drafts, kept), next_ids

    def _count_drafts(self, drafted: int, accepted: int) -> None:
        """Count, and adapt the draft length as transformers' assisted decoding does: longer after
        a round that kept every draft, shorter after a miss (rejected positions cost compute)."""
        self.drafted += drafted
        self.accepted += accepted
        if drafted:
            grown = self._draft_length + 2 if accepted == drafted else self._draft_length - 1
            self._draft_length = max(1, min(self.speculative_tokens, grown))

    def _drafts(self) -> torch.Tensor:
        """[n, k] drafts for the next step: as many as every unfinished row has (so a row without
        a lookup match means none), within the tokens still to generate."""
        budget = min(self._draft_length, self.job.max_tokens - self._sampler.generated - 1)
        if budget <= 0:  # plain decoding, or the last token
            return torch.zeros((len(self._contexts), 0), dtype=torch.long)
        rows = [ngram_draft(context, budget) if not finished else None
                for context, finished in zip(self._contexts, self._finished)]
        count = min((len(draft) for draft in rows if draft is not None), default=0)
        return torch.tensor([draft[:count] if draft is not None else [0] * count for draft in rows],
                            dtype=torch.long).reshape(len(rows), count)

    def _update(self, row: int, token: SampledToken) -> ChoiceDelta | None:
        if self._finished[row]:
            return None  # the row keeps running with the others; its tokens are discarded
        self._completion_tokens[row] += 1
        count, stream, params = self._completion_tokens[row], self._streams[row], self.job.params
        finish: FinishReason | None = None
        guided = self._sampler.matchers is not None and self._sampler.matchers[row] is not None
        if token.token_id in self.job.model.eos_token_ids and (guided or not params.ignore_eos):
            text, tokens, finish = stream.flush(), (), "stop"
        else:
            text, tokens = stream.push(token.token_id, check_stops=count >= params.min_tokens), (token,)
            if stream.stopped:
                finish = "stop"
            elif count >= self.job.max_tokens:
                text, finish = text + stream.flush(), "length"
        self._finished[row] = finish
        return ChoiceDelta(row, text, tokens, finish) if text or tokens or finish else None
