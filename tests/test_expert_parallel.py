"""Expert parallelism on 2 CPU processes (gloo) against the same model on one process (sparse and Soft MoE).

Capacity is per rank (each rank routes its local tokens), so the reference is the single-process layer
applied to each rank's tokens separately; expert gradients on rank ``r`` are the slice of
``sum_r' dL_r'/dW`` (the backward all-to-all returns every rank's contribution).
"""

from __future__ import annotations

import copy
import os
import socket
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mome
from mome.layers import ExpertChoiceRouter, SoftMoE, SparseMoE, aux_losses, routing_stats
from mome.layers.expert_parallel import (
    ShardedExperts,
    expert_parameter_names,
    gather_expert_state_dict,
    shard_expert_state_dict,
    shard_experts,
    unshard_experts,
)

WORLD_SIZE = 2
TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears its group down while another still runs a collective on it
    finally:
        dist.destroy_process_group()
    # The work is done and checked: leave without the interpreter's and C++ runtime's teardown, where a
    # background thread of the process group or the autograd engine can abort ("terminate called without an
    # active exception") after every assertion has passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn, *args, world_size: int = WORLD_SIZE, timeout: float = TIMEOUT_S) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo processes; fail on error or timeout."""
    context = mp.start_processes(
        _entry, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # raises ProcessRaisedException if a worker failed
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout} s")


# ------------------------------------------------------------------------------------ layer-level
LAYER_CASES = [
    # top_k, num_experts, capacity_factor, dispatch, gated, bias, router
    (1, 4, None, "sorted", False, True, "top_k"),
    (2, 4, None, "sorted", False, True, "top_k"),
    (1, 4, 0.5, "sorted", False, True, "top_k"),  # capacity drops
    (2, 8, 0.5, "sorted", True, False, "top_k"),  # capacity drops, 4 experts per rank, SwiGLU
    (1, 4, 0.5, "buffers", False, True, "top_k"),
    (2, 8, 0.75, "buffers", True, True, "top_k"),
    (2, 4, 1.0, "sorted", False, True, "expert_choice"),
]


def _build_layer(case_index: int, top_k, num_experts, capacity_factor, dispatch, gated, bias, router) -> SparseMoE:
    torch.manual_seed(case_index)
    kwargs = {"aux_loss_weights": {"z_loss": 1e-3}}
    if router == "top_k":
        kwargs["aux_loss_weights"] = {"load_balance": 1e-2, "importance": 1e-2, "z_loss": 1e-3}
        kwargs["capacity_factor"] = capacity_factor
    else:
        kwargs["router"] = lambda dim, experts: ExpertChoiceRouter(dim, experts, capacity_factor)
    return SparseMoE(
        16,
        32,
        num_experts,
        top_k,
        gated=gated,
        act_layer=torch.nn.SiLU if gated else torch.nn.GELU,
        bias=bias,
        dispatch=dispatch,
        **kwargs,
    )


def _loss_and_aux(layer, x, weight):
    out = layer(x)
    aux = aux_losses(layer)
    return out, aux, (out * weight).sum() + sum(aux.values())


