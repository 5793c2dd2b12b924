"""Data modules over files on disk: an ImageFolder tree (classification) and a CSV of image-text pairs.

Two formats users already have on disk:

- **ImageFolder** (torchvision's :class:`~torchvision.datasets.ImageFolder`): ``root/<split>/<class>/<image>``, one
  folder per class, labels are the indices of the sorted class folder names (torchvision's ``find_classes``). Used by
  timm's ``train.py`` and most ImageNet-style datasets. :class:`ImageFolderDataModule` yields
  ``{"image": FloatTensor [3, H, W], "label": int}``.
- **CSV of image-text pairs** (open_clip's ``open_clip_train.data.CsvDataset``, ``--dataset-type csv``): a
  delimited file (tab-separated by default, ``--csv-separator``) with a header row naming an image-path column
  (``--csv-img-key``, default ``filepath``) and a caption column (``--csv-caption-key``, default ``title``).
  :class:`CsvImageTextDataModule` yields ``{"image": FloatTensor [3, H, W], "text": LongTensor [L]}``, the caption
  tokenized with the model's tokenizer exactly as open_clip does (``tokenizer([caption])[0]``).

Unreadable samples raise :class:`BadSampleError` (a :class:`~mome.data.base.DataConfigError`) naming the file, so a
corrupt image deep in an epoch says which file to fix instead of surfacing a bare PIL error from a worker.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader, find_classes

from .base import BadSampleError, DataConfigError, MomeDataModule

__all__ = [
    "BadSampleError",
    "CsvImageTextDataModule",
    "CsvImageTextDataset",
    "ImageFolderDataModule",
    "load_image",
    "stratified_split",
]

# the splits each Lightning stage needs (``predict`` reads the test split, as MomeDataModule.predict_dataloader does)
STAGE_SPLITS: dict[str | None, tuple[str, ...]] = {
    None: ("train", "val", "test"),
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


def load_image(path: str | os.PathLike, where: str = "") -> Image.Image:
    """Open ``path`` as an RGB image with torchvision's ``default_loader``; errors become :class:`BadSampleError`.

    ``where`` is appended to the message (e.g. the CSV row that named the file).
    """
    try:
        return default_loader(os.fspath(path))
    except FileNotFoundError as exc:
        raise BadSampleError(f"image file not found: {path}{where}", path) from exc
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL raises UnidentifiedImageError (an OSError) for non-images and OSError/SyntaxError for truncated files
        raise BadSampleError(f"not a readable image file: {path}{where} ({type(exc).__name__}: {exc})", path) from exc


def stratified_split(targets: Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Split sample indices into ``(train, val)``, taking ``fraction`` of every class for ``val``.

    Deterministic in ``seed`` (a ``torch.Generator`` drives one permutation per class, classes in sorted order).
    Each class with at least two samples gives at least one to each side; both lists are sorted.
    """
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []
    for target in sorted(by_class):
        indices = by_class[target]
        n = len(indices)
        n_val = min(n - 1, max(1, round(fraction * n))) if n > 1 else 0
        order = torch.randperm(n, generator=generator).tolist()
        val.extend(indices[i] for i in order[:n_val])
        train.extend(indices[i] for i in order[n_val:])
    return sorted(train), sorted(val)


