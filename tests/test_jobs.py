"""Jobs without Ray: the job store (SQLite and a real PostgreSQL server, one suite
for both), callback delivery against a real HTTP receiver, and the tracker's
queue, leases and outbox (run in-process), error translation."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time

import pytest
from ray.serve.exceptions import BackPressureError
from standardwebhooks import Webhook

from deployments.callbacks import Attempt, CallbackSender, sign
from deployments.errors import JobStateConflict, Overloaded, UnknownJob, as_analyzer_error, http_status
from deployments.jobs import CallbackPayload, Delivery, Job, JobError, JobSpec, JobStatus, job_key, now
from deployments.progress import TrackerProgress
from deployments.store import PostgresJobStore, SqliteJobStore
from deployments.tracker import JobTracker
from pipeline.analyzer import STAGE_WEIGHTS as WEIGHTS
from pipeline.config import JobSettings, NetworkSettings, ServerSettings, Settings
from pipeline.errors import ModelError, NotMediaFile, SourceNotFound, UnsupportedLanguage
from pipeline.netguard import NetworkPolicy
from pipeline.schemas import AnalysisResult, Metadata
from tests.serving import CallbackReceiver

# Callbacks go to receivers on loopback here: allowed explicitly, as the safe default refuses them.
LOOPBACK = NetworkSettings(allowed_hosts=["127.0.0.0/8"])
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
RESULT = AnalysisResult(
    segments=[],
    speakers={},
    text="",
    language="en",
    duration=1.0,
    metadata=Metadata(processing_time=0.1, model_versions={}),
)
SPEC = JobSpec(source="https://media.example/a.wav?token=secret")


@pytest.fixture
def receiver():
    r = CallbackReceiver()
    yield r
    r.close()


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """A function opening the store under test; each call is another connection to the same data."""
    if request.param == "sqlite":
        path = tmp_path / "db" / "jobs.sqlite3"
        return lambda: SqliteJobStore(path)
    server = request.getfixturevalue("postgres")
    server.reset()
    return lambda: PostgresJobStore(server.url)


def job_settings(tmp_path, **overrides) -> Settings:
    jobs = {
        "db_path": tmp_path / "jobs.sqlite3",
        "callback_secret": SECRET,
        "callback_retry_delays_s": [0.05, 0.1, 0.2],
        "lease_s": 30.0,
        **overrides,
    }
    return Settings(jobs=JobSettings(**jobs), network=LOOPBACK, server=ServerSettings(upload_dir=tmp_path / "up"))


def new_job(job_id: str, owner: str = "", **fields) -> Job:
    return Job(job_id=job_id, owner=owner, status=JobStatus.queued, created_at=now(), spec=SPEC, **fields)


def payload(job_id: str = "j", status: JobStatus = JobStatus.processing) -> CallbackPayload:
    return CallbackPayload(job_id=job_id, status=status, progress=10.0, message="working")


# -- the store: one suite, both implementations ---------------------------------


def test_store_create_get_and_ids_per_owner(open_store):
    store = open_store()
    queued = new_job("a", callback_url="http://x/cb")
    assert store.create(queued) == (queued, True)
    again, created = store.create(new_job("a"))  # the same key: the stored job comes back
    assert not created and again == queued
    theirs, created = store.create(new_job("a", owner="0123abcd"))  # another owner, another job
    assert created and store.get(job_key("0123abcd", "a")) == theirs
    assert store.get(job_key("", "zzz")) is None
    store.close()
    reopened = open_store()
    assert reopened.get(job_key("", "a")) == queued  # on disk / in the server
    assert "callback_url" not in queued.view().model_dump() and "spec" not in queued.view().model_dump()
    reopened.close()


def test_store_claims_oldest_first_and_leases(open_store):
    store = open_store()
    for name in ("first", "second"):
        store.create(new_job(name))
        time.sleep(0.01)
    assert store.count_queued() == 2
    t = time.time()
    first = store.claim("w1", t, t + 30)
    assert first.job_id == "first" and first.status == "processing" and first.worker == "w1" and first.attempts == 1
    assert store.claim("w2", t, t + 30).job_id == "second"
    assert store.claim("w3", t, t + 30) is None  # both leased, neither expired
    first.lease_until = t + 60
    assert store.renew(first) and not store.renew(first.model_copy(update={"worker": "w2"}))  # only its holder
    # w1 dies: once its lease has run out, another worker takes the job, its attempts counted.
    again = store.claim("w3", t + 61, t + 91)
    assert (again.job_id, again.worker, again.attempts) == ("first", "w3", 2)
    first.lease_until = t + 120
    assert not store.renew(first)  # the old holder learns it lost the job
    assert [j.job_id for j in store.unfinished()] == ["first", "second"] and store.count_queued() == 0
    again.status = JobStatus.completed
    store.save(again)
    assert not store.renew(again)  # finished: nothing to renew
    assert [j.job_id for j in store.unfinished()] == ["second"]
    store.close()


def test_store_outbox_is_saved_with_the_job(open_store):
    store = open_store()
    job = new_job("a")
    store.create(job)
    job.status = JobStatus.completed
    delivery = Delivery(job_key=job.key, run=1, url="http://x/cb", webhook_id="a.run1.final", next_at=100.0)
    store.save(job, delivery)
    assert store.due(99.0, 10) == [] and store.due(100.0, 10) == [delivery]
    delivery.attempts, delivery.next_at = 1, 200.0
    store.reschedule(delivery)
    assert store.due(150.0, 10) == [] and store.due(200.0, 10)[0].attempts == 1
    store.close()
    reopened = open_store()  # pending deliveries outlive the process
    (pending,) = reopened.due(200.0, 10)
    reopened.delivered(pending)
    assert reopened.due(1e12, 10) == []
    reopened.close()


def test_concurrent_claimers_never_share_a_job(open_store):
    """Four connections claiming at once (SQLite's write lock, PostgreSQL's SKIP LOCKED): every job once."""
    setup = open_store()
    for i in range(40):
        setup.create(new_job(f"j{i:02d}"))
    setup.close()
    claimed: list[str] = []
    lock = threading.Lock()

    def claimer(name: str) -> None:
        store = open_store()
        while (job := store.claim(name, time.time(), time.time() + 30)) is not None:
            with lock:
                claimed.append(job.job_id)
        store.close()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == [f"j{i:02d}" for i in range(40)]


# -- delivery -------------------------------------------------------------------


def test_signature_verifies_with_standard_webhooks():
    body = payload().model_dump_json().encode()
    headers = {"webhook-id": "m1", "webhook-timestamp": str(int(time.time()))}
    headers["webhook-signature"] = sign(SECRET, "m1", int(headers["webhook-timestamp"]), body)
    assert Webhook(SECRET).verify(body, headers)["job_id"] == "j"


@pytest.mark.parametrize(
    ("status", "delivered", "retry"),
    [
        (200, True, False),
        (500, False, True),
        (503, False, True),
        (429, False, True),
        (400, False, False),
        (302, False, False),
    ],
)
def test_one_attempt_says_whether_to_retry(tmp_path, receiver, status, delivered, retry):
    """5xx and 429 may succeed later; any other 4xx is a refusal; redirects are not followed."""
    receiver.scripted["/cb"] = [status]
    sender = CallbackSender(job_settings(tmp_path).jobs, NetworkPolicy.from_settings(LOOPBACK))
    attempt = asyncio.run(sender.send(receiver.url("/cb"), payload(), "msg-1"))
    assert (attempt.delivered, attempt.retry) == (delivered, retry)
    (call,) = receiver.received("/cb")
    assert call.headers["webhook-id"] == "msg-1"


def test_retry_schedule_spans_hours_and_honours_retry_after(tmp_path):
    default = JobSettings()
    assert sum(default.callback_retry_delays_s) > 24 * 3600  # Standard Webhooks' schedule: about a day
    sender = CallbackSender(job_settings(tmp_path, callback_retry_delays_s=[10.0, 100.0]).jobs, NetworkPolicy())
    failed = Attempt(delivered=False, retry=True)
    assert 8 <= sender.next_delay(1, failed) <= 12 and 80 <= sender.next_delay(2, failed) <= 120
    assert sender.next_delay(3, failed) is None  # schedule spent
    assert sender.next_delay(1, Attempt(False, True, retry_after=60.0)) == 60.0
    assert sender.next_delay(1, Attempt(False, False)) is None  # refused: no retry


def test_callbacks_to_refused_addresses_are_never_sent(tmp_path, receiver):
    """The default policy refuses loopback: no retry, and nothing arrives."""
    sender = CallbackSender(job_settings(tmp_path).jobs, NetworkPolicy.from_settings(NetworkSettings()))
    attempt = asyncio.run(sender.send(receiver.url("/cb"), payload(), "m"))
    assert not attempt.delivered and not attempt.retry
    assert receiver.received("/cb") == []


# -- the tracker: queue, leases, outbox -------------------------------------------


async def run_job(tracker: JobTracker, job_id: str, url: str | None, fail: bool = False) -> None:
    await tracker.submit("", job_id, SPEC, SPEC.source, url)
    job = await tracker.claim("w1")
    assert job.job_id == job_id and job.spec == SPEC
    for fraction in (0.0, 0.5, 0.4, 1.0):  # 0.4 after 0.5: progress must not go back
        tracker.progress(job.key, "w1", "transcription", fraction, f"asr {fraction}")
        await asyncio.sleep(0.05)
    if fail:
        await tracker.fail(job.key, "w1", JobError(code="not_media", message="not a media file"))
    else:
        await tracker.complete(job.key, "w1", RESULT)
    tracker.progress(job.key, "w1", "diarization", 1.0, "late")  # after the end: dropped


async def settle(tracker: JobTracker, timeout_s: float = 10) -> None:
    """Until the outbox is empty and nothing is being sent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not tracker._sending and not tracker._store.due(1e12, 1):
            return
        await asyncio.sleep(0.05)


