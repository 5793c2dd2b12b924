"""Mixtures of LoRA experts: parameter-efficient tuning of a frozen model with several low-rank deltas per layer.

A chosen ``nn.Linear`` ``y = W x + b`` (frozen) becomes

    y(x) = W x + b + s * sum_e g_e(x) B_e A_e dropout(x)          (A_e [r, in], B_e [out, r], s = alpha / r)

with ``E`` LoRA experts (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large Language Models") and gates ``g(x)``
from a mome router (:class:`~mome.layers.TopKRouter`) over the layer's input:

- ``routing="token"``: sparse top-k per token, ``g(x_t) = topk(softmax(W_r x_t))`` (renormalised over the ``k``
  chosen experts by default), as LLaVA-MoLE (Chen et al. 2024, "LLaVA-MoLE: Sparse Mixture of LoRA Experts for
  Mitigating Data Conflicts in Instruction Finetuning MLLMs") and MixLoRA (Li et al. 2024) put in the FFN;
- ``routing="soft"``: every expert per token, ``g(x_t) = softmax(W_r x_t)``: MoLoRA's soft merging (Zadouri et al.
  2023, "Pushing Mixture of Experts to the Limit: Extremely Parameter Efficient MoE for Instruction Tuning",
  ``y = sum_i softmax(W x)_i E_i(x)``), the dense per-token mixture of low-rank experts of Omni-SMoLA (Wu et al.
  2024, "Omni-SMoLA: Boosting Generalist Multimodal Models with Soft Mixture of Low-rank Experts"); Omni-SMoLA's
  slot dispatch is ``routing="slots"``;
- ``routing="slots"``: Omni-SMoLA's Soft MoE of low-rank experts (Puigcerver et al. 2023's slot dispatch, as
  :class:`~mome.layers.SoftMoE`): each of the ``E P`` slots of a sample is a convex combination of its tokens
  (``D = softmax_m(logits)``), expert ``e`` computes ``s B_e A_e`` of its ``P`` slots, and each token takes a convex
  combination of the slot outputs (``C = softmax_s(logits)``), ``logits = scale <x_hat, mu_hat>``;
- ``routing="instance"``: one routing per sample, ``g(x_b) = topk(softmax(W_r mean_m x_{b,m}))`` for every token
  ``m`` of sample ``b`` (MoCLE, Gou et al. 2023, "Mixture of Cluster-conditional LoRA Experts for Vision-language
  Instruction Tuning", routes each instruction by its cluster; here the router reads the layer input pooled over
  the sample's tokens). A fixed routing makes the delta one dense matrix ``s sum_e g_e B_e A_e``, so
  :func:`merge_lora_experts` folds it into ``W``.

The ``E`` experts are stacked (``lora_A [E, r, in]``, ``lora_B [E, out, r]``) and computed as one LoRA of rank
``E r`` whose hidden units are scaled by the gates: ``h = x A_all^T`` (``[T, E r]``), ``h_{t,(e,j)} *= g_e(x_t)``,
``delta = s h B_all^T``. This is exact for any gates (an expert with ``g_e = 0`` contributes 0) and costs about one
LoRA of rank ``E r`` (``tools/bench.py --only lora_experts``, ``docs/peft.md``).

What comes from the ``peft`` library (imported only where used: it imports transformers): the target-module
matching (``peft.tuners.tuners_utils.check_target_module_exists``: a list of names matches a module whose name is one
of them or ends with ``.<name>``, a string is a full-match regex; ``exclude_modules``, ``layers_to_transform`` and
``layers_pattern`` as in ``peft.LoraConfig``), LoRA's initialisation (``A`` Kaiming-uniform with ``a = sqrt(5)``,
``B = 0``, ``s = alpha / r`` or rsLoRA's ``alpha / sqrt(r)``, as ``peft.tuners.lora.LoraLayer.reset_lora_parameters``),
and the adapter folder layout (``adapter_config.json`` + ``adapter_model.safetensors`` with keys under
``base_model.model.``, peft's ``CONFIG_NAME``/``SAFETENSORS_WEIGHTS_NAME``). peft has no token- or instance-routed
mixture of LoRA experts (X-LoRA scales whole adapters per layer with its own classifier and needs a transformers
model), so the layer, the routing, the merge and the loading are mome's; the folder is read by
:func:`load_lora_experts`, not by ``peft.PeftModel`` (its ``peft_type`` is mome's).

LoRA on the experts themselves (``LoRAExpertsConfig.target_experts``): each expert of mome's stacked expert FFNs
(:class:`~mome.layers.Experts`) gets its own LoRA on ``w_in [E, H', D]`` and ``w_out [E, D, H]``,
``w[e] + s B[e] A[e]`` (:class:`LoRAStackedExperts`), so the MoE's own routing decides which tokens each delta
acts on. peft 0.21's ``target_parameters`` (``ParamWrapper``) adapts 3-D expert parameters too, but it replaces
the experts module by a wrapper that forwards no attribute, which mome's MoE layer reads (``experts.dim``).

Each :class:`LoRAExpertsLinear` is a :class:`~mome.layers.RoutedLayer`: its aux losses and routing statistics are
recorded by :func:`mome.layers.record_routing` (the code of every token-choice MoE layer) and gathered by
:func:`mome.aux_losses` / :func:`mome.routing_stats`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checkpoint import load_state_exactly
from ._checks import check_choice, check_finite, check_finite_positive, check_int, check_probability, check_top_k
from ._errors import (
    CheckpointMismatchError,
    InvalidArgumentError,
    UnsupportedModelError,
    UnsupportedOptionError,
)
from .layers.experts import Experts, dense, is_quantized
from .layers.moe import AUX_LOSSES, RoutedLayer, recomputing, record_routing
from .layers.routers import Routing, TopKRouter
from .layers.soft_moe import soft_routing_statistics, soft_routing_weights

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "ROUTINGS",
    "LoRAExpertsConfig",
    "LoRAExpertsLinear",
    "LoRAStackedExperts",
    "add_lora_experts",
    "adapter_layers",
    "adapter_state_dict",
    "base_state_dict",
    "discarded_modules",
    "has_lora_experts",
    "load_base_state_dict",
    "load_lora_experts",
    "lora_experts_layers",
    "mark_only_adapters_trainable",
    "merge_lora_experts",
    "save_lora_experts",
    "unload_lora_experts",
    "without_lora_experts",
]

#: The routings of :class:`LoRAExpertsConfig` (see the module docstring).
ROUTINGS = ("token", "instance", "soft", "slots")
#: Routings that mix the tokens of a sample (refused in a causal LM unless allowed).
_SAMPLE_ROUTINGS = ("instance", "slots")
#: peft's adapter file names (``peft.utils.CONFIG_NAME``, ``peft.utils.SAFETENSORS_WEIGHTS_NAME``).
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: The prefix peft's ``save_pretrained`` gives every adapter key (the ``PeftModel.base_model.model`` path).
KEY_PREFIX = "base_model.model."
#: ``peft_type`` of the saved config: a method peft does not know (its loaders refuse it rather than misread it).
PEFT_TYPE = "MOME_LORA_EXPERTS"
_OWNER = "add_lora_experts"
_WITH_ADAPTERS = "a model with LoRA experts (add_lora_experts)"


@dataclass
class LoRAExpertsConfig:
    """What :func:`add_lora_experts` puts where; saved as ``adapter_config.json``.

    Args:
        target_modules: the ``nn.Linear`` layers to adapt, with ``peft.LoraConfig``'s semantics: a list of names
            (a layer whose name is one of them or ends with ``.<name>``, e.g. ``["qkv", "fc1"]``) or one regex that
            must match the whole name (``r"blocks\\.[02]\\.mlp\\.fc\\d"``). Each pattern must match a layer.
        r: rank of each expert.
        num_experts: ``E``.
        top_k: experts per token (``token``) or per sample (``instance``), default ``min(2, E)``; ``soft`` mixes
            all ``E`` and takes no ``top_k``.
        routing: ``"token"``, ``"instance"``, ``"soft"`` or ``"slots"`` (see the module docstring).
        slots_per_expert: ``P`` of ``routing="slots"``.
        lora_alpha: ``alpha``; the delta is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
        lora_dropout: dropout on the input of the experts (not of the frozen layer), as peft's ``lora_dropout``.
        use_rslora: rank-stabilised scaling (Kalajdzievski 2023).
        init_lora_weights: True: ``B = 0`` so the adapted model starts as the base model (peft's default); False:
            ``B`` Kaiming-uniform too (a non-zero delta from the start, e.g. for tests).
        renormalize: renormalise the top-k gates to sum to 1 (Mixtral, LLaVA-MoLE); ``soft`` gates are the
            softmax over all experts, which sums to 1 either way.
        aux_loss_weights: ``{name: weight}`` of :data:`mome.layers.AUX_LOSSES` (e.g. ``{"load_balance": 0.01}``).
        exclude_modules, layers_to_transform, layers_pattern: as in ``peft.LoraConfig``.
        target_experts: mome's stacked expert FFNs (:class:`~mome.layers.Experts`, ``w_in [E, H', D]``,
            ``w_out [E, D, H]``) to give one LoRA per expert (:class:`LoRAStackedExperts`), patterns as
            ``target_modules`` (e.g. ``["experts"]``); rank ``r``, scaling as above, no router (the MoE routes),
            no dropout (the delta is added to the weights, as peft's ``target_parameters``). One of
            ``target_modules`` and ``target_experts`` is needed.
    """

    target_modules: str | list[str] | None = None
    r: int = 8
    num_experts: int = 4
    top_k: int | None = None
    routing: str = "token"
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool = True
    renormalize: bool = True
    aux_loss_weights: dict[str, float] = field(default_factory=dict)
    slots_per_expert: int = 1
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    target_experts: str | list[str] | None = None

    # Read by peft's check_target_module_exists (LoraConfig fields this config does not use).
    target_parameters = None
    modules_to_save = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.target_modules is None and self.target_experts is None:
            expected = "target_modules (linear layers) or target_experts (stacked experts) given"
            raise InvalidArgumentError("target_modules", expected, None, owner)
        for name in ("target_modules", "target_experts"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                if not value or not all(isinstance(t, str) and t for t in value):
                    raise InvalidArgumentError(name, "a non-empty list of names", value, owner)
                setattr(self, name, list(value))
            elif value is not None and (not isinstance(value, str) or not value):
                raise InvalidArgumentError(name, "a list of layer names or a regex string", value, owner)
        if self.target_experts is not None and self.lora_dropout:
            reason = "the experts' LoRA deltas are added to their stacked weights, so no dropout of x applies"
            raise UnsupportedOptionError("lora_dropout", owner, reason, self.lora_dropout)
        check_int("r", self.r, owner=owner)
        check_int("num_experts", self.num_experts, owner=owner)
        check_choice("routing", self.routing, ROUTINGS, owner=owner)
        check_int("slots_per_expert", self.slots_per_expert, owner=owner)
        if self.routing != "slots" and self.slots_per_expert != 1:
            reason = "only routing='slots' has slots"
            raise UnsupportedOptionError("slots_per_expert", owner, reason, self.slots_per_expert)
        if self.routing == "slots" and self.aux_loss_weights:
            reason = "slot routing is soft and balanced by its dispatch (Soft MoE has no aux loss)"
            raise UnsupportedOptionError("aux_loss_weights", owner, reason, self.aux_loss_weights)
        if self.routing in ("soft", "slots"):
            if self.top_k is not None:
                reason = f"routing={self.routing!r} mixes every expert"
                raise UnsupportedOptionError("top_k", owner, reason, self.top_k)
        else:
            self.top_k = min(2, self.num_experts) if self.top_k is None else self.top_k
            check_top_k(self.top_k, self.num_experts, owner=owner)
        check_finite_positive("lora_alpha", self.lora_alpha, owner=owner)
        check_probability("lora_dropout", self.lora_dropout, owner=owner)
        for name in ("use_rslora", "init_lora_weights", "renormalize"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidArgumentError(name, "True or False", getattr(self, name), owner)
        if not isinstance(self.aux_loss_weights, Mapping):
            raise InvalidArgumentError("aux_loss_weights", "a mapping {name: weight}", self.aux_loss_weights, owner)
        self.aux_loss_weights = dict(self.aux_loss_weights)
        unknown = sorted(set(self.aux_loss_weights) - set(AUX_LOSSES))
        if unknown:
            raise InvalidArgumentError("aux_loss_weights", f"names in {list(AUX_LOSSES)}", unknown, owner)
        if self.routing == "instance" and "sequence_balance" in self.aux_loss_weights:
            reason = "instance routing routes whole samples, there is no sequence of choices to balance"
            raise UnsupportedOptionError("aux_loss_weights", owner, reason, self.aux_loss_weights)
        for name, weight in self.aux_loss_weights.items():
            check_finite(f"aux_loss_weights[{name!r}]", weight, minimum=0, owner=owner)

    @property
    def router_top_k(self) -> int:
        """The router's ``k``: ``top_k``, or ``E`` for ``soft``."""
        return self.num_experts if self.routing in ("soft", "slots") else int(self.top_k)

    @property
    def scaling(self) -> float:
        """``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": PEFT_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "adapter config") -> LoRAExpertsConfig:
        """The config of a saved ``adapter_config.json`` (its ``peft_type`` must be mome's)."""
        values = dict(values)
        peft_type = values.pop("peft_type", None)
        if peft_type != PEFT_TYPE:
            raise CheckpointMismatchError(f"{source}: peft_type {peft_type!r} is not a mome LoRA-experts adapter")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CheckpointMismatchError(f"{source}: unknown fields {unknown} (known: {sorted(known)})")
        return cls(**values)


class SlotRouter(nn.Module):
    """The slot keys ``mu [in, S]`` (lecun-normal) and the learned ``scale`` of Soft MoE's logits, as
    :class:`~mome.layers.SoftMoE` holds them, for ``routing="slots"``."""

    def __init__(self, dim: int, num_slots: int) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.randn(dim, num_slots) / math.sqrt(dim))
        self.scale = nn.Parameter(torch.ones(()))


def _init_kaiming(weight: Tensor) -> None:
    """LoRA's ``A`` init (peft ``reset_lora_parameters``: ``kaiming_uniform_(a=sqrt(5))``), per expert."""
    for matrix in weight:
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))


