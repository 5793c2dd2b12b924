"""The Lightning side: tasks, schedule, freezing, telemetry, the embedded digits data, resumable loading."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import mome
from mome.data import DIGIT_CLASSNAMES, DigitsDataModule
from mome.data.base import EpochSampler, SeededSamples
from mome.data.digits import digits_splits
from mome.lit import ClassificationTask, ContrastiveTask, RoutingTelemetry, TaskConfigError, set_trainable
from mome.lit.base import cosine_with_warmup


def test_digit_splits_are_fixed_stratified_and_disjoint():
    splits = digits_splits()
    assert {k: len(v[1]) for k, v in splits.items()} == {"train": 1297, "val": 250, "test": 250}
    everything = np.concatenate([labels for _, labels in splits.values()])
    share = np.bincount(everything, minlength=10) / len(everything)
    for _, labels in splits.values():  # stratified: each split has the classes in the whole set's proportions
        assert np.abs(np.bincount(labels, minlength=10) - share * len(labels)).max() <= 1.0
    flat = {k: {x.tobytes() for x in v[0]} for k, v in splits.items()}
    assert len(flat["test"] & flat["train"]) <= 2  # the UCI set has a couple of duplicate images
    again = digits_splits()
    assert np.array_equal(again["test"][0], splits["test"][0])


def test_digits_module_yields_captions_and_labels():
    task = ContrastiveTask(model={"model_name": "limoe_tiny_patch8_e4"})
    datamodule = DigitsDataModule(batch_size=8, eval_batch_size=16)
    datamodule.bind(task.model, task.tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["image"].shape == (16, 3, 32, 32) and batch["text"].shape == (16, 16)
    dataset = datamodule.datasets["val"]
    label = int(batch["label"][3])
    assert DIGIT_CLASSNAMES[label] in dataset.caption(3)
    assert torch.equal(batch["text"][3], task.tokenizer([dataset.caption(3)])[0])


def test_digits_module_needs_binding_first():
    with pytest.raises(mome.data.DataConfigError, match="bind"):
        DigitsDataModule().setup("fit")
    with pytest.raises(mome.data.DataConfigError, match="data.task"):
        DigitsDataModule(task="segmentation")


def test_seeded_augmentation_ignores_global_rng_and_epoch_sampler_resumes():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(()) + i

    seeded = SeededSamples(Noise(), seed=3)
    torch.manual_seed(0)
    first = seeded[12]
    state = torch.get_rng_state()
    torch.manual_seed(123)
    assert seeded[12] == first  # the same draw is the same sample, whatever the global RNG
    assert seeded[2] != first  # the same index in another epoch is augmented differently
    torch.set_rng_state(state)

    sampler = EpochSampler(10, seed=1)
    sampler.set_epoch(2)
    order = list(sampler)
    assert sorted(order) == list(range(20, 30))
    sampler.skip = 4
    assert list(sampler) == order[4:] and list(sampler) == order  # skip applies once


def test_cosine_schedule_warms_up_then_decays():
    values = [cosine_with_warmup(s, total_steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_set_trainable_freezes_by_pattern_and_rejects_typos():
    task = ClassificationTask(model={"model_name": "vmoe_tiny_patch8_e4", "num_classes": 10})
    kept = set_trainable(task.model, ["blocks.*.mlp.*", "head.*"])
    assert kept and all(name.startswith(("blocks.", "head.")) for name in kept)
    assert not task.model.patch_embed.proj.weight.requires_grad
    with pytest.raises(TaskConfigError, match="blokcs"):
        set_trainable(task.model, ["blokcs.*"])


def test_no_weight_decay_on_biases_norms_and_scalars():
    task = ContrastiveTask(
        model={"model_name": "limoe_tiny_patch8_e4"},
        optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05},
        scheduler={"name": "constant"},
    )
    optimizer = task.configure_optimizers()
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(task.model.logit_scale) not in decayed
    assert all(id(p) not in decayed for n, p in task.model.named_parameters() if n.endswith(".bias") or p.ndim <= 1)
    assert id(task.model.blocks[0].attn.qkv.weight) in decayed


def test_routing_telemetry_scalars_and_heatmap(tmp_path):
    model = mome.create_model("limoe_tiny_patch8_e4")
    model(torch.randn(4, 3, 32, 32), torch.randint(1, 100, (4, 16)))
    scalars = RoutingTelemetry.scalars(mome.routing_stats(model))
    loads = [v for k, v in scalars.items() if re.fullmatch(r"routing/blocks.1.mlp/load_e\d+", k)]
    assert len(loads) == 4 and sum(loads) == pytest.approx(1.0, abs=1e-5)
    assert "routing/blocks.1.mlp/m1/token_entropy" in scalars  # per modality (image 0, text 1)
    from mome.lit import routing_heatmap

    stats = mome.routing_stats(model)
    figure = routing_heatmap({k: v["expert_load_per_modality"] for k, v in stats.items()})
    figure.savefig(tmp_path / "heat.png")
    assert (tmp_path / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(figure.axes) == 4  # two modality panels, each with its colour bar


def test_fused_adamw_is_one_override_away():
    """docs/performance.md: ``mome-train ... +task.optimizer.fused=true`` builds torch's fused AdamW (through timm's
    ``create_optimizer_v2``), which takes one kernel for every parameter's update."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import mome.cli.train  # noqa: F401 - registers the model source of conf/train.yaml's search path
    from mome.cli._common import build_task

    conf = Path(__file__).resolve().parents[1] / "conf"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+task.optimizer.fused=true", "task.scheduler.name=constant"])
    optimizer = build_task(cfg).configure_optimizers()  # what mome-train builds from the composed config
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
