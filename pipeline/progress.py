"""Progress reporting shared by all stages.

A stage calls `hook(stage, fraction, message)` with `fraction` in [0, 1] of its
own work; `StagedProgress` maps those onto one overall 0-100 scale that never
goes down, which is what jobs report to their callbacks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol


class ProgressHook(Protocol):
    def __call__(self, stage: str, fraction: float, message: str) -> None: ...


def no_progress(stage: str, fraction: float, message: str) -> None:
    """A hook that discards progress."""


class StagedProgress:
    """Turns per-stage fractions into a monotonic overall percentage.

    `weights` gives each stage's share of the whole; stages may report
    concurrently (from threads), so updates are serialised. `start` is a floor:
    an analysis run again after a crash reports nothing below where it got to.
    """

    def __init__(self, weights: Mapping[str, float], sink: Callable[[float, str], None], start: float = 0.0) -> None:
        total = sum(weights.values())
        self._weights = {stage: w / total for stage, w in weights.items()}
        self._done: dict[str, float] = dict.fromkeys(weights, 0.0)
        self._sink = sink
        self._last = start
        self._lock = threading.Lock()

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        with self._lock:
            if stage in self._done:
                self._done[stage] = max(self._done[stage], min(max(fraction, 0.0), 1.0))
            overall = 100.0 * sum(self._weights[s] * f for s, f in self._done.items())
            # Rounding can wobble by an ulp; the contract is "never goes down".
            self._last = max(self._last, min(overall, 100.0))
            self._sink(round(self._last, 1), message)
