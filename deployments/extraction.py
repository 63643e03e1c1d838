"""Extraction deployment: fetch and decode media into `Audio` (stage 1)."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.api import StageInfo
from pipeline.config import Settings
from pipeline.media import Audio, MediaLoader


@serve.deployment(name="Extraction", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.2})
class Extraction:
    """Decoding runs ffmpeg in a child process, so requests proceed in parallel threads."""

    def __init__(self, settings: Settings) -> None:
        self._loader = MediaLoader(settings.media, settings.s3)

    async def load(self, source: str) -> Audio:
        return await asyncio.to_thread(self._loader.load, source)

    async def load_bytes(self, data: bytes, filename: str) -> Audio:
        return await asyncio.to_thread(self._loader.load_bytes, data, filename)

    def describe(self) -> StageInfo:
        return StageInfo(model="ffmpeg", device="cpu")
