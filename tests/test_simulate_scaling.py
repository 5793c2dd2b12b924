"""tools/simulate_scaling.py: the analytic terms against hand computations, and the gloo measurement."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

# On sys.path (not loaded from its file), so the processes `measure` spawns can import it by name.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import simulate_scaling as sim  # noqa: E402

SHAPE = sim.ModelShape(
    "hand", dim=4, expert_hidden=8, dense_hidden=16, layers=4, moe_every=2, num_experts=8, top_k=2,
    capacity_factor=1.0, seq_len=10, tokens_per_gpu=100, bytes_per_element=2,
)  # fmt: skip
HW = sim.Hardware(
    peak_flops=1e6, mfu=0.5, nvlink_bytes_per_s=1000.0, ib_bytes_per_s=100.0, gpus_per_node=4, a2a_latency_s=0.01,
    overlap=0.25,
)  # fmt: skip


def test_all_to_all_volume_and_time_by_hand():
    # one exchange: c k T D b = 1 * 2 * 100 * 4 * 2 = 1600 bytes; 4 exchanges; (P-1)/P leaves the GPU
    assert sim.all_to_all_bytes(SHAPE, 1) == 0
    assert sim.all_to_all_bytes(SHAPE, 4) == pytest.approx(4 * 1600 * 3 / 4)
    assert sim.all_to_all_seconds(SHAPE, 1, HW) == 0
    # P = 4 inside one node: 4 * (0.01 * 3 + 1600 * 3 / 4 / 1000)
    assert sim.all_to_all_seconds(SHAPE, 4, HW) == pytest.approx(4 * (0.03 + 1.2))
    # P = 8 over two nodes: 3 peers by NVLink, 4 by InfiniBand: 4 * (0.01 * 7 + 1600 * 3/8 / 1000 + 1600 * 4/8 / 100)
    assert sim.all_to_all_seconds(SHAPE, 8, HW) == pytest.approx(4 * (0.07 + 0.6 + 8.0))


def test_compute_and_all_reduce_by_hand():
    attention = 8 * 100 * 16 + 4 * 100 * 10 * 4  # 8 T D^2 + 4 T S D
    experts = 4 * 1.0 * 2 * 100 * 4 * 8
    dense = 4 * 100 * 4 * 16
    assert sim.compute_seconds(SHAPE, HW) == pytest.approx(3 * (4 * attention + 2 * experts + 2 * dense) / 5e5)
    assert sim.ring_all_reduce_seconds(1000, 1, HW, across_nodes=True) == 0
    assert sim.ring_all_reduce_seconds(1000, 4, HW, across_nodes=False) == pytest.approx(2 * 3 / 4 * 1000 / 1000)
    assert sim.ring_all_reduce_seconds(1000, 2, HW, across_nodes=True) == pytest.approx(2 * 1 / 2 * 1000 / 100)


def test_prediction_adds_its_terms_and_caps_the_expert_parallel_size():
    row = sim.predict(SHAPE, 16, HW)
    assert (row["ep_size"], row["replicas"]) == (8, 2)
    assert row["step_ms"] == pytest.approx(row["compute_ms"] + row["all_to_all_ms"] + row["all_reduce_ms"])
    dense_bytes = (4 * 16 * 4 + 2 * 2 * 4 * 16) * 2
    expert_bytes = 2 * 8 * 2 * 4 * 8 / 8 * 2  # 2 MoE layers, E 2 D H / P, bf16
    # 16 GPUs on 4-GPU nodes: both rings cross nodes (the 2 replicas of a shard sit 8 ranks apart)
    want_reduce = 0.75 * (2 * 15 / 16 * dense_bytes / 100 + 2 * 1 / 2 * expert_bytes / 100)
    assert row["all_reduce_ms"] == pytest.approx(1e3 * want_reduce)
    assert sim.predict(SHAPE, 16, HW, max_ep_size=4)["ep_size"] == 4
    table = sim.prediction_table(SHAPE, HW, [4, 8, 16], None)
    assert table[0]["weak_scaling_efficiency"] == 1.0
    assert all(r["weak_scaling_efficiency"] <= 1.0 for r in table)  # communication only grows with the GPUs


def test_latency_bandwidth_fit_recovers_a_known_line():
    points = [{"bytes": 2**p, "seconds": 1e-4 + 2**p / 2e9} for p in range(12, 27)]
    alpha, beta = sim.fit_latency_bandwidth(points)
    assert alpha == pytest.approx(1e-4, rel=0.05)
    assert beta == pytest.approx(2e9, rel=0.01)
    with pytest.raises(ValueError, match="at least"):
        sim.fit_latency_bandwidth(points[:3])


def test_predict_command_writes_json_and_markdown(tmp_path, capsys):
    assert sim.main(["predict", "--preset", "mixtral_8x7b", "--gpus", "8", "64", "--json", str(tmp_path / "p.json"),
                     "--markdown", str(tmp_path / "p.md")]) == 0  # fmt: skip
    result = json.loads((tmp_path / "p.json").read_text())
    assert [r["gpus"] for r in result["rows"]] == [8, 64]
    assert result["shape"] == dataclasses.asdict(sim.PRESETS["mixtral_8x7b"])
    assert "| gpus |" in (tmp_path / "p.md").read_text()
    assert all(math.isfinite(r["step_ms"]) for r in result["rows"])


@pytest.mark.slow
def test_measure_command_times_gloo_all_to_all(tmp_path):
    args = ["measure", "--min-log2", "12", "--max-log2", "23", "--repeats", "2", "--tokens", "64", "--dim", "16",
            "--hidden", "32", "--experts", "4", "--json", str(tmp_path / "m.json")]  # fmt: skip
    assert sim.main(args) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert [p["bytes"] for p in result["all_to_all"]] == [2**p for p in range(12, 24)]
    assert result["alpha_seconds"] > 0 and result["beta_bytes_per_s"] > 0
    assert 0 < result["layer"]["profiled_collective_share"] < 1
    assert "_c10d_functional::all_to_all_single" in result["layer"]["collective_events"]
