"""ffprobe and ffmpeg run on untrusted media, as contained child processes.

A media file is a program for ffmpeg's demuxers: a playlist or a concat list
makes it open URLs and other local files, and a crafted file can make it run
for hours or allocate gigabytes. So every child here:

- opens only the file it was given: `-protocol_whitelist file,pipe` (no http,
  tcp, udp, crypto, data, subfile, concat... from inside a file);
- demuxes only ordinary containers: `-format_whitelist DEMUXERS`, which no
  playlist (hls, dash), concat list, image sequence, device or filter graph is
  on. Demuxers that open nested ones (avi's subtitles) pass the list on;
- is killed, with its whole process group, at a wall-clock deadline, and runs
  under RLIMIT_AS and RLIMIT_CPU set by util-linux `prlimit` (`preexec_fn` is
  not safe in a threaded process such as a Ray actor);
- has its stderr drained as it comes, keeping only the tail (a hostile file
  can make ffmpeg print megabytes), and is always reaped.

Decoded samples stream from ffmpeg's stdout straight into one float32 array.
POSIX only (process groups, `selectors` on pipes), like the Docker image.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from pipeline.config import MediaSettings
from pipeline.errors import AnalyzerError, AudioTooLong, DecodeLimitExceeded, EmptyAudio, NoAudioStream, NotMediaFile

log = logging.getLogger(__name__)
SAMPLE_RATE = 16_000

# ffmpeg demuxer names (`ffmpeg -demuxers`). A demuxer passes when any of its
# names is listed: "mov" admits mov,mp4,m4a,3gp,3g2,mj2 and "matroska" admits
# matroska,webm. Left out on purpose: hls, dash, concat, image2 and every
# *_pipe, lavfi, sdp/rtp/rtsp, webm_dash_manifest, imf (they open other files
# or URLs), raw PCM/video (never probed anyway) and the long tail of game and
# legacy formats (attack surface no caller needs).
DEMUXERS = (
    "mov",  # mp4, m4a, 3gp, mov
    "matroska",  # mkv, mka, webm
    "avi",
    "flv",
    "asf",  # wmv, wma
    "mpegts",
    "mpeg",  # program stream: mpg, vob
    "ogg",  # vorbis, opus, flac, speex
    "wav",
    "w64",
    "flac",
    "mp3",  # also mp2
    "aac",  # ADTS
    "ac3",
    "eac3",
    "dts",
    "amr",
    "caf",
    "aiff",
    "au",
)
_PROTOCOLS = "file,pipe"
_PROBE_ENTRIES = "format=format_name,duration:stream=codec_type,codec_name,duration"
_PROBE_OUTPUT_MAX = 1 << 20  # JSON of at most ffmpeg's 1000 streams; more is not a media file
_STDERR_TAIL = 4096
_READ_SIZE = 1 << 16
_SAMPLE_BYTES = 4  # f32le
_UNKNOWN_DURATION_S = 60.0  # first buffer when the container declares no duration


@dataclass(frozen=True)
class MediaInfo:
    container: str
    duration: float | None
    audio_codec: str
    has_video: bool


def probe(path: Path, media: MediaSettings) -> MediaInfo:
    """Read container and stream facts with ffprobe; typed errors for non-media and silent video."""
    output = bytearray()

    def collect(stream: BinaryIO) -> bool:
        chunk = stream.read(_READ_SIZE)
        output.extend(chunk)
        if len(output) > _PROBE_OUTPUT_MAX:
            raise NotMediaFile(f"{path.name} describes more streams than any media file holds")
        return bool(chunk)

    args = [*_input_options(), "-print_format", "json", "-show_entries", _PROBE_ENTRIES, _url(path)]
    done = _run("ffprobe", args, media, media.ffprobe_timeout_s, collect)
    if done.timed_out:
        raise DecodeLimitExceeded(f"could not read {path.name} within {media.ffprobe_timeout_s:g} s")
    if done.returncode != 0:
        raise _failure("ffprobe", path, done, media) or NotMediaFile(f"{path.name} is not a media file ffmpeg can read")
    return _media_info(path, json.loads(output or b"{}"))


def decode(path: Path, media: MediaSettings, duration: float | None = None) -> np.ndarray:
    """The first audio stream as 16 kHz mono float32 (ffmpeg's resampler and downmix).

    `duration` (from `probe`) sizes the array up front. NaN and inf samples pass
    through as ffmpeg decodes them (`pipeline.media.finite_samples` deals with them).
    """
    limit = media.max_duration_s
    samples = _SampleBuffer(_estimate(duration, limit), int((limit + 1) * SAMPLE_RATE), path.name, limit)
    args = [*_input_options(), "-nostdin", "-nostats", "-filter_threads", "1", "-i", _url(path)]
    # Decode one second past the limit so "too long" is detected even when the
    # container does not declare its duration.
    args += ["-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-t", str(limit + 1), "-f", "f32le", "pipe:1"]
    done = _run("ffmpeg", args, media, media.ffmpeg_timeout_s, samples.read)
    if done.timed_out:
        raise DecodeLimitExceeded(f"could not decode the audio of {path.name} within {media.ffmpeg_timeout_s:g} s")
    if done.returncode != 0:
        # ffmpeg's own words stay in the log: they can quote what a hostile file made it open.
        log.info("ffmpeg could not decode %s: %s", path.name, done.last_line(path))
        raise _failure("ffmpeg", path, done, media) or NotMediaFile(f"could not decode the audio of {path.name}")
    return samples.result()


def _media_info(path: Path, meta: dict[str, Any]) -> MediaInfo:
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


def _input_options() -> list[str]:
    """Options of both tools, placed before the input they restrict."""
    return ["-v", "error", "-threads", "1", "-protocol_whitelist", _PROTOCOLS, "-format_whitelist", ",".join(DEMUXERS)]


def _url(path: Path) -> str:
    # An explicit protocol: a name such as "http:x" or "concat:a|b" stays a file name.
    return f"file:{path}"


def _estimate(duration: float | None, limit_s: float) -> int:
    seconds = _UNKNOWN_DURATION_S if duration is None or not math.isfinite(duration) else duration + 1
    return max(1, math.ceil(min(seconds, limit_s + 1) * SAMPLE_RATE))


class _SampleBuffer:
    """ffmpeg's f32le output read straight into one float32 array (one copy of the samples).

    The array is sized from the declared duration; it grows (a copy, the rare
    case of an unknown or wrong duration) up to `cap` samples, past which the
    audio is too long.
    """

    def __init__(self, size: int, cap: int, name: str, limit_s: float) -> None:
        self._array = np.empty(min(size, cap), dtype=np.float32)
        self._filled = 0  # bytes
        self._cap = cap
        self._name = name
        self._limit_s = limit_s

    def read(self, stream: BinaryIO) -> bool:
        """One read from ffmpeg's stdout; False at its end."""
        if self._filled == self._array.nbytes:
            self._grow()
        with memoryview(self._array).cast("B") as view, view[self._filled :] as free:
            count = stream.readinto(free) or 0
        self._filled += count
        if self._filled // _SAMPLE_BYTES > self._limit_s * SAMPLE_RATE:
            raise self._too_long()
        return count > 0

    def result(self) -> np.ndarray:
        size = self._filled // _SAMPLE_BYTES
        if size == 0:
            raise EmptyAudio(f"{self._name} contains no audio samples")
        try:
            # Shrinking reallocates in place: the unused tail is returned, nothing copied.
            self._array.resize(size, refcheck=True)
        except ValueError:  # something else (a debugger) references the array
            self._array = self._array[:size].copy()
        return self._array

    def _grow(self) -> None:
        if self._array.size >= self._cap:
            raise self._too_long()
        grown = np.empty(min(self._array.size * 2, self._cap), dtype=np.float32)
        grown[: self._array.size] = self._array
        self._array = grown

    def _too_long(self) -> AudioTooLong:
        return AudioTooLong(f"{self._name} is longer than the limit of {self._limit_s:.0f} s")


# -- running a contained child ------------------------------------------------


@dataclass(frozen=True)
class _Exit:
    returncode: int
    stderr: str  # its tail
    timed_out: bool

    def last_line(self, path: Path | None = None) -> str:
        """The child's last message, naming `path` by its name only (no temporary directories in errors)."""
        lines = self.stderr.strip().splitlines()
        line = lines[-1] if lines else ""
        if path is not None:
            line = line.replace(_url(path), path.name).replace(str(path), path.name)
        return line[:200]


def _run(
    tool: str, args: list[str], media: MediaSettings, timeout_s: float, on_stdout: Callable[[BinaryIO], bool]
) -> _Exit:
    """Run `tool` under the limits, feeding its stdout to `on_stdout` until it ends or `timeout_s` passes."""
    proc = _spawn([*_limits(media), tool, *args])
    stderr = _Tail()
    try:
        finished = _pump(proc, on_stdout, stderr.read, time.monotonic() + timeout_s)
    finally:
        _stop(proc)
    return _Exit(proc.returncode, stderr.text(), timed_out=not finished)


def _spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,  # raw pipes: readinto lands in the sample array without a buffer in between
            start_new_session=True,  # its own process group, killed as a whole
        )
    except OSError as e:
        raise AnalyzerError(f"cannot run {cmd[0]}: {e.strerror}; is ffmpeg installed?") from e


