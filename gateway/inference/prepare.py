"""API requests -> generation jobs: tokenization and every check that needs the model.

Everything that can be refused with a 400 is refused here, before a tenant slot or a swarm
session is taken. Tokenization runs in a worker thread: long prompts take real time.
"""

from __future__ import annotations

from anyio.to_thread import run_sync
from jinja2 import TemplateError

from gateway.protocol.errors import InvalidRequest
from gateway.inference.generation import GenerationJob
from gateway.models import ServedModel
from gateway.inference.sampling import SamplingParams
from gateway.protocol.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from gateway.settings import Settings


async def chat_job(request: ChatCompletionRequest, model: ServedModel, settings: Settings) -> GenerationJob:
    if model.tokenizer.chat_template is None:
        raise InvalidRequest(f"Model '{model.id}' has no chat template; use /v1/completions.", param="model")
    messages = [{"role": message.role, "content": message.text()} for message in request.messages]
    try:
        prompt_ids = await run_sync(
            lambda: model.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    except TemplateError as error:  # templates reject e.g. non-alternating roles
        raise InvalidRequest(f"The chat template rejected the messages: {error}", param="messages") from None
    max_tokens = request.max_completion_tokens or request.max_tokens
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _job(request, model, settings, list(prompt_ids), max_tokens, logprobs, "messages")


async def completion_job(request: CompletionRequest, model: ServedModel, settings: Settings) -> GenerationJob:
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt_ids = await run_sync(lambda: model.tokenizer(prompt)["input_ids"])
    else:
        if any(not 0 <= token < model.head.vocab_size for token in prompt):
            raise InvalidRequest(f"Prompt token ids must be in [0, {model.head.vocab_size}).", param="prompt")
        prompt_ids = prompt
    return _job(request, model, settings, list(prompt_ids), request.max_tokens, request.logprobs, "prompt")


def _job(
    request: SamplingFields,
    model: ServedModel,
    settings: Settings,
    prompt_ids: list[int],
    max_tokens: int | None,
    logprobs: int | None,
    prompt_param: str,
) -> GenerationJob:
    if request.n > settings.max_n:
        raise InvalidRequest(f"n must be at most {settings.max_n}.", param="n")
    if not prompt_ids:
        raise InvalidRequest("The prompt is empty.", param=prompt_param)
    context, prompt = model.context_length, len(prompt_ids)
    if prompt >= context or (max_tokens is not None and prompt + max_tokens > context):
        if max_tokens is None:
            wanted = f"your {prompt_param} resulted in {prompt} tokens"
        else:
            wanted = (
                f"you requested {prompt + max_tokens} tokens "
                f"({prompt} in the {prompt_param}, {max_tokens} in the completion)"
            )
        raise InvalidRequest(
            f"This model's maximum context length is {context} tokens. However, {wanted}. "
            f"Please reduce the length of the {prompt_param} or completion.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    max_tokens = max_tokens or context - prompt
    if request.min_tokens > max_tokens:
        raise InvalidRequest(f"min_tokens must be at most max_tokens ({max_tokens}).", param="min_tokens")
    return GenerationJob(
        model=model,
        prompt_ids=prompt_ids,
        n=request.n,
        max_tokens=max_tokens,
        params=_sampling_params(request, model, logprobs),
        stops=request.stops(),
    )


def _sampling_params(request: SamplingFields, model: ServedModel, logprobs: int | None) -> SamplingParams:
    bias = {int(token): value for token, value in (request.logit_bias or {}).items()}
    if any(not 0 <= token < model.head.vocab_size for token in bias):
        raise InvalidRequest(f"logit_bias keys must be token ids in [0, {model.head.vocab_size}).", param="logit_bias")
    return SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(request.top_k or 0, 0),
        min_p=request.min_p,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        logit_bias=bias,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        seed=request.seed,
        logprobs=logprobs,
    )
