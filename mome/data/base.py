"""Base of mome's Lightning data modules: datasets of dict samples, preprocessing bound from the model.

Every data module yields batches as dicts (``torch.utils.data.default_collate`` of dict samples):

- image classification: ``{"image": FloatTensor [B, 3, H, W], "label": LongTensor [B]}``
- image-text pairs: ``{"image": [B, 3, H, W], "text": LongTensor [B, L]}`` plus ``"label"`` where the
  caption comes from a class (zero-shot evaluation);
- conversations (LLaVA): ``{"images", "input_ids", "attention_mask", "labels"}`` (see ``conversation``).

Preprocessing is not configured by hand: the training script calls :meth:`MomeDataModule.bind` with the
model, and the module builds its image transforms with timm's ``resolve_model_data_config`` and
``create_transform`` (size, mean, std, interpolation, crop from the model's pretrained cfg) and takes the
model's tokenizer (``mome.get_tokenizer``), as timm's and open_clip's training scripts do.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from timm.data import create_transform, resolve_model_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .._checks import check_int
from .._errors import InvalidArgumentError, MomeError

__all__ = [
    "BadSampleError",
    "DataConfigError",
    "EpochSampler",
    "MomeDataModule",
    "ResumableDataLoader",
    "SeededSamples",
    "raw_image",
]


class DataConfigError(MomeError, ValueError):
    """A data module's configuration or files are unusable (missing path, empty split, bad record)."""


class BadSampleError(DataConfigError):
    """One sample cannot be read (missing or corrupt image file, missing field); ``path`` names the file."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class SeededSamples(Dataset):
    """Random augmentation that depends only on ``(seed, draw)``, not on the global RNG state.

    ``dataset[draw]`` reads sample ``draw % len(dataset)`` with Python's ``random`` (timm's transforms)
    and torch's RNG (torchvision's) seeded from ``(seed, draw)`` inside ``fork_rng``, restoring both
    afterwards. A sample's augmentation is then the same for any number of workers and after a resume,
    and data loading does not shift the RNG stream of the model (noisy routers): what makes a resumed
    run equal an uninterrupted one. :class:`EpochSampler` draws ``epoch * N + index``, so epochs differ.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, draw: int) -> Any:
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            seed = (self.seed * 1_000_003 + draw) % (2**63)
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                return self.dataset[draw % len(self)]
            finally:
                random.setstate(state)


class EpochSampler(Sampler[int]):
    """Draws ``epoch * N + i`` for the indices ``i`` in a fixed order per epoch (``randperm`` seeded by
    ``seed + epoch``), optionally resuming inside an epoch (for :class:`SeededSamples`).

    Lightning calls :meth:`set_epoch` at each epoch start; :attr:`skip` drops the first samples of the
    next iteration only (the part of an interrupted epoch that was already trained on).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        skip, self.skip = self.skip, 0
        yield from (order[skip:] + self.epoch * self.num_samples).tolist()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch travels in Lightning checkpoints.

    Lightning saves the ``state_dict`` of stateful loaders with the fit loop and restores it on
    ``ckpt_path=`` resume; this one stores the epoch and the number of batches the trainer has processed
    in it (read from the trainer, not counted at ``next()``, because Lightning prefetches one batch), so a
    run killed mid-epoch resumes on the very next batch with the same order: the resumed run sees the
    same batches as an uninterrupted one. Single-process only: under a distributed strategy Lightning
    replaces the sampler with its ``DistributedSampler`` and an interrupted epoch restarts.
    """

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool, progress: Callable[[], int], **kwargs: Any):
        self.epoch_sampler = EpochSampler(len(dataset), seed=seed, shuffle=shuffle)  # type: ignore[arg-type]
        self._progress = progress
        super().__init__(dataset, sampler=self.epoch_sampler, **kwargs)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch_sampler.epoch, "batches": int(self._progress())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch_sampler.set_epoch(int(state["epoch"]))
        self.epoch_sampler.skip = int(state["batches"]) * int(self.batch_size or 1)


def raw_image(image: Any) -> Any:
    """The transform of :meth:`MomeDataModule.bind_raw`: the image as it is (a PIL image for the model's processor)."""
    return image


