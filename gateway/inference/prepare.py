"""A tokenized request -> a generation job: the checks chat and completions share.

With the endpoints' own prompt checks, everything that can be refused with a 400 is refused
here, before a tenant slot or a swarm session is taken.
"""

from __future__ import annotations

from gateway.protocol.errors import InvalidRequest
from gateway.inference.generation import GenerationJob
from gateway.models import ServedModel
from gateway.inference.sampling import SamplingParams
from gateway.protocol.schemas import SamplingFields
from gateway.settings import Settings


def generation_job(
    request: SamplingFields,
    model: ServedModel,
    settings: Settings,
    prompt_ids: list[int],
    max_tokens: int | None,
    logprobs: int | None,
    prompt_param: str,
) -> GenerationJob:
    """Check `n`, the context length and the sampling fields; `prompt_param` names the prompt in errors."""
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
        cache_salt=request.cache_salt,
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
