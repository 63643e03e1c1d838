"""The OpenAI-compatible audio API: `POST /v1/audio/transcriptions` and `GET /v1/models`.

The pure half of it: the form, the responses rendered from an `AnalysisResult`, the
event stream and OpenAI's error shape. The routes are in `deployments.ingress`.
Field names and shapes follow OpenAI's API reference (openai-python's
`types/audio/`), so its clients work unchanged; where this server differs:

- Every model id (`GET /v1/models`) runs the same full analysis: the configured
  Whisper model, WhisperX alignment and the diarization. `whisper-1`,
  `gpt-4o-transcribe`, `gpt-4o-mini-transcribe` and `gpt-4o-transcribe-diarize`
  are aliases of it, so code written for OpenAI only changes its base URL; every
  model serves every `response_format`.
- `prompt` reaches Whisper (its initial prompt, in every 30-second window).
  `temperature` is validated (0 to 1) but does not change decoding: the batched
  decoder runs beam search, which is deterministic, and has no temperature
  fallback. `chunking_strategy`, `include[]` and other fields are accepted and
  ignored (VAD always chunks; no token log-probabilities are kept).
- `known_speaker_names[]` names speakers in their order of first appearance;
  speakers past the list keep their ids (`SPEAKER_02`). Voice samples
  (`known_speaker_references[]`) are refused: this server cannot match voices to
  them, and silently naming by order instead would mislabel.
- `verbose_json` segments are the analysis' segments (one speaker each).
  `seek`, `avg_logprob` and `no_speech_prob` are 0.0 and `tokens` is empty: the
  analysis does not keep them. `temperature` is 0.0 (beam search) and
  `compression_ratio` is computed from the text as Whisper does.
- `stream=true` (json, text, diarized_json) sends server-sent events once the
  whole-file analysis completes: one `transcript.text.delta` per segment (and a
  `transcript.text.segment` for diarized_json), then `transcript.text.done`.
  Errors before that are ordinary HTTP errors.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator
from whisperx.utils import LANGUAGES  # a plain dict; importing it loads no model

from pipeline.analyzer import MAX_PROMPT_CHARS, AnalysisOptions
from pipeline.errors import (
    AnalyzerError,
    AudioTooLong,
    EmptyAudio,
    FileTooLarge,
    InputError,
    InvalidAudio,
    NoAudioStream,
    NotMediaFile,
    UnsupportedLanguage,
)
from pipeline.formats import FORMATS, render
from pipeline.schemas import AnalysisResult, Segment, SpeakerRef

ResponseFormat = Literal["json", "text", "srt", "verbose_json", "vtt", "diarized_json"]
Granularity = Literal["word", "segment"]
SpeakerName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]

PREFIX = "/v1/"
ALIASES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "gpt-4o-transcribe-diarize")
OWNER = "ecg-audio-analyzer"
# A fixed `created` for every model (the day this API appeared): the same on every replica and restart.
CREATED = 1795478400  # 2026-11-24T00:00:00Z
STREAMED = ("json", "text", "diarized_json")  # the formats OpenAI streams; subtitles and verbose_json are whole
# A multipart form holds at most 20 fields (deployments.bodies): room for the others and this many names.
MAX_SPEAKER_NAMES = 8


class UnknownModel(InputError):
    """A model id this server does not serve (HTTP 404, as OpenAI answers)."""

    code = "model_not_found"


# -- the request --------------------------------------------------------------


class TranscriptionForm(BaseModel):
    """The form fields of `POST /v1/audio/transcriptions` (the media is `file`).

    Array fields are sent as `name[]`, repeated, as OpenAI's clients do (a plain
    `name` with one value is read too).
    """

    model_config = ConfigDict(extra="ignore")  # newer OpenAI fields (include, chunking_strategy...) are ignored

    model: str = Field(max_length=256, description="A model id of `GET /v1/models`; all run the same analysis.")
    language: str | None = Field(None, max_length=16, description="ISO 639-1 code, e.g. `en`; detected if omitted.")
    prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="Text that guides Whisper's spelling and style."
    )
    temperature: float = Field(0.0, ge=0, le=1, description="Accepted; decoding is beam search whatever it is.")
    response_format: ResponseFormat = "json"
    timestamp_granularities: list[Granularity] = Field(
        default_factory=lambda: ["segment"],
        max_length=2,
        description="For verbose_json: `segment` (default) and/or `word`.",
    )
    known_speaker_names: list[SpeakerName] = Field(
        default_factory=list,
        max_length=MAX_SPEAKER_NAMES,
        description="Names for the speakers, in their order of first appearance.",
    )
    known_speaker_references: list[str] = Field(default_factory=list, description="Not supported: must be empty.")
    stream: bool = Field(False, description="Server-sent events, for json, text and diarized_json.")

    @field_validator("timestamp_granularities", "known_speaker_names", "known_speaker_references", mode="before")
    @classmethod
    def _one_value_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("known_speaker_names")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        # Two speakers under one name would merge in `speakers`; so would a name that is another's id.
        if len(set(names)) != len(names):
            raise ValueError("speaker names must differ from each other")
        if any(re.fullmatch(r"SPEAKER_\d+", name) for name in names):
            raise ValueError("names like SPEAKER_00 are this server's own speaker ids")
        return names

    @field_validator("known_speaker_references")
    @classmethod
    def _no_references(cls, references: list[str]) -> list[str]:
        if references:
            raise ValueError(
                "voice samples are not supported: known_speaker_names[] alone names speakers in order of appearance"
            )
        return references

    @field_validator("stream")
    @classmethod
    def _streamable(cls, stream: bool, info: ValidationInfo) -> bool:
        fmt = info.data.get("response_format")  # absent when invalid: that error is reported already
        if stream and fmt is not None and fmt not in STREAMED:
            raise ValueError(f"response_format {fmt} is not streamed; stream json, text or diarized_json")
        return stream

    def analysis_options(self) -> AnalysisOptions:
        """What the analysis is asked; UnsupportedLanguage for a language Whisper does not know."""
        return AnalysisOptions(language=self.language or "auto", prompt=self.prompt)


def form_schema() -> dict[str, Any]:
    """The multipart body as OpenAPI shows it: the fields, arrays under their `name[]`, and the file."""
    schema = TranscriptionForm.model_json_schema()
    properties = {
        (f"{name}[]" if spec.get("type") == "array" else name): spec for name, spec in schema["properties"].items()
    }
    file = {"type": "string", "format": "binary", "description": "The audio or video file."}
    return {"type": "object", "properties": {"file": file, **properties}, "required": ["file", "model"]}


FORM_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form_schema()}}}}


# -- models -------------------------------------------------------------------


class ModelCard(BaseModel):
    """OpenAI's Model object."""

    id: str
    object: Literal["model"] = "model"
    created: int = CREATED
    owned_by: str = OWNER


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def served_models(whisper_model: str) -> ModelList:
    """The configured Whisper model (the full analysis), then OpenAI's names for it."""
    return ModelList(data=[ModelCard(id=name) for name in dict.fromkeys((whisper_model, *ALIASES))])


