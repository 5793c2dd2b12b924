"""Dense checkpoints into mome's MoE models: sparse upcycling by key map.

Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR 2023, arXiv:2212.05055): every expert of an MoE layer starts as a copy of the
dense FFN it replaces, ``W_in[e] = fc1.weight``, ``W_out[e] = fc2.weight`` for all ``e``; the
router (and a Soft MoE's ``mu``/``scale``, and any shared expert) keeps the model's own init.

- :func:`convert_timm_vit`: a timm ``VisionTransformer`` state dict into a V-MoE / Soft-MoE ViT
  (:class:`~mome.models.MoEVisionTransformer`). Non-MoE parameters have timm's names already; in
  an MoE block ``blocks.i.mlp.fc{1,2}.{weight,bias}`` fill ``blocks.i.mlp.experts.{w,b}_{in,out}``.
  ``pos_embed`` is resampled to the model's grid.
- :func:`convert_open_clip`: an open_clip CLIP state dict into

  * an upcycled open_clip CLIP (``mome.upcycle(clip)``, arch ``upcycled_open_clip``): open_clip's own
    names everywhere; in an MoE block ``mlp.c_fc`` / ``mlp.c_proj`` fill every expert. The dense
    function is kept (renormalised top-k, dropless).
  * a :class:`~mome.models.limoe.LIMoE`, as an *initialisation only*. LIMoE has *one* tower for both
    modalities, so its blocks come from one CLIP tower (``shared_blocks_from``, the visual tower by
    default; the other tower's blocks are left out by that choice). The text embeddings, ``ln_final``
    and ``text_projection`` map through :func:`~mome.models.limoe.limoe_state_dict_from_open_clip_text`;
    the image side maps ``visual.conv1`` -> ``patch_embed.proj`` (bias 0: CLIP's conv has none),
    ``visual.positional_embedding[1:]`` -> ``pos_embed`` (LIMoE has no class token),
    ``visual.ln_post`` -> ``image_norm``, ``visual.proj`` (``[D, E]``) -> ``image_proj.weight``
    (bias 0), and ``logit_scale``. ``visual.class_embedding`` (with the class row of the positions)
    and ``visual.ln_pre`` have no LIMoE counterpart and are reported unless ignored
    (:data:`OPEN_CLIP_NO_COUNTERPART`). The LIMoE does not compute the CLIP's function: one tower
    serves both modalities, CLIP's text attention is causal and its image head pools the class token,
    LIMoE's text is bidirectional and its image head averages the patches.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from ..layers import Experts
from ..layers.experts import segment_dense
from ..models.limoe import LIMoE, limoe_state_dict_from_open_clip_text
from ._keymap import KeyMap, resample_pos_embed

__all__ = ["OPEN_CLIP_NO_COUNTERPART", "convert_open_clip", "convert_timm_vit"]

#: open_clip CLIP keys (prefixes) with no LIMoE counterpart; pass them as ``ignore_prefixes`` to accept the loss.
OPEN_CLIP_NO_COUNTERPART = ("visual.class_embedding", "visual.ln_pre.")

#: stacked Experts parameter <- dense FFN parameter (both nn.Linear layout), per dense naming (timm, open_clip)
_EXPERTS_FROM_FFN = {
    "timm": (("w_in", "fc1.weight"), ("b_in", "fc1.bias"), ("w_out", "fc2.weight"), ("b_out", "fc2.bias")),
    "open_clip": (("w_in", "c_fc.weight"), ("b_in", "c_fc.bias"), ("w_out", "c_proj.weight"), ("b_out", "c_proj.bias")),
}


def _moe_ffns(model: nn.Module) -> list[tuple[str, Experts]]:
    """``(module name, experts)`` of every MoE FFN of ``model`` (sparse or soft)."""
    return [(name, m.experts) for name, m in model.named_modules() if isinstance(getattr(m, "experts", None), Experts)]


def _copy_dense_ffns(km: KeyMap, model: nn.Module, naming: str) -> None:
    """Every expert of each MoE FFN ``<name>`` from the dense FFN of the same name (``<name>.fc1.weight``, ...);
    a layer with ``fine_grained=m`` (DeepSeekMoE) gets the dense FFN's ``m`` hidden segments (``segment_dense``)."""
    for name, experts in _moe_ffns(model):
        segments = getattr(model.get_submodule(name), "fine_grained", 1)
        split = functools.partial(
            segment_dense, num_copies=experts.num_experts // segments, fine_grained=segments, gated=experts.gated
        )
        for ours, theirs in _EXPERTS_FROM_FFN[naming]:  # [out, in] -> [E, out, in]; [out] -> [E, out]
            if f"{name}.experts.{ours}" in km.target:
                km.copy(f"{name}.experts.{ours}", f"{name}.{theirs}", functools.partial(split, ours))


