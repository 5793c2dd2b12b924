"""``mome.upcycle``: a dense model in, the matching mixture-of-experts model out (sparse upcycling).

Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR 2023, arXiv:2212.05055; MoE-LLaVA stage III, Lin et al. 2024, arXiv:2401.15947):
the FFN of each chosen block becomes an MoE whose ``E`` experts are copies of that FFN and whose
router starts from its own random init; every other parameter is copied. With a top-k router that
renormalises the chosen weights (``sum_j w_j = 1``) and no capacity limit (the default: dropless),
the upcycled model computes exactly the dense function: ``sum_j w_j FFN(x) = FFN(x)``. A capacity
limit (``capacity_factor``), weights that are not renormalised (V-MoE's ``renormalize=False``) or a
Soft MoE layer (``moe_type="soft"``: slots mix the tokens of a sequence) start from a different
function; those models are an initialisation, not the dense model.

Dense models understood, each rebuilt as a registered architecture of this module so that the
result saves with :func:`mome.save_pretrained` and reloads exactly with
``mome.create_model("local-dir:...")`` (``mome_model_name`` / ``mome_model_args`` are recorded):

- a timm ``VisionTransformer`` (module, or a timm model name, optionally ``"timm:"``-prefixed, built
  with ``timm.create_model``) -> ``upcycled_timm_vit``: a :class:`~mome.models.MoEVisionTransformer`
  (V-MoE, or Soft MoE with ``moe_type="soft"``) of the same configuration, weights through
  :func:`mome.convert.convert_timm_vit`;
- an open_clip ``CLIP`` (ViT image tower, transformer text tower) -> ``upcycled_open_clip``: the same
  two-tower CLIP whose chosen blocks of both towers have an MoE FFN, weights through
  :func:`mome.convert.convert_open_clip`. (A one-tower :class:`~mome.models.limoe.LIMoE` cannot compute
  what a two-tower CLIP computes; ``convert_open_clip`` also initialises a LIMoE from CLIP weights, as an
  initialisation only.)
- a transformers causal LM (Llama, Mistral, Qwen2, Phi, StableLM, ...) -> ``upcycled_causal_lm``: the
  same model (a copy) whose chosen decoder layers' ``mlp`` is a :class:`~mome.layers.MoE` built with
  :meth:`mome.layers.MoE.from_dense`. ``MoE`` maps ``[B, N, D] -> [B, N, D]`` like the MLP it
  replaces, so the decoder layers, ``generate`` and :func:`mome.aux_losses` work unchanged.

The recorded ``model_args`` are JSON: the dense configuration (timm ViT arguments with activation and
norm layers written as ``{"type": "torch.nn.GELU", ...}``; open_clip's model config; the transformers
config dict) and the MoE options. A router given as a callable cannot be recorded: such a model runs,
but :func:`mome.save_pretrained` refuses it.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ._checks import check_int
from ._errors import InvalidArgumentError, UnsupportedModelError, UnsupportedOptionError
from ._pretrained import PretrainedCfg
from ._registry import register_model
from .layers import MoE, Router, TopKRouter, check_causal_safe
from .models import MoEVisionTransformer, resolve_moe_layers
from .models._moe_vit import build_moe_ffn

__all__ = ["upcycle", "upcycled_causal_lm", "upcycled_open_clip", "upcycled_timm_vit"]

RouterSpec = str | Callable[[int, int], Router]

#: Namespaces a recorded layer type may name (``{"type": "torch.nn.GELU"}``): nothing else is imported.
_LAYER_NAMESPACES = {"torch.nn": "torch.nn", "timm.layers": "timm.layers"}


def upcycle(
    dense: nn.Module | str,
    num_experts: int = 8,
    top_k: int = 2,
    moe_layers: str | Sequence[int] | None = None,
    router: RouterSpec = "top_k",
    *,
    moe_type: Literal["sparse", "soft"] = "sparse",
    renormalize: bool = True,
    pretrained: bool = False,
    **moe_kwargs: Any,
) -> nn.Module:
    """The MoE counterpart of ``dense``, every expert a copy of the dense FFN it replaces.

    Args:
        dense: a timm ``VisionTransformer`` or timm model name (``"timm:vit_small_patch16_224"``),
            an open_clip ``CLIP``, or a transformers causal LM. Modules are not modified.
        num_experts: experts per MoE layer.
        top_k: experts per token.
        moe_layers: which blocks become MoE (:func:`mome.models.resolve_moe_layers`; for a CLIP, in
            each tower); None: V-MoE's ``"every_2"`` for vision and CLIP, MoE-LLaVA's
            ``"every_2_from_0"`` for language models.
        router: ``"top_k"``, ``"noisy_top_k"`` (V-MoE, sigma = 1/E at training) or, for the sparse
            layers of vision models, any router name :class:`~mome.layers.SparseMoE` takes; for language
            models also a callable ``(dim, num_experts) -> Router`` (not savable).
        moe_type: ``"sparse"`` or ``"soft"`` (Soft MoE; vision models and CLIP only).
        renormalize: renormalise the top-k weights (needed for the upcycled model to equal the dense one).
        pretrained: with a timm name, load timm's pretrained weights (cache / hub, offline-aware).
        **moe_kwargs: further MoE options (``capacity_factor``, ``aux_loss_weights``, ``dispatch``,
            ``group_size_images``, ``slots_per_expert``, ...). Dropless unless a capacity is given.

    Returns:
        the MoE model, in ``dense``'s device, dtype and train/eval mode, with ``mome_model_name`` and
        ``mome_model_args`` recorded so that :func:`mome.save_pretrained` writes a folder
        ``mome.create_model("local-dir:...")`` rebuilds exactly.
    """
    if isinstance(dense, str):
        import timm

        dense = timm.create_model(dense.removeprefix("timm:"), pretrained=pretrained)
    from timm.models.vision_transformer import VisionTransformer

    if moe_type not in ("sparse", "soft"):
        raise InvalidArgumentError("moe_type", "'sparse' or 'soft'", moe_type, "upcycle")
    if isinstance(dense, MoEVisionTransformer) or any(isinstance(m, MoE) for m in dense.modules()):
        raise InvalidArgumentError(
            "dense", "a dense model (no MoE layers)", f"a {type(dense).__name__} that already has MoE layers", "upcycle"
        )
    moe = dict(moe_kwargs)
    if isinstance(dense, VisionTransformer):
        args = _moe_args(
            num_experts,
            top_k,
            "every_2" if moe_layers is None else moe_layers,
            router,
            moe_type,
            renormalize,
            moe,
            vision=True,
        )
        return _upcycle_timm_vit(dense, args)
    if all(hasattr(dense, name) for name in ("visual", "token_embedding", "encode_text")):
        args = _moe_args(
            num_experts,
            top_k,
            "every_2" if moe_layers is None else moe_layers,
            router,
            moe_type,
            renormalize,
            moe,
            vision=False,
        )
        return _upcycle_open_clip(dense, args)
    if hasattr(dense, "config") and hasattr(dense.config, "num_hidden_layers"):
        if moe_type != "sparse":
            raise UnsupportedOptionError(
                "moe_type",
                "upcycle",
                "language models are upcycled with 'sparse' (Soft MoE mixes a sequence)",
                moe_type,
            )
        return _upcycle_causal_lm(
            dense, num_experts, top_k, "every_2_from_0" if moe_layers is None else moe_layers, router, renormalize, moe
        )
    raise UnsupportedModelError(
        f"cannot upcycle a {type(dense).__name__}: expected a timm VisionTransformer (or timm name), "
        "an open_clip CLIP or a transformers causal LM"
    )


# ------------------------------------------------------------------------------------------ shared
def _moe_args(
    num_experts: int,
    top_k: int,
    moe_layers: str | Sequence[int],
    router: RouterSpec,
    moe_type: str,
    renormalize: bool,
    options: dict[str, Any],
    vision: bool,
) -> dict[str, Any]:
    """The MoE arguments of the vision/CLIP entrypoints, as they are recorded (``moe_kwargs`` JSON)."""
    if callable(router):
        raise InvalidArgumentError(
            "router", "a router name (e.g. 'top_k') for vision models and CLIPs", router, "upcycle"
        )
    slots = options.pop("slots_per_expert", 1)
    group_size_images = options.pop("group_size_images", None)
    if group_size_images is not None and not vision:
        raise UnsupportedOptionError("group_size_images", "upcycle", "it applies to timm ViTs only", group_size_images)
    if moe_type == "sparse":
        options.setdefault("renormalize", renormalize)
    elif options:
        raise UnsupportedOptionError(
            ", ".join(sorted(options)),
            "upcycle",
            "these configure sparse layers; a Soft MoE takes only slots_per_expert",
            moe_type,
        )
    args = dict(
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=moe_layers if isinstance(moe_layers, str) else [int(i) for i in moe_layers],
        moe_type=moe_type,
        router=router,
        slots_per_expert=slots,
        moe_kwargs=options,
    )
    if vision:
        args["group_size_images"] = group_size_images
    return args


def _structure(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(name, type, extra_repr)`` of every submodule outside ``skip`` (what must agree to copy weights)."""
    return [
        (name, type(module).__name__, module.extra_repr())
        for name, module in model.named_modules()
        if name and not any(name == s or name.startswith(s + ".") for s in skip)
    ]