def test_tracker_progress_final_and_late_updates(tmp_path, receiver):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path), WEIGHTS)
        await run_job(tracker, "ok", receiver.url("/ok"))
        await run_job(tracker, "bad", receiver.url("/bad"), fail=True)
        await settle(tracker)
        return tracker, await tracker.get(job_key("", "ok")), await tracker.get(job_key("", "bad"))

    tracker, ok, bad = asyncio.run(scenario())
    assert ok.status == "completed" and ok.progress == 100 and ok.result is not None
    assert ok.source == "https://media.example/a.wav"  # query strings may hold credentials
    assert bad.status == "failed" and bad.error.code == "not_media"
    for path, final in (("/ok", "completed"), ("/bad", "failed")):
        calls = receiver.received(path)
        progress = [c.body["progress"] for c in calls]
        assert progress == sorted(progress)
        assert [c.body["status"] for c in calls].count(final) == 1 and calls[-1].body["status"] == final
        assert all(c.body["message"] != "late" for c in calls)
        ids = [c.headers["webhook-id"] for c in calls]
        assert len(set(ids)) == len(ids)  # every message its own id
    assert tracker.counts() == {"queued": 0, "processing": 0, "completed": 1, "failed": 1, "cancelled": 0}


def test_final_callback_waits_in_the_outbox_across_a_restart(open_store, tmp_path, receiver):
    """The receiver fails the first attempts; the tracker 'dies' meanwhile; a new one on the same store
    delivers the final callback with the same webhook-id."""
    receiver.refuse_finals["/cb"] = 2  # answered 500

    async def first_life():
        settings = job_settings(tmp_path, callback_retry_delays_s=[0.2, 30.0])
        tracker = JobTracker(settings, WEIGHTS, store=open_store())
        await tracker.submit("", "j", SPEC, SPEC.source, receiver.url("/cb"))
        job = await tracker.claim("w1")
        await tracker.complete(job.key, "w1", RESULT)
        deadline = time.monotonic() + 10
        while len([c for c in receiver.received("/cb") if c.final]) < 2:  # two failed attempts, then 30 s to wait
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    async def second_life():
        settings = job_settings(tmp_path, callback_retry_delays_s=[0.2, 30.0])
        tracker = JobTracker(settings, WEIGHTS, store=open_store())
        (pending,) = tracker._store.due(1e12, 10)
        pending.next_at = time.time()  # skip the 30 s wait: what matters is that it is still there
        tracker._store.reschedule(pending)
        await tracker.get(job_key("", "j"))  # the new tracker starts
        await settle(tracker)

    asyncio.run(first_life())
    asyncio.run(second_life())
    finals = [c for c in receiver.received("/cb") if c.final]
    assert [c.answered for c in finals] == [500, 500, 200]
    assert {c.headers["webhook-id"] for c in finals} == {"j.run1.final"}