def _keep_moe_init(km: KeyMap, model: nn.Module) -> None:
    """Routers, Soft-MoE slot parameters and shared experts of the MoE FFNs keep the model's init."""
    for name, _ in _moe_ffns(model):
        for key in km.target:
            if key.startswith(f"{name}.") and key not in km.attempted:
                km.keep_target(key)


def convert_timm_vit(
    state: Mapping[str, Tensor], model: nn.Module, *, ignore_prefixes: Iterable[str] = ()
) -> dict[str, Tensor]:
    """A dense timm ViT state dict -> ``model``'s (a V-MoE or Soft-MoE ViT), FFNs copied into every expert.

    Raises :class:`~mome.CheckpointMismatchError` on keys without a counterpart, missing keys or
    shapes that disagree (e.g. a different width or depth).
    """
    km = KeyMap(state, model.state_dict(), "timm ViT state dict", ignore_prefixes)
    _copy_dense_ffns(km, model, "timm")
    _keep_moe_init(km, model)
    if "pos_embed" in km.target:
        prefix_tokens = 0 if model.no_embed_class else model.num_prefix_tokens
        grid = model.patch_embed.grid_size
        km.copy(
            "pos_embed", "pos_embed", lambda p: resample_pos_embed(p, km.target["pos_embed"].shape, grid, prefix_tokens)
        )
    km.copy_same_names()
    return km.finish()


def convert_open_clip(
    state: Mapping[str, Tensor],
    model: nn.Module,
    *,
    ignore_prefixes: Iterable[str] = (),
    shared_blocks_from: Literal["visual", "text"] = "visual",
) -> dict[str, Tensor]:
    """An open_clip CLIP state dict -> ``model``'s: an upcycled CLIP (``upcycled_open_clip``) of the same
    configuration, or a LIMoE of the same width and depth (an initialisation); see the module docstring.

    Routers keep the model's init. Raises :class:`~mome.CheckpointMismatchError` on keys without
    a counterpart (e.g. :data:`OPEN_CLIP_NO_COUNTERPART`, unless in ``ignore_prefixes``), missing
    keys or shapes that disagree.
    """
    if not isinstance(model, LIMoE):  # an upcycled CLIP: open_clip's names, FFNs into every expert
        km = KeyMap(state, model.state_dict(), "open_clip checkpoint", ignore_prefixes)
        _copy_dense_ffns(km, model, "open_clip")
        _keep_moe_init(km, model)
        km.copy_same_names()
        return km.finish()
    if shared_blocks_from not in ("visual", "text"):
        raise ValueError(f"shared_blocks_from must be 'visual' or 'text', got {shared_blocks_from!r}")
    blocks_src = "visual.transformer.resblocks." if shared_blocks_from == "visual" else "transformer.resblocks."
    other = "transformer.resblocks." if shared_blocks_from == "visual" else "visual.transformer.resblocks."
    km = KeyMap(state, model.state_dict(), "open_clip checkpoint", (*ignore_prefixes, other))

    # Text embeddings + the chosen tower's blocks, in the text tower's names, through LIMoE's own map.
    text_keys = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
    tower = {key: km.take(key) for key in (*text_keys, "text_projection")}
    tower.update({"transformer.resblocks." + k.removeprefix(blocks_src): state[k] for k in km.keys(blocks_src)})
    if all(value is not None for value in tower.values()):
        try:
            mapped = limoe_state_dict_from_open_clip_text(tower, model)
        except (KeyError, ValueError) as err:
            km.error(f"open_clip tower does not map onto this LIMoE: {err}")
        else:
            for key in km.keys(blocks_src):
                km.take(key)
            for key, value in mapped.items():
                km.put(key, value, "open_clip " + key)

    # Image side.
    km.copy("patch_embed.proj.weight", "visual.conv1.weight")
    for key in ("patch_embed.proj.bias", "image_proj.bias", "text_proj.bias"):
        km.put(key, torch.zeros_like(km.target[key]))  # CLIP has no bias there
    grid = model.patch_embed.grid_size
    km.copy(
        "pos_embed",
        "visual.positional_embedding",  # [1 + N, D]: drop the class row -> [1, N, D]
        lambda p: resample_pos_embed(p[1:].unsqueeze(0), km.target["pos_embed"].shape, grid, 0),
    )
    km.copy("image_norm.weight", "visual.ln_post.weight")
    km.copy("image_norm.bias", "visual.ln_post.bias")
    km.copy("image_proj.weight", "visual.proj", lambda w: w.t())  # [D, E] -> [E, D]
    km.copy("logit_scale", "logit_scale")
    _keep_moe_init(km, model)
    return km.finish()
