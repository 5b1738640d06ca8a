"""A server's own speed: measured on the real span, cached on disk between runs.

The announced throughput drives routing (clients pick fast chains) and placement (servers take
the weakest blocks), so it is measured, not guessed. A span's speed depends on the checkpoint, how
many blocks it holds and the hardware, not on which blocks they are, so a restart or a move to
another span of the same length reuses the measurement.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from blocks.checkpoint import cache_root
from blocks.span import BlockSpan
from common.atomic_files import write_file_atomic

logger = logging.getLogger(__name__)


def measure(span: BlockSpan, *, seconds: float = 0.25, max_steps: int = 64) -> float:
    """Single-token decode speed of the whole span (tokens/s), after a short warm-up."""
    hidden = torch.randn(1, 1, span.hidden_size, dtype=span.dtype, device=span.device)
    cache = span.new_cache()
    for position in range(2):
        span.forward(hidden, cache=cache, position=position)
    steps, started = 0, time.perf_counter()
    while steps < max_steps and (steps < 4 or time.perf_counter() - started < seconds):
        span.forward(hidden, cache=cache, position=2 + steps)
        steps += 1
    if span.device.type == "cuda":
        torch.cuda.synchronize(span.device)
    return steps / max(time.perf_counter() - started, 1e-9)


def device_name(device: torch.device) -> str:
    """The hardware a measurement holds for: the GPU model, or the CPU with its thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()}threads"


class ThroughputCache:
    """A JSON file of measurements keyed by checkpoint, span length, device, dtype and quantization."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_root() / "throughput.json"

    @staticmethod
    def key(checkpoint: str, span: BlockSpan) -> str:
        return f"{checkpoint}/{span.num_layers}/{device_name(span.device)}/{span.dtype}/{span.quant}"

    def _read(self) -> dict[str, float]:
        try:
            return {k: float(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}  # absent or damaged: measure again

    def get(self, key: str) -> float | None:
        return self._read().get(key)

    def put(self, key: str, value: float) -> None:
        """Atomically, so concurrent servers never read half a file."""
        entries = self._read() | {key: value}
        write_file_atomic(self.path, json.dumps(entries, indent=1, sort_keys=True).encode())


def span_throughput(span: BlockSpan, checkpoint: str, cache: ThroughputCache | None) -> float:
    """The cached measurement for this kind of span, else a fresh one (then cached)."""
    key = ThroughputCache.key(checkpoint, span)
    if cache is not None and (known := cache.get(key)) is not None:
        logger.info("throughput %.1f tokens/s from %s", known, cache.path)
        return known
    value = measure(span)
    if cache is not None:
        try:
            cache.put(key, value)
        except OSError as error:
            logger.warning("could not cache the throughput in %s: %s", cache.path, error)
    return value
