"""Benchmark the in-process pipeline on a 10-minute two-speaker espeak-ng conversation.

    .venv/bin/python benchmarks/bench_pipeline.py [--seconds 600] [--config configs/default.yaml]

Prints per-stage seconds, real-time factors (compute seconds per audio second),
peak RSS, and DER/WER against the synthetic ground truth. Targets (2-core CPU,
embedded models): whole analysis RTF <= 0.06, diarization <= 0.025, acoustic
features <= 0.01, peak RSS <= 4 GB.

The analysis runs the acoustic tracks beside the transcription, on the same
cores, so their seconds there measure the sharing, not their cost; their
target is judged on the tracks computed again alone after the analysis
(`acoustics_alone`).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
TARGETS = {"total": 0.06, "diarization": 0.025, "acoustics": 0.01}


def make_recording(seconds: float) -> Path:
    """A two-voice espeak-ng conversation (tests/fixtures/conversations.py) of `seconds`.

    Not a script said over and over: sample-identical repeats of one sentence
    give near-identical embeddings, which the diarizer then counts as speakers
    (8 on the 10-minute looped script this benchmark used to read), and real
    speech never repeats itself sample for sample.
    """
    stem = DATA / f"conversation_{int(seconds)}"
    if not stem.with_suffix(".flac").exists():
        DATA.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(ROOT))  # the fixture scripts are not a package
        from dataclasses import asdict

        from tests.fixtures.conversations import ConversationSpec, conversation
        from tests.fixtures.make_fixtures import write

        spec = ConversationSpec(stem.name, seed=600, speakers=2, minutes=seconds / 60, split="test")
        audio, turns, _ = conversation(spec)
        truth = {"language": "en", "duration": len(audio) / 16_000, "turns": [asdict(t) for t in turns]}
        write(stem, audio, truth)
    return stem


def scores(result, truth: dict) -> dict[str, float]:
    import jiwer
    from pyannote.core import Annotation, Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    ref, hyp = Annotation(), Annotation()
    for t in truth["turns"]:
        ref[Segment(t["start"], t["end"])] = t["speaker"]
    for s in result.segments:
        hyp[Segment(s.start_time, s.end_time)] = s.speaker.speaker_id

    def words(text: str) -> str:
        return " ".join(re.sub(r"[^a-z' ]+", " ", text.lower()).split())

    end = truth["turns"][-1]["end"]
    said = " ".join(t["text"] for t in truth["turns"])
    heard = " ".join(s.text for s in result.segments if s.start_time < end)
    return {"der": DiarizationErrorRate()(ref, hyp), "wer": jiwer.wer(words(said), words(heard))}


def acoustics_alone(stem: Path, settings) -> float:
    """Seconds the acoustic tracks of the recording take with the machine to themselves."""
    import soundfile as sf

    from pipeline.acoustics import frame_tracks

    samples, _ = sf.read(stem.with_suffix(".flac"), dtype="float32")  # 16 kHz mono, as the analysis has it
    t = time.perf_counter()
    frame_tracks(samples, settings.acoustics)
    return time.perf_counter() - t


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--config", type=Path)
    args = parser.parse_args()

    from pipeline.analyzer import AnalysisOptions, Analyzer
    from pipeline.config import load_settings

    stem = make_recording(args.seconds)
    truth = json.loads(stem.with_suffix(".json").read_text())
    t0 = time.perf_counter()
    settings = load_settings(args.config)
    settings.media.local_roots = [DATA]
    analyzer = Analyzer(settings)
    load_s = time.perf_counter() - t0
    result = analyzer.analyze(str(stem.with_suffix(".flac")), AnalysisOptions())
    duration = result.duration
    stages = dict(result.metadata.stage_timings)
    report = {
        "audio_s": duration,
        "model_load_s": round(load_s, 2),
        "stages_s": stages,
        "rtf": {k: round(v / duration, 4) for k, v in stages.items()}
        | {"total": round(result.metadata.processing_time / duration, 4)},
        "processing_s": result.metadata.processing_time,
        "peak_rss_mb": round(peak_rss_mb()),
        "speakers": len(result.speakers),
        **{k: round(v, 4) for k, v in scores(result, truth).items()},
    }
    report["rtf"]["acoustics_alone"] = round(acoustics_alone(stem, settings) / duration, 4)
    print(json.dumps(report, indent=2))
    for key, target in TARGETS.items():
        key = "acoustics_alone" if key == "acoustics" else key
        verdict = "ok" if report["rtf"][key] <= target else "MISSED"
        print(f"{key:15s} RTF {report['rtf'][key]:.4f} (target <= {target}) {verdict}")
    rss = report["peak_rss_mb"]
    print(f"peak RSS        {rss} MB (target <= 4096) {'ok' if rss <= 4096 else 'MISSED'}")


if __name__ == "__main__":
    main()
