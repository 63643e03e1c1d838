"""ffprobe/ffmpeg as contained children (pipeline.ffmpeg): hostile inputs are refused
quickly, limits hold, no child outlives a call, and the streamed samples are exact."""

from __future__ import annotations

import logging
import os
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import ffmpeg as ff
from pipeline.config import MediaSettings, S3Settings
from pipeline.errors import AnalyzerError, AudioTooLong, DecodeLimitExceeded, InputError, NotMediaFile
from pipeline.media import MediaLoader
from tests.conftest import ffmpeg, fixture_path

SOURCE = fixture_path("sentence_es.flac")  # 11.46 s, 16 kHz mono
HAS_PRLIMIT = ff._prlimit() is not None


def load(path: Path, **media) -> np.ndarray:
    return MediaLoader(MediaSettings(**media), S3Settings()).load_file(path).samples


def all_children() -> list[str]:
    """Processes (zombies included) whose parent is this test process, as "pid state"."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if int(fields[1]) == os.getpid():
            found.append(f"{stat.parent.name} {fields[0]}")
    return found


OLDER: set[str] = set()  # pids of children from before the test: servers of session fixtures (PostgreSQL)


def children() -> list[str]:
    """This test's children: the process's children, less those that were there before it began."""
    return [c for c in all_children() if c.split()[0] not in OLDER]


@pytest.fixture(autouse=True)
def no_leftover_children():
    OLDER.clear()
    OLDER.update(c.split()[0] for c in all_children())
    yield
    assert children() == []


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    samples, _ = sf.read(SOURCE, dtype="float32")
    return samples


@pytest.fixture
def wav(tmp_path, reference) -> Path:
    path = tmp_path / "speech.wav"
    sf.write(path, reference, 16_000, subtype="PCM_16")
    return path


# -- samples ---------------------------------------------------------------


def test_decode_equals_soundfile(wav):
    expected, _ = sf.read(wav, dtype="float32")
    samples = load(wav)
    assert samples.dtype == np.float32 and samples.flags.owndata
    assert np.array_equal(samples, expected)


def test_streamed_samples_equal_the_old_whole_output_path(tmp_path):
    path = tmp_path / "stereo.mp3"
    ffmpeg("-i", str(SOURCE), "-ar", "44100", "-ac", "2", str(path))
    old = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn", "-ac", "1", "-ar", "16000",
         "-t", str(4 * 3600 + 1), "-f", "f32le", "pipe:1"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert np.array_equal(load(path), np.frombuffer(old, dtype=np.float32))


@pytest.mark.parametrize("declared", [None, 0.3, 43_200.0])  # unknown, far too short, far too long
def test_a_wrong_declared_duration_only_changes_the_buffering(wav, declared):
    samples = ff.decode(wav, MediaSettings(max_duration_s=60), declared)
    assert np.array_equal(samples, sf.read(wav, dtype="float32")[0])


def test_decoding_stops_at_the_limit_without_a_declared_duration(wav):
    with pytest.raises(AudioTooLong):
        ff.decode(wav, MediaSettings(max_duration_s=5), None)


# -- hostile containers ----------------------------------------------------


def playlist(tmp_path: Path, segment: Path, *, ended: bool) -> Path:
    lines = ["#EXTM3U", "#EXT-X-VERSION:3", "#EXT-X-TARGETDURATION:12", "#EXT-X-MEDIA-SEQUENCE:0", "#EXTINF:11.5,"]
    lines += [str(segment)] + (["#EXT-X-ENDLIST"] if ended else [])
    path = tmp_path / "list.m3u8"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("ended", [True, False])  # a live playlist (no ENDLIST) must not be polled forever
def test_hls_playlist_is_refused_quickly(tmp_path, ended):
    segment = tmp_path / "segment.ts"
    ffmpeg("-i", str(SOURCE), "-c:a", "aac", "-f", "mpegts", str(segment))
    path = playlist(tmp_path, segment, ended=ended)
    start = time.monotonic()
    with pytest.raises(NotMediaFile, match="hls") as refused:
        load(path)
    assert refused.value.code == "not_media"
    with pytest.raises(NotMediaFile, match="hls"):  # decode alone refuses too: not one sample of the segment
        ff.decode(path, MediaSettings(), None)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("listed", ["/etc/passwd", "local"])
def test_ffconcat_list_is_refused(tmp_path, wav, listed):
    path = tmp_path / "list.ffconcat"
    path.write_text(f"ffconcat version 1.0\nfile '{wav if listed == 'local' else listed}'\n")
    with pytest.raises(NotMediaFile) as refused:
        load(path)
    assert refused.value.code == "not_media"
    with pytest.raises(NotMediaFile):
        ff.decode(path, MediaSettings(), None)


def test_file_names_are_not_urls(tmp_path, wav, monkeypatch):
    # Without the explicit file: protocol ffmpeg would read this relative name as a URL.
    monkeypatch.chdir(tmp_path)
    odd = Path("http:example.org")
    odd.write_bytes(wav.read_bytes())
    assert len(load(odd)) == sf.info(wav).frames


def test_wav_header_claiming_12_hours_decodes_what_is_there(tmp_path):
    # ffmpeg measures a WAV's data chunk against the file: the claim is ignored.
    header = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 16_000, 32_000, 2, 16)
    header += b"data" + struct.pack("<I", 12 * 3600 * 32_000)
    path = tmp_path / "liar.wav"
    path.write_bytes(header + b"\x00\x10" * 32_000)  # 2 s
    assert len(load(path, max_duration_s=3600)) == 32_000


def test_container_declaring_12_hours_is_too_long(tmp_path, wav):
    # Matroska's declared duration is believed: refused before decoding (a 413 with the claimed length).
    path = tmp_path / "liar.mkv"
    ffmpeg("-i", str(wav), "-c:a", "flac", str(path))
    data = bytearray(path.read_bytes())
    at = data.index(b"\x44\x89\x88") + 3  # Segment Info Duration, an 8-byte float in ms
    data[at : at + 8] = struct.pack(">d", 12 * 3600 * 1000.0)
    path.write_bytes(data)
    start = time.monotonic()
    with pytest.raises(AudioTooLong, match="43200"):
        load(path)
    assert time.monotonic() - start < 5
    assert ff.probe(path, MediaSettings()).duration == 43_200
    # decode() alone sizes its buffer by the claim, capped, and returns what is really there.
    assert abs(len(ff.decode(path, MediaSettings(), 43_200.0)) - sf.info(wav).frames) < 160


def test_truncated_and_junk_files_are_not_media(tmp_path, wav):
    m4a = tmp_path / "full.m4a"
    ffmpeg("-i", str(wav), "-c:a", "aac", str(m4a))  # moov written last: truncation loses it
    truncated = tmp_path / "truncated.m4a"
    truncated.write_bytes(m4a.read_bytes()[: m4a.stat().st_size // 2])
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    for path in (truncated, junk):
        with pytest.raises(NotMediaFile) as refused:
            load(path)
        assert refused.value.code == "not_media"


# -- limits ----------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path) -> Path:
    # Nobody ever writes: opening it blocks the child forever.
    path = tmp_path / "stream.wav"
    os.mkfifo(path)
    return path


def test_probe_timeout_kills_the_child(fifo):
    start = time.monotonic()
    with pytest.raises(DecodeLimitExceeded, match="within 0.5 s") as refused:
        ff.probe(fifo, MediaSettings(ffprobe_timeout_s=0.5))
    assert time.monotonic() - start < 5
    assert isinstance(refused.value, InputError) and refused.value.code == "decode_limit"
    assert children() == []


def test_decode_timeout_kills_the_child(fifo):
    start = time.monotonic()
    with pytest.raises(DecodeLimitExceeded, match="could not decode the audio of stream.wav within 0.5 s"):
        ff.decode(fifo, MediaSettings(ffmpeg_timeout_s=0.5), None)
    assert time.monotonic() - start < 5
    assert children() == []


@pytest.mark.skipif(not HAS_PRLIMIT, reason="prlimit (util-linux) is not installed")
def test_memory_limit_applies_to_the_children(wav):
    # 50 MB is less than ffmpeg maps to start: the limit is real, and the failure is the
    # server's (a 5xx), never blamed on the file.
    tiny = MediaSettings(ffmpeg_memory_bytes=50 * 1024**2)
    for call in (lambda: ff.probe(wav, tiny), lambda: ff.decode(wav, tiny, None)):
        with pytest.raises(AnalyzerError, match="could not start") as failed:
            call()
        assert not isinstance(failed.value, InputError)


@pytest.mark.skipif(not HAS_PRLIMIT, reason="prlimit (util-linux) is not installed")
def test_cpu_limit_is_reported_as_a_decode_limit():
    # A child spinning past RLIMIT_CPU (1 s) dies of SIGXCPU, which names the CPU limit.
    done = ff._run("sh", ["-c", "while :; do :; done"], MediaSettings(ffmpeg_cpu_s=1), 10, ff._Tail().read)
    assert done.returncode == -24 and not done.timed_out
    error = ff._failure("ffmpeg", Path("x.mp4"), done, MediaSettings(ffmpeg_cpu_s=1))
    assert isinstance(error, DecodeLimitExceeded) and "CPU" in str(error)


def test_stderr_is_drained_and_only_its_tail_kept():
    # 5 MB of stderr would block a child whose pipe nobody reads (64 KB).
    script = "head -c 5000000 /dev/zero | tr '\\0' e >&2; echo the-end >&2; printf out"
    stdout = ff._Tail()
    done = ff._run("sh", ["-c", script], MediaSettings(), 30, stdout.read)
    assert done.returncode == 0 and stdout.text() == "out"
    assert len(done.stderr) == 4096 and done.stderr.endswith("the-end\n")


def test_without_prlimit_children_run_unlimited_with_one_warning(monkeypatch, caplog, wav):
    monkeypatch.setattr(ff.shutil, "which", lambda name: None)
    ff._prlimit.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pipeline.ffmpeg"):
            assert len(load(wav, ffmpeg_memory_bytes=50 * 1024**2)) == sf.info(wav).frames
            load(wav)
        assert len([r for r in caplog.records if "prlimit" in r.message]) == 1
    finally:
        ff._prlimit.cache_clear()
