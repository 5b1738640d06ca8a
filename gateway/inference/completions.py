"""`POST /v1/completions` (legacy text completions), streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from gateway.inference.disconnect import unless_disconnected
from gateway.inference.generation import Generation
from gateway.inference.logprobs import completion_logprobs
from gateway.inference.prepare import completion_job
from gateway.protocol.schemas import Completion, CompletionChoice, CompletionRequest
from gateway.state import GatewayDep, TenantDep
from gateway.inference.streaming import sse_response

router = APIRouter()


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `stream`: text_completion events"}},
)
async def create_completion(
    body: CompletionRequest, gateway: GatewayDep, tenant: TenantDep, request: Request
) -> Completion | EventSourceResponse:
    model = await gateway.models.resolve(body.model, tenant)
    job = await completion_job(body, model, gateway.settings)
    generation = await gateway.start(job, tenant)
    meta = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model.id)
    if body.stream:
        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(generation, meta, logprobs=body.logprobs is not None, with_usage=with_usage)
        return sse_response(chunks, generation.close, with_usage=with_usage)
    try:
        results = await unless_disconnected(request, generation.collect())
    finally:
        await generation.close()
    choices = [
        CompletionChoice(
            index=index,
            text=result.text,
            logprobs=completion_logprobs(result.tokens, model.pieces, 0) if body.logprobs is not None else None,
            finish_reason=result.finish_reason,
        )
        for index, result in enumerate(results)
    ]
    return Completion(**meta, choices=choices, usage=generation.usage())


async def _chunks(
    generation: Generation, meta: dict[str, Any], *, logprobs: bool, with_usage: bool
) -> AsyncIterator[Completion]:
    """Per choice: text chunks, then an empty-text chunk with the finish reason."""
    pieces = generation.job.model.pieces
    offsets = [0] * generation.job.n  # characters of each choice's token texts so far, for text_offset
    async for deltas in generation.steps():
        for delta in deltas:
            if delta.text or (logprobs and delta.tokens):
                choice_logprobs = completion_logprobs(delta.tokens, pieces, offsets[delta.index]) if logprobs else None
                if choice_logprobs is not None:
                    offsets[delta.index] += sum(len(token) for token in choice_logprobs.tokens)
                choice = CompletionChoice(index=delta.index, text=delta.text, logprobs=choice_logprobs)
                yield Completion(**meta, choices=[choice])
            if delta.finish_reason:
                choice = CompletionChoice(index=delta.index, text="", finish_reason=delta.finish_reason)
                yield Completion(**meta, choices=[choice])
    if with_usage:
        yield Completion(**meta, choices=[], usage=generation.usage())
