"""Modality-aware mixing: tokens carry a modality id ``[B, N]`` (e.g. 0 = image, 1 = text).

- :class:`MultiwayFFN`: VLMo's mixture-of-modality-experts FFN (Bao et al. 2022, "VLMo: Unified
  Vision-Language Pre-Training with Mixture-of-Modality-Experts", arXiv:2111.02358): one FFN (and
  its pre-norm) per modality, picked by the token's modality, plus an optional VL FFN that every
  token goes through in the fusion layers.
- :class:`ModalityMoE`: per-modality pools of routed experts plus always-on shared experts: a
  token of modality ``m`` chooses its top-k among the pool of ``m`` (the Ernie-4.5-VL / Uni-MoE
  pattern; LIMoE's fully shared pool is a :class:`~mome.layers.SparseMoE`).

Both are assembled from the same router, experts and dispatch as every other MoE layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_finite_positive, check_int, check_token_batch
from .._errors import InvalidArgumentError, InvalidInputError
from .experts import Experts
from .moe import MoE, SparseMoE, layer_dtype, recomputing
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

    Args:
        dim: token width.
        hidden_dim: FFN hidden width.
        modalities: modality names; ``modality_ids`` index this list.
        vl_expert: add the shared vision-language FFN (VLMo's top layers).
        norm: give each expert its own pre-LayerNorm (VLMo's ``norm2_text``/``norm2_imag``).
        act_layer: activation.
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
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_int("dim", dim, owner=owner)
        check_int("hidden_dim", hidden_dim, owner=owner)
        check_finite_positive("eps", eps, owner=owner)
        names = () if isinstance(modalities, (str, bytes)) else tuple(modalities)
        if not names or not all(isinstance(name, str) for name in names) or len(set(names)) != len(names):
            raise InvalidArgumentError("modalities", "a non-empty sequence of distinct names", modalities, owner)
        self.modalities = names
        num_modalities = len(self.modalities)
        self.norm = ModalityLayerNorm(dim, num_modalities, eps) if norm else None
        self.moe = MoE(
            ModalityRouter(num_modalities),
            Experts(num_modalities, dim, hidden_dim, act_layer=act_layer),
            num_modalities=num_modalities,
        )
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
        dim = self.moe.experts.dim
        check_token_batch(
            "x", x, dim, dtype=layer_dtype(x, self.moe.experts.w_in) if isinstance(x, Tensor) else None, owner=owner
        )
        if use_vl:
            if self.vl_ffn is None:
                reason = "this MultiwayFFN was built without vl_expert"
                raise InvalidArgumentError("use_vl", f"False ({reason})", use_vl, owner)
            if not recomputing():
                self.moe.last_routing_stats = {}  # the modality experts compute nothing in this pass
            return self.vl_ffn(self.vl_norm(x))
        if modality_ids is None:
            expected = f"an integer tensor of the tokens' shape (indices into {self.modalities})"
            raise InvalidInputError("modality_ids", expected, None, owner)
        if self.norm is not None:
            x = self.norm(x, modality_ids)  # checks the ids' shape, dtype and range
        return self.moe(x, modality_ids)


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
