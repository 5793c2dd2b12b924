"""Every model family under every multi-process trainer config (``ddp_spawn``, ``ddp_ep``, ``fsdp_ep``), on tiny
models and 2 CPU processes (gloo).

- ``test_fsdp_ep_replicates_what_fully_shard_cannot_shard`` (default suite): FSDP2 refuses 0-d parameters
  (LIMoE's ``logit_scale``, Soft MoE's ``scale``); ``fully_shard_dense`` keeps them, and a task's own
  parameters, whole on every rank, and with ``reduce_replicated_grads`` every gradient equals the mean over
  the ranks of the single-process gradients (experts: the sum over ranks sliced, as DDP with expert
  parallelism computes), and the state dict keeps its keys and shapes (0-d stays 0-d).
- ``test_family_trains_the_same_under_every_trainer`` (slow): ``mome-train experiment=<family> trainer=<t>`` for
  ``ddp_ep`` and ``fsdp_ep`` ends on the weights of plain DDP (``ddp_spawn``) on the same data and seed (1e-5),
  for Soft MoE ViT, LIMoE, VLMo (its three pre-training stages, one epoch each) and MoE-LLaVA stage III, with
  gradient accumulation over 2 micro-batches. V-MoE is covered the same way by ``tests/test_expert_parallel.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_expert_parallel import _assert_same_weights, _mome_train_subprocess, run_distributed
from torch import nn

import mome
from mome.layers import aux_losses

# ---------------------------------------------------------------------------------- FSDP2 + scalars


class _Task(nn.Module):
    """A LightningModule's layout: the network as a child, and a parameter of the task itself (VLMo's
    ``mask_embedding``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.task_bias = nn.Parameter(torch.randn(3))

    def loss(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        out = self.model(*inputs)
        if isinstance(out, tuple):  # open_clip contract: (image features, text features, logit scale)
            image, text, scale = out
            out = scale * image @ text.T
        aux = sum(aux_losses(self.model).values(), torch.zeros(()))
        return (out[..., :3] + self.task_bias).square().mean() + aux


def _inputs(name: str, world_size: int) -> list[tuple[torch.Tensor, ...]]:
    images = torch.randn(world_size, 3, 3, 32, 32)
    if name.startswith("limoe"):
        text = torch.randint(1, 400, (world_size, 3, 16))
        return [(images[r], text[r]) for r in range(world_size)]
    return [(images[r],) for r in range(world_size)]


def _replicated_worker(rank: int, world_size: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from mome.layers.expert_parallel import expert_parameter_names, shard_experts
    from mome.lit.expert_parallel import fully_shard_dense, reduce_replicated_grads

    for name, scalars in (("limoe_tiny_patch8_e4", ["model.logit_scale"]), ("soft_moe_vit_tiny_patch8_e8", None)):
        torch.manual_seed(0)
        task = _Task(mome.create_model(name).eval())  # eval: no router noise to align
        shapes = {key: value.shape for key, value in task.state_dict().items()}
        scalars = scalars or [key for key, shape in shapes.items() if shape == ()]
        assert scalars and all(shapes[key] == () for key in scalars), name
        inputs = _inputs(name, world_size)
        reference = copy.deepcopy(task)
        grads = []
        for x in inputs:  # one process: each rank's batch, its gradients
            reference.zero_grad()
            reference.loss(x).backward()
            grads.append({key: p.grad.clone() for key, p in reference.named_parameters() if p.grad is not None})

        shard_experts(task)
        expert_names = expert_parameter_names(task)
        replicated = fully_shard_dense(task, init_device_mesh("cpu", (world_size,)), expert_names)
        assert set(scalars) | {"task_bias"} <= set(replicated), name
        params = dict(task.named_parameters())
        task.loss(inputs[rank]).backward()
        for key in expert_names:  # what ExpertParallelFSDPStrategy.post_backward does to the experts
            params[key].grad.div_(world_size)
        reduce_replicated_grads(params[key] for key in replicated)

        for key, param in params.items():
            want = sum(g[key] for g in grads) / world_size
            if key in expert_names:  # this rank's experts: every rank's tokens contributed, then / W
                got, count = param.grad, param.shape[0]
                want = want[rank * count : (rank + 1) * count]
            elif key in replicated:
                assert not isinstance(param, DTensor), key
                got = param.grad
            else:
                assert isinstance(param, DTensor), key
                got = param.grad.full_tensor()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{name}: grad of {key}")
        state = task.state_dict()  # keys and shapes as on one process (0-d parameters stay 0-d)
        assert list(state) == list(shapes), name
        for key in scalars:
            assert state[key].shape == () and not isinstance(state[key], DTensor), key


def test_fsdp_ep_replicates_what_fully_shard_cannot_shard():
    run_distributed(_replicated_worker)


# ------------------------------------------------------------------------------------- mome-train
RUN = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.accumulate_grad_batches=2",  # 2 optimiser steps of 2 micro-batches
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.deterministic=true",
    "logger=csv",
]
FAMILIES = {
    "softmoe_digits": ["data.batch_size=16", "data.eval_batch_size=32"],
    "limoe_digits": ["data.batch_size=16", "data.eval_batch_size=32"],
    # the three pre-training stages, one epoch each (the text stage freezes the image path and the V-FFN slice)
    "vlmo_digits": [
        "data.batch_size=16",
        "data.eval_batch_size=32",
        "trainer.max_epochs=3",
        "task.schedule=[{stage:image,epochs:1},{stage:text,epochs:1},{stage:image_text}]",
    ],
    # stage III: the upcycled MoE LLM (from scratch here: no stage II export), experts and routers train
    "moe_llava_shapes_stage3": [
        "task.init_from=null",
        "data.train_size=32",
        "data.val_size=4",
        "data.test_size=4",
        "data.batch_size=4",
        "callbacks.model_checkpoint.monitor=null",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(FAMILIES))
def test_family_trains_the_same_under_every_trainer(experiment, tmp_path):
    """``trainer=ddp_spawn``, ``ddp_ep`` and ``fsdp_ep`` (2 processes, expert_parallel_size=2) each train, test and
    export the family; the expert-parallel runs end on the DDP run's weights (``last.ckpt``: the whole task, its
    own parameters too; 1e-5), and their exports hold whole experts with the state dict's keys and shapes (0-d
    ``logit_scale``/``scale`` stay 0-d)."""
    from train_helpers import compose_train, state_dict_of

    from mome.cli.train import train
    from mome.lit import model_from_checkpoint

    overrides = [f"experiment={experiment}", *RUN, *FAMILIES[experiment]]
    if experiment.startswith("moe_llava"):
        overrides.append(f"data.root={tmp_path / 'shapes'}")
    _, ddp = train(compose_train(tmp_path / "ddp", [*overrides, "trainer=ddp_spawn"]))
    want = state_dict_of(tmp_path / "ddp" / "checkpoints" / "last.ckpt")
    exported = mome.create_model(f"local-dir:{ddp['export_dir']}").state_dict()
    # the export is the tested (best) checkpoint's model, not the weights fit handed back from the spawned ranks
    tested = model_from_checkpoint(ddp["best_checkpoint"]).state_dict()
    _assert_same_weights(exported, tested, f"{experiment} ddp_spawn export")
    _, ddp_ep = train(compose_train(tmp_path / "ddp_ep", [*overrides, "trainer=ddp_ep"]))
    assert ddp_ep["trainer"].world_size == 2
    _assert_same_weights(state_dict_of(tmp_path / "ddp_ep" / "checkpoints" / "last.ckpt"), want, f"{experiment} ddp_ep")
    got = mome.create_model(f"local-dir:{ddp_ep['export_dir']}").state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in exported.items()}
    got = _mome_train_subprocess(tmp_path / "fsdp_ep", [*overrides, "trainer=fsdp_ep"])
    _assert_same_weights(
        state_dict_of(tmp_path / "fsdp_ep" / "checkpoints" / "last.ckpt"), want, f"{experiment} fsdp_ep"
    )
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in exported.items()}
