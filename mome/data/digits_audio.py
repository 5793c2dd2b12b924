"""A third modality for the embedded digits: each digit's telephone keypad tone (DTMF) as log-mel features.

Dual-tone multi-frequency signalling (ITU-T Recommendation Q.23, "Technical features of push-button
telephone sets"): key ``(r, c)`` of the keypad sends the sum of its row and column sinusoids,

    s(t) = a_low sin(2 pi f_row t + phi_1) + a_high sin(2 pi f_col t + phi_2) + n(t),   n ~ N(0, sigma^2),

rows 697 / 770 / 852 / 941 Hz, columns 1209 / 1336 / 1477 Hz (:data:`DTMF_FREQUENCIES`: keys 1-9 row by row, 0 at
(941, 1336)). Each sample draws its own tone duration (:data:`DURATION_RANGE`, Q.24's 40 ms minimum and up),
amplitudes of the two tones, phases and noise level from a generator seeded by ``(seed, index)``, so a sample's
waveform does not depend on the order it is drawn in. Waveforms are mono float32 at 16 kHz (:data:`SAMPLE_RATE`).

Features: transformers' :class:`~transformers.WhisperFeatureExtractor` built from its constructor (no Hub
download; numpy only, no torchaudio): an STFT of 400 samples (25 ms) every 160 (10 ms), 80 Slaney mel bins,
``log10``, clamped to 8 below the sample's maximum, ``(x + 4) / 4``; each clip is zero-padded to
:data:`MAX_SECONDS` (1 s), so features are ``[80, 100]`` (mel bins x 10 ms frames). Whisper's extractor is used
rather than the AST one because it is the numpy one (AST's computes Kaldi fbanks with torchaudio, which this
project does not depend on) and it is the front end of the audio encoders (Whisper, Uni-MoE's) this feeds.

Files: :func:`write_wav` / :func:`read_wav` store clips as 16 kHz mono 16-bit PCM WAV files (the standard library's
``wave``; samples scaled by 32767 and rounded, so a clip reads back within 1/32767 of what was written).

Bad input is an :class:`~mome.InvalidInputError` naming what was expected: a sample rate other than 16 kHz, a
clip shorter than 40 ms or longer than 1 s (Whisper's extractor would silently cut it), or more than one channel.
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import InvalidArgumentError, InvalidInputError

__all__ = [
    "DTMF_FREQUENCIES",
    "DURATION_RANGE",
    "MAX_SECONDS",
    "SAMPLE_RATE",
    "AudioFeatures",
    "digit_waveform",
    "dtmf_tone",
    "read_wav",
    "write_wav",
]

SAMPLE_RATE = 16_000  # Hz
MAX_SECONDS = 1  # the extractor pads every clip to this length (Whisper's chunk_length, in seconds)
MIN_SAMPLES = SAMPLE_RATE * 40 // 1000  # 40 ms: Q.24's shortest tone a receiver must accept
DURATION_RANGE = (0.06, 0.5)  # seconds, drawn uniformly per sample
ROWS = (697, 770, 852, 941)  # Hz, ITU-T Q.23 low group
COLUMNS = (1209, 1336, 1477)  # Hz, high group (the fourth column, 1633 Hz, carries no digit)
#: ``{digit: (row Hz, column Hz)}``: the keypad's 1 2 3 / 4 5 6 / 7 8 9 / * 0 #.
DTMF_FREQUENCIES: dict[int, tuple[int, int]] = {
    **{3 * r + c + 1: (ROWS[r], COLUMNS[c]) for r in range(3) for c in range(3)},
    0: (ROWS[3], COLUMNS[1]),
}


def dtmf_tone(
    digit: int,
    duration: float,
    *,
    amplitudes: tuple[float, float] = (0.5, 0.5),
    phases: tuple[float, float] = (0.0, 0.0),
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
    sample_rate: int = SAMPLE_RATE,
) -> np.ndarray:
    """The DTMF tone of ``digit`` (0-9): ``round(duration * sample_rate)`` float32 samples of
    ``a_1 sin(2 pi f_row t + phi_1) + a_2 sin(2 pi f_col t + phi_2)`` plus Gaussian noise of ``noise_std``
    (drawn from ``rng``, required when ``noise_std > 0``)."""
    if digit not in DTMF_FREQUENCIES:
        raise InvalidArgumentError("digit", "a digit in 0-9", digit, "dtmf_tone")
    if noise_std > 0 and rng is None:
        raise InvalidArgumentError("rng", "a numpy Generator when noise_std > 0", rng, "dtmf_tone")
    low, high = DTMF_FREQUENCIES[digit]
    t = np.arange(round(duration * sample_rate)) / sample_rate  # [N] seconds
    row = amplitudes[0] * np.sin(2 * np.pi * low * t + phases[0])
    column = amplitudes[1] * np.sin(2 * np.pi * high * t + phases[1])
    wave = row + column
    if noise_std > 0:
        wave = wave + rng.normal(0.0, noise_std, size=t.shape)
    return wave.astype(np.float32)


def digit_waveform(digit: int, index: int, seed: int = 0) -> np.ndarray:
    """Sample ``index``'s tone of ``digit``: duration in :data:`DURATION_RANGE`, each tone's amplitude in
    [0.2, 0.6] (so the two differ by up to ~9.5 dB of twist), phases in [0, 2 pi), noise std in [0, 0.05], all
    drawn from a generator seeded by ``(seed, index)``."""
    rng = np.random.default_rng((seed, index))
    duration = rng.uniform(*DURATION_RANGE)
    amplitudes = tuple(rng.uniform(0.2, 0.6, size=2))
    phases = tuple(rng.uniform(0.0, 2 * np.pi, size=2))
    return dtmf_tone(digit, duration, amplitudes=amplitudes, phases=phases, noise_std=rng.uniform(0.0, 0.05), rng=rng)


PCM_SCALE = 32767  # 16-bit PCM full scale


def write_wav(path: str | Path, waveform: np.ndarray) -> Path:
    """Write a mono float clip (samples in [-1, 1]) as a 16 kHz 16-bit PCM WAV file; returns the path."""
    samples = np.asarray(waveform, dtype=np.float64)
    if samples.ndim != 1:
        raise InvalidArgumentError("waveform", "a mono [N] clip", f"shape {samples.shape}", "write_wav")
    peak = float(np.abs(samples).max(initial=0.0))
    if peak > 1.0:
        raise InvalidArgumentError(
            "waveform", "samples in [-1, 1] (scale the clip down)", f"peak {peak:.3f}", "write_wav"
        )
    pcm = np.round(samples * PCM_SCALE).astype("<i2")
    path = Path(path)
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(SAMPLE_RATE)
        file.writeframes(pcm.tobytes())
    return path


def read_wav(path: str | Path, header_only: bool = False) -> np.ndarray | None:
    """A clip written by :func:`write_wav`: float32 ``[N]`` samples in [-1, 1] (None with ``header_only``, which
    checks the file's format only). ``FileNotFoundError`` for a missing file, ``ValueError`` naming the file for
    one that is not a 16 kHz mono 16-bit PCM WAV file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        with wave.open(str(path), "rb") as file:
            layout = (file.getframerate(), file.getnchannels(), file.getsampwidth())
            frames = None if header_only else file.readframes(file.getnframes())
    except (wave.Error, EOFError) as err:
        raise ValueError(f"audio file {path} is not a WAV file: {err}") from err
    if layout != (SAMPLE_RATE, 1, 2):
        rate, channels, width = layout
        raise ValueError(
            f"audio file {path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; expected {SAMPLE_RATE} Hz mono "
            "16-bit PCM (resample first)"
        )
    if frames is None:
        return None
    return (np.frombuffer(frames, dtype="<i2") / PCM_SCALE).astype(np.float32)


class AudioFeatures:
    """Log-mel features of 16 kHz mono clips: ``[B, num_mel_bins, 100]`` float32 (see the module docstring).

    Args:
        num_mel_bins: mel bins (Whisper's 80; the filters span 0-8 kHz).
    """

    def __init__(self, num_mel_bins: int = 80) -> None:
        from transformers import WhisperFeatureExtractor

        self.extractor = WhisperFeatureExtractor(
            feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=160, chunk_length=MAX_SECONDS, n_fft=400
        )
        self.num_mel_bins = num_mel_bins
        self.num_frames = SAMPLE_RATE * MAX_SECONDS // 160

    def check(self, audio: Any, sampling_rate: Any) -> np.ndarray:
        """One clip as a float32 ``[N]`` array, or :class:`~mome.InvalidInputError` naming what was expected."""
        owner = type(self).__name__
        if sampling_rate != SAMPLE_RATE:
            raise InvalidInputError("sampling_rate", f"{SAMPLE_RATE} Hz (resample first)", sampling_rate, owner)
        array = np.asarray(audio.detach().cpu() if isinstance(audio, torch.Tensor) else audio)
        if array.ndim == 2 and 1 in array.shape:  # [1, N] or [N, 1]: one channel
            array = array.reshape(-1)
        if array.ndim != 1:
            channels = array.shape[0] if array.ndim == 2 else None
            got = f"{channels} channels, shape {array.shape}" if channels else f"shape {array.shape}"
            raise InvalidInputError("audio", "mono audio: one channel, a [N] array (or [1, N])", got, owner)
        if not np.issubdtype(array.dtype, np.floating):
            raise InvalidInputError("audio", "floating-point samples in [-1, 1]", array.dtype, owner)
        if not MIN_SAMPLES <= array.shape[0] <= SAMPLE_RATE * MAX_SECONDS:
            expected = f"{MIN_SAMPLES} to {SAMPLE_RATE * MAX_SECONDS} samples (40 ms to {MAX_SECONDS} s at 16 kHz)"
            raise InvalidInputError("audio", expected, f"{array.shape[0]} samples", owner)
        return array.astype(np.float32, copy=False)

    def __call__(self, audio: Sequence[Any], sampling_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """``audio``: clips (arrays or tensors) -> ``[B, num_mel_bins, 100]``; each clip checked by :meth:`check`."""
        clips = [self.check(clip, sampling_rate) for clip in audio]
        features = self.extractor(clips, sampling_rate=sampling_rate, return_tensors="np")["input_features"]
        return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))  # [B, mel, frames]