def served_model(model: str, whisper_model: str) -> ModelCard:
    """The model `model` names; UnknownModel when this server does not serve it."""
    for card in served_models(whisper_model).data:
        if card.id == model:
            return card
    raise UnknownModel(f"the model {model!r} does not exist; GET /v1/models lists the models of this server")


# -- responses ----------------------------------------------------------------


class DurationUsage(BaseModel):
    """What the request cost: seconds of audio (OpenAI's usage for audio-billed models)."""

    type: Literal["duration"] = "duration"
    seconds: float


class Transcription(BaseModel):
    """`response_format=json`."""

    text: str
    usage: DurationUsage


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(BaseModel):
    """A segment of `verbose_json`. Fields the analysis does not keep are 0.0 / [] (see the module's notes)."""

    id: int
    seek: int = 0
    start: float
    end: float
    text: str
    tokens: list[int] = Field(default_factory=list)
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float
    no_speech_prob: float = 0.0


class TranscriptionVerbose(BaseModel):
    """`response_format=verbose_json`: `segments` and/or `words` per `timestamp_granularities[]`."""

    task: Literal["transcribe"] = "transcribe"
    language: str = Field(description="The language's English name in lower case, e.g. `english`.")
    duration: float
    text: str
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None
    usage: DurationUsage


