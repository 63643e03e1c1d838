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

`--split voices-dev` is built the same way from sixteen *other* people, for
choosing parameters on real voices without looking at the eight above:

- Asterisk's community prompts: Armelle (French), the Colombian Spanish set
  and Marilena Menardi (Italian), 8 kHz (`asterisk-prompt-fr-armelle`,
  `-es-co`, `-it-menardi-wav`; GPL-2 / CC BY-SA);
- the Russian speaker of Festival's `festvox-ru` voice database (BSD-like);
- the words KTuberling says in eight languages, each recorded by one
  translator (de, el, en, gl, lt, nn, sl, wa; `ktuberling-data`, GPL-2+), and
  the four voices of the mahjong calls in `kajongg` (GPL-2+): single words,
  so a line is one to four of them with short gaps.

KTuberling's da, ru, ca, fr and uk sets are left out: their words fall in two
groups CAM++ scores as two people (cross 0.38-0.51 against 0.54-0.67 within).
Every other pair of the sixteen scores 0.35 or less across, 0.5 or more within.
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
# The other people, for --split voices-dev: (package, folder, glob) per voice.
DEV_SENTENCES = {
    "armelle-fr": ("asterisk-prompt-fr-armelle", "usr/share/asterisk/sounds/fr", "*.gsm"),
    "asterisk-es-co": ("asterisk-prompt-es-co", "usr/share/asterisk/sounds/es", "*.gsm"),
    "menardi-it": ("asterisk-prompt-it-menardi-wav", "usr/share/asterisk/sounds/it_IT_f_Menardi", "*.wav"),
    "festvox-ru": ("festvox-ru", "usr/share/festival/voices/russian/msu_ru_nsh_clunits/wav", "*.wav"),
}
DEV_WORDS = {
    **{
        f"ktuberling-{lang}": ("ktuberling-data", f"usr/share/ktuberling/sounds/{lang}", "*.*")
        for lang in ("de", "el", "en", "gl", "lt", "nn", "sl", "wa")
    },
    **{
        f"kajongg-{voice}": ("kajongg", f"usr/share/kajongg/voices/{voice}", "*.ogg")
        for voice in ("male1", "male2", "female1", "female2")
    },
}
WORD_GAP_S = 0.2  # between the words of one line
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
    people: str = "test"  # whose voices: the eight of the test split, or the sixteen of dev


def voice_specs(split: str = "voices") -> list[VoiceSpec]:
    """`voices`: 24 conversations, 2-5 voices, 1-3 minutes. `voices-dev`: 48, 2-6 voices, 1-4
    minutes, of other people. Half of each with noise at 15-20 dB SNR."""
    if split == "voices-dev":
        return _specs("voicesdev", 48, 5, [1.0, 1.5, 2.0, 3.0, 4.0], 2026_12_08, 5000, "dev")
    return _specs("voices", 24, 4, [1.0, 1.5, 2.0, 3.0], 2026_12_07, 1000, "test")


def _specs(prefix: str, n: int, counts: int, lengths: list[float], seed: int, first: int, people: str):
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(n):
        voices = 2 + i % counts
        minutes = float(rng.choice(lengths))
        snr = float(rng.uniform(15, 20)) if i % 2 else None
        name = f"{prefix}-{i:02d}-{voices}spk-{minutes:g}min" + (f"-snr{snr:.0f}" if snr else "")
        specs.append(VoiceSpec(name, first + i, voices, minutes, snr, people))
    return specs


def conversation(spec: VoiceSpec, data: Path) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """(16 kHz samples, reference turns) of one spliced conversation."""
    rng = np.random.default_rng(spec.seed)
    lines = voice_lines(data) if spec.people == "test" else dev_voice_lines(data)
    names = sorted(lines)
    chosen = [names[i] for i in rng.choice(len(names), spec.voices, replace=False)]
    gains = {v: float(rng.uniform(-6, 6)) for v in chosen}
    total = int(spec.minutes * 60 * SAMPLE_RATE)
    out = np.zeros(total + 30 * SAMPLE_RATE, dtype=np.float32)
    turns: list[tuple[float, float, str]] = []  # the reference: each line's speech
    starts: list[int] = []  # where each line starts, in samples
    used: set[tuple[Path, ...]] = set()
    cursor, previous = int(0.5 * SAMPLE_RATE), None
    while cursor < total:
        others = [v for v in chosen if v != previous]
        if len(starts) < len(chosen):  # every voice speaks, the first turns in a random order
            voice = chosen[len(starts)]
        elif previous and rng.random() < 0.1:  # the same voice again after a pause
            voice = previous
        else:
            voice = others[rng.integers(len(others))]
        line = _line(_unused(lines[voice], used, rng), data) * 10 ** (gains[voice] / 20)
        if not len(line):  # a file that does not decode
            continue
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