def _check_same_structure(model: nn.Module, dense: nn.Module, skip: Sequence[str], how: str) -> None:
    ours, theirs = _structure(model, skip), _structure(dense, skip)
    dense_names = {name for name, _, _ in theirs}
    ours = [m for m in ours if m[1] != "Identity" or m[0] in dense_names]  # placeholders that compute nothing
    if ours != theirs:
        diff = [f"{a} vs dense {b}" for a, b in zip(ours, theirs) if a != b][:5]
        if not diff:
            diff = [f"{len(ours)} modules vs dense {len(theirs)}"]
        raise UnsupportedModelError(
            f"cannot rebuild this {type(dense).__name__} as {how} exactly; first differences: {diff}"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _finish(model: nn.Module, dense: nn.Module, arch: str, args: dict[str, Any]) -> nn.Module:
    """``model`` on ``dense``'s device/dtype and mode, with what :func:`mome.save_pretrained` records."""
    parameter = next(dense.parameters())
    if parameter.dtype != torch.float32:
        args["dtype"] = _dtype_name(parameter.dtype)
    model.mome_model_name = arch
    model.mome_model_args = args
    return model.to(device=parameter.device, dtype=parameter.dtype).train(dense.training)


def _with_dtype(model: nn.Module, dtype: str | None) -> nn.Module:
    if dtype is None:
        return model
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise InvalidArgumentError("dtype", "a torch dtype name (e.g. 'bfloat16')", dtype)
    return model.to(resolved)


def layer_spec(module: nn.Module, **kwargs: Any) -> dict[str, Any]:
    """``{"type": "torch.nn.GELU", **kwargs}``: a JSON record of a ``torch.nn`` or ``timm.layers`` class."""
    import importlib

    cls = type(module)
    for prefix, namespace in _LAYER_NAMESPACES.items():
        if getattr(importlib.import_module(namespace), cls.__name__, None) is cls:
            return {"type": f"{prefix}.{cls.__name__}", **kwargs}
    raise UnsupportedModelError(
        f"cannot record the layer type {cls.__module__}.{cls.__qualname__} (torch.nn or timm.layers)"
    )


def layer_from_spec(spec: str | Mapping[str, Any] | None) -> Any:
    """The layer class (or partial) a :func:`layer_spec` record names; a str (timm name) or None as is."""
    import importlib

    if spec is None or isinstance(spec, str):
        return spec
    options = dict(spec)
    prefix, _, name = str(options.pop("type", "")).rpartition(".")
    cls = (
        getattr(importlib.import_module(_LAYER_NAMESPACES[prefix]), name, None) if prefix in _LAYER_NAMESPACES else None
    )
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise InvalidArgumentError("layer spec 'type'", "a torch.nn or timm.layers module class", dict(spec))
    return functools.partial(cls, **options) if options else cls


# ------------------------------------------------------------------------------------------ timm ViT
def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _act_spec(act: nn.Module) -> dict[str, Any]:
    return layer_spec(act, approximate=act.approximate) if isinstance(act, nn.GELU) else layer_spec(act)


def _timm_vit_kwargs(vit: nn.Module) -> dict[str, Any]:
    """The ``VisionTransformer`` arguments, as JSON, that rebuild ``vit``'s structure (checked afterwards)."""
    block = vit.blocks[0]
    attn, mlp, norm = block.attn, block.mlp, block.norm1
    drop_path = getattr(vit.blocks[-1].drop_path1, "drop_prob", 0.0)
    return dict(
        img_size=list(vit.patch_embed.img_size),
        patch_size=list(vit.patch_embed.patch_size),
        in_chans=vit.patch_embed.proj.in_channels,
        num_classes=vit.num_classes,
        global_pool=vit.global_pool,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=attn.num_heads,
        mlp_ratio=mlp.fc1.out_features / mlp.fc1.in_features,
        qkv_bias=attn.qkv.bias is not None,
        qk_norm=not _is_identity(attn.q_norm),
        scale_attn_norm=not _is_identity(getattr(attn, "norm", None)),
        scale_mlp_norm=not _is_identity(getattr(mlp, "norm", None)),
        proj_bias=attn.proj.bias is not None,
        init_values=None if _is_identity(block.ls1) else 1.0,  # values come with the weights
        class_token=vit.cls_token is not None,
        pos_embed="learn" if vit.pos_embed is not None else "none",
        no_embed_class=vit.no_embed_class,
        reg_tokens=vit.num_reg_tokens,
        pre_norm=not _is_identity(vit.norm_pre),
        final_norm=not (_is_identity(vit.norm) and _is_identity(vit.fc_norm)),
        fc_norm=not _is_identity(vit.fc_norm),
        pool_include_prefix=getattr(vit, "pool_include_prefix", False),
        dynamic_img_size=vit.dynamic_img_size,
        dynamic_img_pad=getattr(vit.patch_embed, "dynamic_img_pad", False),
        drop_rate=vit.head_drop.p,
        pos_drop_rate=vit.pos_drop.p,
        proj_drop_rate=attn.proj_drop.p,
        attn_drop_rate=attn.attn_drop.p,
        drop_path_rate=drop_path,
        norm_layer=layer_spec(norm, eps=norm.eps),
        act_layer=_act_spec(mlp.act),
    )


@register_model
def upcycled_timm_vit(
    pretrained: bool = False,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    moe_layers: str | Sequence[int] = "every_2",
    router: str = "top_k",
    moe_kwargs: Mapping[str, Any] | None = None,
    act_layer: str | Mapping[str, Any] | None = None,
    norm_layer: str | Mapping[str, Any] | None = None,
    dtype: str | None = None,
    **kwargs: Any,
) -> MoEVisionTransformer:
    """A timm ViT sparsely upcycled by :func:`mome.upcycle` (what its saved folder rebuilds).

    :class:`~mome.models.MoEVisionTransformer` with a renormalised top-k router and no capacity limit
    by default (``moe_kwargs={"renormalize": True}``), so that dense weights compute the dense function.
    ``act_layer`` / ``norm_layer``: a timm layer name or a :func:`layer_spec` record; ``dtype``: the
    parameters' dtype name. The other arguments are :class:`~mome.models.MoEVisionTransformer`'s.
    """
    options = dict(moe_kwargs or {})
    if kwargs.get("moe_type", "sparse") == "sparse":
        options.setdefault("renormalize", True)
    model = MoEVisionTransformer(
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=moe_layers,
        router=router,
        moe_kwargs=options,
        act_layer=layer_from_spec(act_layer),
        norm_layer=layer_from_spec(norm_layer),
        **kwargs,
    )
    return _with_dtype(model, dtype)


def _upcycle_timm_vit(dense: nn.Module, moe_args: dict[str, Any]) -> MoEVisionTransformer:
    from .convert import convert_timm_vit

    args = {**_timm_vit_kwargs(dense), **moe_args}
    model = upcycled_timm_vit(**args)
    skip = [f"blocks.{i}.mlp" for i in model.moe_layer_indices]
    _check_same_structure(model, dense, skip, "an MoE ViT")
    model.load_state_dict(convert_timm_vit(dense.state_dict(), model), strict=True)
    data_cfg = getattr(dense, "pretrained_cfg", None) or {}
    fields = ("input_size", "mean", "std", "interpolation", "crop_pct")
    model.pretrained_cfg = model.pretrained_cfg.replace(**{k: data_cfg[k] for k in fields if k in data_cfg})
    return _finish(model, dense, "upcycled_timm_vit", args)


# ------------------------------------------------------------------------------------------ open_clip
#: ``open_clip.get_model_config("ViT-B-32")``: the default of ``upcycled_open_clip``
_OPEN_CLIP_DEFAULT = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}
_CLIP_VOCAB = 49408  # open_clip's CLIP BPE


