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
  with the geometric-progression bicubic interpolation of BEiT/VLMo (:func:`resize_rel_pos_table`,
  upstream's ``interp2d`` reproduced exactly), keeping the CLS and text rows.
- The stored index buffers (``relative_position_index``, ``text_relative_position_index``,
  ``text_imag_relative_position_index``) are consumed and, at the same resolution, checked to
  equal the model's own (cropped like the text positions): the table rows then mean the same.

Upstream builds only the heads of its ``loss_names``, so each released file holds its own set; the model's
``heads`` must name the same (the zoo cards do): ``vqa_classifier.*`` and ``nlvr2_classifier.*`` (with its
3-row ``token_type_embeddings``) load into the ``"vqa"`` / ``"nlvr2"`` heads. An upstream part the model
has no head for is reported, never dropped, unless the caller names it in ``ignore_prefixes``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .._errors import CheckpointMismatchError
from ..models.vlmo import VLMo
from ._keymap import KeyMap, resample_pos_embed

__all__ = ["convert_unilm_vlmo", "resize_rel_pos_table", "upstream_layer"]

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


def _geometric_offsets(src: int, dst: int) -> list[float]:
    """BEiT's source sample points for a ``src``-wide offset axis stretched onto ``dst`` offsets: spacing
    ``1, q, q^2, ...`` away from 0, with ``q`` found by bisection so that ``sum_{i<src//2} q^i`` reaches
    ``dst // 2`` (``geometric_progression`` in upstream's ``load_pretrained_weight``)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    distances, cur = [], 1.0
    for i in range(src // 2):
        distances.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(distances)] + [0.0] + distances


def resize_rel_pos_table(table: Tensor, grid: tuple[int, int], num_rows: int) -> Tensor:
    """VLMo's shared relative-position table ``[R, heads * depth]`` resized for another patch grid, as
    upstream's ``VLMo.load_pretrained_weight`` does it (BEiT's geometric-progression resize).

    The last ``num_rows - (2W-1)^2`` rows (image CLS rows, text->image, image->text and the text rows) are
    kept; the first ``(2S-1)^2`` rows, the square grid of image offsets, are sampled at the geometric source
    points of :func:`_geometric_offsets` and interpolated per column by the interpolating bicubic spline on
    that grid (upstream: ``scipy.interpolate.interp2d(x, y, z, kind="cubic")``, removed from SciPy 1.14;
    here its equivalent, ``RectBivariateSpline(y, x, z, kx=3, ky=3, s=0)``, the same FITPACK ``regrid``
    fit), evaluated at the integer offsets ``-(W-1) ... W-1`` in float64 and stored in the table's dtype.
    """
    from scipy.interpolate import RectBivariateSpline

    if grid[0] != grid[1]:
        raise ValueError(f"upstream resizes square patch grids only, not {tuple(grid)}")
    dst_size = 2 * grid[0] - 1
    num_extra = num_rows - dst_size * dst_size
    src_size = int((table.shape[0] - num_extra) ** 0.5)
    if num_extra < 0 or src_size * src_size != table.shape[0] - num_extra:
        raise ValueError(f"{table.shape[0]} rows are not a square offset grid plus the {num_extra} other rows")
    if src_size == dst_size:
        return table
    if src_size < 4:
        raise ValueError(f"a {src_size}x{src_size} offset grid is too small for a bicubic spline")
    points = _geometric_offsets(src_size, dst_size)
    half = dst_size // 2
    targets = [float(v) for v in range(-half, half + 1)]  # upstream: np.arange(-t, t + 0.1, 1.0)
    grid_rows = table[: src_size * src_size].double().cpu().numpy()
    columns = []
    for column in range(table.shape[1]):
        z = grid_rows[:, column].astype("float32").reshape(src_size, src_size)  # [y, x], as upstream's .float()
        spline = RectBivariateSpline(points, points, z, kx=3, ky=3, s=0)
        columns.append(torch.from_numpy(spline(targets, targets)).reshape(-1))  # [(2W-1)^2]
    resized = torch.stack(columns, dim=1).to(table.dtype)  # [(2W-1)^2, heads * depth]
    return torch.cat([resized.to(table.device), table[table.shape[0] - num_extra :]], dim=0)


def _resize_rel_pos_table(km: KeyMap, model: VLMo) -> None:
    table = km.take("relative_position_bias_table")
    if table is None:
        return
    target_shape = tuple(km.target["relative_position_bias_table"].shape)
    if table.shape[0] != target_shape[0] and table.shape[1] == target_shape[1]:
        try:
            table = resize_rel_pos_table(table, tuple(model.patch_embed.grid_size), target_shape[0])
        except ValueError as err:
            km.attempted.add("relative_position_bias_table")  # reported here, not copied as is
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
        if ours in km.target:
            km.copy(ours, theirs)
    if model.relative_position_bias_table is not None:
        _resize_rel_pos_table(km, model)
    _check_index_buffers(km, model)
    _text_positions(km, model)
    if model.mlm_score is not None and model.mlm_score.decoder.weight is model.text_embeddings.word_embeddings.weight:
        _check_tied_decoder(km)
    km.copy_same_names()  # text embeddings, token types, pooler, MLM head, logit scales
    try:
        return km.finish()
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{err}\n  upstream layer(s): {'; '.join(_layers_at_fault(km))}") from None


_FFN_NAMES = {"imag": "V-FFN (image expert)", "text": "L-FFN (text expert)", "vl": "VL-FFN (fusion expert)"}
_TOP_LAYERS = {
    "relative_position_bias_table": "the shared relative position bias",
    "text_embeddings": "the BERT text embeddings",
    "token_type_embeddings": "the modality type embeddings (3 rows with the NLVR2 head)",
    "pooler": "the pooler (ITM / VQA / NLVR2 input)",
    "itm_score": "the ITM head",
    "itc_image_proj": "the ITC head",
    "itc_text_proj": "the ITC head",
    "itc_vl_image_proj": "the VL-FFN ITC head",
    "itc_vl_text_proj": "the VL-FFN ITC head",
    "logit_scale": "the ITC head",
    "logit_vl_scale": "the VL-FFN ITC head",
    "mlm_score": "the MLM head",
    "vqa_classifier": "the VQA head (heads=[..., 'vqa'])",
    "nlvr2_classifier": "the NLVR2 head (heads=[..., 'nlvr2'])",
}


def upstream_layer(key: str) -> str:
    """The upstream VLMo layer an upstream key belongs to, in words: ``transformer.blocks.3.mlp_imag.fc2.bias``
    -> ``transformer.blocks.3.mlp_imag: block 3, V-FFN (image expert)``."""
    parts = key.split(".")
    if parts[:2] == ["transformer", "blocks"] and len(parts) > 3:
        block, sub = parts[2], parts[3]
        for prefix in ("mlp_", "norm2_"):
            if sub.startswith(prefix) and sub[len(prefix) :] in _FFN_NAMES:
                what = _FFN_NAMES[sub[len(prefix) :]] + (" norm" if prefix == "norm2_" else "")
                return f"transformer.blocks.{block}.{sub}: block {block}, {what}"
        return f"transformer.blocks.{block}.{sub}: block {block}, shared {'attention' if sub == 'attn' else sub}"
    if parts[0] == "transformer":
        return f"transformer.{parts[1]}: the vision embedding / final norm"
    if parts[0] in _TOP_LAYERS:
        return f"{parts[0]}: {_TOP_LAYERS[parts[0]]}"
    return f"{parts[0]}: not part of upstream's VLMo"


def _layers_at_fault(km: KeyMap) -> list[str]:
    """The upstream layers of the keys a failed conversion reports (unused, absent, mis-shaped)."""
    keys = [k for k in km.source if k not in km.used and not k.startswith(km.ignore_prefixes)] + km.absent
    for key, value in km.out.items():
        if key in km.target and tuple(value.shape) != tuple(km.target[key].shape):
            keys += km.origin[key].split(" + ")
    layers = dict.fromkeys(upstream_layer(k) for k in keys)
    return list(layers) or ["(value checks only)"]
