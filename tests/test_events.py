"""Live progress as server-sent events (`GET /jobs/{id}/events`) and the result
exports (`GET /jobs/{id}/result?format=`).

The feed's rules on their own (no Ray), then the real server over HTTP, its
streams read by httpx-sse (a parser that is not ours) and its exports by the
parsers of tests/test_formats.py's kind.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json

import httpx
import jiwer
import pytest
import srt
import webvtt
from httpx_sse import connect_sse

from deployments.events import EventFeed
from deployments.jobs import JobStatus, JobView, now
from tests.conftest import fixture_path, truth, words_of
from tests.serving import JOBS, OTHER_KEY

# -- the feed on its own ------------------------------------------------------


def view(status: JobStatus = JobStatus.processing, progress: float = 0.0) -> JobView:
    return JobView(job_id="j", status=status, progress=progress, message=f"at {progress}", created_at=now())


def numbers(events) -> list[int]:
    return [int(e.id.rpartition("-")[2]) for e in events]


def test_feed_resumes_after_the_last_id_seen():
    async def scenario():
        feed = EventFeed()
        for p in (0, 10, 20):
            feed.publish("k", view(progress=p))
        everything, ended = await feed.after("k", view(progress=20), None, 0)
        assert numbers(everything) == [1, 2, 3] and not ended
        rest, _ = await feed.after("k", view(progress=20), everything[0].id, 0)
        assert numbers(rest) == [2, 3] and [e.data.progress for e in rest] == [10, 20]
        none, ended = await feed.after("k", view(progress=20), everything[-1].id, 0.05)
        assert none == [] and not ended  # a quiet job: the caller sends a keep-alive and asks again
        feed.publish("k", view(JobStatus.completed, 100))
        final, ended = await feed.after("k", view(JobStatus.completed, 100), everything[-1].id, 0)
        assert [e.event for e in final] == ["completed"] and ended
        again, ended = await feed.after("k", view(JobStatus.completed, 100), final[-1].id, 5)
        assert again == [] and ended  # resumed after the end: nothing more, at once

    asyncio.run(scenario())


def test_feed_wakes_a_waiting_stream():
    async def scenario():
        feed = EventFeed()
        feed.publish("k", view(progress=5))
        first, _ = await feed.after("k", view(progress=5), None, 0)
        waiting = asyncio.create_task(feed.after("k", view(progress=5), first[-1].id, 30))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        feed.publish("k", view(progress=50))
        events, _ = await asyncio.wait_for(waiting, 5)
        assert [e.data.progress for e in events] == [50]

    asyncio.run(scenario())


def test_a_new_feed_answers_old_ids_with_the_current_state():
    """After a tracker restart the feed is new: an id from the old one gets the job's state now."""

    async def scenario():
        old, new = EventFeed(), EventFeed()
        old.publish("k", view(progress=30))
        seen, _ = await old.after("k", view(progress=30), None, 0)
        events, ended = await new.after("k", view(progress=40), seen[-1].id, 0)
        assert [e.data.progress for e in events] == [40] and not ended
        quiet, _ = await new.after("k", view(progress=40), events[-1].id, 0.05)
        assert quiet == []  # that snapshot is not sent twice
        new.publish("k", view(progress=60))
        later, _ = await new.after("k", view(progress=60), events[-1].id, 0)
        assert [e.data.progress for e in later] == [60]
        done, ended = await EventFeed().after("k", view(JobStatus.failed, 60), seen[-1].id, 0)
        assert [e.event for e in done] == ["failed"] and ended

    asyncio.run(scenario())


# -- over HTTP ----------------------------------------------------------------


def read_events(client: httpx.Client, job_id: str, last_id: str | None = None, stop_after: int | None = None):
    """(id, event, data) of the stream until it ends (or after `stop_after` events: the client breaks off)."""
    headers = {"last-event-id": last_id} if last_id else {}
    events = []
    with connect_sse(client, "GET", f"/jobs/{job_id}/events", headers=headers, timeout=120) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        for sse in source.iter_sse():
            if not sse.data:  # `retry:` and keep-alive blocks: the spec dispatches no event for them
                continue
            events.append((sse.id, sse.event, json.loads(sse.data)))
            if stop_after is not None and len(events) == stop_after:
                break
    return events


