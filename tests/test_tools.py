"""The scripts in tools/ run end to end (their figures are reported, never asserted)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_quick_layers_and_peers(tmp_path):
    bench = load("bench")
    out_json, out_md = tmp_path / "bench.json", tmp_path / "perf.md"
    results = bench.main(["--quick", "--only", "layers", "peers", "--json", str(out_json), "--markdown", str(out_md)])
    rows = {(row["family"], row["implementation"]): row for row in results["layers"]}
    for name in (
        "dense (width 256)",
        "mome sorted (dropless)",
        "mome buffers (cf 1.25)",
        "transformers Mixtral grouped_mm",
    ):
        assert rows["sparse", name]["forward_s"] > 0 and rows["sparse", name]["forward_backward_s"] > 0
    assert rows["sparse", "mome modality (2 pools, sorted)"]["forward_backward_ratio"] > 0
    assert rows["sparse", "dense (width 256)"]["forward_backward_ratio"] == 1.0
    assert rows["soft", "mome SoftMoE"]["forward_backward_s"] > 0
    assert all("note" in row for row in results["layers"] if not row.get("forward_s"))  # skipped: says why
    statuses = {check["status"] for check in results["targets"]}
    assert results["targets"] and statuses <= {"PASS", "PASS (spread)", "MISS", "n/a"}
    saved = json.loads(out_json.read_text())
    assert saved["environment"]["torch"] and len(saved["layers"]) == len(results["layers"])
    text = out_md.read_text()
    assert "| T=64 E=8 k=2 H=128 | mome sorted (dropless) |" in text and "## Method" in text
    assert "PASS" in text or "MISS" in text


def test_bench_reports_an_unusable_peer_instead_of_failing(monkeypatch):
    bench = load("bench")

    def broken(shape):
        raise ImportError("no module named st_moe_pytorch")

    monkeypatch.setattr(bench, "st_moe", broken)
    results = bench.main(["--quick", "--only", "layers", "peers", "--no-soft", "--repeats", "1"])
    row = next(r for r in results["layers"] if r["implementation"].startswith("st-moe"))
    assert row["note"].startswith("unavailable: ImportError") and "forward_s" not in row


def test_bench_quick_models_and_decoding():
    bench = load("bench")
    results = bench.main(["--quick", "--only", "models", "--models", "vmoe_tiny_patch8_e4", "moe_llava_tiny_e4"])
    rows = {row["model"]: row for row in results["models"]}
    assert list(rows) == [
        "vmoe_tiny_patch8_e4",
        "vmoe_tiny_patch8_e4 dense twin",
        "moe_llava_tiny_e4",
        "moe_llava_tiny_e4 dense twin",
    ]
    twin, moe = rows["vmoe_tiny_patch8_e4 dense twin"], rows["vmoe_tiny_patch8_e4"]
    assert twin["ratio_to_dense_twin"] == 1.0 and moe["params_m"] > twin["params_m"] and moe["unit"] == "images"
    llava = rows["moe_llava_tiny_e4"]
    assert llava["unit"] == "tokens" and llava["per_s"] > 0 and llava["decode_token_s"] > 0
    assert rows["moe_llava_tiny_e4 dense twin"]["decode_ratio_to_dense_twin"] == 1.0


def test_bench_routers_section_times_every_router_against_top_k(tmp_path):
    """``--only routers``: each router and design of mome.layers on the shape, ratios to the top-k row; BASE and GShard
    run on the k their design fixes; the target check covers every router but BASE on the target shape."""
    bench = load("bench")
    out_md = tmp_path / "routers.md"
    argv = ["--only", "routers", "--shapes", "64:4:1", "64:4:2", "--dim", "16", "--repeats", "1"]
    results = bench.main([*argv, "--markdown", str(out_md)])
    rows = results["routers"]
    by_shape = {}
    for row in rows:
        by_shape.setdefault(row["top_k"], {})[row["implementation"]] = row
    assert by_shape[1][bench.TOP_K]["forward_backward_ratio"] == 1.0
    for k, names in by_shape.items():
        assert set(names) == set(bench.router_candidates(bench.LayerShape("sparse", 64, 4, k, 32, 16, "swiglu")))
        for name, row in names.items():
            fixed = (name.startswith("base") and k != 1) or (name == "gshard" and k != 2)
            assert ("note" in row) == fixed, (name, row)
            if not fixed:
                assert row["forward_backward_s"] > 0 and row["forward_ratio"] > 0
    assert "Routers" in out_md.read_text()
    repeated = bench.main([*argv[:-1], "2"])["routers"]
    sinkhorn = next(row for row in repeated if row["implementation"] == "sinkhorn")
    low, high = sinkhorn["forward_backward_ratio_range"]
    assert low <= high and len(sinkhorn["forward_backward_s_rounds"]) == 2
    assert bench.check_router_targets(rows) == []  # 64:4 is not the target shape
    target_rows = [{**row, "tokens": 4096, "experts": 8} for row in rows]
    checked = {check["target"].split(": ")[1].split(" f+b")[0] for check in bench.check_router_targets(target_rows)}
    assert bench.TOP_K not in checked and not any(name.startswith(bench.REPORTED_ONLY) for name in checked)
    assert {"sinkhorn", "deepseek routing (aux-free bias, sequence loss)"} <= checked
    assert any(name.startswith("deepseek fine-grained") for name in by_shape[2])  # timed, reported only


def test_bench_memory_item_runs_in_a_fresh_process():
    bench = load("bench")
    shape = bench.LayerShape("sparse", 64, 4, 2, 64, 32, "swiglu")
    spec = {"device": "cpu", "threads": 1, "kind": "layer", "label": str(shape), "shape": vars(shape)}
    rows = bench.bench_memory([{**spec, "name": "mome sorted (dropless)"}], bench.Budget())
    assert rows[0]["peak_mib"] > 0, rows


def test_bench_wrappers_keep_their_options(tmp_path):
    bench_moe = load("bench_moe")
    argv = ["--shapes", "64:4:2:32", "--dim", "32", "--repeats", "1", "--act", "gelu", "swiglu"]
    rows = bench_moe.main([*argv, "--markdown", str(tmp_path / "moe.md")])
    names = {row["implementation"] for row in rows}
    assert {"mome sorted (dropless)", "mome buffers (cf 1.25)", "transformers Mixtral grouped_mm"} <= names
    assert (tmp_path / "moe.swiglu.md").exists()
    bench_models = load("bench_models")
    rows = bench_models.main(
        ["--models", "vmoe_tiny_patch8_e4", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]
    )
    assert [row["model"] for row in rows][:2] == ["vmoe_tiny_patch8_e4", "vmoe_tiny_patch8_e4 dense twin"]


def test_train_synthetic_loss_falls(capsys):
    train = load("train_synthetic")
    assert train.main(["--steps", "60", "--log-every", "30", "--dim", "32", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    assert "expert load [" in out and "held-out accuracy" in out


@pytest.mark.parametrize(
    "script, bad",
    [
        ("bench_moe", ["--shapes", "64:4:2"]),
        ("bench_moe", ["--act", "relu"]),
        ("bench", ["--only", "speed"]),
        ("bench", ["--shapes", "64:4"]),
        ("bench", ["--repeats", "0"]),
    ],
)
def test_bench_rejects_bad_arguments(script, bad):
    bench = load(script)
    with pytest.raises((SystemExit, ValueError)):
        bench.main(bad)


def test_bench_profile_names_where_the_time_goes():
    bench = load("bench")
    tables = bench.main(["--profile", "64:4:2:32", "--dim", "32", "--threads", "1", "--profile-rounds", "2"])
    assert set(tables) >= {"dense (width 64)", "mome sorted (dropless)", "mome buffers (cf 1.25)"}
    assert "transformers Mixtral grouped_mm" in tables  # the peer, profiled beside mome
    sorted_ops = dict((op, share) for op, _, share in tables["mome sorted (dropless)"])
    assert "aten::_grouped_mm" in sorted_ops and all(0 < share <= 1 for share in sorted_ops.values())
    with pytest.raises(SystemExit):
        bench.main(["--profile", "64:4"])


def test_bench_profile_model_profiles_a_warm_training_step_of_the_model_and_its_twin(capsys, monkeypatch):
    bench = load("bench")
    fused = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **kw: fused.append(kw.get("fused")) or adamw(*a, **kw))
    name = "vmoe_tiny_patch8_e4"
    tables = bench.main(["--profile-model", name, "--batch-size", "2", "--threads", "1", "--fused-adamw"])
    assert set(tables) == {name, f"{name} dense twin"}
    assert fused == [True, True]  # --fused-adamw: torch's fused kernel for the model and its twin
    assert all(0 < share <= 1 for _, _, share in tables[name])
    assert "one warm training step" in capsys.readouterr().out


def test_bench_grouped_only_candidate_turns_the_per_expert_loop_off(monkeypatch):
    """The benchmark's grouped-matmul-only row computes the same layer without the CPU per-expert loop."""
    bench = load("bench")
    from mome.layers import experts as experts_module

    shape = bench.LayerShape.parse("64:2:2:16", dim=16)
    monkeypatch.setattr(experts_module, "PER_EXPERT_MIN_ROWS", 16)  # 64 * 2 / 2 = 64 rows per expert: the loop
    candidates = bench.layer_candidates(shape, peers=False)
    torch.manual_seed(0)
    grouped = candidates[bench.GROUPED_ONLY]()
    taken = []
    loop = experts_module._PerExpertFFN.apply
    monkeypatch.setattr(experts_module._PerExpertFFN, "apply", lambda *a: taken.append(1) or loop(*a))
    x = torch.randn(1, 64, 16)
    grouped(x)
    assert taken == [] and experts_module.PER_EXPERT_MIN_ROWS == 16
    torch.testing.assert_close(grouped(x), grouped.module(x), atol=1e-5, rtol=1e-5)
    assert taken == [1]  # the plain module takes the loop


