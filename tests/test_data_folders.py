"""File-based data modules: ImageFolder trees, open_clip CSV files, WebDataset shards (all written in tmp_path)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
import webdataset as wds
from PIL import Image

import mome
from mome.data.base import DataConfigError
from mome.data.folders import (
    BadSampleError,
    CsvImageTextDataModule,
    ImageFolderDataModule,
    stratified_split,
)
from mome.data.webdataset import WebDatasetDataModule

CLASSES = ["cat", "dog", "red_panda"]


@pytest.fixture(scope="module")
def model():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3)
    # the cfg a registered 32px model would carry: bind() reads the input size from it
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 32)}
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


def _image(seed: int, size: tuple[int, int] = (40, 36), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8).squeeze()
    return Image.fromarray(pixels, mode=mode)


def _folder_tree(root: Path, splits: dict[str, dict[str, int]]) -> Path:
    """``root/<split>/<class>/<i>.png`` with the given number of images per class."""
    seed = 0
    for split, counts in splits.items():
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                _image(seed, mode="L" if i == 0 else "RGB").save(root / split / name / f"{i}.png")
    return root


def _check_image_batch(batch, batch_size, model):
    assert batch["image"].shape == (batch_size, 3, 32, 32)
    assert batch["image"].dtype == torch.float32
    with torch.no_grad():
        assert model(batch["image"]).shape == (batch_size, 3)


# -- ImageFolder ----------------------------------------------------------------------------------------------------
def test_image_folder_batches_and_labels(tmp_path, model):
    root = _folder_tree(
        tmp_path / "data", {"train": dict.fromkeys(CLASSES, 3), "val": {"dog": 2, "red_panda": 1}, "test": {"cat": 2}}
    )
    dm = ImageFolderDataModule(root, batch_size=4, eval_batch_size=3)
    assert dm.classnames == ["cat", "dog", "red panda"]
    assert dm.num_classes == 3
    dm.bind(model)
    dm.setup("fit")

    batch = next(iter(dm.train_dataloader()))
    _check_image_batch(batch, 4, model)
    assert batch["label"].dtype == torch.int64
    val = next(iter(dm.val_dataloader()))
    _check_image_batch(val, 3, model)
    # val lacks "cat": its labels keep the train indices (dog=1, red_panda=2), not a re-numbering from 0
    assert val["label"].tolist() == [1, 1, 2]
    for path, label in dm.datasets["train"].samples:
        assert Path(path).parent.name == CLASSES[label]
    assert next(iter(dm.test_dataloader()))["label"].tolist() == [0, 0]


def test_image_folder_val_fraction_split_is_deterministic(tmp_path, model):
    root = _folder_tree(tmp_path / "data", {"train": {"cat": 8, "dog": 4, "red_panda": 2}})

    def split(seed):
        dm = ImageFolderDataModule(root, val_fraction=0.25, seed=seed, batch_size=2)
        dm.bind(model)
        dm.setup("fit")
        return dm.datasets["train"].indices, dm.datasets["val"].indices, dm

    train, val, dm = split(0)
    assert (train, val) == split(0)[:2]
    assert val != split(1)[1]
    assert sorted(train + val) == list(range(14)) and not set(train) & set(val)
    targets = dm.datasets["val"].dataset.targets
    assert sorted(targets[i] for i in val) == [0, 0, 1, 2]  # 8*0.25, 4*0.25, at least one of 2
    # the held-out samples use the eval transform, the rest the training transform
    assert dm.datasets["val"].dataset.transform is dm.eval_transform
    assert dm.datasets["train"].dataset.transform is dm.train_transform
    assert next(iter(dm.val_dataloader()))["image"].shape == (2, 3, 32, 32)
    assert stratified_split([0, 0, 0, 1], 0.5, seed=3) == stratified_split([0, 0, 0, 1], 0.5, seed=3)


def test_image_folder_missing_paths(tmp_path, model):
    with pytest.raises(DataConfigError, match=r"data\.root.*nowhere"):
        ImageFolderDataModule(tmp_path / "nowhere").classnames  # noqa: B018

    root = _folder_tree(tmp_path / "data", {"train": {"cat": 2, "dog": 2}})
    dm = ImageFolderDataModule(root, batch_size=2)
    dm.bind(model)
    dm.setup("fit")
    with pytest.raises(DataConfigError, match=r"data\.val_dir.*val.*data\.val_fraction"):
        dm.val_dataloader()
    with pytest.raises(DataConfigError, match=r"data\.test_dir.*test"):
        dm.test_dataloader()

    no_train = ImageFolderDataModule(root, train_dir="training")
    no_train.bind(model)
    with pytest.raises(DataConfigError, match=r"data\.train_dir.*training"):
        no_train.setup("fit")

    (root / "val" / "horse").mkdir(parents=True)
    _image(0).save(root / "val" / "horse" / "0.png")
    with pytest.raises(DataConfigError, match=r"data\.val_dir.*horse"):
        dm.setup("validate")

    unbound = ImageFolderDataModule(root)
    with pytest.raises(DataConfigError, match="bind"):
        unbound.setup("fit")


def test_image_folder_corrupt_image(tmp_path, model):
    root = _folder_tree(tmp_path / "data", {"train": {"cat": 1, "dog": 1}})
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    dm = ImageFolderDataModule(root, batch_size=3, train_augment=False)
    dm.bind(model)
    dm.setup("fit")
    with pytest.raises(BadSampleError, match="broken.jpg") as info:
        list(dm.train_dataloader())
    assert info.value.path == str(bad)


# -- CSV (open_clip CsvDataset format) ------------------------------------------------------------------------------
def _write_csv(path: Path, header: list[str], rows: list[list[str]], sep: str = "\t") -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_batches_and_tokens(tmp_path, model, tokenizer):
    (tmp_path / "images").mkdir()
    captions = ["a photo of a cat", "", "a dog, running", "two birds"]
    for i in range(4):
        _image(i, mode="L" if i == 2 else "RGB").save(tmp_path / "images" / f"{i}.jpg")
    rows = [[f"images/{i}.jpg", caption] for i, caption in enumerate(captions)]
    train = _write_csv(tmp_path / "train.tsv", ["filepath", "title"], rows)
    val = _write_csv(tmp_path / "val.csv", ["path", "caption"], rows[:3], sep=",")

    dm = CsvImageTextDataModule(train, val_file=val, batch_size=4, eval_batch_size=3)
    dm.bind(model, tokenizer)
    with pytest.raises(DataConfigError, match="img_key.*'filepath'.*val.csv"):
        dm.setup("fit")

    dm = CsvImageTextDataModule(train, batch_size=4, train_augment=False)
    dm.bind(model, tokenizer)
    batch = next(iter(dm.train_dataloader()))
    _check_image_batch(batch, 4, model)
    assert batch["text"].shape == (4, 77) and batch["text"].dtype == torch.int64
    assert torch.equal(dm.datasets["train"][1]["text"], tokenizer([""])[0])  # empty caption: SOT, EOT, padding
    assert torch.equal(dm.datasets["train"][2]["text"], tokenizer(["a dog, running"])[0])
    with pytest.raises(DataConfigError, match=r"data\.val_file"):
        dm.val_dataloader()

    # other column names, comma separator with a quoted comma, images relative to `root`
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    rows = [[f"{i}.jpg", caption] for i, caption in enumerate(captions[:3])]
    val = _write_csv(elsewhere / "val.csv", ["path", "caption"], rows, sep=",")
    kwargs = dict(img_key="path", caption_key="caption", sep=",", root=tmp_path / "images", batch_size=2)
    dm = CsvImageTextDataModule(train, val_file=val, **kwargs)
    dm.bind(model, tokenizer)
    with pytest.raises(DataConfigError, match="img_key.*'path'.*train.tsv"):
        dm.setup("fit")
    dm = CsvImageTextDataModule(val, val_file=val, **kwargs)
    dm.bind(model, tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["text"].shape == (2, 77)
    assert dm.datasets["val"].captions == captions[:3]


def test_csv_errors(tmp_path, model, tokenizer):
    _image(0).save(tmp_path / "0.jpg")
    rows = [["0.jpg", "fine"], ["missing.jpg", "gone"]]
    train = _write_csv(tmp_path / "train.tsv", ["filepath", "title"], rows)
    no_caption = _write_csv(tmp_path / "nocap.tsv", ["filepath", "text"], rows)

    dm = CsvImageTextDataModule(no_caption)
    dm.bind(model, tokenizer)
    with pytest.raises(DataConfigError, match=r"caption_key.*'title'.*nocap\.tsv"):
        dm.setup("fit")

    dm = CsvImageTextDataModule(tmp_path / "absent.tsv")
    dm.bind(model, tokenizer)
    with pytest.raises(DataConfigError, match=r"data\.train_file.*absent\.tsv"):
        dm.setup("fit")

    dm = CsvImageTextDataModule(train, batch_size=2)
    dm.bind(model)
    with pytest.raises(DataConfigError, match="tokenizer"):
        dm.setup("fit")

    dm.bind(model, tokenizer)
    dm.setup("fit")
    assert dm.datasets["train"][0]["image"].shape == (3, 32, 32)
    with pytest.raises(BadSampleError, match=r"missing\.jpg.*line 3 of .*train\.tsv"):
        dm.datasets["train"][1]
    with pytest.raises(BadSampleError, match=r"missing\.jpg"):
        list(dm.train_dataloader())


def test_csv_rows_that_cannot_be_read_name_the_file_and_line(tmp_path, model, tokenizer):
    """A row with a missing or an extra field was read silently (an empty caption, a dropped field); a file whose
    captions are all empty trained on nothing; bytes that are not UTF-8 gave a bare UnicodeDecodeError."""
    _image(0).save(tmp_path / "0.jpg")

    def setup(name: str, text: bytes) -> None:
        (tmp_path / name).write_bytes(text)
        dm = CsvImageTextDataModule(tmp_path / name)
        dm.bind(model, tokenizer)
        dm.setup("fit")

    with pytest.raises(DataConfigError, match=r"short\.tsv, line 3: 1 field, the header has 2"):
        setup("short.tsv", b"filepath\ttitle\n0.jpg\ta\n0.jpg\n0.jpg\tb\n")
    with pytest.raises(DataConfigError, match=r"long\.tsv, line 2: 3 fields, the header has 2"):
        setup("long.tsv", b"filepath\ttitle\n0.jpg\ta\tb\n")
    with pytest.raises(DataConfigError, match=r"latin\.tsv, line 3: not UTF-8 text"):
        setup("latin.tsv", b"filepath\ttitle\n0.jpg\ta\n0.jpg\tcaf\xe9\n")
    with pytest.raises(DataConfigError, match=r"data\.train_file: '.*header\.tsv' has no rows after its header"):
        setup("header.tsv", b"filepath\ttitle\n")
    with pytest.raises(DataConfigError, match=r"data\.train_file: every 'title' caption of '.*blank\.tsv' is empty"):
        setup("blank.tsv", b"filepath\ttitle\n0.jpg\t\n0.jpg\t \n")
    setup("fine.tsv", b"filepath\ttitle\n0.jpg\t\n0.jpg\ta\n")  # some empty captions are fine


# -- WebDataset -----------------------------------------------------------------------------------------------------
def _write_shards(folder: Path, shards: int, per_shard: int, bad: str | None = None) -> list[dict]:
    """Shards ``folder/shard-00000{i}.tar``; returns the samples written (key, caption, label) in order."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as sink:
            for j in range(per_shard):
                n = s * per_shard + j
                key = f"{n:06d}"
                sample = {"__key__": key, "txt": f"sample number {n}", "cls": n % 3}
                if key == bad:
                    sample["jpg"] = b"not a jpeg"
                else:
                    buffer = io.BytesIO()
                    _image(n).save(buffer, format="PNG" if n % 2 else "JPEG")
                    sample["png" if n % 2 else "jpg"] = buffer.getvalue()
                sink.write(sample)
                written.append({"key": key, "txt": sample["txt"], "cls": sample["cls"]})
    return written


