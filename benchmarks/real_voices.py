"""Conversations spliced from recordings of real people, with exact reference turns.

    .venv/bin/python benchmarks/diarization_eval.py --split voices [--peer]

The espeak-ng conversations of the dev and test splits have exact references
but synthetic voices; the recorded files of `--split real` have real voices but
few of them, short, and references drawn by hand. These sit between: real
voices, each line a studio recording of one person, laid out as a conversation
(turns, pauses, overlap, gains, noise) by a seeded generator, so the reference
is exact. Eight voices, from Debian packages fetched once with `apt-get
download` (the package lists must be there: `apt-get update`):

- the two voice actors of the game Fish Fillets NG in Czech and the two in
  Dutch (`fillets-ng-data-cs`, `-nl`; GPL-2), game dialogue: a line named
  `<level>-m-<x>` is the small fish's, `<level>-v-<x>` the big fish's;
- the voices of Asterisk's core prompts in English (Allison Smith), French
  (June Wallack), Italian and Russian (`asterisk-core-sounds-{en,fr,it,ru}-g722`,
  CC BY-SA 3.0), 16 kHz G.722.

The voices speak different languages, and the two sources were recorded apart
(a channel cue the segmentation may hear); same-language pairs (the two
fish of one language, the fish of the other) are the harder ones. No
parameter was chosen on this split.
"""

from __future__ import annotations

import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16_000
FISH = {"cs": "fillets-ng-data-cs", "nl": "fillets-ng-data-nl"}
ASTERISK = {
    "en": ("asterisk-core-sounds-en-g722", "en_US_f_Allison"),
    "fr": ("asterisk-core-sounds-fr-g722", "fr_CA_f_June"),
    "it": ("asterisk-core-sounds-it-g722", "it_IT_m_Carlo"),
    "ru": ("asterisk-core-sounds-ru-g722", "ru_RU_f_IvrvoiceRU"),
}
LEVEL = -24.0  # dBFS RMS every line is brought to before its conversation's gain
SPEECH_DB = 25.0  # a line's speech: frames within this of its loudest (its reverberation tail is not)
MIN_PAUSE_S = 0.5  # shorter pauses inside a line are part of its turn (the product fills up to 0.6 s)


@dataclass(frozen=True)
class VoiceSpec:
    name: str
    seed: int
    voices: int
    minutes: float
    noise_snr_db: float | None


def voice_specs() -> list[VoiceSpec]:
    """24 conversations: 2-5 voices, 1-3 minutes, half with noise at 15-20 dB SNR."""
    rng = np.random.default_rng(2026_12_07)
    specs = []
    for i in range(24):
        voices = 2 + i % 4
        minutes = float(rng.choice([1.0, 1.5, 2.0, 3.0]))
        snr = float(rng.uniform(15, 20)) if i % 2 else None
        name = f"voices-{i:02d}-{voices}spk-{minutes:g}min" + (f"-snr{snr:.0f}" if snr else "")
        specs.append(VoiceSpec(name, 1000 + i, voices, minutes, snr))
    return specs


def conversation(spec: VoiceSpec, data: Path) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """(16 kHz samples, reference turns) of one spliced conversation."""
    rng = np.random.default_rng(spec.seed)
    lines = voice_lines(data)
    names = sorted(lines)
    chosen = [names[i] for i in rng.choice(len(names), spec.voices, replace=False)]
    gains = {v: float(rng.uniform(-6, 6)) for v in chosen}
    total = int(spec.minutes * 60 * SAMPLE_RATE)
    out = np.zeros(total + 30 * SAMPLE_RATE, dtype=np.float32)
    turns: list[tuple[float, float, str]] = []  # the reference: each line's speech
    starts: list[int] = []  # where each line starts, in samples
    used: set[Path] = set()
    cursor, previous = int(0.5 * SAMPLE_RATE), None
    while cursor < total:
        others = [v for v in chosen if v != previous]
        if len(starts) < len(chosen):  # every voice speaks, the first turns in a random order
            voice = chosen[len(starts)]
        elif previous and rng.random() < 0.1:  # the same voice again after a pause
            voice = previous
        else:
            voice = others[rng.integers(len(others))]
        path = _unused(lines[voice], used, rng)
        line = _line(path, data) * 10 ** (gains[voice] / 20)
        start = cursor
        if starts and rng.random() < 0.15:  # overlap the end of the previous turn
            start = max(starts[-1], cursor - int(rng.uniform(0.3, 1.0) * SAMPLE_RATE))
        out[start : start + len(line)] += line
        starts.append(start)
        turns += [((start + a) / SAMPLE_RATE, (start + b) / SAMPLE_RATE, voice) for a, b in speech_regions(line)]
        cursor = max(cursor, start + len(line)) + int(rng.uniform(0.15, 0.8) * SAMPLE_RATE)
        previous = voice
    out = out[: max(cursor, total)]
    if spec.noise_snr_db is not None:
        speech = np.sqrt(np.mean(out[out != 0] ** 2))
        out += rng.normal(0, speech * 10 ** (-spec.noise_snr_db / 20), len(out)).astype(np.float32)
    return np.clip(out, -1, 1), turns