def test_bench_markdown_is_generated_whole_and_a_hand_written_file_is_never_overwritten(tmp_path):
    bench = load("bench")
    analysis = tmp_path / "performance.md"
    analysis.write_text("# Performance\n\nwritten by hand\n")
    argv = ["--quick", "--only", "layers", "--no-soft", "--repeats", "1"]
    with pytest.raises(SystemExit):
        bench.main([*argv, "--markdown", str(analysis)])
    assert analysis.read_text() == "# Performance\n\nwritten by hand\n"
    report = tmp_path / "benchmarks.md"
    report.write_text(f"{bench.GENERATED_MARKER}\n| stale |\n")
    bench.main([*argv, "--markdown", str(report)])
    lines = report.read_text().splitlines()
    assert lines[0] == bench.GENERATED_MARKER and "| stale |" not in lines
    assert (
        lines[4].startswith("Generated by `python tools/bench.py --quick")
        and "## Sparse MoE layers (D=64, swiglu)" in lines
    )
    table = [line for line in lines if line.startswith("|")]
    assert table and all(len(line) <= 160 for line in table)


def test_bench_markdown_lists_untimed_implementations_below_the_table():
    bench = load("bench")
    header = ["shape", "implementation", "fwd (s)", "note"]
    body = [
        ["T=8", "dense", "0.1", ""],
        ["T=8", "peer", "", "unavailable: needs a GPU"],
        ["T=64", "dense", "0.2", ""],
        ["T=64", "peer", "", "unavailable: needs a GPU"],
    ]
    lines = bench.markdown_tables([("Layers", header, body)])
    assert "| T=8 | dense | 0.1 |  |" in lines and not any("needs a GPU" in line for line in lines if line[:1] == "|")
    assert "- peer (every shape): unavailable: needs a GPU" in lines


