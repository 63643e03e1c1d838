"""Stage 3, speaker diarization with pyannote.audio.

Two sources of pipeline:

- `embedded` (default, offline): pyannote's own `SpeakerDiarization` with a
  pyannote segmentation model and the CAM++ speaker encoder, both shipped in
  PyPI wheels (see pipeline/embedded.py), and agglomerative clustering. Its
  embedding step is replaced by a faster equivalent
  (`EmbeddedSpeakerDiarization.get_embeddings`).
- any pretrained pyannote pipeline by hub name or local path, e.g.
  `pyannote/speaker-diarization-3.1` with an HF token.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.config import DiarizationSettings, check_device, resolve_device
from pipeline.errors import InputError, ModelError
from pipeline.media import SAMPLE_RATE
from pipeline.progress import ProgressHook, no_progress
from pipeline.speaker_subspace import SpeakerSubspace, load_subspace

log = logging.getLogger(__name__)
STAGE = "diarization"
EMBEDDED_NAME = "embedded:pyannote-segmentation+campplus"


@dataclass(frozen=True)
class SpeakerTurn:
    start: float
    end: float
    speaker: str


@dataclass
class Diarization:
    turns: list[SpeakerTurn]
    model: str
    device: str = "cpu"

    def speaking_time(self) -> dict[str, float]:
        """Seconds per speaker; overlapped speech counts for each speaker in it."""
        totals: dict[str, float] = {}
        for t in self.turns:
            totals[t.speaker] = totals.get(t.speaker, 0.0) + (t.end - t.start)
        return totals


class Diarizer(Protocol):
    model_name: str
    device: str

    def diarize(
        self,
        samples: np.ndarray,
        num_speakers: int | None,
        min_speakers: int | None,
        max_speakers: int | None,
        progress: ProgressHook,
    ) -> Diarization: ...


def check_speaker_counts(num: int | None, lo: int | None, hi: int | None) -> None:
    for name, value in (("num_speakers", num), ("min_speakers", lo), ("max_speakers", hi)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    if lo is not None and hi is not None and lo > hi:
        raise InputError(f"min_speakers ({lo}) is larger than max_speakers ({hi})")


class PyannoteDiarizer:
    """Owns one pyannote pipeline; diarizes one file per call."""

    def __init__(self, settings: DiarizationSettings) -> None:
        import torch

        self.device = resolve_device(settings.device)
        if settings.pipeline == "embedded":
            self._pipeline = build_embedded_pipeline(settings)
            self.model_name = EMBEDDED_NAME
        else:
            self._pipeline = load_pretrained_pipeline(settings)
            self.model_name = settings.pipeline
        self._pipeline.to(torch.device(self.device))
        if settings.pipeline == "embedded" and settings.onnxruntime and self.device == "cpu":
            from pipeline.onnx_runtime import campplus_on_onnxruntime, segmentation_on_onnxruntime

            threads = settings.cpu_threads or os.cpu_count() or 1
            segmentation_on_onnxruntime(self._pipeline._segmentation.model, threads, settings.segmentation_int8)
            campplus_on_onnxruntime(self._pipeline._embedding.model_.encoder, threads)

    def check(self) -> None:
        """ModelError unless the pipeline's device still computes (no inference)."""
        try:
            check_device(self.device)
        except Exception as e:
            raise ModelError(f"diarization on {self.device} does not answer: {type(e).__name__}: {e}") from e

    def diarize(
        self,
        samples: np.ndarray,
        num_speakers: int | None = None,
        min_speakers: int | None = None,
        max_speakers: int | None = None,
        progress: ProgressHook = no_progress,
    ) -> Diarization:
        import torch

        check_speaker_counts(num_speakers, min_speakers, max_speakers)
        progress(STAGE, 0.0, "finding speakers")
        # In-memory waveform: pyannote then never decodes a file (no torchcodec/FFmpeg libraries needed).
        file = {"waveform": torch.from_numpy(samples)[None], "sample_rate": SAMPLE_RATE, "uri": "input"}
        output = self._pipeline(
            file,
            num_speakers=num_speakers,
            min_speakers=min_speakers,
            max_speakers=max_speakers,
            hook=_pyannote_hook(progress),
        )
        annotation = getattr(output, "speaker_diarization", output)
        turns = [
            SpeakerTurn(round(seg.start, 3), round(seg.end, 3), str(label))
            for seg, _, label in annotation.itertracks(yield_label=True)
        ]
        progress(STAGE, 1.0, f"found {len({t.speaker for t in turns})} speakers")
        return Diarization(relabel(turns), self.model_name, self.device)


