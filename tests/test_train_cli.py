"""mome-train: every experiment composes and runs one fast_dev_run step; bad overrides fail early."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from train_helpers import EXPERIMENTS, compose_train

from mome.cli._common import run_cli
from mome.cli.train import _job, train
from mome.lit import ContrastiveTask, NonFiniteLossError

# The experiments for real data need files: point them at tiny generated ones in the tests of the data modules.
EMBEDDED = [name for name in EXPERIMENTS if name.endswith("_digits") or "_shapes" in name]


def small_shapes(root) -> list[str]:
    """Overrides that make the shapes experiments tiny and keep their data under ``root``."""
    return [f"data.root={root}", "data.train_size=16", "data.val_size=8", "data.test_size=8", "data.batch_size=8"]


def test_the_experiments_exist():
    assert {"limoe_digits", "vmoe_digits", "softmoe_digits"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:  # each experiment file starts with the command that runs it
        text = (compose_train.__globals__["CONF"] / "experiment" / f"{name}.yaml").read_text().splitlines()
        assert text[0] == "# @package _global_" and text[1].startswith(f"# mome-train experiment={name}"), name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    cfg = compose_train(tmp_path, [f"experiment={name}"])
    resolved = OmegaConf.to_container(cfg, resolve=False)
    assert resolved["model"]["model_name"] and resolved["task"]["_target_"].startswith("mome.lit.")
    assert cfg.trainer._target_.endswith("Trainer")


def test_default_experiment_is_limoe_digits(tmp_path):
    cfg = compose_train(tmp_path)
    assert cfg.model.model_name == "limoe_tiny_patch8_e4" and cfg.data.task == "image_text"
    assert cfg.task._target_ == "mome.lit.ContrastiveTask"


@pytest.mark.parametrize("name", EMBEDDED)
def test_fast_dev_run(name, tmp_path):
    overrides = [f"experiment={name}", "trainer.fast_dev_run=1", "logger=csv"]
    if "_shapes" in name:  # no previous stage to start from in a fast dev run
        overrides += [*small_shapes(tmp_path / "shapes"), "task.init_from=null"]
    cfg = compose_train(tmp_path, overrides)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1 or objects["trainer"].fit_loop.epoch_loop.global_step >= 1
    assert any(k.startswith("test/") for k in metrics), metrics
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def _fails_early(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    cfg = compose_train(out, overrides)
    (out / ".hydra").mkdir(parents=True)  # what Hydra writes before the job starts
    with pytest.raises(SystemExit) as exit_info:
        run_cli("mome-train", _job, cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mome-train: error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()  # nothing half-written is left behind
    return lines[0]


@pytest.mark.parametrize("trainer", ["ddp_ep", "fsdp_ep"])
def test_expert_parallel_on_a_model_without_moe_layers_fails_before_training(tmp_path, capsys, trainer):
    """MoE-LLaVA's stage I is dense: nothing to shard, one line before any process starts."""
    overrides = ["experiment=moe_llava_shapes_stage1", f"trainer={trainer}", "task.init_from=null"]
    _fails_early(tmp_path, capsys, [*overrides, *small_shapes(tmp_path / "shapes")], "has none (moe_layers)")


@pytest.mark.parametrize("seed", ["abc", "1.5", "true"])
def test_a_seed_that_is_not_a_whole_number_is_named(tmp_path, capsys, seed):
    _fails_early(tmp_path, capsys, [f"seed={seed}"], "seed must be a whole number (or null), got")


