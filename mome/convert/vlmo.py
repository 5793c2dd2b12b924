"""Convert ``microsoft/unilm/vlmo`` checkpoints onto :class:`mome.models.vlmo.VLMo`.

Paper: Bao et al., "VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-Experts",
NeurIPS 2022 (arXiv:2111.02358). Upstream loader: ``vlmo/vlmo/modules/vlmo_module.py``
(``load_pretrained_weight``), model: ``vlmo/vlmo/modules/multiway_transformer.py``.

Key map (upstream -> mome; ``m`` = ``imag`` for expert 0 (image), ``text`` for expert 1):

=====================================================  ================================================
``transformer.{cls_token,pos_embed,patch_embed.*}``     ``{cls_token,pos_embed,patch_embed.*}``
``transformer.blocks.i.{norm1,attn.*,gamma_1,gamma_2}``  ``blocks.i.{...}`` (same names)
``transformer.blocks.i.mlp_<m>.fc1.{weight,bias}``       ``blocks.i.mlp.moe.experts.{w_in,b_in}[e]``
``transformer.blocks.i.mlp_<m>.fc2.{weight,bias}``       ``blocks.i.mlp.moe.experts.{w_out,b_out}[e]``
``transformer.blocks.i.norm2_<m>.{weight,bias}``         ``blocks.i.mlp.norm.{weight,bias}[e]``
``transformer.blocks.i.mlp_vl.*`` / ``norm2_vl.*``       ``blocks.i.mlp.vl_ffn.*`` / ``vl_norm.*``
``transformer.norm.*``                                  ``norm.*``
``itc_*_proj.fc.weight``, ``itm_score.fc.*``            ``itc_*_proj.weight``, ``itm_score.*``
everything else (``relative_position_bias_table``,       the same name
``text_embeddings.*``, ``token_type_embeddings``,
``pooler.*``, ``mlm_score.*``, ``logit_*scale``)
=====================================================  ================================================

Loader quirks reproduced (as upstream's ``load_pretrained_weight``):

- ``text_embeddings.position_embeddings.weight`` is cropped to the model's ``max_text_len`` rows;
  ``text_embeddings.position_ids`` (a buffer) is checked to be ``arange`` and consumed.
- ``transformer.pos_embed`` (base_plus) is resampled bicubically to the model's patch grid.
- The shared relative-position table ``[R, heads * depth]`` (layer ``l`` reads columns
  ``[l*heads, (l+1)*heads)``, see :mod:`mome.models.vlmo`) is resized for another image resolution
  with the geometric-progression interpolation of BEiT/VLMo
  (:func:`timm.layers.resize_rel_pos_bias_table`), keeping the CLS and text rows.
- The stored index buffers (``relative_position_index``, ``text_relative_position_index``,
  ``text_imag_relative_position_index``) are consumed and, at the same resolution, checked to
  equal the model's own (cropped like the text positions): the table rows then mean the same.

Upstream parts mome's VLMo does not have (``vqa_classifier.*``, ``nlvr2_classifier.*``, a 3-row
NLVR2 ``token_type_embeddings``) are reported, never dropped, unless the caller names them in
``ignore_prefixes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from ..models.vlmo import VLMo
from ._keymap import KeyMap, resample_pos_embed

__all__ = ["convert_unilm_vlmo"]

_UPSTREAM_MODALITY = {"image": "imag", "text": "text"}  # our MultiwayFFN.modalities -> upstream suffix
_EXPERT_PARAMS = (("w_in", "fc1.weight"), ("b_in", "fc1.bias"), ("w_out", "fc2.weight"), ("b_out", "fc2.bias"))
_BLOCK_SHARED = ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight")
_BLOCK_SHARED += ("attn.proj.weight", "attn.proj.bias", "gamma_1", "gamma_2")
_RENAMED_HEADS = {
    "itc_image_proj.weight": "itc_image_proj.fc.weight",
    "itc_text_proj.weight": "itc_text_proj.fc.weight",
    "itc_vl_image_proj.weight": "itc_vl_image_proj.fc.weight",
    "itc_vl_text_proj.weight": "itc_vl_text_proj.fc.weight",
    "itm_score.weight": "itm_score.fc.weight",
    "itm_score.bias": "itm_score.fc.bias",
}
_INDEX_BUFFERS = ("relative_position_index", "text_relative_position_index", "text_imag_relative_position_index")


def _resize_rel_pos_table(km: KeyMap, model: VLMo) -> None:
    table = km.take("relative_position_bias_table")
    if table is None:
        return
    target_shape = tuple(km.target["relative_position_bias_table"].shape)
    if table.shape[0] != target_shape[0] and table.shape[1] == target_shape[1]:
        from timm.layers import resize_rel_pos_bias_table

        try:
            table = resize_rel_pos_bias_table(table, model.patch_embed.grid_size, target_shape)
        except (ValueError, AssertionError) as err:
            km.error(f"relative_position_bias_table {tuple(table.shape)} cannot be resized to {target_shape}: {err}")
            return
    km.put("relative_position_bias_table", table, "relative_position_bias_table")


def _check_index_buffers(km: KeyMap, model: VLMo) -> None:
    """Consume upstream's stored index tensors; where the image grid agrees, they must equal ours."""
    stored = {name: km.consume(name) for name in _INDEX_BUFFERS}
    if model.relative_position_bias_table is None or any(v is None for v in stored.values()):
        return
    image = model.relative_position_index
    if stored["relative_position_index"].shape != image.shape:
        return  # another resolution: upstream rebuilds the indices too
    text_len, image_len = model.max_text_len, image.shape[0]
    stored_text_len = stored["text_relative_position_index"].shape[0]
    if stored_text_len < text_len:
        km.error(f"text_relative_position_index covers {stored_text_len} text tokens, the model {text_len}")
        return
    keep = torch.cat([torch.arange(text_len), torch.arange(stored_text_len, stored_text_len + image_len)])
    theirs = {
        "relative_position_index": stored["relative_position_index"],
        "text_relative_position_index": stored["text_relative_position_index"][:text_len, :text_len],
        "text_imag_relative_position_index": stored["text_imag_relative_position_index"][keep][:, keep],
    }
    for name, value in theirs.items():
        ours = getattr(model, name)
        if value.shape != ours.shape or not torch.equal(value.long().cpu(), ours.long().cpu()):
            km.error(f"{name} stored in the checkpoint differs from the model's (another table layout)")


