"""Lightning strategies with expert parallelism: DDP (``ExpertParallelDDPStrategy``, ``trainer=ddp_ep``) and
FSDP2 (``ExpertParallelFSDPStrategy``, ``trainer=fsdp_ep``), e.g.
``Trainer(strategy=ExpertParallelDDPStrategy(expert_parallel_size=2))``.

The ``W`` ranks form ``W / P`` expert-parallel groups of ``P`` consecutive ranks (DeepSpeed-MoE's
layout, Rajbhandari et al. 2022): inside a group every :class:`~mome.layers.MoE` holds ``E / P``
experts per rank (:func:`~mome.layers.expert_parallel.shard_experts`, GShard's sharding, Lepikhin et al.
2020), and ranks ``{j, j + P, j + 2P, ...}`` hold replicas of the same shard (the expert-data-parallel
group). Dense parameters stay with DDP (all-reduce mean over the ``W`` ranks); expert parameters are
kept out of DDP (``_ddp_params_and_buffers_to_ignore``) because on rank ``r`` the gradient of a local
expert already sums the contributions of the ``P`` ranks of its group (the backward all-to-all). To
optimise the same objective as DDP, ``L = (1/W) sum_r L_r``, the expert gradient becomes

    ``g_e = (1/W) * sum_{replicas} sum_{r in group} dL_r / dW_e``

(an all-reduce sum over the replica group, none when ``P == W``, then a division by ``W``), done once
per optimiser step, when DDP itself synchronises. Gradient clipping by norm uses the norm over all
experts of the layer (the squared norms of the shards are summed over the group), so every rank
scales by the same factor and the dense replicas stay identical.

Checkpoints hold full expert tensors: the state dict is gathered over the group on save
(:func:`~mome.layers.expert_parallel.gather_expert_state_dict`) and sharded by name on load; the
optimiser states of expert parameters (Adam's moments, shaped like the parameter) likewise. A
checkpoint written under expert parallelism thus loads on one process and vice versa. At the end of
``fit`` the experts are gathered back, so the module is whole again (``save_pretrained`` works as for
DDP, and ``ddp_spawn``'s hand-back of rank 0's weights carries full experts).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, through Lightning's ``ModelParallelStrategy``) the
dense parameters are sharded over all ``W`` ranks instead of replicated: every element of an
``nn.ModuleList`` (the transformer blocks) and the model are wrapped with the experts passed as
``ignored_params``, so FSDP2 reduce-scatters the mean of the dense gradients and the expert gradients
are reduced as above. Parameters FSDP2 cannot shard stay whole on every rank (replicated, as under DDP):
0-d ones (LIMoE's and VLMo's ``logit_scale``, Soft MoE's ``scale``: ``fully_shard`` refuses scalars, and
reshaping them would change the state dict) and those of the task itself outside its networks (VLMo's
``mask_embedding``); they are passed as ``ignored_params`` too, broadcast from rank 0 at setup, and their
gradients are averaged over the ``W`` ranks (``all_reduce`` / ``W``), the mean DDP computes. Its
checkpoints are single files holding full tensors (dense ``DTensor`` shards and expert shards gathered),
like the DDP ones, so they move freely between the strategies and one process.

Under gradient accumulation (``accumulate_grad_batches > 1``) the expert and replicated gradients are
reduced once, after the last micro-batch (Lightning's ``block_backward_sync``, as DDP's ``no_sync``).
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ..layers.expert_parallel import (
    ShardedExperts,
    all_gather_dim0,
    expert_parameter_names,
    gather_expert_state_dict,
    shard_expert_state_dict,
    shard_experts,
    unshard_experts,
)
from ..layers.moe import MoE
from ..layers.soft_moe import SoftMoE

__all__ = [
    "ExpertParallelDDPStrategy",
    "ExpertParallelFSDPStrategy",
    "forward_is_collective",
    "fully_shard_dense",
    "reduce_replicated_grads",
]


def _check_size(expert_parallel_size: int | None) -> int | None:
    if expert_parallel_size is not None and (not isinstance(expert_parallel_size, int) or expert_parallel_size < 1):
        raise ValueError(f"expert_parallel_size must be a positive integer or None, got {expert_parallel_size!r}")
    return expert_parallel_size


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 ``DTensor``; a plain tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _full(tensor: Any) -> Any:
    """The whole tensor of an FSDP2 ``DTensor`` (collective); anything else as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def forward_is_collective(module: nn.Module) -> bool:
    """Whether a forward pass of ``module`` is a collective of all ranks: its experts are sharded (``trainer=ddp_ep``,
    ``fsdp_ep``: tokens go to other ranks by all-to-all) or its parameters are FSDP2 shards (all-gathered). Then
    every rank must run it, as often as the others (a rank-0-only forward, or a generation loop that stops
    earlier on one rank, leaves the others waiting)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(isinstance(m, (ShardedExperts, FSDPModule)) for m in module.modules())


#: Methods of the model contracts (timm, open_clip, VLMo, transformers) a task calls instead of ``forward``: FSDP2
#: must gather the parameters around them too (``register_fsdp_forward_method``).
FSDP_FORWARD_METHODS = (
    "encode_image",
    "encode_text",
    "forward_features",
    "forward_head",
    "forward_image",
    "forward_text",
    "itm_logits",
    "mlm_logits",
    "generate",
)


def fully_shard_dense(task: nn.Module, mesh: Any, expert_names: Iterable[str] = ()) -> list[str]:
    """FSDP2 on the dense parameters of ``task`` (a LightningModule or any module holding networks), in place.

    ``fully_shard`` goes on each part of each block (the children of each element of an ``nn.ModuleList``
    outside the MoE layers: attention, norms, FFN or MoE) and on each of the task's child networks, whose
    :data:`FSDP_FORWARD_METHODS` (``encode_text``, ``generate``, ...) gather the parameters as ``forward`` does.
    The parts, not the blocks, are the units because a tower may drive its blocks' parts itself (LIMoE runs
    attention per stream, then one joint FFN, never ``block(x)``): a block unit would then never be gathered.
    Left out (``ignored_params``): the expert tensors named ``expert_names`` (sharded by expert already) and
    the 0-d parameters (``fully_shard`` refuses scalars; making them 1-d would change the state dict). Those
    0-d parameters and the task's own parameters outside its networks stay whole on every rank: they are
    broadcast from rank 0 here (DDP's start) and their gradients must be averaged with
    :func:`reduce_replicated_grads` after each synchronising backward. Returns their names.
    """
    expert_names = set(expert_names)
    experts = {p for name, p in task.named_parameters() if name in expert_names}
    ignored = experts | {p for p in task.parameters() if p.ndim == 0}
    for network in [child for child in task.children() if any(True for _ in child.parameters())]:
        inside_moe = {
            id(m) for layer in network.modules() if isinstance(layer, (MoE, SoftMoE)) for m in layer.modules()
        }
        parts = [
            part
            for module_list in network.modules()
            if isinstance(module_list, nn.ModuleList) and id(module_list) not in inside_moe
            for block in module_list
            for part in block.children()
        ]
        for part in reversed(parts):  # descendants before their ancestors, as FSDP2 needs
            dense = [p for p in part.parameters() if p not in ignored]
            if (
                dense
                and not isinstance(part, FSDPModule)
                and not any(isinstance(m, FSDPModule) for m in part.modules())
            ):
                fully_shard(part, mesh=mesh, ignored_params={p for p in part.parameters() if p in ignored})
        if any(p not in ignored for p in network.parameters()):
            fully_shard(network, mesh=mesh, ignored_params={p for p in network.parameters() if p in ignored})
            for method in FSDP_FORWARD_METHODS:
                if callable(getattr(network, method, None)):
                    register_fsdp_forward_method(network, method)
    replicated = [
        (name, p) for name, p in task.named_parameters() if not isinstance(p, DTensor) and name not in expert_names
    ]
    with torch.no_grad():
        for _, p in replicated:  # every replica starts from rank 0's values, as under DDP
            dist.broadcast(p, src=0)
    return [name for name, _ in replicated]


def reduce_replicated_grads(params: Iterable[Tensor], group: dist.ProcessGroup | None = None) -> None:
    """The gradients of parameters replicated on every rank of ``group``, made their mean over the ranks (DDP's
    all-reduce), in place. A gradient that is None on every rank stays None (an unused or frozen parameter);
    one missing on some ranks only counts as zeros there, as under DDP."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(present, group=group)  # one small collective, so every rank reduces the same list below
    size = dist.get_world_size(group)
    for p, count in zip(params, present.tolist()):
        if count == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(size)


class _ExpertParallelism:
    """What both strategies share: the process groups, the expert gradient reduction, gradient clipping
    by the norm over all shards, and the expert tensors of checkpoints and optimiser states gathered on
    save and sliced by name on load. Mixed into a Lightning ``ParallelStrategy``."""

    expert_parallel_size: int | None
    expert_group: dist.ProcessGroup | None
    replica_group: dist.ProcessGroup | None
    _expert_names: list[str]
    _failed: bool

    def _init_expert_parallelism(self, expert_parallel_size: int | None) -> None:
        self.expert_parallel_size = _check_size(expert_parallel_size)
        self.expert_group = None
        self.replica_group = None
        self._expert_names = []
        self._failed = False

    @property
    def ep_size(self) -> int:
        return self.expert_parallel_size or self.world_size

    @property
    def ep_rank(self) -> int:
        return self.global_rank % self.ep_size

    @property
    def sharded(self) -> bool:
        return bool(self._expert_names)

    # ---------------------------------------------------------------------------------- setup
    def _new_groups(self) -> None:
        """``W / P`` groups of ``P`` consecutive ranks, and ``P`` replica groups ``{j, j + P, ...}``."""
        world, size = self.world_size, self.ep_size
        if world % size:
            raise ValueError(f"expert_parallel_size={size} must divide the world size {world}")
        for start in range(0, world, size):  # every rank creates every group, in the same order
            ranks = list(range(start, start + size))
            group = dist.new_group(ranks)
            if self.global_rank in ranks:
                self.expert_group = group
        for offset in range(size):
            ranks = list(range(offset, world, size))
            group = dist.new_group(ranks) if len(ranks) > 1 else None
            if self.global_rank in ranks:
                self.replica_group = group

    def _shard_experts(self, module: nn.Module) -> None:
        """New groups, then every MoE of ``module`` keeps its ``E / P`` experts; clipping goes through us."""
        self._new_groups()
        if not shard_experts(module, self.expert_group):
            raise ValueError(f"{type(self.lightning_module).__name__} has no mome MoE layer to shard")
        self._expert_names = expert_parameter_names(module)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm

    def _expert_parameters(self) -> list[Tensor]:
        params = dict(self.lightning_module.named_parameters())
        return [params[name] for name in self._expert_names]

    # ------------------------------------------------------------------------------ gradients
    def _reduce_expert_grads(self) -> None:
        """``g_e = (1/W) sum_replicas g_e``: all-reduce over the shard's replicas, then divide by ``W``."""
        for grad in (p.grad for p in self._expert_parameters() if p.grad is not None):
            if self.replica_group is not None:
                dist.all_reduce(grad, group=self.replica_group)
            grad.div_(self.world_size)

    def _dense_square_norm(self, squares: Tensor) -> Tensor:
        """The squared norm of the sharded dense (``DTensor``) gradients from this rank's part (none under DDP)."""
        return squares

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` with the norm over the whole model (all shards)."""
        expert_ids = {id(p) for p in self._expert_parameters()}
        params = [p for p in self.precision_plugin.main_params(optimizer) if p.grad is not None]
        if not params:
            return
        device = _local(params[0].grad).device
        dense_sq = torch.zeros((), device=device, dtype=torch.float64)  # FSDP2 shards (DTensor)
        replicated_sq = torch.zeros((), device=device, dtype=torch.float64)  # whole on every rank
        expert_sq = torch.zeros((), device=device, dtype=torch.float64)
        for p in params:
            square = _local(p.grad.detach()).double().pow(2).sum()
            if id(p) in expert_ids:
                expert_sq += square
            elif isinstance(p.grad, DTensor):
                dense_sq += square
            else:
                replicated_sq += square
        dist.all_reduce(expert_sq, group=self.expert_group)  # the layer's experts live on the P ranks
        total_norm = (self._dense_square_norm(dense_sq) + replicated_sq + expert_sq).sqrt()
        coefficient = (clip_val / (total_norm + 1e-6)).clamp(max=1.0)
        for p in params:
            _local(p.grad.detach()).mul_(coefficient.to(p.grad.dtype))

    # ---------------------------------------------------------------------------- checkpoints
    def _full_state_dict(self) -> dict[str, Any]:
        """The module's state dict with whole tensors: experts all-gathered over the group, FSDP2 shards
        made whole (collective: every rank must call it)."""
        state = gather_expert_state_dict(self.lightning_module, self.expert_group)
        return {key: _full(value) for key, value in state.items()}

    def _local_model_state(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """A full checkpoint's state dict cut to this rank: its expert slices (by name)."""
        return shard_expert_state_dict(checkpoint["state_dict"], self.ep_rank, self.ep_size, self._expert_names)

    def _expert_slots(self, optimizer: Optimizer) -> dict[int, Tensor]:
        """``{index in optimizer.state_dict()['state']: expert parameter}``."""
        expert_ids = {id(p) for p in self._expert_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {index: p for index, p in enumerate(params) if id(p) in expert_ids}

    def _gather_optimizer_state(self, state: dict[str, Any], optimizer: Optimizer) -> dict[str, Any]:
        """Expert moments (shaped like their parameter) all-gathered along dim 0; FSDP2 shards made whole."""
        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        expert_slots = self._expert_slots(optimizer)
        # ``Optimizer.state_dict()`` hands out the live per-parameter dicts: change copies of them.
        state = {**state, "state": {index: dict(entry) for index, entry in state["state"].items()}}
        for index in sorted(state["state"]):  # the same order on every rank: these are collectives
            entry = state["state"][index]
            param = expert_slots.get(index)
            for key in sorted(entry):
                value = entry[key]
                if param is not None and isinstance(value, Tensor) and value.shape == param.shape:
                    entry[key] = all_gather_dim0(value, self.expert_group, self.ep_size)
                else:
                    entry[key] = _full(value)
        return state

    def _shard_optimizer_states(self, checkpoint: Mapping[str, Any]) -> None:
        """In place: every optimiser state of a full checkpoint cut to this rank (experts by slice,
        FSDP2 parameters by their ``DTensor`` placement)."""
        size = self.ep_size
        for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
            expert_slots = self._expert_slots(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for index, entry in opt_state["state"].items():
                param = params[index]
                for key, value in entry.items():
                    if not isinstance(value, Tensor):
                        continue
                    if index in expert_slots and tuple(value.shape) == (param.shape[0] * size, *param.shape[1:]):
                        entry[key] = shard_expert_state_dict({key: value}, self.ep_rank, size, [key])[key]
                    elif isinstance(param, DTensor) and tuple(value.shape) == tuple(param.shape):
                        entry[key] = distribute_tensor(
                            value.to(_local(param).device), param.device_mesh, param.placements
                        )


class ExpertParallelDDPStrategy(_ExpertParallelism, DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` that shards the experts of every mome MoE.

    Args:
        expert_parallel_size: ``P``, ranks per expert-parallel group; must divide the world size and
            every MoE's number of experts. None: the world size (no expert replicas).
        **kwargs: :class:`DDPStrategy` arguments (``start_method="spawn"`` for CPU runs, ``timeout``, ...).
    """

    strategy_name = "ddp_ep"

    def __init__(self, expert_parallel_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_expert_parallelism(expert_parallel_size)

    def configure_ddp(self) -> None:
        """Shard the experts over the expert-parallel group, hide them from DDP, then wrap with DDP."""
        self._shard_experts(self.model)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, self._expert_names)
        super().configure_ddp()

    def post_backward(self, closure_loss: Tensor) -> None:
        """After DDP's synchronising backward, reduce the expert gradients over the shard's replicas."""
        super().post_backward(closure_loss)
        if self.sharded and getattr(self.model, "require_backward_grad_sync", True):
            self._reduce_expert_grads()  # not on a gradient-accumulation step: DDP does not synchronise either

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full state dict (experts all-gathered over the group; every rank must call it)."""
        return self._full_state_dict() if self.sharded else super().lightning_module_state_dict()

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self.sharded:
            return super().load_model_state_dict(checkpoint, strict)
        self.lightning_module.load_state_dict(self._local_model_state(checkpoint), strict=strict)

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimiser state with the expert parameters' moments gathered along dim 0 (collective)."""
        state = super().optimizer_state(optimizer)
        return self._gather_optimizer_state(state, optimizer) if self.sharded else state

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self.sharded:
            self._shard_optimizer_states(checkpoint)
        super().load_optimizer_state_dict(checkpoint)

    def on_exception(self, exception: BaseException) -> None:
        self._failed = True  # no collective gathering at teardown: the other ranks may be gone
        super().on_exception(exception)

    def teardown(self) -> None:
        """Gather the experts back (collective) so the module leaves ``fit`` whole, then DDP's teardown."""
        module = self.lightning_module
        if self.sharded and module is not None and not self._failed:
            unshard_experts(module)
        self._expert_names = []
        self.precision_plugin.__dict__.pop("clip_grad_by_norm", None)  # back to the plugin's own method
        super().teardown()


class ExpertParallelFSDPStrategy(_ExpertParallelism, ModelParallelStrategy):
    """FSDP2 on the dense parameters, expert parallelism on the experts (Lightning ``ModelParallelStrategy``).

    The data-parallel mesh spans all ``W`` ranks (no tensor parallelism). The LightningModule needs no
    ``configure_model``: the strategy shards the experts, then applies ``fully_shard`` to every element of
    every ``nn.ModuleList`` of the task's networks and to each network, with the expert tensors as
    ``ignored_params``. Checkpoints are single files with whole tensors (``save_distributed_checkpoint``
    is off), so they load on one process, under ``ddp_ep`` and back here. After ``fit``/``test`` the
    module stays sharded (FSDP2 cannot be undone in place); ``mome-train`` exports the tested checkpoint.

    Args:
        expert_parallel_size: ``P`` (see :class:`ExpertParallelDDPStrategy`).
        **kwargs: ``ModelParallelStrategy`` arguments (``process_group_backend``, ``timeout``).
    """

    strategy_name = "fsdp_ep"

    def __init__(self, expert_parallel_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=False, **kwargs)
        self._init_expert_parallelism(expert_parallel_size)
        self._replicated_names: list[str] = []
        self._sync_blocked = False

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        """Move to the device, shard (once: ``test`` after ``fit`` reuses it), then optimisers as FSDP2 needs."""
        self.accelerator.setup(trainer)
        self.model_to_device()
        if not self.sharded:
            self._shard_experts(self.lightning_module)
            self._fully_shard(self.lightning_module)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()

    def _fully_shard(self, task: nn.Module) -> None:
        """FSDP2 on the dense parameters (:func:`fully_shard_dense`); the rest stays replicated."""
        self._replicated_names = fully_shard_dense(task, self.device_mesh["data_parallel"], self._expert_names)

    def _replicated_parameters(self) -> list[Tensor]:
        params = dict(self.lightning_module.named_parameters())
        return [params[name] for name in self._replicated_names]

    def _reduce_replicated_grads(self) -> None:
        reduce_replicated_grads(self._replicated_parameters())

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Lightning calls this around the backward passes of the micro-batches before the last one of a
        gradient accumulation: the expert and replicated gradients are reduced once, after the last (reducing
        each micro-batch's sum would divide the earlier ones by ``W`` again)."""
        self._sync_blocked = True
        try:
            yield None
        finally:
            self._sync_blocked = False

    def post_backward(self, closure_loss: Tensor) -> None:
        """FSDP2 reduce-scatters the dense gradients at every backward; the expert gradients follow."""
        super().post_backward(closure_loss)
        if self.sharded and not self._sync_blocked:
            self._reduce_expert_grads()
            self._reduce_replicated_grads()
            # A parameter frozen after fully_shard (VLMo's text stage) still gets a gradient: FSDP2's unsharded
            # parameter keeps the requires_grad it had when first gathered. Drop it, as DDP would never make it.
            for p in self.lightning_module.parameters():
                if not p.requires_grad:
                    p.grad = None

    def _dense_square_norm(self, squares: Tensor) -> Tensor:
        dist.all_reduce(squares)  # every rank holds a 1/W shard of each dense gradient
        return squares

    # ---------------------------------------------------------------------------- checkpoints
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """Restore the whole module before sharding, as DDP does: the same order of hooks and RNG draws (the
        noisy routers' stream continues where the checkpoint left it, as under ``ddp``/``ddp_ep``)."""
        return False

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True  # the optimiser states are restored by load_optimizer_state_dict, from a full file

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return self._full_state_dict()

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        return self._gather_optimizer_state(Strategy.optimizer_state(self, optimizer), optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """The whole checkpoint file (``ModelParallelStrategy`` reads it as distributed state instead)."""
        return Strategy.load_checkpoint(self, self.broadcast(checkpoint_path), weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Strictly: before sharding (a resumed ``fit``), as it is; after (``test``/``validate`` after ``fit``),
        expert slices by name and dense tensors distributed as their ``DTensor`` parameters."""
        if not self.sharded:
            self.lightning_module.load_state_dict(checkpoint["state_dict"], strict=strict)
            return
        state = self._local_model_state(checkpoint)
        targets = self.lightning_module.state_dict()
        for key, target in targets.items():
            if isinstance(target, DTensor) and key in state and not isinstance(state[key], DTensor):
                state[key] = distribute_tensor(
                    state[key].to(_local(target).device), target.device_mesh, target.placements
                )
        self.lightning_module.load_state_dict(state, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        self._shard_optimizer_states(checkpoint)
        Strategy.load_optimizer_state_dict(self, checkpoint)

    def teardown(self) -> None:
        self.precision_plugin.__dict__.pop("clip_grad_by_norm", None)
        self._sync_blocked = False
        super().teardown()
