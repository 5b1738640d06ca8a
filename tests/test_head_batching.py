"""The gateway's combined LM head (gateway/inference/head_batching.py): concurrent callers get
exactly their own rows' logits, fewer head calls than callers happen under contention, and an
error reaches every caller of its round."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gateway.inference.head_batching import CombinedLogits

WEIGHT = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))


def slow_head(hidden: torch.Tensor) -> torch.Tensor:
    time.sleep(0.02)  # long enough that callers pile up behind a round
    return hidden @ WEIGHT.T


def test_concurrent_callers_get_their_own_logits_in_fewer_rounds():
    combined = CombinedLogits(slow_head)
    inputs = [torch.randn(1 + i % 3, 1, 8, generator=torch.Generator().manual_seed(i)) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(combined, inputs))
    for hidden, logits in zip(inputs, outputs):
        torch.testing.assert_close(logits, hidden @ WEIGHT.T, atol=1e-5, rtol=0)
    assert combined.rounds < len(inputs)


def test_calls_of_other_shapes_are_computed_in_their_own_rounds():
    combined = CombinedLogits(slow_head)
    inputs = [torch.randn(1, 1 + i % 2, 8) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(combined, inputs))
    for hidden, logits in zip(inputs, outputs):
        assert logits.shape == (1, hidden.shape[1], 50)
        torch.testing.assert_close(logits, hidden @ WEIGHT.T, atol=1e-5, rtol=0)


def test_an_error_reaches_every_caller_and_the_next_round_works():
    failing = threading.Event()
    failing.set()

    def head(hidden: torch.Tensor) -> torch.Tensor:
        time.sleep(0.02)
        if failing.is_set():
            raise RuntimeError("head failed")
        return hidden @ WEIGHT.T

    combined = CombinedLogits(head)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(combined, torch.randn(1, 1, 8)) for _ in range(4)]
        for future in futures:
            with pytest.raises(RuntimeError, match="head failed"):
                future.result()
    failing.clear()
    hidden = torch.randn(2, 1, 8)
    torch.testing.assert_close(combined(hidden), hidden @ WEIGHT.T, atol=1e-5, rtol=0)
