"""mome-eval: every evaluation task runs on the embedded digits; bad input fails early with one line; DDP
counts every sample once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from PIL import Image
from train_helpers import compose_train

from mome.cli._common import run_cli
from mome.cli.eval import _job, evaluate
from mome.cli.train import train
from mome.lit.metrics import RESULT_SCHEMA

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["+trainer.enable_progress_bar=false"]


def compose_eval(output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """The config ``mome-eval <overrides>`` runs with, its outputs under ``output_dir``."""
    return compose_train(output_dir, overrides, config_name="eval")


@pytest.fixture(scope="module")
def limoe_checkpoint(tmp_path_factory) -> Path:
    """A real mome-train checkpoint: LIMoE-tiny trained contrastively on digits for 2 steps."""
    out = tmp_path_factory.mktemp("train")
    overrides = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    overrides += ["test=false", "export=false", "logger=csv", "+trainer.enable_progress_bar=false"]
    train(compose_train(out, overrides))
    checkpoint = out / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    return checkpoint


def _check_outputs(out: Path, record: dict, task: str, per_class: bool = True) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    written = json.loads((out / "results.json").read_text())
    assert written == record and written["task"] == task and written["dataset"] == "digits"
    jsonschema.validate(written, RESULT_SCHEMA)
    routing = json.loads((out / "routing.json").read_text())
    assert routing["layers"] and all(
        sum(layer["expert_load"]) == pytest.approx(1.0) for layer in routing["layers"].values()
    )
    assert (out / "routing_heatmap.png").read_bytes()[:8] == PNG
    assert (out / "routing_per_class.png").exists() == per_class
    if per_class:
        assert (out / "routing_per_class.png").read_bytes()[:8] == PNG
    # the patch routing maps of the first routing_maps=8 images (tests/test_routing_report.py checks the grids)
    assert (out / "routing_patch_map.png").read_bytes()[:8] == PNG
    patches = json.loads((out / "routing_patches.json").read_text())
    assert len(patches["images"]) == min(8, record["n_samples"])
    assert all(set(image["layers"]) == set(patches["layers"]) for image in patches["images"])


def test_zero_shot_from_a_mome_train_checkpoint(tmp_path, limoe_checkpoint, capsys):
    out = tmp_path / "eval"
    record, objects = evaluate(compose_eval(out, [f"ckpt_path={limoe_checkpoint}", *FAST]))
    assert record["model"] == "limoe_tiny_patch8_e4" and record["pretrained"] == str(limoe_checkpoint)
    assert record["weights"] == f"checkpoint {limoe_checkpoint}"
    assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert record["n_samples"] == 250 and record["protocol"]["num_templates"] == 6
    _check_outputs(out, record, "zeroshot_classification")
    captured = capsys.readouterr()
    assert "mome-eval: warning:" not in captured.err  # trained weights: no random-initialisation warning
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith("mome-eval: limoe_tiny_patch8_e4") and "acc1" in line and str(out) in line
    # one sample's cost (mome._flops; tests/test_family_features.py checks the counts by hand)
    cost = record["cost"]
    assert 0 < cost["active_params"] < cost["total_params"] and cost["flops"] > 0 and "active FLOPs" in line
    # the routing report covers every test image and every prompt (10 classes x 6 templates)
    routing = json.loads((out / "routing.json").read_text())
    layer = next(iter(routing["layers"].values()))
    assert layer["per_modality"]["image"]["tokens"] == 250 * 16
    assert len(layer["per_class"]["expert_share"]) == 10


def test_retrieval_on_digits(tmp_path):
    out = tmp_path / "eval"
    overrides = ["model.model_name=limoe_tiny_patch8_e4", "eval_task=retrieval", "max_samples=60", *FAST]
    record, _ = evaluate(compose_eval(out, overrides))
    names = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert set(record["metrics"]) == names and record["n_samples"] == 60
    assert record["protocol"]["captions"] == "class_templates" and record["protocol"]["num_texts"] == 60
    _check_outputs(out, record, "zeroshot_retrieval")


def test_linear_probe_on_digits(tmp_path):
    out = tmp_path / "eval"
    overrides = ["model.model_name=limoe_tiny_patch8_e4", "eval_task=linear_probe", "max_samples=50"]
    overrides += ["eval_task.max_train_samples=300", *FAST]
    record, _ = evaluate(compose_eval(out, overrides))
    assert record["n_samples"] == 50 and record["metrics"]["acc1"] > 0.3  # frozen random features still probe
    _check_outputs(out, record, "linear_probe")


def test_classification_with_a_zoo_model(tmp_path, capsys):
    out = tmp_path / "eval"
    overrides = ["model=vmoe_tiny_patch8_e4", "+model.num_classes=10", "eval_task=classification", "max_samples=40"]
    record, _ = evaluate(compose_eval(out, [*overrides, *FAST]))
    assert record["model"] == "vmoe_tiny_patch8_e4" and record["pretrained"] == "none"
    # no checkpoint and no pretrained weights: the accuracy is a random initialisation's, and the run says so
    assert record["weights"] == "random initialisation"
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("mome-eval: warning:")]
    assert len(warnings) == 1 and "vmoe_tiny_patch8_e4 has no trained weights" in warnings[0], warnings
    assert "random initialisation" in warnings[0]
    assert "(none: random initialisation)" in captured.out.strip().splitlines()[-1]
    assert set(record["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"} and record["n_samples"] == 40
    _check_outputs(out, record, "classification")
    routing = json.loads((out / "routing.json").read_text())
    assert all(set(layer["per_modality"]) == {"image"} for layer in routing["layers"].values())


def test_retrieval_with_the_captions_of_a_csv(tmp_path):
    """Captions from the batches; identical captions are one text, positive for each of their images."""
    folder = tmp_path / "csv"
    folder.mkdir()
    rows = [
        ("a.png", "white", "a white square"),
        ("b.png", "black", "a black square"),
        ("c.png", "white", "a white square"),
    ]
    for name, colour, _ in rows:
        Image.new("RGB", (8, 8), colour).save(folder / name)
    table = "filepath\ttitle\n" + "".join(f"{name}\t{caption}\n" for name, _, caption in rows)
    (folder / "test.tsv").write_text(table)
    (folder / "train.tsv").write_text(table)
    out = tmp_path / "eval"
    overrides = ["model.model_name=limoe_tiny_patch8_e4", "eval_task=retrieval", "data=csv", "data.num_workers=0"]
    overrides += [f"data.train_file={folder / 'train.tsv'}", f"data.test_file={folder / 'test.tsv'}", *FAST]
    record, _ = evaluate(compose_eval(out, overrides))
    assert record["dataset"] == "csvimagetext" and record["n_samples"] == 3
    assert record["protocol"]["captions"] == "batch" and record["protocol"]["num_texts"] == 2
    assert record["metrics"]["text_retrieval_recall@5"] == 1.0  # 2 texts: every image finds its caption in the top 5


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_evaluates_the_quantized_model(tmp_path, limoe_checkpoint, mode):
    """``quantize=int8|int4`` quantizes the loaded checkpoint's weights, its stacked experts too, before the run, and
    records the mode in results.json; the zero-shot score stays near the full-precision model's."""
    pytest.importorskip("torchao")
    from mome.layers import Experts
    from mome.layers.experts import is_quantized

    overrides = [f"ckpt_path={limoe_checkpoint}", "max_samples=60", "routing_maps=0", *FAST]
    full, _ = evaluate(compose_eval(tmp_path / "fp32", overrides))
    record, objects = evaluate(compose_eval(tmp_path / mode, [*overrides, f"quantize={mode}"]))
    assert full["quantization"] is None and record["quantization"]["mode"] == mode
    experts = [m for m in objects["task"].model.modules() if isinstance(m, Experts)]
    assert experts and all(is_quantized(e.w_in) and is_quantized(e.w_out) for e in experts)
    assert json.loads((tmp_path / mode / "results.json").read_text())["quantization"]["mode"] == mode
    assert abs(record["metrics"]["acc1"] - full["metrics"]["acc1"]) <= 0.1  # a 2-step model: near chance either way


