"""Token-id prompts for shared-prefix TTFT (the servers' prefix cache), one recipe for every benchmark."""

from __future__ import annotations

import random

TAIL = 24  # tokens after the shared prefix


def prefix_pairs(prefix: int, rounds: int, *, seed: int = 0) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """A warm-up prompt of the pairs' length (the first long prompt a swarm sees pays one-off costs:
    allocations, kernel choices), then `rounds` pairs of fresh prompts (first, sharing), where
    `sharing` starts with `first`'s first `prefix` tokens: a system prompt, a conversation's next turn."""
    rng = random.Random(seed)

    def fresh(tokens: int) -> list[int]:
        return [rng.randrange(10, 30000) for _ in range(tokens)]

    warm_up = fresh(prefix + TAIL)
    pairs = []
    for _ in range(rounds):
        first = fresh(prefix + TAIL)
        pairs.append((first, first[:prefix] + fresh(TAIL)))
    return warm_up, pairs
