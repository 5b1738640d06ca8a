"""Tensor <-> wire encoding: raw bytes plus dtype and shape, optionally compressed.

Hidden states dominate the traffic, so they travel as 8-bit blockwise-quantized values
(bitsandbytes' dynamic map, one float32 absmax per block: ~1.002 bytes per element) unless a
lossless or half-precision codec is asked for. Decoding validates everything before touching
the bytes; nothing here can execute data.
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch

CODECS = ("none", "float16", "bfloat16", "int8")
# Small blocks keep one massive-activation channel from flattening its neighbours: SmolLM2's
# attention-sink token carries a 24,890 channel beside a median of 2.3, and with 2048-element blocks
# (3.5 tokens) the embedded model's answers turn to noise; 64 costs 1/16 byte per element of scales.
INT8_BLOCKSIZE = 64

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class CodecError(ValueError):
    """A tensor message is malformed or breaks a limit."""


def _bnb():
    import bitsandbytes.functional as bnb_functional  # imported lazily: slow, and noisy on CPU

    return bnb_functional


_dynamic_code: torch.Tensor | None = None


def _code() -> torch.Tensor:
    global _dynamic_code
    if _dynamic_code is None:
        _dynamic_code = _bnb().create_dynamic_map(signed=True)
    return _dynamic_code


_direct: Any = None  # bitsandbytes' CPU kernels called through ctypes, or False where absent


def _cpu_kernels() -> Any:
    """bitsandbytes' own float32 CPU blockwise kernels, called directly.

    The same C functions its ``quantize_blockwise``/``dequantize_blockwise`` run on CPU (so the
    bytes are identical), without the torch.library dispatch around them, which costs more than
    the kernel for one decode step's hidden state (~35 us of ~85 us per call for 768 values).
    """
    global _direct
    if _direct is None:
        _bnb()
        try:
            from bitsandbytes.cextension import lib
            from bitsandbytes.functional import get_ptr

            _direct = (lib.cquantize_blockwise_cpu_fp32, lib.cdequantize_blockwise_cpu_fp32, get_ptr)
        except (ImportError, AttributeError):
            _direct = False
    return _direct


def _quantize(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [n] on CPU -> (uint8 [n], float32 absmax per block)."""
    kernels = _cpu_kernels()
    if not kernels:
        quantized, state = _bnb().quantize_blockwise(flat, code=_code(), blocksize=INT8_BLOCKSIZE)
        return quantized, state.absmax.float()
    quantize, _, ptr = kernels
    flat = flat.contiguous()
    absmax = torch.empty(math.ceil(flat.numel() / INT8_BLOCKSIZE), dtype=torch.float32)
    quantized = torch.empty(flat.shape, dtype=torch.uint8)
    quantize(ptr(_code()), ptr(flat), ptr(absmax), ptr(quantized), ctypes.c_longlong(INT8_BLOCKSIZE),
             ctypes.c_longlong(flat.numel()))
    return quantized, absmax


