"""Fit the speaker subspace the stretch split is tested in (pipeline/speaker_subspace.py).

    .venv/bin/python benchmarks/fit_speaker_subspace.py                      # writes the shipped file
    .venv/bin/python benchmarks/fit_speaker_subspace.py --leave-out dev5- --out /tmp/no-dev5.npz

Runs the embedded diarizer over the harness's dev split (cached like
`diarization_eval.py --cached`), keeps each single-speaker stretch of 1 s or
more that is over 90 % one reference voice, labels it by (file, voice), and fits
`SpeakerSubspace.fit`. Only dev: the test split's voices are never seen.
`--leave-out` drops files whose name starts with a prefix (a whole family of dev
files), so that the split's ratio can be chosen on files the projection was not
fitted on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MIN_SECONDS = 1.0  # shorter stretches' embeddings are mostly noise
MIN_PURITY = 0.9  # share of a stretch that one reference voice speaks


def labelled_stretches(leave_out: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 192) stretch embeddings of the dev files and their (file/voice) labels."""
    from diarization_eval import Evaluator, dataset, load

    from pipeline.diarization import TRUNK_FPS

    evaluator = Evaluator({"stretch_split_ratio": 0.0, "stretch_split_subspace": ""}, cache=True)
    embeddings, labels = [], []
    for file in dataset("dev"):
        if any(file.name.startswith(prefix) for prefix in leave_out):
            continue
        evaluator.run(file, load(file.audio))
        for stretch in evaluator.diarizer._pipeline._stretches:
            start, end = stretch.start / TRUNK_FPS, stretch.end / TRUNK_FPS
            if end - start < MIN_SECONDS:
                continue
            heard: dict[str, float] = {}
            for a, b, speaker in file.turns:
                heard[speaker] = heard.get(speaker, 0.0) + max(0.0, min(end, b) - max(start, a))
            voice = max(heard, key=heard.__getitem__)
            if heard[voice] > MIN_PURITY * (end - start):
                embeddings.append(stretch.embedding)
                labels.append(f"{file.name}/{voice}")
    return np.stack(embeddings), np.array(labels)


def main() -> None:
    from pipeline.speaker_subspace import SHIPPED, SpeakerSubspace

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED)
    parser.add_argument("--leave-out", nargs="*", default=[], metavar="PREFIX")
    parser.add_argument("--dims", type=int, default=60)
    parser.add_argument("--regularisation", type=float, default=10.0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    x, labels = labelled_stretches(args.leave_out)
    subspace = SpeakerSubspace.fit(x, labels, args.dims, args.regularisation)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    subspace.save(args.out)
    print(f"{len(x)} stretches of {len(set(labels))} voices -> {args.out} ({args.dims} dims)")


if __name__ == "__main__":
    main()
