"""Modality-aware mixing: tokens carry a modality id ``[B, N]`` (e.g. 0 = image, 1 = text).

- :class:`MultiwayFFN`: VLMo's mixture-of-modality-experts FFN (Bao et al. 2022, "VLMo: Unified
  Vision-Language Pre-Training with Mixture-of-Modality-Experts", arXiv:2111.02358): one FFN (and
  its pre-norm) per modality, picked by the token's modality, plus an optional VL FFN that every
  token goes through in the fusion layers. With ``moe=`` each modality's FFN is a sparse MoE of its
  own (VL-MoE's V-MoE and T-MoE, Shen et al. 2023, arXiv:2303.07226).
- :class:`ModalityMoE`: per-modality pools of routed experts plus always-on shared experts: a
  token of modality ``m`` chooses its top-k among the pool of ``m`` (the Ernie-4.5-VL / Uni-MoE
  pattern; LIMoE's fully shared pool is a :class:`~mome.layers.SparseMoE`).

Both are assembled from the same router, experts and dispatch as every other MoE layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_finite_positive, check_int, check_token_batch
from .._errors import InvalidArgumentError, InvalidInputError, UnsupportedOptionError
from .experts import Experts
from .moe import MoE, RoutedLayer, SparseMoE, layer_dtype, recomputing
from .routers import ModalityRouter, check_modality_ids

__all__ = ["ModalityLayerNorm", "ModalityMoE", "MultiwayFFN"]


class ModalityLayerNorm(nn.Module):
    """LayerNorm whose affine parameters depend on the token's modality: ``[M, D]`` weight and bias."""

    def __init__(self, dim: int, num_modalities: int, eps: float = 1e-6) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("num_modalities", num_modalities, owner=owner)
        check_finite_positive("eps", eps, owner=owner)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, dim))
        self.bias = nn.Parameter(torch.zeros(num_modalities, dim))

    def forward(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        """``x [..., D]``, ``modality_ids`` of ``x.shape[:-1]`` in ``[0, M)`` (both checked) -> ``[..., D]``."""
        owner = type(self).__name__
        check_token_batch("x", x, self.weight.shape[1], owner=owner)
        if modality_ids is None:
            raise InvalidInputError("modality_ids", f"an integer tensor of shape {tuple(x.shape[:-1])}", None, owner)
        ids = check_modality_ids(modality_ids, x.shape[:-1], self.weight.shape[0], owner).view(x.shape[:-1])
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return normed * self.weight[ids] + self.bias[ids]


class MultiwayFFN(nn.Module):
    """VLMo's modality-expert FFN: ``y = FFN_m(LN_m(x))`` for a token of modality ``m``.

    In fusion layers (``use_vl=True``) every token instead goes through the shared VL expert:
    ``y = FFN_vl(LN_vl(x))``. The modality FFNs are an :class:`~mome.layers.MoE` with a
    :class:`~mome.layers.ModalityRouter` (no learned gate, no aux loss), so they share its
    grouped-matmul dispatch and its per-modality statistics.

    Sparse modality experts (``moe={...}``, VL-MoE: Shen et al. 2023, "Scaling Vision-Language Models with
    Sparse Mixture of Experts", arXiv:2303.07226): the FFN of modality ``m`` is a
    :class:`~mome.layers.SparseMoE` of its own, ``sparse[m]`` (V-MoE for image tokens, T-MoE for text tokens),
    run on the ``T_m`` tokens of that modality only:

        y_t = sum_{j<k} G_{m,j}(x_t) FFN_{m, e_j(x_t)}(LN_m(x_t))      for every token t of modality m,

    so each modality's router, capacity ``ceil(T_m k c / E)``, batch priority and importance/load losses see
    that modality's tokens alone. Each layer records its statistics with ``num_modalities = M`` and every token
    of modality ``m`` (``default_modality=m``): its ``expert_load_per_modality`` has one non-zero row, ``m``.
    A modality with no token in the batch computes nothing and records nothing in that pass.

    Args:
        dim: token width.
        hidden_dim: FFN hidden width.
        modalities: modality names; ``modality_ids`` index this list.
        vl_expert: add the shared vision-language FFN (VLMo's top layers).
        norm: give each expert its own pre-LayerNorm (VLMo's ``norm2_text``/``norm2_imag``).
        act_layer: activation.
        moe: None (one dense FFN per modality), or the :class:`~mome.layers.SparseMoE` keyword arguments of
            each modality's sparse FFN (``num_experts``, ``top_k``, ``router``, capacity, BPR, losses), the same
            for every modality; ``num_modalities`` and ``default_modality`` are set per modality, not given.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        modalities: Sequence[str] = ("image", "text"),
        *,
        vl_expert: bool = False,
        norm: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        eps: float = 1e-6,
        moe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("hidden_dim", hidden_dim, owner=owner)
        check_finite_positive("eps", eps, owner=owner)
        names = () if isinstance(modalities, (str, bytes)) else tuple(modalities)
        if not names or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
            raise InvalidArgumentError("modalities", "a non-empty sequence of distinct names", modalities, owner)
        if moe is not None and not isinstance(moe, Mapping):
            raise InvalidArgumentError("moe", "None or a mapping of SparseMoE options", moe, owner)
        for fixed in ("num_modalities", "default_modality", "act_layer"):
            if moe is not None and fixed in moe:
                reason = "MultiwayFFN sets it for each modality's sparse FFN"
                raise UnsupportedOptionError(f"moe[{fixed!r}]", owner, reason, moe[fixed])
        self.modalities = names
        self.dim = dim
        num_modalities = len(self.modalities)
        self.norm = ModalityLayerNorm(dim, num_modalities, eps) if norm else None
        if moe is None:
            self.moe = MoE(
                ModalityRouter(num_modalities),
                Experts(num_modalities, dim, hidden_dim, act_layer=act_layer),
                num_modalities=num_modalities,
            )
            self.sparse = None
        else:
            self.moe = None
            options = {"act_layer": act_layer, "num_modalities": num_modalities, **moe}
            layers = {name: SparseMoE(dim, hidden_dim, default_modality=m, **options) for m, name in enumerate(names)}
            self.sparse = nn.ModuleDict(layers)
        if vl_expert:
            from timm.layers import Mlp

            self.vl_norm = nn.LayerNorm(dim, eps=eps) if norm else nn.Identity()
            self.vl_ffn = Mlp(dim, hidden_dim, act_layer=act_layer)
        else:
            self.vl_norm = self.vl_ffn = None

    def forward(self, x: Tensor, modality_ids: Tensor | None = None, use_vl: bool = False) -> Tensor:
        """``x [B, N, D]``, ``modality_ids [B, N]`` -> ``[B, N, D]``.

        Checks ``x`` (floating, last dim ``D``, the layer's dtype outside autocast) and ``modality_ids`` (required
        unless ``use_vl``; the tokens' shape, integer, in ``[0, len(modalities))``).
        """
        owner = type(self).__name__
        weight = (self.moe or next(iter(self.sparse.values()))).experts.w_in
        check_token_batch(
            "x", x, self.dim, dtype=layer_dtype(x, weight) if isinstance(x, Tensor) else None, owner=owner
        )
        if use_vl:
            if self.vl_ffn is None:
                reason = "this MultiwayFFN was built without vl_expert"
                raise InvalidArgumentError("use_vl", f"False ({reason})", use_vl, owner)
            self._clear_records(self.modalities)  # the modality experts compute nothing in this pass
            return self.vl_ffn(self.vl_norm(x))
        if modality_ids is None:
            expected = f"an integer tensor of the tokens' shape (indices into {self.modalities})"
            raise InvalidInputError("modality_ids", expected, None, owner)
        if self.sparse is None:
            if self.norm is not None:
                x = self.norm(x, modality_ids)  # checks the ids' shape, dtype and range
            return self.moe(x, modality_ids)  # checks them (without a norm)
        # one id per token, in [0, len(modalities))
        ids = check_modality_ids(modality_ids, x.shape[:-1], len(self.modalities), owner)
        if self.norm is not None:
            x = self.norm(x, modality_ids)
        tokens = x.reshape(-1, self.dim)  # [T, D]
        out = torch.zeros_like(tokens)
        for m, name in enumerate(self.modalities):
            index = (ids == m).nonzero().squeeze(1)  # [T_m]: the tokens of modality m
            if index.numel() == 0:
                self._clear_records((name,))
                continue
            out = out.index_copy(0, index, self.sparse[name](tokens.index_select(0, index)))  # [T_m, D] back
        return out.view_as(x)

    def routed_layers(self) -> list[RoutedLayer]:
        """The layers that route tokens: the modality-routed MoE, or one sparse MoE per modality."""
        return [self.moe] if self.sparse is None else list(self.sparse.values())

    def _clear_records(self, names: Sequence[str]) -> None:
        """Forget the statistics and aux losses of the modality layers of ``names`` (they computed nothing in this
        pass); not in a checkpoint's re-run of the forward (:func:`~mome.layers.moe.recomputing`)."""
        if recomputing():
            return
        if self.sparse is None:
            self.moe.last_routing_stats = {}
            return
        for name in names:
            self.sparse[name].last_routing_stats = {}
            self.sparse[name].last_aux_losses = {}


class ModalityMoE(SparseMoE):
    """Routed experts in per-modality pools plus shared experts.

    ``y(x) = sum_{j<k} w_j(x) FFN_{e_j(x)}(x) + FFN_shared(x)`` where a token of modality ``m`` picks
    its top-k among ``pool(m)`` only (the router's softmax is restricted to that pool).

    Args:
        dim: token width.
        hidden_dim: hidden width of each routed expert.
        experts_per_modality: ``{modality_name: number of routed experts}`` (ordered as modality ids),
            or a list of counts.
        top_k: experts per token within its pool.
        num_shared_experts: always-on experts (0 for none).
        **kwargs: further :class:`~mome.layers.SparseMoE` options.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        experts_per_modality: Mapping[str, int] | Sequence[int],
        top_k: int = 1,
        *,
        num_shared_experts: int = 1,
        **kwargs,
    ) -> None:
        if isinstance(experts_per_modality, Mapping):
            counts = list(experts_per_modality.values())
        elif isinstance(experts_per_modality, Sequence) and not isinstance(experts_per_modality, (str, bytes)):
            counts = list(experts_per_modality)
        else:
            counts = []
        if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
            expected = "a positive count of experts per modality (a mapping or a non-empty list)"
            raise InvalidArgumentError("experts_per_modality", expected, experts_per_modality, type(self).__name__)
        pools, start = [], 0
        for count in counts:
            pools.append(list(range(start, start + count)))
            start += count
        super().__init__(
            dim,
            hidden_dim,
            start,
            top_k,
            modality_experts=pools,
            num_shared_experts=num_shared_experts,
            renormalize=kwargs.pop("renormalize", True),
            **kwargs,
        )
        self.modality_names = list(experts_per_modality) if isinstance(experts_per_modality, Mapping) else None
