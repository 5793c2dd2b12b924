"""Routers: map tokens ``[T, D]`` to a :class:`Routing` record.

Every router returns the same record: for each token its ``k`` expert indices and combine weights,
the full router probabilities (for losses and statistics) and a mask of assignments the router
itself declined. Capacity (how many tokens an expert may take) is applied afterwards by
:func:`mome.layers.dispatch.plan_dispatch`, so any router works with any dispatch path.

Shapes: ``T`` tokens, ``D`` model width, ``E`` experts, ``k`` choices per token.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_finite, check_finite_positive, check_ids_in_range, check_int, check_token_batch, check_top_k
from .._errors import InvalidArgumentError, InvalidInputError, MomeError, UnsupportedOptionError
from .losses import noisy_top_k_selection_probs

__all__ = [
    "BaseLayerRouter",
    "CausalRoutingError",
    "ExpertChoiceRouter",
    "GShardTop2Router",
    "HashRouter",
    "ModalityRouter",
    "NoisyTopKRouter",
    "Router",
    "Routing",
    "SinkhornRouter",
    "TopKRouter",
    "XMoERouter",
    "balanced_assignment",
    "check_causal_safe",
    "noncausal_reason",
    "sinkhorn_balance",
]


@dataclass(frozen=True)
class Routing:
    """What a router decided for one forward pass.

    Attributes:
        expert_index: ``[T, k]`` int64, the experts chosen for each token (first choice first).
        combine_weights: ``[T, k]`` weight of each choice in the output; 0 where ``dropped``.
        dropped: ``[T, k]`` bool, assignments that are not computed (declined by the router or,
            after :func:`~mome.layers.dispatch.plan_dispatch`, over capacity).
        router_probs: ``[T, E]`` clean softmax probabilities (one-hot for parameter-free routers).
        router_logits: ``[T, E]`` clean logits in fp32, or None for parameter-free routers.
        selection_probs: ``[T, E]`` probability of each expert being selected under re-sampled
            noise (V-MoE load loss); None when no noise was added.
        priority: ``[T]`` priority under capacity (higher is served first; batch-prioritised
            routing), or None for token order.
        modality_ids: ``[T]`` modality of each token, or None.
        capacity: tokens per expert fixed by the router itself (expert choice), else None.
        renormalize_kept: after capacity, renormalise each token's weights over the choices that were kept
            (GShard / DeepSpeed top-2: a token whose second choice is dropped gets weight 1 on its first).
    """

    expert_index: Tensor
    combine_weights: Tensor
    dropped: Tensor
    router_probs: Tensor
    router_logits: Tensor | None = None
    selection_probs: Tensor | None = None
    priority: Tensor | None = None
    modality_ids: Tensor | None = None
    capacity: int | None = None
    renormalize_kept: bool = False

    @property
    def num_experts(self) -> int:
        return self.router_probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.expert_index.shape[-1]


class Router(nn.Module, abc.ABC):
    """Base class: ``forward(x [T, D], modality_ids=None, token_ids=None) -> Routing``."""

    num_experts: int
    top_k: int
    #: False for routers without a learned gate (hash, modality): gradient-based aux losses are
    #: meaningless for them and :class:`mome.layers.MoE` refuses to configure any.
    learned: bool = True

    @abc.abstractmethod
    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        """Route ``x [T, D]``; ``modality_ids`` and ``token_ids`` are ``[T]`` when given."""


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def check_modality_ids(
    modality_ids: Tensor | None,
    token_shape: tuple[int, ...],
    num_modalities: int,
    owner: str,
    *,
    check_range: bool = True,
) -> Tensor | None:
    """``modality_ids`` (None passes) is an integer tensor of ``token_shape`` whose values lie in
    ``[0, num_modalities)``; returns it flattened to int64 ``[T]``.

    The range is read (one ``min``/``max``) on CPU tensors only and not under ``torch.compile``: on an accelerator
    the read would synchronise the host every forward pass (indexing then fails with a device-side assert). The read
    stays in this function: tests/test_dispatch_compile.py exempts it by name from its host-sync detector.
    """
    if modality_ids is None:
        return None
    if not isinstance(modality_ids, Tensor):
        raise InvalidInputError("modality_ids", "an integer tensor", type(modality_ids).__name__, owner)
    if tuple(modality_ids.shape) != tuple(token_shape):
        expected = f"of the tokens' shape {tuple(token_shape)}"
        raise InvalidInputError("modality_ids", expected, f"shape {tuple(modality_ids.shape)}", owner)
    if modality_ids.dtype not in _INT_DTYPES:
        raise InvalidInputError("modality_ids", "an integer tensor", modality_ids.dtype, owner)
    if check_range and modality_ids.device.type == "cpu" and modality_ids.numel():
        if not torch.compiler.is_compiling():
            low, high = int(modality_ids.min()), int(modality_ids.max())
            if low < 0 or high >= num_modalities:
                outside = modality_ids[(modality_ids < 0) | (modality_ids >= num_modalities)].unique().tolist()
                expected = f"ids in [0, {num_modalities}) (the layer's {num_modalities} modalities)"
                raise InvalidInputError("modality_ids", expected, f"ids {outside} (values in [{low}, {high}])", owner)
    return modality_ids.reshape(-1).long()


def _check_router_input(router: Router, x: Tensor, dim: int | None) -> None:
    """``x`` is a floating ``[T, D]`` tensor, with ``D`` the router's width when it has a projection."""
    name = type(router).__name__
    if dim is not None:
        check_token_batch("x", x, dim, min_rank=2, max_rank=2, owner=name)
    elif not isinstance(x, Tensor) or x.dim() != 2 or not torch.is_floating_point(x):
        got = f"{x.dtype} shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise InvalidInputError("x", "a floating [T, D] tensor", got, name)


