"""Stage 5, assembly: words meet speakers and acoustics in the response shape.

- Each word goes to the speaker whose diarization turns overlap it most (the
  nearest turn when none overlaps, e.g. a word in a pause the diarizer cut).
- Segments follow the recognizer's segments, split wherever the speaker changes.
- `total_duration` is the diarization's speaking time: overlapped speech
  counts for every speaker in it.
"""

from __future__ import annotations

import numpy as np

from pipeline.acoustics import FrameTracks, word_features
from pipeline.asr import TimedWord, Transcript
from pipeline.diarization import Diarization, SpeakerTurn
from pipeline.schemas import (
    AnalysisResult,
    Metadata,
    Segment,
    SpeakerAcoustics,
    SpeakerRef,
    SpeakerSummary,
    Word,
)

FALLBACK_SPEAKER = "SPEAKER_00"
# Scripts written without spaces between words.
_UNSPACED = {"zh", "ja", "th", "lo", "km", "my", "yue", "bo"}


def speaker_of(start: float, end: float, turns: list[SpeakerTurn]) -> str:
    if not turns:
        return FALLBACK_SPEAKER
    overlap: dict[str, float] = {}
    for t in turns:
        o = min(end, t.end) - max(start, t.start)
        if o > 0:
            overlap[t.speaker] = overlap.get(t.speaker, 0.0) + o
    if overlap:
        return max(overlap, key=overlap.__getitem__)
    mid = (start + end) / 2
    return min(turns, key=lambda t: max(t.start - mid, mid - t.end)).speaker


def tidy_times(words: list[TimedWord], duration: float) -> list[TimedWord]:
    """Clamp word times into the file and make them non-decreasing."""
    last = 0.0
    for w in words:
        w.start = round(min(max(w.start, last), duration), 3)
        w.end = round(min(max(w.end, w.start), duration), 3)
        last = w.start
    return words


def join_words(words: list[str], language: str) -> str:
    return ("" if language in _UNSPACED else " ").join(words).strip()


def build_segments(transcript: Transcript, turns: list[SpeakerTurn], tracks: FrameTracks | None) -> list[Segment]:
    segments: list[Segment] = []
    for asr_segment in transcript.segments:
        run: list[Word] = []
        run_speaker = None
        for w in asr_segment.words:
            speaker = speaker_of(w.start, w.end, turns)
            if run and speaker != run_speaker:
                segments.append(_segment(run, run_speaker, transcript.language))
                run = []
            run_speaker = speaker
            features = word_features(tracks, w.start, w.end) if tracks is not None else None
            run.append(Word(word=w.word, start=w.start, end=w.end, score=w.score, timing=w.timing,
                            acoustic_features=features))  # fmt: skip
        if run:
            segments.append(_segment(run, run_speaker, transcript.language))
    return segments


def _segment(words: list[Word], speaker: str | None, language: str) -> Segment:
    return Segment(
        start_time=words[0].start,
        end_time=max(w.end for w in words),
        speaker=SpeakerRef(speaker_id=speaker or FALLBACK_SPEAKER),
        text=join_words([w.word for w in words], language),
        words=words,
    )


def speaker_summaries(segments: list[Segment], diarization: Diarization) -> dict[str, SpeakerSummary]:
    totals = diarization.speaking_time()
    words_by: dict[str, list[Word]] = {}
    for s in segments:
        words_by.setdefault(s.speaker.speaker_id, []).extend(s.words)
    summaries = {}
    for speaker in sorted(set(totals) | set(words_by)):
        words = words_by.get(speaker, [])
        summaries[speaker] = SpeakerSummary(
            total_duration=round(totals.get(speaker, 0.0), 3),
            word_count=len(words),
            acoustics=_speaker_acoustics(words),
        )
    return summaries


def _speaker_acoustics(words: list[Word]) -> SpeakerAcoustics | None:
    feats = [w.acoustic_features for w in words if w.acoustic_features is not None]
    if not feats:
        return None
    pitches = np.array([f.pitch_hz for f in feats if f.pitch_hz is not None])
    return SpeakerAcoustics(
        volume_db=round(float(np.median([f.volume_db for f in feats])), 2),
        pitch_hz=round(float(np.median(pitches)), 1) if pitches.size else None,
        pitch_std_hz=round(float(np.std(pitches)), 1) if pitches.size else None,
        spectral_centroid=round(float(np.mean([f.spectral_centroid for f in feats])), 1),
    )


def assemble(
    transcript: Transcript,
    diarization: Diarization,
    tracks: FrameTracks | None,
    duration: float,
    metadata: Metadata,
) -> AnalysisResult:
    tidy_times(transcript.words, duration)
    segments = build_segments(transcript, diarization.turns, tracks)
    return AnalysisResult(
        segments=segments,
        speakers=speaker_summaries(segments, diarization),
        text=join_words([s.text for s in segments], transcript.language),
        language=transcript.language,
        duration=round(duration, 3),
        metadata=metadata,
    )
