"""The embedded default dataset: scikit-learn's handwritten digits as an image-caption set.

``sklearn.datasets.load_digits`` ships inside the scikit-learn wheel (UCI "Optical Recognition of
Handwritten Digits", 1,797 grey 8x8 images of the digits 0-9, values 0-16), so training and evaluation
need no download. Each image becomes an RGB PIL image (``value * 255 / 16``), resized by the model's own
transform; each sample gets one caption from :data:`DIGIT_TEMPLATES` filled with its class name, the
template chosen by the sample's index (deterministic: a resumed run sees the same captions).

Splits are fixed and stratified by class (seed 0): 1,297 train, 250 val, 250 test images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import DataConfigError, MomeDataModule
from .digits_audio import AudioFeatures, digit_waveform

__all__ = [
    "DIGIT_CLASSNAMES",
    "DIGIT_TEMPLATES",
    "DigitsAudioDataset",
    "DigitsDataModule",
    "DigitsDataset",
    "digits_splits",
]

DIGIT_CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption templates (open_clip's zero-shot convention: a callable or format string per template).
DIGIT_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "handwritten {}.",
    "a scan of a handwritten {}.",
    "the digit {}.",
    "a blurry picture of the number {}.",
    "a drawing of a {}.",
)
SPLIT_SIZES = {"val": 250, "test": 250}  # the rest (1,297) is train
TASKS = ("image_text", "image_text_audio", "classification")


def digits_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (images uint8 [N, 8, 8], labels int64 [N])}``, stratified by class, fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    holdout = SPLIT_SIZES["val"] + SPLIT_SIZES["test"]
    train_x, rest_x, train_y, rest_y = train_test_split(
        images, labels, test_size=holdout, stratify=labels, random_state=seed
    )
    val_x, test_x, val_y, test_y = train_test_split(
        rest_x, rest_y, test_size=SPLIT_SIZES["test"], stratify=rest_y, random_state=seed
    )
    return {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}


class DigitsDataset(Dataset):
    """Digits as dict samples: ``{"image", "label"}`` and, with a tokenizer, ``"text"`` ``[L]`` too."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[..., torch.Tensor] | None = None,
        templates: Sequence[str] = DIGIT_TEMPLATES,
        classnames: Sequence[str] = DIGIT_CLASSNAMES,
    ) -> None:
        self.images, self.labels = images, labels
        self.transform, self.tokenizer = transform, tokenizer
        self.templates, self.classnames = tuple(templates), tuple(classnames)

    def __len__(self) -> int:
        return len(self.labels)

    def caption(self, index: int) -> str:
        label = int(self.labels[index])
        return self.templates[index % len(self.templates)].format(self.classnames[label])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        sample: dict[str, Any] = {"image": self.transform(image), "label": int(self.labels[index])}
        if self.tokenizer is not None:
            sample["text"] = self.tokenizer([self.caption(index)])[0]
        return sample


class DigitsAudioDataset(DigitsDataset):
    """The digits with three modalities: :class:`~mome.data.digits.DigitsDataset`'s ``"image"``, ``"label"`` (and
    ``"text"`` with a tokenizer) plus ``"audio"``, the ``[80, 100]`` log-mel features of the sample's DTMF tone
    (:func:`~mome.data.digits_audio.digit_waveform` of its label, index and ``audio_seed``).

    The features of the whole split are computed once, at the first sample read, in batches of
    :attr:`FEATURE_BATCH` clips (the extractor's cost is per call: one clip at a time is ~30x slower), and kept
    (``[N, 80, 100]`` float32, 32 KB a sample); each sample's features equal those of its clip alone."""

    FEATURE_BATCH = 256

    def __init__(self, *args: Any, audio_seed: int = 0, features: AudioFeatures | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audio_seed = audio_seed
        self.features = features or AudioFeatures()
        self._audio: torch.Tensor | None = None  # [N, mel, frames], computed at the first read

    def waveform(self, index: int) -> np.ndarray:
        return digit_waveform(int(self.labels[index]), index, self.audio_seed)

    def audio_features(self) -> torch.Tensor:
        """``[N, mel, frames]``: the features of every sample of the split (computed once)."""
        if self._audio is None:
            waves = [self.waveform(i) for i in range(len(self))]
            chunks = [
                self.features(waves[s : s + self.FEATURE_BATCH]) for s in range(0, len(waves), self.FEATURE_BATCH)
            ]
            self._audio = (
                torch.cat(chunks) if chunks else torch.zeros(0, self.features.num_mel_bins, self.features.num_frames)
            )
        return self._audio

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        sample["audio"] = self.audio_features()[index]  # [mel, frames]
        return sample


class DigitsDataModule(MomeDataModule):
    """scikit-learn's digits (embedded, no download) for classification or image-text training.

    Args:
        task: ``"image_text"`` (samples carry a tokenized caption; needs a tokenizer at :meth:`bind`),
            ``"image_text_audio"`` (and each digit's DTMF tone as log-mel ``"audio"`` features,
            :class:`DigitsAudioDataset`; the split's index seeds the tone) or
            ``"classification"``.
        templates: caption templates, also used for zero-shot evaluation (``{}`` = class name).
        split_seed: seed of the fixed stratified split.
        **kwargs: :class:`MomeDataModule` arguments (batch sizes, workers, augmentation).
    """

    def __init__(
        self,
        task: str = "image_text",
        templates: Sequence[str] = DIGIT_TEMPLATES,
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if task not in TASKS:
            raise DataConfigError(f"data.task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
        if not templates or any("{}" not in t for t in templates):
            raise DataConfigError(f"data.templates must be non-empty format strings with '{{}}', got {templates!r}")
        self.task = task
        self.templates = tuple(templates)
        self.classnames = DIGIT_CLASSNAMES
        self.num_classes = len(DIGIT_CLASSNAMES)
        self.split_seed = split_seed

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities of a sample by ``task``: image (classification), image and text, or image, text and audio."""
        return {"classification": ("image",), "image_text": ("image", "text")}.get(
            self.task, ("image", "text", "audio")
        )

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self._require_bound()
        with_text = self.task != "classification"
        if with_text and self.tokenizer is None:
            raise DataConfigError(f"data.task={self.task} needs the model's tokenizer: bind(model, tokenizer)")
        tokenizer = self.tokenizer if with_text else None
        for seed, (split, (images, labels)) in enumerate(digits_splits(self.split_seed).items()):
            transform = self.train_transform if split == "train" else self.eval_transform
            args = (images, labels, transform, tokenizer, self.templates, self.classnames)
            if self.task == "image_text_audio":
                self.datasets[split] = DigitsAudioDataset(*args, audio_seed=self.split_seed * 3 + seed)
            else:
                self.datasets[split] = DigitsDataset(*args)