def test_webdataset_image_text_eval_pass(tmp_path, model, tokenizer):
    written = _write_shards(tmp_path / "shards", shards=2, per_shard=5)
    urls = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    dm = WebDatasetDataModule(urls, val_urls=urls, batch_size=4, eval_batch_size=4)
    dm.bind(model, tokenizer)
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [len(b["image"]) for b in batches] == [4, 4, 2]  # evaluation keeps the partial batch, in order
    _check_image_batch(batches[0], 4, model)
    texts = torch.cat([b["text"] for b in batches])
    assert texts.shape == (10, 77) and texts.dtype == torch.int64
    assert torch.equal(texts, tokenizer([w["txt"] for w in written]))

    train = list(dm.train_dataloader())  # one pass over the shards, partial batch dropped, shuffled
    assert [len(b["text"]) for b in train] == [4, 4]
    seen = {tuple(t.tolist()) for b in train for t in b["text"]}
    assert len(seen) == 8 and seen <= {tuple(t.tolist()) for t in texts}
    with pytest.raises(TypeError):
        len(dm.train_dataloader())  # no epoch_length: unknown length
    with pytest.raises(DataConfigError, match=r"data\.test_urls"):
        dm.test_dataloader()


def test_webdataset_classification_labels(tmp_path, model):
    written = _write_shards(tmp_path / "shards", shards=3, per_shard=2)
    urls = [str(tmp_path / "shards" / "shard-000000.tar"), str(tmp_path / "shards" / "shard-{000001..000002}.tar")]
    dm = WebDatasetDataModule(urls, test_urls=urls, task="classification", eval_batch_size=5)
    dm.bind(model)  # classification needs no tokenizer
    batches = list(dm.test_dataloader())
    labels = torch.cat([b["label"] for b in batches])
    assert labels.dtype == torch.int64
    assert labels.tolist() == [w["cls"] for w in written]
    _check_image_batch(batches[0], 5, model)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_webdataset_epoch_length(tmp_path, model, tokenizer, num_workers):
    _write_shards(tmp_path / "shards", shards=2, per_shard=3)
    urls = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    dm = WebDatasetDataModule(urls, epoch_length=10, batch_size=4, num_workers=num_workers, shuffle_buffer=4)
    dm.bind(model, tokenizer)
    loader = dm.train_dataloader()
    expected = 3 if num_workers == 0 else 4  # ceil(10 / 4) batches, rounded up to a multiple of the workers
    assert len(loader) == expected == dm.num_batches("train")
    for _ in range(2):  # every epoch has the same length (shards are resampled, the stream never runs dry)
        batches = list(loader)
        assert len(batches) == expected
        assert all(b["image"].shape == (4, 3, 32, 32) and b["text"].shape == (4, 77) for b in batches)


