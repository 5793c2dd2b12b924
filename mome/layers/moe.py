"""The sparse mixture-of-experts layer: ``router + experts (+ shared experts)``.

:class:`MoE` is a drop-in for a timm ``Mlp``: ``[B, N, D] -> [B, N, D]``, no tuples. The auxiliary
losses and routing statistics of each forward pass are recorded on the module and gathered for a
whole model by :func:`aux_losses` and :func:`routing_stats`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_finite, check_finite_positive, check_int, check_token_batch, check_top_k
from .._errors import InvalidArgumentError, InvalidInputError, UnsupportedOptionError
from . import losses as L
from .dispatch import compute_capacity, plan_dispatch, weigh_kept
from .experts import Dispatch, Experts, use_few_token_path
from .routers import (
    BaseLayerRouter,
    ExpertChoiceRouter,
    GShardTop2Router,
    HashRouter,
    ModalityRouter,
    Router,
    Routing,
    SinkhornRouter,
    TopKRouter,
    XMoERouter,
    check_modality_ids,
)

__all__ = [
    "TOP_K_ROUTERS",
    "TOP_K_ROUTER_OPTIONS",
    "AUX_LOSSES",
    "MoE",
    "RoutedLayer",
    "SparseMoE",
    "aux_losses",
    "eval_capacity",
    "record_routing",
    "recomputing",
    "routing_stats",
    "timm_mlp_layer",
    "update_expert_biases",
]

#: Auxiliary losses an :class:`MoE` can add, by name (weights are given in ``aux_loss_weights``).
AUX_LOSSES = ("load_balance", "importance", "load", "z_loss", "local_entropy", "global_entropy", "sequence_balance")


def recomputing() -> bool:
    """True while autograd runs a backward pass, where ``torch.utils.checkpoint`` re-runs a checkpointed forward.

    A routed layer records its aux losses and routing statistics in the forward pass only: the re-run under
    gradient checkpointing (``set_grad_checkpointing``, ``gradient_checkpointing_enable``) computes the same
    values again, and recording them would replace what the step recorded after :func:`aux_losses` read it (a
    loss read twice, a graph kept alive, statistics of a partial re-run). Read from autograd's current graph
    task (``-1`` outside ``backward``); False under ``torch.compile``, whose compiled backward re-runs no Python.
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


_CAPACITIES: dict[tuple[int, int, float, int, int], int] = {}


def _cached_capacity(num_assignments: int, num_experts: int, factor: float, multiple_of: int, min_capacity: int) -> int:
    """:func:`compute_capacity`, remembered (its argument checks cost more than a decoding step's router): a layer
    asks for the same few shapes every forward pass."""
    if torch.compiler.is_compiling():
        return compute_capacity(
            num_assignments, num_experts, factor, multiple_of=multiple_of, min_capacity=min_capacity
        )
    key = (num_assignments, num_experts, factor, multiple_of, min_capacity)
    capacity = _CAPACITIES.get(key)
    if capacity is None:
        capacity = compute_capacity(
            num_assignments, num_experts, factor, multiple_of=multiple_of, min_capacity=min_capacity
        )
        if len(_CAPACITIES) >= 4096:
            _CAPACITIES.clear()
        _CAPACITIES[key] = capacity
    return capacity


class ReadLazily:
    """A per-forward record of a :class:`RoutedLayer` (a ``{name: tensor}`` dict, ``{}`` before any forward) that may
    be computed when first read: :meth:`defer` stores the function that computes it, the first read calls it once
    (without grad) and keeps the result; assigning a dict replaces both."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.pending, self.value = f"_pending_{name}", f"_{name}"

    def defer(self, layer: nn.Module, compute: Callable[[], dict[str, Tensor]]) -> None:
        layer.__dict__[self.pending] = compute  # a plain attribute: skip nn.Module.__setattr__'s checks

    def __get__(self, layer: nn.Module | None, owner: type | None = None) -> Any:
        if layer is None:
            return self
        compute = layer.__dict__.pop(self.pending, None)
        if compute is not None:
            with torch.no_grad():
                layer.__dict__[self.value] = compute()
        return layer.__dict__.get(self.value, {})

    def __set__(self, layer: nn.Module, value: dict[str, Tensor]) -> None:
        layer.__dict__.pop(self.pending, None)
        layer.__dict__[self.value] = value


class RoutedLayer(nn.Module):
    """Base of every layer that routes tokens: holds the per-forward aux losses and statistics.

    ``last_routing_stats`` (and, for a forward without autograd, ``last_aux_losses``) may be computed when first
    read: a layer hands :meth:`defer_routing_stats` (:meth:`defer_aux_losses`) the function that computes them from
    its last forward, so a forward whose statistics nobody reads (decoding, most training steps between logging)
    does not pay for them.
    """

    last_aux_losses = ReadLazily()
    last_routing_stats = ReadLazily()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling (``torch.save`` of a whole model, ``ddp_spawn``) computes what a forward left pending: a
        function is not picklable, its result is."""
        self.last_aux_losses, self.last_routing_stats = self.last_aux_losses, self.last_routing_stats
        return super().__getstate__()

    def defer_routing_stats(self, compute: Callable[[], dict[str, Tensor]]) -> None:
        """The statistics of this forward are ``compute()``, called (without grad) when they are first read."""
        RoutedLayer.last_routing_stats.defer(self, compute)

    def defer_aux_losses(self, compute: Callable[[], dict[str, Tensor]]) -> None:
        """The aux losses of this forward are ``compute()``, called when first read (for a forward without autograd,
        whose losses are values only)."""
        RoutedLayer.last_aux_losses.defer(self, compute)


