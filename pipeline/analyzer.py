"""The whole analysis in one process: what the CLI runs, and the reference the
Ray Serve graph (which runs the same stages in separate deployments) must match.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pydantic import BaseModel, Field, model_validator

from pipeline.acoustics import FrameTracks, frame_tracks, warm_up
from pipeline.asr import SpeechRecognizer, Transcript, WhisperXTranscriber, check_language
from pipeline.assembly import assemble
from pipeline.config import Settings
from pipeline.diarization import Diarization, Diarizer, PyannoteDiarizer, check_speaker_counts
from pipeline.media import Audio, MediaLoader
from pipeline.progress import StagedProgress
from pipeline.schemas import AnalysisResult, Metadata

# Rough share of wall time per stage on CPU, so overall progress moves evenly.
STAGE_WEIGHTS = {"media": 5, "transcription": 55, "diarization": 30, "acoustics": 5, "assembly": 5}


class AnalysisOptions(BaseModel):
    """What a caller may ask of one analysis besides the media itself."""

    language: str = Field("auto", description="'auto' to detect, or an ISO 639-1 code such as 'en'.")
    num_speakers: int | None = Field(None, ge=1, description="Exact number of speakers, when known.")
    min_speakers: int | None = Field(None, ge=1)
    max_speakers: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> AnalysisOptions:
        check_language(self.language)
        check_speaker_counts(self.num_speakers, self.min_speakers, self.max_speakers)
        return self


class Analyzer:
    """Owns one model of each kind, loaded once; analyses one file per call."""

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
        self, source: str, options: AnalysisOptions, on_progress: Callable[[float, str], None] | None = None
    ) -> AnalysisResult:
        progress = StagedProgress(STAGE_WEIGHTS, on_progress or (lambda p, m: None))
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with _timed(timings, "media"):
            progress("media", 0.0, "reading media")
            audio = self.media.load(source)
            progress("media", 1.0, f"decoded {audio.duration:.1f} s of audio")
        return self.analyze_audio(audio, options, progress, timings, started)

    def analyze_audio(
        self,
        audio: Audio,
        options: AnalysisOptions,
        progress: StagedProgress,
        timings: dict[str, float],
        started: float,
    ) -> AnalysisResult:
        samples = audio.samples
        with _timed(timings, "transcription"):
            transcript = self.transcriber.transcribe(samples, options.language, progress)
        with _timed(timings, "diarization"):
            diarization = self.diarizer.diarize(
                samples, options.num_speakers, options.min_speakers, options.max_speakers, progress
            )
        with _timed(timings, "acoustics"):
            tracks = frame_tracks(samples, self.settings.acoustics, progress)
        result = build_result(transcript, diarization, tracks, audio.duration, timings, started)
        progress("assembly", 1.0, "analysis complete")
        return result


def build_result(
    transcript: Transcript,
    diarization: Diarization,
    tracks: FrameTracks,
    duration: float,
    timings: dict[str, float],
    started: float,
) -> AnalysisResult:
    """The last stage, shared by the in-process Analyzer and the Serve graph's ingress."""
    with _timed(timings, "assembly"):
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


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = round(time.perf_counter() - t0, 3)
