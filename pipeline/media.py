"""Stage 1, media: fetch a source (local path, http(s) URL, s3:// URI, upload)
and decode any container ffmpeg reads into 16 kHz mono float32.

Decoding shells out to ffprobe/ffmpeg rather than a Python binding: it reads
every container and codec the Debian/Docker ffmpeg build reads, and a corrupt
file can only take down a child process.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import numpy as np

from pipeline.config import MediaSettings, NetworkSettings, S3Settings
from pipeline.errors import AudioTooLong, DownloadFailed, FileTooLarge, InputError, InvalidAudio, SourceNotFound
from pipeline.ffmpeg import SAMPLE_RATE, MediaInfo, decode, probe
from pipeline.netguard import NetworkPolicy, download, quiet_http_client_logs
from pipeline.sources import local_path, scheme_of

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
# Above this share of NaN/inf samples a file is refused rather than repaired (see finite_samples).
_MAX_NON_FINITE = 0.5


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


def upload_name(filename: str) -> str:
    """The client's file name, safe to use as one: no directories, not too long, never empty."""
    name = "".join(c for c in Path(filename.replace("\\", "/")).name if c.isprintable()).strip().lstrip(".")
    # File systems count bytes (255 at most), not characters: keep the end, where the extension is.
    while len(name.encode()) > 120:
        name = name[1:]
    return name or "upload"


def redact(source: str) -> str:
    """A source as it may appear in logs and errors: no query string, no user info."""
    try:
        parts = urlsplit(source)
        parts.hostname  # noqa: B018 (parsing the host is what may fail)
    except ValueError:  # e.g. "http://[::1": nothing of it is worth showing
        return "<invalid URL>"
    if parts.scheme in ("http", "https", "s3"):
        return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
    return source


class MediaLoader:
    """Turns a source string or uploaded bytes into `Audio`. Holds the S3 client."""

    def __init__(self, media: MediaSettings, s3: S3Settings, network: NetworkSettings | None = None) -> None:
        self._media = media
        self._s3_settings = s3
        self._network = network or NetworkSettings()
        self._policy = NetworkPolicy.from_settings(self._network)
        self._s3: S3Client | None = None
        quiet_http_client_logs()

    def load(self, source: str) -> Audio:
        with tempfile.TemporaryDirectory(prefix="ecg-media-") as tmp:
            path = self._fetch(source, Path(tmp))
            audio = self.load_file(path)
        audio.source = redact(source)
        return audio

    def load_upload(self, path: Path, filename: str = "upload") -> Audio:
        """A file the server spooled itself (an upload), so not subject to the local roots.

        It is read under the client's file name (a link in a private directory):
        errors then name the file the client knows, and its extension helps ffprobe.
        """
        size = path.stat().st_size
        if size > self._media.max_file_bytes:
            raise FileTooLarge(f"upload is {size} bytes; the limit is {self._media.max_file_bytes}")
        name = upload_name(filename)
        with tempfile.TemporaryDirectory(prefix="ecg-upload-") as tmp:
            link = Path(tmp) / name
            link.symlink_to(path.resolve())
            audio = self.load_file(link)
        audio.source = name
        return audio

    def load_file(self, path: Path) -> Audio:
        info = probe(path, self._media)
        if info.duration is not None and info.duration > self._media.max_duration_s:
            raise AudioTooLong(f"media lasts {info.duration:.1f} s; the limit is {self._media.max_duration_s:.0f} s")
        samples = finite_samples(decode(path, self._media, info.duration), path.name)
        return Audio(samples=samples, info=info, source=str(path))

    # -- fetching --------------------------------------------------------

    def _fetch(self, source: str, workdir: Path) -> Path:
        scheme = scheme_of(source)
        if scheme in ("http", "https"):
            return self._download_http(source, workdir)
        if scheme == "s3":
            return self._download_s3(source, workdir)
        if scheme in ("", "file") or len(scheme) == 1:  # len 1: a Windows drive letter
            return self._local(source)
        raise InputError(f"unsupported source scheme {scheme!r}: use a path, http(s):// or s3://")

    def _local(self, source: str) -> Path:
        path = local_path(source, self._media.local_roots)
        if not path.is_file():
            raise SourceNotFound(f"no such file: {source}")
        size = path.stat().st_size
        if size > self._media.max_file_bytes:
            raise FileTooLarge(f"file is {size} bytes; the limit is {self._media.max_file_bytes}")
        return path

    def _download_http(self, url: str, workdir: Path) -> Path:
        """Through `pipeline.netguard`: public addresses only (or `network.allowed_hosts`), every hop checked."""
        suffix = Path(url.split("?")[0].split("#")[0]).suffix
        target = workdir / ("download" + (suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""))
        media = self._media
        download(
            url,
            target,
            policy=self._policy,
            max_bytes=media.max_file_bytes,
            deadline_s=media.download_timeout_s,
            read_timeout_s=media.download_read_timeout_s,
            max_redirects=self._network.max_redirects,
        )
        return target

    def _download_s3(self, uri: str, workdir: Path) -> Path:
        """An object through the configured endpoint and credentials.

        Missing, forbidden and failing objects read alike (`download_failed`), as
        for http(s): the answer must not map what the server's credentials reach.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        parts = urlsplit(uri)
        bucket, key = parts.netloc, parts.path.lstrip("/")
        if not bucket or not key:
            raise InputError(f"malformed S3 URI {redact(uri)}: expected s3://bucket/key")
        suffix = Path(key).suffix
        target = workdir / ("object" + (suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""))
        client = self._s3_client()
        try:
            size = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
            if size > self._media.max_file_bytes:
                raise FileTooLarge(f"{redact(uri)} is larger than the limit of {self._media.max_file_bytes} bytes")
            client.download_file(bucket, key, str(target))
        except (ClientError, BotoCoreError) as e:
            code = e.response.get("Error", {}).get("Code", "") if isinstance(e, ClientError) else type(e).__name__
            log.info("could not read %s: %s", redact(uri), code)
            raise DownloadFailed(f"could not download {redact(uri)}") from None
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
