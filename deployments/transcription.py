"""Transcription deployment: WhisperX-style ASR with cross-request batching (stage 2)."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field
from ray import serve

from deployments.api import StageInfo
from pipeline.asr import Transcript, TranscriptionRequest, WhisperXTranscriber
from pipeline.config import Settings
from pipeline.errors import AnalyzerError
from pipeline.media import Audio
from pipeline.progress import ProgressHook


class BatchConfig(BaseModel):
    """`user_config` of the deployment: tunable live from serve config or the dashboard."""

    max_batch_size: int = Field(4, ge=1, description="Requests whose speech chunks are decoded together.")
    batch_wait_timeout_s: float = Field(0.1, ge=0, description="How long a request waits for others to join.")


@serve.deployment(
    name="Transcription",
    # Room for one batch being decoded and the next one filling up.
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 1},
    user_config=BatchConfig().model_dump(),
)
class Transcription:
    def __init__(self, settings: Settings) -> None:
        self._transcriber = WhisperXTranscriber(settings.asr, settings.cache_dir)

    def reconfigure(self, user_config: dict) -> None:
        config = BatchConfig.model_validate(user_config)
        self._batched.set_max_batch_size(config.max_batch_size)
        self._batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)

    async def transcribe(
        self, audio: Audio, language: str | None, progress: ProgressHook, prompt: str | None = None
    ) -> Transcript:
        outcome = await self._batched(TranscriptionRequest(audio.samples, language, progress, prompt))
        if isinstance(outcome, AnalyzerError):
            raise outcome  # one request's bad input must not fail the others in its batch
        return outcome

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.1)
    async def _batched(self, requests: list[TranscriptionRequest]) -> list[Transcript | AnalyzerError]:
        return await asyncio.to_thread(self._transcriber.transcribe_batch, requests)

    def check_health(self) -> None:
        """Serve calls this every few seconds; raising makes it replace the replica."""
        self._transcriber.check()

    def describe(self) -> StageInfo:
        return StageInfo(model=self._transcriber.model_name, device=self._transcriber.device)
