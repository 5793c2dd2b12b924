"""Every experiment of ``conf/experiment`` runs the commands its header documents, end to end: ``mome-train`` (train,
test, export) then ``mome-eval`` of the exported model, on tiny files in the experiment's own data format (CSV +
images, an ImageFolder tree, webdataset shards, LLaVA JSON) made here, with tiny models.

The header's own overrides are used as written; the test only points the paths at the tiny files, selects the tiny
model of the family, runs on CPU (``trainer=gpu`` -> ``trainer=cpu``) and shortens the run (2 steps, one batch of
validation and test)."""

from __future__ import annotations

import io
import json
import shlex
import tarfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict, read_write
from PIL import Image
from train_helpers import CONF, EXPERIMENTS

import mome
from mome.cli.eval import evaluate
from mome.cli.train import train

# The tiny model of each family (the templates for real data name the paper's sizes).
TINY = {
    "vmoe_imagefolder": "vmoe_tiny_patch8_e4",
    "limoe_csv": "limoe_tiny_patch8_e4",
    "limoe_webdataset": "limoe_tiny_patch8_e4",
    "moe_llava_json": "moe_llava_tiny_e4",
}
SHORT = [
    "trainer.max_epochs=1",
    "trainer.max_steps=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "+trainer.enable_progress_bar=false",
    "logger=csv",
]
EVAL_SHORT = ["+trainer.enable_progress_bar=false"]


def header_commands(name: str) -> tuple[list[str], list[str]]:
    """The overrides of the ``mome-train`` and ``mome-eval`` commands in the header of ``experiment=<name>``."""
    lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    train_line, eval_line = lines[1].removeprefix("# "), lines[2].removeprefix("# ")
    assert train_line.startswith(f"mome-train experiment={name}"), train_line
    assert eval_line.startswith("mome-eval "), eval_line

    def words(line: str) -> list[str]:
        return shlex.split(line.split("  (")[0])[1:]  # after the program; "  (a note)" ends the command

    return words(train_line), words(eval_line)


def _png(path: Path, shade: int, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade % 255, 90, 200 - shade % 200)).save(path)


def _imagefolder(root: Path) -> dict[str, str]:
    for split in ("train", "val", "test"):
        for c, label in enumerate(("cat", "dog")):
            for i in range(2):
                _png(root / split / label / f"{i}.png", 60 * c + 20 * i)
    return {"/path/to/imagenet": str(root), "model.num_classes=1000": "model.num_classes=2"}


def _csv(root: Path) -> dict[str, str]:
    files = {}
    for split in ("train", "val"):
        rows = ["filepath\ttitle"]
        for i in range(4):
            _png(root / split / f"{i}.png", 50 * i)
            rows.append(f"{split}/{i}.png\ta photo of thing number {i}")
        files[split] = root / f"{split}.tsv"
        files[split].write_text("\n".join(rows) + "\n")
    return {"/data/cc3m/train.tsv": str(files["train"]), "/data/cc3m/val.tsv": str(files["val"])}


