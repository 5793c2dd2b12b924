"""A timm ``VisionTransformer`` whose FFN in chosen blocks is a mixture-of-experts layer.

Shared by the V-MoE and Soft-MoE ViT families. The model *is* a timm ViT (same key names for every
non-MoE parameter, same ``forward_features`` / ``forward_head`` / ``reset_classifier`` /
``set_grad_checkpointing`` contract); only ``blocks[i].mlp`` is replaced, so a dense timm ViT state
dict loads strictly into the non-MoE parameters and upcycling is a copy.
"""

from __future__ import annotations

import inspect
import re
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from numbers import Integral
from typing import Any, Literal

import torch
from timm.layers import trunc_normal_
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .._checks import (
    check_choice,
    check_divisible,
    check_finite_positive,
    check_image_batch,
    check_int,
    check_probability,
)
from .._errors import InvalidArgumentError, InvalidInputError, UnsupportedOptionError
from .._pretrained import PretrainedCfg
from ..layers import SMEAR, Experts, ModalityMoE, SoftMoE, SparseMoE

__all__ = ["MoEVisionTransformer", "build_moe_ffn", "resolve_moe_layers"]

MoEType = Literal["sparse", "soft", "modality_pools", "smear"]
MOE_TYPES = ("sparse", "soft", "modality_pools", "smear")
#: The layer types that route no token to a few experts (every step differentiable): Soft MoE mixes the tokens into
#: slots, SMEAR merges the experts per example; the token-routing options (top_k, router, moe_kwargs) do not apply.
SOFT_MOE_TYPES = ("soft", "smear")
_SOFT_REASONS = {
    "soft": "a Soft MoE layer mixes every token into every slot (no routing)",
    "smear": "a SMEAR layer merges all experts per example (no token routing)",
}

# ------------------------------------------------------------------------------------------ argument checks
# Shared by the model families (V-MoE, Soft MoE ViT, LIMoE, VLMo, MoE-LLaVA): each constructor checks its arguments
# with these before it builds anything, and each error names the registered model being built (``owner``).

_OWNER: ContextVar[str | None] = ContextVar("mome_model_owner", default=None)


@contextmanager
def building(name: str) -> Iterator[None]:
    """Inside, the argument errors of the model constructors name ``name`` (a registered entrypoint) as their
    owner instead of the class."""
    token = _OWNER.set(name)
    try:
        yield
    finally:
        _OWNER.reset(token)


def owner_name(obj: object) -> str:
    """The name argument and input errors give: the entrypoint being built (see :func:`building`), else the
    model's ``mome_model_name`` (set by ``create_model``), else its class name."""
    return _OWNER.get() or vars(obj).get("mome_model_name") or type(obj).__name__


def reject_unknown_options(owner: str, options: Mapping[str, Any], accepted: Sequence[str], reason: str) -> None:
    """Every key of ``options`` is in ``accepted``, else :class:`~mome.UnsupportedOptionError` names the first other."""
    for name in options:
        if name not in accepted:
            raise UnsupportedOptionError(name, owner, reason, options[name])