def test_router_study_trains_each_router_and_writes_the_table(tmp_path, capsys):
    study = load("router_study")
    out, out_json = tmp_path / "routers.md", tmp_path / "runs.json"
    argv = ["--routers", "noisy_top_k_bpr", "soft_moe", "--steps", "4", "--seeds", "3", "--out", str(out)]
    threads = study.torch.get_num_threads()
    rows = study.main([*argv, "--json", str(out_json)])
    assert study.torch.get_num_threads() == threads  # the study trains on --threads 1, then gives the caller's back
    assert [row["router"] for row in rows] == ["dense", "noisy_top_k_bpr", "soft_moe"]
    for row in rows:
        assert row["seeds"] == [3] and row["steps"] == 4  # the same budget for every router, dense included
        assert 0.0 <= row["top1_mean"] <= 1.0 and row["top1_std"] == 0.0
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0 and 0 < row["step_ratio"] < 100
    dense, sparse, soft = rows
    assert dense["step_ratio"] == 1.0 and dense["load_cv"] is None and dense["dropped"] is None
    for key in ("dropped", "unrouted", "train_dropped"):  # a capacity router: shares of the routed assignments
        assert 0.0 <= sparse[key] <= 1.0
    assert soft["dropped"] is None and soft["train_dropped"] is None  # Soft MoE routes no token to one expert
    for row in (sparse, soft):  # load CV of E = 4 experts: 0 (even) .. sqrt(E - 1) (one expert takes all)
        assert 0.0 <= row["load_cv"] <= math.sqrt(3) and 0.0 <= row["train_load_cv"] <= math.sqrt(3)
    runs = json.loads(out_json.read_text())["runs"]
    assert [run["router"] for run in runs] == ["dense", "noisy_top_k_bpr", "soft_moe"]
    assert "model.moe_layers=none" in runs[0]["overrides"] and "moe=soft_moe" in runs[2]["overrides"]
    assert {"moe=vmoe", "model.moe_kwargs.batch_priority=true", "seed=3", "trainer.max_steps=4"} <= set(
        runs[1]["overrides"]
    )
    text = out.read_text()
    assert text.startswith("Command: `python tools/router_study.py --routers noisy_top_k_bpr soft_moe --steps 4")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| router | top-1 % (mean ± std) | dropped |") and len(table) == 4
    assert table[3].startswith("| soft_moe: Soft MoE") and "| - | - |" in table[3]
    assert text in capsys.readouterr().out