def _assert_sharded_equals_reference(layer, rank: int, world_size: int, label: str, drops: bool = False) -> None:
    """Shard a copy of ``layer`` over the default group and compare with ``layer`` on one process.

    Rank ``r`` gets ``3 + r`` sequences (the ranks' token counts differ, as with a smaller last batch).
    """
    inputs = [torch.randn(3 + r, 5, 16) for r in range(world_size)]  # [B_r, N, D], same on every rank
    weight = torch.randn(16)

    # Reference: one process, the same layer applied to each rank's tokens (routing per rank).
    reference = copy.deepcopy(layer)
    names = [name for name, _ in reference.named_parameters()]
    expected = []
    dropped = 0.0
    for x in inputs:
        x = x.clone().requires_grad_()
        out, aux, loss = _loss_and_aux(reference, x, weight)
        dropped += float(routing_stats(reference)[""].get("dropped_fraction", 0.0))
        grads = torch.autograd.grad(loss, [x, *reference.parameters()])
        expected.append((out.detach(), {k: v.detach() for k, v in aux.items()}, dict(zip(["x", *names], grads))))
    if drops:
        assert dropped > 0, f"{label}: the capacity drops nothing; the test would not test drops"

    sharded = copy.deepcopy(layer)
    assert shard_experts(sharded) == [""]
    assert isinstance(sharded.experts, ShardedExperts)
    assert [name for name, _ in sharded.named_parameters()] == names
    x = inputs[rank].clone().requires_grad_()
    out, aux, loss = _loss_and_aux(sharded, x, weight)
    loss.backward()

    ref_out, ref_aux, ref_grads = expected[rank]
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out, ref_out, **tol, msg=f"{label}: output")
    assert sorted(aux) == sorted(ref_aux)
    for name in aux:
        torch.testing.assert_close(aux[name], ref_aux[name], **tol, msg=f"{label}: aux {name}")
    torch.testing.assert_close(x.grad, ref_grads["x"], **tol, msg=f"{label}: input grad")
    local = slice(rank * layer.num_experts // world_size, (rank + 1) * layer.num_experts // world_size)
    expert_names = set(expert_parameter_names(sharded))
    for name, param in sharded.named_parameters():
        if name in expert_names:  # every rank's tokens contribute to the local experts
            want = sum(grads[name] for _, _, grads in expected)[local]
        else:  # router: this rank's loss only (DDP averages it over the ranks)
            want = ref_grads[name]
        torch.testing.assert_close(param.grad, want, **tol, msg=f"{label}: grad of {name}")


def _layer_worker(rank: int, world_size: int) -> None:
    for case_index, case in enumerate(LAYER_CASES):
        layer = _build_layer(case_index, *case)
        _assert_sharded_equals_reference(
            layer, rank, world_size, f"case {case}", drops=case[2] is not None and case[6] == "top_k"
        )
    for num_experts, slots_per_expert, gated in [(4, 1, False), (4, 3, True), (8, 2, False)]:
        torch.manual_seed(num_experts * slots_per_expert)
        layer = SoftMoE(16, 32, num_experts, slots_per_expert, gated=gated)
        _assert_sharded_equals_reference(layer, rank, world_size, f"soft moe E={num_experts} P={slots_per_expert}")


@pytest.mark.slow
def test_expert_parallel_layer_equals_single_process():
    run_distributed(_layer_worker)


# ----------------------------------------------------------------------------------- model-level
def _model_worker(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = mome.create_model("vmoe_tiny_patch8_e4", num_classes=10).eval()
    full = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(world_size, 2, 3, 32, 32)
    with torch.no_grad():
        expected = model(images[rank])

    sharded = copy.deepcopy(model)
    rng_before = torch.get_rng_state()
    layers = shard_experts(sharded)
    # sharding draws nothing from the global RNG (it would shift a noisy router's draws against plain DDP)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert layers == ["blocks.1.mlp", "blocks.3.mlp"]
    state = sharded.state_dict()
    assert list(state) == list(full)
    shard = shard_expert_state_dict(full, rank, world_size)
    assert sorted(k for k in full if not torch.equal(full[k], shard[k]) or full[k].shape != shard[k].shape) == sorted(
        expert_parameter_names(sharded)
    )
    for name, value in state.items():
        assert torch.equal(value, shard[name]), name
    with torch.no_grad():
        torch.testing.assert_close(sharded(images[rank]), expected, rtol=1e-5, atol=1e-5)

    # A full checkpoint loads into a sharded model (sharded by name), and gathering gives it back exactly.
    fresh = mome.create_model("vmoe_tiny_patch8_e4", num_classes=10).eval()
    shard_experts(fresh)
    fresh.load_state_dict(shard_expert_state_dict(full, rank, world_size), strict=True)
    gathered = gather_expert_state_dict(fresh)
    assert list(gathered) == list(full)
    for name, value in full.items():
        assert torch.equal(gathered[name], value), name
    rng_before = torch.get_rng_state()
    assert unshard_experts(fresh) == layers
    assert torch.equal(torch.get_rng_state(), rng_before)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, full[name]), name


@pytest.mark.slow
def test_expert_parallel_model_state_dict_round_trip():
    run_distributed(_model_worker)


def _fsdp2_worker(rank: int, world_size: int) -> None:
    """FSDP2 (``fully_shard``) on the dense parameters, expert parallelism on the experts (kept out of FSDP)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = mome.create_model("vmoe_tiny_patch8_e4", num_classes=10).eval()  # eval: no router noise to align
    images = torch.randn(world_size, 2, 3, 32, 32)
    reference = copy.deepcopy(model)
    grads = []
    for x in images:  # one process: each rank's batch, its gradients
        reference.zero_grad()
        reference(x).square().mean().backward()
        grads.append({name: p.grad.clone() for name, p in reference.named_parameters()})
    with torch.no_grad():
        expected = reference(images[rank])

    shard_experts(model)
    expert_names = set(expert_parameter_names(model))
    experts = {p for name, p in model.named_parameters() if name in expert_names}
    mesh = init_device_mesh("cpu", (world_size,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in experts})
    fully_shard(model, mesh=mesh, ignored_params=experts)
    out = model(images[rank])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    local = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    for name, param in model.named_parameters():
        if name in expert_names:  # a plain tensor: every rank's tokens, summed by the backward all-to-all
            assert not isinstance(param, DTensor), name
            want = sum(g[name] for g in grads)[local]
            torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-5, msg=name)
        else:  # FSDP2 reduce-scatters the mean over ranks
            assert isinstance(param, DTensor), name
            want = sum(g[name] for g in grads) / world_size
            torch.testing.assert_close(param.grad.full_tensor(), want, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_fsdp2_on_dense_parameters_composes_with_expert_parallelism():
    run_distributed(_fsdp2_worker)


# ---------------------------------------------------------------------------------- one process
def test_shard_expert_state_dict_slices_experts_by_name():
    layer = SparseMoE(8, 16, 4, 2)
    state = {f"blocks.0.mlp.{k}": v for k, v in layer.state_dict().items()}
    parts = [shard_expert_state_dict(state, rank, 2) for rank in range(2)]
    for key, value in state.items():
        if key.endswith(("experts.w_in", "experts.w_out", "experts.b_in", "experts.b_out")):
            assert torch.equal(torch.cat([p[key] for p in parts]), value)
            assert parts[0][key].shape[0] == 2
        else:
            assert parts[0][key] is value
    with pytest.raises(ValueError, match="not divisible"):
        shard_expert_state_dict(state, 0, 3)
    with pytest.raises(mome.InvalidArgumentError, match="rank must be an integer in \\[0, world_size=2\\), got 2"):
        shard_expert_state_dict(state, 2, 2)
    with pytest.raises(KeyError, match="not in the state dict"):
        shard_expert_state_dict(state, 0, 2, names=["missing.experts.w_in"])


def test_sharding_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        shard_experts(SparseMoE(8, 16, 4, 2))


# ------------------------------------------------------------------------------ Lightning strategy
EP_RUN = [
    "experiment=vmoe_digits",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.deterministic=true",
    "logger=csv",
]


def _exported_state(objects) -> dict[str, torch.Tensor]:
    return mome.create_model(f"local-dir:{objects['export_dir']}").state_dict()


TWO_EPOCHS = [*EP_RUN, "trainer.max_epochs=2"]
DDP_EP = ["trainer=ddp_ep", "trainer.expert_parallel_size=2"]
FSDP_EP = ["trainer=fsdp_ep", "trainer.expert_parallel_size=2"]
STOP_AFTER_FIRST_EPOCH = ["+callbacks.stop._target_=kill_helpers.StopAfterEpoch", "+callbacks.stop.epoch=0"]


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights plain DDP (2 processes) ends on after 2 uninterrupted epochs of V-MoE-tiny."""
    from train_helpers import compose_train

    from mome.cli.train import train

    _, reference = train(compose_train(tmp_path_factory.mktemp("ddp"), [*TWO_EPOCHS, "trainer=ddp_spawn"]))
    return _exported_state(reference)


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], label: str) -> None:
    assert list(got) == list(want), label
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=2e-5, msg=f"{label}: {name}")