class LoRAExpertsLinear(RoutedLayer):
    """A frozen ``nn.Linear`` plus a routed mixture of ``E`` LoRA experts (see the module docstring).

    Parameters: ``base_layer`` (the wrapped ``nn.Linear``, as peft names it), ``lora_A [E, r, in]``,
    ``lora_B [E, out, r]`` and ``router`` (a :class:`~mome.layers.TopKRouter` over ``in`` features).
    ``last_gates`` holds the gates of the last forward (``[B, E]`` per sample for ``instance``, ``[T, E]`` per
    token otherwise), detached.

    Args:
        base_layer: the ``nn.Linear`` to adapt.
        config: a :class:`LoRAExpertsConfig`.
        name: the layer's name in its model (named in errors).
    """

    def __init__(self, base_layer: nn.Linear, config: LoRAExpertsConfig, name: str = "") -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise UnsupportedModelError(
                f"{_OWNER}: {name or 'the layer'} is a {type(base_layer).__name__}; LoRA experts adapt nn.Linear layers"
            )
        in_features, out_features = base_layer.in_features, base_layer.out_features
        if config.r > min(in_features, out_features):
            expected = f"at most min(in_features, out_features)={min(in_features, out_features)} for layer {name!r}"
            raise InvalidArgumentError("r", expected, config.r, _OWNER)
        self.base_layer = base_layer
        self.layer_name = name
        self.config = config
        self.routing = config.routing
        self.num_experts, self.rank, self.scaling = config.num_experts, config.r, config.scaling
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(config.num_experts, config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(config.num_experts, out_features, config.r, **factory))
        _init_kaiming(self.lora_A.data)
        if not config.init_lora_weights:
            _init_kaiming(self.lora_B.data)
        if config.routing == "slots":  # Soft MoE's slot keys and scale (mome.layers.SoftMoE's init)
            self.router = SlotRouter(in_features, config.num_experts * config.slots_per_expert).to(**factory)
        else:
            renormalize = config.renormalize and config.routing != "soft"
            self.router = TopKRouter(in_features, config.num_experts, config.router_top_k, renormalize=renormalize)
            self.router.to(**factory)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        # What record_routing reads (the attributes of every token-choice layer).
        self.aux_loss_weights = dict(config.aux_loss_weights)
        self.num_modalities = 1
        self.global_entropy_threshold = None
        self.last_gates: Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:  # code that reads ``layer.weight`` (dtype, device) keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        k = "all" if self.routing in ("soft", "slots") else self.router.top_k
        return f"routing={self.routing!r}, num_experts={self.num_experts}, r={self.rank}, top_k={k}"

    def route(self, x: Tensor) -> tuple[Routing, Tensor]:
        """``(routing, gates [T, E])`` of the tokens of ``x [..., in]``; for ``instance`` the routing is of the
        samples (``x [B, M, in]`` pooled over ``M``; ``[M, in]`` is one sample) and each sample's gates repeat
        over its tokens."""
        if self.routing == "instance":
            samples = x.reshape(-1, *x.shape[-2:]) if x.dim() >= 2 else x.reshape(1, 1, -1)  # [B, M, in]
            pooled = samples.sum(dim=1) / max(samples.shape[1], 1)  # [B, in]
            routing = self.router(pooled)
            gates = _gates(routing)  # [B, E]
            self.last_gates = gates.detach()
            return routing, gates.repeat_interleave(samples.shape[1], dim=0)  # [B*M, E]
        routing = self.router(x.reshape(-1, x.shape[-1]))
        gates = _gates(routing)  # [T, E]
        self.last_gates = gates.detach()
        return routing, gates

    def delta(self, tokens: Tensor, gates: Tensor) -> Tensor:
        """``s sum_e g_e B_e A_e dropout(x)`` for ``tokens [T, in]`` and ``gates [T, E]``: one rank-``E r``
        product whose hidden units are scaled by their expert's gate."""
        num_tokens, (num_experts, rank) = tokens.shape[0], self.lora_A.shape[:2]
        hidden = F.linear(self.dropout(tokens), self.lora_A.reshape(num_experts * rank, -1))  # [T, E*r]
        hidden = (hidden.view(num_tokens, num_experts, rank) * gates.to(hidden.dtype).unsqueeze(-1)).view(
            num_tokens, num_experts * rank
        )  # [T, E*r], expert-major
        b_all = self.lora_B.permute(1, 0, 2).reshape(self.out_features, num_experts * rank)  # [out, E*r]
        return F.linear(hidden, b_all) * self.scaling  # [T, out]

    def slot_delta(self, x: Tensor) -> Tensor:
        """Omni-SMoLA's delta for ``x [..., M, in]`` (``[M, in]``: one sample): the ``E P`` slots of each sample,
        ``slots = D^T dropout(x)``, expert ``e`` on its ``P`` slots, ``delta = C (s B_e A_e slots)`` ``[..., M, out]``.
        ``last_gates [B, E]``: each sample's mean combine weight per expert (the share of its output from each)."""
        samples = x.reshape(-1, *x.shape[-2:])  # [B, M, in]
        batch, tokens, _ = samples.shape
        num_experts, slots_per_expert = self.num_experts, self.config.slots_per_expert
        dispatch, combine = soft_routing_weights(samples, self.router.mu, self.router.scale)  # [B, M, E*P] each
        slots = torch.einsum("bms,bmi->bsi", dispatch, self.dropout(samples))  # [B, E*P, in]
        slots = slots.view(batch, num_experts, slots_per_expert, -1)
        hidden = torch.einsum("bepi,eri->bepr", slots, self.lora_A)  # [B, E, P, r]
        outputs = torch.einsum("bepr,eor->bepo", hidden, self.lora_B).reshape(batch, num_experts * slots_per_expert, -1)
        delta = torch.einsum("bms,bso->bmo", combine, outputs) * self.scaling  # [B, M, out]
        with torch.no_grad():
            share = combine.float().view(batch, tokens, num_experts, slots_per_expert).sum(-1)  # [B, M, E]
            self.last_gates = share.mean(dim=1)  # [B, E]
        if not recomputing():
            self.last_aux_losses = {}
            weights = dispatch.detach(), combine.detach()
            self.defer_routing_stats(lambda: soft_routing_statistics(*weights, num_experts))
        return delta.view(*x.shape[:-1], -1)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., in] -> [..., out]``: the frozen layer plus the gated experts' deltas."""
        out = self.base_layer(x)
        if self.routing == "slots":
            return out + self.slot_delta(x).to(out.dtype)
        routing, gates = self.route(x)
        delta = self.delta(x.reshape(-1, x.shape[-1]), gates)  # [T, out]
        sequence_length = x.shape[-2] if x.dim() >= 3 and self.routing != "instance" else None
        record_routing(self, routing, (~routing.dropped).sum(), 1, sequence_length)
        return out + delta.view(*x.shape[:-1], self.out_features).to(out.dtype)

    def merged_linear(self, gates: Tensor) -> nn.Linear:
        """An ``nn.Linear`` computing this layer for inputs routed to ``gates [E]``:
        ``W + s sum_e g_e B_e A_e`` and the same bias (``routing="instance"`` only)."""
        if self.routing != "instance":
            reason = (
                f"routing={self.routing!r} gives each token its own mixture of experts, which no single dense "
                "weight computes; only routing='instance' merges"
            )
            raise UnsupportedOptionError("merge", self.layer_name or type(self).__name__, reason, self.routing)
        if not isinstance(gates, Tensor) or tuple(gates.shape) != (self.num_experts,):
            expected = f"a [{self.num_experts}] tensor of expert gates"
            got = tuple(gates.shape) if isinstance(gates, Tensor) else gates
            raise InvalidArgumentError("gates", expected, got, f"merge_lora_experts({self.layer_name!r})")
        base = self.base_layer
        with torch.no_grad():
            delta = torch.einsum("e,eor,eri->oi", gates.to(self.lora_A.dtype), self.lora_B, self.lora_A)  # [out, in]
            merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None)
            merged.to(device=base.weight.device, dtype=base.weight.dtype)
            merged.weight.copy_(base.weight + self.scaling * delta.to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        merged.requires_grad_(base.weight.requires_grad)
        return merged


class LoRAStackedExperts(Experts):
    """mome's stacked expert FFNs (:class:`~mome.layers.Experts`, frozen) plus one LoRA per expert on each stacked
    weight: ``w_in[e] + s B_in[e] A_in[e]`` and ``w_out[e] + s B_out[e] A_out[e]`` (``A [E, r, in]``,
    ``B [E, out, r]``), so expert ``e``'s delta acts only on the tokens routed to ``e``, whatever the dispatch.

    The adapted weights are what :attr:`w_in` / :attr:`w_out` return, and every dispatch path of
    :class:`~mome.layers.Experts` (``sorted`` grouped matmul, ``buffers`` bmm, sharded slots) reads its weights
    through them (:meth:`~mome.layers.Experts.dense_weights`), so each path computes the adapted experts; the
    frozen stack is ``base_layer`` (quantized weights are dequantized first: a QLoRA of the experts). Every other
    attribute (``num_experts``, ``b_in``, ``act``, ...) is the base layer's.

    Parameters: ``base_layer``, ``lora_A.w_in``, ``lora_B.w_in``, ``lora_A.w_out``, ``lora_B.w_out``.
    """

    PARAMETERS = ("w_in", "w_out")

    def __init__(self, base_layer: Experts, config: LoRAExpertsConfig, name: str = "") -> None:
        nn.Module.__init__(self)  # the weights are base_layer's, not new ones
        if type(base_layer) is not Experts:
            raise UnsupportedModelError(
                f"{_OWNER}: {name or 'the module'} is a {type(base_layer).__name__}; target_experts adapts "
                "mome.layers.Experts (stacked expert FFNs)"
            )
        for param in self.PARAMETERS:
            shape = tuple(getattr(base_layer, param).shape)
            if config.r > min(shape[1:]):
                expected = f"at most min(out, in)={min(shape[1:])} for {name!r}.{param} of shape {shape}"
                raise InvalidArgumentError("r", expected, config.r, _OWNER)
        self.base_layer = base_layer
        self.layer_name = name
        self.config = config
        self.rank, self.scaling = config.r, config.scaling
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for param in self.PARAMETERS:
            weight = dense(getattr(base_layer, param))
            num_experts, out_features, in_features = weight.shape
            factory = {"device": weight.device, "dtype": weight.dtype}
            self.lora_A[param] = nn.Parameter(torch.empty(num_experts, config.r, in_features, **factory))
            self.lora_B[param] = nn.Parameter(torch.zeros(num_experts, out_features, config.r, **factory))
            _init_kaiming(self.lora_A[param].data)
            if not config.init_lora_weights:
                _init_kaiming(self.lora_B[param].data)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # own parameters and submodules
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def delta(self, param: str) -> Tensor:
        """``s B[e] A[e]`` of every expert: ``[E, out, in]``."""
        return torch.bmm(self.lora_B[param], self.lora_A[param]) * self.scaling

    def _adapted(self, param: str) -> Tensor:
        weight = dense(getattr(self.base_layer, param))
        return weight + self.delta(param).to(weight.dtype)

    @property
    def w_in(self) -> Tensor:  # type: ignore[override]
        return self._adapted("w_in")

    @property
    def w_out(self) -> Tensor:  # type: ignore[override]
        return self._adapted("w_out")

    def extra_repr(self) -> str:
        return f"r={self.rank}, scaling={self.scaling:g}, parameters={list(self.PARAMETERS)}"

    def merged_experts(self) -> Experts:
        """The base :class:`~mome.layers.Experts` with ``w + s B A`` written into its (float) stacked weights, in
        place (:func:`merge_lora_experts`)."""
        base = self.base_layer
        with torch.no_grad():
            for param in self.PARAMETERS:
                getattr(base, param).add_(self.delta(param).to(getattr(base, param).dtype))
        return base


_ADAPTERS = (LoRAExpertsLinear, LoRAStackedExperts)


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every adapter of ``model``: the routed LoRA experts of linear layers
    (:class:`LoRAExpertsLinear`) and the per-expert LoRA of stacked experts (:class:`LoRAStackedExperts`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _ADAPTERS)}