@pytest.fixture(scope="module")
def streamed(client):
    """One job of the dialogue: its stream broken off after two events, then resumed to the end."""
    job_id = "events-dialogue"
    assert client.post(JOBS, json={"audio_path": str(fixture_path("dialogue_en.flac")), "job_id": job_id}).is_success
    head = read_events(client, job_id, stop_after=2)
    tail = read_events(client, job_id, last_id=head[-1][0])
    return job_id, head, tail


def test_events_stream_progress_then_the_final_state(streamed):
    _, head, tail = streamed
    events = head + tail
    numbers = [int(i.rpartition("-")[2]) for i, _, _ in events]
    assert numbers == list(range(numbers[0], numbers[0] + len(events)))  # resumed with nothing lost or repeated
    progress = [data["progress"] for _, _, data in events]
    assert progress == sorted(progress) and len(set(progress)) >= 4  # live: several steps, never back
    assert all(event == "progress" for _, event, _ in events[:-1])
    _, event, data = events[-1]
    assert event == "completed" and data["status"] == "completed" and data["progress"] == 100
    assert "result" not in data


def test_events_after_the_end(client, streamed):
    job_id, _, tail = streamed
    assert read_events(client, job_id, last_id=tail[-1][0]) == []  # resumed after the final event: it ends
    replay = read_events(client, job_id)
    assert replay[-1][1] == "completed" and len(replay) == len(streamed[1]) + len(tail)


def test_events_of_unknown_jobs_are_404(client, server, streamed):
    assert client.get("/jobs/no-such-job/events").status_code == 404
    other = httpx.get(f"{server.url}/jobs/{streamed[0]}/events", headers={"authorization": f"Bearer {OTHER_KEY}"})
    assert other.status_code == 404 and other.json()["error"] == "unknown_job"
    assert httpx.get(f"{server.url}/jobs/{streamed[0]}/events").status_code == 401


def test_result_exports(client, streamed):
    job_id = streamed[0]
    result = client.get(f"/jobs/{job_id}/result").json()
    said = words_of(" ".join(t["text"] for t in truth("dialogue_en")["turns"]))
    assert jiwer.wer(said, words_of(result["text"])) <= 0.15
    segments = result["segments"]

    vtt = client.get(f"/jobs/{job_id}/result", params={"format": "vtt"})
    assert vtt.headers["content-type"].startswith("text/vtt")
    cues = list(webvtt.from_buffer(io.StringIO(vtt.text)))
    assert [c.voice for c in cues] == [s["speaker"]["speaker_id"] for s in segments]

    subtitles = list(srt.parse(client.get(f"/jobs/{job_id}/result", params={"format": "srt"}).text))
    assert len(subtitles) == len(segments)

    rttm = client.get(f"/jobs/{job_id}/result", params={"format": "rttm"}).text.splitlines()
    assert {line.split()[1] for line in rttm} == {job_id}
    assert {line.split()[7] for line in rttm} == set(result["speakers"])

    tsv = client.get(f"/jobs/{job_id}/result", params={"format": "tsv"})
    rows = list(csv.DictReader(io.StringIO(tsv.text), delimiter="\t"))
    assert [r["speaker"] for r in rows] == [s["speaker"]["speaker_id"] for s in segments if s["text"].strip()]
    assert f'filename="{job_id}.tsv"' in tsv.headers["content-disposition"]

    txt = client.get(f"/jobs/{job_id}/result", params={"format": "txt"}).text
    assert len(txt.splitlines()) == len(rows)


def test_result_export_errors(client):
    assert client.get("/jobs/no-such-job/result").status_code == 404
    bad = client.get("/jobs/events-dialogue/result", params={"format": "docx"})
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_input"
    with fixture_path("sentence_de.flac").open("rb") as f:  # queued or running: no result yet
        accepted = client.post(JOBS, files={"file": ("de.flac", f, "audio/flac")}, data={"job_id": "events-early"})
    assert accepted.status_code == 202
    early = client.get("/jobs/events-early/result")
    if early.status_code != 200:  # it may have finished already on a fast machine
        assert early.status_code == 409 and early.json()["error"] == "job_state"
    read_events(client, "events-early")  # waits for the end, so no job is left running


def test_openapi_documents_events_and_exports(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "text/event-stream" in paths["/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    export = paths["/jobs/{job_id}/result"]["get"]
    assert {"text/vtt", "application/x-subrip", "text/tab-separated-values"} <= set(
        export["responses"]["200"]["content"]
    )
    (fmt,) = [p for p in export["parameters"] if p["name"] == "format"]
    assert set(fmt["schema"]["enum"]) == {"json", "srt", "vtt", "rttm", "txt", "tsv"}
