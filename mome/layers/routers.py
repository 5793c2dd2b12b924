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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_finite, check_finite_positive, check_ids_in_range, check_int, check_token_batch
from .._errors import InvalidArgumentError, InvalidInputError, MomeError
from .losses import noisy_top_k_selection_probs

__all__ = [
    "CausalRoutingError",
    "ExpertChoiceRouter",
    "GShardTop2Router",
    "HashRouter",
    "ModalityRouter",
    "NoisyTopKRouter",
    "Router",
    "Routing",
    "TopKRouter",
    "check_causal_safe",
    "noncausal_reason",
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
                expected = f"in [0, {num_modalities})"
                raise InvalidInputError("modality_ids", expected, f"values in [{low}, {high}]", owner)
    return modality_ids.reshape(-1).long()


def _check_router_input(router: Router, x: Tensor, dim: int | None) -> None:
    """``x`` is a floating ``[T, D]`` tensor, with ``D`` the router's width when it has a projection."""
    name = type(router).__name__
    if dim is not None:
        check_token_batch("x", x, dim, min_rank=2, max_rank=2, owner=name)
    elif not isinstance(x, Tensor) or x.dim() != 2 or not torch.is_floating_point(x):
        got = f"{x.dtype} shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise InvalidInputError("x", "a floating [T, D] tensor", got, name)


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
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("num_experts", num_experts, owner=owner)
        check_int("top_k", top_k, owner=owner)
        if top_k > num_experts:
            raise InvalidArgumentError("top_k", f"an integer in [1, num_experts={num_experts}]", top_k, owner)
        check_finite("noise_std", noise_std, minimum=0, owner=owner)
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
        )

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
        weights, index = gate_probs.topk(self.top_k, dim=-1)  # [T, k], [T, k]
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
        taken = F.one_hot(first, self.num_experts).bool()
        second = second_scores.masked_fill(taken, float("-inf")).argmax(dim=-1)  # [T]
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
      not of their position, so a later token can take an earlier token's place in an expert's buffer.
    """
    router = getattr(layer, "router", layer)
    if isinstance(router, ExpertChoiceRouter):
        return "expert-choice routing: each expert picks its top tokens among the whole sequence, later ones included"
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