def _shards(root: Path) -> dict[str, str]:
    for split, count in (("train", 2), ("val", 1)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for shard in range(count):
            with tarfile.open(root / split / f"{shard:05d}.tar", "w") as tar:
                for i in range(4):
                    key = f"{shard:05d}{i:03d}"
                    image = io.BytesIO()
                    Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(image, format="JPEG")
                    for ext, data in (("jpg", image.getvalue()), ("txt", f"a photo of thing {i}".encode())):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
    return {
        "/data/cc3m/{00000..00331}.tar": f"{root}/train/{{00000..00001}}.tar",
        "/data/cc3m-val/{00000..00001}.tar": f"{root}/val/00000.tar",
    }


def _llava_json(root: Path) -> dict[str, str]:
    from mome.data.shapes import write_shapes_dataset

    files = write_shapes_dataset(root / "shapes", {"train": 4, "val": 2, "test": 4})
    dense = mome.create_model("moe_llava_tiny_e4", moe_layers="none")  # the stage-II model stage III upcycles
    mome.save_pretrained(dense, root / "stage2")
    return {
        "/data/llava_v1_5_mix665k.json": str(files["train"]),
        "/data/vqa_test.json": str(files["test"]),
        "/data/images": str(root / "shapes"),
        "/path/to/stage2/model": str(root / "stage2"),
    }


DATA = {"vmoe_imagefolder": _imagefolder, "limoe_csv": _csv, "limoe_webdataset": _shards, "moe_llava_json": _llava_json}


def _substitute(words: list[str], values: dict[str, str]) -> list[str]:
    out = []
    for word in words:
        for old, new in values.items():
            word = word.replace(old, new)
        out.append("trainer=cpu" if word == "trainer=gpu" else word)
    return out


def compose_run(root: Path, overrides: list[str], config_name: str = "train"):
    """The config of ``mome-<config_name> <overrides>`` started in ``root``: logs under ``root/logs``, the run's
    output folder the resolved ``hydra.run.dir`` (what Hydra creates before the job starts)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = [f"paths.root_dir={root}", *overrides]
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    run_dir = Path(str(cfg.hydra.run.dir))
    with read_write(cfg), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_experiment(
    name: str, root: Path, values: dict[str, str], extra: list[str] = (), eval_extra: list[str] = ()
) -> tuple[dict, dict]:
    """Train ``experiment=<name>`` as its header says (shortened), then evaluate the export as its header says."""
    train_words, eval_words = header_commands(name)
    overrides = [*_substitute(train_words, values), *SHORT, *extra]
    if name in TINY:
        overrides += [f"model={TINY[name]}"]
    cfg = compose_run(root, overrides)
    tested = cfg.get("test", True)
    metrics, objects = train(cfg)
    export = Path(objects["export_dir"])
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert any(k.startswith("test/") for k in metrics) == tested, metrics
    run_dir = export.parent
    values = {**values, "<run>": str(run_dir), "local-dir:logs/": f"local-dir:{root}/logs/"}
    eval_dir = root / "eval" / run_dir.name
    eval_overrides = [*_substitute(eval_words, values), *EVAL_SHORT, *eval_extra, f"hydra.run.dir={eval_dir}"]
    record, _ = evaluate(compose_run(root, eval_overrides, config_name="eval"))
    assert record["metrics"] and record["n_samples"] > 0, record
    assert json.loads((eval_dir / "results.json").read_text()) == record
    return metrics, record


# the staged experiments run in sequence in their own tests (this one and tests/test_uni_moe_stages.py)
@pytest.mark.parametrize(
    "name", [n for n in EXPERIMENTS if "_shapes_" not in n and not n.startswith("uni_moe_digits_")]
)
def test_experiment_header_commands_run_end_to_end(name, tmp_path):
    values = DATA[name](tmp_path / "data") if name in DATA else {}
    extra = ["data.batch_size=2", "data.num_workers=0"] if name in DATA else []
    eval_extra = [] if name == "limoe_webdataset" else ["max_samples=8"]  # a stream cannot be subset
    if name == "limoe_webdataset":
        extra += ["data.epoch_length=4", "data.shuffle_buffer=0"]
    if name == "moe_llava_json":
        extra += ["data.max_length=64"]
    run_experiment(name, tmp_path, values, extra, eval_extra)


def test_moe_llava_shapes_stages_run_end_to_end(tmp_path):
    """Stage I, II and III in a row, each starting from the model the previous stage exported."""
    stages = sorted(n for n in EXPERIMENTS if n.startswith("moe_llava_shapes_stage"))
    assert len(stages) == 3
    small = ["data.train_size=8", "data.val_size=4", "data.test_size=4", "data.batch_size=4"]
    for name in stages:
        run_experiment(name, tmp_path, {}, small, [*small, "max_samples=4"])
    assert (tmp_path / "logs" / "moe_llava_shapes" / "stage3" / "model" / "config.json").is_file()
