"""Stage 3, speaker diarization with pyannote.audio.

Two sources of pipeline:

- `embedded` (default, offline): pyannote's own `SpeakerDiarization` with the
  segmentation model shipped in whisperx and the GE2E encoder shipped in
  resemblyzer, agglomerative clustering. Its embedding step is replaced by a
  faster equivalent (`EmbeddedSpeakerDiarization.get_embeddings`).
- any pretrained pyannote pipeline by hub name or local path, e.g.
  `pyannote/speaker-diarization-3.1` with an HF token.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from pipeline.config import DiarizationSettings, resolve_device
from pipeline.errors import InputError, ModelError
from pipeline.media import SAMPLE_RATE
from pipeline.progress import ProgressHook, no_progress

log = logging.getLogger(__name__)
STAGE = "diarization"
EMBEDDED_NAME = "embedded:pyannote-segmentation+ge2e"


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

    from pipeline.embedded import ge2e_checkpoint, segmentation_checkpoint
    from pipeline.ge2e import GE2EEncoder

    segmentation = Model.from_pretrained(str(segmentation_checkpoint()))
    pipeline = _embedded_pipeline_class()(
        segmentation=segmentation,
        segmentation_step=settings.segmentation_step,
        embedding=GE2EEncoder(ge2e_checkpoint()),
        plda=_no_plda(),
        clustering="AgglomerativeClustering",
        segmentation_batch_size=settings.segmentation_batch_size,
    )
    return pipeline.instantiate(
        {
            "segmentation": {"threshold": 0.5, "min_duration_off": settings.min_duration_off},
            "clustering": {"method": "centroid", "min_cluster_size": 3, "threshold": settings.clustering_threshold},
        }
    )


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


def _embedded_pipeline_class() -> type:
    from pyannote.audio.pipelines import SpeakerDiarization

    class EmbeddedSpeakerDiarization(SpeakerDiarization):
        """pyannote's pipeline, with one (chunk, speaker) embedding step that scales.

        pyannote embeds every 5 s chunk once per local speaker, so with a
        1.25 s step each second of audio is embedded ~12 times. GE2E embeds
        1.6 s partials, so we embed the partials of the whole file *once*, on a
        fixed grid, and pool them per (chunk, speaker) with the segmentation
        mask as weights. Same inputs to clustering, a fraction of the compute.
        """

        def get_embeddings(self, file, binary_segmentations, exclude_overlap=False, hook=None):
            return pooled_embeddings(self._embedding.model_, file["waveform"][0], binary_segmentations, hook)

    return EmbeddedSpeakerDiarization


PARTIAL_HOP = 40  # frames (0.4 s) between partials on the global grid
EMBED_BATCH = 128


def pooled_embeddings(encoder: Any, waveform: Any, segmentations: Any, hook: Callable | None) -> np.ndarray:
    """(chunks, local speakers, 256) embeddings from one pass of the encoder over the file."""
    import torch

    from pipeline.ge2e import HOP, PARTIAL_FRAMES

    chunks = segmentations.sliding_window
    num_chunks, num_frames, num_speakers = segmentations.data.shape
    frame_s = HOP / SAMPLE_RATE
    # Cover the last (zero-padded) chunk entirely.
    total = int(math.ceil((chunks.start + (num_chunks - 1) * chunks.step + chunks.duration) * SAMPLE_RATE))
    waveform = torch.nn.functional.pad(waveform, (0, max(0, total - waveform.shape[-1])))
    with torch.inference_mode():
        mel, power = encoder.frames(waveform.to(encoder.device))
        starts = np.arange(0, max(1, mel.shape[0] - PARTIAL_FRAMES + 1), PARTIAL_HOP)
        batches = [starts[i : i + EMBED_BATCH] for i in range(0, len(starts), EMBED_BATCH)]
        partial_emb = []
        for b, batch in enumerate(batches, 1):
            idx = torch.as_tensor(batch)[:, None] + torch.arange(PARTIAL_FRAMES)[None]
            partial_emb.append(encoder.embed_partials(mel[idx], power[idx]).cpu().numpy())
            if hook is not None:
                hook("embeddings", None, total=len(batches), completed=b)
    emb = np.concatenate(partial_emb)  # (P, 256)
    p_start = starts * frame_s
    p_dur = PARTIAL_FRAMES * frame_s
    masks = np.nan_to_num(segmentations.data, nan=0.0)
    out = np.full((num_chunks, num_speakers, emb.shape[1]), np.nan, dtype=np.float32)
    for c in range(num_chunks):
        c_start = chunks.start + c * chunks.step
        inside = np.flatnonzero((p_start >= c_start - 1e-6) & (p_start + p_dur <= c_start + chunks.duration + 1e-6))
        if inside.size == 0:
            continue
        # Segmentation frames each partial spans, as [lo, hi) indices into the chunk's mask.
        lo = np.floor((p_start[inside] - c_start) / chunks.duration * num_frames).astype(int)
        hi = np.maximum(lo + 1, np.ceil((p_start[inside] + p_dur - c_start) / chunks.duration * num_frames).astype(int))
        cum = np.vstack([np.zeros((1, num_speakers)), np.cumsum(masks[c], axis=0)])
        weights = (cum[np.minimum(hi, num_frames)] - cum[lo]) / (hi - lo)[:, None]  # (partials, speakers)
        pooled = weights.T @ emb[inside]  # (speakers, 256)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        ok = weights.sum(axis=0) > 1e-3
        out[c, ok] = pooled[ok] / norms[ok]
    return out
