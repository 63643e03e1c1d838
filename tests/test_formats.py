"""Every export format, read back by a parser that is not ours: webvtt-py for
WebVTT, `srt` for SubRip, pyannote's RTTM loader, the csv module for TSV.

Two results: the real analysis of the committed dialogue (session fixture) and
a small hand-made one whose text has what breaks naive writers (`&`, `<`, `>`,
`-->`, line breaks, tabs).
"""

from __future__ import annotations

import csv
import html
import io
import re
import subprocess
import sys

import pytest
import srt
import webvtt
from pyannote.database.util import load_rttm

from pipeline.formats import FORMATS, render
from pipeline.schemas import AnalysisResult, Metadata, Segment, SpeakerRef, SpeakerSummary
from tests.conftest import fixture_path

TRICKY = [
    ("SPEAKER_00", 0.0, 1.5, "Tom & Jerry <3 said a > b, then --> stop"),
    ("SPEAKER_01", 1.5, 3.25, "two\nlines\tand a tab"),
    ("SPEAKER_00", 3.25, 3725.5, "<v SPEAKER_01>not a voice</v>"),
]


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def tricky() -> AnalysisResult:
    segments = [
        Segment(start_time=a, end_time=b, speaker=SpeakerRef(speaker_id=s), text=t, words=[]) for s, a, b, t in TRICKY
    ]
    speakers = {s: SpeakerSummary(total_duration=sum(b - a for x, a, b, _ in TRICKY if x == s)) for s, *_ in TRICKY}
    return AnalysisResult(
        segments=segments,
        speakers=speakers,
        text=" ".join(t for *_, t in TRICKY),
        language="en",
        duration=3725.5,
        metadata=Metadata(processing_time=0.0, model_versions={}),
    )


@pytest.fixture(params=["tricky", "dialogue"])
def result(request, tricky) -> AnalysisResult:
    return tricky if request.param == "tricky" else request.getfixturevalue("dialogue_result")


def test_vtt_reads_back_with_speakers_and_escaped_text(result):
    cues = list(webvtt.from_buffer(io.StringIO(render(result, "vtt"))))
    assert len(cues) == len(result.segments)
    for cue, segment in zip(cues, result.segments, strict=True):
        assert cue.voice == segment.speaker.speaker_id
        assert html.unescape(cue.text) == one_line(segment.text)
        assert "<" not in cue.text and ">" not in cue.text  # markup only from the voice tag
        assert abs(cue.start_in_seconds - segment.start_time) < 1.0  # webvtt-py keeps whole seconds
        assert abs(cue.end_in_seconds - segment.end_time) < 1.0


def test_vtt_escapes_markup(tricky):
    text = render(tricky, "vtt")
    assert "Tom &amp; Jerry &lt;3 said a &gt; b, then --&gt; stop" in text
    assert "&lt;v SPEAKER_01&gt;not a voice&lt;/v&gt;" in text


def test_srt_reads_back(result):
    subtitles = list(srt.parse(render(result, "srt")))
    assert [s.index for s in subtitles] == list(range(1, len(result.segments) + 1))
    for subtitle, segment in zip(subtitles, result.segments, strict=True):
        assert subtitle.content == f"[{segment.speaker.speaker_id}] {one_line(segment.text)}"
        assert abs(subtitle.start.total_seconds() - segment.start_time) <= 0.0005
        assert abs(subtitle.end.total_seconds() - segment.end_time) <= 0.0005


def test_rttm_reads_back_as_the_speaker_turns(result, tmp_path):
    path = tmp_path / "out.rttm"
    path.write_text(render(result, "rttm", name="my call"))
    annotations = load_rttm(str(path))
    assert list(annotations) == ["my_call"]
    annotation = annotations["my_call"]
    assert set(annotation.labels()) == {s.speaker.speaker_id for s in result.segments}
    for speaker in annotation.labels():
        expected = sum(s.end_time - s.start_time for s in result.segments if s.speaker.speaker_id == speaker)
        assert annotation.label_duration(speaker) == pytest.approx(expected, abs=0.002 * len(result.segments))


def test_tsv_reads_back_in_milliseconds(result):
    rows = list(csv.DictReader(io.StringIO(render(result, "tsv")), delimiter="\t"))
    spoken = [s for s in result.segments if s.text.strip()]
    assert len(rows) == len(spoken)
    for row, segment in zip(rows, spoken, strict=True):
        assert int(row["start"]) == round(segment.start_time * 1000)
        assert int(row["end"]) == round(segment.end_time * 1000)
        assert row["speaker"] == segment.speaker.speaker_id and row["text"] == one_line(segment.text)


def test_txt_has_a_line_per_turn_with_its_speaker(result):
    lines = render(result, "txt").splitlines()
    spoken = [s for s in result.segments if s.text.strip()]
    assert len(lines) == len(spoken)
    for line, segment in zip(lines, spoken, strict=True):
        match = re.fullmatch(r"\[(\d\d):(\d\d):(\d\d)\.(\d{3})\] (\S+): (.*)", line)
        assert match, line
        h, m, s, ms = map(int, match.groups()[:4])
        assert abs(h * 3600 + m * 60 + s + ms / 1000 - segment.start_time) <= 0.0005
        assert match[5] == segment.speaker.speaker_id and match[6] == one_line(segment.text)


def test_json_is_the_result(result):
    assert AnalysisResult.model_validate_json(render(result, "json")) == result


def test_every_format_has_a_media_type():
    assert set(FORMATS) == {"json", "srt", "vtt", "rttm", "txt", "tsv"}
    assert FORMATS["vtt"].media_type.startswith("text/vtt")


def test_cli_writes_rttm(tmp_path):
    out = tmp_path / "out.rttm"
    command = [sys.executable, "-m", "pipeline.cli", str(fixture_path("sentence_de.flac")), "--format", "rttm"]
    proc = subprocess.run([*command, "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    annotation = load_rttm(str(out))["sentence_de"]
    assert len(annotation.labels()) == 1 and annotation.get_timeline().duration() > 1.0