class DiarizedSegment(BaseModel):
    """A segment of `diarized_json`, and the `transcript.text.segment` event of its stream."""

    type: Literal["transcript.text.segment"] = "transcript.text.segment"
    id: str
    start: float
    end: float
    speaker: str
    text: str


class TranscriptionDiarized(BaseModel):
    """`response_format=diarized_json`."""

    task: Literal["transcribe"] = "transcribe"
    duration: float
    text: str
    segments: list[DiarizedSegment]
    usage: DurationUsage


class TextDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str
    segment_id: str | None = None


class TextDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str


@dataclass(frozen=True)
class Rendered:
    body: str
    media_type: str


# Subtitles as the product's own exports serve them (pipeline.formats); OpenAI's clients read any as text.
MEDIA_TYPES = {"text": "text/plain; charset=utf-8", **{f: FORMATS[f].media_type for f in ("srt", "vtt")}}


def render_transcription(result: AnalysisResult, form: TranscriptionForm) -> Rendered:
    """The answer to `form`, its speakers named first, in the format it asked for."""
    result = name_speakers(result, form.known_speaker_names)
    fmt = form.response_format
    if fmt == "text":
        return Rendered(result.text + "\n", MEDIA_TYPES[fmt])
    if fmt in ("srt", "vtt"):
        return Rendered(render(result, fmt), MEDIA_TYPES[fmt])
    body: BaseModel
    if fmt == "verbose_json":
        body = verbose(result, form.timestamp_granularities)
    elif fmt == "diarized_json":
        body = diarized(result)
    else:
        body = Transcription(text=result.text, usage=usage(result))
    return Rendered(body.model_dump_json(exclude_none=True), "application/json")


def name_speakers(result: AnalysisResult, names: list[str]) -> AnalysisResult:
    """`result` with its speakers renamed `names[0]`, `names[1]`... in order of first appearance."""
    order = list(dict.fromkeys(s.speaker.speaker_id for s in result.segments))
    renamed = dict(zip(order, names, strict=False))
    if not renamed:
        return result
    segments = [
        s.model_copy(update={"speaker": SpeakerRef(speaker_id=renamed.get(s.speaker.speaker_id, s.speaker.speaker_id))})
        for s in result.segments
    ]
    speakers = {renamed.get(k, k): v for k, v in result.speakers.items()}
    return result.model_copy(update={"segments": segments, "speakers": speakers})


def usage(result: AnalysisResult) -> DurationUsage:
    return DurationUsage(seconds=result.duration)


def language_name(code: str) -> str:
    """OpenAI names the language in English, lower case: `en` -> `english`."""
    return LANGUAGES.get(code, code)


def compression_ratio(text: str) -> float:
    """Whisper's measure of repetition (above 2.4 it judges the text looping): bytes over zlib's bytes."""
    data = text.encode()
    return round(len(data) / len(zlib.compress(data)), 3) if data else 0.0


def verbose(result: AnalysisResult, granularities: list[str]) -> TranscriptionVerbose:
    segments = [
        TranscriptionSegment(
            id=i, start=s.start_time, end=s.end_time, text=s.text, compression_ratio=compression_ratio(s.text)
        )
        for i, s in enumerate(result.segments)
    ]
    words = [TranscriptionWord(word=w.word, start=w.start, end=w.end) for s in result.segments for w in s.words]
    return TranscriptionVerbose(
        language=language_name(result.language),
        duration=result.duration,
        text=result.text,
        segments=segments if "segment" in granularities else None,
        words=words if "word" in granularities else None,
        usage=usage(result),
    )


def diarized_segment(i: int, segment: Segment) -> DiarizedSegment:
    return DiarizedSegment(
        id=f"seg_{i}",
        start=segment.start_time,
        end=segment.end_time,
        speaker=segment.speaker.speaker_id,
        text=segment.text,
    )


def diarized(result: AnalysisResult) -> TranscriptionDiarized:
    segments = [diarized_segment(i, s) for i, s in enumerate(result.segments)]
    return TranscriptionDiarized(duration=result.duration, text=result.text, segments=segments, usage=usage(result))