def _gates(routing: Routing) -> Tensor:
    """``[T, E]`` gates: each token's combine weights at its chosen experts, 0 elsewhere."""
    weights = routing.combine_weights.masked_fill(routing.dropped, 0.0)
    return torch.zeros_like(routing.router_probs).scatter(1, routing.expert_index, weights.to(routing.router_probs))


def lora_experts_layers(model: nn.Module) -> dict[str, LoRAExpertsLinear]:
    """``{name: layer}`` of every :class:`LoRAExpertsLinear` of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAExpertsLinear)}


def has_lora_experts(model: nn.Module) -> bool:
    """Whether ``model`` has adapters of :func:`add_lora_experts` (on linear layers or on stacked experts)."""
    return any(isinstance(m, _ADAPTERS) for m in model.modules())


def _check_causal(model: nn.Module, config: LoRAExpertsConfig, allow_noncausal: bool) -> None:
    """Instance routing pools a sample's tokens, later ones included: refused in a causal LM unless allowed."""
    from .layers.routers import CausalRoutingError

    generates = callable(getattr(model, "can_generate", None)) and model.can_generate()
    if config.routing in _SAMPLE_ROUTINGS and generates and not allow_noncausal:
        raise CausalRoutingError(
            f"routing={config.routing!r} in {type(model).__name__} (a causal LM) mixes every token of a sample, later "
            "ones included, into the output of each position (and generation sees only the tokens so far); use "
            "routing='token', or allow_noncausal=True to accept it"
        )


