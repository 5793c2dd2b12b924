"""The scripts in tools/ run end to end (their figures are reported, never asserted)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_moe_runs_all_implementations(tmp_path):
    bench = load("bench_moe")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--shapes", "64:4:2:32", "--dim", "32", "--repeats", "1", "--act", "gelu", "swiglu"]
    rows = bench.main([*argv, "--json", str(out_json), "--markdown", str(out_md)])
    names = {row["implementation"] for row in rows}
    assert {"dense", "mome sorted (dropless)", "mome buffers (cf 1.25)", "transformers Mixtral grouped_mm"} <= names
    assert all(row["forward_s"] > 0 and row["forward_backward_s"] > 0 for row in rows)
    saved = json.loads(out_json.read_text())
    assert saved["environment"]["torch"] and len(saved["rows"]) == len(rows)
    assert "| mome sorted (dropless) |" in out_md.read_text()


def test_train_synthetic_loss_falls(capsys):
    train = load("train_synthetic")
    assert train.main(["--steps", "60", "--log-every", "30", "--dim", "32", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    assert "expert load [" in out and "held-out accuracy" in out


@pytest.mark.parametrize("bad", [["--shapes", "64:4:2"], ["--act", "relu"]])
def test_bench_rejects_bad_arguments(bad):
    bench = load("bench_moe")
    with pytest.raises((SystemExit, ValueError)):
        bench.main(bad)


def test_bench_models_runs_a_training_step_of_each_model():
    bench = load("bench_models")
    rows = bench.main(["--models", "vmoe_tiny_patch8_e4", "--batch-size", "2", "--repeats", "1", "--warmup", "0"])
    assert [row["model"] for row in rows] == [
        "vmoe_tiny_patch8_e4",
        "vmoe_tiny_patch8_e4 dense twin (same active FLOPs)",
        "timm vit_small_patch32_224",
    ]
    moe, twin = rows[0], rows[1]
    assert twin["ratio_to_dense_twin"] == 1.0 and moe["params_m"] > twin["params_m"]
    rows = bench.main(["--models", "limoe_tiny_patch8_e4", "--batch-size", "2", "--repeats", "1", "--warmup", "0"])
    assert [row["model"] for row in rows] == [
        "limoe_tiny_patch8_e4",
        "limoe_tiny_patch8_e4 dense twin (same active FLOPs)",
    ]
    assert rows[0]["params_m"] > rows[1]["params_m"]
