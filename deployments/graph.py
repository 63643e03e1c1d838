"""The stages of `pipeline.analyzer.run_analysis` as calls to the stage deployments.

The decoded audio stays in Ray's object store: the extraction's response is
handed to the three stages as is, so each replica (on any node) reads it from
there. The ingress reads it too, for its duration only (a zero-copy view).
Transcription, diarization and the acoustic tracks each run on replicas of
their own: all at once with `jobs.stages_together`, otherwise in the order one
process runs them (diarization first), which is faster where they share a
machine's cores.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.errors import as_analyzer_error
from pipeline.acoustics import FrameTracks
from pipeline.analyzer import ALL_AT_ONCE, SHARED_CORES, AnalysisOptions, Source, Upload
from pipeline.asr import Transcript
from pipeline.config import JobSettings
from pipeline.diarization import Diarization
from pipeline.errors import ModelError
from pipeline.media import Audio
from pipeline.progress import ProgressHook

T = TypeVar("T")
log = logging.getLogger(__name__)


class Graph:
    """`Stages` over Serve handles: each call made again when its replica dies or it times out."""

    def __init__(
        self,
        extraction: DeploymentHandle,
        transcription: DeploymentHandle,
        diarization: DeploymentHandle,
        acoustics: DeploymentHandle,
        jobs: JobSettings,
    ) -> None:
        self._jobs = jobs
        self.phases = ALL_AT_ONCE if jobs.stages_together else SHARED_CORES
        self.stages = {
            "extraction": extraction,
            "transcription": transcription,
            "diarization": diarization,
            "acoustics": acoustics,
        }

    async def load(self, source: Source) -> tuple[Audio, Any]:
        if isinstance(source, Upload):
            return await self._call("extraction", "load_upload", str(source.path), source.filename)
        return await self._call("extraction", "load", source)

    async def transcribe(
        self, audio: Any, language: str, progress: ProgressHook, prompt: str | None = None
    ) -> Transcript:
        return (await self._call("transcription", "transcribe", audio, language, progress, prompt))[0]

    async def diarize(self, audio: Any, options: AnalysisOptions, progress: ProgressHook) -> Diarization:
        counts = (options.num_speakers, options.min_speakers, options.max_speakers)
        return (await self._call("diarization", "diarize", audio, *counts, progress))[0]

    async def tracks(self, audio: Any, progress: ProgressHook) -> FrameTracks:
        return (await self._call("acoustics", "tracks", audio, progress))[0]

    async def describe(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """Each stage's own report, or the reason it could not give one."""

        async def one(handle: DeploymentHandle) -> Any:
            try:
                return await asyncio.wait_for(handle.describe.remote(), timeout_s)
            except Exception as e:  # not ready, dead, or too busy to answer: all mean "not ready"
                return e

        answers = await asyncio.gather(*(one(h) for h in self.stages.values()))
        return dict(zip(self.stages, answers, strict=True))

    async def _call(self, stage: str, method: str, *args: Any) -> tuple[Any, Any]:
        """One stage call: its result, and the response (which later stages can take as an argument).

        Stage calls are idempotent, so a call whose replica died (Serve starts
        another) or that passed its deadline is made again, with backoff.
        Errors of the input itself are never retried.
        """
        jobs = self._jobs
        for attempt in range(1, jobs.stage_attempts + 1):
            response = getattr(self.stages[stage], method).remote(*args)
            try:
                return await _attempt(response, jobs.stage_timeout_s), response
            except (RayActorError, TimeoutError) as e:
                if attempt == jobs.stage_attempts:
                    raise _as_stage_error(stage, e) from e
                log.warning(
                    "%s call failed (%s); calling again (%d of %d)", stage, _why(e), attempt + 1, jobs.stage_attempts
                )
                await asyncio.sleep(jobs.stage_retry_backoff_s * 2 ** (attempt - 1))
            except Exception as e:
                error = as_analyzer_error(e)
                if error is e:
                    raise
                raise error from e
        raise AssertionError("unreachable: the last attempt returns or raises")


async def _attempt(response: Any, timeout_s: float) -> Any:
    try:
        return await asyncio.wait_for(_awaited(response), timeout_s)
    except BaseException:
        response.cancel()  # timed out, or our own caller gave up: the replica must not run on for nothing
        raise


async def _awaited(response: Awaitable[T]) -> T:
    return await response


def _why(error: BaseException) -> str:
    return "timed out" if isinstance(error, TimeoutError) else f"replica lost: {type(error).__name__}"


def _as_stage_error(stage: str, error: BaseException) -> ModelError:
    if isinstance(error, TimeoutError):
        return ModelError(f"the {stage} stage did not finish in time, even when called again")
    return ModelError(f"the {stage} stage lost its replica on every attempt; retry the request later")
