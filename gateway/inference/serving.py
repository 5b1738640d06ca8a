"""The handler skeleton that chat and text completions share, as vLLM's `OpenAIServing` base.

A request is resolved to a model, prepared into a `GenerationJob` (every 400 before any
resource is taken), given a tenant slot and a swarm session (`start_generation`: 503/429 before
any output), then answered whole or streamed. Subclasses say only what differs: how the request
becomes a job and how choices, chunks and logprobs look.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from gateway.backend import BlocksUnavailable
from gateway.inference.disconnect import unless_disconnected
from gateway.inference.generation import Generation, GenerationJob
from gateway.inference.sampling import SampledToken
from gateway.inference.streaming import sse_response
from gateway.inference.tokens import TokenPieces
from gateway.models import ServedModel
from gateway.protocol.schemas import FinishReason, SamplingFields
from gateway.settings import Settings
from gateway.state import Gateway
from gateway.tenancy import swarm_salt

RequestT = TypeVar("RequestT", bound=SamplingFields)
ResponseT = TypeVar("ResponseT", bound=BaseModel)
ChunkT = TypeVar("ChunkT", bound=BaseModel)

Logprobs = Callable[[int, Sequence[SampledToken]], Any]
"""A choice's index and some of its tokens -> their logprobs, in the endpoint's shape."""


async def start_generation(gateway: Gateway, job: GenerationJob, tenant: str) -> Generation:
    """Take a tenant slot and a swarm session for `job`; the caller must `close()` the result.

    Refusals (503 uncovered model, 429 tenant limit or full swarm) happen here, before any
    response has started, so streaming requests get real status codes for them too.
    """
    coverage = gateway.backend.coverage(job.model.swarm_id)
    if not coverage.complete:
        raise BlocksUnavailable(job.model.swarm_id, coverage)
    lease = gateway.limiter.acquire(tenant)

    def finished() -> None:
        lease.release()
        if generation.opened_at is not None:
            # Labelled by base model: tenants' fine-tuned ids would make unbounded label sets.
            gateway.metrics.observe_generation(job.model.swarm_id, generation.opened_at, generation.first_token_at,
                                               generation.usage().completion_tokens)
            gateway.metrics.observe_speculation(job.model.swarm_id, generation.drafted, generation.accepted)

    try:
        generation = Generation(job, gateway.backend, on_close=finished,
                                speculative_tokens=gateway.settings.speculative_tokens)
    except BaseException:
        lease.release()  # no generation to close: the tenant's slot is given back here
        raise
    try:
        await generation.open()
    except BaseException:
        await generation.close()
        raise
    return generation


class OpenAIServing(ABC, Generic[RequestT, ResponseT, ChunkT]):
    """One endpoint's generation: `create()` answers a validated request body."""

    id_prefix: ClassVar[str]
    response_type: type[ResponseT]
    chunk_type: type[ChunkT]

    @abstractmethod
    async def prepare(self, body: RequestT, model: ServedModel, settings: Settings) -> GenerationJob:
        """Tokenize and check the request (400s)."""

    @abstractmethod
    def logprobs(self, body: RequestT, pieces: TokenPieces, n: int) -> Logprobs | None:
        """How to report the choices' logprobs, or None when the request wants none."""

    @abstractmethod
    def choice(self, index: int, text: str, logprobs: Any, finish_reason: FinishReason | None) -> BaseModel:
        """A whole choice of a non-streamed response."""

    @abstractmethod
    def chunk_choice(self, index: int, text: str, logprobs: Any) -> BaseModel:
        """A streamed choice's new text and its tokens' logprobs."""

    @abstractmethod
    def finish_choice(self, index: int, finish_reason: FinishReason) -> BaseModel:
        """The streamed choice that ends choice `index`."""

    def opening_choices(self, n: int) -> Iterable[BaseModel]:
        """Streamed choices that come before any text (none by default)."""
        return ()

    def output(self, body: RequestT, job: GenerationJob) -> Any:
        """Per-request state that turns the choices' text into the endpoint's output (None by default)."""
        return None

    def whole_choice(
        self, output: Any, index: int, text: str, logprobs: Any, finish_reason: FinishReason | None
    ) -> BaseModel:
        return self.choice(index, text, logprobs, finish_reason)

    def text_choices(self, output: Any, index: int, text: str, logprobs: Any) -> Iterable[BaseModel]:
        """The streamed choices for one step's text of choice `index` (one by default)."""
        return [self.chunk_choice(index, text, logprobs)]

    def finish_choices(self, output: Any, index: int, finish_reason: FinishReason) -> Iterable[BaseModel]:
        return [self.finish_choice(index, finish_reason)]

    async def begin(self, body: RequestT, gateway: Gateway, tenant: str) -> tuple[ServedModel, GenerationJob, Generation]:
        """Resolve the model, prepare the job (400s) and start its generation (503/429)."""
        model = await gateway.models.resolve(body.model, tenant)
        job = await self.prepare(body, model, gateway.settings)
        salt = swarm_salt(tenant, job.cache_salt, shared=gateway.settings.share_prefix_cache)
        job = dataclasses.replace(job, cache_salt=salt)
        return model, job, await start_generation(gateway, job, tenant)

    async def create(
        self, body: RequestT, gateway: Gateway, tenant: str, request: Request
    ) -> ResponseT | EventSourceResponse:
        model, job, generation = await self.begin(body, gateway, tenant)
        meta = dict(id=f"{self.id_prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model.id)
        logprobs = self.logprobs(body, model.pieces, job.n)
        output = self.output(body, job)
        if body.stream:
            with_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = self._chunks(generation, meta, logprobs, output, with_usage=with_usage)
            return sse_response(chunks, generation.close, with_usage=with_usage)
        try:
            results = await unless_disconnected(request, generation.collect())
        finally:
            await generation.close()
        choices = [
            self.whole_choice(
                output, index, result.text, logprobs(index, result.tokens) if logprobs else None, result.finish_reason
            )
            for index, result in enumerate(results)
        ]
        return self.response_type(**meta, choices=choices, usage=generation.usage())

    async def _chunks(
        self, generation: Generation, meta: dict[str, Any], logprobs: Logprobs | None, output: Any, *, with_usage: bool
    ) -> AsyncIterator[ChunkT]:
        """Per choice: opening chunks, text chunks, a chunk with the finish reason; then maybe usage."""
        for choice in self.opening_choices(generation.job.n):
            yield self._chunk(meta, choice)
        async with aclosing(generation.steps()) as steps:  # left early: its end runs now, not at collection
            async for deltas in steps:
                for delta in deltas:
                    if delta.text or (logprobs and delta.tokens):
                        choice_logprobs = logprobs(delta.index, delta.tokens) if logprobs else None
                        for choice in self.text_choices(output, delta.index, delta.text, choice_logprobs):
                            yield self._chunk(meta, choice)
                    if delta.finish_reason:
                        for choice in self.finish_choices(output, delta.index, delta.finish_reason):
                            yield self._chunk(meta, choice)
        if with_usage:
            yield self.chunk_type(**meta, choices=[], usage=generation.usage())

    def _chunk(self, meta: dict[str, Any], choice: BaseModel) -> ChunkT:
        return self.chunk_type(**meta, choices=[choice])
