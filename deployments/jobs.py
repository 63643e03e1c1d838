"""Job state and where it is kept. No Ray here: the tracker actor owns a store
and these records; the ingress returns `JobView`s; callbacks carry `CallbackPayload`s.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field

from pipeline.schemas import AnalysisResult


class JobStatus(StrEnum):
    queued = "queued"
    processing = "processing"
    completed = "completed"
    failed = "failed"

    @property
    def final(self) -> bool:
        return self in (JobStatus.completed, JobStatus.failed)


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


class Job(JobView):
    """A job as the tracker keeps it: the public view plus its owner and where to send callbacks."""

    owner: str = Field("", description="Digest of the API key that created the job; empty when anonymous.")
    callback_url: str | None = None

    @property
    def key(self) -> str:
        return job_key(self.owner, self.job_id)

    def view(self) -> JobView:
        return JobView.model_validate(self.model_dump(exclude={"callback_url", "owner"}))


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


def now() -> datetime:
    return datetime.now(UTC)


class JobStore(Protocol):
    def save(self, job: Job) -> None: ...

    def get(self, key: str) -> Job | None: ...

    def unfinished(self) -> list[Job]: ...


class SqliteJobStore:
    """Jobs as JSON rows in one SQLite file. Writes are rare (state changes, not
    every progress tick), so one connection behind a lock is plenty."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The tracker calls from a worker thread; the lock serialises access.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Keyed by job_key(owner, job_id). (The older `jobs` table, keyed by bare id, is left alone.)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS owned_jobs (key TEXT PRIMARY KEY, status TEXT NOT NULL, data TEXT NOT NULL)"
        )
        self._lock = threading.Lock()

    def save(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO owned_jobs (key, status, data) VALUES (?, ?, ?)",
                (job.key, job.status.value, job.model_dump_json()),
            )

    def get(self, key: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM owned_jobs WHERE key = ?", (key,)).fetchone()
        return Job.model_validate_json(row[0]) if row else None

    def unfinished(self) -> list[Job]:
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM owned_jobs WHERE status IN (?, ?)", (JobStatus.queued, JobStatus.processing)
            ).fetchall()
        return [Job.model_validate_json(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