@pytest.mark.slow
def test_ddp_ep_runs_equal_ddp_runs_across_resumes(tmp_path, ddp_reference):
    """Expert parallelism changes where the experts live, not what is computed: with the same seed (noisy top-2
    router, gradient clipping at 1.0, AdamW), these runs of V-MoE-tiny end on the same weights (1e-5) as plain
    DDP for 2 epochs:

    - DDP with expert parallelism (P=2) for 2 epochs (a checkpoint is written after the first: saving must not
      touch the live optimiser state);
    - the same stopped after epoch 1, then resumed from its ``last.ckpt`` under it;
    - the same expert-parallel checkpoint resumed under plain DDP (it holds whole experts and optimiser moments).
    """
    from train_helpers import compose_train

    from mome.cli.train import train
    from mome.lit import model_from_checkpoint

    _, uninterrupted = train(compose_train(tmp_path / "ep", [*TWO_EPOCHS, *DDP_EP]))
    metrics, first = train(compose_train(tmp_path / "ep1", [*TWO_EPOCHS, *DDP_EP, *STOP_AFTER_FIRST_EPOCH]))
    assert first["trainer"].world_size == 2
    assert 0.0 <= metrics["test/top1"] <= 1.0
    last = tmp_path / "ep1" / "checkpoints" / "last.ckpt"
    # The checkpoint written under expert parallelism holds whole experts: it loads strictly on one process.
    assert model_from_checkpoint(last).blocks[1].mlp.experts.w_in.shape[0] == 4
    _, resumed_ep = train(compose_train(tmp_path / "ep2", [*TWO_EPOCHS, *DDP_EP, f"ckpt_path={last}"]))
    _, resumed_ddp = train(compose_train(tmp_path / "ddp2", [*TWO_EPOCHS, "trainer=ddp_spawn", f"ckpt_path={last}"]))

    _assert_same_weights(_exported_state(uninterrupted), ddp_reference, "ep uninterrupted")
    _assert_same_weights(_exported_state(resumed_ep), ddp_reference, "ep resumed under ep")
    _assert_same_weights(_exported_state(resumed_ddp), ddp_reference, "ep resumed under ddp")
    after_one_epoch = _exported_state(first)
    assert not torch.equal(after_one_epoch["blocks.1.mlp.experts.w_in"], ddp_reference["blocks.1.mlp.experts.w_in"])
    exported = mome.create_model(f"local-dir:{resumed_ep['export_dir']}")
    assert exported(torch.zeros(1, 3, 32, 32)).shape == (1, 10)

    # mome-eval on one process evaluates the expert-parallel checkpoint like any other.
    from mome.cli.eval import evaluate

    overrides = [f"ckpt_path={last}", "eval_task=classification", "routing_report=false", "trainer=cpu"]
    record, _ = evaluate(compose_train(tmp_path / "eval", overrides, config_name="eval"))
    assert record["task"] == "classification" and 0.0 <= record["metrics"]["acc1"] <= 1.0


