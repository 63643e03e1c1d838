"""The job tracker: one named Ray actor shared by every ingress replica.

It owns job state (kept in a `JobStore`, SQLite by default), turns stage
progress into one overall percentage that never goes down, and sends the
callbacks. It is an async actor, so a slow callback receiver only ever holds
up its own job's channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import ray
from ray.util import metrics

from deployments.callbacks import CallbackChannel, CallbackSender
from deployments.jobs import (
    CallbackPayload,
    Job,
    JobError,
    JobStatus,
    JobStore,
    JobView,
    SqliteJobStore,
    job_key,
    now,
)
from pipeline.config import JobSettings, NetworkSettings
from pipeline.media import redact
from pipeline.netguard import NetworkPolicy
from pipeline.progress import StagedProgress
from pipeline.schemas import AnalysisResult

log = logging.getLogger(__name__)

TRACKER_NAME = "ecg-job-tracker"
TRACKER_NAMESPACE = "ecg-audio-analyzer"
INTERRUPTED = JobError(code="interrupted", message="the server restarted while this job was running; submit it again")


class JobTracker:
    def __init__(
        self,
        settings: JobSettings,
        network: NetworkSettings,
        stage_weights: Mapping[str, float],
        store: JobStore | None = None,
    ):
        self._settings = settings
        self._network = NetworkPolicy.from_settings(network)
        self._weights = dict(stage_weights)
        self._store = store or SqliteJobStore(settings.db_path)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="job-store")  # SQLite off the event loop
        self._live: dict[str, Job] = {}  # unfinished jobs; the store has the rest
        self._progress: dict[str, StagedProgress] = {}
        self._channels: dict[str, CallbackChannel] = {}
        self._sender: CallbackSender | None = None
        self._recovered: asyncio.Task | None = None
        self._jobs_gauge = metrics.Gauge("ecg_jobs", "Jobs by status (since the tracker started).", ("status",))
        self._callback_failures = metrics.Counter(
            "ecg_callback_failures_total", "Final callbacks not delivered after every retry."
        )
        self._counts = dict.fromkeys(JobStatus, 0)

    # -- API used by the ingress ---------------------------------------------

    async def submit(self, owner: str, job_id: str, source: str, callback_url: str | None) -> tuple[JobView, bool]:
        """Register `owner`'s job; (the job, True) if new, (the existing job, False) if the owner used the id.

        Every later call names the job by `job_key(owner, job_id)`.
        """
        await self._ready()
        key = job_key(owner, job_id)
        existing = await self._get(key)
        # Checked again after the await: the same id may have arrived meanwhile.
        existing = self._live.get(key, existing)
        if existing is not None:
            return existing.view(), False
        job = Job(
            job_id=job_id,
            owner=owner,
            status=JobStatus.queued,
            message="queued",
            source=redact(source),
            created_at=now(),
            callback_url=callback_url,
        )
        self._live[key] = job
        self._progress[key] = StagedProgress(self._weights, lambda p, m, k=key: self._advance(k, p, m))
        await self._save(job)
        self._count(None, job.status)
        self._notify(job)
        return job.view(), True

    async def start(self, key: str) -> None:
        job = self._live.get(key)
        if job is None:
            return
        self._set_status(job, JobStatus.processing, "processing")
        job.started_at = now()
        await self._save(job)
        self._notify(job)

    def progress(self, key: str, stage: str, fraction: float, message: str) -> None:
        if key in self._progress:  # late updates for a finished job are dropped
            self._progress[key](stage, fraction, message)

    async def complete(self, key: str, result: AnalysisResult) -> None:
        job = self._live.get(key)
        if job is not None:
            job.result, job.progress = result, 100.0
            await self._finish(job, JobStatus.completed, "analysis complete")

    async def fail(self, key: str, error: JobError) -> None:
        job = self._live.get(key)
        if job is not None:
            job.error = error
            await self._finish(job, JobStatus.failed, error.message)

    async def get(self, key: str) -> JobView | None:
        await self._ready()
        job = await self._get(key)
        return job.view() if job else None

    def counts(self) -> dict[str, int]:
        return {status.value: n for status, n in self._counts.items()}

    # -- internals ------------------------------------------------------------

    async def _ready(self) -> None:
        """Jobs a previous tracker left unfinished failed with it: say so, once."""
        if self._recovered is None:
            self._recovered = asyncio.ensure_future(self._fail_interrupted())
        await asyncio.shield(self._recovered)

    async def _fail_interrupted(self) -> None:
        for job in await asyncio.get_running_loop().run_in_executor(self._io, self._store.unfinished):
            log.warning("job %s was interrupted by a restart", job.job_id)
            self._live[job.key] = job
            job.error = INTERRUPTED
            await self._finish(job, JobStatus.failed, INTERRUPTED.message)

    async def _get(self, key: str) -> Job | None:
        if key in self._live:
            return self._live[key]
        return await asyncio.get_running_loop().run_in_executor(self._io, self._store.get, key)

    async def _finish(self, job: Job, status: JobStatus, message: str) -> None:
        self._set_status(job, status, message)
        job.finished_at = now()
        await self._save(job)
        self._live.pop(job.key, None)
        self._progress.pop(job.key, None)
        self._notify(job, final=True)

    def _advance(self, key: str, percent: float, message: str) -> None:
        job = self._live.get(key)
        if job is not None and job.status == JobStatus.processing:
            # Stay below 100 until the result is stored: 100 means "the result is there".
            job.progress, job.message = min(percent, 99.0), message
            self._notify(job)

    def _set_status(self, job: Job, status: JobStatus, message: str) -> None:
        self._count(job.status, status)
        job.status, job.message = status, message

    def _count(self, old: JobStatus | None, new: JobStatus) -> None:
        if old is not None:
            self._counts[old] -= 1
        self._counts[new] += 1
        for status, n in self._counts.items():
            self._jobs_gauge.set(n, tags={"status": status.value})

    def _notify(self, job: Job, final: bool = False) -> None:
        if not job.callback_url:
            return
        channel = self._channels.get(job.key)
        if channel is None:
            channel = CallbackChannel(
                self._callback_sender(),
                job.callback_url,
                job.job_id,
                self._settings.callback_attempts,
                lambda delivered, k=job.key: self._final_sent(k, delivered),
            )
            self._channels[job.key] = channel
        payload = CallbackPayload.of(job)
        channel.finish(payload) if final else channel.progress(payload)

    async def _final_sent(self, key: str, delivered: bool) -> None:
        self._channels.pop(key, None)
        if not delivered:
            log.warning("final callback of job %s was not delivered", key.partition("/")[2])  # no owner in logs
            self._callback_failures.inc()

    def _callback_sender(self) -> CallbackSender:
        if self._sender is None:  # created on the actor's event loop, where it is used
            self._sender = CallbackSender(self._settings, self._network)
        return self._sender

    async def _save(self, job: Job) -> None:
        await asyncio.get_running_loop().run_in_executor(self._io, self._store.save, job)


def job_tracker(
    settings: JobSettings, network: NetworkSettings, stage_weights: Mapping[str, float]
) -> ray.actor.ActorHandle:
    """The tracker actor, created by the first caller and shared by name after that.

    Detached, so it outlives the replica that created it (ingress replicas come
    and go with autoscaling); restarted by Ray if it dies, when it reloads
    state from the store and fails the jobs it had in flight.
    """
    actor = ray.remote(JobTracker).options(
        name=TRACKER_NAME,
        namespace=TRACKER_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        num_cpus=0,
        max_concurrency=1000,
    )
    return actor.remote(settings, network, stage_weights)