def _text_positions(km: KeyMap, model: VLMo) -> None:
    km.copy(
        "text_embeddings.position_embeddings.weight",
        "text_embeddings.position_embeddings.weight",
        lambda w: w[: model.max_text_len],  # [196, D] -> [max_text_len, D]
    )
    ids = km.consume("text_embeddings.position_ids")
    if ids is not None:
        expected = torch.arange(ids.shape[-1]).expand_as(ids)
        if not torch.equal(ids.long().cpu(), expected):
            km.error("text_embeddings.position_ids is not arange(max_text_len)")


def _check_tied_decoder(km: KeyMap) -> None:
    """A model that ties the MLM decoder to the word embeddings (upstream does not) takes one tensor for both."""
    words, decoder = (km.source.get(k) for k in ("text_embeddings.word_embeddings.weight", "mlm_score.decoder.weight"))
    if words is not None and decoder is not None and not torch.equal(words, decoder):
        km.error("the model ties mlm_score.decoder.weight to the word embeddings but the checkpoint's differ")


def convert_unilm_vlmo(
    state: Mapping[str, Tensor], model: VLMo, *, ignore_prefixes: Iterable[str] = ()
) -> dict[str, Tensor]:
    """An upstream VLMo state dict -> ``model``'s state dict (see the module docstring).

    ``model`` is read for its configuration (depth, which blocks have a VL expert, text length,
    patch grid). Raises :class:`~mome.CheckpointMismatchError` naming every upstream key without a
    counterpart (unless under ``ignore_prefixes``), every needed key the checkpoint lacks and every
    shape that disagrees.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}  # DeepSpeed wrapping
    km = KeyMap(state, model.state_dict(), "unilm_vlmo checkpoint", ignore_prefixes)
    up = "transformer."
    for name in ("cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"):
        km.copy(name, up + name)
    if "pos_embed" in km.target:
        grid = model.patch_embed.grid_size
        km.copy("pos_embed", up + "pos_embed", lambda p: resample_pos_embed(p, km.target["pos_embed"].shape, grid, 1))
    for i, block in enumerate(model.blocks):
        src, dst = f"{up}blocks.{i}.", f"blocks.{i}."
        for name in _BLOCK_SHARED:
            if dst + name in km.target:
                km.copy(dst + name, src + name)
        suffixes = [_UPSTREAM_MODALITY[m] for m in block.mlp.modalities]
        for ours, theirs in _EXPERT_PARAMS:  # E modality FFNs [H, D] ... -> stacked [E, H, D] ...
            km.merge(f"{dst}mlp.moe.experts.{ours}", [f"{src}mlp_{m}.{theirs}" for m in suffixes])
        for param in ("weight", "bias"):
            km.merge(f"{dst}mlp.norm.{param}", [f"{src}norm2_{m}.{param}" for m in suffixes])
        if block.has_vl_expert:
            for param in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                km.copy(f"{dst}mlp.vl_ffn.{param}", f"{src}mlp_vl.{param}")
            for param in ("weight", "bias"):
                km.copy(f"{dst}mlp.vl_norm.{param}", f"{src}norm2_vl.{param}")
    for ours, theirs in _RENAMED_HEADS.items():
        km.copy(ours, theirs)
    if model.relative_position_bias_table is not None:
        _resize_rel_pos_table(km, model)
    _check_index_buffers(km, model)
    _text_positions(km, model)
    if model.mlm_score.decoder.weight is model.text_embeddings.word_embeddings.weight:
        _check_tied_decoder(km)
    km.copy_same_names()  # text embeddings, token types, pooler, MLM head, logit scales
    return km.finish()
