"""HTTP request and response models of the ingress (the analysis result itself
is `pipeline.schemas.AnalysisResult`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from deployments.jobs import JobStatus

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MAX_SOURCE_CHARS = 4096  # longer than any real path, URL or presigned URL
MAX_SPEAKERS = 100
SpeakerCount = Annotated[int | None, Field(ge=1, le=MAX_SPEAKERS)]


class AnalysisRequest(BaseModel):
    """The product's request body. `audio_path` wins when both paths are given."""

    video_path: str | None = Field(
        None,
        max_length=MAX_SOURCE_CHARS,
        description="Path under the server's local roots, public http(s) URL or s3:// URI of a video.",
    )
    audio_path: str | None = Field(
        None, max_length=MAX_SOURCE_CHARS, description="Same, for an audio file (used instead of video_path)."
    )
    language: str = Field("auto", max_length=16, description="'auto' to detect, or an ISO 639-1 code such as 'en'.")
    job_id: str | None = Field(
        None,
        pattern=JOB_ID_PATTERN,
        description="Client-chosen id; a new UUID when omitted. Reusing an id "
        "returns the existing job instead of running it again.",
    )
    num_speakers: SpeakerCount = Field(None, description="Exact number of speakers, when known.")
    min_speakers: SpeakerCount = None
    max_speakers: SpeakerCount = None


class JobRequest(AnalysisRequest):
    callback_url: str | None = Field(
        None,
        max_length=MAX_SOURCE_CHARS,
        description="Public http(s) URL that receives progress and final callbacks (POST, JSON).",
    )


class JobAccepted(BaseModel):
    job_id: str
    status: JobStatus
    progress: float
    message: str
    status_url: str = Field(description="Where to poll the job: GET /jobs/{job_id}.")


class ErrorBody(BaseModel):
    error: str = Field(description="Stable error code, e.g. `not_found`, `not_media`, `overloaded`.")
    message: str = Field(description="What went wrong, for humans.")


class StageInfo(BaseModel):
    """What one stage deployment reports about itself."""

    ready: bool = True
    model: str | None = None
    device: str | None = None
    detail: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    deployments: dict[str, StageInfo]
    jobs: dict[str, int] = Field(default_factory=dict, description="Jobs by status since the tracker started.")
