"""Streaming data module over WebDataset tar shards (the format of open_clip's ``--dataset-type webdataset``).

A shard is a POSIX tar file whose members are grouped into samples by their basename: ``000123.jpg``,
``000123.txt`` and ``000123.cls`` are the image, caption and class index of sample ``000123`` (webdataset's
convention, also written by img2dataset). Shard lists are brace patterns (``/data/cc3m/{00000..00331}.tar``),
``::``-joined patterns or lists of them, expanded by webdataset's ``expand_urls``; anything webdataset can open
works (local paths, ``pipe:`` commands, ``http(s)://``, ``s3://`` via ``gopen``), local paths are checked up front.

The pipeline is open_clip's ``get_wds_dataset`` expressed with the ``webdataset`` package: shards split by node and
DataLoader worker, shard and sample shuffling (training), ``decode("pilrgb")``, the image transform bound from the
model, the caption tokenized with the model's tokenizer (``tokenizer([text])[0]``) or the ``.cls`` member as
the label, and batching inside the workers. Batches are the dicts of :mod:`mome.data.base`:
``{"image": [B, 3, H, W], "text": LongTensor [B, L]}`` (``task="image_text"``) or
``{"image": [B, 3, H, W], "label": LongTensor [B]}`` (``task="classification"``).

An ``IterableDataset`` has no length. Without ``epoch_length`` a training epoch is one pass over the shards and
Lightning sees a loader of unknown length. With ``epoch_length`` (samples per epoch and process) shards are
resampled with replacement (open_clip's ``--dataset-resampled``) and every epoch has exactly
``ceil(epoch_length / batch_size)`` batches (rounded up to a multiple of the worker count), which ``len()`` reports
so that Lightning and LR schedules know the number of steps and every DDP rank takes the same number of steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate

from .._checks import check_int
from .base import BadSampleError, DataConfigError, MomeDataModule
from .folders import STAGE_SPLITS

__all__ = ["WebDatasetDataModule", "expand_shards"]

_TASKS = ("image_text", "classification")
_SHARD_SHUFFLE = 100  # shards held in webdataset's shard shuffle buffer (open_clip's _SHARD_SHUFFLE_SIZE is 2000)


def expand_shards(urls: str | Sequence[str], field: str = "data.train_urls") -> list[str]:
    """Expand brace/``::`` shard patterns to a list of URLs; local files must exist (``DataConfigError`` otherwise)."""
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    shards = [url for pattern in patterns for url in wds.shardlists.expand_urls(os.fspath(pattern))]
    if not shards:
        raise DataConfigError(f"{field}: no shards in {urls!r}")
    missing = []
    for url in shards:
        scheme = urlparse(url).scheme
        if url.startswith("pipe:") or (scheme not in ("", "file") and len(scheme) > 1):  # 1 letter: a Windows drive
            continue
        path = Path(urlparse(url).path if scheme == "file" else url).expanduser()
        if not path.is_file():
            missing.append(os.fspath(path))
    if missing:
        shown = ", ".join(repr(path) for path in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise DataConfigError(
            f"{field}: {len(missing)} of {len(shards)} shards do not exist ({shown}; pattern {urls!r})"
        )
    return shards


def _raise_bad_sample(exn: Exception) -> bool:
    """webdataset exception handler: a member that cannot be decoded becomes a :class:`BadSampleError`."""
    if isinstance(exn, wds.DecodingError):
        raise BadSampleError(
            f"{exn.url}: member {exn.k!r} of sample {exn.key!r} cannot be decoded "
            f"({type(exn.__cause__).__name__}: {exn.__cause__})",
            exn.url,
        ) from exn
    raise exn


class _ToSample:
    """Map a decoded webdataset sample (dict of members) to mome's dict sample, transformed and tokenized."""

    def __init__(
        self,
        task: str,
        image_key: str,
        target_key: str,
        transform: Callable | None,
        tokenizer: Callable[..., torch.Tensor] | None,
    ) -> None:
        self.task = task
        self.image_key = image_key
        self.target_key = target_key
        self.transform = transform
        self.tokenizer = tokenizer

    def _member(self, sample: dict[str, Any], keys: str) -> Any:
        value = wds.getfirst(sample, keys, missing_is_error=False)
        if value is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise BadSampleError(
                f"{sample.get('__url__')}: sample {sample.get('__key__')!r} has no {keys!r} member "
                f"(members: {members})",
                sample.get("__url__"),
            )
        return value

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = self._member(sample, self.image_key)
        out = {"image": self.transform(image) if self.transform is not None else image}
        target = self._member(sample, self.target_key)
        if self.task == "classification":
            try:
                out["label"] = int(target)
            except (TypeError, ValueError) as err:
                raise BadSampleError(
                    f"{sample.get('__url__')}: sample {sample.get('__key__')!r}: member {self.target_key!r} is not "
                    f"a class index ({target!r:.60})",
                    sample.get("__url__"),
                ) from err
        else:
            out["text"] = self.tokenizer([target if isinstance(target, str) else str(target)])[0]
        return out