def transcript_events(result: AnalysisResult, form: TranscriptionForm) -> list[str]:
    """The server-sent events of `stream=true`, each `data: {json}` and a blank line.

    The analysis is whole-file (diarization needs all of the audio), so the
    events are made once it has completed: a `transcript.text.delta` per
    segment (the deltas add up to the whole text), with diarized_json each
    followed by its `transcript.text.segment`, then `transcript.text.done`.
    """
    result = name_speakers(result, form.known_speaker_names)
    diarize = form.response_format == "diarized_json"
    events: list[BaseModel] = []
    for i, (segment, delta) in enumerate(zip(result.segments, text_deltas(result), strict=True)):
        events.append(TextDelta(delta=delta, segment_id=f"seg_{i}" if diarize else None))
        if diarize:
            events.append(diarized_segment(i, segment))
    events.append(TextDone(text=result.text))
    return [f"data: {event.model_dump_json(exclude_none=True)}\n\n" for event in events]


def text_deltas(result: AnalysisResult) -> Iterator[str]:
    """Each segment's piece of `result.text`, separators included, so that the pieces add up to it."""
    text, cursor = result.text, 0
    for i, segment in enumerate(result.segments):
        found = text.find(segment.text, cursor)
        end = len(text) if i == len(result.segments) - 1 else (found + len(segment.text) if found >= 0 else cursor)
        yield text[cursor:end]
        cursor = end


# -- errors -------------------------------------------------------------------

# The form field an error is about, as OpenAI's `param` names it.
_PARAMS: dict[type[AnalyzerError], str] = {
    UnknownModel: "model",
    UnsupportedLanguage: "language",
    NotMediaFile: "file",
    NoAudioStream: "file",
    EmptyAudio: "file",
    InvalidAudio: "file",
    AudioTooLong: "file",
    FileTooLarge: "file",
}


def is_openai_path(path: str) -> bool:
    return path.startswith(PREFIX)


def error_param(error: AnalyzerError) -> str | None:
    return next((_PARAMS[cls] for cls in type(error).__mro__ if cls in _PARAMS), None)


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(description="The form field at fault, if one is.")
    code: str | None = Field(description="This server's stable error code, e.g. `model_not_found`, `not_media`.")


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape, answered on every route under /v1/."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorBody, "description": text}
    for status, text in {
        400: "A bad form field (`param` names it), or an unknown language",
        401: "No API key, or an unknown one (`Authorization: Bearer <key>`)",
        404: "No such model",
        413: "File too large, or audio too long",
        415: "Not a media file, or not a multipart body",
        422: "No audio stream, empty or invalid audio",
        500: "A model failed",
        503: "Overloaded: retry after Retry-After seconds",
    }.items()
}


def openai_error(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.

    `code` is this server's stable error code (`not_media`, `too_large`,
    `overloaded`...), except `invalid_api_key` for a missing or unknown key, the
    code OpenAI's clients know. A full server answers 503 (type `server_error`,
    code `overloaded`, with Retry-After), as OpenAI answers when it is
    overloaded; OpenAI's 429 `rate_limit_exceeded` is a per-key quota, which
    this server does not have.
    """
    if code == "unauthorized":
        code = "invalid_api_key"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return OpenAIErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()


def validation_param(errors: list[dict[str, Any]]) -> str | None:
    """The form field a FastAPI/pydantic validation error is about ("body", field, index...)."""
    for e in errors:
        loc = [part for part in e.get("loc", ()) if isinstance(part, str) and part != "body"]
        if loc:
            return loc[0]
    return None


TRANSCRIPTION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "model": Transcription | TranscriptionVerbose | TranscriptionDiarized,
        "description": "json, verbose_json or diarized_json; text as text/plain, srt and vtt as the subtitle types; "
        "with `stream=true`, server-sent events of `transcript.text.delta`, `transcript.text.segment` and "
        "`transcript.text.done`",
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/x-subrip": {"schema": {"type": "string"}},
            "text/vtt": {"schema": {"type": "string"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    },
    **ERRORS,
}