def _tower_cfg(transformer: nn.Module) -> dict[str, Any]:
    block = transformer.resblocks[0]
    width = block.mlp.c_fc.in_features
    cfg: dict[str, Any] = dict(
        layers=len(transformer.resblocks),
        width=width,
        mlp_ratio=block.mlp.c_fc.out_features / width,
        ls_init_value=None if _is_identity(block.ls_1) else 1.0,  # values come with the weights
    )
    if block.ln_1.eps != 1e-5:
        cfg["norm_kwargs"] = {"eps": block.ln_1.eps}
    return cfg


def _open_clip_cfg(clip: nn.Module) -> dict[str, Any]:
    """The open_clip model config (``CLIP(**cfg)``) that rebuilds ``clip``'s structure (checked afterwards)."""
    visual = clip.visual
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise UnsupportedModelError(
            f"only open_clip CLIPs with a ViT image tower can be upcycled, not {type(visual).__name__}"
        )
    if not hasattr(clip, "transformer"):
        raise UnsupportedModelError(
            f"only open_clip CLIPs with a transformer text tower can be upcycled, not {type(clip).__name__}"
        )
    vision = _tower_cfg(visual.transformer)
    vision.update(
        image_size=list(visual.image_size),
        patch_size=list(visual.patch_size),
        head_width=vision["width"] // visual.transformer.resblocks[0].attn.num_heads,
        patch_dropout=float(getattr(visual.patch_dropout, "prob", 0.0)),
        no_ln_pre=_is_identity(visual.ln_pre),
        final_ln_after_pool=bool(visual.final_ln_after_pool),
        pool_type=visual.pool_type,
        output_tokens=bool(visual.output_tokens),
    )
    text = _tower_cfg(clip.transformer)
    text.update(
        context_length=int(clip.context_length),
        vocab_size=int(clip.vocab_size),
        heads=clip.transformer.resblocks[0].attn.num_heads,
        no_causal_mask=clip.attn_mask is None,
        pool_type=clip.text_pool_type,
        eos_id=int(clip.text_eos_id),
        proj_type="none" if clip.text_projection is None else "linear",
        proj_bias=isinstance(clip.text_projection, nn.Linear) and clip.text_projection.bias is not None,
    )
    proj = clip.text_projection
    embed_dim = (proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]) if proj is not None else 0
    from open_clip.transformer import QuickGELU

    cfg: dict[str, Any] = dict(
        embed_dim=int(embed_dim or visual.output_dim),
        vision_cfg=vision,
        text_cfg=text,
        quick_gelu=isinstance(visual.transformer.resblocks[0].mlp.gelu, QuickGELU),
    )
    if clip.logit_scale.dim():
        cfg["nonscalar_logit_scale"] = True
    if getattr(clip, "logit_bias", None) is not None:
        cfg["init_logit_bias"] = 0.0  # SigLIP: the value comes with the weights
    return cfg


