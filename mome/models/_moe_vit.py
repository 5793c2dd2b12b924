"""A timm ``VisionTransformer`` whose FFN in chosen blocks is a mixture-of-experts layer.

Shared by the V-MoE and Soft-MoE ViT families. The model *is* a timm ViT (same key names for every
non-MoE parameter, same ``forward_features`` / ``forward_head`` / ``reset_classifier`` /
``set_grad_checkpointing`` contract); only ``blocks[i].mlp`` is replaced, so a dense timm ViT state
dict loads strictly into the non-MoE parameters and upcycling is a copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .._pretrained import PretrainedCfg
from ..layers import Experts, ModalityMoE, SoftMoE, SparseMoE

__all__ = ["MoEVisionTransformer", "build_moe_ffn", "resolve_moe_layers"]

MoEType = Literal["sparse", "soft", "modality_pools"]


def build_moe_ffn(
    dense: nn.Module,
    num_experts: int,
    top_k: int,
    moe_type: MoEType,
    router: str,
    slots_per_expert: int,
    options: Mapping[str, Any],
    upcycle: bool = False,
) -> nn.Module:
    """The MoE layer that replaces the dense timm ``Mlp`` of a block (same width and activation).

    ``"sparse"``: :class:`~mome.layers.SparseMoE` with ``options``; ``"soft"``:
    :class:`~mome.layers.SoftMoE`; ``"modality_pools"``: :class:`~mome.layers.ModalityMoE` (needs
    modality ids; ``options["experts_per_modality"]`` or an even image/text split of ``num_experts``).
    ``upcycle`` copies the dense FFN into every expert (sparse upcycling).
    """
    dim, hidden = dense.fc1.in_features, dense.fc1.out_features
    act_layer = type(dense.act)
    if moe_type == "soft":
        experts = Experts.from_dense(dense, num_experts) if upcycle else None
        return SoftMoE(dim, hidden, num_experts, slots_per_expert, act_layer=act_layer, experts=experts)
    if moe_type == "modality_pools":
        if router not in ("top_k", "noisy_top_k"):
            raise ValueError(f"moe_type='modality_pools' routes within pools with a top-k router, not {router!r}")
        options = dict(options)
        half = num_experts // 2
        pools = options.pop("experts_per_modality", {"image": half, "text": num_experts - half})
        moe = ModalityMoE(dim, hidden, pools, top_k, router=router, act_layer=act_layer, **options)
    elif moe_type == "sparse":
        moe = SparseMoE(dim, hidden, num_experts, top_k, router=router, act_layer=act_layer, **options)
    else:
        raise ValueError(f"moe_type must be 'sparse', 'soft' or 'modality_pools', got {moe_type!r}")
    if upcycle:
        moe.experts.load_state_dict(Experts.from_dense(dense, moe.experts.num_experts).state_dict())
    return moe


def resolve_moe_layers(spec: str | Sequence[int], depth: int) -> list[int]:
    """Which blocks get an MoE FFN.

    ``"every_2"``: blocks 1, 3, 5, ... (V-MoE "Every 2"); ``"every_2_from_0"``: 0, 2, 4, ...
    (MoE-LLaVA); ``"last_N"``: the last ``N`` odd blocks (V-MoE "Last n"); ``"last_half"``: the
    second half of the blocks (Soft MoE); ``"all"``; ``"none"``; or explicit block indices.
    """
    if isinstance(spec, str):
        odd = list(range(1, depth, 2))
        if spec == "every_2":
            return odd
        if spec == "every_2_from_0":
            return list(range(0, depth, 2))
        if spec == "last_half":
            return list(range(depth // 2, depth))
        if spec == "all":
            return list(range(depth))
        if spec == "none":
            return []
        match = re.fullmatch(r"last_(\d+)", spec)
        if match:
            count = int(match.group(1))
            if count > len(odd):
                raise ValueError(f"moe_layers={spec!r}: only {len(odd)} odd blocks in a depth-{depth} model")
            return odd[len(odd) - count :]
        raise ValueError(
            f"moe_layers={spec!r} is not one of every_2, every_2_from_0, last_<n>, last_half, all, none, "
            "or a list of block indices"
        )
    indices = sorted({int(i) for i in spec})
    if any(not 0 <= i < depth for i in indices):
        raise ValueError(f"moe_layers={list(spec)} names blocks outside [0, {depth})")
    return indices


class MoEVisionTransformer(VisionTransformer):
    """timm ViT with MoE FFNs (``moe_type="sparse"``: token-choice routing; ``"soft"``: Soft MoE).

    Args:
        num_experts: experts per MoE layer.
        top_k: experts per token (sparse).
        moe_layers: which blocks are MoE (see :func:`resolve_moe_layers`).
        moe_type: ``"sparse"`` (:class:`~mome.layers.SparseMoE`), ``"soft"`` (:class:`~mome.layers.SoftMoE`)
            or ``"modality_pools"`` (:class:`~mome.layers.ModalityMoE`; image tokens use the image pool).
        router: router of the sparse layers (``"noisy_top_k"``, ``"top_k"``, ``"expert_choice"``, ...).
        group_size_images: route tokens in groups of this many images (V-MoE token groups); None
            routes the whole batch as one group.
        slots_per_expert: Soft MoE slots per expert.
        moe_kwargs: further :class:`~mome.layers.SparseMoE` options (capacity, losses, BPR, noise ...).
        upcycle: initialise every expert as a copy of the dense FFN it replaces (sparse upcycling).

    ``pretrained_cfg`` defaults to big_vision/vmoe preprocessing: pixel values in [-1, 1]
    (mean = std = 0.5), bilinear resize to the input size without a centre crop (vmoe eval pipelines).
        **vit_kwargs: timm ``VisionTransformer`` arguments (img_size, patch_size, embed_dim, depth ...).
    """

    def __init__(
        self,
        *,
        num_experts: int = 8,
        top_k: int = 2,
        moe_layers: str | Sequence[int] = "every_2",
        moe_type: MoEType = "sparse",
        router: str = "noisy_top_k",
        group_size_images: int | None = None,
        slots_per_expert: int = 1,
        moe_kwargs: Mapping[str, Any] | None = None,
        upcycle: bool = False,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__(**vit_kwargs)
        if moe_type not in ("sparse", "soft", "modality_pools"):
            raise ValueError(f"moe_type must be 'sparse', 'soft' or 'modality_pools', got {moe_type!r}")
        self.moe_layer_indices = resolve_moe_layers(moe_layers, len(self.blocks))
        tokens_per_image = self.patch_embed.num_patches + self.num_prefix_tokens
        options = dict(moe_kwargs or {})
        if moe_type == "modality_pools":  # image tokens only: every token is modality 0 (image)
            options.setdefault("default_modality", 0)
        if group_size_images is not None:
            options["group_size"] = group_size_images * tokens_per_image
        # Data defaults (timm's ``pretrained_cfg``); a checkpoint card overrides them.
        self.pretrained_cfg = PretrainedCfg(
            input_size=(3, *self.patch_embed.img_size),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bilinear",
            crop_pct=1.0,
            num_classes=self.num_classes,
        )
        for index in self.moe_layer_indices:
            block = self.blocks[index]
            block.mlp = build_moe_ffn(
                block.mlp, num_experts, top_k, moe_type, router, slots_per_expert, options, upcycle
            )