def _mome_train_subprocess(run_dir, overrides: list[str]) -> dict[str, torch.Tensor]:
    """``mome-train`` as a user runs it (Lightning's subprocess launcher re-runs the command for rank 1);
    returns the exported weights."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, str(Path(sys.executable).parent / "mome-train"), *overrides, f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "model saved to" in done.stdout
    return mome.create_model(f"local-dir:{run_dir / 'model'}").state_dict()


@pytest.mark.slow
def test_fsdp_ep_runs_equal_ddp_runs_across_resumes(tmp_path, ddp_reference):
    """FSDP2 on the dense parameters with expert parallelism (``trainer=fsdp_ep``, 2 processes) computes what
    plain DDP computes: 2 epochs uninterrupted, or stopped after the first and resumed under ``fsdp_ep`` or
    under ``ddp_ep``, end on the DDP run's weights (1e-5); its checkpoint loads on one process."""
    from train_helpers import compose_train

    from mome.cli.train import train
    from mome.lit import model_from_checkpoint

    uninterrupted = _mome_train_subprocess(tmp_path / "fsdp", [*TWO_EPOCHS, *FSDP_EP])
    _assert_same_weights(uninterrupted, ddp_reference, "fsdp_ep uninterrupted")
    _mome_train_subprocess(tmp_path / "fsdp1", [*TWO_EPOCHS, *FSDP_EP, *STOP_AFTER_FIRST_EPOCH])
    last = tmp_path / "fsdp1" / "checkpoints" / "last.ckpt"
    assert model_from_checkpoint(last).blocks[1].mlp.experts.w_in.shape[0] == 4  # whole tensors, one process
    resumed = _mome_train_subprocess(tmp_path / "fsdp2", [*TWO_EPOCHS, *FSDP_EP, f"ckpt_path={last}"])
    _assert_same_weights(resumed, ddp_reference, "fsdp_ep resumed under fsdp_ep")
    _, under_ddp_ep = train(compose_train(tmp_path / "ep2", [*TWO_EPOCHS, *DDP_EP, f"ckpt_path={last}"]))
    _assert_same_weights(_exported_state(under_ddp_ep), ddp_reference, "fsdp_ep resumed under ddp_ep")