def discarded_modules(model: nn.Module) -> list[str]:
    """Names of the submodules whose output ``model`` computes and discards, where the model says so: in a
    transformers LLaVA-style VLM (``config.vision_feature_layer``, an index or a list of indices into the vision
    tower's hidden states), the vision encoder layers after the deepest selected hidden state (LLaVA's default
    ``-2`` takes the penultimate layer's output, so the last layer feeds nothing). An adapter there would get no
    gradient from the task loss, only from its own router's aux loss."""
    selected = getattr(getattr(model, "config", None), "vision_feature_layer", None)
    if selected is None:
        return []
    selected = [selected] if isinstance(selected, int) else [int(i) for i in selected]
    for name, module in model.named_modules():
        if name.rpartition(".")[2] != "vision_tower":
            continue
        for sub, layers in module.named_modules(prefix=name):
            if sub.endswith("encoder.layers") and isinstance(layers, nn.ModuleList):
                # hidden_states[0] is the embeddings, hidden_states[i] the output of layers[i - 1]
                deepest = max(i % (len(layers) + 1) for i in selected)
                return [f"{sub}.{i}" for i in range(deepest, len(layers))]
    return []


def _matches(config: Any, name: str) -> bool:
    from peft.tuners.tuners_utils import check_target_module_exists  # imports transformers: only here

    return bool(check_target_module_exists(config, name))


