"""Quantized span weights through bitsandbytes (``swarmgate server --quant int8|nf4``).

A server with a small GPU serves more blocks when each takes less memory: LLM.int8() halves a
bf16 block, NF4 (4-bit NormalFloat, double-quantized statistics) takes about a quarter. Every
``nn.Linear`` of the span's layers is swapped for its bitsandbytes twin while the weights are still
on the CPU; bitsandbytes quantizes them as the module moves to the GPU, so at most one
full-precision matrix at a time occupies GPU memory. Norms, biases and activations keep the span's
dtype. bitsandbytes is imported only here and only when asked for: its quantized matmuls are GPU
kernels.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

QUANT_MODES = ("none", "int8", "nf4")
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold: activation columns above it stay in 16 bits


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs on every int8 matmul that it casts bf16 inputs to fp16 (by design): log noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


_CAST_NOTICE_FILTER = _DropCastNotice()


def check_quant(mode: str, device: torch.device | str) -> None:
    """A clear error for a mode this device cannot run, before anything is loaded."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if mode != "none" and torch.device(device).type != "cuda":
        raise ValueError(
            f"--quant {mode} needs --device cuda: bitsandbytes' {mode} matmuls run on the GPU; "
            "on the CPU use --quant none"
        )


def quantize_linears(module: nn.Module, mode: str, compute_dtype: torch.dtype) -> None:
    """Replace every ``nn.Linear`` below ``module`` (CPU weights) by a bitsandbytes one, in place.

    The weights are quantized when the module is then moved to a CUDA device.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, _quantized_linear(child, mode, compute_dtype))
        else:
            quantize_linears(child, mode, compute_dtype)


def _quantized_linear(linear: nn.Linear, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    shape = dict(input_features=linear.in_features, output_features=linear.out_features,
                 bias=linear.bias is not None, device="meta")
    if mode == "int8":
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CAST_NOTICE_FILTER)  # once: a set
        new = bnb.nn.Linear8bitLt(**shape, has_fp16_weights=False, threshold=INT8_THRESHOLD)
        new.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    elif mode == "nf4":
        new = bnb.nn.Linear4bit(**shape, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
        new.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, module=new
        )
    else:
        raise ValueError(f"cannot quantize to {mode!r}")
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's weights as stored, quantization statistics included.

    bitsandbytes puts its per-block scales into the state dict next to the packed weights, so
    this counts what a quantized layer really holds.
    """
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if isinstance(t, torch.Tensor))