class WebDatasetDataModule(MomeDataModule):
    """Image-text pairs or labelled images streamed from WebDataset tar shards.

    Args:
        train_urls, val_urls, test_urls: shard patterns of each split (``data.train_urls``, ...), e.g.
            ``"/data/shards/train-{000000..000127}.tar"`` or a list of patterns; ``None``: no such split.
        image_key: image member extensions, ``;``-separated alternatives (webdataset ``to_tuple`` syntax).
        text_key: caption member extension (``task="image_text"``).
        label_key: class index member extension (``task="classification"``; webdataset decodes ``cls`` to int).
        task: ``"image_text"`` (needs ``bind(model, tokenizer)``) or ``"classification"``.
        shuffle_buffer: samples in the training shuffle buffer (``0``: no sample shuffling).
        epoch_length: samples per training epoch and process; resamples shards with replacement and gives the
            training loader a length. ``None``: one pass over the training shards per epoch.
        seed: seed of the shard and sample shuffles (webdataset ``detshuffle``: a new order every epoch).
        **kwargs: :class:`~mome.data.base.MomeDataModule` arguments (``batch_size``, ``num_workers``, ...).

    Evaluation splits are read once, in order, with a partial last batch; training drops the partial last batch
    of each worker. With several processes or workers and no ``epoch_length`` give at least as many shards as
    workers times processes, as open_clip requires.
    """

    def __init__(
        self,
        train_urls: str | Sequence[str] | None,
        val_urls: str | Sequence[str] | None = None,
        test_urls: str | Sequence[str] | None = None,
        image_key: str = "jpg;png;jpeg;webp",
        text_key: str = "txt",
        label_key: str = "cls",
        task: str = "image_text",
        shuffle_buffer: int = 1000,
        epoch_length: int | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(seed=seed, **kwargs)
        if task not in _TASKS:
            raise DataConfigError(f"data.task must be one of {_TASKS}, got {task!r}")
        check_int("data.epoch_length", epoch_length, optional=True)
        check_int("data.shuffle_buffer", shuffle_buffer, minimum=0)
        self.urls = {"train": train_urls, "val": val_urls, "test": test_urls}
        self.image_key = image_key
        self.text_key = text_key
        self.label_key = label_key
        self.task = task
        self.shuffle_buffer = shuffle_buffer
        self.epoch_length = epoch_length

    def num_batches(self, split: str = "train") -> int | None:
        """Batches per epoch of ``split`` (all workers together), or ``None`` when only a full pass tells."""
        if split != "train" or self.epoch_length is None:
            return None
        return self._worker_batches() * max(1, self.num_workers)

    def _worker_batches(self) -> int:
        return math.ceil(math.ceil(self.epoch_length / self.batch_size) / max(1, self.num_workers))

    def _pipeline(self, split: str) -> IterableDataset:
        train = split == "train"
        resampled = train and self.epoch_length is not None
        shards = expand_shards(self.urls[split], field=f"data.{split}_urls")
        dataset = wds.WebDataset(
            shards,
            handler=wds.reraise_exception,
            resampled=resampled,
            shardshuffle=_SHARD_SHUFFLE if train and not resampled and len(shards) > 1 else False,
            detshuffle=True,
            seed=self.seed,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,  # a worker without a shard is fine for evaluation (fewer shards than workers)
        )
        if train and self.shuffle_buffer > 0:
            dataset = dataset.compose(wds.detshuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=self.seed))
        target_key = self.label_key if self.task == "classification" else self.text_key
        to_sample = _ToSample(
            self.task,
            self.image_key,
            target_key,
            self.train_transform if train else self.eval_transform,
            self.tokenizer,
        )
        dataset = dataset.decode("pilrgb", handler=_raise_bad_sample).map(to_sample)
        batch_size = self.batch_size if train else self.eval_batch_size
        dataset = dataset.batched(batch_size, collation_fn=self.collate_fn or default_collate, partial=not train)
        if resampled:
            # each worker yields its share of the epoch, then stops; len() is the total (open_clip's with_epoch)
            dataset = dataset.with_epoch(self._worker_batches()).with_length(self.num_batches("train"), silent=True)
        return dataset

    def setup(self, stage: str | None = None) -> None:
        self._require_bound()
        if self.task == "image_text" and self.tokenizer is None:
            raise DataConfigError(
                f"{type(self).__name__}(task='image_text') tokenizes captions: call bind(model, tokenizer)"
            )
        for split in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            if split not in self.datasets and self.urls[split] is not None:
                self.datasets[split] = self._pipeline(split)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        """A DataLoader over the already batched pipeline (``batch_size=None``), as open_clip's ``WebLoader``."""
        if split not in self.datasets:
            self.setup("fit" if split in ("train", "val") else "test")
        if split not in self.datasets:
            raise DataConfigError(f"data.{split}_urls is not set: {type(self).__name__} has no {split!r} split")
        return DataLoader(
            self.datasets[split],
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
