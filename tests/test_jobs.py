"""Jobs without Ray: the SQLite store, callback delivery against a real HTTP
receiver, the tracker's bookkeeping (run in-process), error translation."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest
from ray.serve.exceptions import BackPressureError
from standardwebhooks import Webhook

from deployments.callbacks import CallbackSender, sign
from deployments.errors import Overloaded, as_analyzer_error, http_status
from deployments.jobs import CallbackPayload, Job, JobError, JobStatus, SqliteJobStore, job_key, now
from deployments.progress import TrackerProgress
from deployments.tracker import JobTracker
from pipeline.analyzer import STAGE_WEIGHTS as WEIGHTS
from pipeline.config import JobSettings, NetworkSettings
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


@pytest.fixture
def receiver():
    r = CallbackReceiver()
    yield r
    r.close()


def job_settings(tmp_path, **overrides) -> JobSettings:
    defaults = {"db_path": tmp_path / "jobs.sqlite3", "callback_backoff_s": 0.05, "callback_secret": SECRET}
    return JobSettings(**{**defaults, **overrides})


def payload(job_id: str = "j", status: JobStatus = JobStatus.processing) -> CallbackPayload:
    return CallbackPayload(job_id=job_id, status=status, progress=10.0, message="working")


def test_store_round_trip_and_unfinished(tmp_path):
    store = SqliteJobStore(tmp_path / "db" / "jobs.sqlite3")
    queued = Job(job_id="a", status=JobStatus.queued, created_at=now(), callback_url="http://x/cb")
    done = Job(job_id="b", status=JobStatus.failed, created_at=now(), error=JobError(code="c", message="m"))
    theirs = Job(job_id="a", owner="0123abcd", status=JobStatus.completed, created_at=now())
    store.save(queued)
    store.save(done)
    store.save(theirs)  # the same id under another owner is another job
    assert store.get(job_key("", "a")) == queued and store.get(job_key("", "b")) == done
    assert store.get(job_key("0123abcd", "a")) == theirs and store.get(job_key("", "zzz")) is None
    assert [j.job_id for j in store.unfinished()] == ["a"]
    store.close()
    assert SqliteJobStore(tmp_path / "db" / "jobs.sqlite3").get(job_key("", "b")) == done  # on disk
    assert "callback_url" not in queued.view().model_dump()


def test_signature_verifies_with_standard_webhooks():
    body = payload().model_dump_json().encode()
    headers = {"webhook-id": "m1", "webhook-timestamp": str(int(time.time()))}
    headers["webhook-signature"] = sign(SECRET, "m1", int(headers["webhook-timestamp"]), body)
    assert Webhook(SECRET).verify(body, headers)["job_id"] == "j"


@pytest.mark.parametrize(
    ("answers", "attempts", "delivered", "calls"),
    [
        ([500, 503], 3, True, 3),  # 5xx retried until 2xx
        ([429], 3, True, 2),  # 429 retried
        ([500, 500, 500], 3, False, 3),  # gives up after the attempts
        ([400], 3, False, 1),  # a 4xx other than 429 is permanent
        ([302], 3, False, 1),  # redirects are not followed
    ],
)
def test_delivery_retries_only_what_may_succeed(tmp_path, receiver, answers, attempts, delivered, calls):
    receiver.scripted["/cb"] = list(answers)
    sender = CallbackSender(job_settings(tmp_path), NetworkPolicy.from_settings(LOOPBACK))
    ok = asyncio.run(sender.deliver(receiver.url("/cb"), payload(), "msg-1", attempts))
    assert ok is delivered
    received = receiver.received("/cb")
    assert len(received) == calls
    assert {c.headers["webhook-id"] for c in received} == {"msg-1"}


def test_unreachable_receiver_is_not_an_error(tmp_path):
    sender = CallbackSender(job_settings(tmp_path, callback_timeout_s=1), NetworkPolicy.from_settings(LOOPBACK))
    assert asyncio.run(sender.deliver("http://127.0.0.1:9/cb", payload(), "m", attempts=2)) is False


def test_callbacks_to_refused_addresses_are_never_sent(tmp_path, receiver):
    """The default policy refuses loopback: delivery gives up at once, and nothing arrives."""
    sender = CallbackSender(job_settings(tmp_path), NetworkPolicy.from_settings(NetworkSettings()))
    t0 = time.monotonic()
    assert asyncio.run(sender.deliver(receiver.url("/cb"), payload(), "m", attempts=5)) is False
    assert time.monotonic() - t0 < 2  # refused, not retried with backoff
    assert receiver.received("/cb") == []


async def run_job(tracker: JobTracker, job_id: str, url: str | None, fail: bool = False) -> None:
    await tracker.submit("", job_id, "https://media.example/a.wav?token=secret", url)
    key = job_key("", job_id)
    await tracker.start(key)
    for fraction in (0.0, 0.5, 0.4, 1.0):  # 0.4 after 0.5: progress must not go back
        tracker.progress(key, "transcription", fraction, f"asr {fraction}")
        await asyncio.sleep(0.05)
    if fail:
        await tracker.fail(key, JobError(code="not_media", message="not a media file"))
    else:
        await tracker.complete(key, RESULT)
    tracker.progress(key, "diarization", 1.0, "late")  # after the end: dropped


def test_tracker_progress_final_and_late_updates(tmp_path, receiver):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path), LOOPBACK, WEIGHTS)
        await run_job(tracker, "ok", receiver.url("/ok"))
        await run_job(tracker, "bad", receiver.url("/bad"), fail=True)
        for _ in range(100):
            if not tracker._channels:
                break
            await asyncio.sleep(0.05)
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
    assert tracker.counts() == {"queued": 0, "processing": 0, "completed": 1, "failed": 1}


def test_restarted_tracker_fails_interrupted_jobs(tmp_path, receiver):
    async def scenario():
        first = JobTracker(job_settings(tmp_path), LOOPBACK, WEIGHTS)
        await first.submit("", "lost", "a.wav", receiver.url("/lost"))
        await first.start(job_key("", "lost"))
        second = JobTracker(job_settings(tmp_path), LOOPBACK, WEIGHTS)  # same SQLite file: a restart
        job = await second.get(job_key("", "lost"))
        await asyncio.sleep(0.5)
        return job

    job = asyncio.run(scenario())
    assert job.status == "failed" and job.error.code == "interrupted"
    calls = receiver.wait_final("/lost", timeout_s=10)
    # The first tracker lives on in this test (a real restart kills it), so its own progress
    # callback may still arrive after the second one's final callback.
    assert [c.body["status"] for c in calls if c.final] == ["failed"]


def test_tracker_progress_thins_updates():
    class Recorder:
        def __init__(self):
            self.calls = []
            self.progress = self

        def remote(self, *args):
            self.calls.append(args)

    tracker = Recorder()
    hook = TrackerProgress(tracker, "j", interval_s=60)
    for i in range(11):
        hook("transcription", i / 10, "x")
    # the first, then nothing within the interval but the last
    assert [c[2] for c in tracker.calls] == [0.0, 1.0]


def test_errors_map_to_http_statuses():
    assert http_status(SourceNotFound("x")) == 404
    assert http_status(NotMediaFile("x")) == 415
    assert http_status(UnsupportedLanguage("x")) == 400
    assert http_status(Overloaded("x")) == 503
    assert http_status(ModelError("x")) == 500
    assert isinstance(as_analyzer_error(BackPressureError(num_queued_requests=5, max_queued_requests=5)), Overloaded)
    assert isinstance(as_analyzer_error(RuntimeError("boom")), ModelError)


def test_same_job_id_submitted_twice_at_once_creates_one_job(tmp_path):
    async def scenario():
        tracker = JobTracker(job_settings(tmp_path), LOOPBACK, WEIGHTS)
        twins = await asyncio.gather(*(tracker.submit("", "twin", "a.wav", None) for _ in range(2)))
        other = await tracker.submit("another-owner", "twin", "b.wav", None)
        return twins, other

    ((_, first), (_, second)), (view, created) = asyncio.run(scenario())
    assert sorted([first, second]) == [False, True]
    assert created and view.source == "b.wav"  # ids are per owner: no one can take another's id


def test_dead_receiver_does_not_hold_up_other_jobs(tmp_path, receiver):
    async def scenario():
        settings = job_settings(tmp_path, callback_attempts=6, callback_backoff_s=1.0, callback_timeout_s=1)
        tracker = JobTracker(settings, LOOPBACK, WEIGHTS)
        await tracker.submit("", "stuck", "a.wav", "http://127.0.0.1:9/dead")  # connection refused, retried
        await tracker.start(job_key("", "stuck"))
        await tracker.complete(job_key("", "stuck"), RESULT)
        t0 = time.monotonic()
        await run_job(tracker, "fine", receiver.url("/fine"))
        while not any(c.final for c in receiver.received("/fine")):
            await asyncio.sleep(0.05)
        return time.monotonic() - t0, job_key("", "stuck") in tracker._channels

    elapsed, still_retrying = asyncio.run(scenario())
    assert still_retrying  # the dead receiver's final callback is still being retried...
    assert elapsed < 3  # ...while the other job's callbacks went through at once