def add_lora_experts(
    model: nn.Module, config: LoRAExpertsConfig, *, freeze_base: bool = True, allow_noncausal: bool = False
) -> list[str]:
    """Replace each ``nn.Linear`` of ``model`` that ``config.target_modules`` matches by a
    :class:`LoRAExpertsLinear` (in place, as ``peft.inject_adapter_in_model`` does); return their names.

    With ``freeze_base`` every parameter but the experts' and their routers' stops requiring gradients
    (:func:`mark_only_adapters_trainable`). ``allow_noncausal``: accept ``routing="instance"`` in a causal LM.
    Matched layers inside :func:`discarded_modules` (e.g. the last vision layer of a LLaVA that reads the
    penultimate one) get no experts, with a ``UserWarning`` naming them: their output reaches no loss.

    Raises:
        InvalidArgumentError: a target pattern that matches no layer (named), or only layers whose output the model
            discards; ``r`` larger than a matched layer's ``min(in, out)`` (the layer named); a model that already
            has LoRA experts.
        UnsupportedModelError: a pattern that matches a module that is not an ``nn.Linear`` and no linear layer.
        CausalRoutingError: instance routing in a causal LM without ``allow_noncausal``.
    """
    if not isinstance(config, LoRAExpertsConfig):
        raise InvalidArgumentError("config", "a LoRAExpertsConfig", type(config).__name__, _OWNER)
    if has_lora_experts(model):
        raise InvalidArgumentError("model", "a model without LoRA experts (one adapter per model)", "has some", _OWNER)
    _check_causal(model, config, allow_noncausal)
    named = list(model.named_modules())
    discarded = discarded_modules(model)
    targets, skipped = _targets(model, named, config, "target_modules", discarded)
    expert_targets, skipped_experts = _targets(model, named, config, "target_experts", discarded)
    if skipped or skipped_experts:
        warnings.warn(
            f"{_OWNER}: no LoRA experts on {skipped + skipped_experts}: {type(model).__name__} discards their output "
            f"(discarded_modules: {discarded})",
            UserWarning,
            stacklevel=2,
        )
    modules = dict(named)
    for name in targets:  # checked before any layer is replaced: a bad rank leaves the model as it was
        base = modules[name]
        if config.r > min(base.in_features, base.out_features):
            expected = f"at most min(in_features, out_features)={min(base.in_features, base.out_features)} for {name!r}"
            raise InvalidArgumentError("r", expected, config.r, _OWNER)
    adapters = {name: LoRAStackedExperts(modules[name], config, name) for name in expert_targets}  # checks r too
    adapters.update({name: LoRAExpertsLinear(modules[name], config, name) for name in targets})
    for name, adapter in adapters.items():
        _replace(model, name, adapter)
    model.lora_experts_config = config
    if freeze_base:
        mark_only_adapters_trainable(model)
    return sorted(adapters)


