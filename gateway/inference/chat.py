"""`POST /v1/chat/completions`, streamed or not."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from gateway.inference.disconnect import unless_disconnected
from gateway.inference.generation import Generation
from gateway.inference.logprobs import chat_logprobs
from gateway.inference.prepare import chat_job
from gateway.protocol.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
)
from gateway.state import GatewayDep, TenantDep
from gateway.inference.streaming import sse_response

router = APIRouter()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `stream`: chat.completion.chunk events"}},
)
async def create_chat_completion(
    body: ChatCompletionRequest, gateway: GatewayDep, tenant: TenantDep, request: Request
) -> ChatCompletion | EventSourceResponse:
    model = await gateway.models.resolve(body.model, tenant)
    job = await chat_job(body, model, gateway.settings)
    generation = await gateway.start(job, tenant)
    meta = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model.id)
    if body.stream:
        with_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(generation, meta, logprobs=body.logprobs, with_usage=with_usage)
        return sse_response(chunks, generation.close, with_usage=with_usage)
    try:
        results = await unless_disconnected(request, generation.collect())
    finally:
        await generation.close()
    choices = [
        ChatChoice(
            index=index,
            message=AssistantMessage(content=result.text),
            logprobs=chat_logprobs(result.tokens, model.pieces) if body.logprobs else None,
            finish_reason=result.finish_reason,
        )
        for index, result in enumerate(results)
    ]
    return ChatCompletion(**meta, choices=choices, usage=generation.usage())


async def _chunks(
    generation: Generation, meta: dict[str, Any], *, logprobs: bool, with_usage: bool
) -> AsyncIterator[ChatCompletionChunk]:
    """Per choice: a role chunk, content chunks, an empty-delta chunk with the finish reason."""
    pieces = generation.job.model.pieces
    for index in range(generation.job.n):
        yield ChatCompletionChunk(
            **meta, choices=[ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))]
        )
    async for deltas in generation.steps():
        for delta in deltas:
            if delta.text or (logprobs and delta.tokens):
                choice = ChatChunkChoice(
                    index=delta.index,
                    delta=ChatDelta(content=delta.text),
                    logprobs=chat_logprobs(delta.tokens, pieces) if logprobs else None,
                )
                yield ChatCompletionChunk(**meta, choices=[choice])
            if delta.finish_reason:
                choice = ChatChunkChoice(index=delta.index, delta=ChatDelta(), finish_reason=delta.finish_reason)
                yield ChatCompletionChunk(**meta, choices=[choice])
    if with_usage:
        yield ChatCompletionChunk(**meta, choices=[], usage=generation.usage())