def _clip_ffn_as_mlp(ffn: nn.Module) -> nn.Module:
    """open_clip's ``mlp`` (``Sequential(c_fc, gelu, c_proj)``) viewed as a timm ``Mlp`` (same modules)."""
    from timm.layers import Mlp

    names = [name for name, _ in ffn.named_children()]
    if names != ["c_fc", "gelu", "c_proj"]:
        raise UnsupportedModelError(
            f"cannot upcycle an open_clip MLP with children {names} (expected c_fc, gelu, c_proj)"
        )
    with torch.device("meta"):
        mlp = Mlp(ffn.c_fc.in_features, ffn.c_fc.out_features)
    mlp.fc1, mlp.act, mlp.fc2 = ffn.c_fc, ffn.gelu, ffn.c_proj
    return mlp


def _clip_moe_blocks(clip: nn.Module, moe_layers: str | Sequence[int]) -> list[str]:
    """The module names of the MLPs that become MoE layers: the chosen blocks of each tower."""
    names = []
    for tower in ("visual.transformer", "transformer"):
        blocks = clip.get_submodule(tower).resblocks
        names += [f"{tower}.resblocks.{i}.mlp" for i in resolve_moe_layers(moe_layers, len(blocks))]
    return names


@register_model
def upcycled_open_clip(
    pretrained: bool = False,
    *,
    model_cfg: Mapping[str, Any] | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    moe_layers: str | Sequence[int] = "every_2",
    moe_type: Literal["sparse", "soft"] = "sparse",
    router: str = "top_k",
    slots_per_expert: int = 1,
    moe_kwargs: Mapping[str, Any] | None = None,
    dtype: str | None = None,
) -> nn.Module:
    """An open_clip CLIP sparsely upcycled by :func:`mome.upcycle` (what its saved folder rebuilds).

    ``open_clip.model.CLIP(**model_cfg)`` (default: open_clip's ``ViT-B-32`` config) whose FFN in the
    blocks ``moe_layers`` of *each* tower is an MoE (a renormalised top-k router without a capacity
    limit by default, so that dense weights compute the dense function). The open_clip interface is
    unchanged (``encode_image``, ``encode_text``, ``forward(image, text)``, ``logit_scale``); every
    non-MoE parameter keeps open_clip's name, so the ``"open_clip"`` checkpoint format loads into it.
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIP

    cfg = copy.deepcopy(dict(model_cfg or _OPEN_CLIP_DEFAULT))
    clip = CLIP(**cfg)
    options = {"renormalize": True, **(moe_kwargs or {})} if moe_type == "sparse" else dict(moe_kwargs or {})
    for name in _clip_moe_blocks(clip, moe_layers):
        parent, _, child = name.rpartition(".")
        dense = _clip_ffn_as_mlp(clip.get_submodule(name))
        moe = build_moe_ffn(dense, num_experts, top_k, moe_type, router, slots_per_expert, options, upcycle=True)
        setattr(clip.get_submodule(parent), child, moe)
    clip.moe_layer_names = _clip_moe_blocks(clip, moe_layers)
    text_cfg = cfg.get("text_cfg", {})
    standard_bpe = text_cfg.get("vocab_size", _CLIP_VOCAB) == _CLIP_VOCAB and not text_cfg.get("hf_tokenizer_name")
    clip.pretrained_cfg = PretrainedCfg(
        input_size=(3, *clip.visual.image_size),
        mean=OPENAI_DATASET_MEAN,
        std=OPENAI_DATASET_STD,
        interpolation="bicubic",
        crop_pct=1.0,
        context_length=clip.context_length,
        tokenizer="open_clip:ViT-B-32" if standard_bpe else None,  # open_clip's CLIP BPE
        paper_ids="arXiv:2212.05055",
        paper_name="Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints",
    )
    return _with_dtype(clip, dtype)


def _upcycle_open_clip(clip: nn.Module, moe_args: dict[str, Any]) -> nn.Module:
    from .convert import convert_open_clip

    args = {"model_cfg": _open_clip_cfg(clip), **moe_args}
    model = upcycled_open_clip(**args)
    _check_same_structure(model, clip, model.moe_layer_names, "an upcycled open_clip CLIP")
    model.load_state_dict(convert_open_clip(clip.state_dict(), model), strict=True)
    data_cfg = getattr(clip, "pretrained_cfg", None) or {}
    fields = {k: data_cfg[k] for k in ("mean", "std", "interpolation") if data_cfg.get(k) is not None}
    if fields:
        model.pretrained_cfg = model.pretrained_cfg.replace(**fields)
    return _finish(model, clip, "upcycled_open_clip", args)


# ------------------------------------------------------------------------------------------ causal LMs
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no decoder `layers` found (Llama/Mistral/Qwen2/Phi layout expected)"
        )
    return layers


def _build_router(router: RouterSpec, dim: int, num_experts: int, top_k: int, renormalize: bool) -> Router:
    if callable(router):
        return router(dim, num_experts)
    if router not in ("top_k", "noisy_top_k"):
        raise InvalidArgumentError(
            "router", "'top_k', 'noisy_top_k' or a callable (dim, num_experts) -> Router", router
        )
    noise_std = 1.0 if router == "noisy_top_k" else 0.0
    return TopKRouter(dim, num_experts, top_k, renormalize=renormalize, noise_std=noise_std)


def _moe_into_lm(
    model: nn.Module,
    num_experts: int,
    top_k: int,
    moe_layers: str | Sequence[int],
    router: RouterSpec,
    renormalize: bool,
    moe_kwargs: Mapping[str, Any],
) -> nn.Module:
    """Replace the chosen decoder layers' ``mlp`` of ``model`` (in place) by MoEs of copies of it; a router that
    looks across the sequence is refused unless ``moe_kwargs["allow_noncausal_routing"]`` (``check_causal_safe``)."""
    layers = _decoder_layers(model)
    dim = model.config.hidden_size
    moe_kwargs = dict(moe_kwargs)
    allow_noncausal = bool(moe_kwargs.pop("allow_noncausal_routing", False))
    segments = moe_kwargs.pop("fine_grained", 1)  # DeepSeekMoE: m * num_experts experts, top m * top_k
    check_int("fine_grained", segments, owner="upcycle")
    for index in resolve_moe_layers(moe_layers, len(layers)):
        mlp = layers[index].mlp
        parameter = next(mlp.parameters())
        gate = _build_router(router, dim, segments * num_experts, segments * top_k, renormalize)
        moe = MoE.from_dense(mlp, num_experts, top_k, router=gate, fine_grained=segments, **moe_kwargs)
        check_causal_safe(moe, allow_noncausal=allow_noncausal)
        layers[index].mlp = moe.to(device=parameter.device, dtype=parameter.dtype)
    return model


#: the default of ``upcycled_causal_lm``: a small Llama (a demo size, not a released model)
_CAUSAL_LM_DEFAULT = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


@register_model
def upcycled_causal_lm(
    pretrained: bool = False,
    *,
    config: Mapping[str, Any] | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    moe_layers: str | Sequence[int] = "every_2_from_0",
    router: str = "top_k",
    renormalize: bool = True,
    moe_kwargs: Mapping[str, Any] | None = None,
    attn_implementation: str | None = None,
    dtype: str | None = None,
) -> nn.Module:
    """A transformers causal LM sparsely upcycled by :func:`mome.upcycle` (what its saved folder rebuilds).

    ``AutoModelForCausalLM.from_config`` of ``config`` (a transformers config dict with its
    ``model_type``; default: a 4-layer Llama of width 256) whose decoder layers ``moe_layers`` have an
    :class:`~mome.layers.MoE` FFN built by :meth:`~mome.layers.MoE.from_dense`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(config or _CAUSAL_LM_DEFAULT)
    model_type = options.pop("model_type", None)
    if not model_type:
        raise InvalidArgumentError(
            "config['model_type']", "a transformers model type (e.g. 'llama')", model_type, "upcycled_causal_lm"
        )
    hf_config = AutoConfig.for_model(model_type, **options)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(hf_config, **extra)
    model = _moe_into_lm(model, num_experts, top_k, moe_layers, router, renormalize, moe_kwargs or {})
    model.pretrained_cfg = PretrainedCfg(
        paper_ids="arXiv:2212.05055",
        paper_name="Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints",
    )
    return _with_dtype(model, dtype)


def _upcycle_causal_lm(
    dense: nn.Module,
    num_experts: int,
    top_k: int,
    moe_layers: str | Sequence[int],
    router: RouterSpec,
    renormalize: bool,
    moe_kwargs: Mapping[str, Any],
) -> nn.Module:
    model = _moe_into_lm(copy.deepcopy(dense), num_experts, top_k, moe_layers, router, renormalize, moe_kwargs)
    if callable(router):
        return model  # runs, but cannot be recorded: save_pretrained asks for model_name=
    args = dict(
        config=json.loads(dense.config.to_json_string(use_diff=False)),
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=moe_layers if isinstance(moe_layers, str) else [int(i) for i in moe_layers],
        router=router,
        renormalize=renormalize,
        moe_kwargs=dict(moe_kwargs),
        attn_implementation=getattr(dense.config, "_attn_implementation", None),
    )
    with torch.device("meta"):  # the recorded arguments must rebuild this structure
        rebuilt = upcycled_causal_lm(**args)
    _check_same_structure(rebuilt, model, [], "an upcycled causal LM")
    model.pretrained_cfg = rebuilt.pretrained_cfg
    return _finish(model, dense, "upcycled_causal_lm", args)
