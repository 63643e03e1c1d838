"""One analysis through the stage deployments: extraction first; then
transcription, diarization and acoustic tracks concurrently; then assembly.

The decoded audio stays in Ray's object store: the extraction's response is
handed to the three stages as is, so each replica (on any node) reads it from
there. The ingress reads it too, for its duration only (a zero-copy view).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from ray.serve.handle import DeploymentHandle

from deployments.bodies import SpooledUpload
from deployments.errors import as_analyzer_error
from pipeline.analyzer import AnalysisOptions, build_result
from pipeline.media import Audio
from pipeline.progress import ProgressHook
from pipeline.schemas import AnalysisResult

T = TypeVar("T")


class Graph:
    def __init__(
        self,
        extraction: DeploymentHandle,
        transcription: DeploymentHandle,
        diarization: DeploymentHandle,
        acoustics: DeploymentHandle,
    ) -> None:
        self.stages = {
            "extraction": extraction,
            "transcription": transcription,
            "diarization": diarization,
            "acoustics": acoustics,
        }

    async def analyze(
        self, source: str | SpooledUpload, options: AnalysisOptions, progress: ProgressHook, timings: dict[str, float]
    ) -> AnalysisResult:
        """Run every stage; `timings` receives each stage's wall time as the ingress saw it."""
        started = time.perf_counter()
        progress("media", 0.0, "reading media")
        extraction = self.stages["extraction"]
        if isinstance(source, SpooledUpload):
            audio_ref = extraction.load_upload.remote(str(source.path), source.filename)
        else:
            audio_ref = extraction.load.remote(source)
        audio: Audio = await _timed(timings, "media", audio_ref)
        progress("media", 1.0, f"decoded {audio.duration:.1f} s of audio")

        calls = [
            self.stages["transcription"].transcribe.remote(audio_ref, options.language, progress),
            self.stages["diarization"].diarize.remote(
                audio_ref, options.num_speakers, options.min_speakers, options.max_speakers, progress
            ),
            self.stages["acoustics"].tracks.remote(audio_ref, progress),
        ]
        try:
            transcript, diarization, tracks = await asyncio.gather(
                *(_timed(timings, stage, call) for stage, call in zip(STAGES, calls, strict=True))
            )
        except BaseException:
            for call in calls:  # one stage failed: do not let the others run on for nothing
                call.cancel()
            raise
        result = await asyncio.to_thread(
            build_result, transcript, diarization, tracks, audio.duration, timings, started
        )
        progress("assembly", 1.0, "analysis complete")
        return result

    async def describe(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Each stage's own report, or the reason it could not give one."""

        async def one(handle: DeploymentHandle) -> Any:
            try:
                return await asyncio.wait_for(handle.describe.remote(), timeout_s)
            except Exception as e:  # not ready, dead, or too busy to answer: all mean "not ready"
                return e

        answers = await asyncio.gather(*(one(h) for h in self.stages.values()))
        return dict(zip(self.stages, answers, strict=True))


STAGES = ("transcription", "diarization", "acoustics")


async def _timed(timings: dict[str, float], stage: str, call: Awaitable[T]) -> T:
    t0 = time.perf_counter()
    try:
        return await call
    except Exception as e:
        error = as_analyzer_error(e)
        if error is e:
            raise
        raise error from e
    finally:
        timings[stage] = round(time.perf_counter() - t0, 3)
