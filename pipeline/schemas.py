"""Typed results: these pydantic models *are* the API's response schema.

The keys of the product's response (segments, speakers, text, language,
duration, metadata and the fields inside them) keep their names and meaning;
the extra fields carry documented additions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

WordTiming = Literal["aligned", "recognizer", "interpolated"]


class AcousticFeatures(BaseModel):
    volume_db: float = Field(description="RMS level over the word in dBFS (energy mean, then dB).")
    pitch_hz: float | None = Field(description="Median F0 of the word's voiced frames; null if none is voiced.")
    spectral_centroid: float = Field(description="Mean spectral centroid in Hz.")
    spectral_rolloff: float = Field(description="Mean 85% spectral roll-off frequency in Hz.")
    mfcc: list[float] = Field(description="Mean of each MFCC coefficient over the word.")


class Word(BaseModel):
    word: str
    start: float = Field(description="Seconds from the start of the file.")
    end: float
    score: float | None = Field(None, description="Recognizer or aligner confidence in [0, 1].")
    timing: WordTiming = Field(
        description="How start/end were obtained: wav2vec2 forced alignment, the recognizer's own "
        "cross-attention timings, or interpolated between neighbours."
    )
    acoustic_features: AcousticFeatures | None = None


class SpeakerRef(BaseModel):
    speaker_id: str


class Segment(BaseModel):
    start_time: float
    end_time: float
    speaker: SpeakerRef
    text: str
    words: list[Word]


class SpeakerAcoustics(BaseModel):
    volume_db: float | None = Field(description="Median of the speaker's word volumes.")
    pitch_hz: float | None = Field(description="Median of the speaker's voiced word pitches.")
    pitch_std_hz: float | None = Field(description="Spread of the speaker's word pitches.")
    spectral_centroid: float | None = None


class SpeakerSummary(BaseModel):
    total_duration: float = Field(
        description="Seconds the diarization marks this speaker as talking; overlapped speech counts "
        "for every speaker in it."
    )
    word_count: int = 0
    acoustics: SpeakerAcoustics | None = None


class Metadata(BaseModel):
    processing_time: float = Field(description="Wall-clock seconds of the whole analysis.")
    model_versions: dict[str, str] = Field(description="The models actually used, by role.")
    stage_timings: dict[str, float] = Field(default_factory=dict, description="Seconds spent in each stage.")
    language_probability: float | None = Field(
        None,
        description="Whisper's probability of the detected language, averaged over up to "
        "`asr.language_detection_windows` clips of speech; 1.0 when the language was given, "
        "null when there was no speech.",
    )
    device: dict[str, str] = Field(default_factory=dict, description="Device each model ran on.")


class AnalysisResult(BaseModel):
    segments: list[Segment]
    speakers: dict[str, SpeakerSummary]
    text: str
    language: str
    duration: float
    metadata: Metadata
