"""V-MoE: Vision Transformers with sparse mixture-of-experts FFNs.

Paper: "Scaling Vision with Sparse Mixture of Experts", Riquelme et al., NeurIPS 2021
(https://arxiv.org/abs/2106.05974). Upstream: https://github.com/google-research/vmoe (JAX/Flax).

A ViT whose FFN in every other block ("Every 2": blocks 1, 3, 5, ...) or in the last ``n`` odd
blocks ("Last n") is a sparse MoE of MLPs:

    G(x) = TOP_k(softmax(x W + eps)),  eps ~ N(0, (1/E)^2) at training time, no renormalisation,
    y(x) = sum_e G_e(x) MLP_e(x),

with a per-expert capacity ``ceil(S k C / E)`` rounded up to a multiple of 4 per group of ``S``
tokens (token groups of 8 images), optional batch-prioritised routing, and the importance and load
auxiliary losses (weight 0.005 each). MLPs use the tanh approximation of GELU (Flax's ``nn.gelu``).
Released checkpoints: S/32 (8 layers, E=8, k=2, last 2) and B/16 (E=8, k=2, every 2).

What the released checkpoints' configs (``vmoe/configs/vmoe_paper/``) set, and their cards carry in
``model_kwargs``: token groups of 8 images (``group_size_images=8``; the family default routes the whole
batch as one group), the capacity factor of evaluation (S/32: 4.0; B/16 pre-training: 1.05; fine-tuned:
1.5), the einsum dispatcher in bfloat16 (``dispatch_dtype="bfloat16"``), and for the S/32 pre-training
checkpoints a ``pre_logits`` Dense + tanh before the head (``representation_size=512``; B/16's
``pretrain_imagenet21k.py`` and the fine-tuning configs set none).
"""

from __future__ import annotations

from typing import Any

from .._registry import register_model
from ._moe_vit import SOFT_MOE_TYPES, MoEVisionTransformer, building, check_soft_router

__all__ = ["MoEVisionTransformer"]

VMOE_MOE_DEFAULTS: dict[str, Any] = {
    "capacity_factor": 1.05,
    "capacity_multiple": 4,
    "aux_loss_weights": {"importance": 0.005, "load": 0.005},
}


def _create_vmoe(arch: str, /, **kwargs: Any) -> MoEVisionTransformer:
    """V-MoE defaults (noisy top-k router, V-MoE capacity and losses) under user overrides; errors name ``arch``.

    With ``moe_type="soft"`` or ``"smear"`` (a V-MoE with Soft MoE or SMEAR FFNs) the routing defaults do not
    apply: ``router`` may only restate the family's ``"noisy_top_k"`` and ``moe_kwargs`` must be empty (checked by
    the model)."""
    with building(arch):
        soft = kwargs.get("moe_type") in SOFT_MOE_TYPES
        check_soft_router(arch, kwargs.get("moe_type"), kwargs.get("router"), "noisy_top_k")
        user = dict(kwargs.pop("moe_kwargs", None) or {})
        moe_kwargs = user if soft else {**VMOE_MOE_DEFAULTS, **user}
        options = {"router": "noisy_top_k", "act_layer": "gelu_tanh", "group_size_images": None, **kwargs}
        return MoEVisionTransformer(moe_kwargs=moe_kwargs, **options)


# V-MoE "S" is 8 layers deep (vmoe configs), unlike timm's 12-layer ViT-S.
@register_model
def vmoe_s32_e8(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """V-MoE S/32: 8 layers, width 512, 8 heads, MLP 2048; E=8, k=2 on the last 2 odd blocks (5, 7)."""
    args = dict(
        patch_size=32, embed_dim=512, depth=8, num_heads=8, mlp_ratio=4.0, num_experts=8, top_k=2, moe_layers="last_2"
    )
    return _create_vmoe("vmoe_s32_e8", **{**args, **kwargs})


@register_model
def vmoe_b16_e8(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """V-MoE B/16: ViT-B/16 with E=8, k=2 in every other block (1, 3, ..., 11)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, num_experts=8, top_k=2, moe_layers="every_2")
    return _create_vmoe("vmoe_b16_e8", **{**args, **kwargs})


@register_model
def vmoe_l16_e8(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """V-MoE L/16: ViT-L/16 with E=8, k=2 in every other block."""
    args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, num_experts=8, top_k=2, moe_layers="every_2")
    return _create_vmoe("vmoe_l16_e8", **{**args, **kwargs})


@register_model
def vmoe_tiny_patch8_e4(pretrained: bool = False, **kwargs: Any) -> MoEVisionTransformer:
    """A tiny V-MoE for tests and demos: 32px, 4 layers of width 64, E=4, k=2, every other block."""
    args = dict(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_classes=10,
        num_experts=4,
        top_k=2,
        moe_layers="every_2",
    )
    return _create_vmoe("vmoe_tiny_patch8_e4", **{**args, **kwargs})
