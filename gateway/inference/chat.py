"""`POST /v1/chat/completions`, streamed or not."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from anyio.to_thread import run_sync
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from gateway.agents.tool_parsers import StreamDelta
from gateway.inference.agentic import ChatOutput, chat_output, plan_chat
from gateway.inference.generation import GenerationJob
from gateway.inference.logprobs import chat_logprobs
from gateway.inference.prepare import generation_job
from gateway.inference.serving import Logprobs, OpenAIServing
from gateway.inference.tokens import TokenPieces
from gateway.models import ServedModel
from gateway.protocol.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatLogprobs,
    FinishReason,
    ToolCall,
)
from gateway.settings import Settings
from gateway.state import GatewayDep, TenantDep

router = APIRouter()


class ChatServing(OpenAIServing[ChatCompletionRequest, ChatCompletion, ChatCompletionChunk]):
    """Choices are assistant messages; a stream opens each choice with a role chunk."""

    id_prefix = "chatcmpl"
    response_type = ChatCompletion
    chunk_type = ChatCompletionChunk

    async def prepare(self, body: ChatCompletionRequest, model: ServedModel, settings: Settings) -> GenerationJob:
        """The messages (and tools) through the model's chat template, the grammar compiled (in a
        worker thread: long prompts and big schemas take time)."""
        plan = await run_sync(plan_chat, body, model)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = generation_job(body, model, settings, plan.prompt_ids, max_tokens, logprobs, "messages")
        markers = plan.tool_parser.markers if plan.tool_parser is not None else ()
        return replace(job, guide=plan.guide, tool_parser=plan.tool_parser, keep_markers=tuple(markers))

    def output(self, body: ChatCompletionRequest, job: GenerationJob) -> ChatOutput:
        return chat_output(body, job.tool_parser, job.n)

    def logprobs(self, body: ChatCompletionRequest, pieces: TokenPieces, n: int) -> Logprobs | None:
        return (lambda _, tokens: chat_logprobs(tokens, pieces)) if body.logprobs else None

    def choice(
        self, index: int, text: str, logprobs: ChatLogprobs | None, finish_reason: FinishReason | None
    ) -> ChatChoice:
        return ChatChoice(
            index=index, message=AssistantMessage(content=text), logprobs=logprobs, finish_reason=finish_reason
        )

    def chunk_choice(self, index: int, text: str, logprobs: ChatLogprobs | None) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=logprobs)

    def whole_choice(
        self, output: ChatOutput, index: int, text: str, logprobs: ChatLogprobs | None,
        finish_reason: FinishReason | None,
    ) -> ChatChoice:
        content, calls, finish_reason = output.whole(text, finish_reason)
        message = AssistantMessage(content=content, tool_calls=[ToolCall(**call) for call in calls] or None)
        return ChatChoice(index=index, message=message, logprobs=logprobs, finish_reason=finish_reason)

    def text_choices(
        self, output: ChatOutput, index: int, text: str, logprobs: ChatLogprobs | None
    ) -> Iterable[ChatChunkChoice]:
        if output.parser is None:
            return [self.chunk_choice(index, text, logprobs)]
        delta = output.push(index, text)
        if not delta and logprobs is None:
            return []
        return [ChatChunkChoice(index=index, delta=_delta(delta), logprobs=logprobs)]

    def finish_choices(self, output: ChatOutput, index: int, finish_reason: FinishReason) -> Iterable[ChatChunkChoice]:
        delta, finish_reason = output.finish(index, finish_reason)
        rest = [ChatChunkChoice(index=index, delta=_delta(delta))] if delta else []
        return rest + [self.finish_choice(index, finish_reason)]

    def finish_choice(self, index: int, finish_reason: FinishReason) -> ChatChunkChoice:
        return ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason)

    def opening_choices(self, n: int) -> Iterable[ChatChunkChoice]:
        return [ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content="")) for index in range(n)]


def _delta(delta: StreamDelta) -> ChatDelta:
    return ChatDelta(content=delta.content or None, tool_calls=delta.tool_calls or None)


serving = ChatServing()


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `stream`: chat.completion.chunk events"}},
)
async def create_chat_completion(
    body: ChatCompletionRequest, gateway: GatewayDep, tenant: TenantDep, request: Request
) -> ChatCompletion | EventSourceResponse:
    return await serving.create(body, gateway, tenant, request)