def relabel(turns: list[SpeakerTurn]) -> list[SpeakerTurn]:
    """SPEAKER_00, SPEAKER_01... in order of first appearance, whatever the pipeline called them."""
    names: dict[str, str] = {}
    for t in sorted(turns, key=lambda t: t.start):
        names.setdefault(t.speaker, f"SPEAKER_{len(names):02d}")
    return sorted((SpeakerTurn(t.start, t.end, names[t.speaker]) for t in turns), key=lambda t: (t.start, t.end))


# pyannote's steps and their share of its time, for progress reporting.
_STEPS = {"segmentation": (0.0, 0.3), "speaker_counting": (0.3, 0.35), "embeddings": (0.35, 0.9)}


def _pyannote_hook(progress: ProgressHook) -> Callable[..., None]:
    def hook(step: str, artifact: Any, file: Any = None, completed: int | None = None, total: int | None = None):
        lo, hi = _STEPS.get(step, (0.9, 0.95))
        done = 1.0 if not total else (completed or 0) / total
        progress(STAGE, lo + (hi - lo) * done, f"diarization: {step.replace('_', ' ')}")

    return hook


def load_pretrained_pipeline(settings: DiarizationSettings) -> Any:
    from pyannote.audio import Pipeline

    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    try:
        pipeline = Pipeline.from_pretrained(settings.pipeline, token=token)
    except Exception as e:  # hub, auth and file errors all mean "no pipeline"
        # The message names the pipeline, never the token.
        raise ModelError(f"could not load diarization pipeline {settings.pipeline!r}: {type(e).__name__}") from e
    if pipeline is None:  # pyannote returns None for gated models without a token
        raise ModelError(f"diarization pipeline {settings.pipeline!r} needs an accepted licence and an HF token")
    return pipeline


def build_embedded_pipeline(settings: DiarizationSettings) -> Any:
    from pyannote.audio import Model

    from pipeline.embedded import campplus_checkpoint, segmentation_checkpoint

    segmentation = Model.from_pretrained(str(segmentation_checkpoint(settings.segmentation)))
    pipeline = _embedded_pipeline_class()(
        segmentation=segmentation,
        segmentation_step=settings.segmentation_step,
        embedding=_campplus_model(campplus_checkpoint()),
        plda=_no_plda(),
        clustering="AgglomerativeClustering",
        segmentation_batch_size=settings.segmentation_batch_size,
    )
    pipeline.reassign_stretches = settings.reassign_stretches
    pipeline.windowed_from = round(settings.window_reassign_s * TRUNK_FPS)
    pipeline.edge_trim = (settings.onset_trim, settings.offset_trim)
    pipeline.stretch_split = (settings.stretch_split_ratio, settings.stretch_split_seconds)
    pipeline.subspace = load_subspace(settings.stretch_split_subspace)
    params: dict[str, Any] = {"min_duration_off": settings.min_duration_off}
    if not segmentation.specifications.powerset:  # a multi-label model's activations need a threshold
        params["threshold"] = 0.5
    if settings.clustering == "spectral":
        pipeline.clustering = _refined_clustering("spectral")()
        clustering = {
            "neighbours": settings.spectral_neighbours,
            "neighbour_share": settings.spectral_neighbour_share,
            "isolation": settings.spectral_isolation,
            "sharpness": settings.spectral_sharpness,
            "merge_ratio": settings.merge_ratio,
            "merge_threshold": settings.merge_threshold,
            "blend_fit": settings.blend_fit,
            "split_ratio": settings.split_ratio,
        }
    else:
        pipeline.clustering = _refined_clustering("agglomerative")(metric="cosine")
        clustering = {"method": "centroid", "min_cluster_size": 3, "threshold": settings.clustering_threshold}
    pipeline.clustering.refine = pipeline.split_by_stretches
    return pipeline.instantiate({"segmentation": params, "clustering": clustering})


