"""A GE2E speaker encoder (Wan et al., 2018) as a pyannote.audio `Model`.

The trained weights ship inside the `resemblyzer` wheel (an LSTM over 40-band
mel *power* frames, 25 ms windows, 10 ms hop). Wrapping them as a pyannote
`Model` of problem REPRESENTATION is what lets pyannote's `SpeakerDiarization`
run with no hub access.

The encoder was trained on 1.6 s "partials"; a longer excerpt is embedded as
the mean of its partial embeddings, as resemblyzer does.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pyannote.audio import Model
from pyannote.audio.core.task import Problem, Resolution, Specifications
from torch import nn

SAMPLE_RATE = 16_000
HOP = 160  # 10 ms
N_FFT = 400  # 25 ms
N_MELS = 40
PARTIAL_FRAMES = 160  # 1.6 s, the training length
EMBEDDING_DIM = 256
TARGET_POWER = 10 ** (-30 / 10)  # resemblyzer normalises utterances to -30 dBFS


class GE2EEncoder(Model):
    def __init__(self, checkpoint: Path | None = None) -> None:
        super().__init__(sample_rate=SAMPLE_RATE, num_channels=1)
        self.specifications = Specifications(
            problem=Problem.REPRESENTATION, resolution=Resolution.CHUNK, duration=PARTIAL_FRAMES * HOP / SAMPLE_RATE
        )
        self.lstm = nn.LSTM(N_MELS, EMBEDDING_DIM, num_layers=3, batch_first=True)
        self.linear = nn.Linear(EMBEDDING_DIM, EMBEDDING_DIM)
        import torchaudio

        # Slaney scale and norm, zero padding: librosa's defaults, which the weights were trained with.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=SAMPLE_RATE,
            n_fft=N_FFT,
            hop_length=HOP,
            n_mels=N_MELS,
            power=2.0,
            norm="slaney",
            mel_scale="slaney",
            pad_mode="constant",
        )
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model_state"]
            weights = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
            self.load_state_dict(weights, strict=False)
        self.eval()

    @property
    def dimension(self) -> int:
        return EMBEDDING_DIM

    def frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """(samples,) -> (frames, N_MELS) mel power, and (frames,) mean-square power of each 10 ms hop."""
        mel = self.mel(waveform).T
        n = mel.shape[0]
        padded = F.pad(waveform, (0, n * HOP - waveform.shape[-1]))[: n * HOP]
        power = padded.reshape(n, HOP).pow(2).mean(dim=1)
        return mel, power

    def embed_partials(self, mel: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
        """(P, PARTIAL_FRAMES, N_MELS) mel and (P, PARTIAL_FRAMES) power -> (P, 256) unit embeddings.

        Each partial is scaled to -30 dBFS first, so a speaker's loudness does
        not move their embedding (a quiet and a loud recording of one voice
        must cluster together).
        """
        gain = TARGET_POWER / power.mean(dim=1).clamp_min(1e-10)
        _, (hidden, _) = self.lstm(mel * gain[:, None, None])
        return F.normalize(F.relu(self.linear(hidden[-1])), dim=1)

    def forward(self, waveforms: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, 1, samples) -> (batch, 256); `weights` (batch, frames) weight each partial, as pyannote masks."""
        out = []
        for i, waveform in enumerate(waveforms[:, 0]):
            mel, power = self.frames(waveform)
            starts = partial_starts(mel.shape[0])
            partials = torch.stack([mel[s : s + PARTIAL_FRAMES] for s in starts])
            powers = torch.stack([power[s : s + PARTIAL_FRAMES] for s in starts])
            emb = self.embed_partials(partials, powers)
            w = torch.ones(len(starts))
            if weights is not None:
                mask = F.interpolate(weights[i][None, None].float(), size=mel.shape[0], mode="nearest")[0, 0]
                w = torch.stack([mask[s : s + PARTIAL_FRAMES].mean() for s in starts])
            out.append(F.normalize((w[:, None] * emb).sum(dim=0), dim=0))
        return torch.stack(out)


def partial_starts(num_frames: int, hop: int = PARTIAL_FRAMES // 2) -> list[int]:
    """Start frames of half-overlapping partials covering `num_frames` (at least one)."""
    if num_frames <= PARTIAL_FRAMES:
        return [0]
    starts = list(range(0, num_frames - PARTIAL_FRAMES + 1, hop))
    if starts[-1] + PARTIAL_FRAMES < num_frames:
        starts.append(num_frames - PARTIAL_FRAMES)
    return starts
