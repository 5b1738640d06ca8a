"""The generation loop: embed -> swarm step -> logits -> sample, for `n` choices at once.

Choices are the rows of one batch in one swarm session, so they share the prompt's prefill.
All head compute (embeddings, LM head, sampling, detokenization) runs in a worker thread, one
hop per step, so the event loop keeps serving other requests and streams. `steps()` yields the
same per-step deltas to the streaming and the non-streaming path.

Guided rows (a `Guide` on the job) are masked by their grammar in the sampler; each step their
next masks are filled in a worker thread while the swarm computes the step, off the critical
path. Text is decoded without special tokens, except the tool-call markers the request's tool
parser needs (`GenerationJob.keep_markers`, e.g. Mistral's `[TOOL_CALLS]`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch
from anyio.to_thread import run_sync

from gateway.backend import InferenceBackend, InferenceSession
from gateway.models import ServedModel
from gateway.inference.sampling import SampledToken, Sampler, SamplingParams
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


@dataclass(frozen=True)
class Guide:
    """A compiled grammar (`xgrammar.CompiledGrammar`) and the logits width it masks."""

    compiled: Any
    vocab_size: int
    kind: str = ""  # "json_schema" | "json_object" | "tool_calls"

    def matchers(self, n: int) -> list[Any]:
        from gateway.agents.guided import GuidedMatcher

        return [GuidedMatcher(self.compiled, self.vocab_size) for _ in range(n)]


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
    tenant's concurrency slot), so every exit path may call it.
    """

    def __init__(self, job: GenerationJob, backend: InferenceBackend, *, on_close: Callable[[], None] | None = None):
        self.job = job
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

    async def open(self) -> None:
        """Reserve the swarm chain; `SwarmBusy`/`BlocksUnavailable` surface here, before any output."""
        self.opened_at = time.monotonic()
        self._session = await self._backend.open_session(
            self.job.model.swarm_id, batch=self.job.n, max_length=len(self.job.prompt_ids) + self.job.max_tokens,
            adapter=self.job.model.adapter,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        try:
            if session is not None:
                with anyio.CancelScope(shield=True):
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
        """Run to the end, yielding each step's deltas (only for choices that changed)."""
        assert self._session is not None, "open() the generation first"
        prompt = torch.tensor([self.job.prompt_ids] * self.job.n, dtype=torch.long)
        hidden = await run_sync(self.job.model.head.embed, prompt)
        guided = self._sampler.matchers is not None
        while hidden is not None:
            if guided:  # the next masks are filled in a thread while the swarm computes
                masks = asyncio.get_running_loop().run_in_executor(None, self._sampler.prepare)
                output = await self._session.step(hidden)
                await masks
            else:
                output = await self._session.step(hidden)
            deltas, hidden = await run_sync(self._advance, output)
            self.first_token_at = self.first_token_at or time.monotonic()
            if deltas:
                yield deltas

    async def collect(self) -> list[ChoiceResult]:
        """Run to the end and return the whole choices."""
        results = [ChoiceResult() for _ in range(self.job.n)]
        async for deltas in self.steps():
            for delta in deltas:
                result = results[delta.index]
                result.text += delta.text
                result.tokens.extend(delta.tokens)
                result.finish_reason = delta.finish_reason or result.finish_reason
        return results

    def _advance(self, output: torch.Tensor) -> tuple[list[ChoiceDelta], torch.Tensor | None]:
        """Worker thread: sample from the last position, update the choices, embed what comes next."""
        head = self.job.model.head
        sampled = self._sampler.sample(head.logits(output[:, -1:, :])[:, -1, :])
        deltas = [delta for row, token in enumerate(sampled) if (delta := self._update(row, token))]
        if all(self._finished):
            return deltas, None
        next_ids = torch.tensor([[token.token_id] for token in sampled], dtype=torch.long)
        return deltas, head.embed(next_ids)

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