def _targets(
    model: nn.Module, named: list[tuple[str, nn.Module]], config: LoRAExpertsConfig, field: str, discarded: list[str]
) -> tuple[list[str], list[str]]:
    """``(targets, skipped)``: the modules the patterns of ``config.<field>`` match (``nn.Linear`` layers for
    ``target_modules``, :class:`~mome.layers.Experts` for ``target_experts``), and those of them skipped because
    ``model`` discards their output. Each pattern must match one: a typo would adapt nothing in silence."""
    value = getattr(config, field)
    if value is None:
        return [], []
    kind, kind_name = (nn.Linear, "an nn.Linear layer") if field == "target_modules" else (Experts, "an Experts module")
    targets: list[str] = []
    skipped: list[str] = []
    for pattern in value if isinstance(value, list) else [value]:
        single = replace(config, target_modules=[pattern] if isinstance(value, list) else pattern, target_experts=None)
        matched = [(name, module) for name, module in named if name and _matches(single, name)]
        found = [name for name, module in matched if type(module) is kind]
        unused = [name for name in found if any(name.startswith(f"{d}.") for d in discarded)]
        if found and len(unused) == len(found):
            expected = f"a pattern matching a layer whose output {type(model).__name__} uses (not only {unused[:3]})"
            raise InvalidArgumentError(field, expected, pattern, _OWNER)
        skipped += [name for name in unused if name not in skipped]
        found = [name for name in found if name not in unused]
        if not found:
            examples = [name for name, module in named if type(module) is kind][:4]
            if matched:
                raise UnsupportedModelError(
                    f"{_OWNER}: {field} pattern {pattern!r} matches {matched[0][0]!r} "
                    f"({type(matched[0][1]).__name__}), not {kind_name} ({kind.__name__} modules: {examples}, ...)"
                )
            expected = f"a pattern matching {kind_name} of {type(model).__name__} (e.g. {examples})"
            raise InvalidArgumentError(field, expected, pattern, _OWNER)
        targets += [name for name in found if name not in targets]
    return targets, skipped


