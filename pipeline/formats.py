"""Subtitle renderings of a result: one cue per segment, prefixed with its speaker."""

from __future__ import annotations

from pipeline.schemas import AnalysisResult


def _timestamp(seconds: float, separator: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def to_srt(result: AnalysisResult) -> str:
    cues = [
        f"{i}\n{_timestamp(s.start_time, ',')} --> {_timestamp(s.end_time, ',')}\n[{s.speaker.speaker_id}] {s.text}\n"
        for i, s in enumerate(result.segments, 1)
    ]
    return "\n".join(cues)


def to_vtt(result: AnalysisResult) -> str:
    cues = [
        f"{_timestamp(s.start_time, '.')} --> {_timestamp(s.end_time, '.')}\n<v {s.speaker.speaker_id}>{s.text}\n"
        for s in result.segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def render(result: AnalysisResult, fmt: str) -> str:
    if fmt == "srt":
        return to_srt(result)
    if fmt == "vtt":
        return to_vtt(result)
    return result.model_dump_json(indent=2) + "\n"
