"""Audio samples as backends hand them over, and the conversions every backend needs.

A backend returns :class:`AudioClip` values at its model's own rate and channel count;
:func:`conform` turns one into what the request asked for (rate, channels, length), so
each backend does not resample in its own way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Samples = NDArray[np.float32]


@dataclass(frozen=True)
class AudioClip:
    """``samples``: float32 in [-1, 1], shape (frames, channels)."""

    samples: Samples
    sample_rate: int

    def __post_init__(self) -> None:
        if self.samples.ndim != 2:
            raise ValueError(f"samples must be (frames, channels), not {self.samples.shape}")

    @classmethod
    def of(cls, samples: NDArray[np.generic], sample_rate: int) -> AudioClip:
        """From (frames,), (frames, channels) or a backend's (channels, frames) array."""
        array = np.asarray(samples, dtype=np.float32)
        if array.ndim == 1:
            array = array[:, None]
        elif array.ndim == 2 and array.shape[0] <= 2 < array.shape[1]:
            array = array.T  # (channels, frames), as torch pipelines return it
        return cls(np.ascontiguousarray(array), int(sample_rate))

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_seconds(self) -> float:
        return self.frames / self.sample_rate


def conform(
    clip: AudioClip,
    *,
    sample_rate: int | None = None,
    channels: int | None = None,
    seconds: float | None = None,
) -> AudioClip:
    """The clip at ``sample_rate``, with ``channels``, exactly ``seconds`` long (cut or
    padded with silence); None keeps what the clip has."""
    samples = clip.samples
    rate = sample_rate or clip.sample_rate
    if rate != clip.sample_rate:
        samples = resample(samples, clip.sample_rate, rate)
    if channels is not None and channels != samples.shape[1]:
        samples = (
            samples.mean(axis=1, keepdims=True)
            if channels == 1
            else np.repeat(samples[:, :1] if samples.shape[1] == 1 else samples, channels, axis=1)
        )
    if seconds is not None:
        frames = round(seconds * rate)
        if samples.shape[0] >= frames:
            samples = samples[:frames]
        else:
            pad = np.zeros((frames - samples.shape[0], samples.shape[1]), np.float32)
            samples = np.concatenate([samples, pad])
    return AudioClip(np.ascontiguousarray(samples, dtype=np.float32), rate)


def resample(samples: Samples, source: int, target: int) -> Samples:
    """Band-limited resampling in the frequency domain (what ``scipy.signal.resample``
    does), per channel: exact for clips, no extra dependency."""
    frames = samples.shape[0]
    out_frames = max(round(frames * target / source), 1)
    if frames == 0:
        return np.zeros((0, samples.shape[1]), np.float32)
    spectrum = np.fft.rfft(samples, axis=0)
    bins = out_frames // 2 + 1
    if bins <= spectrum.shape[0]:
        spectrum = spectrum[:bins]
    else:
        pad = np.zeros((bins - spectrum.shape[0], samples.shape[1]), spectrum.dtype)
        spectrum = np.concatenate([spectrum, pad])
    out = np.fft.irfft(spectrum, n=out_frames, axis=0) * (out_frames / frames)
    resampled: Samples = np.clip(out, -1.0, 1.0).astype(np.float32)
    return resampled
