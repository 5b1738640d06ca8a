"""Token-id prompts for shared-prefix TTFT (the servers' prefix cache), one recipe for every benchmark."""

from __future__ import annotations

import random

TAIL = 24  # tokens after the shared prefix


def prefix_pairs(prefix: int, rounds: int, *, seed: int = 0) -> tuple[list[list[int]], list[tuple[list[int], list[int]]]]:
    """Warm-up prompts — one of the pairs' length, then one sharing its start (the first long
    prompt a swarm sees, and the first served from its prefix cache, pay one-off costs:
    allocations, kernel choices for their shapes) — then `rounds` pairs of fresh prompts (first,
    sharing), where `sharing` starts with `first`'s first `prefix` tokens: a system prompt, a
    conversation's next turn."""
    rng = random.Random(seed)

    def fresh(tokens: int) -> list[int]:
        return [rng.randrange(10, 30000) for _ in range(tokens)]

    def pair() -> tuple[list[int], list[int]]:
        first = fresh(prefix + TAIL)
        return first, first[:prefix] + fresh(TAIL)

    warm_up = list(pair())
    return warm_up, [pair() for _ in range(rounds)]