def parameter_names(fn: Any) -> list[str]:
    """The keyword parameters of ``fn`` (a function or a class's ``__init__``), without ``self`` and ``**``."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds and p.name != "self"]


def check_images(
    name: str, images: object, channels: int, size: tuple[int, int] | None, embed: nn.Module, owner: str
) -> None:
    """``images`` is a floating ``[B, channels, H, W]`` batch (of ``size`` when given; ``check_image_batch``) in the
    dtype of the patch embedding ``embed`` (unless autocast, mixed precision, is on: it casts)."""
    check_image_batch(name, images, channels, size, owner=owner)
    weight = getattr(getattr(embed, "proj", None), "weight", None)
    dtype = images.dtype if weight is None else weight.dtype
    if images.dtype != dtype and not torch.is_autocast_enabled(images.device.type):
        expected = f"a {dtype} tensor, the model's dtype (or run under torch.autocast)"
        raise InvalidInputError(name, expected, images.dtype, owner)


def check_tensor_shape(name: str, value: object, shape: Sequence[int], what: str, owner: str) -> None:
    """``value`` is a tensor of exactly ``shape`` (a mask or labels that go with another input), else
    :class:`~mome.InvalidInputError` saying ``what`` it should be."""
    if not isinstance(value, Tensor):
        raise InvalidInputError(name, f"a {list(shape)} tensor ({what})", type(value).__name__, owner)
    if tuple(value.shape) != tuple(shape):
        raise InvalidInputError(name, f"a {list(shape)} tensor ({what})", f"shape {tuple(value.shape)}", owner)


def check_patch_grid(
    img_size: Any, patch_size: Any, owner: str, names: tuple[str, str] = ("img_size", "patch_size")
) -> None:
    """``patch_size`` is a positive integer (or an ``(h, w)`` pair) and ``img_size`` (an int or an ``(H, W)`` pair)
    a positive multiple of it on each side: a remainder would be silently cropped by the patch embedding.
    ``names``: the two arguments' names in errors."""
    patches = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else (patch_size, patch_size)
    if len(patches) != 2:
        raise InvalidArgumentError(names[1], "a positive integer or an (h, w) pair", patch_size, owner)
    for side in patches:
        check_int(names[1], side, owner=owner)
    sizes = tuple(img_size) if isinstance(img_size, (tuple, list)) else (img_size, img_size)
    if len(sizes) != 2:
        raise InvalidArgumentError(names[0], "a positive integer or an (H, W) pair", img_size, owner)
    if patches[0] == patches[1]:
        check_divisible(names[0], img_size, patches[0], names[1], owner=owner)
    else:
        for side, patch in zip(sizes, patches):
            check_divisible(names[0], side, patch, names[1], owner=owner)


def check_transformer(
    owner: str,
    *,
    width_name: str,
    width: Any,
    depth: Any,
    num_heads: Any,
    mlp_ratio: Any,
    img_size: Any = None,
    patch_size: Any = None,
    in_chans: Any = None,
    rates: Mapping[str, Any] | None = None,
) -> None:
    """The sizes every family's Transformer shares: positive ``width`` (named ``width_name``), ``depth`` and
    ``num_heads``, ``width`` divisible by ``num_heads``, a finite positive ``mlp_ratio``, dropout ``rates`` in
    ``[0, 1)``, and, for an image input, positive ``in_chans`` and an ``img_size`` divisible by ``patch_size``."""
    check_int(width_name, width, owner=owner)
    check_int("depth", depth, owner=owner)
    check_int("num_heads", num_heads, owner=owner)
    check_divisible(width_name, width, num_heads, "num_heads", owner=owner)
    check_finite_positive("mlp_ratio", mlp_ratio, owner=owner)
    if in_chans is not None:
        check_int("in_chans", in_chans, owner=owner)
    if patch_size is not None:
        check_patch_grid(img_size, patch_size, owner)
    for name, rate in (rates or {}).items():
        check_probability(name, rate, owner=owner)


def check_moe_options(
    owner: str,
    *,
    moe_type: Any,
    num_experts: Any,
    top_k: Any,
    router: Any,
    slots_per_expert: Any,
    moe_kwargs: Mapping[str, Any],
    defaults: tuple[int, str],
) -> None:
    """The MoE arguments of the vision families: a known ``moe_type``, positive ``num_experts``, ``top_k`` and
    ``slots_per_expert``, ``top_k <= num_experts`` for sparse layers, and no option the layer type ignores:
    a Soft MoE or SMEAR layer (:data:`SOFT_MOE_TYPES`) routes no tokens (``top_k`` and ``router`` must keep their
    ``defaults``, which model specs carry for every layer type, and ``moe_kwargs`` must be empty); only Soft MoE
    has slots
    (``slots_per_expert`` must stay 1)."""
    check_choice("moe_type", moe_type, MOE_TYPES, owner=owner)
    check_int("num_experts", num_experts, owner=owner)
    check_int("top_k", top_k, owner=owner)
    check_int("slots_per_expert", slots_per_expert, owner=owner)
    if moe_type == "sparse" and top_k > num_experts:
        raise InvalidArgumentError("top_k", f"an integer in [1, num_experts={num_experts}]", top_k, owner)
    if moe_type in SOFT_MOE_TYPES:
        reason = _SOFT_REASONS[moe_type]
        if top_k != defaults[0]:
            raise UnsupportedOptionError("top_k", owner, reason + "; top_k applies to moe_type='sparse'", top_k)
        check_soft_router(owner, moe_type, router, defaults[1])
        if moe_kwargs:
            reason += "; moe_kwargs configure sparse layers"
            raise UnsupportedOptionError("moe_kwargs", owner, reason, dict(moe_kwargs))
    if moe_type != "soft" and slots_per_expert != 1:
        reason = f"slots are Soft MoE's (moe_type='soft'); a moe_type={moe_type!r} layer has none"
        raise UnsupportedOptionError("slots_per_expert", owner, reason, slots_per_expert)