class _FixedClassesImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` whose class list is given (the train split's), so val/test labels match train's."""

    def __init__(self, root: Path, transform: Callable | None, classes: list[str] | None) -> None:
        self._fixed_classes = classes
        super().__init__(os.fspath(root), transform=transform, loader=load_image, allow_empty=classes is not None)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self._fixed_classes is None:
            return super().find_classes(directory)
        return list(self._fixed_classes), {name: i for i, name in enumerate(self._fixed_classes)}

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = super().__getitem__(index)
        return {"image": image, "label": label}


class _SplitFilesDataModule(MomeDataModule):
    """Shared split bookkeeping: a split that is not configured fails with a message when its loader is asked for."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._unavailable: dict[str, str] = {}

    def _build(self, split: str) -> Dataset | None:
        raise DataConfigError(f"{type(self).__name__} does not define split {split!r}")

    def setup(self, stage: str | None = None) -> None:
        self._require_bound()
        for split in STAGE_SPLITS.get(stage, ("train", "val", "test")):
            if split in self.datasets:
                continue
            dataset = self._build(split)
            if dataset is not None:
                self.datasets[split] = dataset

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            self.setup("fit" if split in ("train", "val") else "test")
        if split not in self.datasets:
            raise DataConfigError(self._unavailable.get(split, f"{type(self).__name__}: no {split!r} split"))
        return super()._loader(split, shuffle, batch_size)


class ImageFolderDataModule(_SplitFilesDataModule):
    """Image classification from a torchvision ``ImageFolder`` tree: ``root/{train,val,test}/<class>/<image>``.

    Labels index the sorted class folder names of the train split (torchvision's ``find_classes``); val and test use
    the same mapping, so a class missing from val keeps its index. Files are filtered by torchvision's
    ``IMG_EXTENSIONS`` and opened with its ``default_loader`` (RGB); a corrupt file raises :class:`BadSampleError`.

    Args:
        root: the dataset folder (config field ``data.root``).
        train_dir, val_dir, test_dir: split sub-folders of ``root``; ``None`` means the split does not exist.
        val_fraction: when there is no val folder, hold out this fraction of every train class as the val split
            (:func:`stratified_split`, deterministic in ``seed``; evaluated with the eval transform).
        seed: seed of the val split and (as in MomeDataModule) of the training order.
        **kwargs: :class:`~mome.data.base.MomeDataModule` arguments (``batch_size``, ``num_workers``, ...).

    Attributes:
        classnames: class folder names with ``_`` replaced by spaces (for zero-shot prompts), in label order.
        num_classes: ``len(classnames)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train_dir: str | None = "train",
        val_dir: str | None = "val",
        test_dir: str | None = "test",
        val_fraction: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(seed=seed, **kwargs)
        if val_fraction is not None and (not isinstance(val_fraction, float) or not 0.0 < val_fraction < 1.0):
            raise DataConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        self.root = Path(root).expanduser()
        self.split_dirs = {"train": train_dir, "val": val_dir, "test": test_dir}
        self.val_fraction = val_fraction
        self._classes: list[str] | None = None

    # -- classes -------------------------------------------------------------------------------------
    def _split_path(self, split: str) -> Path | None:
        """``root/<split_dir>`` if it is a directory, else ``None``; a missing root is always an error."""
        if not self.root.is_dir():
            raise DataConfigError(f"data.root: {os.fspath(self.root)!r} is not a directory")
        name = self.split_dirs[split]
        if name is None:
            return None
        path = self.root / name
        return path if path.is_dir() else None

    def _require_split_path(self, split: str) -> Path:
        path = self._split_path(split)
        if path is None:
            name = self.split_dirs[split]
            reason = "is not set" if name is None else f"{os.fspath(self.root / name)!r} is not a directory"
            raise DataConfigError(
                f"data.{split}_dir: {reason} (expected the ImageFolder layout "
                f"<data.root>/<data.{split}_dir>/<class>/<image>)"
            )
        return path

    @property
    def class_folders(self) -> list[str]:
        """Class folder names of the train split, sorted (label order)."""
        if self._classes is None:
            path = self._require_split_path("train")
            try:
                self._classes, _ = find_classes(os.fspath(path))
            except FileNotFoundError as exc:
                raise DataConfigError(f"data.train_dir: no class folders in {os.fspath(path)!r}") from exc
        return self._classes

    @property
    def classnames(self) -> list[str]:
        return [name.replace("_", " ") for name in self.class_folders]

    @property
    def num_classes(self) -> int:
        return len(self.class_folders)

    # -- datasets ------------------------------------------------------------------------------------
    def _folder(self, split: str, path: Path, transform: Callable | None, fixed: bool) -> _FixedClassesImageFolder:
        classes = self.class_folders
        if fixed:
            extra = sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and entry.name not in classes)
            if extra:
                raise DataConfigError(
                    f"data.{split}_dir: class folders {extra} in {os.fspath(path)!r} are not train classes"
                )
        try:
            dataset = _FixedClassesImageFolder(path, transform, classes if fixed else None)
        except FileNotFoundError as exc:  # torchvision: a class folder without any image file
            raise DataConfigError(f"data.{split}_dir: {exc} (in {os.fspath(path)!r})") from exc
        if len(dataset) == 0:
            raise DataConfigError(f"data.{split}_dir: no image files under {os.fspath(path)!r}")
        return dataset

    def _build(self, split: str) -> Dataset | None:
        path = self._split_path(split)
        split_val = self.val_fraction is not None and self._split_path("val") is None
        if split == "train":
            train_path = self._require_split_path("train")
            dataset = self._folder("train", train_path, self.train_transform, fixed=False)
            if split_val:
                train_indices, _ = stratified_split(dataset.targets, self.val_fraction, self.seed)
                return Subset(dataset, train_indices)
            return dataset
        if split == "val" and split_val:
            train_path = self._require_split_path("train")
            dataset = self._folder("train", train_path, self.eval_transform, fixed=False)
            _, val_indices = stratified_split(dataset.targets, self.val_fraction, self.seed)
            return Subset(dataset, val_indices)
        if path is None:
            name = self.split_dirs[split]
            reason = "is not set" if name is None else f"{os.fspath(self.root / name)!r} is not a directory"
            hint = "; set data.val_fraction to hold out part of the train split" if split == "val" else ""
            self._unavailable[split] = f"data.{split}_dir: {reason}{hint}"
            return None
        return self._folder(split, path, self.eval_transform, fixed=True)


def _undecodable_line(path: Path) -> int:
    """The first line of ``path`` that is not UTF-8 (0 when every line is)."""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 0


class CsvImageTextDataset(Dataset):
    """Image-text pairs listed in a CSV/TSV file, the format of open_clip's ``CsvDataset``.

    The file has a header row; ``img_key`` names the image path column and ``caption_key`` the caption column. Paths
    are used as written when absolute, else resolved against ``root`` (default: the CSV file's folder). Unlike
    open_clip (pandas), an empty caption stays the empty string (not ``"nan"``) and tokenizes to an empty sequence.
    Rows are read with Python's :mod:`csv` module (RFC 4180 quoting).

    Samples are ``{"image": transform(RGB image), "text": tokenizer([caption])[0]}``. ``field`` is the config field
    that named ``file``, quoted in errors.
    """

    def __init__(
        self,
        file: str | os.PathLike,
        transform: Callable | None,
        tokenizer: Callable[..., torch.Tensor],
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = "\t",
        root: str | os.PathLike | None = None,
        field: str = "data.train_file",
    ) -> None:
        self.file = Path(file).expanduser()
        self.transform = transform
        self.tokenizer = tokenizer
        if not self.file.is_file():
            raise DataConfigError(f"{field}: {os.fspath(self.file)!r} is not a file")
        base = Path(root).expanduser() if root is not None else self.file.parent
        self.images: list[str] = []
        self.captions: list[str] = []
        self.lines: list[int] = []  # line of the file each row starts on (the header is line 1)
        name = os.fspath(self.file)
        with open(self.file, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream, delimiter=sep)
            line = 1
            try:
                columns = reader.fieldnames or []
                for key, option in ((img_key, "data.img_key"), (caption_key, "data.caption_key")):
                    if key not in columns:
                        raise DataConfigError(
                            f"{option}: column {key!r} not found in {name!r} (columns: {columns}, separator {sep!r})"
                        )
                line = reader.line_num + 1
                for row in reader:
                    if None in row or None in row.values():  # more fields than the header, or fewer
                        count = len(columns) + len(row.get(None, ())) - sum(v is None for v in row.values())
                        raise DataConfigError(
                            f"{name}, line {line}: {count} field{'s' * (count != 1)}, the header has {len(columns)} "
                            f"(separator {sep!r}; quote a field that holds it)"
                        )
                    image = row[img_key].strip()
                    if not image:
                        raise DataConfigError(f"{name}, line {line}: empty {img_key!r} field")
                    self.images.append(os.fspath(base / image))  # an absolute path replaces base
                    self.captions.append(row[caption_key])
                    self.lines.append(line)
                    line = reader.line_num + 1
            except csv.Error as err:  # a NUL byte, an unterminated quote at the end of the file, a huge field
                raise DataConfigError(f"{name}, line {line}: not readable as CSV ({err})") from err
            except UnicodeDecodeError as err:
                raise DataConfigError(f"{name}, line {_undecodable_line(self.file)}: not UTF-8 text ({err})") from err
        if not self.captions:
            raise DataConfigError(f"{field}: {name!r} has no rows after its header")
        if not any(caption.strip() for caption in self.captions):
            raise DataConfigError(
                f"{field}: every {caption_key!r} caption of {name!r} is empty (data.caption_key names the caption "
                f"column; columns: {columns})"
            )

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        where = f" (named on line {self.lines[index]} of {os.fspath(self.file)})"
        image = load_image(self.images[index], where)
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "text": self.tokenizer([self.captions[index]])[0]}


class CsvImageTextDataModule(_SplitFilesDataModule):
    """Image-text pairs from CSV/TSV files in open_clip's ``CsvDataset`` format (see :class:`CsvImageTextDataset`).

    Args:
        train_file, val_file, test_file: the files of each split (``data.train_file``, ...); ``None``: no such split.
        img_key: image path column (open_clip ``--csv-img-key``).
        caption_key: caption column (open_clip ``--csv-caption-key``).
        sep: column separator (open_clip ``--csv-separator``, tab by default).
        root: folder that relative image paths are relative to (default: each CSV file's folder).
        **kwargs: :class:`~mome.data.base.MomeDataModule` arguments.

    ``bind(model, tokenizer)`` must be given the tokenizer: batches are ``{"image": [B, 3, H, W], "text": [B, L]}``.
    """

    def __init__(
        self,
        train_file: str | os.PathLike | None,
        val_file: str | os.PathLike | None = None,
        test_file: str | os.PathLike | None = None,
        img_key: str = "filepath",
        caption_key: str = "title",
        sep: str = "\t",
        root: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        self.img_key = img_key
        self.caption_key = caption_key
        self.sep = sep
        self.root = root

    def _build(self, split: str) -> Dataset | None:
        file = self.files[split]
        if file is None:
            self._unavailable[split] = f"data.{split}_file is not set: {type(self).__name__} has no {split!r} split"
            return None
        if self.tokenizer is None:
            raise DataConfigError(
                f"{type(self).__name__} tokenizes captions: call bind(model, tokenizer) with the model's tokenizer"
            )
        return CsvImageTextDataset(
            file,
            self.train_transform if split == "train" else self.eval_transform,
            self.tokenizer,
            img_key=self.img_key,
            caption_key=self.caption_key,
            sep=self.sep,
            root=self.root,
            field=f"data.{split}_file",
        )
