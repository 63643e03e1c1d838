"""One description of an analysis, and its in-process runner.

`run_analysis(stages, ...)` is the analysis: media first; then transcription,
diarization and the acoustic tracks, which need only the audio; then assembly.
It times each stage and reports progress. Where the stages run is the `Stages`
given to it: `Analyzer` below runs them in this process (the CLI, benchmarks,
tests), `deployments.graph.Graph` calls them over Ray Serve handles.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, Field, model_validator

from pipeline.acoustics import FrameTracks, frame_tracks, warm_up
from pipeline.asr import SpeechRecognizer, Transcript, WhisperXTranscriber, check_language
from pipeline.assembly import assemble
from pipeline.config import Settings
from pipeline.diarization import Diarization, Diarizer, PyannoteDiarizer, check_speaker_counts
from pipeline.media import Audio, MediaLoader
from pipeline.progress import ProgressHook, StagedProgress
from pipeline.schemas import AnalysisResult, Metadata

T = TypeVar("T")

# Rough share of wall time per stage on CPU, so overall progress moves evenly.
STAGE_WEIGHTS = {"media": 5, "transcription": 55, "diarization": 30, "acoustics": 5, "assembly": 5}
Phases = tuple[tuple[str, ...], ...]
# Where the stages share one machine's cores: see `Analyzer`.
SHARED_CORES: Phases = (("diarization",), ("transcription", "acoustics"))
ALL_AT_ONCE: Phases = (("transcription", "diarization", "acoustics"),)
MAX_PROMPT_CHARS = 2000  # several times what Whisper keeps (223 tokens): more is a mistake, not a prompt


class AnalysisOptions(BaseModel):
    """What a caller may ask of one analysis besides the media itself."""

    language: str = Field("auto", description="'auto' to detect, or an ISO 639-1 code such as 'en'.")
    num_speakers: int | None = Field(
        None,
        ge=1,
        description="Exact number of speakers: every one gets a share, even a voice heard for a second "
        "(on real recordings `max_speakers` measured better; see the README).",
    )
    min_speakers: int | None = Field(None, ge=1, description="Fewest speakers the count may give.")
    max_speakers: int | None = Field(
        None, ge=1, description="Most speakers the count may give: the safest hint when the speakers are known."
    )
    prompt: str | None = Field(
        None,
        max_length=MAX_PROMPT_CHARS,
        description="Text Whisper reads as if it came just before each stretch of speech: names, spellings, "
        "style. Whisper keeps its last 223 tokens.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> AnalysisOptions:
        check_language(self.language)
        check_speaker_counts(self.num_speakers, self.min_speakers, self.max_speakers)
        return self


@dataclass(frozen=True)
class Upload:
    """A file the server wrote itself (an upload): read as is, not subject to the local roots."""

    path: Path
    filename: str


Source = str | Upload


class Stages(Protocol):
    """Where the stages of `run_analysis` run.

    `load` answers the decoded audio and a reference to it, which is what the
    other stages take (the audio itself in one process; an object-store
    reference in the Serve graph, so that no replica copies it through the
    ingress). `phases` says in what order the three middle stages run: the
    stages of one phase run at once, each phase after the one before.
    """

    phases: Phases

    async def load(self, source: Source) -> tuple[Audio, Any]: ...

    async def transcribe(
        self, audio: Any, language: str, progress: ProgressHook, prompt: str | None = None
    ) -> Transcript: ...

    async def diarize(self, audio: Any, options: AnalysisOptions, progress: ProgressHook) -> Diarization: ...

    async def tracks(self, audio: Any, progress: ProgressHook) -> FrameTracks: ...


async def run_analysis(
    stages: Stages, source: Source, options: AnalysisOptions, progress: ProgressHook
) -> AnalysisResult:
    """The analysis of one file."""
    started = time.perf_counter()
    timings: dict[str, float] = {}
    progress("media", 0.0, "reading media")
    audio, ref = await _timed(timings, "media", stages.load(source))
    progress("media", 1.0, f"decoded {audio.duration:.1f} s of audio")

    middle: dict[str, Callable[[], Awaitable[Any]]] = {
        "transcription": lambda: stages.transcribe(ref, options.language, progress, options.prompt),
        "diarization": lambda: stages.diarize(ref, options, progress),
        "acoustics": lambda: stages.tracks(ref, progress),
    }
    done: dict[str, Any] = {}
    for phase in stages.phases:
        outcomes = await _all_or_none([_timed(timings, name, middle[name]()) for name in phase])
        done.update(zip(phase, outcomes, strict=True))
    transcript, diarization, tracks = (done[name] for name in middle)

    result = await asyncio.to_thread(build_result, transcript, diarization, tracks, audio.duration, timings, started)
    progress("assembly", 1.0, "analysis complete")
    return result


class Analyzer:
    """The stages in this process: owns one model of each kind, loaded once; analyses one file per call.

    Diarization runs first and alone, on every core, and on the calling thread,
    blocking the event loop of `analyze`, which is theirs alone: on a worker
    thread it took 8.3 s where the main thread took 5.2 s (3 minutes, 2 cores;
    with OMP_WAIT_POLICY=PASSIVE the main thread is as slow, so it is how
    OpenMP's threads wait between parallel regions). It runs before the
    transcription because torch ran about 45 % slower after a CTranslate2
    transcription in one process, while the transcription takes as long after
    torch as before it. The acoustic tracks (mostly one core) then run beside
    the transcription, on worker threads: the 10-minute benchmark's whole
    analysis took 35-36 s where the three one after another took 38-41 s.
    """

    phases = SHARED_CORES

    def __init__(
        self,
        settings: Settings,
        transcriber: SpeechRecognizer | None = None,
        diarizer: Diarizer | None = None,
    ) -> None:
        self.settings = settings
        self.media = MediaLoader(settings.media, settings.s3, settings.network)
        self.transcriber = transcriber or WhisperXTranscriber(settings.asr, settings.cache_dir)
        self.diarizer = diarizer or PyannoteDiarizer(settings.diarization)
        warm_up(settings.acoustics)

    def analyze(
        self, source: Source, options: AnalysisOptions, on_progress: Callable[[float, str], None] | None = None
    ) -> AnalysisResult:
        """`run_analysis` on these stages, from synchronous code."""
        progress = StagedProgress(STAGE_WEIGHTS, on_progress or (lambda p, m: None))
        return asyncio.run(run_analysis(self, source, options, progress))

    async def load(self, source: Source) -> tuple[Audio, Any]:
        if isinstance(source, Upload):
            audio = await asyncio.to_thread(self.media.load_upload, source.path, source.filename)
        else:
            audio = await asyncio.to_thread(self.media.load, source)
        return audio, audio.samples

    async def transcribe(
        self, audio: Any, language: str, progress: ProgressHook, prompt: str | None = None
    ) -> Transcript:
        return await asyncio.to_thread(self.transcriber.transcribe, audio, language, progress, prompt)

    async def diarize(self, audio: Any, options: AnalysisOptions, progress: ProgressHook) -> Diarization:
        counts = (options.num_speakers, options.min_speakers, options.max_speakers)
        return self.diarizer.diarize(audio, *counts, progress)

    async def tracks(self, audio: Any, progress: ProgressHook) -> FrameTracks:
        return await asyncio.to_thread(frame_tracks, audio, self.settings.acoustics, progress)


def build_result(
    transcript: Transcript,
    diarization: Diarization,
    tracks: FrameTracks,
    duration: float,
    timings: dict[str, float],
    started: float,
) -> AnalysisResult:
    """The last stage: words, speakers and acoustics put together."""
    with _timer(timings, "assembly"):
        metadata = Metadata(
            processing_time=0.0,
            model_versions={
                "whisperx": transcript.model,
                "diarization": diarization.model,
                "alignment": transcript.alignment_model or "none (Whisper word timings)",
            },
            language_probability=transcript.language_probability,
            device={"whisperx": transcript.device, "diarization": diarization.device},
        )
        result = assemble(transcript, diarization, tracks, duration, metadata)
    result.metadata.stage_timings = timings  # set last, so assembly's own time is included
    result.metadata.processing_time = round(time.perf_counter() - started, 3)
    return result


async def _timed(timings: dict[str, float], stage: str, call: Awaitable[T]) -> T:
    with _timer(timings, stage):
        return await call


async def _all_or_none(calls: list[Awaitable[Any]]) -> list[Any]:
    """Every call's result; when one fails, the others are cancelled rather than left running for nothing."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


@contextmanager
def _timer(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - t0, 3)
