"""Lightning DDP with expert parallelism: ``Trainer(strategy=ExpertParallelDDPStrategy(expert_parallel_size=2))``.

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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from ..layers.expert_parallel import (
    _all_gather_dim0,
    expert_parameter_names,
    gather_expert_state_dict,
    shard_expert_state_dict,
    shard_experts,
    unshard_experts,
)

__all__ = ["ExpertParallelDDPStrategy"]


class ExpertParallelDDPStrategy(DDPStrategy):
    """:class:`~lightning.pytorch.strategies.DDPStrategy` that shards the experts of every mome MoE.

    Args:
        expert_parallel_size: ``P``, ranks per expert-parallel group; must divide the world size and
            every MoE's number of experts. None: the world size (no expert replicas).
        **kwargs: :class:`DDPStrategy` arguments (``start_method="spawn"`` for CPU runs, ``timeout``, ...).
    """

    strategy_name = "ddp_ep"

    def __init__(self, expert_parallel_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if expert_parallel_size is not None and (not isinstance(expert_parallel_size, int) or expert_parallel_size < 1):
            raise ValueError(f"expert_parallel_size must be a positive integer or None, got {expert_parallel_size!r}")
        self.expert_parallel_size = expert_parallel_size
        self.expert_group: dist.ProcessGroup | None = None
        self.replica_group: dist.ProcessGroup | None = None
        self._expert_names: list[str] = []
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

    def configure_ddp(self) -> None:
        """Shard the experts over the expert-parallel group, hide them from DDP, then wrap with DDP."""
        self._new_groups()
        module = self.model
        if not shard_experts(module, self.expert_group):
            raise ValueError(f"{type(self.lightning_module).__name__} has no mome MoE layer to shard")
        self._expert_names = expert_parameter_names(module)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, self._expert_names)
        super().configure_ddp()
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm

    def _expert_parameters(self) -> list[Tensor]:
        params = dict(self.lightning_module.named_parameters())
        return [params[name] for name in self._expert_names]

    # ------------------------------------------------------------------------------ gradients
    def post_backward(self, closure_loss: Tensor) -> None:
        """After DDP's synchronising backward, reduce the expert gradients over the shard's replicas."""
        super().post_backward(closure_loss)
        if not self.sharded or not getattr(self.model, "require_backward_grad_sync", True):
            return  # a gradient-accumulation step: DDP does not synchronise either
        grads = [p.grad for p in self._expert_parameters() if p.grad is not None]
        for grad in grads:
            if self.replica_group is not None:
                dist.all_reduce(grad, group=self.replica_group)
            grad.div_(self.world_size)

    def _clip_grad_by_norm(self, optimizer: Optimizer, clip_val: float) -> None:
        """``torch.nn.utils.clip_grad_norm_`` with the norm over the whole model (all expert shards)."""
        expert_ids = {id(p) for p in self._expert_parameters()}
        params = [p for p in self.precision_plugin.main_params(optimizer) if p.grad is not None]
        if not params:
            return
        device = params[0].grad.device
        dense_sq = torch.zeros((), device=device, dtype=torch.float64)
        expert_sq = torch.zeros((), device=device, dtype=torch.float64)
        for p in params:
            square = p.grad.detach().double().pow(2).sum()
            if id(p) in expert_ids:
                expert_sq += square
            else:
                dense_sq += square
        dist.all_reduce(expert_sq, group=self.expert_group)  # the layer's experts live on the P ranks
        total_norm = (dense_sq + expert_sq).sqrt()
        coefficient = (clip_val / (total_norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.detach().mul_(coefficient.to(p.grad.dtype))

    # ---------------------------------------------------------------------------- checkpoints
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full state dict (experts all-gathered over the group; every rank must call it)."""
        if not self.sharded:
            return super().lightning_module_state_dict()
        return gather_expert_state_dict(self.lightning_module, self.expert_group)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if not self.sharded:
            return super().load_model_state_dict(checkpoint, strict)
        state = shard_expert_state_dict(checkpoint["state_dict"], self.ep_rank, self.ep_size, self._expert_names)
        self.lightning_module.load_state_dict(state, strict=strict)

    def _expert_slots(self, optimizer: Optimizer) -> dict[int, Tensor]:
        """``{index in optimizer.state_dict()['state']: expert parameter}``."""
        expert_ids = {id(p) for p in self._expert_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return {index: p for index, p in enumerate(params) if id(p) in expert_ids}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimiser state with the expert parameters' moments gathered along dim 0 (collective)."""
        state = super().optimizer_state(optimizer)
        if not self.sharded:
            return state
        optimizer = optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        for index, param in sorted(self._expert_slots(optimizer).items()):
            entry = state["state"].get(index, {})
            for key, value in sorted(entry.items()):
                if isinstance(value, Tensor) and value.shape == param.shape:
                    entry[key] = _all_gather_dim0(value, self.expert_group, self.ep_size)
        return state

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self.sharded:
            size = self.ep_size
            for optimizer, opt_state in zip(self.optimizers, checkpoint["optimizer_states"]):
                for index, param in self._expert_slots(optimizer).items():
                    entry = opt_state["state"].get(index, {})
                    full_shape = (param.shape[0] * size, *param.shape[1:])
                    for key, value in entry.items():
                        if isinstance(value, Tensor) and tuple(value.shape) == full_shape:
                            entry[key] = shard_expert_state_dict({key: value}, self.ep_rank, size, [key])[key]
        super().load_optimizer_state_dict(checkpoint)

    # ------------------------------------------------------------------------------- teardown
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
