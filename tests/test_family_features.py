"""Every family with every scale feature of its task: gradient checkpointing, ``bf16-mixed``, ``task.compile``.

One tiny model per family (V-MoE, Soft MoE ViT, LIMoE, VLMo, MoE-LLaVA) in the task ``mome-train`` gives it
(classification, contrastive, VLMo's image-text stage, LLaVA stage 3), on one fixed synthetic batch:

- ``task.grad_checkpointing=true``: the gradients of every parameter and the aux losses equal the eager ones,
  and the re-run of the forward in backward records nothing (no aux loss read twice, no routing statistics
  replaced), also with the checkpoint's early stop off and with timm's reentrant default switched on;
- ``trainer.precision=bf16-mixed`` on CPU: a few optimiser steps, every loss finite;
- ``task.compile``: the first step's loss equals eager's (``aot_eager`` in the default suite, inductor, what
  ``task.compile=true`` runs, under ``-m slow``).
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import timm.layers
import torch
from open_clip.loss import ClipLoss
from torch.utils.checkpoint import set_checkpoint_early_stop

import mome
from mome.lit import ClassificationTask, ContrastiveTask, LLaVATask, VLMoTask, base

FAMILIES = ("vmoe", "softmoe", "limoe", "vlmo", "moe_llava")
#: Families whose MoE layers add aux losses (Soft MoE and VLMo's modality experts have none).
WITH_AUX = {"vmoe", "limoe", "moe_llava"}


def make_task(family: str, **task_kwargs):
    """The tiny model of ``family`` in its ``mome-train`` task (seeded), and one batch for it."""
    torch.manual_seed(0)
    if family in ("vmoe", "softmoe"):
        name = "vmoe_tiny_patch8_e4" if family == "vmoe" else "soft_moe_vit_tiny_patch8_e8"
        task = ClassificationTask(model={"model_name": name, "num_classes": 10}, **task_kwargs)
        return task, {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([1, 2, 3, 4])}
    if family in ("limoe", "vlmo"):
        if family == "limoe":
            task = ContrastiveTask(model={"model_name": "limoe_tiny_patch8_e4"}, **task_kwargs)
        else:
            task = VLMoTask(model={"model_name": "vlmo_tiny_patch8_32"}, **task_kwargs)
        task.clip_loss = ClipLoss()  # what setup() builds (rank 0 of 1)
        texts = [f"a photo of the digit {w}." for w in ("one", "two", "three", "four")]
        batch = {"image": torch.randn(4, 3, 32, 32), "text": task.tokenizer(texts), "label": torch.tensor([1, 2, 3, 4])}
        return task, batch
    from mome.data.conversation import ConversationDataset, collate_conversations
    from mome.data.shapes import shapes_records

    task = LLaVATask(model={"model_name": "moe_llava_tiny_e4"}, stage=3, **task_kwargs)
    model = task.model
    ids = dict(image_token_id=model.config.image_token_id, num_image_tokens=model.num_image_tokens)
    data = ConversationDataset(list(shapes_records(4, seed=1)), task.tokenizer.tokenizer, image_size=32, **ids)
    return task, collate_conversations([data[i] for i in range(4)])


def step(task, batch, monkeypatch):
    """One training step (seeded: noisy routers, masking): its loss, the aux losses ``total_loss`` added, the
    gradients, and what the MoE layers hold after backward (aux losses left unread, routing statistics)."""
    task.train()
    task.zero_grad(set_to_none=True)
    added: dict[str, torch.Tensor] = {}

    def aux_losses(model, **kwargs):
        values = mome.aux_losses(model, **kwargs)
        added.update({k: v.detach().clone() for k, v in values.items()})
        added.update({f"{k}.requires_grad": v.requires_grad for k, v in values.items()})
        return values

    monkeypatch.setattr(base, "aux_losses", aux_losses)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = task.training_step(batch, 0)
    stats = mome.routing_stats(task.model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    after = {"unread_aux": mome.aux_losses(task.model, clear=False), "stats_replaced": stats_replaced(task, stats)}
    return loss.detach(), added, grads, after


def stats_replaced(task, before):
    """Layers whose routing statistics changed identity since ``before`` (a re-run recorded over them)."""
    now = mome.routing_stats(task.model)
    return sorted(
        name
        for name in set(before) | set(now)
        if set(before.get(name, {})) != set(now.get(name, {}))
        or any(now[name][k] is not v for k, v in before[name].items())
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_checkpointing_gives_the_eager_gradients_and_aux_losses(family, monkeypatch):
    eager, batch = make_task(family)
    loss, aux, grads, after = step(eager, batch, monkeypatch)
    assert after == {"unread_aux": {}, "stats_replaced": []}
    assert (family in WITH_AUX) == bool(aux)
    checkpointed, _ = make_task(family, grad_checkpointing=True)
    checkpointed.load_state_dict(eager.state_dict())
    for early_stop in (True, False):  # off: the re-run goes on to the end of every checkpointed block
        with set_checkpoint_early_stop(early_stop):
            loss_ckpt, aux_ckpt, grads_ckpt, after_ckpt = step(checkpointed, batch, monkeypatch)
        assert after_ckpt == {"unread_aux": {}, "stats_replaced": []}, f"recorded in backward ({early_stop=})"
        torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-6)
        assert aux_ckpt.keys() == aux.keys()
        for name, value in aux.items():
            torch.testing.assert_close(aux_ckpt[name], value, rtol=1e-6, atol=1e-7, msg=name)
        assert grads_ckpt.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["vmoe", "limoe"])
def test_grad_checkpointing_stays_non_reentrant(family, monkeypatch):
    """timm's ``set_reentrant_ckpt(True)`` (``TIMM_REENTRANT_CKPT=1``) would run each block under no_grad: the aux
    losses recorded there would have no graph and train no router. The MoE models checkpoint non-reentrantly
    whatever it says: the aux losses keep their graph and the gradients are the eager ones."""
    eager, batch = make_task(family)
    _, _, grads, _ = step(eager, batch, monkeypatch)
    task, _ = make_task(family, grad_checkpointing=True)
    timm.layers.set_reentrant_ckpt(True)
    try:
        _, aux, grads_ckpt, _ = step(task, batch, monkeypatch)
    finally:
        timm.layers.set_reentrant_ckpt(False)
    assert aux and all(value for key, value in aux.items() if key.endswith(".requires_grad"))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"]))


def fit(task, batch, steps: int, **trainer_kwargs) -> list[float]:
    """The training losses of ``steps`` optimiser steps of a CPU ``Trainer`` on ``batch`` repeated."""
    losses = _Losses()
    kwargs = {"enable_model_summary": False, **trainer_kwargs}
    kwargs["callbacks"] = [losses, *trainer_kwargs.get("callbacks", ())]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
    loader = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(task, train_dataloaders=loader)
    return losses.values


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_mixed_trains(family):
    task, batch = make_task(family)
    losses = fit(task, batch, 3, precision="bf16-mixed")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), losses


def _compiled_first_loss(family: str, compile) -> tuple[list[float], list[float]]:
    from torch._dynamo.utils import counters

    eager, batch = make_task(family)
    compiled, _ = make_task(family, compile=compile)
    compiled.load_state_dict(eager.state_dict())
    expected = fit(eager, batch, 2)
    torch._dynamo.reset()
    counters.clear()
    losses = fit(compiled, batch, 2)
    assert counters["stats"]["unique_graphs"] > 0  # the training steps ran compiled graphs
    assert all(m._compiled_call_impl is not None for m in compiled.compile_targets())
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiled in place: eager's parameter names
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(losses[0], expected[0], rtol=1e-4, atol=1e-5)
    return losses, expected


@pytest.mark.parametrize("family", ["vmoe", "limoe"])
def test_compile_first_step_loss_equals_eager_aot_eager(family):
    """``task.compile={backend: aot_eager}``: Dynamo and AOTAutograd (forward and backward graphs), no codegen."""
    _compiled_first_loss(family, {"backend": "aot_eager"})


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_true_first_step_loss_equals_eager(family):
    """``task.compile=true``: torch.compile's default backend (inductor, C++ code generation on CPU). Inductor draws
    random numbers from its own generator, so a noisy router (V-MoE, LIMoE) routes differently from eager unless
    ``torch._inductor.config.fallback_random`` (set here: then the second step's loss, after one update with the
    compiled gradients, is eager's too)."""
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):
        losses, expected = _compiled_first_loss(family, True)
    torch.testing.assert_close(losses[1], expected[1], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------- FLOPs


def test_moe_layer_flops_match_a_hand_count():
    """One MoE layer, dropless: the router ``2 T D E`` plus ``k`` expert FFNs per token,
    ``2 D H + 2 H D`` each (FlopCounterMode counted 0 for the sorted dispatch's grouped_mm before)."""
    from timm.layers import Mlp

    from mome._flops import count_flops
    from mome.layers import SparseMoE

    tokens, dim, hidden, experts, top_k = 24, 32, 64, 4, 2
    x = torch.randn(1, tokens, dim)
    assert count_flops(Mlp(dim, hidden), x) == tokens * (2 * dim * hidden + 2 * hidden * dim)
    for dispatch in ("sorted", "buffers"):  # count_flops evaluates dropless: capacity buffers use the sorted path
        capacity = dict(capacity_factor=2.0, eval_capacity_factor=2.0) if dispatch == "buffers" else {}
        layer = SparseMoE(dim, hidden, num_experts=experts, top_k=top_k, router="top_k", dispatch=dispatch, **capacity)
        expected = 2 * tokens * dim * experts + tokens * top_k * (2 * dim * hidden + 2 * hidden * dim)
        assert count_flops(layer, x) == expected, dispatch


def test_vit_flops_and_parameters_match_a_hand_count():
    """The tiny V-MoE dense (``moe_layers="none"``) against ``2 m n k`` per product, then with its MoE layers:
    each adds its router and a second expert per token (k = 2); active parameters are the dense ones plus
    k/E of the expert parameters."""
    from mome._flops import model_cost, parameter_counts

    dense = mome.create_model("vmoe_tiny_patch8_e4", moe_layers="none")
    d, hidden, depth, classes = dense.embed_dim, dense.blocks[0].mlp.fc1.out_features, len(dense.blocks), 10
    patches, patch_size = dense.patch_embed.num_patches, dense.patch_embed.patch_size[0]
    t = patches + 1  # the class token
    per_block = 2 * t * d * 3 * d + 2 * (2 * t * t * d) + 2 * t * d * d + 2 * t * (d * hidden + hidden * d)
    expected = 2 * patches * (3 * patch_size**2) * d + depth * per_block + 2 * d * classes
    image = torch.zeros(1, 3, 32, 32)
    cost = model_cost(dense, image)
    assert cost["flops"] == expected and cost["active_params"] == cost["total_params"] and cost["expert_params"] == 0

    moe = mome.create_model("vmoe_tiny_patch8_e4")
    layers = [b.mlp for b in moe.blocks if hasattr(b.mlp, "experts")]
    num_experts, top_k = layers[0].num_experts, layers[0].router.top_k
    routers = len(layers) * 2 * t * d * num_experts
    second_expert = len(layers) * (top_k - 1) * 2 * t * (d * hidden + hidden * d)
    assert model_cost(moe, image)["flops"] == expected + routers + second_expert
    counts = parameter_counts(moe)
    expert_params = sum(p.numel() for layer in layers for p in layer.experts.parameters())
    assert counts["expert_params"] == expert_params
    assert counts["active_params"] == counts["total_params"] - expert_params + expert_params * top_k // num_experts


@pytest.mark.parametrize("family", FAMILIES)
def test_model_summary_reports_flops_and_the_moe_cost(family):
    """Lightning's summary runs the task's ``example_input_array`` (one sample): its Total FLOPs are not 0, and
    ``MoEModelSummary`` adds the active/total parameters and the active FLOPs."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from mome.lit import MoEModelSummary

    task, batch = make_task(family)
    assert ModelSummary(task, max_depth=1).total_flops > 0
    summary = MoEModelSummary(max_depth=1)
    fit(task, batch, 1, callbacks=[summary], enable_model_summary=True)
    cost = task.model_cost()
    assert 0 < cost["active_params"] <= cost["total_params"] and cost["flops"] > 0
    assert summary.cost_line.startswith("MoE cost: active params") and "active FLOPs" in summary.cost_line
