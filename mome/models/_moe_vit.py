"""A timm ``VisionTransformer`` whose FFN in chosen blocks is a mixture-of-experts layer.

Shared by the V-MoE and Soft-MoE ViT families. The model *is* a timm ViT (same key names for every
non-MoE parameter, same ``forward_features`` / ``forward_head`` / ``reset_classifier`` /
``set_grad_checkpointing`` contract); only ``blocks[i].mlp`` is replaced, so a dense timm ViT state
dict loads strictly into the non-MoE parameters and upcycling is a copy.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from timm.layers import trunc_normal_
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

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
    dispatch_dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """The MoE layer that replaces the dense timm ``Mlp`` of a block (same width and activation).

    ``"sparse"``: :class:`~mome.layers.SparseMoE` with ``options``; ``"soft"``:
    :class:`~mome.layers.SoftMoE`; ``"modality_pools"``: :class:`~mome.layers.ModalityMoE` (needs
    modality ids; ``options["experts_per_modality"]`` or an even image/text split of ``num_experts``).
    ``upcycle`` copies the dense FFN into every expert (sparse upcycling). ``dispatch_dtype`` rounds what
    crosses the dispatch (vmoe's bf16 dispatchers; see :class:`~mome.layers.Experts`).
    """
    dim, hidden = dense.fc1.in_features, dense.fc1.out_features
    act_layer = type(dense.act)
    if moe_type == "soft":
        experts = Experts.from_dense(dense, num_experts) if upcycle else None
        return SoftMoE(
            dim,
            hidden,
            num_experts,
            slots_per_expert,
            act_layer=act_layer,
            experts=experts,
            dispatch_dtype=dispatch_dtype,
        )
    if dispatch_dtype is not None:
        options = {**options, "dispatch_dtype": dispatch_dtype}
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
        group_size_images: route tokens in groups of this many images (V-MoE token groups: capacity
            and the routing losses apply per group); the batch must then be a multiple of it. None
            routes the whole batch as one group.
        slots_per_expert: Soft MoE slots per expert.
        moe_kwargs: further :class:`~mome.layers.SparseMoE` options (capacity, losses, BPR, noise ...).
        upcycle: initialise every expert as a copy of the dense FFN it replaces (sparse upcycling).
        representation_size: add timm's historical ``pre_logits`` layer between pooling and head:
            ``pre_logits = tanh(x W + b)`` of this width (``pre_logits.fc``, ``pre_logits.act``; the
            ViT paper's representation layer, vmoe's ``representation_size``, timm < 0.6's
            ``representation_size``). ``forward_head(x, pre_logits=True)`` returns its output and
            ``head_hidden_size`` is its width. None: no such layer (timm's default).
        dispatch_dtype: the dtype tokens cross the expert dispatch in (``"bfloat16"``: vmoe's
            ``dispatcher.bfloat16`` / Soft MoE's hard-coded bf16 dispatcher): what enters and leaves
            the experts is rounded to it, everything else runs in the model's dtype. None: no rounding.
        **vit_kwargs: timm ``VisionTransformer`` arguments (img_size, patch_size, embed_dim, depth ...).

    ``pretrained_cfg`` defaults to big_vision/vmoe preprocessing: pixel values in [-1, 1]
    (mean = std = 0.5), bilinear resize to the input size without a centre crop (vmoe eval pipelines).
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
        representation_size: int | None = None,
        dispatch_dtype: torch.dtype | str | None = None,
        **vit_kwargs: Any,
    ) -> None:
        super().__init__(**vit_kwargs)
        if moe_type not in ("sparse", "soft", "modality_pools"):
            raise ValueError(f"moe_type must be 'sparse', 'soft' or 'modality_pools', got {moe_type!r}")
        if group_size_images is not None and (not isinstance(group_size_images, int) or group_size_images < 1):
            raise ValueError(f"group_size_images must be a positive integer or None, got {group_size_images!r}")
        if representation_size is not None and (not isinstance(representation_size, int) or representation_size < 1):
            raise ValueError(f"representation_size must be a positive integer or None, got {representation_size!r}")
        self.moe_layer_indices = resolve_moe_layers(moe_layers, len(self.blocks))
        self.group_size_images = group_size_images
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
                block.mlp,
                num_experts,
                top_k,
                moe_type,
                router,
                slots_per_expert,
                options,
                upcycle,
                dispatch_dtype=dispatch_dtype,
            )
        self.representation_size = representation_size
        if representation_size is None:
            self.pre_logits = nn.Identity()
        else:
            fc = nn.Linear(self.embed_dim, representation_size)
            trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)
            self.pre_logits = nn.Sequential(OrderedDict([("fc", fc), ("act", nn.Tanh())]))
            self.head_hidden_size = representation_size
            self.reset_classifier(self.num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """timm's ``reset_classifier``; the new head reads the ``pre_logits`` width when there is one."""
        super().reset_classifier(num_classes, global_pool)
        if getattr(self, "representation_size", None) is not None and num_classes > 0:
            self.head = nn.Linear(self.representation_size, num_classes).to(self.pre_logits.fc.weight)
            self.head.train(self.training)

    def forward_features(
        self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, *args: Any, **kwargs: Any
    ) -> Tensor:
        if self.group_size_images is not None and x.shape[0] % self.group_size_images:
            raise ValueError(
                f"this model routes tokens in groups of group_size_images={self.group_size_images} images (the "
                f"upstream's token groups), so the batch must be a multiple of {self.group_size_images}; got "
                f"{x.shape[0]} images. Pad the batch to a multiple of {self.group_size_images}, or build the model "
                "with a group_size_images that divides your batches (1 routes each image on its own)"
            )
        plain = attn_mask is None and not is_causal and not args and not kwargs
        if self.grad_checkpointing and plain and not torch.jit.is_scripting():
            # timm's forward_features with its checkpoint_seq made non-reentrant whatever TIMM_REENTRANT_CKPT says:
            # a reentrant checkpoint runs the forward under no_grad, so the MoE aux losses would train nothing.
            x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
            return self.norm(checkpoint_seq(self.blocks, x, use_reentrant=False))
        return super().forward_features(x, attn_mask, is_causal, *args, **kwargs)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """timm's head (pool, ``fc_norm``, dropout) with the optional ``pre_logits`` layer before ``head``."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        x = self.pre_logits(x)
        return x if pre_logits else self.head(x)