def _check_groups(num_experts: int, top_k: int, num_groups: object, max_groups: object, owner: str) -> None:
    """Device-limited routing's ``num_groups`` (a divisor of ``num_experts``) and ``max_groups`` (in
    ``[1, num_groups]``, with ``max_groups * num_experts / num_groups >= top_k``): both or neither."""
    if (num_groups is None) != (max_groups is None):
        given, missing = ("num_groups", "max_groups") if max_groups is None else ("max_groups", "num_groups")
        raise InvalidArgumentError(missing, f"set together with {given} (device-limited routing)", None, owner)
    if num_groups is None:
        return
    check_int("num_groups", num_groups, owner=owner)
    check_int("max_groups", max_groups, owner=owner)
    if num_experts % num_groups:
        raise InvalidArgumentError("num_groups", f"a divisor of num_experts={num_experts}", num_groups, owner)
    if max_groups > num_groups:
        raise InvalidArgumentError("max_groups", f"an integer in [1, num_groups={num_groups}]", max_groups, owner)
    if max_groups * (num_experts // num_groups) < top_k:
        expected = f"large enough that its groups hold top_k={top_k} experts ({num_experts // num_groups} per group)"
        raise InvalidArgumentError("max_groups", expected, max_groups, owner)


def _check_modality_experts(modality_experts: object, num_experts: int, top_k: int, owner: str) -> list[list[int]]:
    """``modality_experts`` is a non-empty sequence of pools, each of at least ``top_k`` distinct expert indices in
    ``[0, num_experts)``; returns the pools as lists."""
    expected = f"a non-empty list of pools of >= top_k={top_k} distinct expert indices in [0, {num_experts})"
    if isinstance(modality_experts, (str, bytes)) or not isinstance(modality_experts, Sequence) or not modality_experts:
        raise InvalidArgumentError("modality_experts", expected, modality_experts, owner)
    pools = []
    for modality, experts in enumerate(modality_experts):
        name = f"modality_experts[{modality}]"
        if isinstance(experts, (str, bytes)) or not isinstance(experts, Sequence):
            raise InvalidArgumentError(name, expected, experts, owner)
        experts = list(experts)
        if len(experts) < top_k:
            raise InvalidArgumentError(name, f"a pool of >= top_k={top_k} experts", experts, owner)
        if any(isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < num_experts for e in experts):
            raise InvalidArgumentError(name, f"expert indices in [0, {num_experts})", experts, owner)
        if len(set(experts)) != len(experts):
            raise InvalidArgumentError(name, "distinct expert indices", experts, owner)
        pools.append(experts)
    return pools


class TopKRouter(Router):
    """Token-choice top-k softmax router, optionally noisy, batch-prioritised or modality-pooled.

    ``p(x) = softmax(x W)``; each token takes its ``k`` most probable experts with weights
    ``p_e(x)`` (V-MoE, Riquelme et al. 2021) or, with ``renormalize=True``, ``p_e(x) / sum_{j in
    top-k} p_j(x)`` (Mixtral, MoE-LLaVA). Logits are computed in fp32 whatever the input dtype.

    Args:
        dim: token width ``D``.
        num_experts: ``E``.
        top_k: ``k``, experts per token (``1 <= k <= E``).
        renormalize: renormalise the chosen weights to sum to 1.
        noise_std: at training time add ``N(0, sigma^2)`` to the logits with ``sigma = noise_std / E``
            (V-MoE; noisy top-k gating of Shazeer et al. 2017 with a fixed noise scale). The choice
            and combine weights then use the noisy softmax; the clean softmax feeds the losses.
        batch_priority: batch-prioritised routing (V-MoE BPR): under capacity, tokens with a larger
            top-1 weight are served first instead of in token order.
        bias: add a bias to the router projection.
        modality_experts: optional per-modality pools: ``modality_experts[m]`` lists the experts a
            token of modality ``m`` may choose (the others are masked out before the softmax).
        bias_update_rate: ``gamma`` of DeepSeek-V3's auxiliary-loss-free balancing (DeepSeek-AI 2024, "DeepSeek-V3
            Technical Report", sec. 2.1.2; the paper's 0.001), or None (off). A per-expert bias ``b`` (the buffer
            ``expert_bias``, saved in the state dict, no gradient) is added to the affinities for the top-k
            *selection* only: ``e_1..e_k = TopK_e(p_e(x) + b_e)``, weights ``p_{e_j}(x)`` (renormalised with
            ``renormalize``) from the unbiased affinities. :meth:`update_bias` applies
            ``b_e += gamma * sign(mean_load - load_e)`` with the loads counted by the training forward passes of
            the :class:`~mome.layers.MoE` holding this router since the previous update
            (:func:`mome.layers.update_expert_biases` calls it for a model after each optimizer step; mome's
            Lightning tasks do so in ``on_before_optimizer_step``, once per step under gradient accumulation).
        num_groups, max_groups: device-limited routing (DeepSeek-V2, Dai et al. 2024; DeepSeek-V3 sec. 2.1.2,
            node-limited routing): the ``E`` experts form ``G = num_groups`` contiguous groups of ``E/G`` (the
            expert-parallel ranks); each token keeps the ``M = max_groups`` groups with the largest sum of their
            ``n = min(E/G, ceil(k/M))`` highest selection scores, the other groups' experts are masked, then
            top-k. Both or neither; ``G`` divides ``E``, ``M <= G`` and ``M E/G >= k``.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        *,
        renormalize: bool = False,
        noise_std: float = 0.0,
        batch_priority: bool = False,
        bias: bool = False,
        modality_experts: Sequence[Sequence[int]] | None = None,
        bias_update_rate: float | None = None,
        num_groups: int | None = None,
        max_groups: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("num_experts", num_experts, owner=owner)
        check_top_k(top_k, num_experts, owner=owner)
        check_finite("noise_std", noise_std, minimum=0, owner=owner)
        check_finite_positive("bias_update_rate", bias_update_rate, owner=owner, optional=True)
        _check_groups(num_experts, top_k, num_groups, max_groups, owner)
        for name, value in (("bias_update_rate", bias_update_rate), ("max_groups", max_groups)):
            if value is not None and noise_std > 0:
                reason = "the noisy router's selection probabilities (V-MoE load loss) model neither bias nor groups"
                raise UnsupportedOptionError(name, owner, f"{reason}; use noise_std=0", value)
        if max_groups is not None and modality_experts is not None:
            reason = "a chosen group may hold fewer than top_k experts of a modality's pool"
            raise UnsupportedOptionError("max_groups", owner, reason, max_groups)
        self.bias_update_rate = None if bias_update_rate is None else float(bias_update_rate)
        self.num_groups, self.max_groups = num_groups, max_groups
        if bias_update_rate is not None:
            self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)  # [E]
            # Selections counted since the last update (int64: exact, and model.to(dtype) leaves it alone).
            self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        else:
            self.expert_bias = self.expert_load = None
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.noise_std = float(noise_std)
        self.batch_priority = batch_priority
        self.proj = nn.Linear(dim, num_experts, bias=bias)
        #: modalities of the per-modality pools (the ``modality_ids`` range), None without pools.
        self.num_modalities = None
        if modality_experts is not None:
            pools = _check_modality_experts(modality_experts, num_experts, top_k, owner)
            allowed = torch.zeros(len(pools), num_experts, dtype=torch.bool)
            for modality, experts in enumerate(pools):
                allowed[modality, experts] = True
            self.register_buffer("allowed_experts", allowed, persistent=False)  # [M, E]
            self.num_modalities = len(pools)
        else:
            self.allowed_experts = None

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
            f"noise_std={self.noise_std}, batch_priority={self.batch_priority}"
            + (f", bias_update_rate={self.bias_update_rate}" if self.bias_update_rate is not None else "")
            + (f", num_groups={self.num_groups}, max_groups={self.max_groups}" if self.num_groups is not None else "")
        )

    def record_load(self, expert_index: Tensor) -> None:
        """Count the experts selected in a training forward pass (``expert_index [T, k]``) for the next
        :meth:`update_bias`; a no-op without ``bias_update_rate``."""
        if self.expert_load is not None:
            index = expert_index.reshape(-1)
            self.expert_load.index_add_(0, index, torch.ones_like(index))

    @torch.no_grad()
    def update_bias(self) -> None:
        """``b_e += gamma * sign(mean_load - load_e)`` over the loads counted since the last update, then reset the
        counts (DeepSeek-V3 sec. 2.1.2); nothing changes when no training forward pass was counted."""
        if self.expert_bias is None:
            return
        load = self.expert_load.float()
        step = self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias.add_(step.to(self.expert_bias.dtype))
        self.expert_load.zero_()

    def selection_scores(self, probs: Tensor, logits: Tensor) -> Tensor | None:
        """The scores the top-k selection ranks (``[T, E]``): ``probs`` plus ``expert_bias`` and with the groups
        outside a token's ``max_groups`` masked to -inf; None when neither option is set (``probs`` is ranked)."""
        if self.expert_bias is None and self.num_groups is None:
            return None
        scores = probs
        if self.expert_bias is not None:
            scores = probs + self.expert_bias.float()
            if self.allowed_experts is not None:  # experts outside a modality's pool stay unselectable
                scores = scores.masked_fill(logits == float("-inf"), float("-inf"))
        if self.num_groups is not None:
            num_tokens, per_group = scores.shape[0], self.num_experts // self.num_groups
            grouped = scores.view(num_tokens, self.num_groups, per_group)  # [T, G, E/G]
            top_n = min(per_group, math.ceil(self.top_k / self.max_groups))
            group_scores = grouped.topk(top_n, dim=-1).values.sum(dim=-1)  # [T, G]
            kept = group_scores.topk(self.max_groups, dim=-1).indices  # [T, M]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)  # [T, G]
            scores = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(num_tokens, self.num_experts)
        return scores

    def compute_logits(self, x: Tensor, modality_ids: Tensor | None) -> Tensor:
        """Clean router logits ``[T, E]`` in fp32, with experts outside a modality's pool at -inf.

        Checks ``x`` (floating ``[T, D]``) and, with pools, ``modality_ids`` (``[T]``, in ``[0, M)``, required).
        """
        _check_router_input(self, x, self.proj.in_features)
        bias = None if self.proj.bias is None else self.proj.bias.float()
        logits = F.linear(x.float(), self.proj.weight.float(), bias)
        if self.allowed_experts is not None:
            if modality_ids is None:
                expected = f"a [T] integer tensor (this router has modality_experts pools for {self.num_modalities})"
                raise InvalidInputError("modality_ids", expected, None, type(self).__name__)
            ids = check_modality_ids(modality_ids, x.shape[:1], self.num_modalities, type(self).__name__)
            logits = logits.masked_fill(~self.allowed_experts[ids], float("-inf"))
        return logits

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        logits = self.compute_logits(x, modality_ids)  # [T, E]
        probs = logits.softmax(dim=-1)
        gate_probs, selection_probs = probs, None
        if self.training and self.noise_std > 0:
            sigma = self.noise_std / self.num_experts
            noisy_logits = logits + sigma * torch.randn_like(logits)
            gate_probs = noisy_logits.softmax(dim=-1)
            selection_probs = noisy_top_k_selection_probs(logits, noisy_logits, sigma, self.top_k)
        scores = self.selection_scores(gate_probs, logits)
        if scores is None:
            weights, index = gate_probs.topk(self.top_k, dim=-1)  # [T, k], [T, k]
        else:  # selected by the biased / group-limited scores, weighted by the unbiased affinities
            index = scores.topk(self.top_k, dim=-1).indices  # [T, k]
            weights = gate_probs.gather(-1, index)  # [T, k]
        priority = weights[:, 0] if self.batch_priority else None
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(
            expert_index=index,
            combine_weights=weights,
            dropped=torch.zeros_like(index, dtype=torch.bool),
            router_probs=probs,
            router_logits=logits,
            selection_probs=selection_probs,
            priority=priority,
            modality_ids=modality_ids,
        )


class GShardTop2Router(TopKRouter):
    """GShard's top-2 gate as DeepSpeed implements it (``deepspeed.moe.sharded_moe.top2gating``, v0.9.5).

    Lepikhin et al. 2020, "GShard: Scaling Giant Models with Conditional Computation and Automatic
    Sharding"; MoE-LLaVA (Lin et al. 2024) trains and evaluates with this gate. With ``l = x W`` (fp32) and
    ``p = softmax(l)``:

        e_1 = argmax_e p_e
        e_2 = argmax_{e != e_1} (l_e + g_e),  g ~ Gumbel(0, 1)   (sample_second=True: the Gumbel-max trick
                                                                  samples e_2 from softmax over the rest)
        e_2 = argmax_{e != e_1} p_e                               (sample_second=False)
        w_j = p_{e_j} / (p_{e_1} + p_{e_2}),  renormalised over the kept choices after capacity

    DeepSpeed samples the second expert in training *and* evaluation. The noise is drawn as
    ``torch.distributions.Gumbel(0, 1).rsample([T, E])`` from torch's global generator, as DeepSpeed
    draws it, so a run seeded as an upstream run routes as it did.
    """

    def __init__(self, dim: int, num_experts: int, *, sample_second: bool = True, bias: bool = False) -> None:
        check_int("num_experts", num_experts, minimum=2, owner=type(self).__name__)  # two distinct choices
        super().__init__(dim, num_experts, 2, renormalize=True, bias=bias)
        self.sample_second = sample_second

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k=2, sample_second={self.sample_second}"

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        logits = self.compute_logits(x, modality_ids)  # [T, E]
        probs = logits.softmax(dim=-1)
        first = probs.argmax(dim=-1)  # [T]
        second_scores = logits
        if self.sample_second:
            zero, one = torch.zeros((), device=logits.device), torch.ones((), device=logits.device)
            second_scores = logits + torch.distributions.Gumbel(zero, one).rsample(logits.shape)
        # the first choice's score at -inf: [T, E]
        second_scores = second_scores.scatter(-1, first.unsqueeze(-1), float("-inf"))
        second = second_scores.argmax(dim=-1)  # [T]
        index = torch.stack([first, second], dim=-1)  # [T, 2]
        chosen = probs.gather(-1, index)  # [T, 2]
        return Routing(
            expert_index=index,
            combine_weights=chosen / chosen.sum(dim=-1, keepdim=True),
            dropped=torch.zeros_like(index, dtype=torch.bool),
            router_probs=probs,
            router_logits=logits,
            modality_ids=modality_ids,
            renormalize_kept=True,
        )


class NoisyTopKRouter(TopKRouter):
    """V-MoE's router: top-k over a noisy softmax (sigma = 1/E at training), no renormalisation.

    ``G(x) = TOP_k(softmax(x W + eps))``, ``eps ~ N(0, (noise_std / E)^2)`` at training time and no
    noise at evaluation (Riquelme et al. 2021, section 2.1; Shazeer et al. 2017).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, noise_std: float = 1.0, **kwargs) -> None:
        super().__init__(dim, num_experts, top_k, noise_std=noise_std, **kwargs)


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-``C`` tokens.

    ``S = softmax(x W)`` over experts ``[T, E]``; expert ``e`` processes the ``C = ceil(T * c / E)``
    tokens with the largest ``S[:, e]`` and weights them by ``S[t, e]``. Load is perfectly balanced;
    a token may be processed by zero or several experts. The record has ``k = E`` columns (column
    ``e`` is expert ``e``) with the unchosen pairs marked dropped.

    Args:
        dim: token width.
        num_experts: ``E``.
        capacity_factor: ``c``, average number of experts per token.
    """

    def __init__(self, dim: int, num_experts: int, capacity_factor: float = 1.0, *, bias: bool = False) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("num_experts", num_experts, owner=owner)
        check_finite_positive("capacity_factor", capacity_factor, owner=owner)
        self.num_experts = num_experts
        self.top_k = num_experts
        self.capacity_factor = float(capacity_factor)
        self.proj = nn.Linear(dim, num_experts, bias=bias)

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        _check_router_input(self, x, self.proj.in_features)
        num_tokens = x.shape[0]
        bias = None if self.proj.bias is None else self.proj.bias.float()
        logits = F.linear(x.float(), self.proj.weight.float(), bias)  # [T, E]
        probs = logits.softmax(dim=-1)
        capacity = min(num_tokens, max(1, math.ceil(num_tokens * self.capacity_factor / self.num_experts)))
        chosen_tokens = probs.t().topk(capacity, dim=-1).indices  # [E, C]
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        chosen.scatter_(0, chosen_tokens.t(), True)  # [T, E]
        expert_index = torch.arange(self.num_experts, device=x.device).expand(num_tokens, -1)
        return Routing(
            expert_index=expert_index,
            combine_weights=probs * chosen,
            dropped=~chosen,
            router_probs=probs,
            router_logits=logits,
            modality_ids=modality_ids,
            capacity=capacity,
        )


def _one_hot_routing(expert: Tensor, num_experts: int, modality_ids: Tensor | None, dtype: torch.dtype) -> Routing:
    """A fixed top-1 assignment with weight 1."""
    index = expert.unsqueeze(-1)  # [T, 1]
    return Routing(
        expert_index=index,
        combine_weights=torch.ones(index.shape, dtype=dtype, device=expert.device),
        dropped=torch.zeros_like(index, dtype=torch.bool),
        router_probs=F.one_hot(expert, num_experts).to(dtype),
        modality_ids=modality_ids,
    )


class HashRouter(Router):
    """Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): no parameters.

    A fixed random table maps each token id to one expert, with weight 1. ``token_ids`` (``[T]``)
    are the input vocabulary ids; when they are not given (image patches), the token's position
    within its sequence is hashed instead (``positions`` computed by :class:`mome.layers.MoE`).

    Args:
        num_experts: ``E``.
        num_buckets: size of the hashed id space (vocabulary size, or maximum sequence length).
        seed: seed of the fixed table (stored as a buffer, so it is saved with the model).
    """

    learned = False

    def __init__(self, num_experts: int, num_buckets: int = 65536, *, seed: int = 0) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("num_experts", num_experts, owner=owner)
        check_int("num_buckets", num_buckets, owner=owner)
        check_int("seed", seed, minimum=0, owner=owner)
        self.num_experts = num_experts
        self.top_k = 1
        generator = torch.Generator().manual_seed(seed)
        # Balanced table: bucket b -> expert perm[b] % E for a random permutation.
        table = torch.randperm(num_buckets, generator=generator) % num_experts
        self.register_buffer("table", table, persistent=True)

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        owner = type(self).__name__
        _check_router_input(self, x, None)
        if token_ids is None:
            raise InvalidInputError("token_ids", "a [T] integer tensor (token ids or positions)", None, owner)
        if isinstance(token_ids, Tensor) and tuple(token_ids.shape) != (x.shape[0],):
            expected = f"a [T] tensor, one id per token ([{x.shape[0]}])"
            raise InvalidInputError("token_ids", expected, f"shape {tuple(token_ids.shape)}", owner)
        check_ids_in_range("token_ids", token_ids, self.table.numel(), owner=owner, what="ids")
        expert = self.table[token_ids % self.table.numel()]  # the modulo only guards compiled graphs (no range check)
        return _one_hot_routing(expert, self.num_experts, modality_ids, x.dtype)


class ModalityRouter(Router):
    """Modality routing (VLMo's mixture-of-modality-experts, Bao et al. 2022): no learned gate.

    Each token goes to the expert of its modality with weight 1: ``expert = expert_of_modality[m]``.

    Args:
        num_modalities: ``M``.
        expert_of_modality: ``[M]`` expert of each modality (default: the identity, ``E = M``).
    """

    learned = False

    def __init__(self, num_modalities: int, expert_of_modality: Sequence[int] | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("num_modalities", num_modalities, owner=owner)
        mapping = list(range(num_modalities)) if expert_of_modality is None else expert_of_modality
        expected = f"{num_modalities} expert indices >= 0 (one per modality)"
        if isinstance(mapping, (str, bytes)) or not isinstance(mapping, Sequence) or len(mapping) != num_modalities:
            raise InvalidArgumentError("expert_of_modality", expected, expert_of_modality, owner)
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in mapping):
            raise InvalidArgumentError("expert_of_modality", expected, expert_of_modality, owner)
        mapping = list(mapping)
        self.num_modalities = num_modalities
        self.num_experts = max(mapping) + 1
        self.top_k = 1
        self.register_buffer("expert_of_modality", torch.tensor(mapping, dtype=torch.long), persistent=False)

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        owner = type(self).__name__
        _check_router_input(self, x, None)
        if modality_ids is None:
            raise InvalidInputError(
                "modality_ids", f"a [T] integer tensor ({self.num_modalities} modalities)", None, owner
            )
        modality_ids = check_modality_ids(modality_ids, x.shape[:1], self.num_modalities, owner)
        expert = self.expert_of_modality[modality_ids]
        return _one_hot_routing(expert, self.num_experts, modality_ids, x.dtype)


# ------------------------------------------------------------------------------ balanced routers
def _balanced_assignment_numpy(scores: np.ndarray) -> np.ndarray:
    """The exact balanced assignment of :func:`balanced_assignment` on a float64 ``[T, E]`` array: ``[T]`` int64.

    Successive shortest paths (the row-by-row Hungarian method) on the flow network token -> expert -> sink, with
    ``q = T // E`` units per expert plus ``r = T % E`` extra units shared through one node ``X`` (an expert takes
    ``q + 1`` tokens only through ``X``). Tokens are added one at a time; each is placed along the cheapest path
    (Bellman-Ford on the ``E + 1`` nodes experts and ``X``; an edge ``e -> f`` moves the token of ``e`` that loses
    least by moving to ``f``), which keeps every partial assignment optimal for its tokens.
    """
    num_tokens, num_experts = scores.shape
    if not np.isfinite(scores).all():
        raise InvalidInputError("scores", "finite affinities", "NaN or infinite values", "balanced_assignment")
    base, extra = divmod(num_tokens, num_experts)
    nodes = num_experts + 1  # the experts, then X
    tolerance = 1e-12 * (1.0 + (float(np.abs(scores).max()) if scores.size else 0.0))
    owner = np.full(num_tokens, -1, dtype=np.int64)
    load = np.zeros(num_experts, dtype=np.int64)
    move_cost = np.full((num_experts, num_experts), np.inf)  # cheapest s[t, e] - s[t, f] over the tokens t of e
    move_token = np.zeros((num_experts, num_experts), dtype=np.int64)
    edges = np.full((nodes, nodes), np.inf)
    for token in range(num_tokens):
        edges[:num_experts, :num_experts] = move_cost
        edges[:num_experts, num_experts] = np.where(load == base, 0.0, np.inf)  # e -> X: e takes an extra token
        edges[num_experts, :num_experts] = np.where(load == base + 1, 0.0, np.inf)  # X -> f: f gives its extra up
        distance = np.append(-scores[token], np.inf)
        previous = np.full(nodes, -1, dtype=np.int64)
        for _ in range(nodes):
            candidates = distance[:, None] + edges
            best = candidates.argmin(axis=0)
            shorter = candidates[best, np.arange(nodes)] < distance - tolerance
            if not shorter.any():
                break
            distance = np.where(shorter, candidates[best, np.arange(nodes)], distance)
            previous = np.where(shorter, best, previous)
        free = np.append(load < base, (load == base + 1).sum() < extra)
        node = int(np.where(free, distance, np.inf).argmin())
        joined, left = [], set()  # (token, expert) that joined an expert; experts that lost a token
        for _ in range(nodes):  # walk the path back to the expert the new token enters
            before = int(previous[node])
            if before < 0:
                break
            if node < num_experts and before < num_experts:
                moved = int(move_token[before, node])
                owner[moved] = node
                load[before] -= 1
                load[node] += 1
                joined.append((moved, node))
                left.add(before)
            node = before
        owner[token] = node
        load[node] += 1
        joined.append((token, node))
        for expert in left:  # a token that left may have been the cheapest move: recompute the row
            members = np.flatnonzero(owner == expert)
            losses = scores[members, expert, None] - scores[members]  # [n, E]
            move_cost[expert] = losses.min(axis=0) if members.size else np.inf
            move_token[expert] = members[losses.argmin(axis=0)] if members.size else 0
            move_cost[expert, expert] = np.inf
        for moved, expert in joined:  # a token that joined only adds candidates
            if expert in left:
                continue  # recomputed above, with it
            losses = scores[moved, expert] - scores[moved]  # [E]
            cheaper = losses < move_cost[expert]
            cheaper[expert] = False
            move_cost[expert, cheaper] = losses[cheaper]
            move_token[expert, cheaper] = moved
    return owner


@torch.library.custom_op("mome::balanced_assignment", mutates_args=())
def _balanced_assignment_op(scores: Tensor) -> Tensor:
    expert = _balanced_assignment_numpy(scores.detach().to("cpu", torch.float64).numpy())
    return torch.from_numpy(expert).to(scores.device)


@_balanced_assignment_op.register_fake
def _(scores):
    return scores.new_empty(scores.shape[0], dtype=torch.long)


def balanced_assignment(scores: Tensor) -> Tensor:
    """BASE layers' balanced assignment: the expert ``a(t)`` of each token that maximises ``sum_t s[t, a(t)]``
    over the assignments in which every expert takes ``floor(T/E)`` or ``ceil(T/E)`` tokens (``T mod E`` experts
    take the ceiling; ``T/E`` each when ``E`` divides ``T``).

    Exact (not an auction's approximation): solved on the host in float64 (see
    :func:`_balanced_assignment_numpy`), so on an accelerator it copies the scores to the host and waits for them.
    Under ``torch.compile`` it is one opaque op (``mome::balanced_assignment``). No gradient.

    Args:
        scores: ``[T, E]`` finite affinities (BASE: ``h_t . w_e``).

    Returns:
        ``[T]`` int64 expert of each token.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2 or not torch.is_floating_point(scores):
        got = f"{scores.dtype} shape {tuple(scores.shape)}" if isinstance(scores, Tensor) else type(scores).__name__
        raise InvalidInputError("scores", "a floating [T, E] tensor", got, "balanced_assignment")
    return _balanced_assignment_op(scores)


class BaseLayerRouter(Router):
    """BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models"): balanced
    top-1 routing by linear assignment, as fairseq's ``BaseLayer``.

    With expert embeddings ``w_e`` (a ``[E, D]`` projection, orthogonally initialised with gain 0.1 as fairseq),
    affinities ``s[t, e] = h_t . w_e`` (fp32):

        training:   a = argmax_{a balanced} sum_t s[t, a(t)]   (:func:`balanced_assignment`: T/E tokens each)
        evaluation: a(t) = argmax_e s[t, e]                     (greedy, as fairseq)
        weight:     sigmoid(s[t, a(t)])

    fairseq mixes ``alpha * f_e(h) + (1 - alpha) * h`` with ``f_e(h) = h + FFN_e(LN(h))`` and ``alpha`` this
    weight, i.e. ``h + alpha * FFN_e(LN(h))``: what a pre-norm block computes around an :class:`~mome.layers.MoE`
    whose combine weight is ``alpha``. The assignment carries no gradient; the weight trains ``w_e``.
    ``router_probs`` is ``softmax(s)`` (for statistics). The assignment looks across all tokens of the forward
    pass (see :func:`noncausal_reason`).

    Args:
        dim: token width ``D``.
        num_experts: ``E``.
    """

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("num_experts", num_experts, owner=owner)
        self.num_experts = num_experts
        self.top_k = 1
        self.proj = nn.Linear(dim, num_experts, bias=False)
        nn.init.orthogonal_(self.proj.weight, gain=0.1)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k=1"

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        _check_router_input(self, x, self.proj.in_features)
        logits = F.linear(x.float(), self.proj.weight.float())  # [T, E]
        expert = balanced_assignment(logits.detach()) if self.training else logits.argmax(dim=-1)
        index = expert.unsqueeze(-1)  # [T, 1]
        return Routing(
            expert_index=index,
            combine_weights=logits.gather(-1, index).sigmoid(),
            dropped=torch.zeros_like(index, dtype=torch.bool),
            router_probs=logits.softmax(dim=-1),
            router_logits=logits,
            modality_ids=modality_ids,
        )


def sinkhorn_balance(logits: Tensor, num_iters: int) -> Tensor:
    """``num_iters`` Sinkhorn iterations on ``exp(logits) [T, E]`` (in the log domain): each iteration scales the
    columns to sum to ``1/E``, then the rows to sum to ``1/T``. Returns the ``[T, E]`` matrix (rows sum to ``1/T``
    exactly, columns to ``1/E`` as the iterations converge). S-BASE (Clark et al. 2022) routes on it."""
    check_int("num_iters", num_iters, owner="sinkhorn_balance")
    num_tokens, num_experts = logits.shape
    log_p = logits.float()
    if num_tokens == 0:
        return log_p.exp()
    for _ in range(num_iters):
        log_p = log_p - log_p.logsumexp(dim=0, keepdim=True) - math.log(num_experts)
        log_p = log_p - log_p.logsumexp(dim=1, keepdim=True) - math.log(num_tokens)
    return log_p.exp()


class SinkhornRouter(Router):
    """Sinkhorn-balanced top-k routing, S-BASE (Clark et al. 2022, "Unified Scaling Laws for Routed Language
    Models", sec. 2.2 and appendix): BASE's balanced assignment approximated by a few Sinkhorn iterations.

    With ``l = x W`` (fp32) and ``p = softmax(l)``:

        training:   P = Sinkhorn_n(exp(l)) (rows sum to 1/T, columns to 1/E; :func:`sinkhorn_balance`, no gradient)
                    e_1..e_k = TopK_e P[t, e]
        evaluation: e_1..e_k = TopK_e p_e
        weights:    p_{e_j}, or p_{e_j} / sum_i p_{e_i} with ``renormalize``

    The balancing only chooses the experts; the weights (and their gradient) come from the original softmax.
    At training the choice looks across all tokens of the forward pass (see :func:`noncausal_reason`).

    Args:
        dim: token width ``D``.
        num_experts: ``E``.
        top_k: ``k``, experts per token (``1 <= k <= E``).
        sinkhorn_iters: ``n >= 1``.
        renormalize: renormalise the chosen weights to sum to 1.
        bias: add a bias to the router projection.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        *,
        sinkhorn_iters: int = 8,
        renormalize: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("num_experts", num_experts, owner=owner)
        check_top_k(top_k, num_experts, owner=owner)
        check_int("sinkhorn_iters", sinkhorn_iters, owner=owner)
        self.num_experts = num_experts
        self.top_k = top_k
        self.sinkhorn_iters = sinkhorn_iters
        self.renormalize = renormalize
        self.proj = nn.Linear(dim, num_experts, bias=bias)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, sinkhorn_iters={self.sinkhorn_iters}, "
            f"renormalize={self.renormalize}"
        )

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        _check_router_input(self, x, self.proj.in_features)
        bias = None if self.proj.bias is None else self.proj.bias.float()
        logits = F.linear(x.float(), self.proj.weight.float(), bias)  # [T, E]
        probs = logits.softmax(dim=-1)
        choice = sinkhorn_balance(logits.detach(), self.sinkhorn_iters) if self.training else probs.detach()
        index = choice.topk(self.top_k, dim=-1).indices  # [T, k]
        weights = probs.gather(-1, index)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(
            expert_index=index,
            combine_weights=weights,
            dropped=torch.zeros_like(index, dtype=torch.bool),
            router_probs=probs,
            router_logits=logits,
            modality_ids=modality_ids,
        )


class XMoERouter(Router):
    """X-MoE's routing (Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of Experts"): cosine
    scores in a low-dimensional routing space, with a learned temperature.

        s_e(x) = cos(W x, w_e) / tau,   p = softmax(s),   e_1..e_k = TopK_e s_e,   weights p_{e_j}

    ``W`` projects ``D -> routing_dim`` (16, torchscale's ``wg_reduction``), the expert embeddings ``w_e``
    (``[E, routing_dim]``) are orthogonally initialised with gain 0.32 (torchscale), both sides are L2-normalised
    (eps 1e-4) and ``tau`` is a learned scalar initialised to ``temperature`` (0.07) and clamped below at
    ``min_temperature`` (so ``|s_e| <= 1 / max(tau, min_temperature)``). ``renormalize`` renormalises the chosen
    weights to sum to 1.

    Args:
        dim: token width ``D``.
        num_experts: ``E``.
        top_k: ``k``, experts per token (``1 <= k <= E``).
        routing_dim: width of the routing space.
        temperature: initial ``tau`` (``>= min_temperature``).
        min_temperature: lower clamp of ``tau`` (``> 0``).
        renormalize: renormalise the chosen weights to sum to 1.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        *,
        routing_dim: int = 16,
        temperature: float = 0.07,
        min_temperature: float = 1e-4,
        renormalize: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("num_experts", num_experts, owner=owner)
        check_top_k(top_k, num_experts, owner=owner)
        check_int("routing_dim", routing_dim, owner=owner)
        check_finite_positive("min_temperature", min_temperature, owner=owner)
        check_finite("temperature", temperature, minimum=min_temperature, owner=owner)
        self.num_experts = num_experts
        self.top_k = top_k
        self.min_temperature = float(min_temperature)
        self.renormalize = renormalize
        self.proj = nn.Linear(dim, routing_dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, routing_dim))
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)
        self.temperature = nn.Parameter(torch.tensor(float(temperature)))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, top_k={self.top_k}, routing_dim={self.proj.out_features}, "
            f"min_temperature={self.min_temperature}, renormalize={self.renormalize}"
        )

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Routing:
        _check_router_input(self, x, self.proj.in_features)
        tokens = F.normalize(F.linear(x.float(), self.proj.weight.float()), dim=-1, eps=1e-4)  # [T, r]
        experts = F.normalize(self.expert_embeddings.float(), dim=-1, eps=1e-4)  # [E, r]
        scores = tokens @ experts.t() / self.temperature.float().clamp_min(self.min_temperature)  # [T, E]
        probs = scores.softmax(dim=-1)
        weights, index = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(
            expert_index=index,
            combine_weights=weights,
            dropped=torch.zeros_like(index, dtype=torch.bool),
            router_probs=probs,
            router_logits=scores,
            modality_ids=modality_ids,
        )


# ----------------------------------------------------------------------------------- causal models
class CausalRoutingError(MomeError, ValueError):
    """A router that looks across the sequence was put into a causal (autoregressive) model."""


def noncausal_reason(layer: nn.Module) -> str | None:
    """Why routing with ``layer`` (a router, or an MoE layer with a ``router`` and a ``capacity_factor``) makes a
    token's output depend on later tokens of the forward pass, or ``None`` when each token's expert choice is its
    own (token choice: top-k, noisy top-k, hash, modality routing).

    - expert choice (Zhou et al. 2022): expert ``e`` takes the ``C`` tokens with the largest ``S[:, e]`` among all
      ``T`` tokens, so whether token ``t`` is computed depends on the scores of tokens after it;
    - batch-prioritised routing under a capacity (V-MoE BPR): tokens are served in order of their router weight,
      not of their position, so a later token can take an earlier token's place in an expert's buffer;
    - BASE's balanced assignment and S-BASE's Sinkhorn balancing (training): a token's expert depends on the
      affinities of every token of the forward pass.
    """
    router = getattr(layer, "router", layer)
    if isinstance(router, ExpertChoiceRouter):
        return "expert-choice routing: each expert picks its top tokens among the whole sequence, later ones included"
    if isinstance(router, (BaseLayerRouter, SinkhornRouter)):
        return "balanced routing (BASE, Sinkhorn) at training: a token's expert depends on every token's affinities"
    capacity = getattr(layer, "capacity_factor", 1.0)  # a router alone: a capacity may be set on its layer
    if getattr(router, "batch_priority", False) and capacity is not None:
        return (
            "batch-prioritised routing under a capacity: a later token with a larger router weight takes an "
            "earlier token's place"
        )
    return None


def check_causal_safe(layer: nn.Module, *, allow_noncausal: bool = False) -> None:
    """Refuse a router that looks across the sequence in a causal LM (see :func:`noncausal_reason`): such a model
    leaks future tokens into the logits of past positions, so its training loss is not a next-token loss and its
    generation differs from its teacher-forced forward. ``allow_noncausal=True`` accepts it knowingly.

    Raises:
        CausalRoutingError: one line naming the router, why it leaks and how to opt in.
    """
    reason = noncausal_reason(layer)
    if reason is not None and not allow_noncausal:
        router = getattr(layer, "router", layer)
        raise CausalRoutingError(
            f"{type(router).__name__} in a causal LM leaks future tokens into past logits ({reason}); use a "
            "token-choice router (router='top_k'), or allow_noncausal_routing=True to accept the leak"
        )
