"""The directions of CAM++ space in which voices differ, for the stretch split's test.

Why: the split test (`clustering.stretch_halves`) asks whether a speaker's
stretches fall in two groups further apart than one voice's stretches do.
In all 192 dimensions they seldom do: each voice's stretches spread more
than two close voices' centroids lie apart, so on dev two merged men scored
like one voice's random halves. Most of that spread lies in directions along
which voices do not differ (what was said, noise). Projected on the
directions in which speakers' means differ, measured against how much each
speaker varies along them (a regularised LDA, as PLDA back-ends do for
x-vectors), two voices stand out where one voice does not.

The projection is fitted by `benchmarks/fit_speaker_subspace.py` on the
development set's stretches, labelled by its reference; the shipped one is
`pipeline/assets/speaker_subspace.npz` (mean, basis: 192 x 60 floats).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).with_name("assets") / "speaker_subspace.npz"


@dataclass(frozen=True)
class SpeakerSubspace:
    mean: np.ndarray  # (dim,)
    basis: np.ndarray  # (dim, k)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, k) unit rows: `x`'s (n, dim) embeddings in the subspace."""
        z = (x - self.mean) @ self.basis
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-10)

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean.astype(np.float32), basis=self.basis.astype(np.float32))

    @classmethod
    def load(cls, path: Path) -> SpeakerSubspace:
        with np.load(path) as data:
            return cls(data["mean"], data["basis"])

    @classmethod
    def fit(cls, x: np.ndarray, speakers: np.ndarray, dims: int, regularisation: float) -> SpeakerSubspace:
        """LDA of embeddings `x` (n, dim) by their `speakers` (n labels): the `dims` directions
        in which speakers' means spread most against the within-speaker spread, that spread's
        eigenvalues raised by `regularisation` times their mean (large: closer to a PCA of the
        speakers' means, which trusts the fitting voices' own variation less)."""
        mean = x.mean(axis=0)
        within = np.zeros((x.shape[1], x.shape[1]))
        between = np.zeros_like(within)
        for speaker in np.unique(speakers):
            own = x[speakers == speaker]
            centre = own.mean(axis=0)
            within += (own - centre).T @ (own - centre)
            between += len(own) * np.outer(centre - mean, centre - mean)
        values, vectors = np.linalg.eigh(within / len(x))
        whiten = vectors / np.sqrt(values + regularisation * values.mean())
        _, directions = np.linalg.eigh(whiten.T @ (between / len(x)) @ whiten)
        return cls(mean, whiten @ directions[:, ::-1][:, :dims])


def load_subspace(name: str) -> SpeakerSubspace | None:
    """`embedded`: the shipped projection; a path: an .npz saved by `SpeakerSubspace.save`; empty:
    none (the test runs in CAM++'s own space)."""
    if not name:
        return None
    return SpeakerSubspace.load(SHIPPED if name == "embedded" else Path(name))
