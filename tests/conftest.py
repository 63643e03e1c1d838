"""Shared fixtures. Models are the real embedded ones; audio is the committed
espeak-ng dialogues (tests/fixtures/make_fixtures.py) or made from them with ffmpeg."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Settings

FIXTURES = Path(__file__).parent / "fixtures"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup must fail fast, never hang
logging.getLogger("lightning").setLevel(logging.WARNING)
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def fixture_path(name: str) -> Path:
    return FIXTURES / name


def truth(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def words_of(text: str) -> str:
    """Lower-case words without punctuation, for WER."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@pytest.fixture(scope="session")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    # A fresh cache dir: the embedded whisper-base is assembled from its two wheels in every run.
    return Settings(cache_dir=tmp_path_factory.mktemp("model-cache"))


@pytest.fixture(scope="session")
def analyzer(settings: Settings):
    from pipeline.analyzer import Analyzer

    return Analyzer(settings)


@pytest.fixture(scope="session")
def dialogue_progress() -> list[tuple[float, str]]:
    return []


@pytest.fixture(scope="session")
def dialogue_result(analyzer, dialogue_progress):
    from pipeline.analyzer import AnalysisOptions

    def record(percent: float, message: str) -> None:
        dialogue_progress.append((percent, message))

    return analyzer.analyze(str(fixture_path("dialogue_en.flac")), AnalysisOptions(), record)


@pytest.fixture(scope="session")
def dialogue_samples() -> np.ndarray:
    import soundfile as sf

    samples, rate = sf.read(fixture_path("dialogue_en.flac"), dtype="float32")
    assert rate == 16_000
    return samples