class MomeDataModule(L.LightningDataModule):
    """Splits ``train``/``val``/``test`` as datasets of dict samples; transforms bound from the model.

    Args:
        batch_size: training batch size (per process).
        eval_batch_size: batch size for validation/test/predict (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        augment: keyword overrides for timm's ``create_transform(is_training=True)`` (e.g.
            ``{"hflip": 0.0, "scale": [0.8, 1.0]}``); ``None`` uses timm's defaults.
        train_augment: ``False`` trains on the eval transform (no augmentation).
        pin_memory: DataLoader ``pin_memory``.
        seed: seed of the training order (epoch ``e`` uses ``seed + e``); ``None`` draws one from torch's RNG.
    """

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: Mapping[str, Any] | None = None,
        train_augment: bool = True,
        pin_memory: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise DataConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        check_int("data.eval_batch_size", eval_batch_size, optional=True)
        check_int("data.num_workers", num_workers, minimum=0)
        check_int("data.seed", seed, minimum=0, optional=True)
        for name, flag in (("data.train_augment", train_augment), ("data.pin_memory", pin_memory)):
            if not isinstance(flag, bool):
                raise InvalidArgumentError(name, "true or false", flag)
        if augment is not None and not isinstance(augment, Mapping):
            raise InvalidArgumentError("data.augment", "a mapping of create_transform arguments (or null)", augment)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.augment = dict(augment or {})
        self.train_augment = train_augment
        self.pin_memory = pin_memory
        self.seed = int(torch.randint(2**31, ()).item()) if seed is None else seed  # seed=null: unseeded
        self.train_transform: Callable | None = None
        self.eval_transform: Callable | None = None
        self.tokenizer: Callable[..., torch.Tensor] | None = None
        self.data_config: dict[str, Any] = {}
        self.datasets: dict[str, Dataset] = {}

    # -- preprocessing -------------------------------------------------------------------------------
    def bind(self, model: nn.Module, tokenizer: Callable[..., torch.Tensor] | None = None) -> None:
        """Build the image transforms from ``model``'s data config and keep its ``tokenizer``."""
        self.data_config = resolve_model_data_config(model)
        self.eval_transform = create_transform(**self.data_config, is_training=False)
        if self.train_augment:
            self.train_transform = create_transform(**self.data_config, is_training=True, **self.augment)
        else:
            self.train_transform = self.eval_transform
        self.tokenizer = tokenizer

    def bind_raw(self) -> None:
        """Bind for a model that brings its own processor (transformers' VLMs, :mod:`mome.models.hf_moe_vlm`): no
        transform and no tokenizer, the samples' images stay PIL images (:func:`raw_image`) for the processor."""
        self.data_config = {}
        self.eval_transform = self.train_transform = raw_image
        self.tokenizer = None

    def _require_bound(self) -> None:
        if self.eval_transform is None:
            raise DataConfigError(
                f"{type(self).__name__}.bind(model, tokenizer) must be called before setup(): the image "
                "transforms come from the model's pretrained cfg"
            )

    # -- loaders -------------------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            self.setup("fit" if split in ("train", "val") else "test")
        if split not in self.datasets:
            raise DataConfigError(self.missing_split(split))
        dataset = self.datasets[split]
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise DataConfigError(f"{type(self).__name__}: the {split!r} split is empty")
        kwargs = dict(
            batch_size=batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
            drop_last=shuffle and len(dataset) > batch_size,  # type: ignore[arg-type]
        )
        trainer = self.trainer
        if split == "train" and (trainer is None or trainer.world_size == 1):
            seeded = SeededSamples(dataset, self.seed)
            return ResumableDataLoader(seeded, seed=self.seed, shuffle=shuffle, progress=self._batches_done, **kwargs)
        return DataLoader(SeededSamples(dataset, self.seed) if split == "train" else dataset, shuffle=shuffle, **kwargs)

    def _batches_done(self) -> int:
        """Training batches the trainer has processed in the current epoch (0 outside a fit)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def missing_split(self, split: str) -> str:
        """Why ``split`` has no dataset (a subclass names the field that configures it)."""
        return f"{type(self).__name__} has no {split!r} split"

    collate_fn: Callable | None = None  # default_collate unless a subclass sets one

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
