"""Renderings of a result for the tools users already have: subtitles (SRT,
WebVTT), diarization references (RTTM), plain text and a table (TSV).

Each format is one speaker turn (a result segment) per cue or line, labelled
with its speaker. `render(result, fmt)` is what the CLI's `--format` and the
server's `GET /jobs/{id}/result?format=` call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.schemas import AnalysisResult, Segment

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Format:
    render: Callable[[AnalysisResult, str], str]
    media_type: str
    extension: str


def _timestamp(seconds: float, separator: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def _one_line(text: str) -> str:
    """Text on one line: a line break inside a cue or a row would end it early."""
    return _SPACES.sub(" ", text).strip()


def _vtt_escape(text: str) -> str:
    """WebVTT cue text is markup: `&`, `<` and `>` must be character references."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_srt(result: AnalysisResult, name: str = "") -> str:
    cues = [
        f"{i}\n{_timestamp(s.start_time, ',')} --> {_timestamp(s.end_time, ',')}\n"
        f"[{s.speaker.speaker_id}] {_one_line(s.text)}\n"
        for i, s in enumerate(result.segments, 1)
    ]
    return "\n".join(cues)


def to_vtt(result: AnalysisResult, name: str = "") -> str:
    cues = [
        f"{_timestamp(s.start_time, '.')} --> {_timestamp(s.end_time, '.')}\n"
        f"<v {_vtt_escape(s.speaker.speaker_id)}>{_vtt_escape(_one_line(s.text))}\n"
        for s in result.segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def to_rttm(result: AnalysisResult, name: str = "") -> str:
    """NIST RTTM speaker turns; `name` (the recording's id) must be one token, so spaces become `_`."""
    uri = _SPACES.sub("_", name.strip()) or "recording"
    lines = [
        f"SPEAKER {uri} 1 {s.start_time:.3f} {s.end_time - s.start_time:.3f} <NA> <NA> "
        f"{_SPACES.sub('_', s.speaker.speaker_id)} <NA> <NA>\n"
        for s in result.segments
        if s.end_time > s.start_time
    ]
    return "".join(lines)


def to_txt(result: AnalysisResult, name: str = "") -> str:
    return "".join(
        f"[{_timestamp(s.start_time, '.')}] {s.speaker.speaker_id}: {_one_line(s.text)}\n" for s in _said(result)
    )


def to_tsv(result: AnalysisResult, name: str = "") -> str:
    """Whisper's TSV (start and end in integer milliseconds), with a speaker column."""
    rows = [
        f"{round(s.start_time * 1000)}\t{round(s.end_time * 1000)}\t{s.speaker.speaker_id}\t{_one_line(s.text)}\n"
        for s in _said(result)
    ]
    return "start\tend\tspeaker\ttext\n" + "".join(rows)


def to_json(result: AnalysisResult, name: str = "") -> str:
    return result.model_dump_json(indent=2) + "\n"


def _said(result: AnalysisResult) -> list[Segment]:
    return [s for s in result.segments if s.text.strip()]


FORMATS: dict[str, Format] = {
    "json": Format(to_json, "application/json", "json"),
    "srt": Format(to_srt, "application/x-subrip; charset=utf-8", "srt"),
    "vtt": Format(to_vtt, "text/vtt; charset=utf-8", "vtt"),
    "rttm": Format(to_rttm, "text/plain; charset=utf-8", "rttm"),
    "txt": Format(to_txt, "text/plain; charset=utf-8", "txt"),
    "tsv": Format(to_tsv, "text/tab-separated-values; charset=utf-8", "tsv"),
}


def render(result: AnalysisResult, fmt: str, name: str = "") -> str:
    """`result` as `fmt` (a key of FORMATS); `name` identifies the recording where a format needs one."""
    return FORMATS[fmt].render(result, name)
