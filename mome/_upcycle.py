"""``mome.upcycle``: a dense model in, the matching mixture-of-experts model out (sparse upcycling).

Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR 2023, arXiv:2212.05055; MoE-LLaVA stage III, Lin et al. 2024, arXiv:2401.15947):
the FFN of each chosen block becomes an MoE whose ``E`` experts are copies of that FFN and whose
router starts from its own random init; every other parameter is copied. With a top-k router that
renormalises the chosen weights (``sum_j w_j = 1``) and no capacity limit (the default: dropless),
the upcycled model computes exactly the dense function: ``sum_j w_j FFN(x) = FFN(x)``.

Dense models understood:

- a timm ``VisionTransformer`` (module, or a timm model name, optionally ``"timm:"``-prefixed, built
  with ``timm.create_model``) -> :class:`~mome.models.MoEVisionTransformer` (V-MoE, or Soft MoE with
  ``moe_type="soft"``) of the same configuration, weights through
  :func:`mome.convert.convert_timm_vit`;
- an open_clip ``CLIP`` -> :class:`~mome.models.limoe.LIMoE` of the same width and depth, weights
  through :func:`mome.convert.convert_open_clip` (visual tower's blocks; the class embedding and
  ``ln_pre`` are left out, so this is an initialisation, not the same function);
- a transformers causal LM (Llama, Mistral, Qwen2, Phi, StableLM, ...) -> the same model (a copy)
  whose chosen decoder layers' ``mlp`` is a :class:`~mome.layers.MoE` built with
  :meth:`mome.layers.MoE.from_dense`. ``MoE`` maps ``[B, N, D] -> [B, N, D]`` like the MLP it
  replaces, so the decoder layers, ``generate`` and :func:`mome.aux_losses` work unchanged;
  ``from_pretrained`` cannot rebuild it (save it with ``safetensors.torch.save_model``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from torch import nn

from .layers import MoE, Router, TopKRouter
from .models import MoEVisionTransformer, resolve_moe_layers

__all__ = ["upcycle"]

RouterSpec = str | Callable[[int, int], Router]


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
        moe_layers: which blocks become MoE (:func:`mome.models.resolve_moe_layers`); None: V-MoE's
            ``"every_2"`` for vision and LIMoE, MoE-LLaVA's ``"every_2_from_0"`` for language models.
        router: ``"top_k"``, ``"noisy_top_k"`` (V-MoE, sigma = 1/E at training) or, for the sparse
            layers of vision models, any router name :class:`~mome.layers.SparseMoE` takes; a
            callable ``(dim, num_experts) -> Router`` for language models.
        moe_type: ``"sparse"`` or ``"soft"`` (Soft MoE; vision models only).
        renormalize: renormalise the top-k weights (needed for the upcycled model to equal the dense one).
        pretrained: with a timm name, load timm's pretrained weights (cache / hub, offline-aware).
        **moe_kwargs: further MoE options (``capacity_factor``, ``aux_loss_weights``, ``dispatch``,
            ``group_size_images``, ``slots_per_expert``, ...). Dropless unless a capacity is given.
    """
    if isinstance(dense, str):
        import timm

        dense = timm.create_model(dense.removeprefix("timm:"), pretrained=pretrained)
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(dense, MoEVisionTransformer):
        raise ValueError("this model already has MoE layers; upcycle a dense model")
    if isinstance(dense, VisionTransformer):
        return _upcycle_timm_vit(dense, num_experts, top_k, moe_layers, router, moe_type, renormalize, moe_kwargs)
    if all(hasattr(dense, name) for name in ("visual", "token_embedding", "encode_text")):
        return _upcycle_open_clip(dense, num_experts, top_k, moe_layers, router, moe_type, renormalize, moe_kwargs)
    if hasattr(dense, "config") and hasattr(dense.config, "num_hidden_layers"):
        if moe_type != "sparse":
            raise ValueError(
                "language models are upcycled with moe_type='sparse' (Soft MoE mixes tokens of a sequence)"
            )
        return _upcycle_causal_lm(dense, num_experts, top_k, moe_layers, router, renormalize, moe_kwargs)
    raise TypeError(
        f"cannot upcycle a {type(dense).__name__}: expected a timm VisionTransformer (or timm name), "
        "an open_clip CLIP or a transformers causal LM"
    )


# ------------------------------------------------------------------------------------------ timm ViT
def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _timm_vit_kwargs(vit: nn.Module) -> dict[str, Any]:
    """The ``VisionTransformer`` arguments that rebuild ``vit``'s structure (checked afterwards)."""
    block = vit.blocks[0]
    attn, mlp, norm = block.attn, block.mlp, block.norm1
    act = mlp.act
    act_layer = functools.partial(nn.GELU, approximate=act.approximate) if type(act) is nn.GELU else type(act)
    drop_path = getattr(vit.blocks[-1].drop_path1, "drop_prob", 0.0)
    return dict(
        img_size=vit.patch_embed.img_size,
        patch_size=vit.patch_embed.patch_size,
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
        norm_layer=functools.partial(type(norm), eps=norm.eps),
        act_layer=act_layer,
    )


def _structure(model: nn.Module, skip: Sequence[str]) -> list[tuple[str, str, str]]:
    return [
        (name, type(module).__name__, module.extra_repr())
        for name, module in model.named_modules()
        if name and not any(name == s or name.startswith(s + ".") for s in skip)
    ]


