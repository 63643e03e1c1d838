"""The OpenAI-compatible API (`/v1/audio/transcriptions`, `/v1/models`).

Two tiers: the renderers and the form on a synthetic result (no server), then
the official `openai` client against the real server (`server` in conftest.py).
The analyses the server tests read are started once, side by side (the server
runs four at a time and batches their transcriptions), and each test waits for
its own.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jiwer
import openai
import openai.types.audio as audio_types
import pytest
import schemathesis
import srt
import webvtt
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from pydantic import ValidationError
from starlette.datastructures import FormData

from deployments.bodies import form_fields
from deployments.openai_api import (
    TranscriptionForm,
    language_name,
    name_speakers,
    openai_error,
    render_transcription,
    served_model,
    served_models,
    text_deltas,
    transcript_events,
)
from pipeline.schemas import AnalysisResult, Metadata, Segment, SpeakerRef, SpeakerSummary, Word
from tests.conftest import ffmpeg, fixture_path, truth, words_of
from tests.serving import API_KEY

# -- the pure half: a synthetic result --------------------------------------------------------


def segment(speaker: str, start: float, words: list[str]) -> Segment:
    timed = [Word(word=w, start=start + i, end=start + i + 0.5, timing="aligned") for i, w in enumerate(words)]
    return Segment(
        start_time=start,
        end_time=timed[-1].end,
        speaker=SpeakerRef(speaker_id=speaker),
        text=" ".join(words),
        words=timed,
    )


@pytest.fixture
def result() -> AnalysisResult:
    segments = [
        segment("SPEAKER_01", 0.0, ["Hello", "there."]),
        segment("SPEAKER_00", 3.0, ["Hi!"]),
        segment("SPEAKER_02", 5.0, ["Morning."]),
        segment("SPEAKER_01", 7.0, ["Bye", "now."]),
    ]
    speakers = {s: SpeakerSummary(total_duration=1.0) for s in ("SPEAKER_00", "SPEAKER_01", "SPEAKER_02")}
    text = " ".join(s.text for s in segments)
    metadata = Metadata(processing_time=1.0, model_versions={})
    return AnalysisResult(
        segments=segments, speakers=speakers, text=text, language="en", duration=9.0, metadata=metadata
    )


def form(**fields: Any) -> TranscriptionForm:
    return TranscriptionForm.model_validate({"model": "whisper-1", **fields})


def test_speakers_are_named_in_order_of_appearance(result):
    named = name_speakers(result, ["Ann", "Ben"])
    assert [s.speaker.speaker_id for s in named.segments] == ["Ann", "Ben", "SPEAKER_02", "Ann"]
    assert set(named.speakers) == {"Ann", "Ben", "SPEAKER_02"}
    assert named.speakers["Ann"] is result.speakers["SPEAKER_01"]
    assert result.segments[0].speaker.speaker_id == "SPEAKER_01"  # the result itself is untouched
    with pytest.raises(ValidationError, match="own speaker ids"):  # it would merge with that speaker
        form(known_speaker_names=["Ann", "SPEAKER_02"])


def test_each_format_renders(result):
    body = render_transcription(result, form(response_format="diarized_json", known_speaker_names=["Ann"]))
    diarized = audio_types.TranscriptionDiarized.model_validate_json(body.body)
    assert [s.speaker for s in diarized.segments] == ["Ann", "SPEAKER_00", "SPEAKER_02", "Ann"]
    assert [s.id for s in diarized.segments] == ["seg_0", "seg_1", "seg_2", "seg_3"]
    assert diarized.usage.seconds == 9.0

    words_only = render_transcription(result, form(response_format="verbose_json", timestamp_granularities="word"))
    verbose = audio_types.TranscriptionVerbose.model_validate_json(words_only.body)
    assert verbose.language == "english" and verbose.segments is None and len(verbose.words) == 6
    both = form(response_format="verbose_json", timestamp_granularities=["word", "segment"])
    verbose = audio_types.TranscriptionVerbose.model_validate_json(render_transcription(result, both).body)
    assert [s.id for s in verbose.segments] == [0, 1, 2, 3] and verbose.segments[0].compression_ratio > 0

    assert render_transcription(result, form(response_format="text")).body == result.text + "\n"
    srt = render_transcription(result, form(response_format="srt", known_speaker_names=["Ann"])).body
    assert "00:00:00,000 --> 00:00:01,500" in srt and "Ann" in srt
    vtt = render_transcription(result, form(response_format="vtt"))
    assert vtt.body.startswith("WEBVTT") and vtt.media_type.startswith("text/vtt")


def test_stream_deltas_add_up_to_the_text(result):
    assert "".join(text_deltas(result)) == result.text
    unspaced = result.model_copy(update={"text": "".join(s.text for s in result.segments), "language": "ja"})
    assert "".join(text_deltas(unspaced)) == unspaced.text
    events = transcript_events(result, form(response_format="diarized_json", stream=True))
    kinds = [re.search(r'"type":"([^"]+)"', e).group(1) for e in events]
    assert kinds == ["transcript.text.delta", "transcript.text.segment"] * 4 + ["transcript.text.done"]
    assert all(e.startswith("data: {") and e.endswith("}\n\n") for e in events)


BAD_FORMS = {
    "response_format": {"response_format": "mp3"},
    "temperature": {"temperature": 1.5},
    "timestamp_granularities": {"timestamp_granularities": ["sentence"]},
    "known_speaker_names": {"known_speaker_names": ["Ann", "Ann"]},
    "known_speaker_references": {"known_speaker_references": ["data:audio/wav;base64,AAAA"]},
    "stream": {"response_format": "srt", "stream": "true"},
}


@pytest.mark.parametrize("field", list(BAD_FORMS))
def test_bad_form_fields_are_refused(field):
    with pytest.raises(ValidationError) as caught:
        form(**BAD_FORMS[field])
    assert caught.value.errors()[0]["loc"][0] == field


def test_form_reads_openai_arrays_and_ignores_unknown_fields():
    data = FormData(
        [
            ("model", "whisper-1"),
            ("timestamp_granularities[]", "word"),
            ("timestamp_granularities[]", "segment"),
            ("known_speaker_names[]", "Ann"),
            ("include[]", "logprobs"),
            ("chunking_strategy", "auto"),
            ("prompt", ""),
        ]
    )
    parsed = TranscriptionForm.model_validate(form_fields(data))
    assert parsed.timestamp_granularities == ["word", "segment"] and parsed.known_speaker_names == ["Ann"]
    assert parsed.prompt is None and parsed.analysis_options().language == "auto"


def test_models_and_errors_in_openai_shape():
    ids = [m.id for m in served_models("embedded:whisper-base").data]
    assert ids[0] == "embedded:whisper-base" and "whisper-1" in ids and len(ids) == len(set(ids))
    assert served_model("gpt-4o-transcribe-diarize", "embedded:whisper-base").object == "model"
    assert language_name("de") == "german" and language_name("xx") == "xx"
    assert openai_error(401, "unauthorized", "no key")["error"] == {
        "message": "no key",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    assert openai_error(503, "overloaded", "full")["error"]["type"] == "server_error"


# -- over HTTP, through the official client ---------------------------------------------------

DIALOGUE = fixture_path("dialogue_en.flac")
CLIP_TURNS = 2  # the first two turns of the dialogue, cut at 11.3 s: a short English file
# A prompt's style carries over: with it Whisper writes "Good morning!", without it "Good morning." (measured
# alone and in batches of either composition).
PROMPT = "Good morning! The report!"


@pytest.fixture(scope="module")
def oai(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def clip(media_root) -> Path:
    path = media_root / "dialogue_clip.flac"
    ffmpeg("-i", str(DIALOGUE), "-t", "11.3", str(path))
    return path


def reference(turns: int | None = None) -> str:
    return words_of(" ".join(t["text"] for t in truth("dialogue_en")["turns"][:turns]))


def wer(text: str, turns: int | None = None) -> float:
    return jiwer.wer(reference(turns), words_of(text))


def spool_files(server) -> set[Path]:
    spool = server.workdir / "uploads"
    return set(spool.iterdir()) if spool.exists() else set()


@pytest.fixture(scope="module")
def spooled_before(server) -> set[Path]:
    return spool_files(server)


@pytest.fixture(scope="module")
def calls(oai, clip, spooled_before) -> Iterator[dict[str, Future]]:
    """Every analysis the server tests read, started at once, four at a time (the server's max_active)."""
    create = oai.audio.transcriptions.create

    def stream(path: Path, **kwargs: Any) -> Callable[[], list]:
        return lambda: list(create(file=path, model="whisper-1", stream=True, **kwargs))

    work: dict[str, Callable[[], Any]] = {
        "verbose_json": lambda: create(
            file=DIALOGUE,
            model="whisper-1",
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
            language="en",
        ),
        "diarized_json": lambda: create(
            file=DIALOGUE,
            model="gpt-4o-transcribe-diarize",
            response_format="diarized_json",
            known_speaker_names=["Alice", "Bob"],
        ),
        "stream_diarized": stream(DIALOGUE, response_format="diarized_json", known_speaker_names=["Alice"]),
        "json": lambda: create(file=clip, model="gpt-4o-transcribe", prompt=PROMPT, temperature=0.2),
        "text": lambda: create(file=clip, model="whisper-1", response_format="text"),
        "srt": lambda: create(file=clip, model="whisper-1", response_format="srt"),
        "vtt": lambda: create(file=clip, model="embedded:whisper-base", response_format="vtt"),
        "stream_json": stream(clip),
    }
    with ThreadPoolExecutor(4) as pool:
        yield {name: pool.submit(call) for name, call in work.items()}


def answer(calls: dict[str, Future], name: str) -> Any:
    return calls[name].result(timeout=600)


def test_verbose_json_has_segments_and_increasing_words(calls):
    body = answer(calls, "verbose_json")
    assert isinstance(body, audio_types.TranscriptionVerbose)
    assert body.language == "english"
    assert body.duration == pytest.approx(truth("dialogue_en")["duration"], abs=0.05)
    assert wer(body.text) <= 0.10
    assert body.segments and [s.id for s in body.segments] == list(range(len(body.segments)))
    assert all(0 <= s.start < s.end <= body.duration for s in body.segments)
    assert wer(" ".join(s.text for s in body.segments)) <= 0.10
    starts = [w.start for w in body.words]
    assert starts == sorted(starts) and all(0 <= w.start <= w.end <= body.duration for w in body.words)
    assert jiwer.wer(reference(), words_of(" ".join(w.word for w in body.words))) <= 0.10
    assert body.usage.type == "duration" and body.usage.seconds == body.duration


def test_diarized_json_names_the_two_speakers(calls):
    body = answer(calls, "diarized_json")
    assert isinstance(body, audio_types.TranscriptionDiarized)
    assert body.task == "transcribe" and wer(body.text) <= 0.10
    assert {s.speaker for s in body.segments} == {"Alice", "Bob"}
    assert all(s.type == "transcript.text.segment" for s in body.segments)
    # Each named segment lies mostly in a turn of the voice of that name (alice speaks first).
    turns = truth("dialogue_en")["turns"]
    for s in body.segments:
        overlap = {t["speaker"]: 0.0 for t in turns}
        for t in turns:
            overlap[t["speaker"]] += max(0.0, min(s.end, t["end"]) - max(s.start, t["start"]))
        assert max(overlap, key=overlap.get) == s.speaker.lower(), s


def test_diarized_stream_sends_segments_then_done(calls):
    events = answer(calls, "stream_diarized")
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.done") == 1
    segments = [e for e in events if e.type == "transcript.text.segment"]
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert len(segments) == len(deltas) >= 2
    assert [d.segment_id for d in deltas] == [s.id for s in segments]
    assert segments[0].speaker == "Alice" and len({s.speaker for s in segments}) == 2
    assert "".join(d.delta for d in deltas) == events[-1].text and wer(events[-1].text) <= 0.10


def test_json_with_prompt_and_temperature(calls):
    body = answer(calls, "json")
    assert isinstance(body, audio_types.Transcription)
    assert wer(body.text, CLIP_TURNS) <= 0.15
    assert "morning!" in body.text.lower() and "morning!" not in answer(calls, "text").lower()  # the prompt's style
    assert body.usage.type == "duration" and body.usage.seconds == pytest.approx(11.3, abs=0.05)


def test_text_is_plain_text(calls):
    body = answer(calls, "text")
    assert isinstance(body, str) and not body.lstrip().startswith("{")
    assert wer(body, CLIP_TURNS) <= 0.15


def seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(rest)


def cues(subtitles: str, fmt: str) -> list[tuple[float, float, str]]:
    """(start, end, text) of each cue, read by parsers that are not ours (srt, webvtt-py)."""
    if fmt == "srt":
        return [
            (c.start.total_seconds(), c.end.total_seconds(), re.sub(r"^\[[^\]]*\]\s*", "", c.content))
            for c in srt.parse(subtitles)
        ]
    return [(seconds(c.start), seconds(c.end), c.text) for c in webvtt.from_buffer(io.StringIO(subtitles))]


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_parse_and_carry_the_transcript(calls, fmt):
    body = answer(calls, fmt)
    assert isinstance(body, str)
    parsed = cues(body, fmt)
    assert parsed and all(0 <= start < end <= 11.35 for start, end, _ in parsed)
    assert [start for start, _, _ in parsed] == sorted(start for start, _, _ in parsed)
    assert wer(" ".join(text for _, _, text in parsed), CLIP_TURNS) <= 0.15


def test_json_stream_deltas_then_done(calls):
    events = answer(calls, "stream_json")
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1) and len(events) >= 2
    assert events[-1].type == "transcript.text.done"
    assert "".join(e.delta for e in events[:-1]) == events[-1].text
    assert wer(events[-1].text, CLIP_TURNS) <= 0.15


