"""Routing telemetry that tells the truth: the values written at a step are that step's; the load's entropy, CV and
max / min share; a console warning on a dead expert or too many drops."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from train_helpers import compose_train

import mome
from mome.cli.train import train
from mome.lit import RoutingTelemetry


def test_collapsed_load_does_not_read_maximal_entropy():
    """The bug: 'router entropy' read 1.386 (log 4, its maximum) on a router whose load was [0, 0, .5, .5]."""
    stats = {"blocks.1.mlp": {"expert_load": torch.tensor([0.0, 0.0, 0.5, 0.5]), "router_entropy": torch.tensor(1.386)}}
    scalars = RoutingTelemetry.scalars(stats)
    prefix = "routing/blocks.1.mlp"
    assert scalars[f"{prefix}/load_entropy"] == pytest.approx(math.log(2))
    assert scalars[f"{prefix}/token_entropy"] == pytest.approx(1.386)  # named for what it is: per-token
    assert f"{prefix}/router_entropy" not in scalars
    assert scalars[f"{prefix}/load_max"] == 0.5 and scalars[f"{prefix}/load_min"] == 0.0
    assert scalars[f"{prefix}/load_cv"] == pytest.approx(1.0)  # std 0.25 / mean 0.25
    uniform = RoutingTelemetry.scalars({"x": {"expert_load": torch.full((4,), 0.25)}})
    assert uniform["routing/x/load_entropy"] == pytest.approx(math.log(4)) and uniform["routing/x/load_cv"] == 0


def test_per_modality_load_statistics():
    model = mome.create_model("limoe_tiny_patch8_e4")
    model(torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 16)))
    scalars = RoutingTelemetry.scalars(mome.routing_stats(model))
    for m in (0, 1):
        for name in ("load_cv", "load_max", "load_min", "load_entropy", "token_entropy"):
            assert f"routing/blocks.1.mlp/m{m}/{name}" in scalars


def test_dead_expert_and_drops_warn_once_until_they_clear():
    telemetry = RoutingTelemetry(drop_warning=0.2)
    bad = {"blocks.1.mlp": {"expert_load": torch.tensor([0.0, 0.2, 0.3, 0.5]), "dropped_fraction": torch.tensor(0.43)}}
    lines = telemetry.warnings(bad, 50)
    assert lines == [
        "routing warning at step 50: blocks.1.mlp: expert 0 computed no token; "
        "dropped 43.0% of its assignments (> drop_warning=0.2)"
    ]
    assert telemetry.warnings(bad, 100) == []  # said once
    good = {"blocks.1.mlp": {"expert_load": torch.full((4,), 0.25), "dropped_fraction": torch.tensor(0.01)}}
    assert telemetry.warnings(good, 150) == []
    assert len(telemetry.warnings(bad, 200)) == 1  # back again: said again
    quiet = RoutingTelemetry(drop_warning=None, dead_expert_warning=False)
    assert quiet.warnings(bad, 50) == []


class _Capture(L.Callback):
    """The routing scalars of every training step's own forward pass."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.by_step[trainer.global_step] = RoutingTelemetry.scalars(mome.routing_stats(pl_module.model))


def test_logged_values_are_those_of_the_step_they_are_logged_at(tmp_path, monkeypatch):
    """The bug: with every_n_steps > log_every_n_steps, load_e0 repeated the step-1 value at later steps."""
    capture = _Capture()
    monkeypatch.setattr(L.Trainer, "__init__", _with_callback(L.Trainer.__init__, capture))
    overrides = ["experiment=vmoe_digits", "trainer.max_epochs=1", "trainer.max_steps=7", "trainer.log_every_n_steps=1"]
    overrides += ["callbacks.routing_telemetry.every_n_steps=3", "callbacks.routing_telemetry.heatmap=false"]
    overrides += ["logger=csv", "test=false", "export=false", "trainer.limit_val_batches=1", "data.batch_size=16"]
    overrides += ["+trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0"]
    train(compose_train(tmp_path, overrides))
    rows = list(csv.DictReader(open(next(tmp_path.glob("csv/**/metrics.csv")))))
    key = "routing/blocks.1.mlp/load_e0"
    logged = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
    assert sorted(logged) == [1, 3, 6]  # step 1 and every 3rd step, nowhere else
    for step, value in logged.items():
        assert value == pytest.approx(capture.by_step[step][key], abs=1e-6), step
    assert len({capture.by_step[s][key] for s in (1, 3, 6)}) > 1  # the load moved; each row shows its own step


def _with_callback(init, callback):
    def patched(self, *args, callbacks=None, **kwargs):
        init(self, *args, callbacks=[*(callbacks or []), callback], **kwargs)

    return patched
