"""Soft-MoE ViT: Vision Transformers whose FFNs in the last half of the blocks are Soft MoE layers.

Paper: "From Sparse to Soft Mixtures of Experts", Puigcerver et al., ICLR 2024
(https://arxiv.org/abs/2308.00951). Upstream: ``google-research/vmoe/vmoe/projects/soft_moe``.

Each Soft MoE layer mixes all tokens of an image into ``E * P`` slots with
``D = softmax_tokens(scale * <x_hat, mu_hat>)``, runs one expert per ``P`` slots and mixes the slot
outputs back with ``C = softmax_slots(...)`` (see :class:`mome.layers.SoftMoE`). Released configs
(JFT-4B, LAION): MoE in all of the last half of the blocks (S, B: last 6 of 12; L: last 12 of 24;
H: last 16 of 32), 128 experts for S/16, B/16 and L/16 and 256 for S/14 and H/14, one slot per
expert, global-average-pooled classifier, QK-norm in attention. No auxiliary loss.

Head layout as upstream: vmoe's ``VisionTransformerMoe`` applies ``encoder_norm`` to every token and
then averages (``classifier="gap"``), so these variants build timm's ViT with ``fc_norm=False`` (the
final ``norm`` before pooling) rather than timm's default for ``global_pool="avg"`` (``fc_norm`` after
pooling, a different function). The official Soft MoE router always wraps its dispatcher in
``Bfloat16Dispatcher``; pass ``dispatch_dtype="bfloat16"`` to reproduce those outputs to the bit of
rounding, leave it None for fp32 dispatch. The paper's
abstract states 128 experts for H/14; the released config uses 256, which these variants follow.
No checkpoint was released (JFT-4B and LAION models are not public).
"""

from __future__ import annotations

from typing import Any

from .._registry import register_model
from ._moe_vit import MoEVisionTransformer, building, check_soft_router

__all__ = ["MoEVisionTransformer"]


def _create_soft_moe_vit(arch: str, /, **kwargs: Any) -> MoEVisionTransformer:
    """Soft MoE defaults (last half, one slot per expert, norm-then-GAP head, QK-norm) under user overrides;
    errors name ``arch``. Routing options (``top_k``, ``router``, ``moe_kwargs``) are rejected unless
    ``moe_type="sparse"`` (or ``"modality_pools"``) makes the MoE layers routed (checked by the model)."""
    check_soft_router(arch, kwargs.get("moe_type", "soft"), kwargs.get("router"), "noisy_top_k")
    options = {
        "moe_type": "soft",
        "moe_layers": "last_half",
        "slots_per_expert": 1,
        "class_token": False,
        "global_pool": "avg",
        "fc_norm": False,  # vmoe: encoder_norm, then global average pooling
        "qk_norm": True,
        "act_layer": "gelu_tanh",
        **kwargs,
    }
    with building(arch):
        return MoEVisionTransformer(**options)


@register_model
def soft_moe_vit_small_patch16_224_e128(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """Soft MoE S/16: ViT-S/16 with 128 experts in blocks 6-11."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, num_experts=128)
    return _create_soft_moe_vit("soft_moe_vit_small_patch16_224_e128", **{**args, **kwargs})


@register_model
def soft_moe_vit_small_patch14_224_e256(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """Soft MoE S/14: ViT-S/14 with 256 experts in blocks 6-11."""
    args = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, num_experts=256)
    return _create_soft_moe_vit("soft_moe_vit_small_patch14_224_e256", **{**args, **kwargs})


@register_model
def soft_moe_vit_base_patch16_224_e128(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """Soft MoE B/16: ViT-B/16 with 128 experts in blocks 6-11."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_experts=128)
    return _create_soft_moe_vit("soft_moe_vit_base_patch16_224_e128", **{**args, **kwargs})


@register_model
def soft_moe_vit_large_patch16_224_e128(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """Soft MoE L/16: ViT-L/16 with 128 experts in blocks 12-23."""
    args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, num_experts=128)
    return _create_soft_moe_vit("soft_moe_vit_large_patch16_224_e128", **{**args, **kwargs})


@register_model
def soft_moe_vit_huge_patch14_224_e256(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """Soft MoE H/14: ViT-H/14 (32 layers, width 1280) with 256 experts in blocks 16-31."""
    args = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_experts=256)
    return _create_soft_moe_vit("soft_moe_vit_huge_patch14_224_e256", **{**args, **kwargs})


@register_model
def soft_moe_vit_tiny_patch8_e8(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """A tiny Soft-MoE ViT for tests and demos: 32px, 4 layers of width 64, 8 experts in blocks 2-3."""
    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10, num_experts=8)
    return _create_soft_moe_vit("soft_moe_vit_tiny_patch8_e8", **{**args, **kwargs})