# ------------------------------------------------------------------------------------------ bad input
def _fails_early(tmp_path, capsys, overrides, expected):
    out = tmp_path / "run"
    cfg = compose_eval(out, overrides)
    (out / ".hydra").mkdir(parents=True)  # what Hydra writes before the job starts
    with pytest.raises(SystemExit) as exit_info:
        run_cli("mome-eval", _job, cfg)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mome-eval: error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists()  # nothing half-written is left behind
    return lines[0]


def test_checkpoint_of_another_architecture(tmp_path, capsys, limoe_checkpoint):
    line = _fails_early(
        tmp_path, capsys, ["model=vmoe_tiny_patch8_e4", f"ckpt_path={limoe_checkpoint}"], "does not fit vmoe"
    )
    assert "missing key(s)" in line and "unexpected key(s)" in line


@pytest.mark.parametrize("with_model", [True, False], ids=["model+ckpt_path", "ckpt_path"])
def test_a_checkpoint_with_nan_weights_is_refused(tmp_path, capsys, limoe_checkpoint, with_model):
    """A Lightning checkpoint holding NaN weights is one line naming the tensor, on both routes of mome-eval."""
    checkpoint = torch.load(limoe_checkpoint, map_location="cpu", weights_only=True)
    key = "model.text_proj.weight"
    checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    bad = tmp_path / "nan.ckpt"
    torch.save(checkpoint, bad)
    model = ["model.model_name=limoe_tiny_patch8_e4"] if with_model else []
    line = _fails_early(tmp_path, capsys, [*model, f"ckpt_path={bad}"], "NonFiniteWeightsError")
    assert "text_proj.weight" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.limit_test_batches=abc", "trainer.limit_test_batches must be a number of batches >= 0 or a"),
        ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got -1"),
    ],
)
def test_a_bad_trainer_or_data_number_is_named(tmp_path, capsys, override, expected):
    _fails_early(tmp_path, capsys, ["model.model_name=limoe_tiny_patch8_e4", override], expected)