def test_restarted_tracker_resumes_unfinished_jobs(open_store, tmp_path):
    async def scenario():
        settings = job_settings(tmp_path, lease_s=0.5)
        first = JobTracker(settings, WEIGHTS, store=open_store())
        await first.submit("", "running", SPEC, SPEC.source, None)
        await first.submit("", "waiting", SPEC, SPEC.source, None)
        running = await first.claim("w1")
        first.progress(running.key, "w1", "transcription", 0.5, "half")
        second = JobTracker(settings, WEIGHTS, store=open_store())  # same store: a restart; w1 keeps renewing its lease
        assert await second.renew(running.key, "w1")
        waiting = await second.claim("w2")
        assert waiting.job_id == "waiting" and await second.claim("w2") is None
        await asyncio.sleep(0.6)  # w1 died: its lease runs out
        reclaimed = await second.claim("w2")
        before = (await second.get(running.key)).progress
        second.progress(running.key, "w1", "transcription", 1.0, "from the lost worker")  # ignored
        return reclaimed, before, await second.get(running.key)

    reclaimed, before, view = asyncio.run(scenario())
    assert (reclaimed.job_id, reclaimed.attempts, reclaimed.worker) == ("running", 2, "w2")
    assert view.status == "processing" and "attempt 2" in view.message and view.progress == before


