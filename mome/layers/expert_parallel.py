"""Expert parallelism: each rank of a process group of size ``P`` holds ``E / P`` experts of every MoE.

GShard (Lepikhin et al. 2020) and Switch (Fedus et al. 2021) shard the experts of a layer over ``P``
devices and move tokens to them with two all-to-alls per layer (dispatch, then combine); DeepSpeed-MoE
(Rajbhandari et al. 2022) does the same inside an *expert-parallel group* and reduces expert gradients
only across the replicas of one shard (the expert-data-parallel group). Here:

- routing, capacity and auxiliary losses are computed by the unchanged :class:`~mome.layers.MoE` on the
  rank's *local* tokens (``router -> plan_dispatch``), so drops, combine weights and aux losses equal
  those of the single-process layer applied to the same tokens (capacity ``ceil(T_local k c / E)`` per
  rank, as in GShard where each device routes its own group);
- :class:`ShardedExperts` replaces the layer's :class:`~mome.layers.Experts` in place. Rank ``r`` owns
  the global experts ``[r E/P, (r+1) E/P)``; the parameter names (``experts.w_in`` ...) are kept, so a
  checkpoint maps by name and the shard is the slice ``[r E/P : (r+1) E/P]`` of dim 0;
- ``dispatch="sorted"`` sends only the kept ``(token, expert)`` assignments, already grouped by expert
  (hence by owner rank) by :func:`~mome.layers.plan_dispatch`: per-expert counts go first
  (``all_to_all_single`` on ``[P, E/P]`` counts), then the rows (an uneven, autograd-aware
  ``all_to_all_single`` of torch's functional collectives). ``dispatch="buffers"`` is GShard's exchange
  of the ``[E, G C, D]`` capacity buffers (padding included; only the buffer sizes ``G C`` of the ranks
  are all-gathered first, so ranks may hold different token counts);
- :class:`~mome.layers.SoftMoE` exchanges its ``[E, B P, D]`` slot buffers the same way
  (:meth:`ShardedExperts.forward_slots`): slots are sharded with their expert, the dispatch and combine
  weights (which mix all tokens of a sequence) are computed locally, as on one process.

Per layer and rank, the forward pass sends ``S = sum_e kept_e`` rows of ``D`` values (at most ``T k``)
and receives as many back; the backward pass moves the same volume in reverse (see ``docs/scaling.md``).
Gradients of expert weights on rank ``r`` hold the contributions of every rank's tokens (the backward
all-to-all returns them), i.e. ``sum_r' dL_r'/dW_e``.

Shapes: ``T`` local tokens, ``D`` width, ``E`` experts, ``E_l = E / P`` local experts, ``k`` choices,
``S`` rows sent, ``R`` rows received.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import _functional_collectives as funcol

from .._checks import check_choice, check_int
from .._errors import InvalidArgumentError
from .dispatch import DispatchPlan
from .experts import Dispatch, Experts
from .moe import MoE
from .routers import Routing
from .soft_moe import SoftMoE

__all__ = [
    "EXPERT_PARAMETERS",
    "ShardedExperts",
    "expert_parameter_names",
    "gather_expert_state_dict",
    "shard_expert_state_dict",
    "shard_experts",
    "unshard_experts",
]

#: Names of the stacked expert tensors (dim 0 is the expert axis) inside an :class:`Experts`.
EXPERT_PARAMETERS = ("w_in", "w_out", "b_in", "b_out")
_EXPERT_KEY = re.compile(r"(?:^|\.)experts\.(?:w_in|w_out|b_in|b_out)$")


def _group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group")
    return dist.get_rank(group), dist.get_world_size(group)


class ShardedExperts(Experts):
    """The ``E / P`` experts of one rank of an expert-parallel group; computes for the whole layer.

    ``num_experts`` stays the global ``E`` (the MoE's capacity ``ceil(T k c / E)`` and routing use it);
    the parameters hold only the local slice: ``w_in [E_l, H', D]``, ``w_out [E_l, D, H]``,
    ``b_in [E_l, H']``, ``b_out [E_l, D]`` with ``E_l = E / P``, experts ``[offset, offset + E_l)``.

    Args:
        experts: the full stacked experts to take the slice from (same on every rank).
        group: the expert-parallel process group (None: the default group).
    """

    def __init__(self, experts: Experts, group: dist.ProcessGroup | None = None) -> None:
        rank, size = _group_rank_and_size(group)
        owner = type(self).__name__
        if isinstance(experts, ShardedExperts) or not isinstance(experts, Experts):
            raise InvalidArgumentError("experts", "unsharded mome.layers.Experts", type(experts).__name__, owner)
        if experts.num_experts % size:
            expected = f"experts whose number is divisible by the expert-parallel size {size}"
            raise InvalidArgumentError("experts", expected, f"num_experts={experts.num_experts} (not divisible)", owner)
        local = experts.num_experts // size
        with torch.device("meta"):  # shapes only: the slice is copied in below, and no random init draws
            super().__init__(  # from the global RNG (that would shift e.g. a noisy router's draws vs DDP)
                local,
                experts.dim,
                experts.hidden_dim,
                gated=experts.gated,
                act_layer=experts.act,
                bias=experts.b_in is not None,
                dispatch=experts.dispatch,
                dispatch_dtype=experts.dispatch_dtype,
            )
        self.num_experts = experts.num_experts
        self.num_local_experts = local
        self.expert_offset = rank * local
        self.group = group
        self.ep_rank, self.ep_size = rank, size
        window = slice(self.expert_offset, self.expert_offset + local)
        for name in EXPERT_PARAMETERS:
            full = getattr(experts, name)
            if full is not None:  # a copy of the slice, so the full tensor can be freed
                setattr(self, name, nn.Parameter(full.detach()[window].clone(), requires_grad=full.requires_grad))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, local_experts=[{self.expert_offset}, "
            f"{self.expert_offset + self.num_local_experts}), ep_size={self.ep_size}"
        )

    # ------------------------------------------------------------------------------- dispatch
    serves_few_tokens = False  # every rank takes part in the exchange, however few its tokens

    def forward(self, tokens: Tensor, routing: Routing, plan: DispatchPlan, dispatch: Dispatch | None = None) -> Tensor:
        """``out[t] = sum_j w[t, j] FFN_{e[t, j]}(x[t])`` with the experts spread over the group: ``[T, D]``."""
        dispatch = dispatch or self.dispatch
        if dispatch == "sorted":
            return self._exchange_sorted(tokens, routing, plan)
        if dispatch == "buffers":
            return self._exchange_buffers(tokens, routing, plan)
        check_choice("dispatch", dispatch, ("sorted", "buffers"), owner=type(self).__name__)

    def _exchange_sorted(self, tokens: Tensor, routing: Routing, plan: DispatchPlan) -> Tensor:
        size, local = self.ep_size, self.num_local_experts
        send_counts = plan.group_sizes.view(size, local)  # [P, E_l]: kept rows for each expert of each rank
        recv_counts = torch.empty_like(send_counts)  # [P, E_l]: rows each rank sends to my experts
        dist.all_to_all_single(recv_counts, send_counts.contiguous(), group=self.group)
        send_split = send_counts.sum(1).tolist()  # one host sync: the split sizes of the row exchange
        recv_split = recv_counts.sum(1).tolist()
        rows = plan.order[: sum(send_split)]  # [S] kept assignment ids, grouped by expert, hence by rank
        row_token = rows // routing.top_k  # [S]
        row_weight = routing.combine_weights.reshape(-1)[rows].to(tokens.dtype)  # [S]
        received = _all_to_all(tokens.index_select(0, row_token), recv_split, send_split, self.group)
        # received: [R, D], by source rank, then local expert
        # Regroup by local expert: row i of ``received`` belongs to local expert ``row_expert[i]``.
        row_expert = torch.arange(local, device=tokens.device).repeat(size)  # [P*E_l]
        row_expert = row_expert.repeat_interleave(recv_counts.reshape(-1), output_size=received.shape[0])  # [R]
        by_expert = torch.argsort(row_expert, stable=True)  # [R]
        expert_out = self.forward_grouped(received.index_select(0, by_expert), recv_counts.sum(0))  # [R, D]
        expert_out = torch.zeros_like(expert_out).index_add(0, by_expert, expert_out)  # [R, D], back in source order
        returned = _all_to_all(expert_out, send_split, recv_split, self.group)  # [S, D]
        out = torch.zeros_like(tokens)
        return out.index_add_(0, row_token, returned * row_weight.unsqueeze(-1))

    def _exchange_buffers(self, tokens: Tensor, routing: Routing, plan: DispatchPlan) -> Tensor:
        if plan.slot is None:
            expected = "a capacity for dispatch='buffers' (set capacity_factor, or use dispatch='sorted')"
            raise InvalidArgumentError("plan", expected, "a dropless plan", type(self).__name__)
        dim = tokens.shape[-1]
        num_slots = self.num_experts * plan.num_groups * plan.capacity  # E * G*C
        assignment_token = torch.arange(tokens.shape[0], device=tokens.device).repeat_interleave(routing.top_k)
        # [E*G*C + 1, D]; the last row is a sink for dropped assignments (as Experts._dispatch_buffers).
        buffers = tokens.new_zeros(num_slots + 1, dim)
        buffers = buffers.index_add_(0, plan.slot, tokens.index_select(0, assignment_token))
        expert_out = self.forward_slots(buffers[:num_slots].view(self.num_experts, -1, dim))  # [E, G*C, D]
        returned = torch.cat([expert_out.reshape(num_slots, dim), tokens.new_zeros(1, dim)])  # [E*G*C + 1, D]
        weight = routing.combine_weights.reshape(-1, 1).to(tokens.dtype)  # [T*k, 1]
        out = torch.zeros_like(tokens)
        return out.index_add_(0, assignment_token, returned.index_select(0, plan.slot) * weight)

    def forward_slots(self, buffers: Tensor) -> Tensor:
        """Per-expert buffers of *all* ``E`` experts on this rank ``[E, C, D]`` -> their outputs ``[E, C, D]``.

        GShard's exchange: rank ``r`` sends the ``[E_l, C, D]`` rows of rank ``j``'s experts to ``j``,
        each rank runs its ``E_l`` experts on ``[E_l, sum_j C_j, D]`` (every rank's slots), and the
        outputs go back the same way. ``C`` may differ between ranks (a smaller last batch; Soft MoE
        slots ``B P``): the ``C_j`` are all-gathered first (one host sync).
        """
        size, local, dim = self.ep_size, self.num_local_experts, buffers.shape[-1]
        capacity = buffers.shape[1]
        gathered = [torch.empty(1, dtype=torch.long, device=buffers.device) for _ in range(size)]
        dist.all_gather(gathered, torch.tensor([capacity], device=buffers.device), group=self.group)
        capacities = torch.cat(gathered).tolist()  # C_j of every rank
        send_split = [local * capacity] * size
        recv_split = [local * c for c in capacities]
        # [E*C, D]: rank j's experts are rows [j E_l C, (j+1) E_l C) -> [sum_j E_l C_j, D], by source rank
        received = _all_to_all(buffers.reshape(-1, dim), recv_split, send_split, self.group)
        per_source = [part.view(local, c, dim) for part, c in zip(received.split(recv_split), capacities)]
        expert_out = self.forward_batched(torch.cat(per_source, dim=1))  # [E_l, sum_j C_j, D]
        back = torch.cat([part.reshape(-1, dim) for part in expert_out.split(capacities, dim=1)])  # by source rank
        returned = _all_to_all(back, send_split, recv_split, self.group)  # [E*C, D]
        return returned.view_as(buffers)  # [E, C, D]

    # --------------------------------------------------------------------------- gathering
    @torch.no_grad()
    def gather(self) -> Experts:
        """The full :class:`Experts` (all ``E``), all-gathered from the group (a collective call)."""
        with torch.device("meta"):  # every tensor is replaced below: no random init, no global RNG draw
            full = Experts(
                self.num_experts,
                self.dim,
                self.hidden_dim,
                gated=self.gated,
                act_layer=self.act,
                bias=self.b_in is not None,
                dispatch=self.dispatch,
            )
        for name in EXPERT_PARAMETERS:
            shard = getattr(self, name)
            if shard is not None:
                gathered = all_gather_dim0(shard.detach(), self.group, self.ep_size)
                setattr(full, name, nn.Parameter(gathered, requires_grad=shard.requires_grad))
        return full


def _all_to_all(rows: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """Autograd-aware uneven ``all_to_all_single`` of ``rows [N, D]``: ``in_splits[j]`` rows go to rank ``j``,
    ``out_splits[j]`` rows come from it (the backward pass runs the reverse exchange). Uses torch's functional
    collectives (traceable by ``torch.compile``), waited on at once."""
    group = group if group is not None else dist.group.WORLD
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(rows.contiguous(), out_splits, in_splits, group))


def all_gather_dim0(shard: Tensor, group: dist.ProcessGroup | None, size: int) -> Tensor:
    """``[n, ...]`` on each of ``size`` ranks -> ``[size * n, ...]`` in rank order."""
    parts = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE | SoftMoE]]:
    """The layers whose ``experts`` expert parallelism shards: sparse :class:`MoE` and :class:`SoftMoE`."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, (MoE, SoftMoE))]


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> list[str]:
    """Shard the experts of every :class:`MoE` of ``model`` over ``group``, in place.

    Every rank must hold the same full weights (same seed or the same checkpoint). Parameter names are
    unchanged; each rank keeps the slice ``[r E/P : (r+1) E/P]`` of dim 0. Returns the sharded layer
    names. Soft MoE layers are sharded too: their ``[E, B P, D]`` slot buffers travel as GShard buffers
    (:meth:`ShardedExperts.forward_slots`); the dispatch and combine weights stay local.
    """
    names = []
    for name, layer in _moe_layers(model):
        if isinstance(layer.experts, ShardedExperts):
            continue
        layer.experts = ShardedExperts(layer.experts, group)
        names.append(name)
    return names


def unshard_experts(model: nn.Module) -> list[str]:
    """Gather the experts of every sharded :class:`MoE` back into full :class:`Experts` (collective)."""
    names = []
    for name, layer in _moe_layers(model):
        if isinstance(layer.experts, ShardedExperts):
            layer.experts = layer.experts.gather()
            names.append(name)
    return names


def expert_parameter_names(model: nn.Module) -> list[str]:
    """State-dict names of the stacked expert tensors of every :class:`MoE` in ``model`` (sharded or not)."""
    names = []
    for layer_name, layer in _moe_layers(model):
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        names += [prefix + p for p in EXPERT_PARAMETERS if getattr(layer.experts, p) is not None]
    return names


def gather_expert_state_dict(model: nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """``model.state_dict()`` with every sharded expert tensor all-gathered along dim 0 (collective).

    Every rank of ``group`` must call it; each gets the full state dict, which loads into the same
    model on one process. ``group`` is only checked against the layers' own groups' sizes.
    """
    state = model.state_dict()
    for layer_name, layer in _moe_layers(model):
        experts = layer.experts
        if not isinstance(experts, ShardedExperts):
            continue
        if group is not None and dist.get_world_size(group) != experts.ep_size:
            expected = f"a group of the {experts.ep_size} ranks {layer_name} is sharded over"
            raise InvalidArgumentError(
                "group", expected, f"{dist.get_world_size(group)} ranks", "gather_expert_state_dict"
            )
        prefix = f"{layer_name}.experts." if layer_name else "experts."
        for name in EXPERT_PARAMETERS:
            if getattr(experts, name) is not None:
                state[prefix + name] = all_gather_dim0(state[prefix + name], experts.group, experts.ep_size)
    return state


def shard_expert_state_dict(
    state: Mapping[str, Tensor], rank: int, world_size: int, names: Iterable[str] | None = None
) -> dict[str, Tensor]:
    """The state dict of expert-parallel rank ``rank`` of ``world_size`` from a full one.

    Expert tensors (``names``, by default every key ending in ``experts.{w_in,w_out,b_in,b_out}``) are
    cut along dim 0 into ``world_size`` equal slices and the ``rank``-th is kept; other entries are
    unchanged. The inverse of :func:`gather_expert_state_dict`.
    """
    check_int("world_size", world_size, owner="shard_expert_state_dict")
    check_int("rank", rank, minimum=0, owner="shard_expert_state_dict")
    if rank >= world_size:
        raise InvalidArgumentError(
            "rank", f"an integer in [0, world_size={world_size})", rank, "shard_expert_state_dict"
        )
    selected = set(names) if names is not None else {key for key in state if _EXPERT_KEY.search(key)}
    missing = sorted(selected - set(state))
    if missing:
        raise KeyError(f"expert tensors not in the state dict: {missing}")
    out = dict(state)
    for key in selected:
        value = state[key]
        if value.shape[0] % world_size:
            expected = f"a number of experts divisible by world_size={world_size}"
            raise InvalidArgumentError(
                key, expected, f"{value.shape[0]} experts (not divisible)", "shard_expert_state_dict"
            )
        local = value.shape[0] // world_size
        out[key] = value[rank * local : (rank + 1) * local].clone()
    return out