def test_unknown_eval_task(tmp_path, capsys):
    _fails_early(tmp_path, capsys, ["model.model_name=limoe_tiny_patch8_e4", "eval_task=zero_shott"], "zero_shott")


def test_a_seed_that_is_not_a_whole_number_is_named(tmp_path, capsys):
    _fails_early(tmp_path, capsys, ["model.model_name=limoe_tiny_patch8_e4", "seed=abc"], "seed must be a whole number")


def test_no_model_and_no_checkpoint(tmp_path, capsys):
    _fails_early(tmp_path, capsys, [], "ckpt_path")


def test_zero_shot_needs_a_clip_model(tmp_path, capsys):
    _fails_early(tmp_path, capsys, ["model=vmoe_tiny_patch8_e4"], "open_clip-contract")


def _csv_data(tmp_path: Path, test_rows: int) -> list[str]:
    folder = tmp_path / "csv"
    folder.mkdir()
    Image.new("RGB", (8, 8), "white").save(folder / "a.png")
    (folder / "train.tsv").write_text("filepath\ttitle\na.png\ta white square\n")
    (folder / "test.tsv").write_text("filepath\ttitle\n" + "a.png\ta white square\n" * test_rows)
    return ["data=csv", f"data.train_file={folder / 'train.tsv'}", f"data.test_file={folder / 'test.tsv'}"]


def test_dataset_without_classes(tmp_path, capsys):
    overrides = ["model.model_name=limoe_tiny_patch8_e4", "data.num_workers=0", *_csv_data(tmp_path, 2)]
    _fails_early(tmp_path, capsys, overrides, "has no classes")


def test_empty_split(tmp_path, capsys):
    overrides = ["model.model_name=limoe_tiny_patch8_e4", "eval_task=retrieval", "data.num_workers=0"]
    _fails_early(tmp_path, capsys, [*overrides, *_csv_data(tmp_path, 0)], "empty")


def test_model_takes_a_config_or_any_create_model_name(tmp_path):
    """``model=`` selects a conf/model file or, for any other name, the ``mome-model://`` source's spec; the
    group's other overrides apply to either (see also tests/test_model_configs.py)."""
    cfg = compose_eval(tmp_path, ["model=vmoe_tiny_patch8_e4", "model.top_k=1", "+model.num_classes=10"])
    assert cfg.model.moe_layers == "every_2" and cfg.model.top_k == 1 and cfg.model.num_classes == 10
    for name in ("local-dir:runs/42/model", "limoe_tiny_patch8_e4.digits", "hf-hub:org/repo"):
        cfg = compose_eval(tmp_path, [f"model={name}", "eval_task=retrieval"])
        assert cfg.model == {"_target_": "mome.create_model", "model_name": name}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["quantize=int3"], "quantize=int3: unknown mode; give one of int8, int4"),
        (["quantize_group_size=32"], "quantize_group_size=32 needs quantize=int4"),
        (["quantize=int8", "quantize_group_size=32"], "quantize=int8: "),
    ],
)
def test_a_bad_quantize_option_is_named(tmp_path, capsys, overrides, expected):
    pytest.importorskip("torchao")
    _fails_early(tmp_path, capsys, ["model=limoe_tiny_patch8_e4", *overrides], expected)