def _refined_clustering(kind: str) -> type:
    """The clustering step, followed by `refine(embeddings, hard_clusters) -> hard_clusters` (which may
    add speakers), with the centroids then computed again.

    Why here and not in `reconstruct`: pyannote indexes the clustering's
    centroids by speaker at the end of `apply`, so a speaker added later, in a
    file where another speaker then has no turn left, had no centroid row (an
    IndexError).
    """
    from pyannote.audio.pipelines.clustering import AgglomerativeClustering

    from pipeline.clustering import SpectralSpeakerClustering

    base = SpectralSpeakerClustering if kind == "spectral" else AgglomerativeClustering

    class RefinedClustering(base):
        refine: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None

        def __call__(self, embeddings, segmentations=None, **kwargs):
            hard, soft, centroids = super().__call__(embeddings, segmentations=segmentations, **kwargs)
            if self.refine is None or segmentations is None:
                return hard, soft, centroids
            # Speakers silent in a chunk are left out, as pyannote leaves them out after this step.
            silent = np.sum(segmentations.data, axis=1) == 0
            refined = self.refine(embeddings, np.where(silent, -2, hard))
            refined = np.where(silent, hard, refined)  # any speaker will do: pyannote drops these
            if refined.max() == hard.max():
                return hard, soft, centroids
            return refined, soft, cluster_centroids(embeddings, refined, int(refined.max()) + 1)

    return RefinedClustering


def _no_plda() -> Any:
    """A PLDA that is never used: agglomerative clustering needs none, but
    `SpeakerDiarization.__init__` loads one unconditionally (from the hub by
    default). Handing it a PLDA instance makes `get_plda` return it as is."""
    from pyannote.audio.core.plda import PLDA

    class NoPLDA(PLDA):
        def __init__(self) -> None:  # no weights to load
            pass

        def __call__(self, embeddings: np.ndarray) -> np.ndarray:
            raise RuntimeError("NoPLDA is a placeholder for clustering methods that use no PLDA")

    return NoPLDA()


def _campplus_model(checkpoint: Any) -> Any:
    """CAM++ as a pyannote `Model` of problem REPRESENTATION: what lets pyannote's
    `SpeakerDiarization` accept an embedding with no hub access."""
    import torch
    from pyannote.audio import Model
    from pyannote.audio.core.task import Problem, Resolution, Specifications

    from pipeline.campplus import EMBEDDING_DIM, embed, load_campplus

    class CamppEmbedding(Model):
        def __init__(self) -> None:
            super().__init__(sample_rate=SAMPLE_RATE, num_channels=1)
            self.specifications = Specifications(
                problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=3.0
            )
            self.encoder = load_campplus(checkpoint)
            self.eval()

        @property
        def dimension(self) -> int:
            return EMBEDDING_DIM

        def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
            return torch.stack([embed(self.encoder, w[0]) for w in waveforms])

    return CamppEmbedding()


