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

from .experts import Experts
from .moe import MoE, SparseMoE, recomputing
from .routers import ModalityRouter

__all__ = ["ModalityLayerNorm", "ModalityMoE", "MultiwayFFN"]


class ModalityLayerNorm(nn.Module):
    """LayerNorm whose affine parameters depend on the token's modality: ``[M, D]`` weight and bias."""

    def __init__(self, dim: int, num_modalities: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_modalities, dim))
        self.bias = nn.Parameter(torch.zeros(num_modalities, dim))

    def forward(self, x: Tensor, modality_ids: Tensor) -> Tensor:
        normed = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return normed * self.weight[modality_ids] + self.bias[modality_ids]


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
        self.modalities = tuple(modalities)
        num_modalities = len(self.modalities)
        if num_modalities < 1 or len(set(self.modalities)) != num_modalities:
            raise ValueError(f"modalities must be distinct names, got {modalities!r}")
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
        """``x [B, N, D]``, ``modality_ids [B, N]`` -> ``[B, N, D]``."""
        if use_vl:
            if self.vl_ffn is None:
                raise ValueError("use_vl=True but this MultiwayFFN was built without vl_expert")
            if not recomputing():
                self.moe.last_routing_stats = {}  # the modality experts compute nothing in this pass
            return self.vl_ffn(self.vl_norm(x))
        if modality_ids is None:
            raise ValueError(f"MultiwayFFN needs modality_ids (indices into {self.modalities})")
        if self.norm is not None:
            if tuple(modality_ids.shape) != tuple(x.shape[:-1]):
                raise ValueError(
                    f"modality_ids has shape {tuple(modality_ids.shape)} but the tokens are {tuple(x.shape[:-1])}"
                )
            x = self.norm(x, modality_ids.long())
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
        counts = (
            list(experts_per_modality.values())
            if isinstance(experts_per_modality, Mapping)
            else list(experts_per_modality)
        )
        if not counts or any(not isinstance(c, int) or c < 1 for c in counts):
            raise ValueError(
                f"experts_per_modality must give a positive count per modality, got {experts_per_modality!r}"
            )
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