def test_models_list_and_retrieve(oai, client):
    ids = [m.id for m in oai.models.list()]
    served = client.get("/health").json()["deployments"]["transcription"]["model"]
    assert ids[0] == served and {"whisper-1", "gpt-4o-transcribe", "gpt-4o-transcribe-diarize"} <= set(ids)
    assert oai.models.retrieve("whisper-1").owned_by == "ecg-audio-analyzer"
    with pytest.raises(openai.NotFoundError) as caught:
        oai.models.retrieve("whisper-2")
    assert caught.value.body["code"] == "model_not_found"


# -- errors in OpenAI's shape ------------------------------------------------------------------


def assert_openai_error(body: dict, kind: str, code: str, param: str | None) -> None:
    assert set(body) == {"message", "type", "param", "code"}, body
    assert (body["type"], body["code"], body["param"]) == (kind, code, param), body
    assert body["message"]


def test_a_wrong_or_missing_key_gets_401(server):
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-a-key", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError) as caught:
        stranger.audio.transcriptions.create(file=DIALOGUE, model="whisper-1")
    assert caught.value.status_code == 401
    assert_openai_error(caught.value.body, "invalid_request_error", "invalid_api_key", None)
    response = httpx.get(f"{server.url}/v1/models")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert_openai_error(response.json()["error"], "invalid_request_error", "invalid_api_key", None)


