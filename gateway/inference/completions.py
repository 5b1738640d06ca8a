"""`POST /v1/completions` (legacy text completions), streamed or not."""

from __future__ import annotations

from collections.abc import Sequence

from anyio.to_thread import run_sync
from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse

from gateway.inference.generation import GenerationJob
from gateway.inference.logprobs import completion_logprobs
from gateway.inference.prepare import generation_job
from gateway.inference.sampling import SampledToken
from gateway.inference.serving import Logprobs, OpenAIServing
from gateway.inference.tokens import TokenPieces
from gateway.models import ServedModel
from gateway.protocol.errors import InvalidRequest
from gateway.protocol.schemas import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, FinishReason
from gateway.settings import Settings
from gateway.state import GatewayDep, TenantDep

router = APIRouter()


class CompletionServing(OpenAIServing[CompletionRequest, Completion, Completion]):
    """Choices are text; streamed chunks have the response's own shape."""

    id_prefix = "cmpl"
    response_type = Completion
    chunk_type = Completion

    async def prepare(self, body: CompletionRequest, model: ServedModel, settings: Settings) -> GenerationJob:
        """A text prompt is tokenized (in a worker thread); token ids must be in the vocabulary."""
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt_ids = await run_sync(lambda: model.tokenizer(prompt)["input_ids"])
        else:
            if any(not 0 <= token < model.head.vocab_size for token in prompt):
                raise InvalidRequest(f"Prompt token ids must be in [0, {model.head.vocab_size}).", param="prompt")
            prompt_ids = prompt
        return generation_job(body, model, settings, list(prompt_ids), body.max_tokens, body.logprobs, "prompt")

    def logprobs(self, body: CompletionRequest, pieces: TokenPieces, n: int) -> Logprobs | None:
        if body.logprobs is None:
            return None
        offsets = [0] * n  # characters of each choice's token texts so far, for text_offset

        def logprobs(index: int, tokens: Sequence[SampledToken]) -> CompletionLogprobs:
            result = completion_logprobs(tokens, pieces, offsets[index])
            offsets[index] += sum(len(token) for token in result.tokens)
            return result

        return logprobs

    def choice(
        self, index: int, text: str, logprobs: CompletionLogprobs | None, finish_reason: FinishReason | None
    ) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)

    def chunk_choice(self, index: int, text: str, logprobs: CompletionLogprobs | None) -> CompletionChoice:
        return CompletionChoice(index=index, text=text, logprobs=logprobs)

    def finish_choice(self, index: int, finish_reason: FinishReason) -> CompletionChoice:
        return CompletionChoice(index=index, text="", finish_reason=finish_reason)


serving = CompletionServing()


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={200: {"content": {"text/event-stream": {}}, "description": "With `stream`: text_completion events"}},
)
async def create_completion(
    body: CompletionRequest, gateway: GatewayDep, tenant: TenantDep, request: Request
) -> Completion | EventSourceResponse:
    return await serving.create(body, gateway, tenant, request)