def _embedded_pipeline_class() -> type:
    from pyannote.audio.pipelines import SpeakerDiarization

    class EmbeddedSpeakerDiarization(SpeakerDiarization):
        """pyannote's pipeline, with one (chunk, speaker) embedding step that scales.

        pyannote crops every chunk once per local speaker and embeds it, so with
        a 1 s step each second of audio goes through the encoder ~30 times.
        CAM++ ends in statistics pooling over frame-level features, so we run
        its frame-level trunk *once* over each stretch where one voice speaks
        alone (see `trunk_blocks`) and pool, for each (chunk, speaker), the
        frames where that speaker speaks alone (the segmentation mask as
        weights), for a fraction of the compute. Each stretch's own pooled
        embedding is kept too (per call, like pyannote's other state), so that
        `reconstruct` can give each stretch its nearest speaker (see
        `reassign_stretches`).
        """

        reassign_stretches = True
        windowed_from = 0  # trunk frames: longer stretches are reassigned window by window; 0: never
        stretch_split = (0.0, 0.0)  # (ratio, seconds): see `split_by_stretches`; ratio 0: never
        subspace: SpeakerSubspace | None = None  # where the split is tested: see `speaker_subspace`
        edge_trim = (0.0, 0.0)  # seconds off the (start, end) of every turn: see `to_annotation`
        _most_speakers: float = math.inf  # this call's bound on the count; 0: the count was given

        def apply(self, file, num_speakers=None, min_speakers=None, max_speakers=None, **kwargs):
            self._most_speakers = 0 if num_speakers else (max_speakers or math.inf)
            return super().apply(
                file, num_speakers=num_speakers, min_speakers=min_speakers, max_speakers=max_speakers, **kwargs
            )

        def get_embeddings(self, file, binary_segmentations, exclude_overlap=False, hook=None):
            encoder = self._embedding.model_.encoder
            self._stretches = []
            self._embeddings = chunk_embeddings(
                encoder, file["waveform"][0], binary_segmentations, hook, self._stretches
            )
            return self._embeddings

        def reconstruct(self, segmentations, hard_clusters, count):
            # Where the segmentation hears more voices at once than clustering found
            # speakers, pyannote pads a nameless extra speaker: a monologue with a
            # noisy "overlap" came out as two speakers. No frame can hold more
            # speakers than there are.
            count.data = np.minimum(count.data, max(1, int(hard_clusters.max()) + 1)).astype(np.int8)
            discrete = super().reconstruct(segmentations, hard_clusters, count)
            if not self.reassign_stretches or hard_clusters.max() < 1:
                return discrete
            centroids = cluster_centroids(self._embeddings, hard_clusters, discrete.data.shape[1])
            return reassign_stretches(discrete, self._stretches, centroids, self.windowed_from)

        def to_annotation(self, discrete_diarization, min_duration_on=0.0, min_duration_off=0.0):
            return trimmed_annotation(discrete_diarization, *self.edge_trim, min_duration_on, min_duration_off)

        def split_by_stretches(self, embeddings: np.ndarray, hard_clusters: np.ndarray) -> np.ndarray:
            """The clustering's refinement (see `_refined_clustering`): a speaker that is two merged
            voices may split."""
            ratio, seconds = self.stretch_split
            if not ratio or hard_clusters.max() < 0 or not self._stretches:
                return hard_clusters
            return split_by_stretches(
                embeddings, hard_clusters, self._stretches, ratio, seconds, self._most_speakers, self.subspace
            )

    return EmbeddedSpeakerDiarization


TRUNK_BLOCK_S = 120  # the trunk runs over the single-speaker runs of blocks this long (whole seconds)
TRUNK_FPS = 50  # trunk frames per second (fbank at 100 per second, strided by 2)


def chunk_embeddings(
    encoder: Any, waveform: Any, segmentations: Any, hook: Callable | None, stretches: list | None = None
) -> np.ndarray:
    """(chunks, local speakers, 192) embeddings; NaN where a local speaker never speaks.
    `stretches`, if given, receives a `Stretch` per single-speaker stretch embedded.

    The trunk's output is kept only as long as a chunk still needs it, so
    memory stays flat however long the file is.
    """
    import torch

    chunks = segmentations.sliding_window
    num_chunks, _, num_speakers = segmentations.data.shape
    span = chunks.start + (num_chunks - 1) * chunks.step + chunks.duration
    total_s = int(math.ceil(max(span, waveform.shape[-1] / SAMPLE_RATE)))
    out = np.full((num_chunks, num_speakers, encoder.xvector["dense"].linear.out_channels), np.nan, dtype=np.float32)
    chunk_frames = round(chunks.duration * TRUNK_FPS)
    first_frame = [round((chunks.start + c * chunks.step) * TRUNK_FPS) for c in range(num_chunks)] + [None]
    kept: Any = None  # trunk frames from kept_start on
    kept_start = next_chunk = 0
    runs = single_speaker_runs(segmentations, total_s * TRUNK_FPS)
    blocks = trunk_blocks(encoder, waveform, total_s, runs, stretches)
    with torch.inference_mode():
        for b, trunk in enumerate(blocks, 1):
            kept = trunk if kept is None else torch.cat([kept, trunk])
            while next_chunk < num_chunks and first_frame[next_chunk] + chunk_frames <= kept_start + len(kept):
                start = first_frame[next_chunk] - kept_start
                out[next_chunk] = _pool_chunk(
                    encoder, kept[start : start + chunk_frames], segmentations.data[next_chunk]
                )
                next_chunk += 1
            if next_chunk < num_chunks:  # drop what no later chunk reaches
                drop = first_frame[next_chunk] - kept_start
                kept, kept_start = kept[drop:], kept_start + drop
            if hook is not None:
                hook("embeddings", None, total=math.ceil(total_s / TRUNK_BLOCK_S), completed=b)
    return out