def test_a_seed_outside_what_lightning_takes_is_named(tmp_path, capsys):
    """Lightning replaced seed=-1 by a random seed, with a warning only."""
    _fails_early(tmp_path, capsys, ["seed=-1"], "seed must be a whole number in [0, 4294967295] (or null), got -1")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer >= -1 (or None), got 'abc'"),
        ("trainer.max_steps=1.5", "trainer.max_steps must be an integer >= -1, got 1.5"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be a positive integer, got 0"),
        ("trainer.log_every_n_steps=true", "trainer.log_every_n_steps must be a positive integer (or None), got True"),
        ("trainer.limit_train_batches=2.5", "trainer.limit_train_batches must be a number of batches >= 0 or a"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval must be a number of batches >= 1 or a"),
        ("trainer.fast_dev_run=abc", "trainer.fast_dev_run must be true, false or a number of batches >= 0"),
        ("trainer.gradient_clip_val=nan", "trainer.gradient_clip_val must be a finite number >= 0 (or null), got nan"),
    ],
)
def test_a_trainer_number_lightning_cannot_use_is_named(tmp_path, capsys, override, expected):
    """``trainer.max_epochs=abc`` trained (under fast_dev_run) or failed inside the fit loop with a traceback."""
    _fails_early(tmp_path, capsys, [override], expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got -1"),
        ("data.eval_batch_size=0", "data.eval_batch_size must be a positive integer (or None), got 0"),
        ("data.train_augment=maybe", "data.train_augment must be true or false, got 'maybe'"),
    ],
)
def test_a_bad_data_option_is_named(tmp_path, capsys, override, expected):
    _fails_early(tmp_path, capsys, [override], expected)


@pytest.mark.parametrize("lr", ["nan", "inf", "0", "-1e-3", "abc"])
def test_a_learning_rate_that_cannot_train_is_named(tmp_path, capsys, lr):
    """NaN failed when fit started (a traceback); inf, 0 and a negative rate trained silently wrong."""
    _fails_early(tmp_path, capsys, [f"task.optimizer.lr={lr}"], "task.optimizer.lr must be a finite number > 0, got")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("task.optimizer.name=adamz", "Optimizer adamz not found"),  # failed when fit started
        ("task.optimizer.weight_decay=-0.1", "task.optimizer.weight_decay must be a finite number >= 0, got -0.1"),
        ("+task.scheduler.warmup_steps=abc", "task.scheduler.warmup_steps must be an integer >= 0, got 'abc'"),
        ("task.scheduler.min_lr_ratio=2", "task.scheduler.min_lr_ratio must be a number in [0, 1], got 2"),
        ("task.aux_loss_weight=nan", "task.aux_loss_weight must be a finite number >= 0, got nan"),
    ],
)
def test_a_bad_optimisation_option_is_named(tmp_path, capsys, override, expected):
    line = _fails_early(tmp_path, capsys, [override], expected)
    assert "model (" not in line  # a task option, not the model's


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["test=abc"], "test must be true or false, got 'abc'"),  # a string was truthy: the run went on
        (["export.enabled=abc"], "export.enabled must be true or false, got 'abc'"),
        (["task.check_finite=abc"], "task.check_finite must be true or false, got 'abc'"),
        (["experiment=vmoe_digits", "task.label_smoothing=2"], "task.label_smoothing must be a number in [0, 1]"),
    ],
)
def test_a_switch_or_task_option_of_the_wrong_kind_is_named(tmp_path, capsys, overrides, expected):
    _fails_early(tmp_path, capsys, overrides, expected)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+model.capacity_factor=inf", "UnsupportedOptionError: model (vmoe_tiny_patch8_e4): vmoe_tiny_patch8_e4"),
        ("+model.moe_kwargs.capacity_factor=inf", "InvalidArgumentError: model (vmoe_tiny_patch8_e4): "),
    ],
)
def test_a_mome_error_of_the_model_constructor_is_one_line(tmp_path, capsys, override, expected):
    """A mome.MomeError whose constructor takes more than a message was re-raised as a TypeError traceback."""
    line = _fails_early(tmp_path, capsys, ["experiment=vmoe_digits", override], expected)
    assert "capacity_factor" in line and "inf" in line


def test_unknown_model_fails_before_training(tmp_path, capsys):
    _fails_early(tmp_path, capsys, ["model.model_name=limoe_tinyy"], "limoe_tinyy")


def test_top_k_above_num_experts_fails_before_training(tmp_path, capsys):
    _fails_early(tmp_path, capsys, ["model.top_k=5", "model.num_experts=4"], "top_k")