def voice_lines(data: Path) -> dict[str, list[tuple[Path, ...]]]:
    """Voice name -> the files of its lines, one file a line (each package unpacked once under `data`)."""
    lines: dict[str, list[tuple[Path, ...]]] = {}
    for lang, package in FISH.items():
        root = _unpacked(package, data) / "usr/share/games/fillets-ng/sound"
        for path in sorted(root.glob(f"*/{lang}/*.ogg")):
            parts = path.stem.split("-")
            fish = {"m": "small", "v": "big"}.get(parts[1]) if len(parts) > 2 else None
            if fish:
                lines.setdefault(f"fish-{lang}-{fish}", []).append((path,))
    for lang, (package, folder) in ASTERISK.items():
        root = _unpacked(package, data) / "usr/share/asterisk/sounds" / folder
        lines[f"asterisk-{lang}"] = [(path,) for path in sorted(root.rglob("*.g722"))]
    return lines


def dev_voice_lines(data: Path) -> dict[str, list[tuple[Path, ...]]]:
    """The same for the development people: a word list's lines are one to four of its words,
    grouped by a generator seeded with the voice's name."""
    lines: dict[str, list[tuple[Path, ...]]] = {}
    for voice, (package, folder, pattern) in DEV_SENTENCES.items():
        lines[voice] = [(path,) for path in sorted((_unpacked(package, data) / folder).glob(pattern))]
    for voice, (package, folder, pattern) in DEV_WORDS.items():
        paths = [p for p in sorted((_unpacked(package, data) / folder).glob(pattern)) if p.suffix != ".txt"]
        paths = [p for p in paths if p.name != "COPYRIGHT"]
        rng = np.random.default_rng(zlib.crc32(voice.encode()))
        order = [paths[i] for i in rng.permutation(len(paths))]
        groups = []
        while order:
            size = int(rng.integers(1, 5))
            groups.append(tuple(order[:size]))
            order = order[size:]
        lines[voice] = groups
    return lines


def _unused(lines: list[tuple[Path, ...]], used: set[tuple[Path, ...]], rng: np.random.Generator) -> tuple[Path, ...]:
    for _ in range(50):
        line = lines[rng.integers(len(lines))]
        if line not in used:
            used.add(line)
            return line
    return lines[rng.integers(len(lines))]


def _line(paths: tuple[Path, ...], data: Path) -> np.ndarray:
    """One line at 16 kHz mono at LEVEL dBFS: its files' speech, WORD_GAP_S apart (empty if none decodes)."""
    pieces = [piece for path in paths if len(piece := _recording(path, data))]
    if len(pieces) < 2:
        return pieces[0] if pieces else np.zeros(0, dtype=np.float32)
    gap = np.zeros(int(WORD_GAP_S * SAMPLE_RATE), dtype=np.float32)
    line = np.concatenate([x for piece in pieces for x in (piece, gap)][:-1])
    return line * 10 ** (LEVEL / 20) / np.sqrt(np.mean(line**2))


def _recording(path: Path, data: Path) -> np.ndarray:
    """One file at 16 kHz mono, silence trimmed, at LEVEL dBFS (decoded once, cached as FLAC);
    empty if it does not decode."""
    import librosa

    cache = data / "lines" / f"{zlib.crc32(str(path).encode()):08x}.flac"
    broken = cache.with_suffix(".undecodable")
    if broken.exists():
        return np.zeros(0, dtype=np.float32)
    if not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        command = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-ac", "1", "-ar", str(SAMPLE_RATE)]
        decoded = subprocess.run([*command, "-f", "f32le", "-"], capture_output=True, timeout=60)
        samples = np.frombuffer(decoded.stdout, dtype=np.float32)
        if decoded.returncode or len(samples) < SAMPLE_RATE // 10:
            broken.touch()
            return np.zeros(0, dtype=np.float32)
        samples, _ = librosa.effects.trim(samples, top_db=35)
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