@dataclass
class Stretch:
    """A single-speaker stretch, [start, end) in trunk frames, and its own unit embedding; for a
    long stretch also those of its windows (see `window_embeddings`)."""

    start: int
    end: int
    embedding: np.ndarray
    windows: np.ndarray | None = None  # (windows, dim) unit embeddings
    window_starts: np.ndarray | None = None  # trunk frames from `start`; each window is WINDOW frames


def reassign_stretches(discrete: Any, stretches: list[Stretch], centroids: np.ndarray, windowed_from: int = 0) -> Any:
    """`discrete` (a pyannote discrete diarization: frames x speakers) where each single-speaker
    stretch, wherever one speaker is active, goes to the speaker whose centroid is nearest the
    stretch's own embedding; a stretch of `windowed_from` trunk frames or more (and windows), frame
    by frame to the speaker nearest the windows around the frame (see `window_labels`).

    Why: pyannote gives a speaker to each (chunk, local speaker) as a whole, and
    the segmentation's local speakers are not always one voice: one local speaker
    can be two voices talking at different moments of the chunk (on dev, the
    clustering's mistakes were almost all such embeddings, under 80 % one voice),
    whereas 98-99 % of the stretches' frames are one voice. Overlapped frames
    keep pyannote's reconstruction.

    Why windows: the segmentation can also hear two close voices' turns, one
    straight after the other, as one stretch (on dev's three close men, 6-11 %
    of the speech lay in stretches of 3 s or more that held two voices), and a
    stretch's one embedding gives all of it to one of them."""
    from pyannote.core import SlidingWindowFeature

    window = discrete.sliding_window
    data = discrete.data.copy()
    for stretch in stretches:
        first = max(0, round((stretch.start / TRUNK_FPS - window.start) / window.step))
        last = min(len(data), round((stretch.end / TRUNK_FPS - window.start) / window.step))
        rows = data[first:last]  # a view: edits land in `data`
        alone = rows.sum(axis=1) == 1
        labels = np.full(len(rows), int(np.argmax(centroids @ stretch.embedding)))
        if windowed_from and stretch.windows is not None and stretch.end - stretch.start >= windowed_from:
            times = window.start + (first + np.arange(len(rows)) + 0.5) * window.step
            frames = np.clip(
                np.round(times * TRUNK_FPS).astype(int) - stretch.start, 0, stretch.end - stretch.start - 1
            )
            labels = window_labels(stretch, centroids)[frames]
        rows[alone] = 0
        rows[alone, labels[alone]] = 1
    return SlidingWindowFeature(data, window)


def window_labels(stretch: Stretch, centroids: np.ndarray) -> np.ndarray:
    """The speaker of each trunk frame of `stretch`: the centroid most alike, on average, the
    windows that cover the frame (three or so, WINDOW_HOP apart: a change of speaker falls
    where the windows' votes turn)."""
    sims = stretch.windows @ centroids.T
    frames = stretch.end - stretch.start
    total = np.zeros((frames, len(centroids)))
    covered = np.zeros(frames)
    for start, row in zip(stretch.window_starts, sims, strict=True):
        total[start : start + WINDOW] += row
        covered[start : start + WINDOW] += 1
    return np.argmax(total / np.maximum(covered, 1)[:, None], axis=1)


