"""The job tracker: one named Ray actor shared by every ingress replica.

It owns the job store (SQLite by default, PostgreSQL on a cluster; see
deployments/store.py), which is also the queue: a job is stored with what to
run before its 202 goes out, ingress replicas claim queued jobs with a lease
they renew while they work, and a job whose lease runs out (its worker died,
or the whole server did) is claimed again by any replica, up to
`jobs.max_attempts` times. The tracker turns stage progress into one
percentage that never goes down and sends the callbacks: progress ones best
effort, final ones from the store's outbox, so their retries survive restarts.

The actor keeps nothing the store does not have: when Ray restarts it (or the
server restarts), it reloads the unfinished jobs and pending callbacks, and
the workers' leases carry on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.util import metrics

from deployments.callbacks import CallbackSender, ProgressChannel
from deployments.errors import JobStateConflict, Overloaded, UnknownJob
from deployments.events import EventFeed, JobEvent
from deployments.jobs import CallbackPayload, Delivery, Job, JobError, JobSpec, JobStatus, JobView, now
from deployments.store import JobStore, open_store
from pipeline.config import Settings
from pipeline.media import redact
from pipeline.netguard import NetworkPolicy
from pipeline.progress import StagedProgress
from pipeline.schemas import AnalysisResult

log = logging.getLogger(__name__)
T = TypeVar("T")

TRACKER_NAME = "ecg-job-tracker"
TRACKER_NAMESPACE = "ecg-audio-analyzer"
SWEEP_EVERY_S = 3600.0
STALE = JobError(code="interrupted", message="stored by an older version without what to run; submit it again")
CANCELLED = JobError(code="cancelled", message="cancelled by the client")


class JobTracker:
    def __init__(self, settings: Settings, stage_weights: Mapping[str, float], store: JobStore | None = None):
        self._settings = settings.jobs
        self._uploads = settings.server
        self._network = NetworkPolicy.from_settings(settings.network)
        self._weights = dict(stage_weights)
        url = settings.jobs.store_url
        self._store = store or open_store(url.get_secret_value() if url else None, settings.jobs.db_path)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="job-store")  # the store's calls off the event loop
        # Reads of finished jobs parse their whole result: on threads of their own, so that a client
        # polling large results never delays a lease renewal.
        self._reads = ThreadPoolExecutor(2, thread_name_prefix="job-reads")
        self._live: dict[str, Job] = {}  # unfinished jobs (the store has them too)
        self._progress: dict[str, StagedProgress] = {}
        self._channels: dict[str, ProgressChannel] = {}
        self._feed = EventFeed()  # for GET /jobs/{id}/events: in memory, a restart starts a new one
        self._reserved = 0  # submissions admitted whose job is not stored yet
        self._sender: CallbackSender | None = None
        self._started: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._sending: set[str] = set()  # outbox deliveries in flight
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._outbox_wake: asyncio.Event | None = None
        self._finished = dict.fromkeys((JobStatus.completed, JobStatus.failed, JobStatus.cancelled), 0)
        self._jobs_gauge = metrics.Gauge(
            "ecg_jobs", "Jobs by status (finished ones: since the tracker started).", ("status",)
        )
        self._callback_failures = metrics.Counter(
            "ecg_callback_failures_total", "Final callbacks not delivered after every retry."
        )

    # -- API used by the ingress ---------------------------------------------

    async def submit(
        self,
        owner: str,
        job_id: str,
        spec: JobSpec,
        label: str,
        callback_url: str | None,
        worker: str | None = None,
    ) -> tuple[JobView, bool]:
        """Store `owner`'s job; (the job, True) if new, (the existing job, False) if the owner used the id.

        With `worker` (a lease token), the job is stored already claimed by it (a
        synchronous request runs on the replica it arrived at); else it waits in
        the queue, unless the queue is full (Overloaded). Every later call names
        the job by `job_key(owner, job_id)`. `spec.request_id` tells a repeated
        call of this very request (Ray retries calls across a tracker restart)
        from another request that reuses the id.
        """
        await self._ready()
        if worker is None:
            self._check_room()
        job = Job(
            job_id=job_id,
            owner=owner,
            status=JobStatus.queued,
            message="queued",
            source=redact(label),
            created_at=now(),
            callback_url=callback_url,
            spec=spec,
        )
        if worker is not None:
            self._lease(job, worker)
        self._reserved += 1
        try:
            stored, created = await self._call(self._store.create, job)
        finally:
            self._reserved -= 1
        # The same request again (Ray retried this call after a restart): it is this job, not a clash.
        if not created and (stored.spec != spec or stored.status.final):
            return stored.view(), False
        self._track(stored)
        self._notify(stored)
        return stored.view(), True

    def queue_full(self) -> bool:
        return self._queued() >= self._settings.max_waiting

    async def claim(self, worker: str) -> Job | None:
        """The oldest job waiting (or left by a dead worker), now leased to `worker` (a token unique to
        this claim); None when there is none."""
        await self._ready()
        while True:
            job = await self._call(self._store.claim, worker, time.time(), time.time() + self._settings.lease_s)
            if job is None:
                return None
            async with self._lock(job.key):
                live = self._live.get(job.key)
                if live is None or live.run != job.run:
                    continue  # finished (cancelled...) while the claim was being written: that write won
                if job.spec is None:
                    await self._finish(job, JobStatus.failed, STALE)
                elif job.attempts > self._settings.max_attempts:
                    lost = JobError(
                        code="worker_lost",
                        message=f"the servers running this job stopped {job.attempts - 1} times; retry it later",
                    )
                    await self._finish(job, JobStatus.failed, lost, keep_upload=True)
                else:
                    return await self._started_on(job, live)

    async def renew(self, key: str, worker: str) -> bool:
        """Extend `worker`'s lease (and save the job's progress); False when the job is not its to run any
        more: cancelled, or claimed by another worker after the lease ran out."""
        await self._ready()
        async with self._lock(key):
            job = self._live.get(key)
            if job is None or job.worker != worker or job.status != JobStatus.processing:
                return False
            until = time.time() + self._settings.lease_s
            renewed = await self._call(self._store.renew, job.model_copy(update={"lease_until": until}))
            if renewed:
                job.lease_until = until
            return renewed

    def progress(self, key: str, worker: str, stage: str, fraction: float, message: str) -> None:
        job = self._live.get(key)
        if job is not None and job.worker == worker and key in self._progress:  # not late, not a lost worker's
            self._progress[key](stage, fraction, message)

    async def complete(self, key: str, worker: str, result: AnalysisResult) -> None:
        await self._ready()
        async with self._lock(key):
            job = self._held(key, worker)
            if job is not None:
                job.result, job.progress = result, 100.0
                await self._finish(job, JobStatus.completed)

    async def fail(self, key: str, worker: str, error: JobError, retryable: bool = False) -> None:
        """End the job failed; `retryable` (a server fault, not the input's) keeps an upload for a retry."""
        await self._ready()
        async with self._lock(key):
            job = self._held(key, worker)
            if job is not None:
                await self._finish(job, JobStatus.failed, error, keep_upload=retryable)

    async def release(self, key: str, worker: str) -> None:
        """Give a job back to the queue uncounted: its replica is shutting down (a downscale, a redeploy)."""
        await self._ready()
        async with self._lock(key):
            job = self._held(key, worker)
            if job is not None:
                job.status, job.message = JobStatus.queued, "queued again: its replica shut down"
                job.worker = job.lease_until = None
                job.attempts -= 1
                await self._call(self._store.save, job)
                self._track(job)
                self._notify(job)

    async def cancel(self, key: str) -> JobView:
        """Cancel a queued or running job (its worker learns at its next lease renewal and stops)."""
        await self._ready()
        async with self._lock(key):
            job = await self._existing(key)
            if job.status.final:
                raise JobStateConflict(f"job {job.job_id} is {job.status} already")
            await self._finish(job, JobStatus.cancelled, CANCELLED)
            return job.view()

    async def retry(self, key: str) -> JobView:
        """Queue a failed or cancelled job again, as a new run (its progress starts again from 0)."""
        await self._ready()
        async with self._lock(key):
            job = await self._existing(key)
            if job.status not in (JobStatus.failed, JobStatus.cancelled):
                raise JobStateConflict(f"job {job.job_id} is {job.status}; only failed or cancelled jobs are retried")
            upload = job.spec.upload if job.spec else None
            if job.spec is None or (upload and not await asyncio.to_thread(Path(upload).exists)):
                raise JobStateConflict(f"job {job.job_id} no longer has its media; submit it again")
            self._check_room()
            job.run, job.attempts = job.run + 1, 0
            job.status, job.message, job.progress = JobStatus.queued, "queued again", 0.0
            job.result = job.error = job.started_at = job.finished_at = None
            await self._call(self._store.save, job)
            self._track(job)
            self._notify(job)
            return job.view()

    async def get(self, key: str) -> JobView | None:
        await self._ready()
        job = await self._get(key)
        return job.view() if job else None

    async def events(self, key: str, last_id: str | None, wait_s: float) -> tuple[list[JobEvent], bool] | None:
        """The job's events after `last_id`, waiting up to `wait_s` for one, and whether the client then
        has its final event; None when there is no such job."""
        await self._ready()
        job = await self._get(key)
        if job is None:
            return None
        return await self._feed.after(key, job, last_id, wait_s)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in JobStatus), 0)
        for job in self._live.values():
            counts[job.status.value] += 1
        for status, n in self._finished.items():
            counts[status.value] = n
        return counts

    # -- the queue ------------------------------------------------------------

    async def _ready(self) -> None:
        """Once per actor: reload what a previous tracker left, then start the outbox and the sweeper.
        Tried again by the next call if it failed (the store was unreachable)."""
        if self._started is None or (self._started.done() and self._started.exception() is not None):
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    def _lock(self, key: str) -> asyncio.Lock:
        """One job's lock: its state changes (claim, renew, finish, cancel, retry) happen one at a time."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    async def _start(self) -> None:
        for job in await self._call(self._store.unfinished):
            self._track(job)
        if self._live:
            log.info("resuming %d unfinished jobs from the store", len(self._live))
        self._outbox_wake = asyncio.Event()
        self._spawn(self._outbox())
        self._spawn(self._sweep_uploads())
        self._report_counts()

    def _check_room(self) -> None:
        if self._queued() + self._reserved >= self._settings.max_waiting:
            raise Overloaded(f"{self._queued()} jobs are waiting already; retry later")

    def _queued(self) -> int:
        return sum(job.status == JobStatus.queued for job in self._live.values())

    def _lease(self, job: Job, worker: str) -> None:
        job.status, job.message = JobStatus.processing, "processing"
        job.worker, job.lease_until = worker, time.time() + self._settings.lease_s
        job.attempts += 1
        job.started_at = job.started_at or now()

    async def _started_on(self, job: Job, previous: Job) -> Job:
        job.started_at = job.started_at or now()
        if job.attempts > 1:
            job.message = f"running again: its worker stopped (attempt {job.attempts} of {self._settings.max_attempts})"
            log.warning("job %s: claimed again (attempt %d)", job.job_id, job.attempts)
        else:
            job.message = "processing"
        job.progress = max(job.progress, previous.progress)
        await self._call(self._store.save, job)
        self._track(job)
        self._notify(job)
        return job

    def _track(self, job: Job) -> None:
        """Keep an unfinished job in memory, with a progress scale that starts where it was."""
        self._live[job.key] = job
        if job.status == JobStatus.processing:
            self._progress[job.key] = StagedProgress(
                self._weights, lambda p, m, k=job.key: self._advance(k, p, m), start=job.progress
            )
        else:
            self._progress.pop(job.key, None)
        self._report_counts()

    def _held(self, key: str, worker: str) -> Job | None:
        """The job if `worker` still holds it; a worker that lost it (cancelled, reclaimed) is ignored."""
        job = self._live.get(key)
        if job is None or job.worker != worker or job.status != JobStatus.processing:
            log.info("job %s: a result from a worker that no longer holds it was dropped", key.partition("/")[2])
            return None
        return job

    async def _existing(self, key: str) -> Job:
        job = await self._get(key)
        if job is None:
            raise UnknownJob(f"no job {key.partition('/')[2]}")
        return job

    async def _get(self, key: str) -> Job | None:
        if key in self._live:
            return self._live[key]
        return await asyncio.get_running_loop().run_in_executor(self._reads, self._store.get, key)

    async def _finish(
        self, job: Job, status: JobStatus, error: JobError | None = None, keep_upload: bool = False
    ) -> None:
        """End the job's run (callers hold its lock). Its upload goes, unless kept for a retry."""
        job.status, job.error = status, error
        job.message = error.message if error else "analysis complete"
        job.finished_at = now()
        job.worker = job.lease_until = None
        delivery = None
        if job.callback_url:
            delivery = Delivery(
                job_key=job.key,
                run=job.run,
                url=job.callback_url,
                webhook_id=f"{job.job_id}.run{job.run}.final",
                next_at=time.time(),
                payload=None if status == JobStatus.completed else CallbackPayload.of(job),
            )
        await self._call(self._store.save, job, delivery)  # the job's end and its callback: one transaction
        self._feed.publish(job.key, job)
        self._live.pop(job.key, None)
        self._progress.pop(job.key, None)
        self._finished[status] += 1
        self._report_counts()
        if job.spec and job.spec.upload and not keep_upload:
            await asyncio.to_thread(Path(job.spec.upload).unlink, missing_ok=True)
        if delivery is not None and self._outbox_wake is not None:
            self._outbox_wake.set()

    def _advance(self, key: str, percent: float, message: str) -> None:
        job = self._live.get(key)
        if job is not None and job.status == JobStatus.processing:
            # Stay below 100 until the result is stored: 100 means "the result is there".
            job.progress, job.message = min(percent, 99.0), message
            self._notify(job)

    def _report_counts(self) -> None:
        for status, n in self.counts().items():
            self._jobs_gauge.set(n, tags={"status": status})

    # -- callbacks ------------------------------------------------------------

    def _notify(self, job: Job) -> None:
        """A progress event, and a progress callback (best effort); final ones go through the outbox."""
        self._feed.publish(job.key, job)
        if not job.callback_url:
            return
        channel = self._channels.get(job.key)
        if channel is None:
            channel = ProgressChannel(self._callback_sender(), job.callback_url, f"{job.job_id}.run{job.run}")
            self._channels[job.key] = channel
        channel.send(CallbackPayload.of(job))

    async def _outbox(self) -> None:
        """Send due final callbacks, for ever: each one until delivered or its retry schedule is spent."""
        assert self._outbox_wake is not None
        while True:
            try:
                due = await self._call(self._store.due, time.time(), 100)
            except Exception:
                log.exception("could not read the callback outbox")
                due = []
            for delivery in due:
                if delivery.id not in self._sending:
                    self._sending.add(delivery.id)
                    self._spawn(self._deliver(delivery))
            with suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_wake.wait(), 1.0)
            self._outbox_wake.clear()

    async def _deliver(self, delivery: Delivery) -> None:
        job_id = delivery.job_key.partition("/")[2]  # no owner in logs
        try:
            channel = self._channels.pop(delivery.job_key, None)
            if channel is not None:
                await channel.closed()  # nothing may arrive after the final callback
            job = await self._get(delivery.job_key)
            if job is None or job.run != delivery.run:  # retried since: this run's end is old news
                await self._call(self._store.delivered, delivery)
                return
            payload = delivery.payload or CallbackPayload.of(job)
            sender = self._callback_sender()
            attempt = await sender.send(delivery.url, payload, delivery.webhook_id)
            delivery.attempts += 1
            delay = None if attempt.delivered else sender.next_delay(delivery.attempts, attempt)
            if delay is None:
                if not attempt.delivered:
                    log.warning("final callback of job %s was not delivered", job_id)
                    self._callback_failures.inc()
                await self._call(self._store.delivered, delivery)
            else:
                delivery.next_at = time.time() + delay
                await self._call(self._store.reschedule, delivery)
        except Exception:
            log.exception("final callback of job %s: delivery failed", job_id)
        finally:
            self._sending.discard(delivery.id)

    def _callback_sender(self) -> CallbackSender:
        if self._sender is None:  # created on the actor's event loop, where it is used
            self._sender = CallbackSender(self._settings, self._network)
        return self._sender

    # -- housekeeping ---------------------------------------------------------

    async def _sweep_uploads(self) -> None:
        """Delete uploads older than `server.upload_retention_s` that no unfinished job needs."""
        while True:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._sweep_once)
            except Exception:
                log.exception("could not sweep the upload directory")
            await asyncio.sleep(SWEEP_EVERY_S)

    def _sweep_once(self) -> None:
        needed = {job.spec.upload for job in list(self._live.values()) if job.spec and job.spec.upload}
        cutoff = time.time() - self._uploads.upload_retention_s
        for path in Path(self._uploads.upload_dir).glob("ecg-upload-*"):
            with suppress(FileNotFoundError):
                if str(path) not in needed and path.stat().st_mtime < cutoff:
                    path.unlink()

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)


def job_tracker(settings: Settings, stage_weights: Mapping[str, float]) -> ray.actor.ActorHandle:
    """The tracker actor, created by the first caller and shared by name after that.

    Detached, so it outlives the replica that created it (ingress replicas come
    and go with autoscaling). Ray restarts it if it dies, and calls made
    meanwhile wait for the new one (`max_task_retries`): every call is safe to
    make twice (a repeated submit finds its own job, a repeated claim only
    leaves a lease to expire).
    """
    actor = ray.remote(JobTracker).options(
        name=TRACKER_NAME,
        namespace=TRACKER_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
        max_concurrency=1000,
    )
    return actor.remote(settings, stage_weights)