@pytest.mark.slow
def test_soft_moe_vit_trains_under_expert_parallelism(tmp_path):
    """Soft MoE through mome-train with trainer=ddp_ep: slots sharded with their experts, a whole model exported."""
    from train_helpers import compose_train

    from mome.cli.train import train

    overrides = [*EP_RUN, "experiment=softmoe_digits", "trainer=ddp_ep", "trainer.expert_parallel_size=2"]
    _, objects = train(compose_train(tmp_path, overrides))
    assert objects["trainer"].world_size == 2
    exported = mome.create_model(f"local-dir:{objects['export_dir']}")
    soft_moe_layers = [m for m in exported.modules() if isinstance(m, SoftMoE)]
    assert soft_moe_layers and all(m.experts.w_in.shape[0] == m.num_experts for m in soft_moe_layers)
    assert exported(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("trainer", ["ddp_ep", "fsdp_ep"])
def test_expert_parallel_size_is_a_trainer_option(trainer, tmp_path):
    """``trainer=ddp_ep trainer.expert_parallel_size=P`` (the spelling of the docs) reaches the strategy, and is
    not passed to ``Trainer`` itself; ``trainer.strategy.expert_parallel_size`` still wins where given."""
    from train_helpers import compose_train

    from mome.cli._common import build_trainer

    for overrides, want in (([], 2), (["trainer.expert_parallel_size=1"], 1), (["trainer.devices=4"], 2)):
        cfg = compose_train(tmp_path, [f"trainer={trainer}", "callbacks=none", *overrides])
        assert build_trainer(cfg).strategy.expert_parallel_size == want, overrides
    cfg = compose_train(tmp_path, [f"trainer={trainer}", "callbacks=none", "trainer.strategy.expert_parallel_size=1"])
    assert build_trainer(cfg).strategy.expert_parallel_size == 1
