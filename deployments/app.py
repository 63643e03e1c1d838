"""The application builder named by serve_config.yaml (`import_path: deployments.app:build_app`).

Serve validates the config's `args:` against `AppArgs`. Resource options
(`ray_actor_options`, `autoscaling_config`, `max_ongoing_requests`, batch sizes in
`user_config`) come from the `deployments:` section of the serve config, which
overrides the defaults written on each deployment.
"""

# No `from __future__ import annotations`: Serve reads build_app's annotation to validate `args`.
from pydantic import BaseModel, Field
from ray.serve import Application

from deployments.acoustics import Acoustics
from deployments.diarization import SpeakerDiarization
from deployments.extraction import Extraction
from deployments.ingress import Ingress
from deployments.transcription import Transcription
from pipeline.config import load_settings


class AppArgs(BaseModel):
    config: str | None = Field(
        None, description="Analyzer settings YAML (configs/default.yaml, configs/gpu-t4.yaml); env ECG_* wins."
    )


def build_app(args: AppArgs) -> Application:
    settings = load_settings(args.config)
    return Ingress.bind(
        Extraction.bind(settings),
        Transcription.bind(settings),
        SpeakerDiarization.bind(settings),
        Acoustics.bind(settings),
        settings,
    )