SENTENCE = fixture_path("sentence_es.flac")
REFUSALS = {
    "unknown model": ({"model": "whisper-9"}, openai.NotFoundError, 404, "model_not_found", "model"),
    "bad response_format": (
        {"response_format": "mp3"},
        openai.BadRequestError,
        400,
        "invalid_value",
        "response_format",
    ),
    "temperature above 1": ({"temperature": 1.5}, openai.BadRequestError, 400, "invalid_value", "temperature"),
    "unknown language": ({"language": "xx"}, openai.BadRequestError, 400, "unsupported_language", "language"),
    "streamed srt": (
        {"response_format": "srt", "stream": True},
        openai.BadRequestError,
        400,
        "invalid_value",
        "stream",
    ),
    "voice samples": (
        {"known_speaker_names": ["A"], "known_speaker_references": ["data:audio/wav;base64,UklGRg=="]},
        openai.BadRequestError,
        400,
        "invalid_value",
        "known_speaker_references",
    ),
    "not media": ({"file": fixture_path("make_fixtures.py")}, openai.APIStatusError, 415, "not_media", "file"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_come_in_openai_shape(oai, case):
    fields, exception, status, code, param = REFUSALS[case]
    with pytest.raises(exception) as caught:
        oai.audio.transcriptions.create(**{"file": SENTENCE, "model": "whisper-1", **fields})
    assert caught.value.status_code == status
    assert_openai_error(caught.value.body, "invalid_request_error", code, param)


def test_unknown_v1_routes_and_bodies_answer_in_openai_shape(client):
    response = client.get("/v1/audio/speech")
    assert response.status_code == 404
    assert_openai_error(response.json()["error"], "invalid_request_error", "http_error", None)
    assert "GET /v1/audio/speech" in response.json()["error"]["message"]
    response = client.post("/v1/audio/transcriptions", json={"model": "whisper-1"})
    assert response.status_code == 415
    assert_openai_error(response.json()["error"], "invalid_request_error", "unsupported_media_type", None)
    response = client.post("/v1/audio/transcriptions", files={"file": ("a.flac", b"x")}, data={})
    assert response.status_code == 400
    assert_openai_error(response.json()["error"], "invalid_request_error", "invalid_value", "model")
    # The product's own routes keep their own error body.
    assert client.get("/jobs/no-such-job").json()["error"] == "unknown_job"


def test_curl_style_form_fields(client):
    """Without OpenAI's client: plain form fields, a single `timestamp_granularities` without brackets."""
    with fixture_path("sentence_fr.flac").open("rb") as f:
        response = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("sentence_fr.flac", f, "audio/flac")},
            data={"model": "whisper-1", "response_format": "verbose_json", "timestamp_granularities": "word"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["language"] == "french" and "segments" not in body and body["words"]
    assert response.headers["x-job-id"]
    assert client.get(f"/jobs/{response.headers['x-job-id']}").json()["status"] == "completed"


def test_uploads_are_not_left_behind(server, calls, spooled_before):
    for future in calls.values():
        future.result(timeout=600)
    assert spool_files(server) <= spooled_before


@pytest.mark.parametrize("label", ["POST /v1/audio/transcriptions", "GET /v1/models/{model}"])
def test_generated_requests_get_openai_errors_never_a_5xx(server, label):
    """Schemathesis over the server's own /openapi.json (as tests/test_security.py does for the product's
    routes): whatever it sends, never a 5xx, and every refusal in OpenAI's shape."""
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operation = schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in /openapi.json"
    seen: list[int] = []

    @given(case=operation.as_strategy())
    @hypothesis_settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case) -> None:
        response = case.call(base_url=server.url, headers={"authorization": f"Bearer {API_KEY}"}, timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500 or response.status_code == 503, f"{case.path}: {response.text}"
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text

    check()
    assert len(seen) >= 10