def mark_only_adapters_trainable(model: nn.Module) -> list[str]:
    """Make the experts and routers of the LoRA-experts layers the only parameters that require gradients
    (peft's ``_mark_only_adapters_as_trainable``); returns their names."""
    adapters = adapter_layers(model)
    if not adapters:
        raise InvalidArgumentError("model", _WITH_ADAPTERS, "none", "mark_only_adapters_trainable")
    model.requires_grad_(False)
    names = []
    for layer_name, layer in adapters.items():
        for name, param in layer.named_parameters():
            if not name.startswith("base_layer."):
                param.requires_grad_(True)
                names.append(f"{layer_name}.{name}")
    return names


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors only (``<layer>.lora_A``, ``<layer>.lora_B``, ``<layer>.router.proj.weight``)."""
    state = {}
    for layer_name, layer in adapter_layers(model).items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base_layer."):
                state[f"{layer_name}.{key}"] = value
    return state


def base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict the model had before :func:`add_lora_experts` (``<layer>.base_layer.w`` named ``<layer>.w``,
    no adapter tensors): what the base architecture loads."""
    layers = adapter_layers(model)
    state = {}
    for key, value in model.state_dict().items():
        owner = next((name for name in layers if key.startswith(f"{name}.")), None)
        if owner is None:
            state[key] = value
        elif key.startswith(f"{owner}.base_layer."):
            state[f"{owner}." + key.removeprefix(f"{owner}.base_layer.")] = value
    return state


def load_base_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load the base architecture's ``state`` (keys as :func:`base_state_dict` gives them) into a model with LoRA
    experts, exactly (:func:`mome._checkpoint.load_state_exactly`); the adapters keep their values."""
    layers = adapter_layers(model)
    mapped = dict(adapter_state_dict(model))
    for key, value in state.items():
        owner = next((name for name in layers if key.startswith(f"{name}.")), None)
        mapped[key if owner is None else f"{owner}.base_layer." + key.removeprefix(f"{owner}.")] = value
    load_state_exactly(model, mapped, source)


@contextmanager
def without_lora_experts(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block each LoRA-experts layer is replaced by its (shared, not copied) base layer: the model is
    its base architecture (e.g. for ``safetensors.torch.save_model``); the layers are put back after it."""
    layers = adapter_layers(model)
    config = getattr(model, "lora_experts_config", None)
    for name, layer in layers.items():
        _replace(model, name, layer.base_layer)
    try:
        yield model
    finally:
        for name, layer in layers.items():
            _replace(model, name, layer)
        if config is not None:
            model.lora_experts_config = config


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def unload_lora_experts(model: nn.Module) -> nn.Module:
    """Drop the adapters: every LoRA-experts layer becomes its base layer again (peft's ``unload``)."""
    for name, layer in adapter_layers(model).items():
        _replace(model, name, layer.base_layer)
    model.__dict__.pop("lora_experts_config", None)
    return model


