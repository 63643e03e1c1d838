"""One analysis through the stage deployments: extraction first; then
transcription, diarization and acoustic tracks concurrently; then assembly.

The decoded audio stays in Ray's object store: the extraction's response is
handed to the three stages as is, so each replica (on any node) reads it from
there. The ingress reads it too, for its duration only (a zero-copy view).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.bodies import SpooledUpload
from deployments.errors import as_analyzer_error
from pipeline.analyzer import AnalysisOptions, build_result
from pipeline.config import JobSettings
from pipeline.errors import ModelError
from pipeline.progress import ProgressHook
from pipeline.schemas import AnalysisResult

T = TypeVar("T")
log = logging.getLogger(__name__)


class Graph:
    def __init__(
        self,
        extraction: DeploymentHandle,
        transcription: DeploymentHandle,
        diarization: DeploymentHandle,
        acoustics: DeploymentHandle,
        jobs: JobSettings,
    ) -> None:
        self._jobs = jobs
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
        if isinstance(source, SpooledUpload):
            load = ("load_upload", str(source.path), source.filename)
        else:
            load = ("load", source)
        audio, audio_ref = await self._call(timings, "extraction", *load)
        progress("media", 1.0, f"decoded {audio.duration:.1f} s of audio")

        calls = [
            self._call(timings, "transcription", "transcribe", audio_ref, options.language, progress),
            self._call(
                timings,
                "diarization",
                "diarize",
                audio_ref,
                options.num_speakers,
                options.min_speakers,
                options.max_speakers,
                progress,
            ),
            self._call(timings, "acoustics", "tracks", audio_ref, progress),
        ]
        tasks = [asyncio.ensure_future(call) for call in calls]
        try:
            (transcript, _), (diarization, _), (tracks, _) = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:  # one stage failed: do not let the others run on for nothing
                task.cancel()
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

    async def _call(self, timings: dict[str, float], stage: str, method: str, *args: Any) -> tuple[Any, Any]:
        """One stage call: its result, and the response (which later stages can take as an argument).

        Stage calls are idempotent, so a call whose replica died (Serve starts
        another) or that passed its deadline is made again, with backoff.
        Errors of the input itself are never retried.
        """
        jobs = self._jobs
        t0 = time.perf_counter()
        try:
            for attempt in range(1, jobs.stage_attempts + 1):
                response = getattr(self.stages[stage], method).remote(*args)
                try:
                    return await _attempt(response, jobs.stage_timeout_s), response
                except (RayActorError, TimeoutError) as e:
                    if attempt == jobs.stage_attempts:
                        raise _as_stage_error(stage, e) from e
                    log.warning(
                        "%s call failed (%s); calling again (%d of %d)",
                        stage,
                        _why(e),
                        attempt + 1,
                        jobs.stage_attempts,
                    )
                    await asyncio.sleep(jobs.stage_retry_backoff_s * 2 ** (attempt - 1))
                except Exception as e:
                    error = as_analyzer_error(e)
                    if error is e:
                        raise
                    raise error from e
            raise AssertionError("unreachable: the last attempt returns or raises")
        finally:
            timings["media" if stage == "extraction" else stage] = round(time.perf_counter() - t0, 3)


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
