"""Prompt-lookup drafting for speculative decoding across the swarm.

A step through the swarm costs a round trip along the whole chain (hundreds of milliseconds over
real networks) whatever its token count, so the gateway guesses the next tokens and has the
chain compute them in the same step: the step feeds the last sampled token plus k drafts, and
the logits at every position say what the model would have sampled there
(``Generation._advance`` samples them in order and keeps the drafts up to the first miss; the
servers roll back the positions past it, ``InferenceSession.truncate``).

Drafts come from the text itself, with no draft model (prompt lookup, as vLLM's ``ngram``
method and transformers' ``prompt_lookup_num_tokens``): find the most recent earlier occurrence
of the context's last n tokens (n from ``MAX_NGRAM`` down to ``MIN_NGRAM``) and propose what
followed it. That hits where output repeats its input or itself — quoting, code edits,
extraction, lists, loops — and proposes nothing elsewhere, so such steps stay one token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MAX_NGRAM = 3  # longest suffix looked up: longer matches predict better, and are tried first
# Shortest: one-token matches would draft nearly everywhere, mostly wrongly (compute for nothing).
MIN_NGRAM = 2


def ngram_draft(context: Sequence[int] | np.ndarray, k: int, *, max_ngram: int = MAX_NGRAM,
                min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of `context`'s last n tokens.

    A match close to the end continues into the draft itself (a period: "a b a b" drafts
    "a b ..."), so a loop drafts k tokens even when it is shorter than k. Empty without a match.
    """
    if k <= 0 or len(context) < 2:
        return []
    tokens = np.asarray(context, dtype=np.int64)
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        windows = sliding_window_view(tokens[:-1], n)  # every n-gram but the suffix itself
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # what followed the latest match
            draft: list[int] = []
            for j in range(k):
                index = start + j
                draft.append(int(tokens[index]) if index < len(tokens) else draft[index - len(tokens)])
            return draft
    return []
