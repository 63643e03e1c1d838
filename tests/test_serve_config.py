"""serve_config.yaml and its GPU twin, checked against Ray Serve's own config
schema and against the application they name."""

from __future__ import annotations

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.acoustics import Acoustics
from deployments.app import AppArgs
from deployments.diarization import SpeakerDiarization
from deployments.extraction import Extraction
from deployments.ingress import Ingress
from deployments.transcription import BatchConfig, Transcription
from pipeline.config import load_settings
from tests.serving import ROOT

DEPLOYMENTS = {d.name: d for d in (Ingress, Extraction, Transcription, SpeakerDiarization, Acoustics)}


def app_config(name: str):
    schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / name).read_text()))
    assert schema.http_options.port == 8080
    (app,) = schema.applications
    assert app.import_path == "deployments.app:build_app"
    assert app.route_prefix == "/"
    return app


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_config_names_the_app_and_its_deployments(name):
    app = app_config(name)
    load_settings(ROOT / AppArgs.model_validate(app.args).config)
    assert {d.name for d in app.deployments} == set(DEPLOYMENTS)
    for d in app.deployments:
        scaling = d.autoscaling_config
        assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    asr = next(d for d in app.deployments if d.name == "Transcription")
    batch = BatchConfig.model_validate(asr.user_config)
    # A batch can only fill if the replica accepts that many requests at once.
    assert asr.max_ongoing_requests >= 2 * batch.max_batch_size


def test_cpu_profile_fits_two_cores_offline():
    app = app_config("serve_config.yaml")
    assert sum(d.ray_actor_options.num_cpus for d in app.deployments) <= 2
    assert all(not d.ray_actor_options.num_gpus for d in app.deployments)
    settings = load_settings(ROOT / app.args["config"])
    assert settings.asr.model.startswith("embedded:") and settings.diarization.pipeline == "embedded"


def test_gpu_profile_shares_one_t4():
    app = app_config("serve_config.gpu.yaml")
    gpus = {d.name: d.ray_actor_options.num_gpus or 0 for d in app.deployments}
    assert gpus["Transcription"] == 0.5 and gpus["Diarization"] == 0.25
    assert sum(gpus.values()) <= 1
    settings = load_settings(ROOT / app.args["config"])
    assert (settings.asr.model, settings.asr.device, settings.asr.compute_type) == ("large-v2", "cuda", "float16")
    assert settings.diarization.pipeline == "pyannote/speaker-diarization-3.1"


def test_a_broken_config_is_rejected():
    deployments = [{"name": "Transcription", "num_replicas": "many"}]
    bad = {"applications": [{"import_path": "deployments.app:build_app", "deployments": deployments}]}
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate(bad)


def test_stages_run_in_the_one_process_order_unless_told_to_run_together():
    from deployments.graph import Graph
    from pipeline.analyzer import ALL_AT_ONCE, SHARED_CORES, Analyzer
    from pipeline.config import JobSettings

    handles = [None] * 4  # the order is decided before any stage is called
    assert Graph(*handles, JobSettings()).phases == SHARED_CORES == Analyzer.phases
    assert SHARED_CORES[0] == ("diarization",)
    assert Graph(*handles, JobSettings(stages_together=True)).phases == ALL_AT_ONCE
    assert sorted(ALL_AT_ONCE[0]) == sorted(name for phase in SHARED_CORES for name in phase)