def _pump(
    proc: subprocess.Popen[bytes],
    on_stdout: Callable[[BinaryIO], bool],
    on_stderr: Callable[[BinaryIO], bool],
    deadline: float,
) -> bool:
    """Drain both pipes as data comes until they close and the child exits; False if the deadline came first."""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ, on_stdout)  # type: ignore[arg-type]
        selector.register(proc.stderr, selectors.EVENT_READ, on_stderr)  # type: ignore[arg-type]
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for key, _ in selector.select(remaining):
                if not key.data(key.fileobj):
                    selector.unregister(key.fileobj)
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the child's process group unless it has exited, and reap it: no orphan, no zombie."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # it exited since poll()
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


class _Tail:
    """The last few KB a child wrote to a pipe."""

    def __init__(self) -> None:
        self._data = bytearray()

    def read(self, stream: BinaryIO) -> bool:
        chunk = stream.read(_READ_SIZE)
        self._data.extend(chunk)
        del self._data[:-_STDERR_TAIL]
        return bool(chunk)

    def text(self) -> str:
        return self._data.decode(errors="replace")


def _limits(media: MediaSettings) -> list[str]:
    prlimit = _prlimit()
    if prlimit is None:
        return []
    # CPU: SIGXCPU at the soft limit tells "CPU time" apart; SIGKILL a second later if ignored.
    cpu = f"--cpu={media.ffmpeg_cpu_s}:{media.ffmpeg_cpu_s + 1}"
    return [prlimit, f"--as={media.ffmpeg_memory_bytes}", cpu, "--"]