def trimmed_annotation(
    discrete: Any, onset: float, offset: float, min_duration_on: float = 0.0, min_duration_off: float = 0.0
) -> Any:
    """pyannote's `to_annotation` of a discrete diarization, with `onset` seconds off the start of
    every turn and `offset` off its end (turns shorter than both vanish), before pauses within one
    speaker under `min_duration_off` are filled.

    Why: the segmentation's turns start and end a little outside the speech (on
    the harness's dev split, medians 30 ms before and 20 ms after), and where
    the speaker changes, both voices' margins count as overlap."""
    from pyannote.audio.utils.signal import Binarize

    binarize = Binarize(
        onset=0.5,
        offset=0.5,
        min_duration_on=min_duration_on,
        min_duration_off=min_duration_off,
        pad_onset=-onset,  # Binarize pads outwards; negative pads trim
        pad_offset=-offset,
    )
    return binarize(discrete)


MIN_SPLIT_STRETCH = TRUNK_FPS // 2  # trunk frames (0.5 s): shorter stretches' embeddings are too noisy to split on


def split_by_stretches(
    embeddings: np.ndarray,
    hard_clusters: np.ndarray,
    stretches: list[Stretch],
    ratio: float,
    seconds: float,
    most: float = math.inf,
    subspace: SpeakerSubspace | None = None,
) -> np.ndarray:
    """`hard_clusters` (chunks, local speakers) with speakers split in two, one at a time while
    fewer than `most`, where the stretches nearest a speaker's centroid fall in two halves apart
    (see `clustering.stretch_halves`; tested in `subspace`, see `speaker_subspace`): each of its
    (chunk, speaker) embeddings goes to the nearer half, the second numbered last.

    Why: the segmentation can hear two close voices as one local speaker in every
    chunk they share (dev: three men of one accent at close pitch), so the chunk
    embeddings mix them and the clustering finds one speaker; the stretches
    between pauses are still mostly one voice each, and their own embeddings
    tell the two apart. A speaker that is three such voices splits twice."""
    from pipeline.clustering import stretch_halves

    stretches = [s for s in stretches if s.end - s.start >= MIN_SPLIT_STRETCH]
    if not stretches:
        return hard_clusters
    raw = np.stack([s.embedding for s in stretches])
    x = raw if subspace is None else subspace.project(raw)
    length = np.array([(s.end - s.start) / TRUNK_FPS for s in stretches])
    while (count := int(hard_clusters.max()) + 1) < most:
        centroids = cluster_centroids(embeddings, hard_clusters, count)
        found = stretch_halves(x, length, np.argmax(raw @ centroids.T, axis=1), ratio, seconds)
        if found is None:
            break
        speaker, halves = found
        members = hard_clusters == speaker
        chunks = np.nan_to_num(embeddings[members])
        nearer = np.argmax((chunks if subspace is None else subspace.project(chunks)) @ halves.T, axis=1)
        if len(set(nearer)) < 2:  # every chunk nearer one half: nothing to split at the chunk level
            break
        hard_clusters = hard_clusters.copy()
        hard_clusters[members] = np.where(nearer == 1, count, speaker)
    return hard_clusters


def cluster_centroids(embeddings: np.ndarray, hard_clusters: np.ndarray, count: int) -> np.ndarray:
    """(count, dim) unit centroids of (chunks, speakers, dim) embeddings by (chunks, speakers) cluster."""
    centroids = np.stack([np.nanmean(embeddings[hard_clusters == k], axis=0) for k in range(count)])
    centroids = np.nan_to_num(centroids)
    return centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-10)


MIN_RUN = 10  # trunk frames (0.2 s): shorter single-speaker stretches are not embedded


