"""Evaluation is dropless by default (``mome-eval`` and the validation / test of ``mome-train``): a result is a
function of the model and the sample, not of the batch; the dropped share per layer and modality is in
``results.json`` and the one-line summary; ``eval_capacity=model`` keeps a family's own eval capacity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_helpers import compose_train

import mome
from mome.cli.eval import evaluate
from mome.layers import MoE, eval_capacity
from mome.lit import ClassificationTask
from mome.lit.base import EvalCapacity, TaskConfigError

FAST = ["+trainer.enable_progress_bar=false", "routing_report=false"]


def _capacities(model):
    return [(m.eval_capacity_factor, m.dispatch) for m in model.modules() if isinstance(m, MoE)]


def test_eval_capacity_makes_outputs_independent_of_the_batch():
    torch.manual_seed(0)
    model = mome.create_model("vmoe_tiny_patch8_e4", num_classes=10, moe_kwargs={"dispatch": "buffers"}).eval()
    images = torch.randn(16, 3, 32, 32)
    before = _capacities(model)
    with torch.no_grad():
        batched = model(images)
        alone = torch.cat([model(image[None]) for image in images])
        assert (batched - alone).abs().max() > 1e-3  # at the training capacity, the batch changes the outputs
        with eval_capacity(model) as changed:
            assert len(changed) == len(before) and all(c == (None, "sorted") for c in _capacities(model))
            batched = model(images)
            alone = torch.cat([model(image[None]) for image in images])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert _capacities(model) == before  # restored


def test_expert_choice_layers_keep_their_capacity():
    model = mome.create_model("vmoe_tiny_patch8_e4", router="expert_choice")
    with eval_capacity(model) as changed:
        assert changed == []


def test_eval_capacity_values():
    assert EvalCapacity().value == "dropless" and EvalCapacity(None).value == "dropless"
    assert EvalCapacity("model").value == "model" and EvalCapacity(2).value == 2.0
    for bad in ("none", 0, -1.0, True):
        with pytest.raises(TaskConfigError, match="eval_capacity"):
            EvalCapacity(bad)


def test_validation_and_test_of_training_are_dropless():
    task = ClassificationTask(model={"model_name": "vmoe_tiny_patch8_e4", "num_classes": 10})
    own = _capacities(task.model)
    assert all(factor is not None for factor, _ in own)
    for start, end in ((task.on_validation_start, task.on_validation_end), (task.on_test_start, task.on_test_end)):
        start()
        assert all(factor is None for factor, _ in _capacities(task.model))
        end()
        assert _capacities(task.model) == own
    task = ClassificationTask(model={"model_name": "vmoe_tiny_patch8_e4", "num_classes": 10}, eval_capacity="model")
    task.on_validation_start()
    assert _capacities(task.model) == own


def _zero_shot(out: Path, batch_size: int, extra: list[str] = ()) -> dict:
    overrides = ["model.model_name=limoe_tiny_patch8_e4", "max_samples=40", f"data.eval_batch_size={batch_size}"]
    record, _ = evaluate(compose_train(out, [*overrides, *FAST, *extra], config_name="eval"))
    assert json.loads((out / "results.json").read_text()) == record
    return record


def test_mome_eval_metric_is_the_same_with_batch_size_one_and_the_full_batch(tmp_path, capsys):
    """The issue's case: LIMoE zero-shot dropped tokens at the training capacity, so a metric depended on the batch."""
    full = _zero_shot(tmp_path / "full", 40)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    one = _zero_shot(tmp_path / "one", 1)
    assert one["metrics"] == full["metrics"]
    assert full["routing"]["eval_capacity"] == "dropless" and full["routing"]["dropped_fraction"] == 0.0
    for entry in full["routing"]["layers"].values():
        assert entry["dropped_fraction"] == 0.0 and set(entry["per_modality"]) == {"image", "text"}
    assert "eval_capacity=dropless, dropped 0.0% of routed tokens" in line

    at_model = _zero_shot(tmp_path / "model", 40, ["eval_capacity=model"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert at_model["routing"]["eval_capacity"] == "model" and at_model["routing"]["dropped_fraction"] > 0.05
    worst = max(f for e in at_model["routing"]["layers"].values() for f in e["per_modality"].values())
    assert f"(most: {100 * worst:.1f}% in blocks." in line


def test_top5_is_the_same_whatever_the_batch_size():
    """torchmetrics' compute groups made top-5 read as top-1 when the first batch held one sample."""
    from mome.lit.classification import classification_metrics

    torch.manual_seed(0)
    logits, labels = torch.randn(40, 10), torch.randint(0, 10, (40,))
    whole, single = classification_metrics(10, ""), classification_metrics(10, "")
    whole.update(logits, labels)
    for i in range(40):
        single.update(logits[i : i + 1], labels[i : i + 1])
    assert {k: float(v) for k, v in single.compute().items()} == {k: float(v) for k, v in whole.compute().items()}
