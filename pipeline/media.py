"""Stage 1, media: fetch a source (local path, http(s) URL, s3:// URI, upload)
and decode any container ffmpeg reads into 16 kHz mono float32.

Decoding shells out to ffprobe/ffmpeg rather than a Python binding: it reads
every container and codec the Debian/Docker ffmpeg build reads, and a corrupt
file can only take down a child process.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from pipeline.config import MediaSettings, S3Settings
from pipeline.errors import (
    AudioTooLong,
    DownloadFailed,
    EmptyAudio,
    FileTooLarge,
    InputError,
    InvalidAudio,
    NoAudioStream,
    NotMediaFile,
    SourceNotFound,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000
_CHUNK = 1 << 20
# Above this share of NaN/inf samples a file is refused rather than repaired (see finite_samples).
_MAX_NON_FINITE = 0.5


@dataclass(frozen=True)
class MediaInfo:
    container: str
    duration: float | None
    audio_codec: str
    has_video: bool


@dataclass
class Audio:
    """Decoded audio: what every later stage consumes (and what crosses Ray's object store)."""

    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    info: MediaInfo
    sample_rate: int = SAMPLE_RATE
    source: str = field(default="", repr=False)

    @property
    def duration(self) -> float:
        return len(self.samples) / self.sample_rate


def redact(source: str) -> str:
    """A source as it may appear in logs and errors: no query string, no user info."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https", "s3"):
        return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
    return source


class MediaLoader:
    """Turns a source string or uploaded bytes into `Audio`. Holds the S3 client."""

    def __init__(self, media: MediaSettings, s3: S3Settings) -> None:
        self._media = media
        self._s3_settings = s3
        self._s3: S3Client | None = None

    def load(self, source: str) -> Audio:
        with tempfile.TemporaryDirectory(prefix="ecg-media-") as tmp:
            path = self._fetch(source, Path(tmp))
            audio = self.load_file(path)
        audio.source = redact(source)
        return audio

    def load_bytes(self, data: bytes, filename: str = "upload") -> Audio:
        if len(data) > self._media.max_file_bytes:
            raise FileTooLarge(f"upload is {len(data)} bytes; the limit is {self._media.max_file_bytes}")
        with tempfile.TemporaryDirectory(prefix="ecg-upload-") as tmp:
            path = Path(tmp) / Path(filename).name
            path.write_bytes(data)
            audio = self.load_file(path)
        audio.source = Path(filename).name
        return audio

    def load_file(self, path: Path) -> Audio:
        info = probe(path)
        if info.duration is not None and info.duration > self._media.max_duration_s:
            raise AudioTooLong(f"media lasts {info.duration:.1f} s; the limit is {self._media.max_duration_s:.0f} s")
        samples = decode(path, self._media.max_duration_s)
        return Audio(samples=samples, info=info, source=str(path))

    # -- fetching --------------------------------------------------------

    def _fetch(self, source: str, workdir: Path) -> Path:
        scheme = urlsplit(source).scheme.lower()
        if scheme in ("http", "https"):
            return self._download_http(source, workdir)
        if scheme == "s3":
            return self._download_s3(source, workdir)
        if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
            return self._local(source.removeprefix("file://"))
        raise InputError(f"unsupported source scheme {scheme!r}: use a path, http(s):// or s3://")

    def _local(self, source: str) -> Path:
        if not self._media.allow_local_paths:
            raise InputError("local paths are disabled on this server; send a URL, an s3:// URI or an upload")
        path = Path(source).expanduser()
        if not path.is_file():
            raise SourceNotFound(f"no such file: {source}")
        size = path.stat().st_size
        if size > self._media.max_file_bytes:
            raise FileTooLarge(f"file is {size} bytes; the limit is {self._media.max_file_bytes}")
        return path

    def _download_http(self, url: str, workdir: Path) -> Path:
        import httpx

        target = workdir / (Path(urlsplit(url).path).name or "download")
        limit = self._media.max_file_bytes
        try:
            with httpx.stream("GET", url, follow_redirects=True, timeout=self._media.download_timeout_s) as r:
                if r.status_code == 404:
                    raise SourceNotFound(f"{redact(url)} answered 404")
                if r.status_code >= 400:
                    raise DownloadFailed(f"{redact(url)} answered HTTP {r.status_code}")
                if int(r.headers.get("content-length") or 0) > limit:
                    raise FileTooLarge(f"{redact(url)} is larger than the limit of {limit} bytes")
                received = 0
                with target.open("wb") as out:
                    for chunk in r.iter_bytes(_CHUNK):
                        received += len(chunk)
                        if received > limit:
                            raise FileTooLarge(f"{redact(url)} is larger than the limit of {limit} bytes")
                        out.write(chunk)
        except httpx.HTTPError as e:
            raise DownloadFailed(f"could not download {redact(url)}: {type(e).__name__}") from e
        return target

    def _download_s3(self, uri: str, workdir: Path) -> Path:
        from botocore.exceptions import BotoCoreError, ClientError

        parts = urlsplit(uri)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not bucket or not key:
            raise InputError(f"malformed S3 URI {uri!r}: expected s3://bucket/key")
        target = workdir / (Path(key).name or "object")
        client = self._s3_client()
        try:
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if size > self._media.max_file_bytes:
                raise FileTooLarge(f"{uri} is {size} bytes; the limit is {self._media.max_file_bytes}")
            client.download_file(bucket, key, str(target))
        except ClientError as e:
            status = e.response.get("Error", {}).get("Code", "")
            if status in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise SourceNotFound(f"{uri} does not exist") from e
            raise DownloadFailed(f"could not read {uri}: S3 error {status}") from e
        except BotoCoreError as e:
            raise DownloadFailed(f"could not read {uri}: {type(e).__name__}") from e
        return target

    def _s3_client(self) -> S3Client:
        if self._s3 is None:
            import boto3

            s = self._s3_settings
            self._s3 = boto3.client(
                "s3",
                endpoint_url=s.endpoint_url,
                region_name=s.region,
                aws_access_key_id=s.access_key_id.get_secret_value() if s.access_key_id else None,
                aws_secret_access_key=s.secret_access_key.get_secret_value() if s.secret_access_key else None,
            )
        return self._s3


def probe(path: Path) -> MediaInfo:
    """Read container and stream facts with ffprobe; typed errors for non-media and silent video."""
    proc = subprocess.run(
        ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise NotMediaFile(f"{path.name} is not a media file ffmpeg can read")
    meta: dict[str, Any] = json.loads(proc.stdout or "{}")
    streams = meta.get("streams", [])
    audio = [s for s in streams if s.get("codec_type") == "audio"]
    if not audio:
        if not streams:
            raise NotMediaFile(f"{path.name} holds no media streams")
        raise NoAudioStream(f"{path.name} has no audio stream")
    fmt = meta.get("format", {})
    duration = fmt.get("duration") or audio[0].get("duration")
    return MediaInfo(
        container=fmt.get("format_name", "unknown"),
        duration=float(duration) if duration not in (None, "N/A") else None,
        audio_codec=audio[0].get("codec_name", "unknown"),
        has_video=any(s.get("codec_type") == "video" for s in streams),
    )


def decode(path: Path, max_duration_s: float) -> np.ndarray:
    """The first audio stream as 16 kHz mono float32 (ffmpeg's resampler and downmix)."""
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-ac", "1"]
    # Decode one second past the limit so "too long" is detected even when the
    # container does not declare its duration.
    cmd += ["-ar", str(SAMPLE_RATE), "-t", str(max_duration_s + 1), "-f", "f32le", "pipe:1"]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise NotMediaFile(f"could not decode the audio of {path.name}: {detail[0][:200]}")
    samples = np.frombuffer(proc.stdout, dtype=np.float32).copy()
    if samples.size == 0:
        raise EmptyAudio(f"{path.name} contains no audio samples")
    if samples.size > max_duration_s * SAMPLE_RATE:
        raise AudioTooLong(f"{path.name} is longer than the limit of {max_duration_s:.0f} s")
    return finite_samples(samples, path.name)


def finite_samples(samples: np.ndarray, name: str) -> np.ndarray:
    """`samples` with NaN/inf replaced by silence, or InvalidAudio when most of them are NaN/inf.

    ffmpeg passes NaN and inf from float sources (WAV, raw f32) straight
    through, and its resampler smears each one over dozens of output samples.
    Every later stage turns them into NaN features or a crash (HTTP 500), so
    none may pass. A few are glitches: silence in their place costs
    milliseconds. When more than half the samples are not numbers there is no
    signal left, and an analysis of the silence would look like a valid result.
    """
    finite = np.isfinite(samples)
    bad = samples.size - int(np.count_nonzero(finite))
    if bad == 0:
        return samples
    if bad > _MAX_NON_FINITE * samples.size:
        raise InvalidAudio(f"{name}: {bad / samples.size:.0%} of the audio samples are NaN or infinite")
    log.debug("%s: replaced %d NaN/infinite samples (of %d) with silence", name, bad, samples.size)
    samples[~finite] = 0.0
    return samples


def choose_source(video_path: str | None, audio_path: str | None) -> str:
    """The source to analyse: `audio_path` when given (already-extracted audio), else `video_path`."""
    source = (audio_path or "").strip() or (video_path or "").strip()
    if not source:
        raise InputError("give video_path or audio_path (a path, http(s) URL or s3:// URI)")
    return source