def _dequantize(quantized: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    kernels = _cpu_kernels()
    if not kernels:
        return _bnb().dequantize_blockwise(quantized, absmax=absmax, code=_code(), blocksize=INT8_BLOCKSIZE)
    _, dequantize, ptr = kernels
    values = torch.empty(quantized.shape, dtype=torch.float32)
    dequantize(ptr(_code()), ptr(quantized), ptr(absmax), ptr(values), ctypes.c_longlong(INT8_BLOCKSIZE),
               ctypes.c_longlong(quantized.numel()))
    return values


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes()


def encode(tensor: torch.Tensor, codec: str) -> dict[str, Any]:
    """Encode a floating tensor for the wire; the original dtype is restored on decode."""
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected one of {CODECS}")
    if tensor.dtype not in _DTYPE_NAMES:
        raise CodecError(f"cannot send dtype {tensor.dtype}")
    tensor = tensor.detach().to("cpu")
    message: dict[str, Any] = {
        "codec": codec,
        "dtype": _DTYPE_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
    }
    if codec == "none":
        message["data"] = _raw_bytes(tensor)
    elif codec in ("float16", "bfloat16"):
        message["data"] = _raw_bytes(tensor.to(_DTYPES[codec]))
    else:
        flat = tensor.reshape(-1).float()
        quantized, absmax = _quantize(flat)
        message["data"] = _raw_bytes(quantized)
        message["absmax"] = _raw_bytes(absmax)
    return message


def token_blocks(message: dict[str, Any], tokens: int, count: int, *, skip: int = 0) -> list[tuple[bytes | memoryview, ...]]:
    """Runs `skip` to `skip + count` of `tokens` tokens each of a decoded-and-checked [1, n, hidden]
    tensor map, as byte parts: codec, dtype and hidden size, then the run's wire bytes, which are
    what encoding those tokens alone gives. What prefix keys hash (blocks/prefix_cache.py); []
    where a run's bytes depend on its neighbours (int8 scale blocks across runs)."""
    hidden = message["shape"][-1]
    header = f"{message['codec']}:{message['dtype']}:{hidden}".encode()
    data = memoryview(message["data"])
    per_run = len(data) // message["shape"][-2] * tokens if message["shape"][-2] else 0
    if message["codec"] != "int8":
        return [(header, data[i * per_run : (i + 1) * per_run]) for i in range(skip, skip + count)]
    if tokens * hidden % INT8_BLOCKSIZE:
        return []
    scales, per_scales = memoryview(message["absmax"]), tokens * hidden // INT8_BLOCKSIZE * 4
    return [(header, data[i * per_run : (i + 1) * per_run], scales[i * per_scales : (i + 1) * per_scales])
            for i in range(skip, skip + count)]


def rows_apart(codec: str, row_elements: int) -> bool:
    """Whether rows of `row_elements` values encode apart under `codec`: joined or cut along the
    first dimension (`join_rows`, `split_rows`), their maps are what encoding the whole or each
    part gives (int8's scale blocks must not straddle two rows)."""
    return codec != "int8" or row_elements % INT8_BLOCKSIZE == 0


def join_rows(messages: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensor maps of one codec, dtype and row shape joined along their first dimension (where
    `rows_apart`): the map of the concatenated tensor, without decoding anything."""
    first = messages[0]
    joined = {"codec": first["codec"], "dtype": first["dtype"],
              "shape": [sum(message["shape"][0] for message in messages), *first["shape"][1:]],
              "data": b"".join(message["data"] for message in messages)}
    if "absmax" in first:
        joined["absmax"] = b"".join(message["absmax"] for message in messages)
    return joined


def split_rows(message: Any, rows: list[int]) -> list[dict[str, Any]]:
    """A tensor map cut along its first dimension into maps of `rows` rows each (where
    `rows_apart`); the parts are decoded, and so checked, wherever they are used."""
    shape, data = _field(message, "shape", list), _field(message, "data", bytes)
    total, absmax = sum(rows), message.get("absmax", b"")
    if not shape or shape[0] != total or not total or len(data) % total or not isinstance(absmax, bytes) \
            or len(absmax) % total:
        raise CodecError(f"a tensor of shape {shape} does not split into rows {rows}")
    per_row, per_scales = len(data) // total, len(absmax) // total
    parts, start = [], 0
    for count in rows:
        part = {**message, "shape": [count, *shape[1:]], "data": data[start * per_row:(start + count) * per_row]}
        if "absmax" in message:
            part["absmax"] = absmax[start * per_scales:(start + count) * per_scales]
        parts.append(part)
        start += count
    return parts


def _field(message: dict[str, Any], key: str, kind: type) -> Any:
    value = message.get(key)
    if not isinstance(value, kind):
        raise CodecError(f"tensor field {key!r} must be {kind.__name__}")
    return value


def decode(message: Any, *, max_elements: int) -> torch.Tensor:
    """Decode and validate a tensor message (sizes are checked before any byte is interpreted)."""
    if not isinstance(message, dict):
        raise CodecError("tensor must be a map")
    codec = _field(message, "codec", str)
    dtype_name = _field(message, "dtype", str)
    shape = _field(message, "shape", list)
    data = _field(message, "data", bytes)
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}")
    if dtype_name not in _DTYPES:
        raise CodecError(f"unsupported dtype {dtype_name!r}")
    if len(shape) > 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CodecError(f"bad shape {shape!r}")
    numel = math.prod(shape)
    if numel > max_elements:
        raise CodecError(f"tensor of {numel} elements exceeds the limit of {max_elements}")
    dtype = _DTYPES[dtype_name]

    if codec == "int8":
        absmax = _field(message, "absmax", bytes)
        blocks = math.ceil(numel / INT8_BLOCKSIZE)
        if len(data) != numel or len(absmax) != 4 * blocks:
            raise CodecError("int8 tensor payload does not match its shape")
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        quantized = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        scales = torch.frombuffer(bytearray(absmax), dtype=torch.float32)
        return _dequantize(quantized, scales).reshape(shape).to(dtype)

    wire_dtype = dtype if codec == "none" else _DTYPES[codec]
    if len(data) != numel * wire_dtype.itemsize:
        raise CodecError("tensor payload does not match its shape and dtype")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    values = torch.frombuffer(bytearray(data), dtype=wire_dtype).reshape(shape)
    return values.to(dtype)