@functools.cache
def _prlimit() -> str | None:
    path = shutil.which("prlimit")
    if path is None:
        log.warning("prlimit (util-linux) is not installed: ffmpeg and ffprobe run without memory and CPU limits")
    return path


_NOT_ON_WHITELIST = re.compile(r"\[(\w+) @ [^\]]*\] Format not on whitelist")


def _failure(tool: str, path: Path, done: _Exit, media: MediaSettings) -> AnalyzerError | None:
    """The error for a failed child when the cause is known: the server, a limit, a refused format."""
    # The file's name is in ffmpeg's messages, and an upload's name is the client's choice:
    # look for causes only in what ffmpeg said besides it.
    said = done.stderr.replace(_url(path), "").replace(str(path), "").replace(path.name, "")
    if done.returncode in (126, 127):
        # The tool could not start at all (the dynamic loader's codes): the server is at fault, not the file.
        log.error("%s could not start: %s", tool, done.last_line(path))
        return AnalyzerError(
            f"{tool} could not start (is it installed, and is ffmpeg_memory_bytes, "
            f"{media.ffmpeg_memory_bytes}, enough to load it?)"
        )
    if done.returncode == -signal.SIGXCPU:
        return DecodeLimitExceeded(f"{path.name} needs more than {media.ffmpeg_cpu_s} s of CPU time to decode")
    if done.returncode == -signal.SIGKILL or "Cannot allocate memory" in said:
        # SIGKILL that is not ours: the hard CPU limit or the kernel's OOM killer.
        return DecodeLimitExceeded(f"{path.name} needs more memory or CPU time to decode than this server allows")
    refused = _NOT_ON_WHITELIST.search(said)
    if refused:
        return NotMediaFile(f"{path.name} is a {refused.group(1)} file, which this server does not read")
    return None
