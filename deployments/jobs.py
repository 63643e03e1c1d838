"""Job records. No Ray here: the tracker actor keeps `Job`s in a `JobStore`
(deployments/store.py), ingress replicas claim and run them, clients see
`JobView`s, and callbacks carry `CallbackPayload`s.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, Field

from pipeline.analyzer import AnalysisOptions
from pipeline.schemas import AnalysisResult


class JobStatus(StrEnum):
    queued = "queued"
    processing = "processing"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed, JobStatus.cancelled)


class JobError(BaseModel):
    code: str = Field(description="Stable error identifier, e.g. `not_media`, `unsupported_language`.")
    message: str


class JobView(BaseModel):
    """What `GET /jobs/{job_id}` answers."""

    job_id: str
    status: JobStatus
    progress: float = Field(0.0, ge=0, le=100, description="Overall percent done; never goes down.")
    message: str = ""
    result: AnalysisResult | None = Field(None, description="The analysis, once `completed`.")
    error: JobError | None = Field(None, description="Why the job `failed`.")
    source: str = Field("", description="The media analysed (URLs without query strings).")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


def job_key(owner: str, job_id: str) -> str:
    """Where a job is kept: ids are per owner, so one client can never claim another's id.

    "/" cannot occur in a job id or an owner digest, so keys never collide.
    """
    return f"{owner}/{job_id}"


class JobSpec(BaseModel):
    """What to run: stored at submission, so that any worker can run the job again after a crash."""

    source: str = Field("", description="Path, URL or s3:// URI as given (query strings included).")
    upload: str | None = Field(None, description="Spooled upload file (in `server.upload_dir`), instead of source.")
    filename: str | None = Field(None, description="The upload's name as the client sent it.")
    options: AnalysisOptions = AnalysisOptions()
    request_id: str = Field("", description="Unique per submission: a repeated call of one request is not a clash.")


class Job(JobView):
    """A job as the store keeps it: the public view, its owner and callback, what to run, and its lease."""

    owner: str = Field("", description="Digest of the API key that created the job; empty when anonymous.")
    callback_url: str | None = None
    spec: JobSpec | None = Field(None, description="None only for jobs stored by versions before the queue.")
    run: int = Field(1, description="1, then one more for each POST /jobs/{job_id}/retry.")
    attempts: int = Field(0, description="Claims of this run: a worker that dies leaves its claim to expire.")
    worker: str | None = Field(None, description="The ingress replica holding the lease while processing.")
    lease_until: float | None = Field(None, description="Epoch seconds; past it, any worker may claim the job.")

    @property
    def key(self) -> str:
        return job_key(self.owner, self.job_id)

    def view(self) -> JobView:
        return JobView.model_validate(self.model_dump(include=set(JobView.model_fields)))


class CallbackPayload(BaseModel):
    """The body POSTed to `callback_url`: the product's five keys, plus `error` when it failed."""

    job_id: str
    status: JobStatus
    progress: float
    message: str
    result: AnalysisResult | None = None
    error: JobError | None = None

    @classmethod
    def of(cls, job: Job) -> CallbackPayload:
        return cls(
            job_id=job.job_id,
            status=job.status,
            progress=job.progress,
            message=job.message,
            result=job.result,
            error=job.error,
        )


class Delivery(BaseModel):
    """A final callback waiting in the outbox: it survives restarts until the receiver takes it."""

    job_key: str
    run: int
    url: str
    webhook_id: str = Field(description="One id for every attempt, so that receivers can deduplicate.")
    attempts: int = 0
    next_at: float = Field(description="Epoch seconds of the next attempt.")
    payload: CallbackPayload | None = Field(
        None,
        description="What to send, kept when small (failed, cancelled: the job may be retried meanwhile); "
        "None for a completed job, whose result is read from the job instead of being stored twice.",
    )

    @property
    def id(self) -> str:
        return f"{self.job_key}#{self.run}"


def now() -> datetime:
    return datetime.now(UTC)
