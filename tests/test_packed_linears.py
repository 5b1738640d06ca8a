"""oneDNN's packed weights for batched decode steps on a CPU (blocks/packed_linears.py): used only
for batches of `MIN_ROWS` rows or more inside `batched()`, without autograd; everything else is
`F.linear`, bit for bit. Packed results agree with `F.linear` to float32 rounding: 1e-5 absolute
on outputs of unit scale (a different summation order, nothing more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from blocks import packed_linears
from blocks.head import ModelHead
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import build_checkpoint
from blockserver.placement import bytes_per_block

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
TOLERANCE = 1e-5


@pytest.fixture
def packed_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Input shapes of every packed matmul while the test runs."""
    calls: list[tuple[int, ...]] = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(x, *args):
        calls.append(tuple(x.shape))
        return real(x, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    return calls


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 96)
    linear.weight.data /= 8  # outputs of unit scale
    packed_linears.pack(linear)
    return linear


def test_batched_rows_use_the_packed_weight_and_agree_with_f_linear(packed_calls):
    linear = _linear()
    x = torch.randn(6, 1, 64)
    with torch.inference_mode(), packed_linears.batched():
        out = linear(x)
    assert packed_calls == [(6, 1, 64)]
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("case", ["outside batched()", "too few rows", "autograd on"])
def test_everything_else_is_f_linear_bit_for_bit(case, packed_calls):
    linear = _linear()
    x = torch.randn(packed_linears.MIN_ROWS - 1 if case == "too few rows" else 6, 1, 64)
    expected = F.linear(x, linear.weight, linear.bias)
    if case == "outside batched()":
        with torch.inference_mode():
            out = linear(x)
    elif case == "too few rows":
        with torch.inference_mode(), packed_linears.batched():
            out = linear(x)
    else:
        x.requires_grad_(True)
        with packed_linears.batched():
            out = linear(x)
        out.sum().backward()  # training still differentiates through the plain weight
        assert x.grad is not None
    assert packed_calls == []
    assert torch.equal(out, expected)


def test_forward_hooks_still_apply_inside_batched(packed_calls):
    linear = _linear()
    linear.register_forward_hook(lambda module, args, output: output + 1)  # as LoRA's hook adds its term
    x = torch.randn(4, 64)
    with torch.inference_mode(), packed_linears.batched():
        out = linear(x)
    assert packed_calls == [(4, 64)]
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias) + 1, atol=TOLERANCE, rtol=0)


def test_cpu_spans_and_heads_pack_unless_turned_off(tiny_models, monkeypatch):
    path = tiny_models["llama"]
    span, head = BlockSpan(path, 0, 2), ModelHead(path)
    linears = [m for m in span.layers.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m.forward, packed_linears._PackedForward) for m in linears)
    assert isinstance(head.lm_head.forward, packed_linears._PackedForward)
    assert not packed_linears.enabled(torch.device("cuda"), torch.float32)
    assert not packed_linears.enabled(torch.device("cpu"), torch.float16)

    monkeypatch.setenv(packed_linears.ENV, "0")
    span = BlockSpan(path, 0, 2)
    assert not any(isinstance(m.forward, packed_linears._PackedForward) for m in span.layers.modules())


def test_spans_whose_steps_never_batch_keep_one_copy(tmp_path):
    """ALiBi layers (BLOOM) run every step alone: no packed copy, and placement counts none."""
    path = build_checkpoint(tmp_path / "bloom", family="bloom")
    span = BlockSpan(path, 0, 2)
    assert not any(isinstance(m.forward, packed_linears._PackedForward) for m in span.layers.modules())
    assert bytes_per_block(str(path), torch.float32, "none", cache_tokens=0) == span.block_bytes


def test_a_span_batch_of_four_rows_computes_packed_and_a_lone_step_does_not(tiny_models, packed_calls):
    span = BlockSpan(tiny_models["llama"], 0, 2)
    generator = torch.Generator().manual_seed(0)
    caches = []
    for length in (3, 5, 7, 9):
        caches.append((span.new_cache(), length))
        span.forward(torch.randn(1, length, span.hidden_size, generator=generator), cache=caches[-1][0], position=0)
    hidden = [torch.randn(1, 1, span.hidden_size, generator=generator) for _ in caches]
    packed_calls.clear()
    span.forward(torch.randn(1, 1, span.hidden_size, generator=generator), cache=span.new_cache(), position=0)
    assert packed_calls == []
    span.forward_batch([(h, cache, position) for h, (cache, position) in zip(hidden, caches)])
    assert packed_calls and all(shape[0] == 4 for shape in packed_calls)
