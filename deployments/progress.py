"""A progress hook that crosses process boundaries: stages running in any
replica report to the job tracker actor."""

from __future__ import annotations

import math
import time
from typing import Any


class TrackerProgress:
    """Forwards `(stage, fraction, message)` to the tracker, fire-and-forget.

    Picklable (it holds only an actor handle), so the ingress passes it along
    with the audio to each stage deployment. Updates within one stage are
    thinned to one per `interval_s`; a stage's first and last always go.
    """

    def __init__(self, tracker: Any, key: str, worker: str, interval_s: float) -> None:
        self._tracker = tracker
        self._key = key
        self._worker = worker  # the lease token: a worker that lost the job is not listened to
        self._interval_s = interval_s
        self._last_sent: dict[str, float] = {}

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        if 0.0 < fraction < 1.0 and now - self._last_sent.get(stage, -math.inf) < self._interval_s:
            return
        self._last_sent[stage] = now
        self._tracker.progress.remote(self._key, self._worker, stage, fraction, message)