def test_missing_data_path_fails_before_training(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    _fails_early(
        tmp_path,
        capsys,
        ["experiment=vmoe_imagefolder", f"data.root={missing}", "model=vmoe_tiny_patch8_e4", "model.num_classes=2"],
        "root",
    )


def test_non_finite_loss_names_step_and_terms():
    task = ContrastiveTask(model={"model_name": "limoe_tiny_patch8_e4"})
    with pytest.raises(NonFiniteLossError, match=r"step 0: contrastive_loss=nan"):
        task.total_loss({"contrastive_loss": torch.tensor(float("nan"))}, "train")


def test_cli_prints_config_without_running(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mome.cli.train", "--cfg", "job", "experiment=vmoe_digits"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "model_name: vmoe_tiny_patch8_e4" in result.stdout
    assert not (tmp_path / "logs").exists()


def _images(folder, count, size=32):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i}.png"
        Image.new("RGB", (size, size), (40 * i % 255, 90, 200)).save(path)
        paths.append(path)
    return paths


def _pairs(tmp_path):
    paths = _images(tmp_path / "pairs", 4)
    rows = ["filepath\ttitle", *[f"{p.name}\ta photo of thing {i}" for i, p in enumerate(paths)]]
    csv = tmp_path / "pairs" / "train.tsv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


# The templates for real data run their header commands end to end in tests/test_experiments.py; here, what a
# template needs and the user did not give stops the run before training, with one line.
def test_template_without_its_required_values_names_them(tmp_path, capsys):
    _fails_early(tmp_path, capsys, ["experiment=limoe_csv"], "data.train_file=<value>")
    _fails_early(tmp_path, capsys, ["experiment=vmoe_imagefolder"], "data.root=<value> model.num_classes=<value>")
    _fails_early(tmp_path, capsys, ["experiment=limoe_webdataset"], "data.train_urls=<value>")
    _fails_early(tmp_path, capsys, ["experiment=moe_llava_json"], "data.train_file=<value> task.init_from=<value>")
    _fails_early(tmp_path, capsys, ["data=imagefolder", "task=classification"], "data.root=<value>")


def test_a_missing_validation_folder_fails_before_training(tmp_path, capsys):
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            _images(tmp_path / "folder" / split / label, 2)
    overrides = ["experiment=vmoe_imagefolder", f"data.root={tmp_path / 'folder'}", "model=vmoe_tiny_patch8_e4"]
    expected = f"data.val_dir: '{tmp_path / 'folder' / 'val'}' is not a directory; set data.val_fraction"
    _fails_early(tmp_path, capsys, [*overrides, "model.num_classes=2"], expected)


def _captions(tmp_path, lines: list[str]):
    _images(tmp_path / "pairs", 4)
    csv = tmp_path / "pairs" / "bad.tsv"
    csv.write_text("filepath\ttitle\n" + "".join(f"{line}\n" for line in lines))
    good = _pairs(tmp_path)
    overrides = ["experiment=limoe_csv", "model=limoe_tiny_patch8_e4", f"data.train_file={csv}"]
    return csv, [*overrides, f"data.val_file={good}", f"data.test_file={good}"]


def test_a_csv_whose_captions_are_all_empty_fails_before_training(tmp_path, capsys):
    """It trained on empty captions and exited 0."""
    csv, overrides = _captions(tmp_path, [f"{i}.png\t" for i in range(4)])
    _fails_early(tmp_path, capsys, overrides, f"data.train_file: every 'title' caption of '{csv}' is empty")


def test_a_bad_csv_row_names_its_file_and_line(tmp_path, capsys):
    """A row with a missing caption field trained with an empty caption."""
    csv, overrides = _captions(tmp_path, ["0.png\ta cat", "1.png", "2.png\ta dog"])
    _fails_early(tmp_path, capsys, overrides, f"{csv}, line 3: 1 field, the header has 2")


def test_a_bad_sample_met_while_training_is_one_line_and_keeps_the_run(tmp_path, capsys):
    """An unreadable image is found by a DataLoader worker: one line naming the file and the CSV line, exit 1, and
    the run's folder (its recorded config) is kept."""
    _images(tmp_path / "pairs", 2)
    (tmp_path / "pairs" / "broken.png").write_bytes(b"not a png")
    csv = tmp_path / "pairs" / "broken.tsv"
    csv.write_text("filepath\ttitle\n" + "".join(f"broken.png\tthing {i}\n" for i in range(4)))
    good = _pairs(tmp_path)
    out = tmp_path / "run"
    overrides = ["experiment=limoe_csv", "model=limoe_tiny_patch8_e4", f"data.train_file={csv}"]
    overrides += [f"data.val_file={good}", f"data.test_file={good}", "trainer.fast_dev_run=1", "logger=csv"]
    overrides += ["data.num_workers=1", "data.batch_size=2", "trainer.precision=32-true"]
    cfg = compose_train(out, overrides)
    (out / ".hydra").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("mome-train", _job, cfg)
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mome-train: error:")]
    assert len(lines) == 1, lines
    assert f"BadSampleError: not a readable image file: {tmp_path / 'pairs' / 'broken.png'}" in lines[0]
    assert f"of {csv})" in lines[0] and f"kept in {out}" in lines[0]
    assert (out / ".hydra").is_dir()


def test_limoe_csv_without_a_test_file_fails_before_training(tmp_path, capsys):
    """The bug: limoe_csv's documented command trained, then crashed at test (data.test_file is not set)."""
    csv = _pairs(tmp_path)
    overrides = ["experiment=limoe_csv", f"data.train_file={csv}", f"data.val_file={csv}", "model=limoe_tiny_patch8_e4"]
    _fails_early(tmp_path, capsys, overrides, "test=true tests the trained model: data.test_file is not set")


def test_monitoring_a_missing_validation_split_fails_before_training(tmp_path, capsys):
    csv = _pairs(tmp_path)
    overrides = ["experiment=limoe_csv", f"data.train_file={csv}", f"data.test_file={csv}"]
    overrides += ["model=limoe_tiny_patch8_e4"]
    _fails_early(tmp_path, capsys, overrides, "callbacks.model_checkpoint.monitor=val/loss needs a validation split")


def test_no_validation_split_turns_validation_off(tmp_path, capsys):
    csv = _pairs(tmp_path)
    overrides = ["experiment=limoe_csv", f"data.train_file={csv}", f"data.test_file={csv}"]
    overrides += ["model=limoe_tiny_patch8_e4"]
    overrides += ["callbacks.model_checkpoint.monitor=null", "trainer.fast_dev_run=1", "data.batch_size=2"]
    overrides += ["data.num_workers=0", "logger=csv", "trainer.precision=32-true"]
    metrics, _ = train(compose_train(tmp_path / "run", overrides))
    assert "test/loss" in metrics and not any(k.startswith("val/") for k in metrics)
    assert "mome-train: no validation (data.val_file is not set" in capsys.readouterr().out


def test_head_that_does_not_fit_the_classes_fails_before_training(tmp_path, capsys):
    for split in ("train", "val", "test"):
        for label in ("cat", "dog"):
            _images(tmp_path / "folder" / split / label, 2)
    overrides = ["experiment=vmoe_imagefolder", f"data.root={tmp_path / 'folder'}", "model=vmoe_tiny_patch8_e4"]
    _fails_early(tmp_path, capsys, [*overrides, "model.num_classes=1000"], "model.num_classes=1000 but the data has 2")
    _fails_early(tmp_path, capsys, [*overrides, "+model.num_classes=1000"], "model.num_classes=1000 but the data has 2")


def test_moe_recipe_is_a_group_choice_not_an_addition(tmp_path):
    """``+moe=<recipe>`` was accepted and composed into nothing; ``moe=<recipe>`` merges it into the model spec."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="moe"):
        compose_train(tmp_path, ["experiment=vmoe_digits", "+moe=switch_z_loss"])
    cfg = compose_train(tmp_path, ["experiment=vmoe_digits", "moe=switch_z_loss"])
    assert cfg.model.router == "top_k" and cfg.model.moe_kwargs.aux_loss_weights.z_loss == 0.001


def test_export_tool_turns_a_checkpoint_into_a_model_folder(tmp_path):
    overrides = ["experiment=vmoe_digits", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "logger=csv"]
    overrides += ["trainer.limit_val_batches=1", "test=false", "export=false"]
    _, objects = train(compose_train(tmp_path / "run", overrides))
    checkpoint = objects["trainer"].checkpoint_callback.last_model_path
    result = subprocess.run(
        [sys.executable, "tools/export.py", checkpoint, str(tmp_path / "exported")],
        cwd=compose_train.__globals__["CONF"].parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    import mome

    model = mome.create_model(f"local-dir:{tmp_path / 'exported'}")
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[f"model.{name}"]), name
    bad = subprocess.run(
        [sys.executable, "tools/export.py", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")],
        cwd=compose_train.__globals__["CONF"].parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "missing.ckpt" in bad.stderr and not (tmp_path / "x").exists()