def test_quantize_refuses_a_folder_that_is_already_quantized(tmp_path, capsys):
    """conf/eval.yaml's ``mome-eval model=local-dir:<run>/model quantize=int8`` quantizes a saved float folder;
    a folder saved quantized is evaluated as saved, and quantizing it again is refused."""
    pytest.importorskip("torchao")
    import mome

    float_folder = tmp_path / "float"
    mome.save_pretrained(mome.create_model("limoe_tiny_patch8_e4"), float_folder)
    overrides = [f"model=local-dir:{float_folder}", "quantize=int8", "max_samples=20", "routing_maps=0", *FAST]
    record, _ = evaluate(compose_eval(tmp_path / "eval", overrides))
    assert record["quantization"]["mode"] == "int8" and record["n_samples"] == 20
    folder = tmp_path / "int8"
    mome.save_pretrained(mome.quantize(mome.create_model("limoe_tiny_patch8_e4"), "int8"), folder)
    line = _fails_early(tmp_path, capsys, [f"model=local-dir:{folder}", "quantize=int4"], "already quantized (int8)")
    assert "drop quantize=" in line


def test_unknown_model_name_one_line(tmp_path, capsys):
    line = _fails_early(tmp_path, capsys, ["model=limoe_tinyy"], "limoe_tinyy")
    assert "UnknownModelError" in line and "limoe_tiny_patch8_e4" in line  # create_model's close matches


def test_console_script_unknown_task_one_line(tmp_path):
    """``python -m mome.cli.eval model=local-dir:<folder> eval_task=nope``: the saved model loads (``model=``
    takes a create_model name), then the unknown task is one line, exit 2, and no run folder is left."""
    import mome

    saved = mome.save_pretrained(mome.create_model("limoe_tiny_patch8_e4"), tmp_path / "saved")
    result = subprocess.run(
        [sys.executable, "-m", "mome.cli.eval", f"model=local-dir:{saved}", "eval_task=nope"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("mome-eval: error:")]
    assert len(errors) == 1 and "eval_task=nope" in errors[0] and "zero_shot" in errors[0]
    runs = tmp_path / "logs" / "eval" / "runs"
    assert not runs.exists() or not any(runs.iterdir())  # the run's folder was removed


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow
@pytest.mark.parametrize("eval_task", ["zero_shot", "retrieval"])
def test_ddp_counts_every_sample_once(tmp_path, eval_task):
    """2 processes on 101 samples: Lightning's sampler pads one repeated sample; the metrics, the number of
    samples and the routing counts equal the single-process run (a dropless model: batch-independent)."""
    common = ["model.model_name=limoe_tiny_patch8_e4", f"eval_task={eval_task}", "max_samples=101"]
    common += ["+model.moe_kwargs.eval_capacity_factor=null", "data.eval_batch_size=16", *FAST]
    single, _ = evaluate(compose_eval(tmp_path / "single", common))
    ddp, _ = evaluate(compose_eval(tmp_path / "ddp", [*common, "trainer=ddp_spawn"]))
    assert single["n_samples"] == ddp["n_samples"] == 101
    for name, value in single["metrics"].items():
        assert ddp["metrics"][name] == pytest.approx(value, abs=1e-6), name
    routing = [json.loads((tmp_path / run / "routing.json").read_text()) for run in ("single", "ddp")]
    for layer, entry in routing[0]["layers"].items():
        other = routing[1]["layers"][layer]
        assert other["tokens"] == entry["tokens"]
        assert other["expert_load"] == pytest.approx(entry["expert_load"], abs=1e-6)
        shares = [torch.tensor(run["per_class"]["expert_share"]) for run in (entry, other)]
        assert torch.allclose(*shares, atol=1e-6)
