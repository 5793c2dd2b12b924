"""The digits' third modality: each digit's ITU-T Q.23 DTMF tone, its log-mel features, and the bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mome
from mome.data import DigitsAudioDataset
from mome.data.digits_audio import (
    DTMF_FREQUENCIES,
    SAMPLE_RATE,
    AudioFeatures,
    digit_waveform,
    dtmf_tone,
)

Q23 = {1: (697, 1209), 2: (697, 1336), 3: (697, 1477), 4: (770, 1209), 5: (770, 1336), 6: (770, 1477)}
Q23 |= {7: (852, 1209), 8: (852, 1336), 9: (852, 1477), 0: (941, 1336)}


@pytest.fixture(scope="module")
def features():
    return AudioFeatures()


def _two_peaks(wave: np.ndarray) -> list[float]:
    """The frequencies (Hz) of the two largest spectral peaks, on a 0.25 Hz grid (Hann window, zero padding),
    the second at least 50 Hz from the first."""
    n = 4 * SAMPLE_RATE
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), n=n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    first = int(spectrum.argmax())
    spectrum[np.abs(freqs - freqs[first]) < 50] = 0
    return sorted([float(freqs[first]), float(freqs[spectrum.argmax()])])


def test_the_keypad_is_q23():
    assert DTMF_FREQUENCIES == Q23


@pytest.mark.parametrize("digit", range(10))
def test_each_tone_peaks_at_its_two_q23_frequencies(digit):
    # exact on a clean 1 s tone (1 Hz bins, an integer number of cycles: no leakage)
    clean = np.abs(np.fft.rfft(dtmf_tone(digit, 1.0)))
    assert sorted(np.argsort(clean)[-2:].tolist()) == list(Q23[digit])
    # within 1 Hz on the varied samples (40-500 ms, unequal amplitudes, noise)
    for index in range(4):
        wave = digit_waveform(digit, index, seed=3)
        low, high = _two_peaks(wave)
        assert abs(low - Q23[digit][0]) <= 1.0 and abs(high - Q23[digit][1]) <= 1.0, (index, low, high)


def test_samples_vary_and_are_determined_by_seed_and_index():
    waves = [digit_waveform(5, i, seed=0) for i in range(6)]
    assert len({len(w) for w in waves}) > 1 and all(w.dtype == np.float32 for w in waves)
    assert all(0.06 * SAMPLE_RATE <= len(w) <= 0.5 * SAMPLE_RATE for w in waves)
    assert len({round(float(np.abs(w).max()), 4) for w in waves}) == 6  # amplitudes and noise differ
    assert np.array_equal(digit_waveform(5, 2, seed=0), waves[2])
    assert not np.array_equal(digit_waveform(5, 2, seed=1)[:900], waves[2][:900])


def test_log_mel_features_have_whisper_shape_and_separate_the_digits(features):
    labels = [d for d in range(10) for _ in range(4)]
    mel = features([digit_waveform(d, i, seed=0) for i, d in enumerate(labels)])
    assert mel.shape == (40, 80, 100) and mel.dtype == torch.float32 and torch.isfinite(mel).all()
    # a tone of 60-500 ms is loud in the first frames and padded with silence up to 1 s
    assert (mel[:, :, :5].mean() > mel[:, :, -5:].mean()).item()
    # nearest class mean (leave one out) of the tone's spectrum (its first 50 ms, standardised per sample: the
    # amplitude is a shift of the log spectrum): the DTMF pair makes the digit learnable from the features
    profile = mel[:, :, :5].mean(dim=2)  # [N, 80]
    profile = (profile - profile.mean(1, keepdim=True)) / profile.std(1, keepdim=True)
    labels = torch.tensor(labels)
    correct = 0
    for i in range(len(labels)):
        keep = torch.arange(len(labels)) != i
        means = torch.stack([profile[keep & (labels == d)].mean(0) for d in range(10)])
        correct += int((means - profile[i]).norm(dim=1).argmin() == labels[i])
    assert correct == len(labels)


@pytest.mark.parametrize(
    "audio, rate, match",
    [
        (np.zeros(8000, np.float32), 8000, r"sampling_rate.*16000 Hz.*8000"),
        (np.zeros((2, 8000), np.float32), SAMPLE_RATE, r"mono audio.*2 channels"),
        (np.zeros(100, np.float32), SAMPLE_RATE, r"640 to 16000 samples.*100 samples"),
        (np.zeros(20000, np.float32), SAMPLE_RATE, r"640 to 16000 samples.*20000 samples"),
        (np.zeros(8000, np.int16), SAMPLE_RATE, r"floating-point samples"),
    ],
    ids=["sample_rate", "stereo", "too_short", "too_long", "integer"],
)
def test_bad_audio_is_a_typed_error_naming_what_was_expected(features, audio, rate, match):
    with pytest.raises(mome.InvalidInputError, match=match):
        features([audio], sampling_rate=rate)


def test_one_channel_shapes_are_accepted(features):
    wave = digit_waveform(1, 0)
    one = features([wave])
    torch.testing.assert_close(features([wave[None]]), one)
    torch.testing.assert_close(features([torch.from_numpy(wave)[:, None]]), one)


def test_the_digits_module_carries_audio_of_each_samples_digit(features):
    from mome.data import DigitsDataModule

    model = mome.create_model("vlmo_tiny_patch8_32")
    datamodule = DigitsDataModule(task="image_text_audio", batch_size=4, eval_batch_size=4)
    datamodule.bind(model, lambda texts: torch.zeros(len(texts), 16, dtype=torch.long))
    datamodule.setup("fit")
    val = datamodule.datasets["val"]
    assert isinstance(val, DigitsAudioDataset)
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["audio"].shape == (4, 80, 100) and set(batch) == {"image", "text", "label", "audio"}
    for i in range(4):  # the tone of sample i's own digit, seeded by its split and index
        expected = features([digit_waveform(int(batch["label"][i]), i, val.audio_seed)])[0]
        torch.testing.assert_close(batch["audio"][i], expected)
    assert datamodule.datasets["train"].audio_seed != val.audio_seed
