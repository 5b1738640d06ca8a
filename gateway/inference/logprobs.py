"""Sampled tokens -> the two logprobs shapes of the API (chat's and legacy completions')."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.inference.sampling import SampledToken
from gateway.protocol.schemas import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob
from gateway.inference.tokens import TokenPieces

FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM report this instead


def _finite(logprob: float) -> float:
    return max(logprob, FLOOR)


def chat_logprobs(tokens: Sequence[SampledToken], pieces: TokenPieces) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> TopLogprob:
        text, raw = pieces.piece(token_id)
        return TopLogprob(token=text, logprob=_finite(logprob), bytes=list(raw))

    content = []
    for token in tokens:
        assert token.logprob is not None
        chosen = entry(token.token_id, token.logprob)
        top = [entry(token_id, logprob) for token_id, logprob in token.top]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)


def completion_logprobs(tokens: Sequence[SampledToken], pieces: TokenPieces, offset: int) -> CompletionLogprobs:
    """`offset`: characters of token strings before these tokens (text_offset counts from 0).

    Offsets add up the token strings' lengths, as vLLM does; they match the text except after
    tokens holding partial characters, whose strings are `\\xHH` escapes. `top_logprobs` holds
    the sampled token too, so up to `logprobs + 1` entries, as OpenAI documents.
    """
    result = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for token in tokens:
        assert token.logprob is not None
        text = pieces.piece(token.token_id)[0]
        top = {pieces.piece(token_id)[0]: _finite(logprob) for token_id, logprob in token.top}
        top.setdefault(text, _finite(token.logprob))
        result.tokens.append(text)
        result.token_logprobs.append(_finite(token.logprob))
        result.top_logprobs.append(top)
        result.text_offset.append(offset)
        offset += len(text)
    return result
