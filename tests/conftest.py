"""Shared fixtures. Models are the real embedded ones; audio is the committed
espeak-ng dialogues (tests/fixtures/make_fixtures.py) or made from them with ffmpeg."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import tempfile
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
    settings = Settings(cache_dir=tmp_path_factory.mktemp("model-cache"))
    # The safe default reads no local file outside ./data: the tests name their own directories.
    settings.media.local_roots = [FIXTURES, Path(tempfile.gettempdir())]
    return settings


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


# -- the product over HTTP, shared by the server test modules ----------------------------

CALLBACK_SECRET = "whsec_" + base64.b64encode(b"callback-signing-key-for-tests-0").decode()
S3_SECRET = "s3-secret-that-must-never-be-logged"
UPLOAD_LIMIT = 4 * 1024 * 1024  # larger than every fixture, small enough to exceed in a test


@pytest.fixture(scope="session")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory the test server may read local files from (besides the committed fixtures)."""
    return tmp_path_factory.mktemp("media-root")


@pytest.fixture(scope="session")
def server(tmp_path_factory, settings, media_root):
    """`serve run` as users run it, with API keys, and every relaxation of the safe defaults
    the tests need spelled out: local roots, one trusted non-public host, a small upload limit."""
    from tests.serving import API_KEY, OTHER_KEY, TRUSTED_HOST, ServeProcess, free_port

    workdir = tmp_path_factory.mktemp("serve")
    env = {
        "ECG_CACHE_DIR": str(settings.cache_dir),
        "ECG_API_KEYS": f"{API_KEY},{OTHER_KEY}",
        "ECG_MEDIA__LOCAL_ROOTS": json.dumps([str(FIXTURES), str(media_root)]),
        "ECG_MEDIA__MAX_FILE_BYTES": str(UPLOAD_LIMIT),
        "ECG_NETWORK__ALLOWED_HOSTS": json.dumps([TRUSTED_HOST]),
        "ECG_SERVER__UPLOAD_DIR": str(workdir / "uploads"),
        "ECG_JOBS__DB_PATH": str(workdir / "jobs.sqlite3"),
        "ECG_JOBS__CALLBACK_SECRET": CALLBACK_SECRET,
        "ECG_JOBS__CALLBACK_RETRY_DELAYS_S": "[0.2, 0.4, 0.8, 1.6, 3.2]",
        "ECG_JOBS__LEASE_S": "6",  # a killed worker's job is claimed again within 6 s
        "ECG_JOBS__MAX_WAITING": "2",  # 4 running + 2 waiting: a burst of 8 must meet a 503
        "ECG_S3__SECRET_ACCESS_KEY": S3_SECRET,
        "ECG_S3__ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: s3:// fails fast
        "HF_HUB_OFFLINE": "1",
    }
    process = ServeProcess(workdir, env)
    process.start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def client(server):
    """A client holding the first API key."""
    import httpx

    from tests.serving import API_KEY

    with httpx.Client(base_url=server.url, timeout=300, headers={"authorization": f"Bearer {API_KEY}"}) as c:
        yield c


@pytest.fixture(scope="session")
def conversation_x2(media_root) -> Path:
    """The 75 s four-voice conversation twice over (150 s, mp3 under the upload limit): stages run
    long enough to kill a process in mid-call."""
    path = media_root / "conversation_x2.mp3"
    source = str(fixture_path("conversation_4spk.flac"))
    ffmpeg("-i", source, "-i", source, "-filter_complex", "concat=n=2:v=0:a=1", "-b:a", "64k", str(path))
    return path


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback (Debian's package), for the job store."""
    from tests.postgres import PostgresServer

    server = PostgresServer(Path(tempfile.mkdtemp(prefix="ecg-pg-")))  # under /tmp: its `postgres` user reaches it
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def receiver():
    """A callback receiver on the test server's one trusted non-public address."""
    from tests.serving import CallbackReceiver

    r = CallbackReceiver()
    yield r
    r.close()