def test_router_study_summary_statistics():
    study = load("router_study")
    assert study.coefficient_of_variation([0.25, 0.25, 0.25, 0.25]) == 0.0
    assert study.coefficient_of_variation([1.0, 0.0, 0.0, 0.0]) == pytest.approx(math.sqrt(3))
    base = {"label": "x", "steps": 10, "dropped": None, "unrouted": None, "load_cv": None}
    base |= {"train_dropped": None, "train_load_cv": None}
    runs = [
        {**base, "router": "dense", "seed": 0, "top1": 0.5, "step_s": 0.1},
        {**base, "router": "dense", "seed": 1, "top1": 0.7, "step_s": 0.2},
        {**base, "router": "a", "seed": 0, "top1": 0.6, "step_s": 0.3, "dropped": 0.1, "load_cv": 0.2},
        {**base, "router": "a", "seed": 1, "top1": 0.8, "step_s": 0.2, "dropped": 0.3, "load_cv": 0.4},
    ]
    dense, a = study.summarize(runs)
    assert dense["top1_mean"] == pytest.approx(0.6) and dense["top1_std"] == pytest.approx(0.1414, abs=1e-4)
    assert a["step_ratio"] == pytest.approx((3.0 + 1.0) / 2)  # each seed against the dense run of that seed
    assert a["dropped"] == pytest.approx(0.2) and a["load_cv"] == pytest.approx(0.3) and a["seeds"] == [0, 1]
    text = study.markdown([dense, a], "python tools/router_study.py --steps 10", "test machine")
    assert "| a: x | 70.0 ± 14.1 | 0.200 | - | 0.30 | - | - | 2.00 | 250.0 | 0,1 | 10 |" in text


