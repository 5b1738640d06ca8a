"""Drill mode (``swarmgate server --drill-corrupt P``): a server that lies on purpose.

Verification of untrusted servers (swarm/trust/) has to be shown catching a liar, and users
should be able to rehearse it on their own swarm. A drill server adds noise to a random
fraction P of its outputs — inference steps (prefill and decode), cache-less forwards, and
training forwards and backwards — after computing them and before the wire codec, so the
corrupted bytes are exactly what a dishonest server would send (and push on along a chain).

``--drill-only KIND`` limits the lies to one kind of output (``prefill``, ``decode``, ``forward``,
``backward``): a liar that answers what is easy to watch honestly and lies elsewhere, which shows
each kind is checked on its own.

The noise is unmistakable: Gaussian, with a standard deviation equal to each row's RMS (along
the last dimension), so a corrupted output's relative error is ~1, far beyond any codec or
quantization tolerance. Which outputs are corrupted is drawn per output, unpredictably. P = 0
is an honest server: outputs are returned untouched.
"""

from __future__ import annotations

import random
from typing import Any, TypeVar

import torch

Output = TypeVar("Output")


KINDS = ("prefill", "decode", "forward", "backward")


class Drill:
    def __init__(self, fraction: float = 0.0, rng: random.Random | None = None, only: str | None = None) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the drill's corrupt fraction must be in [0, 1], got {fraction}")
        if only is not None and only not in KINDS:
            raise ValueError(f"the drill's kind must be one of {', '.join(KINDS)}, got {only!r}")
        self.fraction = fraction
        self.only = only
        self._rng = rng or random.Random()
        self.corrupted = 0  # outputs corrupted so far (metrics, tests)

    def __call__(self, output: Output, kind: str) -> Output:
        """`output` of `kind` (one of KINDS) — a tensor, or a tuple or dict of them (one output,
        corrupted as a whole) — or, with probability `fraction`, a noisy copy of it. One draw per
        output; runs in the compute thread, like the computation it corrupts."""
        if self.fraction == 0.0 or self.only not in (None, kind) or self._rng.random() >= self.fraction:
            return output
        self.corrupted += 1
        return _noisy_all(output)


def _noisy_all(output: Any) -> Any:
    if output is None:  # a gradient not asked for
        return None
    if isinstance(output, torch.Tensor):
        return noisy(output)
    if isinstance(output, dict):
        return {key: _noisy_all(value) for key, value in output.items()}
    return type(output)(_noisy_all(value) for value in output)


def noisy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` plus Gaussian noise of each row's RMS (1 for an all-zero row, which must change too)."""
    values = tensor.float()
    rms = values.pow(2).mean(dim=-1, keepdim=True).sqrt() if values.dim() else values.abs()
    scale = torch.where(rms > 0, rms, torch.ones_like(rms))
    noise = torch.randn(values.shape, device=values.device) * scale
    return (values + noise).to(tensor.dtype)
