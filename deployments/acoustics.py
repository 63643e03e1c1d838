"""Acoustics deployment: frame-level volume, pitch and spectral tracks (stage 4)."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.api import StageInfo
from pipeline.acoustics import FrameTracks, frame_tracks, warm_up
from pipeline.config import Settings
from pipeline.media import Audio
from pipeline.progress import ProgressHook


@serve.deployment(name="Acoustics", max_ongoing_requests=4, ray_actor_options={"num_cpus": 0.2})
class Acoustics:
    """Pure numpy/librosa on each request's own arrays: safe to run requests in parallel threads."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings.acoustics
        warm_up(self._settings)

    async def tracks(self, audio: Audio, progress: ProgressHook) -> FrameTracks:
        return await asyncio.to_thread(frame_tracks, audio.samples, self._settings, progress)

    def describe(self) -> StageInfo:
        return StageInfo(model="librosa STFT + YIN", device="cpu")