def layer_dtype(x: Tensor, parameter: Tensor) -> torch.dtype | None:
    """The dtype a layer's input must have: its parameters' (``parameter.dtype``), or None (any floating dtype)
    under ``torch.autocast`` on the input's device, which casts the operands of each matmul itself."""
    return None if torch.is_autocast_enabled(x.device.type) else parameter.dtype


class MoE(RoutedLayer):
    """Sparse mixture of experts: ``y(x) = sum_{j<k} w_j(x) FFN_{e_j(x)}(x) + shared(x)``.

    Args:
        router: a :class:`~mome.layers.routers.Router` (top-k, noisy, expert-choice, hash, modality).
        experts: stacked :class:`~mome.layers.experts.Experts`.
        shared_experts: optional FFN applied to every token and added (DeepSeek-MoE style).
        capacity_factor: ``c``; each expert takes at most ``ceil(T k c / E)`` assignments (rounded up
            to ``capacity_multiple``); None is dropless.
        eval_capacity_factor: capacity factor in eval mode: ``"train"`` (same as training), a float,
            or None (dropless at evaluation).
        capacity_multiple: round the capacity up to a multiple of this (V-MoE uses 4).
        min_capacity: lower bound on the capacity (DeepSpeed's ``min_capacity``).
        dispatch: ``"sorted"`` (grouped matmul) or ``"buffers"`` (capacity buffers + bmm); None uses
            the experts' default.
        aux_loss_weights: ``{name: weight}`` for names in :data:`AUX_LOSSES`; the weighted terms
            are what :func:`aux_losses` returns.
        global_entropy_threshold: ``tau`` of LIMoE's thresholded global entropy (``log S``).
        num_modalities: number of modality ids (for per-modality losses and statistics).
        default_modality: modality id of every token when ``modality_ids`` is not given (e.g. 0 for
            a vision-only model whose router has per-modality pools); None: no modality.
        group_size: route tokens in contiguous groups of this many tokens (V-MoE's token groups,
            e.g. 8 images x 197 tokens): capacity applies per group and the importance, load and
            load-balance losses are computed per group and averaged. None: one group.
    """

    def __init__(
        self,
        router: Router,
        experts: Experts,
        shared_experts: nn.Module | None = None,
        *,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None | Literal["train"] = "train",
        capacity_multiple: int = 1,
        min_capacity: int = 0,
        dispatch: Dispatch | None = None,
        aux_loss_weights: Mapping[str, float] | None = None,
        global_entropy_threshold: float | None = None,
        num_modalities: int = 1,
        group_size: int | None = None,
        default_modality: int | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(router, Router):
            raise InvalidArgumentError("router", "a mome.layers.Router", type(router).__name__, owner)
        if not isinstance(experts, Experts):
            raise InvalidArgumentError("experts", "a mome.layers.Experts", type(experts).__name__, owner)
        if router.num_experts != experts.num_experts:
            expected = f"experts of the router's num_experts={router.num_experts}"
            raise InvalidArgumentError("experts", expected, f"num_experts={experts.num_experts}", owner)
        check_finite_positive("capacity_factor", capacity_factor, owner=owner, optional=True)
        if eval_capacity_factor != "train":
            check_finite_positive("eval_capacity_factor", eval_capacity_factor, owner=owner, optional=True)
        check_int("group_size", group_size, owner=owner, optional=True)
        check_int("capacity_multiple", capacity_multiple, owner=owner)
        check_int("min_capacity", min_capacity, minimum=0, owner=owner)
        if dispatch is not None:
            check_choice("dispatch", dispatch, ("sorted", "buffers"), owner=owner)
        check_int("num_modalities", num_modalities, owner=owner)
        check_finite("global_entropy_threshold", global_entropy_threshold, minimum=0, owner=owner, optional=True)
        if aux_loss_weights is not None and not isinstance(aux_loss_weights, Mapping):
            expected = f"a mapping {{name: weight}} of names in {list(AUX_LOSSES)}"
            raise InvalidArgumentError("aux_loss_weights", expected, aux_loss_weights, owner)
        weights = dict(aux_loss_weights or {})
        unknown = sorted(set(weights) - set(AUX_LOSSES), key=str)
        if unknown:
            raise InvalidArgumentError("aux_loss_weights", f"names in {list(AUX_LOSSES)}", unknown, owner)
        for name, weight in weights.items():
            check_finite(f"aux_loss_weights[{name!r}]", weight, minimum=0, owner=owner)
        if {"load_balance", "sequence_balance"} & set(weights) and isinstance(router, ExpertChoiceRouter):
            reason = "load_balance and sequence_balance count token choices; expert choice is balanced by design"
            raise UnsupportedOptionError("aux_loss_weights", owner, reason, weights)
        if weights and not router.learned:
            reason = f"{type(router).__name__} has no learned gate to train"
            raise UnsupportedOptionError("aux_loss_weights", owner, reason, weights)
        self.router = router
        self.experts = experts
        self.shared_experts = shared_experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor == "train" else eval_capacity_factor
        self.capacity_multiple = capacity_multiple
        self.min_capacity = min_capacity
        self.dispatch = dispatch or experts.dispatch
        if self.dispatch == "buffers" and not isinstance(router, ExpertChoiceRouter):
            for name, factor in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
                if factor is None:
                    expected = "a finite number > 0 with dispatch='buffers' (capacity buffers need a capacity)"
                    raise InvalidArgumentError(name, expected, factor, owner)
        self.aux_loss_weights = weights
        self.global_entropy_threshold = global_entropy_threshold
        self.num_modalities = num_modalities
        self.group_size = group_size
        check_int("default_modality", default_modality, minimum=0, owner=owner, optional=True)
        if default_modality is not None and default_modality >= num_modalities:
            expected = f"a modality id in [0, num_modalities={num_modalities}) (or None)"
            raise InvalidArgumentError("default_modality", expected, default_modality, owner)
        self.default_modality = default_modality

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def extra_repr(self) -> str:
        return (
            f"capacity_factor={self.capacity_factor}, eval_capacity_factor={self.eval_capacity_factor}, "
            f"dispatch={self.dispatch!r}, aux_loss_weights={self.aux_loss_weights}"
        )

    def capacity(self, num_tokens: int) -> int | None:
        """Tokens per expert for ``num_tokens`` tokens in the current mode, or None (dropless)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        num_assignments = num_tokens * self.router.top_k
        return _cached_capacity(num_assignments, self.num_experts, factor, self.capacity_multiple, self.min_capacity)

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, token_ids: Tensor | None = None) -> Tensor:
        """``x [..., D] -> [..., D]``; ``modality_ids`` and ``token_ids`` are ``x.shape[:-1]``.

        Checks ``x`` (floating, last dim ``D``, the experts' dtype outside autocast) and ``modality_ids`` (shape,
        integer dtype, values in ``[0, num_modalities)``); the router checks what it indexes with.
        """
        owner = type(self).__name__
        experts, router = self.experts, self.router  # one module lookup each
        check_token_batch("x", x, experts.dim, dtype=layer_dtype(x, experts.w_in), owner=owner)
        if "sequence_balance" in self.aux_loss_weights and x.dim() < 3:
            expected = f"a [B, T, {experts.dim}] tensor (the sequence_balance loss is computed per sequence)"
            raise InvalidInputError("x", expected, f"shape {tuple(x.shape)}", owner)
        tokens = x.reshape(-1, x.shape[-1])  # [T, D]
        # The router re-checks the range of the ids it indexes with: read the values once when its bound is as tight.
        router_modalities = getattr(router, "num_modalities", None)
        check_range = router_modalities is None or router_modalities > self.num_modalities
        modality = check_modality_ids(modality_ids, x.shape[:-1], self.num_modalities, owner, check_range=check_range)
        if modality is None and self.default_modality is not None:
            modality = torch.full(tokens.shape[:1], self.default_modality, dtype=torch.long, device=x.device)
        if token_ids is None and isinstance(router, HashRouter):
            # Without vocabulary ids, hash the position within the sequence.
            if x.dim() < 2:
                expected = f"a [..., N, {experts.dim}] tensor (hash routing of positions; or give token_ids)"
                raise InvalidInputError("x", expected, f"shape {tuple(x.shape)}", owner)
            token_ids = torch.arange(x.shape[-2], device=x.device).expand(x.shape[:-1])  # [..., N]
        elif token_ids is not None and isinstance(token_ids, Tensor) and tuple(token_ids.shape) != x.shape[:-1]:
            expected = f"of the tokens' shape {tuple(x.shape[:-1])}"
            raise InvalidInputError("token_ids", expected, f"shape {tuple(token_ids.shape)}", owner)
        if isinstance(token_ids, Tensor):
            token_ids = token_ids.reshape(-1)  # [T]
        num_groups = self._num_groups(tokens.shape[0])
        routing = router(tokens, modality_ids=modality, token_ids=token_ids)
        requested = (~routing.dropped).sum()
        group_length = tokens.shape[0] // num_groups
        capacity = self.capacity(group_length)
        # A token picks k distinct experts, so no expert gets more than group_length assignments of a group: a
        # capacity of at least that drops nothing.
        no_drops = routing.capacity is None and (capacity is None or capacity >= group_length)
        if no_drops and experts.serves_few_tokens and use_few_token_path(tokens, routing):
            if routing.dropped.any():  # on CPU: nothing to wait for. Without drops the weights are as routed.
                routing = weigh_kept(routing, routing.dropped)
            out = experts.forward_few(tokens, routing)
        else:
            routing, plan = plan_dispatch(routing, capacity, num_groups)
            out = experts(tokens, routing, plan, self.dispatch)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        self._record(routing, requested, num_groups, x.shape[-2] if x.dim() >= 3 else None)
        return out.reshape(x.shape)

    def _num_groups(self, num_tokens: int) -> int:
        if self.group_size is None or num_tokens == 0:  # no tokens: one empty group
            return 1
        if num_tokens % self.group_size:
            expected = (
                f"a number of tokens divisible by group_size={self.group_size} (a multiple of the sequence length)"
            )
            raise InvalidInputError("x", expected, f"{num_tokens} tokens", type(self).__name__)
        return num_tokens // self.group_size

    def _record(
        self, routing: Routing, requested: Tensor, num_groups: int = 1, sequence_length: int | None = None
    ) -> None:
        record_routing(self, routing, requested, num_groups, sequence_length)

    @classmethod
    def from_dense(
        cls,
        mlp: nn.Module,
        num_experts: int,
        top_k: int = 2,
        *,
        router: Router | None = None,
        dispatch: Dispatch = "sorted",
        fine_grained: int = 1,
        **moe_kwargs,
    ) -> MoE:
        """Sparse upcycling: every expert is a copy of ``mlp``; the router starts random.

        With the default router (top-k, renormalised) and no capacity limit the new layer computes
        exactly what ``mlp`` computed (MoE-LLaVA stage III, Komatsuzaki et al. 2023).

        ``fine_grained=m`` (DeepSeekMoE's fine-grained segmentation, see :meth:`Experts.from_dense`): ``m E``
        experts, the ``m`` hidden segments of each of the ``E`` copies, and a default router of top ``m k``; the
        ``m`` segments of one copy, each with weight 1, sum to ``mlp``. A given ``router`` has ``m E`` experts.
        """
        experts = Experts.from_dense(mlp, num_experts, dispatch=dispatch, fine_grained=fine_grained)
        if router is None:
            router = TopKRouter(experts.dim, experts.num_experts, fine_grained * top_k, renormalize=True)
        return cls(router.to(experts.w_in.dtype), experts, **moe_kwargs)


def record_routing(
    layer: RoutedLayer, routing: Routing, requested: Tensor, num_groups: int = 1, sequence_length: int | None = None
) -> None:
    """Store a routed layer's weighted aux losses and routing statistics of this forward pass, and in training count
    the router's selections for its bias update (:meth:`TopKRouter.record_load`); not in a checkpoint's re-run of the
    forward during backward (:func:`recomputing`). The losses are computed in a re-run too: their backward needs
    the tensors the re-run saves again. ``sequence_length``: tokens per sequence (``sequence_balance``).

    The statistics are computed when first read (:meth:`RoutedLayer.defer_routing_stats`); without autograd
    (evaluation, decoding) the losses are values only, and they too are computed when first read.

    ``layer`` names its losses in ``aux_loss_weights`` and has ``num_modalities``, ``global_entropy_threshold`` and
    ``router`` (:class:`MoE`, :class:`mome.peft.LoRAExpertsLinear`): every token-choice layer records alike.
    """
    probs, modality = routing.router_probs, routing.modality_ids
    num_modalities = layer.num_modalities

    def raw_losses() -> dict[str, Tensor]:
        grouped_probs = probs.view(num_groups, probs.shape[0] // num_groups, probs.shape[-1])  # [G, T/G, E]
        raw: dict[str, Tensor] = {}
        for name in layer.aux_loss_weights:
            if name == "load" and routing.selection_probs is None:
                continue  # the load loss only exists with router noise (training), as in V-MoE
            if probs.shape[0] == 0:  # no tokens (an empty batch): every mean is undefined; the layer adds 0
                raw[name] = probs.sum()  # a zero that stays in the graph, so backward still reaches the router
            elif name == "load_balance":
                raw[name] = L.load_balance_loss(grouped_probs, routing.expert_index[:, 0].view(num_groups, -1))
            elif name == "importance":
                raw[name] = L.importance_loss(grouped_probs)
            elif name == "load":
                raw[name] = L.load_loss(routing.selection_probs.view_as(grouped_probs))
            elif name == "z_loss":
                raw[name] = L.router_z_loss(routing.router_logits)
            elif name == "local_entropy":
                raw[name] = L.local_entropy_loss(probs, modality, num_modalities).sum()
            elif name == "global_entropy":
                raw[name] = L.global_entropy_loss(probs, modality, num_modalities, layer.global_entropy_threshold).sum()
            elif name == "sequence_balance":
                sequences = (-1, sequence_length)  # [B, T, ...]: the loss is per sequence
                raw[name] = L.sequence_balance_loss(
                    probs.view(*sequences, probs.shape[-1]), routing.expert_index.view(*sequences, routing.top_k)
                )
        return raw

    def weigh(raw: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: layer.aux_loss_weights[name] * value for name, value in raw.items()}

    if torch.is_grad_enabled():
        raw = raw_losses()  # in the forward's graph
        if recomputing():
            return
        layer.last_aux_losses = weigh(raw)
        detached = {name: value.detach() for name, value in raw.items()}

        def read_raw() -> dict[str, Tensor]:
            return detached
    else:
        computed: list[dict[str, Tensor]] = []

        def read_raw() -> dict[str, Tensor]:
            if not computed:
                computed.append(raw_losses())
            return computed[0]

        layer.defer_aux_losses(lambda: weigh(read_raw()))
    if layer.training and isinstance(layer.router, TopKRouter):
        with torch.no_grad():
            layer.router.record_load(routing.expert_index)
    # What the statistics read, without the autograd graph (kept until the next forward, not computed until read).
    kept = routing
    if probs.requires_grad:
        kept = Routing(
            routing.expert_index,
            routing.combine_weights.detach(),
            routing.dropped,
            probs.detach(),
            modality_ids=modality,
        )

    def statistics() -> dict[str, Tensor]:
        stats = routing_statistics(kept, requested, num_modalities)
        stats.update({f"loss/{name}": value for name, value in read_raw().items()})
        return stats

    layer.defer_routing_stats(statistics)


def routing_statistics(routing: Routing, requested: Tensor, num_modalities: int) -> dict[str, Tensor]:
    """Per-expert load, dropped fraction and router entropy (overall and per modality).

    ``expert_load [E]``: share of the computed assignments that each expert computed (sums to 1);
    ``dropped_fraction``: share of the assignments the router asked for that capacity dropped;
    ``unrouted_fraction``: share of tokens that no expert computed; ``router_entropy``: mean
    per-token entropy of the router probabilities (nats).
    """
    num_experts = routing.num_experts
    expert = routing.expert_index.reshape(-1)
    kept = (~routing.dropped).reshape(-1).float()
    counts = torch.zeros(num_experts, device=expert.device).index_add_(0, expert, kept)
    num_kept = kept.sum()
    probs = routing.router_probs.float()
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)  # [T]
    token_kept = (~routing.dropped).any(dim=-1).float()  # [T]
    stats = {
        "expert_load": counts / num_kept.clamp_min(1),
        "dropped_fraction": 1.0 - num_kept / requested.clamp_min(1),
        "unrouted_fraction": 1.0 - token_kept.mean() if token_kept.numel() else token_kept.new_zeros(()),
        "router_entropy": entropy.mean() if entropy.numel() else entropy.new_zeros(()),
    }
    if routing.modality_ids is not None:
        modality = routing.modality_ids
        per_modality = torch.zeros(num_modalities, num_experts, device=expert.device)
        per_modality.index_put_((modality.repeat_interleave(routing.top_k), expert), kept, accumulate=True)
        tokens = torch.zeros(num_modalities, device=expert.device).index_add_(0, modality, torch.ones_like(entropy))
        stats["expert_load_per_modality"] = per_modality / per_modality.sum(-1, keepdim=True).clamp_min(1)
        unrouted = torch.zeros(num_modalities, device=expert.device).index_add_(0, modality, 1.0 - token_kept)
        stats["unrouted_fraction_per_modality"] = unrouted / tokens.clamp_min(1)
        entropy_sum = torch.zeros(num_modalities, device=expert.device).index_add_(0, modality, entropy)
        stats["router_entropy_per_modality"] = entropy_sum / tokens.clamp_min(1)
    return stats


RouterSpec = Literal["top_k", "noisy_top_k", "expert_choice", "hash", "modality", "gshard", "base", "sinkhorn", "xmoe"]
#: The options ``router_options`` may give each router built by name (keyword arguments of its class).
ROUTER_OPTIONS = {
    "sinkhorn": ("sinkhorn_iters", "renormalize"),
    "xmoe": ("routing_dim", "temperature", "min_temperature", "renormalize"),
}
#: The routers built from :class:`~mome.layers.routers.TopKRouter`, and the options (with their defaults) only they
#: use: any other router given a value other than the default is refused by name rather than ignoring it.
TOP_K_ROUTERS = ("top_k", "noisy_top_k")
TOP_K_ROUTER_OPTIONS: dict[str, Any] = {
    "renormalize": False,
    "noise_std": None,
    "batch_priority": False,
    "modality_experts": None,
    "bias_update_rate": None,
    "num_groups": None,
    "max_groups": None,
    "fine_grained": 1,
}


class SparseMoE(MoE):
    """Convenience constructor of a token-choice :class:`MoE` (the parts are built for you).

    ``SparseMoE(dim, hidden_dim, num_experts, top_k=2)`` is a Mixtral-style layer when
    ``renormalize=True, gated=True, act_layer=nn.SiLU``, and a V-MoE layer with
    ``router="noisy_top_k", capacity_factor=1.05, capacity_multiple=4,
    aux_loss_weights={"importance": 0.005, "load": 0.005}``.

    Args:
        dim: token width ``D``.
        hidden_dim: hidden width of each expert.
        num_experts: ``E``.
        top_k: experts per token.
        router: ``"top_k"``, ``"noisy_top_k"``, ``"expert_choice"``, ``"hash"``, ``"modality"``, ``"gshard"``
            (:class:`~mome.layers.routers.GShardTop2Router`: GShard's top-2 gate with a sampled second expert;
            ``top_k`` must be 2), ``"base"`` (:class:`~mome.layers.routers.BaseLayerRouter`, BASE layers' balanced
            assignment; ``top_k`` must be 1), ``"sinkhorn"`` (:class:`~mome.layers.routers.SinkhornRouter`, S-BASE),
            ``"xmoe"`` (:class:`~mome.layers.routers.XMoERouter`), or a callable ``(dim, num_experts) -> Router``.
        router_options: keyword options of the router named by ``router`` (``ROUTER_OPTIONS`` lists them), e.g.
            ``{"sinkhorn_iters": 4}``; refused for the other routers.
        renormalize, noise_std, batch_priority, modality_experts, bias_update_rate, num_groups, max_groups: router
            options (see :class:`~mome.layers.routers.TopKRouter`); ``noise_std`` defaults to 1 for the noisy router.
        fine_grained: ``m``, DeepSeekMoE's fine-grained expert segmentation (Dai et al. 2024, "DeepSeekMoE: Towards
            Ultimate Expert Specialization in Mixture-of-Experts Language Models", sec. 3.1): ``m E`` experts of
            hidden width ``H / m`` and top ``m k`` (the same active parameters and FLOPs per token as ``E`` experts
            of width ``H`` and top ``k``); ``m`` divides ``hidden_dim``. A top-k router option.
        gated, act_layer, bias, dispatch_dtype: expert options (see :class:`~mome.layers.experts.Experts`;
            ``dispatch_dtype="bfloat16"`` rounds what crosses the dispatch as vmoe's ``Bfloat16Dispatcher``).
        num_shared_experts: number of always-on shared experts (one FFN of width
            ``num_shared_experts * shared_hidden_dim``, default the routed experts' width ``hidden_dim / m``:
            DeepSeekMoE's shared-expert isolation counts fine-grained experts).
        **moe_kwargs: capacity, dispatch and loss options of :class:`MoE`.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 2,
        *,
        router: RouterSpec | Callable[[int, int], Router] = "top_k",
        router_options: Mapping[str, Any] | None = None,
        renormalize: bool = False,
        noise_std: float | None = None,
        batch_priority: bool = False,
        modality_experts: Sequence[Sequence[int]] | None = None,
        bias_update_rate: float | None = None,
        num_groups: int | None = None,
        max_groups: int | None = None,
        fine_grained: int = 1,
        gated: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        num_shared_experts: int = 0,
        shared_hidden_dim: int | None = None,
        dispatch: Dispatch = "sorted",
        dispatch_dtype: torch.dtype | str | None = None,
        **moe_kwargs,
    ) -> None:
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("hidden_dim", hidden_dim, owner=owner)
        check_int("num_experts", num_experts, owner=owner)
        check_top_k(top_k, num_experts, owner=owner)
        check_int("num_shared_experts", num_shared_experts, minimum=0, owner=owner)
        check_int("shared_hidden_dim", shared_hidden_dim, owner=owner, optional=True)
        check_int("fine_grained", fine_grained, owner=owner)
        if hidden_dim % fine_grained:
            raise InvalidArgumentError("fine_grained", f"a divisor of hidden_dim={hidden_dim}", fine_grained, owner)
        if callable(router) or router not in TOP_K_ROUTERS:
            given = dict(
                renormalize=renormalize,
                noise_std=noise_std,
                batch_priority=batch_priority,
                modality_experts=modality_experts,
                bias_update_rate=bias_update_rate,
                num_groups=num_groups,
                max_groups=max_groups,
                fine_grained=fine_grained,
            )
            for name, value in given.items():
                if value != TOP_K_ROUTER_OPTIONS[name]:
                    which = "a router callable" if callable(router) else f"router={router!r}"
                    reason = f"it configures the top-k routers ({', '.join(TOP_K_ROUTERS)}), not {which}"
                    raise UnsupportedOptionError(name, owner, reason, value)
        if router_options:
            allowed = ROUTER_OPTIONS.get(router, ()) if isinstance(router, str) else ()
            if not allowed:
                reason = f"it configures the routers {', '.join(ROUTER_OPTIONS)}, not router={router!r}"
                raise UnsupportedOptionError("router_options", owner, reason, router_options)
            if not isinstance(router_options, Mapping) or not set(router_options) <= set(allowed):
                raise InvalidArgumentError(
                    "router_options", f"a mapping of names in {list(allowed)}", router_options, owner
                )
        if callable(router):
            built = router(dim, num_experts)
        elif router in TOP_K_ROUTERS:
            default_noise = 1.0 if router == "noisy_top_k" else 0.0
            built = TopKRouter(
                dim,
                fine_grained * num_experts,
                fine_grained * top_k,
                renormalize=renormalize,
                noise_std=default_noise if noise_std is None else noise_std,
                batch_priority=batch_priority,
                modality_experts=modality_experts,
                bias_update_rate=bias_update_rate,
                num_groups=num_groups,
                max_groups=max_groups,
            )
        elif router == "expert_choice":
            capacity_factor = moe_kwargs.pop("capacity_factor", None)  # the router's: tokens per expert
            check_finite_positive("capacity_factor", capacity_factor, owner=owner, optional=True)
            built = ExpertChoiceRouter(dim, num_experts, 1.0 if capacity_factor is None else capacity_factor)
        elif router == "gshard":
            if top_k != 2:
                raise InvalidArgumentError("top_k", "2 (router='gshard' is GShard's top-2 gate)", top_k, owner)
            built = GShardTop2Router(dim, num_experts)
        elif router == "base":
            if top_k != 1:
                raise InvalidArgumentError("top_k", "1 (router='base' assigns each token one expert)", top_k, owner)
            built = BaseLayerRouter(dim, num_experts)
        elif router == "sinkhorn":
            built = SinkhornRouter(dim, num_experts, top_k, **(router_options or {}))
        elif router == "xmoe":
            built = XMoERouter(dim, num_experts, top_k, **(router_options or {}))
        elif router == "hash":
            built = HashRouter(num_experts)
        elif router == "modality":
            built = ModalityRouter(num_experts)
        else:
            expected = "one of " + ", ".join(repr(name) for name in RouterSpec.__args__) + " or a callable"
            raise InvalidArgumentError("router", expected, router, owner)
        experts = Experts(
            fine_grained * num_experts,
            dim,
            hidden_dim // fine_grained,
            gated=gated,
            act_layer=act_layer,
            bias=bias,
            dispatch=dispatch,
            dispatch_dtype=dispatch_dtype,
        )
        shared = None
        if num_shared_experts:
            from timm.layers import GluMlp, Mlp

            width = num_shared_experts * (shared_hidden_dim or hidden_dim // fine_grained)
            shared = (
                GluMlp(dim, 2 * width, act_layer=act_layer, bias=bias, gate_last=False)
                if gated
                else Mlp(dim, width, act_layer=act_layer, bias=bias)
            )
        if router == "modality":
            moe_kwargs.setdefault("num_modalities", num_experts)
        elif modality_experts is not None:
            moe_kwargs.setdefault("num_modalities", len(modality_experts))
        super().__init__(built, experts, shared, **moe_kwargs)
        #: DeepSeekMoE's segmentation factor ``m``: the layer has ``m * num_experts`` experts of width ``H / m``.
        self.fine_grained = fine_grained


def timm_mlp_layer(**moe_kwargs) -> Callable[..., MoE]:
    """An ``mlp_layer`` for timm blocks: ``Block(dim, heads, mlp_layer=timm_mlp_layer(num_experts=8))``.

    timm calls ``mlp_layer(in_features=, hidden_features=, act_layer=, drop=, bias=, norm_layer=)``;
    this maps those onto :class:`SparseMoE` (``norm_layer`` must be None: experts have no inner norm).
    """

    def build(
        in_features: int,
        hidden_features: int,
        act_layer=nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
        norm_layer=None,
        **unused,
    ) -> MoE:
        if norm_layer is not None:
            raise UnsupportedOptionError("norm_layer", "timm_mlp_layer", "experts have no inner norm", norm_layer)
        if drop:
            raise UnsupportedOptionError("drop", "timm_mlp_layer", "dropout inside experts is not supported", drop)
        kwargs = {"act_layer": act_layer, "bias": bias, **moe_kwargs}
        return SparseMoE(in_features, hidden_features, **kwargs)

    return build


def update_expert_biases(model: nn.Module) -> int:
    """Apply DeepSeek-V3's auxiliary-loss-free bias update (:meth:`TopKRouter.update_bias`) to every router of
    ``model`` with a ``bias_update_rate``, from the loads its training forward passes counted since the last call.

    Call it once per optimizer step (mome's Lightning tasks do, in ``on_before_optimizer_step``). Returns the
    number of routers updated.
    """
    routers = [m for m in model.modules() if isinstance(m, TopKRouter) and m.bias_update_rate is not None]
    for router in routers:
        router.update_bias()
    return len(routers)


def _routed_layers(model: nn.Module) -> list[tuple[str, RoutedLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, RoutedLayer)]


@contextmanager
def eval_capacity(model: nn.Module, capacity_factor: float | None = None) -> Iterator[list[str]]:
    """Evaluate every token-choice :class:`MoE` layer of ``model`` at ``capacity_factor`` (``None``: dropless)
    inside the ``with`` block; the layers' own ``eval_capacity_factor`` and dispatch are restored after it.

    With a capacity ``C = ceil(c k T / E)`` an expert keeps at most ``C`` of the ``T`` tokens of a forward pass
    (of a routing group), so which tokens are dropped depends on the other samples of the batch, and so does a
    metric. Dropless evaluation (``C = inf``) makes every output a function of the model and its sample only.
    A layer with capacity buffers (``dispatch="buffers"``) uses the sorted dispatch meanwhile (the same results:
    :mod:`mome.layers.experts`). Expert-choice layers are left alone: the expert picks its tokens among the
    whole batch by design (Zhou et al. 2022), there is no token-choice capacity to lift.

    Yields the names of the layers it changed.
    """
    saved = []
    for name, layer in model.named_modules():
        if isinstance(layer, MoE) and not isinstance(layer.router, ExpertChoiceRouter):
            saved.append((name, layer, layer.eval_capacity_factor, layer.dispatch))
            layer.eval_capacity_factor = capacity_factor
            if capacity_factor is None and layer.dispatch == "buffers":
                layer.dispatch = "sorted"
    try:
        yield [name for name, *_ in saved]
    finally:
        for _, layer, factor, dispatch in saved:
            layer.eval_capacity_factor, layer.dispatch = factor, dispatch


def aux_losses(model: nn.Module, *, clear: bool = True) -> dict[str, Tensor]:
    """Weighted auxiliary losses of the last forward pass, summed over the model's MoE layers.

    Returns ``{loss_name: tensor}`` (empty for a model without MoE): add ``sum(d.values())`` to the
    task loss. Reading clears the records (``clear=True``), so a loss is never counted twice and no
    autograd graph is kept alive beyond the step.
    """
    totals: dict[str, Tensor] = {}
    for _, layer in _routed_layers(model):
        for name, value in layer.last_aux_losses.items():
            totals[name] = totals[name] + value if name in totals else value
        if clear:
            layer.last_aux_losses = {}
    return totals


def routing_stats(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Routing statistics of the last forward pass: ``{layer_name: {stat: tensor}}``.

    Per layer: ``expert_load [E]`` (share of the computed assignments per expert), ``dropped_fraction``
    (assignments dropped by capacity), ``unrouted_fraction`` (tokens no expert computed),
    ``router_entropy`` (mean per-token entropy, nats), per modality when modality ids were given
    (``expert_load_per_modality [M, E]``, ``unrouted_fraction_per_modality``,
    ``router_entropy_per_modality``), and the unweighted losses ``loss/<name>``.
    """
    return {name: dict(layer.last_routing_stats) for name, layer in _routed_layers(model) if layer.last_routing_stats}