def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(open_store, tmp_path, receiver):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path, lease_s=0.1, max_attempts=2), WEIGHTS, store=open_store())
        await tracker.submit("", "doomed", SPEC, SPEC.source, receiver.url("/doomed"))
        for worker in ("w1", "w2"):
            assert (await tracker.claim(worker)).worker == worker
            await asyncio.sleep(0.15)  # and dies
        assert await tracker.claim("w3") is None
        await settle(tracker)
        return await tracker.get(job_key("", "doomed"))

    job = asyncio.run(scenario())
    assert job.status == "failed" and job.error.code == "worker_lost"
    assert [c.body["status"] for c in receiver.received("/doomed") if c.final] == ["failed"]


def test_cancel_and_retry(open_store, tmp_path, receiver):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path), WEIGHTS, store=open_store())
        await tracker.submit("", "c", SPEC, SPEC.source, receiver.url("/c"))
        job = await tracker.claim("w1")
        cancelled = await tracker.cancel(job.key)
        renewed = await tracker.renew(job.key, "w1")  # the worker learns, and stops
        await tracker.complete(job.key, "w1", RESULT)  # a late result of the cancelled run is dropped
        with pytest.raises(JobStateConflict):
            await tracker.cancel(job.key)
        with pytest.raises(UnknownJob):
            await tracker.cancel(job_key("", "nope"))
        await settle(tracker)  # the cancelled callback is out (a retry before that would drop it)
        again = await tracker.retry(job.key)
        rerun = await tracker.claim("w2")
        with pytest.raises(JobStateConflict):
            await tracker.retry(job.key)  # running: nothing to retry
        await tracker.complete(rerun.key, "w2", RESULT)
        await settle(tracker)
        return cancelled, renewed, again, rerun, await tracker.get(job.key)

    cancelled, renewed, again, rerun, final = asyncio.run(scenario())
    assert cancelled.status == "cancelled" and not renewed
    assert again.status == "queued" and rerun.run == 2 and rerun.attempts == 1
    assert final.status == "completed" and final.result is not None
    finals = [c for c in receiver.received("/c") if c.final or c.body["status"] == "cancelled"]
    assert [(c.body["status"], c.headers["webhook-id"]) for c in finals] == [
        ("cancelled", "c.run1.final"),
        ("completed", "c.run2.final"),
    ]


def test_full_queue_is_overloaded_and_sync_jobs_skip_it(tmp_path):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path, max_waiting=2), WEIGHTS)
        for name in ("a", "b"):
            await tracker.submit("", name, SPEC, SPEC.source, None)
        assert tracker.queue_full()
        with pytest.raises(Overloaded):
            await tracker.submit("", "c", SPEC, SPEC.source, None)
        _, created = await tracker.submit("", "sync", SPEC, SPEC.source, None, worker="w1")  # runs at once
        return created, await tracker.get(job_key("", "sync"))

    created, sync = asyncio.run(scenario())
    assert created and sync.status == "processing"


