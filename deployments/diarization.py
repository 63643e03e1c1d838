"""Diarization deployment: who spoke when, with pyannote.audio (stage 3)."""

from __future__ import annotations

import asyncio
import threading

from ray import serve

from deployments.api import StageInfo
from pipeline.config import Settings
from pipeline.diarization import Diarization, PyannoteDiarizer
from pipeline.media import Audio
from pipeline.progress import ProgressHook


@serve.deployment(name="Diarization", max_ongoing_requests=2, ray_actor_options={"num_cpus": 0.5})
class SpeakerDiarization:
    def __init__(self, settings: Settings) -> None:
        self._diarizer = PyannoteDiarizer(settings.diarization)
        # A pyannote pipeline keeps per-call state on itself: one call at a time per replica.
        self._lock = threading.Lock()

    async def diarize(
        self,
        audio: Audio,
        num_speakers: int | None,
        min_speakers: int | None,
        max_speakers: int | None,
        progress: ProgressHook,
    ) -> Diarization:
        return await asyncio.to_thread(self._run, audio, num_speakers, min_speakers, max_speakers, progress)

    def _run(
        self, audio: Audio, num: int | None, lo: int | None, hi: int | None, progress: ProgressHook
    ) -> Diarization:
        with self._lock:
            return self._diarizer.diarize(audio.samples, num, lo, hi, progress)

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes it replace the replica."""
        self._diarizer.check()

    def describe(self) -> StageInfo:
        return StageInfo(model=self._diarizer.model_name, device=self._diarizer.device)