def check_soft_router(owner: str, moe_type: Any, router: Any, default: str) -> None:
    """A Soft MoE or SMEAR layer (:data:`SOFT_MOE_TYPES`) routes no tokens: ``router`` must be absent (None) or the
    family's ``default`` (which its model specs carry for every layer type)."""
    if moe_type in SOFT_MOE_TYPES and router is not None and router != default:
        reason = f"{_SOFT_REASONS[moe_type]}; router applies to moe_type='sparse'"
        raise UnsupportedOptionError("router", owner, reason, router)


#: timm ``VisionTransformer``'s keyword arguments (what ``**vit_kwargs`` may hold) and their defaults.
_VIT_DEFAULTS = {
    name: p.default for name, p in inspect.signature(VisionTransformer.__init__).parameters.items() if name != "self"
}
_VIT_RATES = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


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
    :class:`~mome.layers.SoftMoE`; ``"smear"``: :class:`~mome.layers.SMEAR`; ``"modality_pools"``:
    :class:`~mome.layers.ModalityMoE` (needs
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
    if moe_type == "smear":
        if dispatch_dtype is not None:
            reason = "a SMEAR layer dispatches no tokens (each example runs its merged FFN)"
            raise UnsupportedOptionError("dispatch_dtype", _OWNER.get() or "build_moe_ffn", reason, dispatch_dtype)
        experts = Experts.from_dense(dense, num_experts) if upcycle else None
        return SMEAR(dim, hidden, num_experts, act_layer=act_layer, experts=experts)
    if dispatch_dtype is not None:
        options = {**options, "dispatch_dtype": dispatch_dtype}
    if moe_type == "modality_pools":
        if router not in ("top_k", "noisy_top_k"):
            reason = "moe_type='modality_pools' routes within pools with a top-k router ('top_k' or 'noisy_top_k')"
            raise UnsupportedOptionError("router", "build_moe_ffn", reason, router)
        options = dict(options)
        half = num_experts // 2
        pools = options.pop("experts_per_modality", {"image": half, "text": num_experts - half})
        moe = ModalityMoE(dim, hidden, pools, top_k, router=router, act_layer=act_layer, **options)
    elif moe_type == "sparse":
        moe = SparseMoE(dim, hidden, num_experts, top_k, router=router, act_layer=act_layer, **options)
    else:
        check_choice("moe_type", moe_type, MOE_TYPES, owner="build_moe_ffn")
    if upcycle:
        segments = getattr(moe, "fine_grained", 1)  # DeepSeekMoE's m: m * num_experts experts of width H / m
        upcycled = Experts.from_dense(dense, moe.experts.num_experts // segments, fine_grained=segments)
        moe.experts.load_state_dict(upcycled.state_dict())
    return moe


def resolve_moe_layers(spec: str | Sequence[int], depth: int, owner: str | None = None) -> list[int]:
    """Which blocks get an MoE FFN.

    ``"every_2"``: blocks 1, 3, 5, ... (V-MoE "Every 2"); ``"every_2_from_0"``: 0, 2, 4, ...
    (MoE-LLaVA); ``"last_N"``: the last ``N`` odd blocks (V-MoE "Last n"); ``"last_half"``: the
    second half of the blocks (Soft MoE); ``"all"``; ``"none"``; or explicit block indices. Anything else,
    or an index outside ``[0, depth)``, is an :class:`~mome.InvalidArgumentError` naming ``owner``.
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
                expected = f"last_<n> with n <= {len(odd)} (the odd blocks of a depth-{depth} model)"
                raise InvalidArgumentError("moe_layers", expected, spec, owner)
            return odd[len(odd) - count :]
        expected = "one of every_2, every_2_from_0, last_<n>, last_half, all, none, or block indices"
        raise InvalidArgumentError("moe_layers", expected, spec, owner)
    if not isinstance(spec, Sequence) or not all(isinstance(i, Integral) and not isinstance(i, bool) for i in spec):
        raise InvalidArgumentError("moe_layers", "a layout name or a list of block indices", spec, owner)
    indices = sorted({int(i) for i in spec})
    if any(not 0 <= i < depth for i in indices):
        raise InvalidArgumentError("moe_layers", f"block indices in [0, {depth})", list(spec), owner)
    return indices


class MoEVisionTransformer(VisionTransformer):
    """timm ViT with MoE FFNs (``moe_type="sparse"``: token-choice routing; ``"soft"``: Soft MoE).

    Args:
        num_experts: experts per MoE layer.
        top_k: experts per token (sparse).
        moe_layers: which blocks are MoE (see :func:`resolve_moe_layers`).
        moe_type: ``"sparse"`` (:class:`~mome.layers.SparseMoE`), ``"soft"`` (:class:`~mome.layers.SoftMoE`),
            ``"smear"`` (:class:`~mome.layers.SMEAR`) or ``"modality_pools"`` (:class:`~mome.layers.ModalityMoE`;
            image tokens use the image pool).
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
        owner = owner_name(self)
        reason = "not an argument of MoEVisionTransformer or of timm's VisionTransformer"
        reject_unknown_options(owner, vit_kwargs, tuple(_VIT_DEFAULTS), reason)
        vit = {**_VIT_DEFAULTS, **vit_kwargs}
        check_transformer(
            owner,
            width_name="embed_dim",
            width=vit["embed_dim"],
            depth=vit["depth"],
            num_heads=vit["num_heads"],
            mlp_ratio=vit["mlp_ratio"],
            img_size=vit["img_size"],
            patch_size=None if vit["dynamic_img_pad"] else vit["patch_size"],
            in_chans=vit["in_chans"],
            rates={name: vit[name] for name in _VIT_RATES},
        )
        check_int("num_classes", vit["num_classes"], minimum=0, owner=owner)
        check_moe_options(
            owner,
            moe_type=moe_type,
            num_experts=num_experts,
            top_k=top_k,
            router=None,  # the entrypoints check it against their family's default (mome.upcycle passes its own)
            slots_per_expert=slots_per_expert,
            moe_kwargs=moe_kwargs or {},
            defaults=(2, "noisy_top_k"),
        )
        check_int("group_size_images", group_size_images, owner=owner, optional=True)
        if moe_type in SOFT_MOE_TYPES and group_size_images is not None:
            reason = f"token groups bound the capacity of routed layers; {_SOFT_REASONS[moe_type]}"
            raise UnsupportedOptionError("group_size_images", owner, reason, group_size_images)
        check_int("representation_size", representation_size, owner=owner, optional=True)
        moe_layer_indices = resolve_moe_layers(moe_layers, vit["depth"], owner)  # all checked: now build
        super().__init__(**vit_kwargs)
        self.in_chans = vit["in_chans"]
        self.moe_layer_indices = moe_layer_indices
        self.group_size_images = group_size_images
        tokens_per_image = self.patch_embed.num_patches + self.num_prefix_tokens
        options = dict(moe_kwargs or {})
        if moe_type == "modality_pools":  # image tokens only: every token is modality 0 (image)
            options.setdefault("default_modality", 0)
        if group_size_images is not None:
            options["group_size"] = group_size_images * tokens_per_image
        # Data defaults (timm's ``pretrained_cfg``); a checkpoint card overrides them.
        self.pretrained_cfg = PretrainedCfg(
            input_size=(self.in_chans, *self.patch_embed.img_size),
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
        """timm's ``forward_features`` after checking ``x``: a floating ``[B, in_chans, H, W]`` batch of the
        model's image size (any size divisible by the patch with ``dynamic_img_size``), ``B`` a multiple of
        ``group_size_images`` when the model routes token groups."""
        embed = self.patch_embed
        size = embed.img_size if getattr(embed, "strict_img_size", False) else None
        check_images("x", x, self.in_chans, size, embed, owner_name(self))
        group = self.group_size_images
        if group is not None and x.shape[0] % group:
            expected = (
                f"a batch of a multiple of group_size_images={group} images (the upstream's token groups; pad the "
                "batch, or build the model with a group_size_images that divides your batches)"
            )
            raise InvalidInputError("x", expected, f"{x.shape[0]} images", owner_name(self))
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