def _upcycle_timm_vit(
    dense: nn.Module,
    num_experts: int,
    top_k: int,
    moe_layers: str | Sequence[int] | None,
    router: RouterSpec,
    moe_type: str,
    renormalize: bool,
    moe_kwargs: Mapping[str, Any],
) -> MoEVisionTransformer:
    from .convert import convert_timm_vit

    options = dict(moe_kwargs)
    slots = options.pop("slots_per_expert", 1)
    group_size_images = options.pop("group_size_images", None)
    if moe_type == "sparse":
        options.setdefault("renormalize", renormalize)
    model = MoEVisionTransformer(
        num_experts=num_experts,
        top_k=top_k,
        moe_layers="every_2" if moe_layers is None else moe_layers,
        moe_type=moe_type,
        router=router,
        slots_per_expert=slots,
        group_size_images=group_size_images,
        moe_kwargs=options,
        **_timm_vit_kwargs(dense),
    )
    skip = [f"blocks.{i}.mlp" for i in model.moe_layer_indices]
    ours, theirs = _structure(model, skip), _structure(dense, skip)
    if ours != theirs:
        diff = [f"{a} vs dense {b}" for a, b in zip(ours, theirs) if a != b][:5]
        raise ValueError(f"cannot rebuild this {type(dense).__name__} as an MoE ViT exactly; first differences: {diff}")
    model.load_state_dict(convert_timm_vit(dense.state_dict(), model), strict=True)
    data_cfg = getattr(dense, "pretrained_cfg", None) or {}
    fields = ("input_size", "mean", "std", "interpolation", "crop_pct")
    model.pretrained_cfg = model.pretrained_cfg.replace(**{k: data_cfg[k] for k in fields if k in data_cfg})
    parameter = next(dense.parameters())
    return model.to(device=parameter.device, dtype=parameter.dtype).train(dense.training)


# ------------------------------------------------------------------------------------------ open_clip
def _upcycle_open_clip(
    clip: nn.Module,
    num_experts: int,
    top_k: int,
    moe_layers: str | Sequence[int] | None,
    router: RouterSpec,
    moe_type: str,
    renormalize: bool,
    moe_kwargs: Mapping[str, Any],
) -> nn.Module:
    from .convert import OPEN_CLIP_NO_COUNTERPART, convert_open_clip
    from .models.limoe import LIMoE

    visual = clip.visual
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise TypeError(f"only open_clip CLIPs with a ViT image tower can become a LIMoE, not {type(visual).__name__}")
    block = visual.transformer.resblocks[0]
    width = visual.conv1.out_channels
    options = dict(moe_kwargs)
    slots = options.pop("slots_per_expert", 1)
    if moe_type == "sparse":
        options.setdefault("renormalize", renormalize)
        options.setdefault("num_modalities", 2)  # image and text tokens share the routed layers
    model = LIMoE(
        img_size=visual.image_size,
        patch_size=visual.conv1.kernel_size,
        in_chans=visual.conv1.in_channels,
        width=width,
        depth=len(visual.transformer.resblocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.c_fc.out_features / width,
        embed_dim=visual.proj.shape[1],
        vocab_size=clip.token_embedding.num_embeddings,
        context_length=clip.positional_embedding.shape[0],
        num_experts=num_experts,
        top_k=top_k,
        moe_layers="every_2" if moe_layers is None else moe_layers,
        moe_type=moe_type,
        router=router,
        slots_per_expert=slots,
        moe_kwargs=options,
        act_layer=type(block.mlp.gelu),
    )
    state = convert_open_clip(clip.state_dict(), model, ignore_prefixes=OPEN_CLIP_NO_COUNTERPART)
    model.load_state_dict(state, strict=True)
    parameter = next(clip.parameters())
    return model.to(device=parameter.device, dtype=parameter.dtype).train(clip.training)


# ------------------------------------------------------------------------------------------ causal LMs
def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: no decoder `layers` found (Llama/Mistral/Qwen2/Phi layout expected)")
    return layers


def _build_router(router: RouterSpec, dim: int, num_experts: int, top_k: int, renormalize: bool) -> Router:
    if callable(router):
        return router(dim, num_experts)
    if router not in ("top_k", "noisy_top_k"):
        raise ValueError(
            f"router must be 'top_k', 'noisy_top_k' or a callable (dim, num_experts) -> Router, not {router!r}"
        )
    noise_std = 1.0 if router == "noisy_top_k" else 0.0
    return TopKRouter(dim, num_experts, top_k, renormalize=renormalize, noise_std=noise_std)


def _upcycle_causal_lm(
    dense: nn.Module,
    num_experts: int,
    top_k: int,
    moe_layers: str | Sequence[int] | None,
    router: RouterSpec,
    renormalize: bool,
    moe_kwargs: Mapping[str, Any],
) -> nn.Module:
    model = copy.deepcopy(dense)
    layers = _decoder_layers(model)
    indices = resolve_moe_layers("every_2_from_0" if moe_layers is None else moe_layers, len(layers))
    dim = model.config.hidden_size
    for index in indices:
        mlp = layers[index].mlp
        parameter = next(mlp.parameters())
        gate = _build_router(router, dim, num_experts, top_k, renormalize)
        moe = MoE.from_dense(mlp, num_experts, top_k, router=gate, **moe_kwargs)
        layers[index].mlp = moe.to(device=parameter.device, dtype=parameter.dtype)
    return model
