"""Past one machine: the product on a real two-node Ray cluster (two `ray start`
nodes on this machine, tests/cluster.py) with its job store in a real PostgreSQL
server on loopback.

Transcription is placed on the second node by a custom resource that only that
node has (and zero CPUs there, so nothing else lands on it): the decoded audio
crosses from the head node's object store to it. The tests show autoscaling
through Serve's status API, and a job that survives the second node's death
(all its processes killed at once), finishing on a node that joins afterwards.
"""

from __future__ import annotations

import json
import time

import httpx
import jiwer
import pytest

from tests.cluster import RayCluster
from tests.conftest import FIXTURES, fixture_path, truth, words_of
from tests.serving import JOBS, ROOT, TRUSTED_HOST, CallbackReceiver, ServeProcess

APP = "ecg-audio-analyzer"
SAID = words_of(" ".join(t["text"] for t in truth("conversation_4spk")["turns"]))


def cluster_config(config: dict) -> None:
    """serve_config.yaml for the test cluster: one proxy (both nodes share this machine's ports),
    Transcription on the `asr` node, and autoscaling that reacts within seconds."""
    config["proxy_location"] = "HeadOnly"
    app = config["applications"][0]
    app["args"]["config"] = str(ROOT / app["args"]["config"])  # workers' working directory is their own
    fast = {"upscale_delay_s": 0, "downscale_delay_s": 10, "look_back_period_s": 5, "target_ongoing_requests": 1}
    for deployment in app["deployments"]:
        if deployment["name"] == "Transcription":
            deployment["ray_actor_options"] = {"num_cpus": 0, "resources": {"asr": 1}}
            deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, **fast}
        elif deployment["name"] == "Diarization":
            # Its calls are short (2-3 s of a ~15 s job on the burst's file), so with two jobs
            # running it averages under half a call in flight: a quarter is load enough.
            scaling = {**fast, "target_ongoing_requests": 0.25}
            deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, **scaling}
        elif deployment["name"] == "Ingress":
            deployment["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 1}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, settings, postgres, media_root):
    workdir = tmp_path_factory.mktemp("cluster")
    # On a cluster, replicas take their environment from the node they run on: every node gets it.
    env = {
        "ECG_CACHE_DIR": str(settings.cache_dir),
        "ECG_MEDIA__LOCAL_ROOTS": json.dumps([str(FIXTURES), str(media_root)]),
        "ECG_NETWORK__ALLOWED_HOSTS": json.dumps([TRUSTED_HOST]),
        "ECG_JOBS__STORE_URL": postgres.new_database(f"cluster_{workdir.name}"),
        "ECG_SERVER__UPLOAD_DIR": str(workdir / "uploads"),
        "ECG_JOBS__LEASE_S": "6",
        "ECG_JOBS__STAGE_ATTEMPTS": "6",  # a lost node needs time to be replaced: 3, 6, 12, 24, 48 s apart
        "ECG_JOBS__STAGE_RETRY_BACKOFF_S": "3",
        "ECG_JOBS__CALLBACK_RETRY_DELAYS_S": "[0.5, 1, 2, 4]",
        "ECG_JOBS__STAGES_TOGETHER": "true",  # a cluster: the stages run at once, each where its replicas are
        "HF_HUB_OFFLINE": "1",
    }
    cluster = RayCluster(workdir, env, head_cpus=6)
    asr_node = cluster.add_node(num_cpus=0, resources={"asr": 2})
    server = ServeProcess(workdir, {**cluster.env, "RAY_ADDRESS": cluster.address}, adjust=cluster_config)
    try:
        server.start()
        yield cluster, asr_node, server
    finally:
        server.stop()
        cluster.stop()


def running_replicas(cluster: RayCluster, states: tuple[str, ...] = ("RUNNING",)) -> dict[str, int]:
    """Replicas in `states` per deployment, from Serve's REST API on the dashboard."""
    url = f"http://127.0.0.1:{cluster.dashboard_port}/api/serve/applications/"
    headers = {"authorization": f"Bearer {cluster.token}"}
    deployments = httpx.get(url, headers=headers, timeout=30).json()["applications"][APP]["deployments"]
    return {name: sum(r["state"] in states for r in d["replicas"]) for name, d in deployments.items()}


def test_a_burst_scales_up_and_idle_scales_down(deployed):
    cluster, asr_node, server = deployed
    assert running_replicas(cluster)["Transcription"] == 1
    assert asr_node.pids(f"ServeReplica:{APP}:Transcription"), "Transcription is not on the asr node"
    with httpx.Client(base_url=server.url, timeout=60) as client:
        ids = [
            client.post(JOBS, json={"audio_path": str(fixture_path("conversation_4spk.flac"))}).json()["job_id"]
            for _ in range(6)
        ]
        peak = {"Transcription": 1, "Diarization": 1}
        deadline = time.monotonic() + 900
        while not all(client.get(f"/jobs/{i}").json()["status"] == "completed" for i in ids):
            assert time.monotonic() < deadline, [client.get(f"/jobs/{i}").json()["status"] for i in ids]
            # A replica the autoscaler added counts from its start: a short burst can end
            # before a second replica has loaded its models.
            counts = running_replicas(cluster, ("STARTING", "UPDATING", "RUNNING"))
            peak = {name: max(n, counts[name]) for name, n in peak.items()}
            time.sleep(1)
    assert peak == {"Transcription": 2, "Diarization": 2}, peak
    deadline = time.monotonic() + 180
    while (counts := running_replicas(cluster)) and (counts["Transcription"], counts["Diarization"]) != (1, 1):
        assert time.monotonic() < deadline, f"not scaled back down when idle: {counts}"
        time.sleep(2)


def test_a_job_survives_the_death_of_its_transcription_node(deployed, conversation_x2):
    cluster, asr_node, server = deployed
    receiver = CallbackReceiver()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = {"audio_path": str(conversation_x2), "callback_url": receiver.url("/node"), "job_id": "node-lost"}
            assert client.post(JOBS, json=body).status_code == 202
            deadline = time.monotonic() + 120
            while client.get("/jobs/node-lost").json()["progress"] < 5:  # decoded on the head: transcribing
                assert time.monotonic() < deadline
                time.sleep(0.1)
        time.sleep(1)
        asr_node.kill()
        replacement = cluster.add_node(num_cpus=0, resources={"asr": 2})
        calls = receiver.wait_final("/node", timeout_s=600)
    finally:
        receiver.close()
    finals = [c for c in calls if c.final]
    assert len({c.headers["webhook-id"] for c in finals}) == 1
    final = finals[-1].body
    assert final["status"] == "completed", final
    assert jiwer.wer(f"{SAID} {SAID}", words_of(final["result"]["text"])) <= 0.15
    assert replacement.pids(f"ServeReplica:{APP}:Transcription"), "Transcription did not move to the new node"
    assert "transcription call failed" in server.log_tail(2000)