def test_bench_ratio_range_compares_round_by_round():
    """The spread of a ratio is the range of the per-round ratios (round i of both ran back to back), by hand."""
    bench = load("bench")
    row, base = {"step_s": 2.0, "step_s_rounds": [2.0, 3.0, 1.0]}, {"step_s": 1.0, "step_s_rounds": [1.0, 2.0, 1.0]}
    out = {}
    bench.add_ratio(out, row, base, "step_s", "ratio")
    assert out == {"ratio": 2.0, "ratio_range": [1.0, 2.0]}  # per round: 2.0, 1.5, 1.0
    assert bench.fmt_ratio(out, "ratio") == "2.00 [1.00-2.00]"
    assert bench.ratio_range({"step_s_rounds": [1.0]}, {"step_s_rounds": [1.0]}, "step_s") is None
    check = bench._check("x", out, "ratio", 1.5)
    assert check["status"] == "MISS" and check["value_range"] == [1.0, 2.0]
    # against a peer, a median above the limit whose spread reaches it passes "within the spread"
    assert bench._check("x", out, "ratio", 1.5, within_spread=True)["status"] == "PASS (spread)"
    assert bench._check("x", out, "ratio", 0.9, within_spread=True)["status"] == "MISS"


def test_compress_study_tests_every_compressed_model_and_writes_the_table(tmp_path, capsys):
    study = load("compress_study")
    torch = study.study.torch  # the router study's, whose training loop and thread handling this tool runs
    out, out_json = tmp_path / "compression.md", tmp_path / "rows.json"
    argv = ["--steps", "4", "--experts", "4", "--sizes", "3", "2", "--seed", "1", "--out", str(out)]
    threads = torch.get_num_threads()
    rows = study.main([*argv, "--json", str(out_json)])
    assert torch.get_num_threads() == threads
    # per model: the trained one, then pruned and merged at each size, all tested on the same split
    expected = [("trained", 4), ("prune", 3), ("merge", 3), ("prune", 2), ("merge", 2)]
    for model in ("vmoe", "limoe"):
        mine = [row for row in rows if row["model"] == model]
        assert [(row["method"], row["experts"]) for row in mine] == expected
        assert all(0.0 <= row["top1"] <= 1.0 for row in mine)
    assert json.loads(out_json.read_text())["rows"] == rows
    text = out.read_text()
    assert text.startswith("Command: `python tools/compress_study.py --steps 4 --experts 4 --sizes 3 2 --seed 1")
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| model (test metric) | experts per layer | pruned top-1 % | merged top-1 % |"
    assert len(table) == 1 + 2 * 3 and table[1].startswith("| vmoe (classification top-1) | 4 (trained) |")
    assert text in capsys.readouterr().out
    again = study.main(["--models", "vmoe", *argv[:-2]])  # the same seed: the same figures
    assert again == [row for row in rows if row["model"] == "vmoe"]


def test_compress_study_rejects_sizes_outside_the_experts():
    study = load("compress_study")
    with pytest.raises(SystemExit):
        study.main(["--experts", "4", "--sizes", "6"])