def speech_regions(line: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) samples of a line's speech: within SPEECH_DB of its loudest frame, pauses under
    MIN_PAUSE_S kept inside. A line can hold two sentences with a second between them, and the game's
    lines end in an underwater reverberation that decays for half a second or more: neither is
    speech."""
    import librosa

    regions: list[list[int]] = []
    for a, b in librosa.effects.split(line, top_db=SPEECH_DB, frame_length=512, hop_length=160):
        if regions and a - regions[-1][1] < MIN_PAUSE_S * SAMPLE_RATE:
            regions[-1][1] = int(b)
        else:
            regions.append([int(a), int(b)])
    return [(a, b) for a, b in regions]


def voice_lines(data: Path) -> dict[str, list[Path]]:
    """Voice name -> the files of its lines (each package unpacked once under `data`)."""
    lines: dict[str, list[Path]] = {}
    for lang, package in FISH.items():
        root = _unpacked(package, data) / "usr/share/games/fillets-ng/sound"
        for path in sorted(root.glob(f"*/{lang}/*.ogg")):
            parts = path.stem.split("-")
            fish = {"m": "small", "v": "big"}.get(parts[1]) if len(parts) > 2 else None
            if fish:
                lines.setdefault(f"fish-{lang}-{fish}", []).append(path)
    for lang, (package, folder) in ASTERISK.items():
        root = _unpacked(package, data) / "usr/share/asterisk/sounds" / folder
        lines[f"asterisk-{lang}"] = sorted(root.rglob("*.g722"))
    return lines


def _unused(paths: list[Path], used: set[Path], rng: np.random.Generator) -> Path:
    for _ in range(50):
        path = paths[rng.integers(len(paths))]
        if path not in used:
            used.add(path)
            return path
    return paths[rng.integers(len(paths))]


def _line(path: Path, data: Path) -> np.ndarray:
    """One line at 16 kHz mono, silence trimmed, at LEVEL dBFS (decoded once, cached as FLAC)."""
    import librosa

    cache = data / "lines" / f"{zlib.crc32(str(path).encode()):08x}.flac"
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        decoded = subprocess.run(
            [
                "ffmpeg",
                "-nostdin",
                "-v",
                "error",
                "-i",
                str(path),
                "-ac",
                "1",
                "-ar",
                str(SAMPLE_RATE),
                "-f",
                "f32le",
                "-",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
        samples, _ = librosa.effects.trim(np.frombuffer(decoded, dtype=np.float32), top_db=35)
        rms = np.sqrt(np.mean(samples**2)) or 1.0
        sf.write(cache, samples * 10 ** (LEVEL / 20) / rms, SAMPLE_RATE, subtype="PCM_16")
    samples, _ = sf.read(cache, dtype="float32")
    return samples


def _unpacked(package: str, data: Path) -> Path:
    root = data / "packages" / package
    if not root.exists():
        debs = data / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        if not list(debs.glob(f"{package}_*.deb")):
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True, timeout=600)
        (deb,) = debs.glob(f"{package}_*.deb")
        partial = root.with_name(root.name + ".partial")  # renamed once whole: no half-unpacked package
        partial.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True, timeout=600)
        partial.rename(root)
    return root