def test_same_job_id_submitted_twice_at_once_creates_one_job(tmp_path):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path), WEIGHTS)
        one, two = JobSpec(source="a.wav"), JobSpec(source="b.wav")
        twins = await asyncio.gather(
            tracker.submit("", "twin", one, "a.wav", None), tracker.submit("", "twin", two, "b.wav", None)
        )
        repeated = await tracker.submit("", "twin", one, "a.wav", None)  # the very same request (a retried call)
        other = await tracker.submit("another-owner", "twin", two, "b.wav", None)
        return twins, repeated, other

    ((_, first), (_, second)), (_, repeated), (view, created) = asyncio.run(scenario())
    assert sorted([first, second]) == [False, True] and repeated
    assert created and view.source == "b.wav"  # ids are per owner: no one can take another's id


def test_dead_receiver_does_not_hold_up_other_jobs(tmp_path, receiver):
    async def scenario():
        settings = job_settings(tmp_path, callback_retry_delays_s=[1.0] * 5, callback_timeout_s=1)
        tracker = JobTracker(settings, WEIGHTS)
        await tracker.submit("", "stuck", SPEC, SPEC.source, "http://127.0.0.1:9/dead")  # refused, retried
        stuck = await tracker.claim("w1")
        await tracker.complete(stuck.key, "w1", RESULT)
        t0 = time.monotonic()
        await run_job(tracker, "fine", receiver.url("/fine"))
        while not any(c.final for c in receiver.received("/fine")) and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.05)
        return time.monotonic() - t0, [d.job_key for d in tracker._store.due(1e12, 10)]

    elapsed, pending = asyncio.run(scenario())
    assert pending == [job_key("", "stuck")]  # the dead receiver's final callback waits for its retry...
    assert elapsed < 3  # ...while the other job's callbacks went through at once


def test_uploads_of_old_failed_jobs_are_swept(tmp_path):
    settings = job_settings(tmp_path)
    settings.server.upload_retention_s = 60
    uploads = settings.server.upload_dir
    uploads.mkdir()
    old, needed, fresh = (uploads / f"ecg-upload-{n}" for n in ("old", "needed", "fresh"))
    for path in (old, needed, fresh):
        path.write_bytes(b"x")

    async def scenario():
        tracker = JobTracker(settings, WEIGHTS)
        await tracker.submit("", "u", JobSpec(upload=str(needed), filename="a.wav"), "a.wav", None)
        for path in (old, needed):  # an hour old (set after the tracker's own first sweep at start)
            os.utime(path, (time.time() - 3600, time.time() - 3600))
        tracker._sweep_once()

    asyncio.run(scenario())
    assert not old.exists() and needed.exists() and fresh.exists()


def test_tracker_progress_thins_updates():
    class Recorder:
        def __init__(self):
            self.calls = []
            self.progress = self

        def remote(self, *args):
            self.calls.append(args)

    tracker = Recorder()
    hook = TrackerProgress(tracker, "j", "w1", interval_s=60)
    for i in range(11):
        hook("transcription", i / 10, "x")
    # the first, then nothing within the interval but the last
    assert [c[3] for c in tracker.calls] == [0.0, 1.0]


def test_errors_map_to_http_statuses():
    assert http_status(SourceNotFound("x")) == 404
    assert http_status(NotMediaFile("x")) == 415
    assert http_status(UnsupportedLanguage("x")) == 400
    assert http_status(Overloaded("x")) == 503
    assert http_status(JobStateConflict("x")) == 409
    assert http_status(ModelError("x")) == 500
    assert isinstance(as_analyzer_error(BackPressureError(num_queued_requests=5, max_queued_requests=5)), Overloaded)
    assert isinstance(as_analyzer_error(RuntimeError("boom")), ModelError)


def test_a_claim_racing_a_cancel_never_runs_the_job(tmp_path, open_store):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path), WEIGHTS, store=open_store())
        outcomes = []
        for i in range(10):
            await tracker.submit("", f"r{i}", SPEC, SPEC.source, None)
            claimed, _ = await asyncio.gather(tracker.claim(f"w{i}"), tracker.cancel(job_key("", f"r{i}")))
            still_held = claimed is not None and await tracker.renew(claimed.key, claimed.worker)
            outcomes.append(((await tracker.get(job_key("", f"r{i}"))).status, still_held))
        return outcomes, tracker._store.unfinished()

    outcomes, unfinished = asyncio.run(scenario())
    assert outcomes == [("cancelled", False)] * 10 and unfinished == []