@pytest.mark.slow
def test_bench_quantize_measures_a_saved_llava_s_vqa_exact_match_in_each_mode(tmp_path, capsys):
    """``--llava-model``: the saved model's VQA exact match by mome-eval in fp32, int8 and int4; the fp32 figure is
    the one ``mome-eval eval_task=vqa`` gives alone."""
    pytest.importorskip("torchao")
    from test_eval_cli import compose_eval

    import mome
    from mome.cli.eval import evaluate

    tool = load("bench_quantize")
    folder = tmp_path / "llava"
    mome.save_pretrained(mome.create_model("moe_llava_tiny_e4"), folder)
    data = [f"data.root={tmp_path / 'shapes'}", "data.train_size=4", "data.val_size=4", "data.test_size=6"]
    overrides = [*data, "eval_task.max_new_tokens=3"]
    out = tmp_path / "quantization.md"
    argv = ["--families", "--limoe-steps", "0", "--llava-model", str(folder), "--llava-overrides", *overrides]
    vqa = tool.main([*argv, "--out", str(out)])["vqa"]
    assert all(vqa[mode]["n_samples"] == 6 and 0 <= vqa[mode]["metrics"]["exact_match"] <= 1 for mode in tool.MODES)
    alone, _ = evaluate(
        compose_eval(tmp_path / "alone", [f"model=local-dir:{folder}", "eval_task=vqa", "data=shapes", *overrides])
    )
    assert vqa["fp32"]["metrics"] == alone["metrics"]
    text = out.read_text()
    assert "| family |" not in text and "VQA exact match on 6 shapes test questions" in text
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| int")] == ["| int8", "| int4"]
    with pytest.raises(SystemExit):
        tool.main(["--families", "--limoe-steps", "0", "--llava-model", str(tmp_path)])  # no config.json there
    assert "no saved model there" in capsys.readouterr().err


def test_bench_quantize_reports_each_mode_and_the_zero_shot_accuracy(tmp_path, capsys):
    tool = load("bench_quantize")
    out, out_json = tmp_path / "quantization.md", tmp_path / "quantization.json"
    argv = ["--families", "moe_llava_tiny_e4", "--rounds", "1", "--warmup", "1", "--limoe-steps", "2"]
    result = tool.main([*argv, "--out", str(out), "--json", str(out_json)])
    rows = result["rows"]
    assert [row["mode"] for row in rows] == ["fp32", "int8", "int4"]
    fp32, int8, int4 = rows
    assert fp32["max_abs_diff"] == 0 and fp32["weight_ratio"] == 1
    assert 0 < int8["max_abs_diff"] and 0 < int4["weight_ratio"] < int8["weight_ratio"] < 1
    assert all(row["forward_s"]["median"] > 0 and row["decode_s"]["median"] > 0 for row in rows)
    assert all(row["generate_tokens_per_s"][size] > 0 for row in rows for size in (1, 8))
    zero_shot = result["zero_shot"]
    assert zero_shot["steps"] == 2 and all(0 <= zero_shot[mode] <= 1 for mode in ("fp32", "int8", "int4"))
    text = out.read_text()
    assert text.startswith("Generated by `python tools/bench_quantize.py --families moe_llava_tiny_e4")
    assert "| moe_llava_tiny_e4 | int4 |" in text and "| int8 |" in text.split("zero-shot")[-1]
    assert "| model | mode | batch 1 tokens/s | batch 8 tokens/s |" in text
    assert text in capsys.readouterr().out
    assert json.loads(out_json.read_text())["zero_shot"]["steps"] == 2


def test_weight_traffic_prints_the_bound_and_the_measured_layer(capsys):
    tool = load("weight_traffic")
    rows = tool.main(["--shapes", "16:4:2", "--dim", "32", "--repeats", "1", "--threads", "1"])
    (row,) = rows
    assert row["weights_mb"] == 4 * 4 * 3 * 32 * 64 / 1e6  # E * (2H*D + D*H) fp32 weights, H = 4D/k
    assert row["bound_s"] > 0 and row["measured_s"] > 0
    assert "GB/s" in capsys.readouterr().out


def test_bench_shape_selection_flags():
    bench = load("bench")
    args = bench.parse_args(["--tokens", "512", "--experts", "8", "64", "--top-k", "2", "--no-sparse"])
    shapes = bench.layer_shapes(args)
    assert [(s.family, s.tokens, s.experts) for s in shapes] == [("soft", 512, 8), ("soft", 512, 64)]
    args = bench.parse_args(["--shapes", "64:8:2", "--no-soft"])
    assert [s.family for s in bench.layer_shapes(args)] == ["sparse"]
