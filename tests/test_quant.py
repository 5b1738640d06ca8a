"""blocks/quant.py: int8/nf4 spans through bitsandbytes; accuracy and memory checks need a GPU.

Stated tolerances, on random-weight Llama layers with hidden 1024 (so bitsandbytes' real int8 and
nf4 kernels run), against the same span in bf16, as ||out - ref|| / ||ref - in|| (the error
relative to what the layers add to the residual stream): int8 < 3%, nf4 < 20% (benchmarks/
quantization.py has the measured numbers). Memory per block: int8 <= 0.6x bf16, nf4 <= 0.35x.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from blocks.quant import check_quant, quantize_linears, weight_bytes
from blocks.span import BlockSpan
from blocks.tiny_checkpoints import build_checkpoint

TOLERANCE = {"int8": 0.03, "nf4": 0.20}
MEMORY_RATIO = {"int8": 0.6, "nf4": 0.35}

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' int8/nf4 kernels need a CUDA GPU")


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quant_on_cpu_is_a_clear_error(mode, llama_path):
    with pytest.raises(ValueError, match=f"--quant {mode} needs --device cuda"):
        check_quant(mode, "cpu")
    with pytest.raises(ValueError, match="needs --device cuda"):
        BlockSpan(llama_path, 0, 2, quant=mode)
    with pytest.raises(ValueError, match="unknown quantization"):
        check_quant("int3", "cuda")


def test_linears_are_swapped_for_bitsandbytes_ones():
    bnb = pytest.importorskip("bitsandbytes")
    block = nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.Sequential(nn.Linear(128, 64, bias=False)))
    quantize_linears(block, "nf4", torch.bfloat16)
    assert isinstance(block[0], bnb.nn.Linear4bit) and isinstance(block[2][0], bnb.nn.Linear4bit)
    assert isinstance(block[1], nn.LayerNorm)
    assert block[0].bias is not None and block[2][0].bias is None


def test_unquantized_block_bytes_count_every_weight(llama_path):
    span = BlockSpan(llama_path, 0, 2)
    params = sum(p.numel() * p.element_size() for p in span.layers.parameters())
    assert span.quant == "none" and span.block_bytes == params // 2 == weight_bytes(span.layers) // 2


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("quant") / "llama-1024", family="llama", num_layers=2,
                            hidden_size=1024, intermediate_size=2816, num_heads=16, num_kv_heads=4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_span_close_to_bf16_and_smaller(mode, gpu_model):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 24, 1024, generator=generator).to("cuda", torch.bfloat16)
    reference = BlockSpan(gpu_model, 0, 2, dtype=torch.bfloat16, device="cuda")
    quantized = BlockSpan(gpu_model, 0, 2, dtype=torch.bfloat16, device="cuda", quant=mode)

    ref = reference.forward(hidden).float()
    out = quantized.forward(hidden).float()
    assert out.dtype == ref.dtype and torch.isfinite(out).all()
    error = ((out - ref).norm() / (ref - hidden.float()).norm()).item()
    assert error < TOLERANCE[mode], error

    cache = quantized.new_cache()  # cached decode matches the cache-less pass
    first = quantized.forward(hidden[:, :20], cache=cache, position=0)
    last = quantized.forward(hidden[:, 20:], cache=cache, position=20)
    torch.testing.assert_close(torch.cat([first, last], 1).float(), out, atol=0.05, rtol=0.05)

    assert quantized.quant == mode
    assert quantized.block_bytes <= MEMORY_RATIO[mode] * reference.block_bytes, (
        quantized.block_bytes, reference.block_bytes)