def single_speaker_runs(segmentations: Any, total_frames: int) -> list[tuple[int, int]]:
    """[start, end) trunk frames of the stretches where one voice speaks alone (MIN_RUN or longer).

    Each trunk frame is read from the chunk whose centre is nearest to it. A run
    ends at silence or overlap, or where the speaker changes as seen by the chunk
    of either frame at the boundary (local speaker numbers mean something only
    within one chunk, and both frames lie in both chunks).
    """
    window = segmentations.sliding_window
    data = np.nan_to_num(segmentations.data)
    num_chunks, seg_frames, _ = data.shape
    times = (np.arange(total_frames) + 0.5) / TRUNK_FPS
    nearest = np.round((times - window.start - window.duration / 2) / window.step)
    nearest = np.clip(nearest, 0, num_chunks - 1).astype(int)

    def alone(chunk: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The local speaker speaking alone at `t` in `chunk`; -1 for nobody or several."""
        offset = t - (window.start + chunk * window.step)
        frame = np.clip((offset / window.duration * seg_frames).astype(int), 0, seg_frames - 1)
        active = data[chunk, frame]
        one = (active.sum(axis=1) == 1) & (offset >= 0) & (offset < window.duration)
        return np.where(one, active.argmax(axis=1), -1)

    speaker = alone(nearest, times)
    before, previous = times - 1.0 / TRUNK_FPS, np.roll(nearest, 1)
    goes_on = (
        (speaker >= 0)
        & (np.roll(speaker, 1) >= 0)  # the frame before is in a run (as its own nearest chunk sees it)
        & (alone(nearest, before) == speaker)
        & (alone(previous, times) == alone(previous, before))
    )
    goes_on[0] = False
    starts = np.flatnonzero((speaker >= 0) & ~goes_on)
    stops = np.append(np.flatnonzero(~goes_on), total_frames)
    ends = stops[np.searchsorted(stops, starts, side="right")]
    return [(int(a), int(z)) for a, z in zip(starts, ends, strict=True) if z - a >= MIN_RUN]


def trunk_blocks(
    encoder: Any, waveform: Any, total_s: int, runs: list[tuple[int, int]], stretches: list | None = None
) -> Iterator[Any]:
    """CAM++ trunk frames (TRUNK_FPS a second) of `total_s` seconds, block by block: each
    single-speaker run's frames from the trunk run over that run alone; NaN elsewhere.

    Why run by run: a trunk frame sees about 3.7 s of audio around it (52 dilated
    convolutions), and each CAM layer gates it with the mean over its whole input.
    Run over a stretch of conversation, a voice's frames carried whoever spoke
    near them, so one voice's embeddings split by the company it kept (on the
    development set, into clusters as far apart as two close voices). Run over its
    own stretch, a frame hears one voice, as CAM++ was trained.
    """
    import torch

    from pipeline.campplus import fbank

    device = next(encoder.parameters()).device
    channels = encoder.xvector["dense"].linear.in_channels // 2
    hop = SAMPLE_RATE // TRUNK_FPS  # samples per trunk frame
    block = TRUNK_BLOCK_S * TRUNK_FPS
    pending = iter(runs)
    run = next(pending, None)
    for first in range(0, total_s * TRUNK_FPS, block):
        pieces = []  # (start frame in the block, mean-normalised fbank)
        while run is not None and run[0] < first + block:
            # A run crossing the block's end is embedded in two parts (bounded input length).
            start, end = run[0], min(run[1], first + block)
            audio = waveform[start * hop : end * hop].to(device)
            if end - start >= MIN_RUN and len(audio) >= MIN_RUN * hop:
                features = fbank(audio)
                pieces.append((start - first, features - features.mean(dim=0)))
            run = (end, run[1]) if end < run[1] else next(pending, None)
        out = torch.full((block, channels), float("nan"), device=device)
        for at, trunk in _batched_trunk(encoder, pieces):
            frames = min(len(trunk), block - at)
            out[at : at + frames] = trunk[:frames]
            if stretches is not None:
                pooled = encoder.pool(trunk[:frames], torch.ones(1, frames, device=trunk.device))
                embedding = torch.nn.functional.normalize(pooled, dim=1)[0].cpu().numpy()
                starts, windows = window_embeddings(encoder, trunk[:frames])
                stretches.append(Stretch(first + at, first + at + frames, embedding, windows, starts))
        yield out


WINDOW = TRUNK_FPS * 3 // 2  # trunk frames (1.5 s) of a window of a long stretch
WINDOW_HOP = TRUNK_FPS // 2
WINDOWED = 2 * WINDOW  # stretches this long or longer get window embeddings


def window_embeddings(encoder: Any, trunk: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(starts, (windows, dim) unit embeddings) of WINDOW-frame windows every WINDOW_HOP frames
    over a stretch's trunk frames, the last one ending with the stretch; (None, None) if it is
    shorter than WINDOWED."""
    import torch

    frames = len(trunk)
    if frames < WINDOWED:
        return None, None
    starts = np.arange(0, frames - WINDOW + 1, WINDOW_HOP)
    if starts[-1] + WINDOW < frames:
        starts = np.append(starts, frames - WINDOW)
    weights = torch.zeros(len(starts), frames, device=trunk.device)
    for i, a in enumerate(starts):
        weights[i, a : a + WINDOW] = 1
    pooled = encoder.pool(trunk, weights)
    return starts, torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()


