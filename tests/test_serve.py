"""The product as users run it: `serve run` on serve_config.yaml (a real Ray
instance of its own, the real embedded models), called over HTTP on loopback,
with callbacks going to a real HTTP receiver.

One server (tests/conftest.py: `server`, with API keys and the test relaxations
of the safe defaults) serves every server test module; the last test restarts it.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import httpx
import jiwer
import numpy as np
import pytest
import soundfile as sf
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from pipeline.analyzer import STAGE_WEIGHTS
from pipeline.schemas import AnalysisResult
from tests.conftest import CALLBACK_SECRET, S3_SECRET, ffmpeg, fixture_path, truth, words_of
from tests.serving import API_KEY, JOBS, OTHER_KEY, ROOT, TRUSTED_HOST, CallbackReceiver, free_port

SECRET = CALLBACK_SECRET


@pytest.fixture(scope="module")
def sync_dialogue(client) -> httpx.Response:
    return client.post("/transcribe", json={"audio_path": str(fixture_path("dialogue_en.flac")), "job_id": "sync-1"})


@pytest.fixture(scope="module")
def async_dialogue(client, receiver) -> list:
    """The dialogue as an async job: every callback it caused, once the final one arrived."""
    response = client.post(
        JOBS,
        json={
            "audio_path": str(fixture_path("dialogue_en.flac")),
            "callback_url": receiver.url("/dialogue"),
            "job_id": "async-1",
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["job_id"] == "async-1"
    return receiver.wait_final("/dialogue")


def submit(client, receiver, name: str, path: str, **fields) -> str:
    body = {"audio_path": str(fixture_path(f"{name}.flac")), "callback_url": receiver.url(path), **fields}
    response = client.post(JOBS, json=body)
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def assert_dialogue(result: dict) -> None:
    AnalysisResult.model_validate(result)
    assert result["language"] == "en"
    assert len(result["speakers"]) == 2
    reference = words_of(" ".join(t["text"] for t in truth("dialogue_en")["turns"]))
    assert jiwer.wer(reference, words_of(result["text"])) <= 0.10


def test_health_reports_every_stage(client):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert set(body["deployments"]) == {"extraction", "transcription", "diarization", "acoustics"}
    assert all(d["ready"] for d in body["deployments"].values())
    assert body["deployments"]["transcription"]["model"] == "embedded:whisper-base"
    assert body["deployments"]["diarization"]["device"] == "cpu"


def test_transcribe_returns_the_response(sync_dialogue):
    assert sync_dialogue.status_code == 200, sync_dialogue.text
    body = sync_dialogue.json()
    assert set(body) == {"segments", "speakers", "text", "language", "duration", "metadata"}
    assert_dialogue(body)
    timings = body["metadata"]["stage_timings"]
    assert set(timings) == {"media", "transcription", "diarization", "acoustics", "assembly"}
    # Where the stages share the machine's cores (the default), diarization runs before the transcription.
    assert body["metadata"]["processing_time"] >= timings["diarization"] + timings["transcription"]
    assert sync_dialogue.headers["x-job-id"] == "sync-1"


def test_sync_analysis_is_recorded_as_a_job(client, sync_dialogue):
    job = client.get("/jobs/sync-1").json()
    assert job["status"] == "completed"
    assert job["result"] == sync_dialogue.json()
    again = {"audio_path": str(fixture_path("sentence_es.flac")), "job_id": "sync-1"}
    assert client.post("/transcribe", json=again).status_code == 409


def test_async_job_progress_then_one_final_callback(client, async_dialogue):
    statuses = [c.body["status"] for c in async_dialogue]
    # "queued" is sent unless "processing" replaced it before the first delivery.
    assert statuses[0] in ("queued", "processing") and statuses[-1] == "completed"
    assert statuses.count("completed") == 1 and "failed" not in statuses
    assert set(statuses[1:-1]) == {"processing"} and len(statuses) >= 5
    progress = [c.body["progress"] for c in async_dialogue]
    assert progress == sorted(progress), progress
    assert progress[-1] == 100 and max(progress[:-1]) < 100
    final = async_dialogue[-1].body
    assert set(final) == {"job_id", "status", "progress", "message", "result", "error"}
    assert_dialogue(final["result"])
    job = client.get("/jobs/async-1").json()
    assert job["status"] == "completed" and job["progress"] == 100
    assert final["result"] == job["result"]


def test_callbacks_carry_standard_webhook_signatures(async_dialogue):
    webhook = Webhook(SECRET)
    for call in async_dialogue:
        assert webhook.verify(call.raw, call.headers)["job_id"] == "async-1"
    assert len({c.headers["webhook-id"] for c in async_dialogue}) == len(async_dialogue)
    with pytest.raises(WebhookVerificationError):  # a wrong key must not verify
        Webhook("whsec_" + base64.b64encode(b"another-key-of-32-bytes-length!!").decode()).verify(
            async_dialogue[0].raw, async_dialogue[0].headers
        )


def test_resubmitting_a_job_id_returns_that_job(client, receiver, async_dialogue):
    before = len(receiver.received("/dialogue"))
    again = client.post(JOBS, json={"audio_path": str(fixture_path("sentence_es.flac")), "job_id": "async-1"})
    assert again.status_code == 200
    assert again.json()["status"] == "completed"
    assert len(receiver.received("/dialogue")) == before  # not run again, no new callbacks


def test_multipart_upload_job(client, receiver):
    with fixture_path("sentence_de.flac").open("rb") as f:
        response = client.post(
            JOBS,
            files={"file": ("sentence_de.flac", f, "audio/flac")},
            data={"callback_url": receiver.url("/upload"), "language": "auto"},
        )
    assert response.status_code == 202, response.text
    final = receiver.wait_final("/upload")[-1].body
    assert final["status"] == "completed"
    assert final["result"]["language"] == "de"
    assert "park" in final["result"]["text"].lower()
    job = client.get(f"/jobs/{response.json()['job_id']}").json()
    assert job["source"] == "sentence_de.flac"
    assert job["result"] == final["result"]


def test_four_concurrent_jobs(client, receiver):
    names = ["dialogue_en", "sentence_es", "sentence_de", "sentence_fr"]
    ids = {name: submit(client, receiver, name, f"/many/{name}") for name in names}
    for name in names:
        final = receiver.wait_final(f"/many/{name}")[-1].body
        assert final["status"] == "completed", final
        assert final["result"]["language"] == truth(name)["language"]
        assert final["result"]["metadata"]["language_probability"] >= 0.6  # measured >= 0.94
    assert_dialogue(receiver.received("/many/dialogue_en")[-1].body["result"])
    jobs = [client.get(f"/jobs/{job_id}").json() for job_id in ids.values()]
    # They ran side by side: every job started before any of them finished.
    assert max(datetime.fromisoformat(j["started_at"]) for j in jobs) < min(
        datetime.fromisoformat(j["finished_at"]) for j in jobs
    )


def test_a_burst_past_capacity_gets_503_and_loses_no_job(client, receiver):
    answers = [
        client.post(
            JOBS,
            json={"audio_path": str(fixture_path("sentence_es.flac")), "callback_url": receiver.url(f"/burst/{i}")},
        )
        for i in range(8)
    ]
    accepted = [i for i, r in enumerate(answers) if r.status_code == 202]
    refused = [r for r in answers if r.status_code == 503]
    # 4 claimed at once (max_active), 2 waiting in the queue (max_waiting); a claim racing the
    # next request may make it 3 + 2.
    assert 5 <= len(accepted) <= 6 and len(accepted) + len(refused) == 8, [r.status_code for r in answers]
    assert all(r.json()["error"] == "overloaded" and r.headers["retry-after"] for r in refused)
    for i in accepted:
        assert receiver.wait_final(f"/burst/{i}")[-1].body["status"] == "completed"
    assert client.post(JOBS, json={"audio_path": str(fixture_path("sentence_es.flac"))}).status_code == 202


@pytest.fixture(scope="module")
def silent_video(media_root):
    path = media_root / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-t", "1", "-pix_fmt", "yuv420p", str(path))
    return path


ES = "tests/fixtures/sentence_es.flac"
BAD_REQUESTS = {
    "no source": ({}, 400, "invalid_input"),
    "missing file": ({"audio_path": "tests/fixtures/no-such-file.wav"}, 404, "not_found"),
    "not media": ({"audio_path": "tests/fixtures/make_fixtures.py"}, 415, "not_media"),
    "no audio stream": ({"video_path": "SILENT_VIDEO"}, 422, "no_audio_stream"),
    "unknown language": ({"audio_path": ES, "language": "xx"}, 400, "unsupported_language"),
    "min above max": ({"audio_path": ES, "min_speakers": 3, "max_speakers": 2}, 400, "invalid_input"),
    "wrong type": ({"audio_path": ES, "num_speakers": "many"}, 422, "invalid_input"),
    "bad job id": ({"audio_path": ES, "job_id": "../etc"}, 422, "invalid_input"),
}


def resolve(body: dict, silent_video) -> dict:
    out = {}
    for key, value in body.items():
        if value == "SILENT_VIDEO":
            value = str(silent_video)
        elif key.endswith("_path") and not value.startswith("/"):
            value = str(ROOT / value)
        out[key] = value
    return out


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_its_4xx(client, silent_video, case):
    body, status, code = BAD_REQUESTS[case]
    response = client.post("/transcribe", json=resolve(body, silent_video))
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert response.json()["message"]


def test_malformed_json_and_unknown_job(client):
    response = client.post("/transcribe", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"] == "invalid_input"
    response = client.get("/jobs/no-such-job")
    assert response.status_code == 404 and response.json()["error"] == "unknown_job"
    response = client.post(
        JOBS, json={"audio_path": str(fixture_path("sentence_es.flac")), "callback_url": "ftp://example.com/x"}
    )
    assert response.status_code == 400 and "callback_url" in response.json()["message"]


def test_failed_job_sends_a_failed_callback(client, receiver, silent_video):
    response = client.post(JOBS, json={"video_path": str(silent_video), "callback_url": receiver.url("/bad")})
    assert response.status_code == 202
    calls = receiver.wait_final("/bad")
    final = calls[-1].body
    assert final["status"] == "failed" and final["result"] is None
    assert final["error"]["code"] == "no_audio_stream"
    assert "no audio stream" in final["message"]
    assert sum(c.final for c in calls) == 1
    job = client.get(f"/jobs/{response.json()['job_id']}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "no_audio_stream"


def test_nan_audio_is_refused(client, receiver, media_root):
    """Float samples that are all NaN: 422 `invalid_audio`, not a 500, by path or by upload."""
    path = media_root / "nan.wav"
    sf.write(path, np.full(16_000, np.nan, dtype=np.float32), 16_000, subtype="FLOAT")
    response = client.post("/transcribe", json={"audio_path": str(path)})
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "invalid_audio"
    with path.open("rb") as f:
        files = {"file": ("nan.wav", f, "audio/wav")}
        response = client.post(JOBS, files=files, data={"callback_url": receiver.url("/nan")})
    assert response.status_code == 202, response.text
    final = receiver.wait_final("/nan")[-1].body
    assert final["status"] == "failed" and final["error"]["code"] == "invalid_audio"


def test_final_callback_is_retried_until_delivered(client, receiver):
    receiver.refuse_finals["/flaky"] = 2
    submit(client, receiver, "sentence_es", "/flaky")
    finals = [c for c in receiver.wait_final("/flaky") if c.final]
    assert [c.answered for c in finals] == [500, 500, 200]
    assert len({c.headers["webhook-id"] for c in finals}) == 1  # one message, retried
    assert finals[-1].body["status"] == "completed"


def test_cancel_then_retry_over_http(client, receiver):
    body = {"audio_path": str(fixture_path("conversation_4spk.flac")), "callback_url": receiver.url("/cancel")}
    assert client.post(JOBS, json={**body, "job_id": "cancel-me"}).status_code == 202
    deadline = time.monotonic() + 120
    while client.get("/jobs/cancel-me").json()["status"] != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cancelled = client.delete("/jobs/cancel-me")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert client.delete("/jobs/cancel-me").json()["error"] == "job_state"  # 409: finished already
    receiver.wait_final("/cancel", timeout_s=60)
    retried = client.post("/jobs/cancel-me/retry")
    assert retried.status_code == 202 and retried.json()["status"] == "queued", retried.text
    assert client.post("/jobs/cancel-me/retry").status_code == 409  # queued or running: nothing to retry
    assert client.post("/jobs/no-such-job/retry").status_code == 404
    deadline = time.monotonic() + 300
    while (job := client.get("/jobs/cancel-me").json())["status"] != "completed":
        assert time.monotonic() < deadline and job["status"] in ("queued", "processing"), job
        time.sleep(0.5)
    deadline = time.monotonic() + 30  # the final callback follows the job's end
    while len([c for c in receiver.received("/cancel") if c.final]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    finals = [(c.body["status"], c.headers["webhook-id"]) for c in receiver.received("/cancel") if c.final]
    assert finals == [("cancelled", "cancel-me.run1.final"), ("completed", "cancel-me.run2.final")]
    assert client.post("/jobs/cancel-me/retry").status_code == 409  # completed


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").json()
    assert {"/health", "/transcribe", JOBS, "/jobs/{job_id}", "/jobs/{job_id}/retry"} <= set(spec["paths"])
    assert {"/v1/audio/transcriptions", "/v1/models", "/v1/models/{model}"} <= set(spec["paths"])
    openai_form = spec["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"file", "model", "response_format", "timestamp_granularities[]"} <= set(openai_form["schema"]["properties"])
    assert {"get", "delete"} <= set(spec["paths"]["/jobs/{job_id}"])
    assert {"AnalysisResult", "AnalysisRequest", "JobView", "JobAccepted", "ErrorBody", "Health"} <= set(
        spec["components"]["schemas"]
    )
    assert {"TranscriptionVerbose", "TranscriptionDiarized", "ModelList", "OpenAIErrorBody"} <= set(
        spec["components"]["schemas"]
    )
    content = spec["paths"][JOBS]["post"]["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/JobRequest"}
    assert "callback_url" in spec["components"]["schemas"]["JobRequest"]["properties"]
    assert content["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert client.get("/docs").status_code == 200


def test_secrets_never_reach_the_log(server, async_dialogue):
    log = server.log_path.read_text(errors="replace")
    assert "Importing application" in log  # the log is the server's own
    # API keys, and the query string of a URL test_security.py downloaded (presigned credentials).
    for secret in (SECRET, SECRET.removeprefix("whsec_"), S3_SECRET, API_KEY, OTHER_KEY, "s3cr3t"):
        assert secret not in log


def test_custom_metrics_reach_prometheus(server, async_dialogue):
    """The app's metrics are served by Ray's metrics agent, where the dashboard and Prometheus read them."""
    session = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "session_latest"
    discovery = json.loads((session / "prom_metrics_service_discovery.json").read_text())
    targets = [target for group in discovery for target in group["targets"]]
    wanted = {"ecg_audio_seconds_total", "ecg_stage_latency_seconds", "ecg_real_time_factor", "ecg_jobs"}
    deadline = time.monotonic() + 90  # metrics are exported every few seconds
    while True:
        text = "".join(httpx.get(f"http://{t}/metrics", timeout=10).text for t in targets)
        missing = {m for m in wanted if f"ray_{m}" not in text}
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert not missing, f"not exported: {missing}"
    assert "ray_ecg_stage_latency_seconds_count{" in text and 'stage="transcription"' in text


def replica_pids(deployment: str) -> list[int]:
    """The processes of a deployment's replicas (Ray names them `ray::ServeReplica:<app>:<deployment>`)."""
    found = subprocess.run(
        ["pgrep", "-f", f"ServeReplica:ecg-audio-analyzer:{deployment}"], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


@pytest.fixture(scope="module")
def four_minute_conversation(media_root) -> Path:
    """The four-voice conversation three times over: long enough to kill a replica in mid-call."""
    path = media_root / "conversation_x3.mp3"  # mp3: under the test server's 4 MiB file limit
    source = str(fixture_path("conversation_4spk.flac"))
    concat = ["-filter_complex", "concat=n=3:v=0:a=1", "-c:a", "libmp3lame", "-b:a", "64k"]
    ffmpeg("-i", source, "-i", source, "-i", source, *concat, str(path))
    return path


def test_a_job_outlives_its_transcription_replica(server, client, receiver, four_minute_conversation):
    """kill -9 of the Transcription replica mid-call: the call is made again on the replica Serve
    starts in its place, and the job completes with one final callback."""
    (victim,) = replica_pids("Transcription")
    body = {"audio_path": str(four_minute_conversation), "callback_url": receiver.url("/killed")}
    job_id = client.post(JOBS, json=body).json()["job_id"]
    # Media decoded and diarization done (it runs first): the transcription has been called.
    called = STAGE_WEIGHTS["media"] + STAGE_WEIGHTS["diarization"]
    deadline = time.monotonic() + 180
    while client.get(f"/jobs/{job_id}").json()["progress"] < called:
        assert time.monotonic() < deadline, client.get(f"/jobs/{job_id}").json()
        time.sleep(0.1)
    time.sleep(2)  # well inside the call: 225 s of speech take the replica much longer
    os.kill(victim, signal.SIGKILL)
    calls = receiver.wait_final("/killed", timeout_s=600)
    final = calls[-1].body
    assert final["status"] == "completed", final
    assert sum(c.final for c in calls) == 1
    said = words_of(" ".join([" ".join(t["text"] for t in truth("conversation_4spk")["turns"])] * 3))
    assert jiwer.wer(said, words_of(final["result"]["text"])) <= 0.15
    assert replica_pids("Transcription") not in ([], [victim])  # a new replica did the work
    assert "transcription call failed (replica lost" in server.log_path.read_text(errors="replace")


def test_a_killed_server_resumes_its_jobs(server, client, async_dialogue, media_root):
    """SIGKILL of `serve run` and every Ray process while jobs run (one of them an upload), with the
    callback receiver down. Started again, the server finishes every job; the receiver, up a minute
    later, gets each job's final callback once; a job finished before the kill is unchanged."""
    before = client.get("/jobs/async-1").json()
    port = free_port()
    down = f"http://{TRUSTED_HOST}:{port}"  # nothing listens there yet
    jobs = {
        "restart-long": {"audio_path": str(fixture_path("conversation_4spk.flac"))},
        "restart-es": {"audio_path": str(fixture_path("sentence_es.flac"))},
        "restart-de": {"audio_path": str(fixture_path("sentence_de.flac"))},
    }
    for job_id, body in jobs.items():
        response = client.post(JOBS, json={**body, "job_id": job_id, "callback_url": f"{down}/{job_id}"})
        assert response.status_code == 202, response.text
    with fixture_path("sentence_fr.flac").open("rb") as f:
        fields = {"job_id": "restart-upload", "callback_url": f"{down}/restart-upload"}
        assert client.post(JOBS, files={"file": ("fr.flac", f, "audio/flac")}, data=fields).status_code == 202
    deadline = time.monotonic() + 120
    while client.get("/jobs/restart-long").json()["progress"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    server.kill()
    # Started again with a retry schedule of minutes, so that the receiver's downtime is seen out.
    server.env["ECG_JOBS__CALLBACK_RETRY_DELAYS_S"] = "[2, 4, 8, 15, 30, 60, 60]"
    server.start()
    time.sleep(30)
    receiver = CallbackReceiver(port=port)
    try:
        for job_id in [*jobs, "restart-upload"]:
            calls = receiver.wait_final(f"/{job_id}", timeout_s=600)
            finals = [c for c in calls if c.final]
            assert len({c.headers["webhook-id"] for c in finals}) == 1, job_id
            assert finals[-1].body["status"] == "completed", finals[-1].body
    finally:
        receiver.close()
    result = client.get("/jobs/restart-long").json()["result"]
    said = words_of(" ".join(t["text"] for t in truth("conversation_4spk")["turns"]))
    assert jiwer.wer(said, words_of(result["text"])) <= 0.15
    assert client.get("/jobs/restart-upload").json()["result"]["language"] == "fr"
    assert not list((server.workdir / "uploads").iterdir())  # the upload is gone once its job completed
    assert client.get("/jobs/async-1").json() == before