def merge_lora_experts(model: nn.Module, gates: Tensor | Mapping[str, Tensor] | None = None) -> nn.Module:
    """Fold instance-routed experts into dense weights: each layer becomes ``nn.Linear(W + s sum_e g_e B_e A_e)``;
    and each expert's LoRA of ``target_experts`` into its stacked weights (``w[e] + s B[e] A[e]``, no gates).

    ``gates``: one ``[E]`` tensor for every layer, ``{layer name: [E]}``, or None: the gates each layer gave the
    one sample of its last forward (``last_gates [1, E]``), so the merged model computes what the adapted model
    computed for that sample (e.g. a MoCLE cluster's routing, fixed for its instructions). In place; returns
    ``model``, whose architecture is then the base one.

    Raises:
        UnsupportedOptionError: a layer with ``routing="token"``, ``"soft"`` or ``"slots"`` (each token has its own
            mixture); stacked experts with quantized weights.
        InvalidArgumentError: gates of the wrong shape, or None after a forward of more than one sample (or none).
    """
    if not has_lora_experts(model):
        raise InvalidArgumentError("model", _WITH_ADAPTERS, "none", "merge_lora_experts")
    stacked = {name: m for name, m in adapter_layers(model).items() if isinstance(m, LoRAStackedExperts)}
    for name, layer in stacked.items():  # checked before anything is merged
        for param in layer.PARAMETERS:
            if is_quantized(getattr(layer.base_layer, param)):
                reason = "its stacked weights are quantized; merging would need them quantized again"
                raise UnsupportedOptionError("merge", name, reason, param)
    merged: dict[str, nn.Module] = {}
    for name, layer in lora_experts_layers(model).items():
        if gates is None:
            if layer.routing == "instance" and (layer.last_gates is None or layer.last_gates.shape[0] != 1):
                got = None if layer.last_gates is None else f"gates of {layer.last_gates.shape[0]} samples"
                expected = f"given, or one sample's routing recorded by {name!r} (run a forward of one sample first)"
                raise InvalidArgumentError("gates", expected, got, "merge_lora_experts")
            layer_gates = layer.last_gates[0] if layer.last_gates is not None else None
        elif isinstance(gates, Mapping):
            if name not in gates:
                raise InvalidArgumentError("gates", f"a mapping with an entry for layer {name!r}", sorted(gates), name)
            layer_gates = gates[name]
        else:
            layer_gates = gates
        merged[name] = layer.merged_linear(layer_gates)
    merged.update({name: layer.merged_experts() for name, layer in stacked.items()})
    for name, module in merged.items():
        _replace(model, name, module)
    model.__dict__.pop("lora_experts_config", None)
    return model


def save_lora_experts(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapters only, in peft's layout: ``adapter_config.json`` (the :class:`LoRAExpertsConfig` and
    the adapted layers) and ``adapter_model.safetensors`` (keys ``base_model.model.<layer>.lora_A`` ...)."""
    from safetensors.torch import save_file

    config = getattr(model, "lora_experts_config", None)
    if config is None or not has_lora_experts(model):
        raise InvalidArgumentError("model", _WITH_ADAPTERS, "none", "save_lora_experts")
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {KEY_PREFIX + key: value.detach().contiguous() for key, value in adapter_state_dict(model).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    record = {**config.to_dict(), "adapted_layers": sorted(adapter_layers(model))}
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return directory


def read_adapter_config(directory: str | Path) -> tuple[LoRAExpertsConfig, list[str]]:
    """``(config, adapted layer names)`` of a folder written by :func:`save_lora_experts`."""
    path = Path(directory).expanduser() / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (save_lora_experts writes {ADAPTER_CONFIG_NAME})")
    values = json.loads(path.read_text())
    layers = values.pop("adapted_layers", [])
    return LoRAExpertsConfig.from_dict(values, str(path)), list(layers)


def load_lora_experts(model: nn.Module, directory: str | Path, *, allow_noncausal: bool = False) -> nn.Module:
    """Add the adapters saved in ``directory`` (:func:`save_lora_experts`) to ``model`` and load their weights
    exactly (the same tensors, bit for bit); returns ``model``.

    Raises:
        InvalidArgumentError: the saved target patterns match no layer of ``model`` (the pattern named).
        CheckpointMismatchError: ``model`` is another architecture: the adapted layers or the adapter tensors differ
            (missing and unexpected keys named, or the key whose shape differs with both shapes).
    """
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    config, saved_layers = read_adapter_config(directory)
    source = str(directory / ADAPTER_WEIGHTS_NAME)
    adapted = add_lora_experts(model, config, freeze_base=False, allow_noncausal=allow_noncausal)
    state = {key.removeprefix(KEY_PREFIX): value for key, value in load_file(source).items()}
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if saved_layers and sorted(saved_layers) != adapted:
        extra, lacking = sorted(set(adapted) - set(saved_layers)), sorted(set(saved_layers) - set(adapted))
        unload_lora_experts(model)
        raise CheckpointMismatchError(
            f"{source}: the adapters were saved for other layers: layers without saved adapters {extra[:5]}, "
            f"saved layers not in {type(model).__name__} {lacking[:5]}"
        )
    if missing or unexpected:
        unload_lora_experts(model)
        raise CheckpointMismatchError(
            f"{source}: adapter keys differ from {type(model).__name__}'s: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            unload_lora_experts(model)
            raise CheckpointMismatchError(
                f"{source}: {key} has shape {tuple(value.shape)} in the adapter, "
                f"{tuple(expected[key].shape)} in {type(model).__name__}"
            )
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)
    return model