BATCH_SLACK = 1.25  # runs batched together differ in length by at most this factor


def _batched_trunk(encoder: Any, pieces: list[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """(start, (frames, channels) trunk output) per piece, pieces of similar length run as one batch.

    The trunk's cost is mostly per call at these lengths (3 s pieces one by one
    take 1.7 times as long as 30 s at once). Padding the shorter pieces of a batch
    changes nothing of their frames (see `CAMPPlus.frames`).
    """
    import torch

    pieces = sorted(pieces, key=lambda p: len(p[1]))
    while pieces:
        size = next((i for i, p in enumerate(pieces) if len(p[1]) > BATCH_SLACK * len(pieces[0][1])), len(pieces))
        batch, pieces = pieces[:size], pieces[size:]
        longest = len(batch[-1][1])
        padded = torch.stack([torch.nn.functional.pad(f, (0, 0, 0, longest - len(f))) for _, f in batch])
        trunk = encoder.frames(padded, [len(f) for _, f in batch]).transpose(1, 2)  # (batch, frames, channels)
        for (at, features), frames in zip(batch, trunk, strict=True):
            yield at, frames[: (len(features) + 1) // 2]


def _pool_chunk(encoder: Any, frames: Any, mask: np.ndarray) -> np.ndarray:
    """(local speakers, 192) unit embeddings of one chunk's trunk frames; NaN for silent speakers."""
    import torch

    weights = _speaker_weights(mask, len(frames))
    embedded = ~torch.isnan(frames).any(dim=1)  # frames of single-speaker runs
    weights *= embedded.cpu().numpy()[None]
    frames = torch.nan_to_num(frames)
    out = np.full((weights.shape[0], encoder.xvector["dense"].linear.out_channels), np.nan, dtype=np.float32)
    active = weights.sum(axis=1) > 0
    if active.any():
        pooled = encoder.pool(frames, torch.from_numpy(weights[active]).to(frames))
        out[active] = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
    return out


def _speaker_weights(mask: np.ndarray, frames: int) -> np.ndarray:
    """(speakers, frames) pooling weights from one chunk's (segmentation frames, speakers) binary mask.

    A speaker's frames where nobody else speaks, as pyannote's embedding step
    does with `exclude_overlap`; all their frames if fewer than a fifth of the
    chunk is theirs alone (back-channels are often overlapped entirely).
    """
    mask = np.nan_to_num(mask, nan=0.0)
    alone = mask * (mask.sum(axis=1, keepdims=True) == 1)
    enough = alone.sum(axis=0) >= 0.2 * mask.shape[0]
    chosen = np.where(enough[None], alone, mask)  # (seg frames, speakers)
    # Nearest segmentation frame for each trunk frame.
    index = np.minimum((np.arange(frames) + 0.5) * mask.shape[0] / frames, mask.shape[0] - 1).astype(int)
    return np.ascontiguousarray(chosen[index].T, dtype=np.float32)
