"""MoE-LLaVA's three stages through mome-train: each starts from the model the last one exported."""

from __future__ import annotations

import pytest
import torch
from test_train_cli import small_shapes
from train_helpers import compose_train

import mome
from mome.cli.train import train
from mome.layers import MoE
from mome.lit import LLaVATask, TaskConfigError
from mome.lit.llava import normalize_answer

ONE_EPOCH = ["trainer.max_epochs=1", "logger=csv", "callbacks.model_checkpoint.monitor=null"]


def test_normalize_answer():
    assert normalize_answer("  Red. ") == "red" and normalize_answer("two") == "two"


def test_stage_must_fit_the_model():
    with pytest.raises(TaskConfigError, match="task.stage=1"):
        LLaVATask(model={"model_name": "moe_llava_tiny_e4"}, stage=1)  # stage 1 is dense


def test_three_stages_chain_and_upcycle(tmp_path):
    shapes = small_shapes(tmp_path / "shapes")
    _, first = train(compose_train(tmp_path / "s1", ["experiment=moe_llava_shapes_stage1", *ONE_EPOCH, *shapes]))
    stage1 = first["export_dir"]
    trained = {n for n, p in first["task"].model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.multi_modal_projector.") for n in trained)

    task = LLaVATask(model={"model_name": "moe_llava_tiny_e4", "moe_layers": "none"}, stage=2)
    task._initialise_from(str(stage1))  # what setup("fit") does: stage 2 starts from stage 1's weights
    dense = mome.create_model(f"local-dir:{stage1}")
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(task.model.state_dict()[name], value, rtol=0, atol=0, msg=name)

    _, second = train(
        compose_train(
            tmp_path / "s2", ["experiment=moe_llava_shapes_stage2", *ONE_EPOCH, *shapes, f"task.init_from={stage1}"]
        )
    )
    stage2 = second["export_dir"]
    third = LLaVATask(model={"model_name": "moe_llava_tiny_e4"}, stage=3, init_from=str(stage2))
    third._initialise_from(str(stage2))
    dense = mome.create_model(f"local-dir:{stage2}")
    layer = third.model.language_model.layers[0].mlp
    assert isinstance(layer, MoE)
    fc1 = dense.language_model.layers[0].mlp.fc1.weight
    for expert in range(layer.experts.num_experts):  # sparse upcycling: every expert is the dense FFN
        torch.testing.assert_close(layer.experts.w_in[expert], fc1, rtol=0, atol=0)
    trainable = {n for n, p in third.model.named_parameters() if p.requires_grad}
    assert trainable and all(".mlp.experts." in n or ".mlp.router." in n for n in trainable)

    metrics, _ = train(
        compose_train(
            tmp_path / "s3", ["experiment=moe_llava_shapes_stage3", *ONE_EPOCH, *shapes, f"task.init_from={stage2}"]
        )
    )
    assert 0.0 <= metrics["test/exact_match"] <= 1.0 and "test/exact_match/colour" in metrics


def test_stage3_step_leaves_frozen_parameters_bitwise_unchanged():
    from mome.data.conversation import ConversationDataset, collate_conversations
    from mome.data.shapes import shapes_records

    optimizer_cfg = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05}
    task = LLaVATask(model={"model_name": "moe_llava_tiny_e4"}, stage=3, optimizer=optimizer_cfg)
    tokenizer = task.tokenizer.tokenizer
    model = task.model
    records = list(shapes_records(4, seed=1))
    ids = dict(image_token_id=model.config.image_token_id, num_image_tokens=model.num_image_tokens)
    data = ConversationDataset(records, tokenizer, image_size=32, **ids)
    batch = collate_conversations([data[i] for i in range(4)])
    task.scheduler_cfg = {"name": "constant"}
    optimizer = task.configure_optimizers()  # the task's own optimiser (timm AdamW, weight decay 0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    output = model(**batch)
    (output.loss + sum(mome.aux_losses(model).values())).backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not (changed & frozen)  # weight decay included: frozen tensors are not in the optimiser
    assert any(".mlp.experts." in n for n in changed) and any(".mlp.router." in n for n in changed)
