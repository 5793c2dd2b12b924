"""The capacity plan: which routed assignments the experts compute, and in which order.

A router (:mod:`mome.layers.routers`) says which ``k`` experts each of ``T`` tokens wants; this
module decides which of those ``T * k`` assignments are computed. :func:`plan_dispatch` runs once
per layer, on the device and without host synchronisation, and its :class:`DispatchPlan` is read by
both dispatch paths of :class:`mome.layers.Experts` and by the expert-parallel exchange, so any
router works with any dispatch path.

Capacity (V-MoE, Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts": the
expert's buffer capacity) bounds the tokens one expert processes:

    C = round_up(capacity_factor * k * T / E, multiple)

(:func:`compute_capacity`; V-MoE uses ``multiple = 4``). Buffers then have static shapes whatever
the router chose; ``capacity=None`` is dropless. With V-MoE's token groups ``T`` is the group's
length and the capacity applies to each (expert, group) pair. An expert-choice router fixes its
own capacity (``Routing.capacity``), which takes precedence.

Priority under capacity (:func:`plan_dispatch`): every first choice is served before any second
choice; within one choice rank, tokens are served in order or, with batch-prioritised routing (BPR,
same paper, "Batch Prioritized Routing"), by decreasing top-1 router weight, so the tokens the
router is surest about are dropped last. A dropped assignment stays in the routing record with a
combine weight of 0.

Shapes: ``T`` tokens, ``E`` experts, ``k`` choices per token, ``G`` routing groups, ``C`` capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .._checks import check_finite_positive, check_int
from .._errors import InvalidArgumentError
from .routers import Routing

__all__ = ["DispatchPlan", "compute_capacity", "plan_dispatch", "weigh_kept"]


def compute_capacity(
    num_assignments: int,
    num_experts: int,
    capacity_factor: float,
    *,
    multiple_of: int = 1,
    min_capacity: int = 0,
) -> int:
    """Tokens per expert: ``ceil(T * k * c / E)``, rounded up to ``multiple_of`` (V-MoE uses 4).

    ``num_assignments`` is ``T * k``. The result is at least ``max(1, min_capacity)`` and never more
    than ``T * k`` (no expert can receive more assignments than exist). ``capacity_factor`` must be finite and
    ``> 0``, ``num_experts`` and ``multiple_of`` positive integers, ``min_capacity`` an integer ``>= 0``.
    """
    check_finite_positive("capacity_factor", capacity_factor, owner="compute_capacity")
    check_int("num_experts", num_experts, owner="compute_capacity")
    check_int("multiple_of", multiple_of, owner="compute_capacity")
    check_int("min_capacity", min_capacity, minimum=0, owner="compute_capacity")
    capacity = max(math.ceil(num_assignments * capacity_factor / num_experts), min_capacity, 1)
    capacity += (-capacity) % multiple_of
    return min(capacity, max(num_assignments, 1))


@dataclass(frozen=True)
class DispatchPlan:
    """Routing metadata shared by every dispatch path, computed once per layer.

    Assignments are numbered ``a = t * k + j`` (token ``t``, choice ``j``). With ``G`` routing groups
    (V-MoE's token groups) each expert has a capacity of ``C`` tokens *per group*.

    Attributes:
        order: ``[T*k]`` assignments sorted by expert (then group, then priority), the kept ones
            first; the dropped ones follow in any order.
        group_sizes: ``[E]`` kept assignments per expert.
        kept: ``[T*k]`` bool.
        capacity: tokens per expert and group, or None (dropless).
        num_groups: ``G``.
        num_rows: rows the sorted path computes: ``T*k`` dropless, else ``min(T*k, E*G*C)``.
        slot: ``[T*k]`` row of each assignment in the ``[E, G*C]`` capacity buffers, ``E*G*C`` (a
            sink row) where dropped; None when dropless.
    """

    order: Tensor
    group_sizes: Tensor
    kept: Tensor
    capacity: int | None
    num_groups: int
    num_rows: int
    slot: Tensor | None


def weigh_kept(routing: Routing, dropped: Tensor) -> Routing:
    """The routing record with ``dropped [T, k]`` assignments weighted 0, and each token's kept weights renormalised to
    sum to 1 when ``routing.renormalize_kept`` (GShard / DeepSpeed top-2: ``w_j kept_j / max(sum_i w_i kept_i, eps)``).
    """
    weights = routing.combine_weights.masked_fill(dropped, 0.0)
    if routing.renormalize_kept:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    return replace(routing, dropped=dropped, combine_weights=weights)


def plan_dispatch(routing: Routing, capacity: int | None, num_groups: int = 1) -> tuple[Routing, DispatchPlan]:
    """Apply capacity to a routing record and sort its assignments by expert.

    Priority under capacity follows V-MoE: all first choices before any second choice; within a
    choice rank, tokens in order, or by decreasing ``routing.priority`` (batch-prioritised routing).
    Assignments beyond an expert's capacity are dropped: their combine weight becomes 0 (and, when
    ``routing.renormalize_kept``, the token's kept weights are renormalised to sum to 1). With
    ``num_groups = G`` the ``T`` tokens form ``G`` contiguous groups of ``T / G`` tokens, and the
    capacity applies to each (expert, group) pair, as V-MoE routes each group independently.

    Returns the updated routing record (``dropped`` and ``combine_weights``) and the plan.
    Everything stays on the device: no host synchronisation.
    """
    if routing.capacity is not None:
        capacity = routing.capacity
    num_tokens, top_k = routing.expert_index.shape
    num_experts = routing.num_experts
    if num_groups < 1 or num_tokens % num_groups:
        expected = f"a positive divisor of the number of tokens ({num_tokens})"
        raise InvalidArgumentError("num_groups", expected, num_groups, "plan_dispatch")
    group_length = num_tokens // num_groups
    num_assignments = num_tokens * top_k
    num_buckets = num_experts * num_groups  # one bucket per (expert, group); bucket E*G is the sink
    device = routing.expert_index.device

    # Priority order of assignments: choice rank major, then token order or decreasing priority.
    if routing.priority is not None:
        token_order = torch.argsort(routing.priority, descending=True, stable=True)  # [T]
    else:
        token_order = torch.arange(num_tokens, device=device)
    choice = torch.arange(top_k, device=device)
    by_priority = (token_order.unsqueeze(0) * top_k + choice.unsqueeze(1)).reshape(-1)  # [k*T]

    # Stable sort by (expert, group); router-declined assignments go to the sink bucket at the end.
    token_group = (torch.arange(num_tokens, device=device) // group_length).unsqueeze(1)  # [T, 1]
    bucket = routing.expert_index * num_groups + token_group  # [T, k]
    bucket = torch.where(routing.dropped, torch.full_like(bucket, num_buckets), bucket)
    bucket_key = bucket.reshape(-1)[by_priority]  # [k*T]
    sort_index = torch.argsort(bucket_key, stable=True)
    order = by_priority[sort_index]  # [T*k] assignment ids grouped by (expert, group)
    sorted_key = bucket_key[sort_index]
    counts = torch.zeros(num_buckets + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, bucket_key, torch.ones_like(bucket_key))
    bucket_start = counts.cumsum(0) - counts  # [E*G+1]
    rank_in_bucket = torch.arange(num_assignments, device=device) - bucket_start[sorted_key]  # [T*k]

    kept_sorted = sorted_key < num_buckets
    slot = None
    if capacity is not None:
        kept_sorted = kept_sorted & (rank_in_bucket < capacity)
        num_rows = min(num_assignments, num_buckets * capacity)
        slot_sorted = torch.where(kept_sorted, sorted_key * capacity + rank_in_bucket, num_buckets * capacity)
        slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
    else:
        num_rows = num_assignments
    kept = torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted)

    # Compact: kept assignments first (still grouped by expert), dropped ones after them.
    kept_long = kept_sorted.long()
    num_kept = kept_long.sum()
    destination = torch.where(kept_sorted, kept_long.cumsum(0) - 1, num_kept + (1 - kept_long).cumsum(0) - 1)
    order = torch.empty_like(order).scatter_(0, destination, order)
    group_sizes = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    group_sizes.scatter_add_(0, sorted_key // num_groups, kept_long)

    routing = weigh_kept(routing, ~kept.view(num_tokens, top_k))
    plan = DispatchPlan(
        order=order,
        group_sizes=group_sizes[:num_experts],
        kept=kept,
        capacity=capacity,
        num_groups=num_groups,
        num_rows=num_rows,
        slot=slot,
    )
    return routing, plan
