"""Stage 1 on real files: every container, every typed error, http(s) and s3:// sources
(a real local HTTP server and a real S3-protocol server, moto, on loopback)."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.config import MediaSettings, NetworkSettings, S3Settings
from pipeline.errors import (
    AudioTooLong,
    DownloadFailed,
    EmptyAudio,
    FileTooLarge,
    InputError,
    InvalidAudio,
    NoAudioStream,
    NotMediaFile,
    PathNotAllowed,
    SourceNotFound,
)
from pipeline.media import MediaLoader, choose_source, finite_samples, redact, upload_name
from tests.conftest import FIXTURES, ffmpeg, fixture_path

SOURCE = fixture_path("sentence_es.flac")
LOOPBACK = ("127.0.0.1",)


def loader(allowed_hosts: tuple[str, ...] = (), **media) -> MediaLoader:
    # The safe defaults read no local file outside ./data and fetch from public addresses only:
    # the tests name their own directories, and the hosts of their own servers.
    media.setdefault("local_roots", [FIXTURES, Path(tempfile.gettempdir())])
    network = NetworkSettings(allowed_hosts=list(allowed_hosts))
    return MediaLoader(MediaSettings(**media), S3Settings(), network)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    samples, _ = sf.read(SOURCE, dtype="float32")
    return samples


@pytest.mark.parametrize(
    ("suffix", "codec"),
    [("wav", []), ("mp3", []), ("m4a", ["-c:a", "aac"]), ("flac", []), ("ogg", ["-c:a", "libvorbis"]),
     ("webm", ["-c:a", "libopus", "-ar", "48000"]), ("mkv", ["-c:a", "libopus", "-ar", "48000"]),
     ("mov", ["-c:a", "aac"])],
)  # fmt: skip
def test_decodes_containers(tmp_path, reference, suffix, codec):
    path = tmp_path / f"audio.{suffix}"
    ffmpeg("-i", str(SOURCE), "-ar", "44100", "-ac", "2", *codec, str(path))
    audio = loader().load(str(path))
    assert audio.samples.dtype == np.float32 and audio.sample_rate == 16_000
    # Lossy codecs add priming samples; the length must still match within 0.1 s.
    assert abs(audio.duration - len(reference) / 16_000) < 0.1
    level = 10 * np.log10(np.mean(audio.samples**2))
    assert abs(level - 10 * np.log10(np.mean(reference**2))) < 1.0


def test_video_with_audio(tmp_path):
    video = tmp_path / "clip.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=5", "-i", str(SOURCE), "-shortest", "-c:a", "aac", str(video))
    audio = loader().load(str(video))
    assert audio.info.has_video and audio.info.audio_codec == "aac"
    assert audio.duration > 3


def test_missing_file():
    with pytest.raises(SourceNotFound):
        loader().load(str(FIXTURES / "no-such-clip.mp4"))


def test_not_media(tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is not a video\n" * 50)
    with pytest.raises(NotMediaFile):
        loader().load(str(fake))


def test_video_without_audio(tmp_path):
    silent = tmp_path / "silent.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=s=64x48:r=5", "-t", "1", str(silent))
    with pytest.raises(NoAudioStream):
        loader().load(str(silent))


def test_zero_length_audio(tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16_000)
    with pytest.raises(EmptyAudio):
        loader().load(str(empty))


def test_nan_audio_is_invalid(tmp_path):
    path = tmp_path / "nan.wav"
    sf.write(path, np.full(16_000, np.nan, dtype=np.float32), 16_000, subtype="FLOAT")
    with pytest.raises(InvalidAudio):
        loader().load(str(path))


@pytest.mark.parametrize("rate", [16_000, 44_100])  # 44.1 kHz: ffmpeg's resampler smears each inf
def test_a_few_infinite_samples_become_silence(tmp_path, reference, rate):
    samples = reference.copy()
    samples[::4000], samples[2000::4000], samples[1000] = np.inf, -np.inf, np.nan
    path = tmp_path / "glitches.wav"
    sf.write(path, samples, rate, subtype="FLOAT")
    audio = loader().load(str(path))
    assert np.isfinite(audio.samples).all()
    assert abs(audio.duration - len(samples) / rate) < 0.01
    level = 10 * np.log10(np.mean(audio.samples**2))
    assert abs(level - 10 * np.log10(np.mean(reference**2))) < 1.0  # the speech is intact


def test_mostly_non_finite_is_refused_a_few_are_zeroed():
    samples = np.full(1000, 0.1, dtype=np.float32)
    samples[:400] = np.nan
    assert np.array_equal(finite_samples(samples.copy(), "x") == 0.0, np.arange(1000) < 400)
    samples[:600] = np.inf
    with pytest.raises(InvalidAudio, match="60%"):
        finite_samples(samples, "x")


def test_too_long():
    with pytest.raises(AudioTooLong):
        loader(max_duration_s=2.0).load(str(SOURCE))


def test_too_large():
    with pytest.raises(FileTooLarge):
        loader(max_file_bytes=1000).load(str(SOURCE))


def test_spooled_upload(reference, tmp_path):
    """An upload is read from the server's own spool file (outside the roots), under the client's name."""
    spooled = tmp_path / "ecg-upload-1234"
    spooled.write_bytes(SOURCE.read_bytes())
    audio = loader(local_roots=[]).load_upload(spooled, "../../etc/upload.flac")
    assert audio.source == "upload.flac"
    assert len(audio.samples) == len(reference)
    spooled.write_bytes(b"\x00" * 100)
    with pytest.raises(NotMediaFile, match="x.wav") as refused:
        loader().load_upload(spooled, "C:\\media\\x.wav")
    assert "ecg-upload" not in str(refused.value)
    assert upload_name("") == upload_name("..") == "upload" and upload_name("a" * 999) == "a" * 120
    assert upload_name("\U0001f3a4" * 100 + ".wav").endswith(".wav") and len(upload_name("\U0001f3a4" * 100)) == 30
    # Names the client chooses: never a server error, never the spool path in the message.
    for hostile in ("a\x00b.wav", "error while loading shared libraries.wav", "Cannot allocate memory.mp3"):
        with pytest.raises(NotMediaFile) as refused:
            loader().load_upload(spooled, hostile)
        assert type(refused.value) is NotMediaFile and "ecg-upload" not in str(refused.value)


def test_local_paths_only_under_the_roots(tmp_path):
    with pytest.raises(PathNotAllowed):
        loader(local_roots=[]).load(str(SOURCE))
    with pytest.raises(PathNotAllowed):  # an existing file and a missing one: the same refusal
        loader(local_roots=[tmp_path]).load("/etc/passwd")
    with pytest.raises(PathNotAllowed):
        loader(local_roots=[tmp_path]).load("/etc/no-such-file")
    (tmp_path / "link.flac").symlink_to(SOURCE)  # a link inside the root to a file outside
    with pytest.raises(PathNotAllowed):
        loader(local_roots=[tmp_path]).load(str(tmp_path / "link.flac"))
    with pytest.raises(PathNotAllowed):
        loader(local_roots=[tmp_path]).load(f"{tmp_path}/../{tmp_path.name}/../x.flac")
    with pytest.raises(SourceNotFound):  # inside a root, a missing file may say so
        loader(local_roots=[tmp_path]).load(str(tmp_path / "missing.flac"))
    assert loader(local_roots=[SOURCE.parent]).load(f"file://{SOURCE}").duration > 1


def test_unsupported_scheme():
    with pytest.raises(InputError, match="unsupported source scheme"):
        loader().load("ftp://example.org/a.wav")


def test_choose_source_prefers_audio_path():
    assert choose_source("video.mp4", "audio.wav") == "audio.wav"
    assert choose_source("video.mp4", None) == "video.mp4"
    with pytest.raises(InputError):
        choose_source(None, "  ")


def test_redact_hides_credentials_and_query():
    assert redact("https://user:pw@host.example/a.mp4?X-Amz-Signature=secret") == "https://host.example/a.mp4"


# -- http(s) ---------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.startswith("/error"):
            self.send_error(500)
        else:
            super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def http_base():
    handler = lambda *a, **kw: _Handler(*a, directory=str(SOURCE.parent), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_http_download(http_base, reference):
    audio = loader(LOOPBACK).load(f"{http_base}/{SOURCE.name}?token=abc")
    assert len(audio.samples) == len(reference)
    assert audio.source == f"http://127.0.0.1/{SOURCE.name}"  # query string (credentials) dropped


def test_http_errors(http_base):
    # A 404, a 500 and a refused address read alike: the answer is no oracle of what lies behind.
    for url in (f"{http_base}/missing.wav", f"{http_base}/error.wav"):
        with pytest.raises(DownloadFailed, match=r"^could not download http://127\.0\.0\.1/\w+\.wav$"):
            loader(LOOPBACK).load(url)
    with pytest.raises(DownloadFailed, match=r"^could not download http://127\.0\.0\.1/sentence_es\.flac$"):
        loader().load(f"{http_base}/{SOURCE.name}")  # loopback is not allowed by default
    with pytest.raises(FileTooLarge):
        loader(LOOPBACK, max_file_bytes=10_000).load(f"{http_base}/{SOURCE.name}")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(DownloadFailed):
        loader(LOOPBACK).load(f"http://127.0.0.1:{port}/a.wav")


# -- s3:// through moto's S3 server ----------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3_settings(s3_endpoint) -> S3Settings:
    import boto3

    settings = S3Settings(endpoint_url=s3_endpoint, region="us-east-1", access_key_id="test-key",
                          secret_access_key="test-secret")  # fmt: skip
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="test-key", aws_secret_access_key="test-secret")  # fmt: skip
    client.create_bucket(Bucket="media")
    client.upload_file(str(SOURCE), "media", "calls/sentence.flac")
    return settings


def test_s3_download(s3_settings, reference):
    audio = MediaLoader(MediaSettings(), s3_settings).load("s3://media/calls/sentence.flac")
    assert len(audio.samples) == len(reference)


def test_s3_errors(s3_settings):
    media = MediaLoader(MediaSettings(), s3_settings)
    # A missing object and a missing bucket read alike: no map of what the credentials reach.
    with pytest.raises(DownloadFailed, match=r"^could not download s3://media/calls/missing\.flac$"):
        media.load("s3://media/calls/missing.flac")
    with pytest.raises(DownloadFailed, match=r"^could not download s3://no-such-bucket/a\.flac$"):
        media.load("s3://no-such-bucket/a.flac")
    with pytest.raises(DownloadFailed):  # a key that names no file in the working directory
        media.load("s3://media/calls/..")
    with pytest.raises(InputError, match="malformed"):
        media.load("s3://media")
    with pytest.raises(FileTooLarge):
        MediaLoader(MediaSettings(max_file_bytes=1000), s3_settings).load("s3://media/calls/sentence.flac")


def test_s3_secret_not_in_repr(s3_settings):
    assert "test-secret" not in repr(s3_settings)
