"""Extraction deployment: fetch and decode media into `Audio` (stage 1)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from ray import serve

from deployments.api import StageInfo
from pipeline.config import Settings
from pipeline.errors import ModelError
from pipeline.media import Audio, MediaLoader


@serve.deployment(name="Extraction", max_ongoing_requests=8, ray_actor_options={"num_cpus": 0.2})
class Extraction:
    """Decoding runs ffmpeg in a child process, so requests proceed in parallel threads."""

    def __init__(self, settings: Settings) -> None:
        self._loader = MediaLoader(settings.media, settings.s3, settings.network)

    async def load(self, source: str) -> Audio:
        return await asyncio.to_thread(self._loader.load, source)

    async def load_upload(self, path: str, filename: str) -> Audio:
        """An upload the ingress spooled to `path` (its own file, so outside the local roots)."""
        return await asyncio.to_thread(self._loader.load_upload, Path(path), filename)

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes it replace the replica."""
        if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
            raise ModelError("ffmpeg or ffprobe is no longer on PATH")

    def describe(self) -> StageInfo:
        return StageInfo(model="ffmpeg", device="cpu")
