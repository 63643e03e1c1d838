"""Stage 4, acoustic features: frame tracks computed once per file, then
pooled over each word's interval.

One STFT feeds RMS, spectral centroid, roll-off and MFCC (librosa). Pitch is
YIN (de Cheveigné & Kawahara, 2002) vectorised here rather than librosa's
`pyin` (RTF ~0.2 on 2 cores, too slow for this path) or `yin` (which does not
expose the aperiodicity we need to tell voiced frames from unvoiced ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.config import AcousticSettings
from pipeline.media import SAMPLE_RATE
from pipeline.progress import ProgressHook, no_progress
from pipeline.schemas import AcousticFeatures

STAGE = "acoustics"
N_FFT = 512  # 32 ms: speech-sized spectral frames
SILENCE_DB = -60.0  # frames quieter than this are never voiced
_EPS = 1e-10


@dataclass
class FrameTracks:
    """Per-frame acoustic tracks on one time grid (frame i is centred at i * hop)."""

    hop_s: float
    rms_db: np.ndarray  # (T,) dBFS
    f0_hz: np.ndarray  # (T,) NaN where unvoiced
    centroid_hz: np.ndarray  # (T,)
    rolloff_hz: np.ndarray  # (T,)
    mfcc: np.ndarray  # (n_mfcc, T)

    def frames(self, start: float, end: float) -> slice:
        """Frames whose centre lies in [start, end], or the one nearest a zero-length interval."""
        n = len(self.rms_db)
        lo = min(max(int(np.ceil(start / self.hop_s)), 0), n - 1)
        hi = min(max(int(np.floor(end / self.hop_s)) + 1, lo + 1), n)
        return slice(lo, hi)


SPECTRAL_BLOCK = 6000  # frames (60 s at a 10 ms hop) whose spectrum is held at once


def frame_tracks(samples: np.ndarray, settings: AcousticSettings, progress: ProgressHook = no_progress) -> FrameTracks:
    import librosa

    hop = int(round(settings.hop_s * SAMPLE_RATE))
    progress(STAGE, 0.0, "computing spectral features")
    rms_db, centroid, rolloff, mel = spectral_tracks(samples, hop)
    mfcc = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=settings.n_mfcc)
    progress(STAGE, 0.3, "tracking pitch")
    f0, aperiodicity = yin(samples, hop, settings.fmin_hz, settings.fmax_hz, progress)
    n = min(len(rms_db), len(f0))
    voiced = (aperiodicity[:n] < settings.voicing_threshold) & (rms_db[:n] > SILENCE_DB)
    f0 = np.where(voiced, f0[:n], np.nan)
    progress(STAGE, 1.0, "acoustic tracks ready")
    return FrameTracks(settings.hop_s, rms_db[:n], f0, centroid[:n], rolloff[:n], mfcc[:, :n])


def spectral_tracks(
    samples: np.ndarray, hop: int, block: int = SPECTRAL_BLOCK
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rms_db, centroid_hz, rolloff_hz, 40-band mel power) per frame, frame i centred at
    sample i * hop, as librosa computes them from one centred STFT, SPECTRAL_BLOCK frames at a time.

    Why blocks: the spectrum of a whole file, with the arrays derived from it,
    took 2.7 GB for an hour of audio (librosa's float64 work arrays included),
    beside the transcription. Every track but MFCC is per frame, so blocks give
    the same values; MFCC's dB scale is clipped relative to the file's loudest
    mel band, so it is computed on the whole (small) mel array afterwards."""
    import librosa

    # librosa's centred STFT pads N_FFT // 2 zeros at each end: frame i then starts at i * hop.
    padded = np.pad(samples, N_FFT // 2)
    frames = 1 + len(samples) // hop
    # Parseval: the mean square of a Hann-windowed frame from its one-sided spectrum.
    window_energy = np.sum(np.hanning(N_FFT + 1)[:-1] ** 2)
    out = [np.empty(frames) for _ in range(3)] + [np.empty((40, frames), dtype=np.float32)]
    for first in range(0, frames, block):
        last = min(first + block, frames)
        piece = padded[first * hop : (last - 1) * hop + N_FFT]
        spec = np.abs(librosa.stft(piece, n_fft=N_FFT, hop_length=hop, center=False)).astype(np.float32)
        power = spec**2
        frame_ms = (2 * power[1:-1].sum(axis=0) + power[0] + power[-1]) / (N_FFT * window_energy)
        out[0][first:last] = 10 * np.log10(frame_ms + _EPS)
        out[1][first:last] = librosa.feature.spectral_centroid(S=spec, sr=SAMPLE_RATE)[0]
        out[2][first:last] = librosa.feature.spectral_rolloff(S=spec, sr=SAMPLE_RATE, roll_percent=0.85)[0]
        out[3][:, first:last] = librosa.feature.melspectrogram(S=power, sr=SAMPLE_RATE, n_mels=40)
    return out[0], out[1], out[2], out[3]


def warm_up(settings: AcousticSettings) -> None:
    """Run once on a second of noise: librosa's first call compiles numba kernels (seconds)."""
    frame_tracks(np.random.default_rng(0).normal(0, 0.1, SAMPLE_RATE).astype(np.float32), settings)


def yin(
    samples: np.ndarray, hop: int, fmin: float, fmax: float, progress: ProgressHook = no_progress, block: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """F0 (Hz) and aperiodicity (YIN's CMNDF at the chosen lag) per frame, frames centred at i * hop."""
    tau_min, tau_max = int(SAMPLE_RATE / fmax), int(np.ceil(SAMPLE_RATE / fmin))
    win = 2 * tau_max  # integration window: two periods of the lowest pitch
    frame_len = win + tau_max
    padded = np.pad(samples.astype(np.float32), (frame_len // 2, frame_len // 2 + hop))
    frames = sliding_window_view(padded, frame_len)[::hop][: len(samples) // hop + 1]
    n_fft = 1 << int(np.ceil(np.log2(frame_len + win)))
    f0 = np.empty(len(frames), dtype=np.float32)
    aper = np.empty(len(frames), dtype=np.float32)
    for i in range(0, len(frames), block):
        f0[i : i + block], aper[i : i + block] = _yin_block(frames[i : i + block], win, tau_min, tau_max, n_fft)
        progress(STAGE, 0.3 + 0.7 * min(i + block, len(frames)) / len(frames), "tracking pitch")
    return f0, aper


def _yin_block(frames: np.ndarray, win: int, tau_min: int, tau_max: int, n_fft: int) -> tuple[np.ndarray, np.ndarray]:
    from scipy import fft

    x = np.ascontiguousarray(frames, dtype=np.float32)  # float32 FFTs: twice numpy's float64 speed
    # Difference function d(tau) = E(0) + E(tau) - 2 r(tau), with r by FFT cross-correlation.
    spectrum = np.conj(fft.rfft(x[:, :win], n_fft, workers=-1)) * fft.rfft(x, n_fft, workers=-1)
    r = fft.irfft(spectrum, n_fft, workers=-1)[:, : tau_max + 1].astype(np.float64)
    cum = np.concatenate([np.zeros((len(x), 1)), np.cumsum(x.astype(np.float64) ** 2, axis=1)], axis=1)
    taus = np.arange(tau_max + 1)
    energy = cum[:, taus + win] - cum[:, taus]
    d = np.maximum(energy[:, :1] + energy - 2 * r, 0.0)
    # Cumulative mean normalised difference.
    cmnd = np.ones_like(d)
    running = np.cumsum(d[:, 1:], axis=1)
    cmnd[:, 1:] = d[:, 1:] * taus[1:] / np.maximum(running, _EPS)
    search = cmnd[:, tau_min : tau_max + 1]
    # YIN's rule: the first dip under the threshold that is a local minimum, else the global minimum.
    local_min = np.zeros_like(search, dtype=bool)
    local_min[:, 1:-1] = (search[:, 1:-1] <= search[:, :-2]) & (search[:, 1:-1] <= search[:, 2:])
    candidates = local_min & (search < 0.1)
    best = np.where(candidates.any(axis=1), candidates.argmax(axis=1), search.argmin(axis=1))
    rows = np.arange(len(x))
    # Parabolic interpolation of the dip for sub-sample lag resolution.
    b = np.clip(best, 1, search.shape[1] - 2)
    left, mid, right = search[rows, b - 1], search[rows, b], search[rows, b + 1]
    denom = left - 2 * mid + right
    shift = np.where(np.abs(denom) > _EPS, 0.5 * (left - right) / np.where(denom == 0, 1, denom), 0.0)
    shift = np.where(b == best, np.clip(shift, -1, 1), 0.0)
    tau = best + tau_min + shift
    return (SAMPLE_RATE / tau).astype(np.float32), search[rows, best].astype(np.float32)


def word_features(tracks: FrameTracks, start: float, end: float) -> AcousticFeatures:
    span = tracks.frames(start, end)
    energy = np.mean(10 ** (tracks.rms_db[span] / 10))
    f0 = tracks.f0_hz[span]
    voiced = f0[np.isfinite(f0)]
    return AcousticFeatures(
        volume_db=round(float(10 * np.log10(energy + _EPS)), 2),
        pitch_hz=round(float(np.median(voiced)), 1) if voiced.size else None,
        spectral_centroid=round(float(np.mean(tracks.centroid_hz[span])), 1),
        spectral_rolloff=round(float(np.mean(tracks.rolloff_hz[span])), 1),
        mfcc=[round(float(v), 3) for v in tracks.mfcc[:, span].mean(axis=1)],
    )