def test_a_replica_shutting_down_gives_its_job_back_uncounted(tmp_path):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path), WEIGHTS)
        await tracker.submit("", "j", SPEC, SPEC.source, None)
        first = await tracker.claim("w1")
        await tracker.release(first.key, "w1")
        second = await tracker.claim("w2")
        return second

    second = asyncio.run(scenario())
    assert second.job_id == "j" and second.attempts == 1 and second.worker == "w2"


def test_a_retried_job_drops_its_previous_runs_pending_callback(tmp_path, receiver):
    receiver.refuse_finals["/r"] = 1  # run 1's failed callback fails once, then waits 30 s for its retry

    async def scenario():
        tracker = JobTracker(job_settings(tmp_path, callback_retry_delays_s=[30.0]), WEIGHTS)
        await tracker.submit("", "r", SPEC, SPEC.source, receiver.url("/r"))
        job = await tracker.claim("w1")
        await tracker.fail(job.key, "w1", JobError(code="model_error", message="boom"), retryable=True)
        while not any(c.final for c in receiver.received("/r")):
            await asyncio.sleep(0.05)
        await tracker.retry(job.key)
        (pending,) = tracker._store.due(1e12, 10)
        pending.next_at = time.time()  # due now: it must be dropped, not sent after run 2 began
        tracker._store.reschedule(pending)
        rerun = await tracker.claim("w2")
        await tracker.complete(rerun.key, "w2", RESULT)
        await settle(tracker)

    asyncio.run(scenario())
    finals = [(c.body["status"], c.answered) for c in receiver.received("/r") if c.final]
    assert finals == [("failed", 500), ("completed", 200)]


def test_uploads_go_with_input_failures_and_stay_for_server_faults(tmp_path):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path), WEIGHTS)
        paths = {}
        for name, retryable in (("bad-input", False), ("server-fault", True)):
            paths[name] = tmp_path / f"ecg-upload-{name}"
            paths[name].write_bytes(b"x")
            await tracker.submit("", name, JobSpec(upload=str(paths[name]), filename="a.wav"), "a.wav", None)
            job = await tracker.claim("w")
            await tracker.fail(job.key, "w", JobError(code="c", message="m"), retryable=retryable)
        with pytest.raises(JobStateConflict):
            await tracker.retry(job_key("", "bad-input"))  # its media is gone
        await tracker.retry(job_key("", "server-fault"))
        return paths

    paths = asyncio.run(scenario())
    assert not paths["bad-input"].exists() and paths["server-fault"].exists()


def test_jobs_stored_before_the_queue_are_moved_once(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE owned_jobs (key TEXT PRIMARY KEY, status TEXT NOT NULL, data TEXT NOT NULL)")
    done = Job(job_id="old", status=JobStatus.completed, created_at=now(), result=RESULT)
    old.execute("INSERT INTO owned_jobs VALUES (?, ?, ?)", (done.key, "completed", done.model_dump_json()))
    old.commit()
    old.close()
    assert SqliteJobStore(path).get(done.key).result == RESULT
    assert SqliteJobStore(path).get(done.key).result == RESULT  # opened again: nothing moved twice


def test_an_unreachable_postgres_never_shows_its_password():
    from deployments.store import StoreUnavailable

    store = PostgresJobStore("postgresql://ecg:pa55-w0rd-secret@127.0.0.1:1/ecg")  # nothing listens on port 1
    with pytest.raises(StoreUnavailable) as raised:
        store.get("k")
    assert "pa55-w0rd-secret" not in str(raised.value) and raised.value.__cause__ is None


def test_an_unreadable_row_is_set_aside_and_the_queue_goes_on(open_store):
    store = open_store()
    store.create(new_job("broken"))
    store.create(new_job("fine"))
    with store._transaction() as sql:  # as a newer version might have written it
        sql("UPDATE job_queue SET data = ? WHERE key = ?", ('{"job_id": 42}', job_key("", "broken")))
    assert [j.job_id for j in store.unfinished()] == ["fine"]
    assert store.claim("w", time.time(), time.time() + 30).job_id == "fine"
    assert store.claim("w", time.time(), time.time() + 30) is None
    store.close()
