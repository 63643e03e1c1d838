"""Diarization evaluation on generated conversations and a real call.

    .venv/bin/python benchmarks/diarization_eval.py --split test            # report (held-out voices)
    .venv/bin/python benchmarks/diarization_eval.py --split dev --sweep merge_ratio=0.95,0.97,0.99
    .venv/bin/python benchmarks/diarization_eval.py --split test --peer      # also run senko on each file
    .venv/bin/python benchmarks/diarization_eval.py --split test --words     # word-speaker accuracy (runs ASR)

The files come from tests/fixtures/conversations.py (`eval_specs`): 2-6 espeak-ng
voices, same-sex pairs with close pitch, gains within +/-10 dB, back-channels,
overlap, noise at 10-20 dB SNR, 1-15 minutes; the dev and test splits use
disjoint voice variants and seeds. `--split test` adds the real two-speaker
telephone call that ships with pyannote.audio (`sample.wav` + `sample.rttm`).
Parameters are chosen on `dev` and reported on `test`.

`--split real` is recorded speech only, on which no parameter was chosen: the
telephone call; VoxConverse's test file `aepyx` (169 s of a TV debate, 4 voices;
the audio from silero-vad's source distribution on PyPI, the reference in
benchmarks/references/); and the 30 s excerpts of AMI meetings (far-field
microphones) with reference turns in pyannote.audio's source distribution, those
with 10 s of reference speech or more. The two sdists are downloaded from PyPI
once and checked by hash.

`--split voices` is conversations spliced from studio recordings of eight real
people (benchmarks/real_voices.py): real voices, exact references.
`--split voices-dev` is spliced the same way from sixteen other people, for
choosing parameters on real voices; `voices` stays held out.

Per file and in total: DER (pyannote.metrics, collar 0 and 0.25 s), speakers
found vs true; in total, the voices found (a voice whose speaker under DER's
one-to-one mapping holds half its speech or more; a right count can hide one
voice split and two merged), word-speaker accuracy (with --words: Whisper's words, assigned to
speakers as the product does, against the speaker speaking at each word's middle),
and the diarization real-time factor (seconds per audio second, 2 cores).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import os
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data" / "diarization"
SAMPLE_RATE = 16_000


@dataclass
class EvalFile:
    name: str
    audio: Path
    turns: list[tuple[float, float, str]]  # reference (start, end, speaker)
    synthetic: bool


def dataset(split: str) -> list[EvalFile]:
    if split == "real":
        return recorded()
    if split.startswith("voices"):
        return spliced(split)
    sys.path.insert(0, str(ROOT))  # a script, not a package: reach the fixture generator
    from tests.fixtures.conversations import conversation, eval_specs

    DATA.mkdir(parents=True, exist_ok=True)
    files = []
    for spec in eval_specs():
        if spec.split != split:
            continue
        audio, truth = DATA / f"{spec.name}.flac", DATA / f"{spec.name}.json"
        if not truth.exists():
            samples, turns, _ = conversation(spec)
            sf.write(audio, samples, SAMPLE_RATE, subtype="PCM_16")
            truth.write_text(json.dumps([[t.start, t.end, t.speaker] for t in turns]))
        files.append(EvalFile(spec.name, audio, [tuple(t) for t in json.loads(truth.read_text())], True))
    if split == "test":
        files.append(real_call())
    return files


# Source distributions on PyPI that carry recorded speech, pinned by hash.
SDISTS = {
    "pyannote_audio-4.0.7.tar.gz": (
        "https://files.pythonhosted.org/packages/6d/d7/03b1d00d431c7be1d98635fefb99c2da64d9b84b4b8a06d5302666a96c88/",
        "3a903dfb5ca711d134cc2522561c9158b186836f5d62e8a57c46c6648e8a8229",
    ),
    "silero_vad-6.2.3.tar.gz": (
        "https://files.pythonhosted.org/packages/32/17/df6bfc8f659fc5c1e082c18275be67c5a581bd2d07734a65b141fc983ccf/",
        "d7a23b09202be4953915cb9173089bb307eed0418a9bd4794d9ec5af07fa1996",
    ),
}
MIN_REAL_SPEECH_S = 10.0  # AMI excerpts with less reference speech (0.7-6 s for 3-4 voices) say nothing


def recorded() -> list[EvalFile]:
    """The `real` split: the telephone call, VoxConverse's `aepyx` and AMI excerpts (see the module's doc)."""
    silero = _sdist_member("silero_vad-6.2.3.tar.gz", "examples/cpp_libtorch/aepyx.wav", "voxconverse-aepyx.wav")
    files = [
        real_call(),
        EvalFile(
            "voxconverse-aepyx", silero, _rttm(ROOT / "benchmarks/references/voxconverse-aepyx.rttm")["aepyx"], False
        ),
    ]
    references: dict[str, list[tuple[float, float, str]]] = {}
    for part in ("train", "development", "test"):
        rttm = _sdist_member("pyannote_audio-4.0.7.tar.gz", f"tests/data/debug.{part}.rttm", f"ami-{part}.rttm")
        references.update(_rttm(rttm))
    for uri, turns in sorted(references.items()):
        if sum(end - start for start, end, _ in turns) < MIN_REAL_SPEECH_S:
            continue
        # The sdist names one file "trñ00.wav" (pyannote tests unicode names); its RTTM says trn00.
        member = f"tests/data/{uri.replace('trn00', 'trñ00')}.wav"
        wav = _sdist_member("pyannote_audio-4.0.7.tar.gz", member, f"ami-{uri}.wav")
        files.append(EvalFile(f"ami-{uri}", wav, turns, False))
    return files


def spliced(split: str) -> list[EvalFile]:
    """The `voices` and `voices-dev` splits: conversations spliced from real people's recorded lines
    (see real_voices.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from real_voices import conversation, voice_specs

    data = DATA / "voices"
    files = []
    for spec in voice_specs(split):
        audio, truth = data / f"{spec.name}.flac", data / f"{spec.name}.json"
        if not truth.exists():
            samples, turns = conversation(spec, data)
            sf.write(audio, samples, SAMPLE_RATE, subtype="PCM_16")
            truth.write_text(json.dumps(turns))
        files.append(EvalFile(spec.name, audio, [tuple(t) for t in json.loads(truth.read_text())], False))
    return files


def _sdist_member(sdist: str, member: str, name: str) -> Path:
    """`member` of a pinned PyPI sdist, extracted once to DATA/real/`name`."""
    import tarfile
    import urllib.request

    out = DATA / "real" / name
    if out.exists():
        return out
    archive = DATA / "real" / sdist
    out.parent.mkdir(parents=True, exist_ok=True)
    if not archive.exists():
        url, sha256 = SDISTS[sdist]
        with urllib.request.urlopen(url + sdist, timeout=300) as response:
            data = response.read()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise RuntimeError(f"{sdist} from PyPI does not match its pinned hash")
        archive.write_bytes(data)
    with tarfile.open(archive) as tar:
        found = next(m for m in tar.getmembers() if m.name.split("/", 1)[-1] == member)
        out.write_bytes(tar.extractfile(found).read())
    return out


def _rttm(path: Path) -> dict[str, list[tuple[float, float, str]]]:
    turns: dict[str, list[tuple[float, float, str]]] = {}
    for line in path.read_text().splitlines():
        f = line.split()
        turns.setdefault(f[1], []).append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return turns


def real_call() -> EvalFile:
    from pipeline.embedded import package_dir

    sample = package_dir("pyannote.audio") / "sample"
    (turns,) = _rttm(sample / "sample.rttm").values()
    return EvalFile("real-call-2spk-30s", sample / "sample.wav", turns, False)


def load(path: Path) -> np.ndarray:
    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        import soxr

        samples = soxr.resample(samples, rate, SAMPLE_RATE)
    return np.ascontiguousarray(samples, dtype=np.float32)


def annotation(turns) -> Any:
    from pyannote.core import Annotation, Segment

    ann = Annotation()
    for i, (start, end, speaker) in enumerate(turns):
        ann[Segment(start, end), i] = speaker
    return ann


def scores(ref_turns, hyp_turns, words=None) -> dict[str, float]:
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref, hyp = annotation(ref_turns), annotation(hyp_turns)
    mapping = DiarizationErrorRate().optimal_mapping(ref, hyp)
    out = {
        "der": DiarizationErrorRate(collar=0.0)(ref, hyp),
        "der_collar": DiarizationErrorRate(collar=0.25)(ref, hyp),
        "true": len(ref.labels()),
        "found": len(hyp.labels()),
        "voices_found": voices_found(ref, hyp, mapping),
    }
    if words is not None:
        out["word_acc"] = word_accuracy(ref_turns, words, mapping)
    return out


def voices_found(ref, hyp, mapping: dict) -> int:
    """Reference voices whose speaker under DER's one-to-one mapping holds half of their speech or more.

    The count alone can be right by two wrongs: one voice split in two, two
    others merged in one."""
    found = 0
    for hyp_label, ref_label in mapping.items():
        voice = ref.label_timeline(ref_label).support()
        speaker = hyp.label_timeline(hyp_label).support()
        shared = sum((a & b).duration for a in voice for b in speaker if a.intersects(b))
        found += shared >= 0.5 * voice.duration()
    return found


def word_accuracy(ref_turns, words: list[tuple[float, float, str | None]], mapping: dict) -> float:
    """Share of words whose speaker is one speaking at the word's middle (nearest turn if none)."""
    if not words:
        return float("nan")
    right = 0
    for start, end, speaker in words:
        mid = (start + end) / 2
        speaking = {s for a, b, s in ref_turns if a <= mid <= b}
        if not speaking:
            speaking = {min(ref_turns, key=lambda t: min(abs(t[0] - mid), abs(t[1] - mid)))[2]}
        right += mapping.get(speaker) in speaking
    return right / len(words)


class Evaluator:
    """One diarizer. With `cache`, segmentation and embeddings are kept on disk per
    file and segmentation setting, so a sweep of clustering parameters (or a
    second run) re-runs only clustering; its RTF column then means nothing."""

    def __init__(self, overrides: dict[str, Any], cache: bool, given_count: str | None = None) -> None:
        from pipeline.config import Settings
        from pipeline.diarization import PyannoteDiarizer

        self.settings = Settings(diarization=overrides)
        # "num", "min" or "max": each file's true count is given as `num_speakers`, `min_speakers` or
        # `max_speakers`, as a user who knows it would.
        self.given_count = given_count
        self.diarizer = PyannoteDiarizer(self.settings.diarization)
        d = self.settings.diarization
        # Keyed by what segmentation and embeddings depend on: the settings and the code.
        code = b"".join((ROOT / "pipeline" / f).read_bytes() for f in ("diarization.py", "campplus.py"))
        int8 = "-int8" if d.segmentation_int8 else ""
        key = f"{d.segmentation}{int8}-{d.segmentation_step:g}-{hashlib.sha1(code).hexdigest()[:10]}"
        self._cache = DATA / "cache" / key if cache else None
        pipeline = self.diarizer._pipeline
        if self._cache:
            self._cache.mkdir(parents=True, exist_ok=True)
            for step in ("get_segmentations", "get_embeddings"):
                setattr(pipeline, step, self._memoised(step, getattr(pipeline, step)))

    def _memoised(self, step: str, fn):
        pipeline = self.diarizer._pipeline

        def call(file, *args, **kwargs):
            # With the result, what the step left on the pipeline for later steps (its stretches).
            path = self._cache / f"{file['uri']}.{step}.pickle"
            if not path.exists():
                result = fn(file, *args, **kwargs)
                state = {k: v for k, v in vars(pipeline).items() if k in ("_stretches", "_embeddings")}
                path.write_bytes(pickle.dumps((result, state)))
            result, state = pickle.loads(path.read_bytes())
            for key, value in state.items():
                setattr(pipeline, key, value)
            return result

        return call

    def set_params(self, **params: float) -> None:
        """Clustering hyper-parameters by name (`merge_ratio`), others by path (`segmentation.min_duration_off`)."""
        for key, value in params.items():
            owner_name, _, name = key.rpartition(".")
            owner = getattr(self.diarizer._pipeline, owner_name or "clustering")
            if name not in owner.parameters(instantiated=True):  # pyannote would store any name silently
                raise SystemExit(f"{key} is not a hyper-parameter of this pipeline")
            setattr(owner, name, value)

    def run(self, file: EvalFile, samples: np.ndarray) -> tuple[list[tuple[float, float, str]], float]:
        import torch

        counts = {}
        if self.given_count:
            counts[f"{self.given_count}_speakers"] = len({speaker for _, _, speaker in file.turns})
        t = time.perf_counter()
        audio = {"waveform": torch.from_numpy(samples)[None], "sample_rate": SAMPLE_RATE, "uri": file.name}
        output = self.diarizer._pipeline(audio, **counts)
        seconds = time.perf_counter() - t
        ann = getattr(output, "speaker_diarization", output)
        return [(s.start, s.end, str(label)) for s, _, label in ann.itertracks(yield_label=True)], seconds


def senko_turns(samples: np.ndarray) -> tuple[list[tuple[float, float, str]], float]:
    """The peer: senko 0.2.2 on CPU, as its README runs it."""
    diarizer = _senko()
    t = time.perf_counter()
    result = diarizer.diarize_samples(samples, SAMPLE_RATE, generate_colors=False)
    seconds = time.perf_counter() - t
    return [(s["start"], s["end"], str(s["speaker"])) for s in result["merged_segments"]], seconds


@functools.cache
def _senko() -> Any:
    import senko

    return senko.Diarizer(device="cpu", warmup=True, quiet=True)


@functools.cache
def _transcriber() -> Any:
    from pipeline.asr import WhisperXTranscriber
    from pipeline.config import Settings

    settings = Settings()
    return WhisperXTranscriber(settings.asr, settings.cache_dir)


def asr_words(file: EvalFile, samples: np.ndarray) -> list[tuple[float, float]]:
    """Whisper's words with times, cached beside the audio (ASR does not depend on diarization)."""
    cache = DATA / f"{file.name}.words.json"
    if not cache.exists():
        transcript = _transcriber().transcribe(samples, "en")
        cache.write_text(json.dumps([[w.start, w.end] for w in transcript.words]))
    return [tuple(w) for w in json.loads(cache.read_text())]


def speakers_of_words(words, hyp_turns) -> list[tuple[float, float, str | None]]:
    from pipeline.assembly import speaker_of
    from pipeline.diarization import SpeakerTurn

    turns = [SpeakerTurn(a, b, s) for a, b, s in hyp_turns]
    return [(a, b, speaker_of(a, b, turns) if turns else None) for a, b in words]


def evaluate(files, runner, with_words: bool) -> list[dict[str, Any]]:
    rows = []
    for file in files:
        samples = load(file.audio)
        hyp, seconds = runner(file, samples)
        words = speakers_of_words(asr_words(file, samples), hyp) if with_words else None
        row = {"file": file.name, "synthetic": file.synthetic, **scores(file.turns, hyp, words)}
        row["rtf"] = seconds / (len(samples) / SAMPLE_RATE)
        row["duration"] = len(samples) / SAMPLE_RATE
        rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    synthetic = [r for r in rows if r["synthetic"]]
    audio = sum(r["duration"] for r in rows)
    out = {
        "files": len(rows),
        "count_exact": float(np.mean([r["found"] == r["true"] for r in rows])),
        "voices_found": float(sum(r["voices_found"] for r in rows) / sum(r["true"] for r in rows)),
        "mean_der_synthetic": float(np.mean([r["der"] for r in synthetic])) if synthetic else float("nan"),
        "mean_der_collar_synthetic": float(np.mean([r["der_collar"] for r in synthetic]))
        if synthetic
        else float("nan"),
        "rtf": float(sum(r["rtf"] * r["duration"] for r in rows) / audio),
    }
    recorded = [r for r in rows if not r["synthetic"]]
    if len(recorded) > 1:
        out["mean_der_recorded"] = float(np.mean([r["der"] for r in recorded]))
    if all("word_acc" in r for r in rows):
        out["word_acc"] = float(np.mean([r["word_acc"] for r in rows]))
    return out


def print_table(title: str, rows: list[dict[str, Any]], flush: bool = False) -> None:
    print(f"\n{title}")
    print("| file | min | speakers (true/found) | DER | DER (collar 0.25) | word-speaker acc. | RTF |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{100 * r['word_acc']:.1f} %" if "word_acc" in r else "-"
        print(
            f"| {r['file']} | {r['duration'] / 60:.1f} | {r['true']}/{r['found']} | {100 * r['der']:.1f} % "
            f"| {100 * r['der_collar']:.1f} % | {acc} | {r['rtf']:.3f} |"
        )
    s = summary(rows)
    print(
        f"| **total** ({s['files']} files) | | exact on {100 * s['count_exact']:.0f} % | "
        f"{100 * s['mean_der_synthetic']:.1f} % (synthetic mean) | {100 * s['mean_der_collar_synthetic']:.1f} % | "
        + (f"{100 * s['word_acc']:.1f} % |" if "word_acc" in s else "- |")
        + f" {s['rtf']:.3f} |",
        flush=flush,
    )
    if "mean_der_recorded" in s:
        print(f"mean DER of the recorded files: {100 * s['mean_der_recorded']:.1f} %", flush=flush)
    found = sum(r["voices_found"] for r in rows)
    print(
        f"voices found (their speaker holds half their speech or more): {found} of {sum(r['true'] for r in rows)} "
        f"({100 * s['voices_found']:.0f} %); every voice found in {sum(r['voices_found'] == r['true'] for r in rows)} "
        f"of {len(rows)} files",
        flush=flush,
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, value = item.split("=", 1)
        out[key] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["dev", "test", "real", "voices", "voices-dev"], default="test")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="diarization settings")
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="PARAM=A,B,...",
        help="values to try: clustering ones by name (merge_ratio), others by path (segmentation.min_duration_off)",
    )
    parser.add_argument("--peer", action="store_true", help="also run senko on each file")
    parser.add_argument("--words", action="store_true", help="word-speaker accuracy (runs Whisper once per file)")
    parser.add_argument("--cached", action="store_true", help="reuse segmentation and embeddings from disk")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--only", help="substring of the file names to keep")
    parser.add_argument(
        "--given-count",
        choices=["num", "min", "max"],
        help="give our diarizer each file's true speaker count as num_speakers, min_speakers or max_speakers",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    files = [f for f in dataset(args.split) if not args.only or args.only in f.name]
    evaluator = Evaluator(
        parse_overrides(args.set), cache=bool(args.sweep) or args.cached, given_count=args.given_count
    )
    results: dict[str, list[dict[str, Any]]] = {}
    if args.sweep:  # every combination; segmentation and embeddings are computed once per file
        grid = [[(k, float(v)) for v in values.split(",")] for k, values in (s.split("=") for s in args.sweep)]
        for combination in itertools.product(*grid):
            evaluator.set_params(**dict(combination))
            label = " ".join(f"{k}={v:g}" for k, v in combination)
            results[f"ours {label}"] = evaluate(files, evaluator.run, args.words)
            print_table(f"ours {label} ({args.split} split)", results[f"ours {label}"], flush=True)
    else:
        results["ours"] = evaluate(files, evaluator.run, args.words)
    if args.peer:
        results["senko 0.2.2"] = evaluate(files, lambda _, s: senko_turns(s), args.words)
    for title, rows in results.items():
        if not args.sweep or title.startswith("senko"):
            print_table(f"{title} ({args.split} split)", rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
