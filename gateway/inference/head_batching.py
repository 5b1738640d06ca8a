"""The gateway's LM head, one matmul for all concurrent generations.

Each generation samples in its own worker thread; when several reach the LM head at once, one of
them (the first) computes the logits of every waiting row in a single call and hands each its
part; calls that arrive meanwhile go in the leader's next round. A lone generation computes
alone at once: nothing waits for company. The LM head's weight (vocabulary x hidden) is read once
per round instead of once per generation, which is most of its cost for one token.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CombinedLogits", "combined_logits", "head_load"]


@dataclass(eq=False)
class _Call:
    hidden: torch.Tensor
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    error: BaseException | None = None


class CombinedLogits:
    def __init__(self, logits: Callable[[torch.Tensor], torch.Tensor]):
        self._logits = logits
        self._lock = threading.Lock()
        self._waiting: list[_Call] = []
        self._leading = False
        self.rounds = 0  # calls of the underlying head (tests, metrics)
        self.calls = 0  # generations' calls those rounds served: calls / rounds is the mean sharing

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """`logits(hidden)` for hidden [rows, tokens, h], maybe computed with other callers' rows."""
        call = _Call(hidden)
        with self._lock:
            self._waiting.append(call)
            lead, self._leading = not self._leading, True
        if lead:
            self._lead()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.logits is not None
        return call.logits

    def _lead(self) -> None:
        """Rounds until nobody waits: each computes every waiting call of one shape at once."""
        while True:
            with self._lock:
                if not self._waiting:
                    self._leading = False
                    return
                shape = self._waiting[0].hidden.shape[1:]
                calls = [c for c in self._waiting if c.hidden.shape[1:] == shape]
                self._waiting = [c for c in self._waiting if c.hidden.shape[1:] != shape]
            try:
                logits = self._logits(torch.cat([c.hidden for c in calls]))
                self.rounds += 1
                self.calls += len(calls)
                for c, part in zip(calls, logits.split([c.hidden.shape[0] for c in calls])):
                    c.logits = part
            except BaseException as error:  # every caller of the round gets it
                for c in calls:
                    c.error = error
            for c in calls:
                c.done.set()


_combined: weakref.WeakKeyDictionary[Any, CombinedLogits] = weakref.WeakKeyDictionary()
_combined_lock = threading.Lock()


def combined_logits(head: Any) -> CombinedLogits:
    """The one `CombinedLogits` over `head.logits` (per head object)."""
    with _combined_lock:
        if (combined := _combined.get(head)) is None:
            combined = _combined[head] = CombinedLogits(head.logits)
        return combined


def head_load() -> tuple[int, int]:
    """LM-head rounds and the generations' calls they served, over every head of this process."""
    with _combined_lock:
        heads = list(_combined.values())
    return sum(h.rounds for h in heads), sum(h.calls for h in heads)
