"""Automatic recovery, with real processes and real signals: `kill -9` of a replica
of each stage, of the ingress and of the job tracker while jobs run on the shared
test server (`serve run`, see tests/conftest.py: `server`). Every job must end
`completed` with the right transcript, with exactly one final callback.

The whole server killed and started again is the last test of test_serve.py
(it restarts the shared server).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import jiwer
import pytest

from tests.conftest import truth, words_of
from tests.serving import JOBS

CONVERSATION = words_of(" ".join(t["text"] for t in truth("conversation_4spk")["turns"]))


def pids(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def replica_pids(deployment: str) -> list[int]:
    """The processes of a deployment's replicas (Ray names them `ray::ServeReplica:<app>:<deployment>`)."""
    return pids(f"ServeReplica:ecg-audio-analyzer:{deployment}")


def wait_for(client, job_id: str, progress: float, timeout_s: float = 120) -> None:
    """Until the job reports at least `progress` percent (requests may fail while an ingress restarts)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get(f"/jobs/{job_id}").json().get("progress", 0) >= progress:
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} never reached {progress} %")


def assert_completed_once(receiver, path: str, repeats: int) -> dict:
    calls = receiver.wait_final(path, timeout_s=600)
    finals = [c for c in calls if c.final]
    assert len({c.headers["webhook-id"] for c in finals}) == 1, [c.body["status"] for c in finals]
    assert sum(c.answered == 200 for c in finals) == 1  # delivered once
    final = finals[-1].body
    assert final["status"] == "completed", final
    said = " ".join([CONVERSATION] * repeats)
    assert jiwer.wer(said, words_of(final["result"]["text"])) <= 0.15
    return final


# Which progress to wait for before the kill: the stage must be running. Extraction runs first
# (killed as soon as the job is processing); the others run after it (media decoded: >= 5 %).
VICTIMS = {
    "Extraction": (lambda: replica_pids("Extraction"), 0.0),
    "Diarization": (lambda: replica_pids("Diarization"), 5.0),
    "Acoustics": (lambda: replica_pids("Acoustics"), 5.0),
    "Ingress": (lambda: replica_pids("Ingress"), 5.0),
    "tracker": (lambda: pids("ray::JobTracker"), 5.0),
}


@pytest.mark.parametrize("victim", list(VICTIMS))
def test_a_job_outlives_a_killed_process(server, client, receiver, conversation_x2, victim):
    find, progress = VICTIMS[victim]
    before = find()
    assert before, f"no {victim} process found"
    path = f"/kill/{victim}"
    body = {"audio_path": str(conversation_x2), "callback_url": receiver.url(path), "job_id": f"kill-{victim}"}
    assert client.post(JOBS, json=body).status_code == 202
    wait_for(client, f"kill-{victim}", progress)
    time.sleep(0.5)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    assert_completed_once(receiver, path, repeats=2)
    deadline = time.monotonic() + 60
    while not (set(find()) - set(before)) and time.monotonic() < deadline:
        time.sleep(1)
    assert set(find()) - set(before), f"no new {victim} process was started"