def test_webdataset_errors(tmp_path, model, tokenizer):
    _write_shards(tmp_path / "shards", shards=1, per_shard=3, bad="000001")
    shard = str(tmp_path / "shards" / "shard-000000.tar")
    with pytest.raises(DataConfigError, match=r"data\.val_urls: 7 of 8 shards.*shard-000001\.tar"):
        dm = WebDatasetDataModule(shard, val_urls=str(tmp_path / "shards" / "shard-{000000..000007}.tar"))
        dm.bind(model, tokenizer)
        dm.setup("fit")
    with pytest.raises(DataConfigError, match=r"data\.task"):
        WebDatasetDataModule(shard, task="captioning")
    with pytest.raises(mome.InvalidArgumentError, match=r"data\.epoch_length must be a positive integer.*got 'abc'"):
        WebDatasetDataModule(shard, epoch_length="abc")  # was a TypeError of the comparison

    dm = WebDatasetDataModule(shard, val_urls=shard, eval_batch_size=1)
    dm.bind(model)
    with pytest.raises(DataConfigError, match="tokenizer"):
        dm.setup("fit")
    dm.bind(model, tokenizer)
    with pytest.raises(BadSampleError, match=r"shard-000000\.tar.*'jpg'.*'000001'"):
        list(dm.val_dataloader())

    dm = WebDatasetDataModule(shard, val_urls=shard, text_key="caption", eval_batch_size=1)
    dm.bind(model, tokenizer)
    with pytest.raises(BadSampleError, match=r"'000000' has no 'caption' member"):
        list(dm.val_dataloader())

    dm = WebDatasetDataModule(shard, val_urls=shard, task="classification", label_key="txt", eval_batch_size=1)
    dm.bind(model)
    with pytest.raises(BadSampleError, match=r"shard-000000\.tar: sample '000000': member 'txt' is not a class index"):
        list(dm.val_dataloader())  # was a bare ValueError of int()


@pytest.mark.filterwarnings("ignore:Your `IterableDataset` has `__len__` defined")
def test_webdataset_lightning_epochs(tmp_path, model):
    """Lightning reads the training length from ``epoch_length`` and runs each validation pass to the end."""
    import lightning as L

    class Counting(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 3)
            self.steps, self.val_samples = 0, 0

        def training_step(self, batch, batch_idx):
            self.steps += 1
            return self.head(batch["image"].mean((2, 3))).logsumexp(-1).mean()

        def validation_step(self, batch, batch_idx):
            self.val_samples += len(batch["label"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    _write_shards(tmp_path / "shards", shards=2, per_shard=3)
    urls = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    dm = WebDatasetDataModule(urls, val_urls=urls, task="classification", epoch_length=8, batch_size=4)
    dm.bind(model)
    module = Counting()
    trainer = L.Trainer(
        max_epochs=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(module, datamodule=dm)
    assert trainer.num_training_batches == 2
    assert module.steps == 4 and module.val_samples == 12
