"""VLMo: a unified vision-language Transformer with mixture-of-modality-experts (MoME) blocks.

Paper: "VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-Experts", Bao et al.,
NeurIPS 2022 (https://arxiv.org/abs/2111.02358). Upstream: ``microsoft/unilm/vlmo`` (PyTorch).

Every block has one self-attention shared by all modalities and a pool of modality experts, picked
by the token's modality rather than by a learned gate:

    x' = x + gamma_1 * Attn(LN_1(x))                       (shared; BEiT attention and layer scale)
    y  = x' + gamma_2 * FFN_m(LN_m(x'))                    m = image (V-FFN) or text (L-FFN)
    y  = x' + gamma_2 * FFN_vl(LN_vl(x'))                  fusion blocks i >= vlffn_start_layer_index

The modality FFNs of a block are one :class:`mome.layers.MultiwayFFN` (an MoE with a
:class:`~mome.layers.ModalityRouter`; modality ids 0 = image, 1 = text), so
:func:`mome.routing_stats` shows which expert each modality used. Three ways to run the same weights:

- image only (:meth:`VLMo.encode_image`): ``[CLS, patches]`` through the V-FFNs of every block;
- text only (:meth:`VLMo.encode_text`): ``[CLS, words]`` through the L-FFNs of every block;
- fusion (:meth:`VLMo.forward_fusion`): ``[text; image]``; below ``vlffn_start_layer_index`` text
  tokens use the L-FFN and image tokens the V-FFN, from it on every token uses the VL-FFN.

The two encoders form a dual encoder for retrieval (ITC: ``itc_image_proj``/``itc_text_proj`` on
the CLS tokens, ``logit_scale``); the fusion encoder feeds the ITM head (``Linear(D, 2)`` on the
pooled text CLS) and the MLM head. Pre-training adds a second contrastive pair whose top blocks use
the VL-FFN (``encode_image(..., vlffn=True)`` with ``itc_vl_*_proj`` and ``logit_vl_scale``).
Fine-tuning heads on the pooled fusion CLS ``p``: VQA, ``vqa_classifier(p)`` (``Linear(D, 2D)``, LayerNorm,
GELU, ``Linear(2D, answers)``); NLVR2, ``nlvr2_classifier([p_0; p_1])`` over the two images of a pair, the
second image with a third token type. A model has only the ``heads`` it is built with, as upstream builds
only those of its ``loss_names`` (a released file holds exactly those).

Positions. base and large: no absolute position embedding (the BERT position table exists but is
unused, as with upstream's ``position_embedding_type="rel_pos"``), and one relative-position-bias
table shared by all layers, ``relative_position_bias_table [R, heads * depth]`` whose columns
``[l * heads, (l + 1) * heads)`` are layer ``l``'s. Its rows, as upstream lays them out
(``W`` = patches per side, ``T`` = ``rel_pos_text_len``, 196 for the released models):

- ``[0, (2W-1)^2)``: BEiT's 2-D image offsets, row ``(dy + W-1) * (2W-1) + (dx + W-1)`` for query
  minus key patch coordinates ``(dy, dx)``; then image CLS->patch, patch->CLS, CLS->CLS
  (``n_img = (2W-1)^2 + 3`` rows in all);
- ``n_img``: text query -> image key; ``n_img + 1``: image query -> text key;
- ``n_img + 2 + (j - i) + (T - 2)``: text query ``i`` -> text key ``j`` (both >= 1; note key minus
  query, the opposite sign of the image rows), ``2T - 3`` rows; then text CLS->word, word->CLS,
  CLS->CLS (``R = n_img + 2T + 2`` rows).

base_plus: learned absolute ``pos_embed`` for the image, BERT absolute positions for text, no
relative bias and no layer scale. Images are resized (bicubic) to the input size and normalised to
[-1, 1] (mean = std = 0.5, upstream's ``inception_normalize``); text is ``bert-base-uncased``.

Parameter names follow upstream's (``relative_position_bias_table``, ``text_embeddings.*``,
``token_type_embeddings``, ``blocks.i.attn.{qkv,q_bias,v_bias,proj}``, ``blocks.i.gamma_{1,2}``,
``pooler.dense``, ``mlm_score.*``) without the ``transformer.`` prefix, except: the expert FFNs of
block ``i`` are ``blocks.i.mlp.moe.experts.{w_in,b_in,w_out,b_out}[m]`` (upstream ``mlp_imag``
for m=0, ``mlp_text`` for m=1) with norms ``blocks.i.mlp.norm.{weight,bias}[m]`` (``norm2_imag``,
``norm2_text``), the VL expert is ``blocks.i.mlp.vl_ffn``/``vl_norm`` (``mlp_vl``/``norm2_vl``),
and the ITC/ITM heads are plain ``nn.Linear`` (upstream ``itc_*_proj.fc``, ``itm_score.fc``); the VQA and
NLVR2 classifiers keep upstream's ``vqa_classifier.{0,1,3}`` / ``nlvr2_classifier.{0,1,3}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed, trunc_normal_, use_fused_attn
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._checks import check_finite, check_ids_in_range, check_int
from .._errors import InvalidArgumentError, InvalidInputError, UnsupportedModelError, UnsupportedOptionError
from .._pretrained import PretrainedCfg
from .._registry import register_model
from ..layers import Experts, MultiwayFFN
from ._moe_vit import (
    building,
    check_images,
    check_tensor_shape,
    check_transformer,
    owner_name,
    parameter_names,
    reject_unknown_options,
    resolve_moe_layers,
)

__all__ = [
    "VLMo",
    "VLMoAttention",
    "VLMoBlock",
    "fusion_relative_position_index",
    "image_relative_position_index",
    "text_relative_position_index",
]

IMAGE, TEXT = 0, 1  # modality ids, indices into MultiwayFFN.modalities
#: The task heads a VLMo may have (upstream builds the heads of its ``loss_names``).
HEADS = ("itc", "itc_vl", "itm", "mlm", "vqa", "nlvr2")
#: Those of VLMo's pre-training (ITC on both paths, ITM, MLM): the released ``*_patch16_224.pt`` files.
PRETRAINING_HEADS = ("itc", "itc_vl", "itm", "mlm")
MODALITIES = ("image", "text")


# ----------------------------------------------------------------------------------- position indices
def image_relative_position_index(window: tuple[int, int]) -> Tensor:
    """BEiT's index of ``[CLS, patches]`` pairs into the image rows of the table: ``[P+1, P+1]``.

    Patch pairs get ``(dy + Wh-1) * (2Ww-1) + (dx + Ww-1)`` for ``(dy, dx)`` = query minus key
    coordinates; CLS->patch, patch->CLS and CLS->CLS get the three rows after the ``(2Wh-1)(2Ww-1)``
    offsets.
    """
    height, width = window
    num_offsets = (2 * height - 1) * (2 * width - 1)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, P]
    delta = coords[:, :, None] - coords[:, None, :]  # [2, P, P], query minus key
    patch_index = (delta[0] + height - 1) * (2 * width - 1) + (delta[1] + width - 1)
    num_patches = height * width
    index = torch.empty(num_patches + 1, num_patches + 1, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, :] = num_offsets  # CLS query -> patch keys
    index[:, 0] = num_offsets + 1  # patch queries -> CLS key
    index[0, 0] = num_offsets + 2
    return index


def text_relative_position_index(text_len: int, rel_pos_text_len: int, offset: int) -> Tensor:
    """Index of ``[CLS, words]`` pairs into the text rows of the table (from ``offset``): ``[L, L]``.

    Word pairs ``(i, j)`` (both >= 1) get ``offset + (j - i) + (T - 2)`` with ``T = rel_pos_text_len``;
    CLS->word, word->CLS and CLS->CLS the three rows after the ``2T - 3`` offsets.
    """
    if not 1 <= text_len <= rel_pos_text_len:
        raise InvalidInputError("text length", f"in [1, rel_pos_text_len={rel_pos_text_len}]", text_len)
    positions = torch.arange(text_len - 1)
    index = torch.empty(text_len, text_len, dtype=torch.long)
    index[1:, 1:] = offset + (positions[None, :] - positions[:, None]) + (rel_pos_text_len - 2)
    last = offset + 2 * rel_pos_text_len  # one past the text rows
    index[0, :] = last - 3
    index[:, 0] = last - 2
    index[0, 0] = last - 1
    return index


def fusion_relative_position_index(text_index: Tensor, image_index: Tensor, num_image_rows: int) -> Tensor:
    """Index of the fusion sequence ``[text; image]``: the text and image blocks on the diagonal,
    text->image pairs on row ``num_image_rows`` and image->text pairs on row ``num_image_rows + 1``."""
    text_len, image_len = text_index.shape[0], image_index.shape[0]
    text_to_image = text_index.new_full((text_len, image_len), num_image_rows)
    image_to_text = text_index.new_full((image_len, text_len), num_image_rows + 1)
    return torch.cat([torch.cat([text_index, text_to_image], 1), torch.cat([image_to_text, image_index], 1)], 0)


# ----------------------------------------------------------------------------------- blocks
class VLMoAttention(nn.Module):
    """BEiT self-attention: ``qkv`` without bias plus learned ``q_bias`` and ``v_bias`` (no key bias);
    an additive ``attn_bias`` (relative positions, padding) is added to the logits ``q k^T / sqrt(d)``."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise InvalidArgumentError("dim", f"a multiple of num_heads={num_heads}", dim, "VLMoAttention")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        """``x [B, N, D]``, ``attn_bias`` broadcastable to ``[B, heads, N, N]`` -> ``[B, N, D]``."""
        batch, tokens, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        # through the module, not its weight: a wrapped qkv (mome.peft's LoRA experts) must see its input
        qkv = (self.qkv(x) + bias).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d] each
        if self.fused_attn:
            mask = None if attn_bias is None else attn_bias.to(q.dtype)
            drop = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        else:
            logits = (q * self.scale).float() @ k.float().transpose(-2, -1)  # fp32 logits, as upstream
            if attn_bias is not None:
                logits = logits + attn_bias
            out = self.attn_drop(logits.softmax(dim=-1).to(v.dtype)) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, dim)))


class VLMoBlock(nn.Module):
    """Shared attention + :class:`~mome.layers.MultiwayFFN` (V-FFN, L-FFN, and the VL-FFN if ``vl_expert``);
    with ``moe`` the V-FFN and L-FFN are sparse MoE layers (VL-MoE's V-MoE and T-MoE), the VL-FFN stays dense."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        *,
        vl_expert: bool = False,
        layer_scale_init_values: float | None = 0.1,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        moe: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VLMoAttention(dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        hidden = int(dim * mlp_ratio)
        self.mlp = MultiwayFFN(dim, hidden, MODALITIES, vl_expert=vl_expert, norm=True, eps=1e-6, moe=moe)
        if layer_scale_init_values is not None:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_values)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_values)))
        else:
            self.register_parameter("gamma_1", None)
            self.register_parameter("gamma_2", None)

    @property
    def has_vl_expert(self) -> bool:
        return self.mlp.vl_ffn is not None

    def forward(self, x: Tensor, modality_ids: Tensor, use_vl: bool = False, attn_bias: Tensor | None = None) -> Tensor:
        y = self.attn(self.norm1(x), attn_bias=attn_bias)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(x, modality_ids, use_vl=use_vl)
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class _Pooler(nn.Module):
    """BERT pooler: ``tanh(dense(x[:, 0]))`` (upstream ``heads.Pooler``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class _MLMHead(nn.Module):
    """BERT MLM head: ``decoder(transform(x)) + bias`` (upstream ``heads.MLMHead``)."""

    def __init__(self, bert_config: Any, tied_weight: nn.Parameter | None = None) -> None:
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(bert_config)
        self.decoder = nn.Linear(bert_config.hidden_size, bert_config.vocab_size, bias=False)
        if tied_weight is not None:
            self.decoder.weight = tied_weight
        self.bias = nn.Parameter(torch.zeros(bert_config.vocab_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.transform(x)) + self.bias


# ----------------------------------------------------------------------------------- model
class VLMo(nn.Module):
    """VLMo: multiway Transformer with image, text and fusion paths and the ITC / ITM / MLM heads.

    Follows open_clip's model contract: ``forward(image, text) -> (image_features, text_features,
    logit_scale.exp())`` with L2-normalised features, ``encode_image``/``encode_text`` with
    ``normalize=``, and a ``logit_scale`` parameter.

    Args:
        img_size, patch_size, in_chans: image input (square patches; ``img_size // patch_size`` per side).
        embed_dim, depth, num_heads, mlp_ratio: Transformer size.
        vlffn_start_layer_index: first block with a VL-FFN (``depth``: none, as in text pre-training).
        max_text_len: text tokens (with CLS) the position tables cover.
        vocab_size: BERT vocabulary size (30522 for ``bert-base-uncased``).
        pad_token_id: id of padding; keys equal to it are masked out when no ``text_mask`` is given.
        use_rel_pos_bias: shared relative position bias (base, large); else BERT absolute text positions.
        use_abs_pos_emb: learned absolute image ``pos_embed`` (base_plus).
        rel_pos_text_len: text length the text rows of the bias table are laid out for
            (upstream's ``max_text_len_of_initckpt``, 196); None: ``max_text_len``.
        use_layer_scale: layer scale ``gamma_1``/``gamma_2`` (base, large; not base_plus).
        layer_scale_init_values: their initial value (0.1); None also means no layer scale.
        init_std: std of the (truncated) normal init of the linears, experts and embeddings (upstream's 0.02).
        drop_rate, attn_drop_rate, drop_path_rate: dropout, attention dropout, stochastic depth.
        tie_mlm_decoder: share the MLM decoder weight with the word embeddings (upstream does not).
        heads: the task heads the model has, as upstream builds only those of its ``loss_names`` (a checkpoint
            holds exactly these): ``"itc"`` (``itc_{image,text}_proj``, ``logit_scale``), ``"itc_vl"``
            (``itc_vl_*_proj``, ``logit_vl_scale``), ``"itm"``, ``"mlm"``, ``"vqa"`` (``vqa_classifier``) and
            ``"nlvr2"`` (``nlvr2_classifier`` and a third token type for the second image). Pre-training:
            itc, itc_vl, itm, mlm (the default); stage-2 text pre-training: mlm; retrieval fine-tuning: itc.
        vqa_num_classes: answers of the VQA classifier (3129 for VQAv2, upstream's ``vqav2_label_size``).
        moe_layers: the blocks whose V-FFN and L-FFN are sparse MoE layers (VL-MoE; see
            :func:`~mome.models.resolve_moe_layers`: ``"every_2"`` is blocks 1, 3, 5, ...); ``"none"``: VLMo.
        moe: the :class:`~mome.layers.SparseMoE` options of those layers' per-modality experts (``num_experts``,
            ``top_k``, ``router``, capacity, batch priority, losses; :class:`~mome.layers.MultiwayFFN`'s
            ``moe``); required with ``moe_layers``, refused without. The VL-FFN stays dense.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        vlffn_start_layer_index: int = 10,
        max_text_len: int = 40,
        vocab_size: int = 30522,
        pad_token_id: int = 0,
        use_rel_pos_bias: bool = True,
        use_abs_pos_emb: bool = False,
        rel_pos_text_len: int | None = None,
        use_layer_scale: bool = True,
        layer_scale_init_values: float | None = 0.1,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        tie_mlm_decoder: bool = False,
        heads: Sequence[str] = PRETRAINING_HEADS,
        vqa_num_classes: int = 3129,
        moe_layers: str | Sequence[int] = "none",
        moe: Mapping[str, Any] | None = None,
        init_std: float = 0.02,
    ) -> None:
        owner = owner_name(self)
        check_transformer(
            owner,
            width_name="embed_dim",
            width=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            rates={"drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate},
        )
        check_int("vlffn_start_layer_index", vlffn_start_layer_index, minimum=0, owner=owner)
        if vlffn_start_layer_index > depth:
            expected = f"an integer in [0, depth={depth}]"
            raise InvalidArgumentError("vlffn_start_layer_index", expected, vlffn_start_layer_index, owner)
        check_int("max_text_len", max_text_len, owner=owner)
        check_int("vocab_size", vocab_size, owner=owner)
        check_int("pad_token_id", pad_token_id, minimum=0, owner=owner)
        if pad_token_id >= vocab_size:
            raise InvalidArgumentError("pad_token_id", f"an id in [0, vocab_size={vocab_size})", pad_token_id, owner)
        check_int("rel_pos_text_len", rel_pos_text_len, owner=owner, optional=True)
        check_finite("layer_scale_init_values", layer_scale_init_values, owner=owner, optional=True)
        check_finite("init_std", init_std, owner=owner)
        if init_std <= 0:
            raise InvalidArgumentError("init_std", "a positive standard deviation", init_std, owner)
        check_int("vqa_num_classes", vqa_num_classes, owner=owner)
        heads = (heads,) if isinstance(heads, str) else tuple(heads)
        unknown = sorted(set(heads) - set(HEADS))
        if unknown:
            raise InvalidArgumentError("heads", f"a list of {', '.join(HEADS)}", list(heads), owner)
        if tie_mlm_decoder and "mlm" not in heads:
            reason = f"it ties the 'mlm' head's decoder, and heads={list(heads)} has none"
            raise UnsupportedOptionError("tie_mlm_decoder", owner, reason, tie_mlm_decoder)
        moe_layer_indices = resolve_moe_layers(moe_layers, depth, owner)
        if moe_layer_indices and not isinstance(moe, Mapping):
            expected = "a mapping of SparseMoE options (num_experts, top_k, router, ...) for the sparse experts"
            raise InvalidArgumentError("moe", expected, moe, owner)
        if moe is not None and not moe_layer_indices:
            reason = f"it configures the sparse experts of moe_layers, and moe_layers={moe_layers!r} has none"
            raise UnsupportedOptionError("moe", owner, reason, moe)
        rel_pos_text_len = max_text_len if rel_pos_text_len is None else rel_pos_text_len
        if use_rel_pos_bias and rel_pos_text_len < max_text_len:
            expected = f"an integer >= max_text_len={max_text_len} (the text rows of the relative position table)"
            raise InvalidArgumentError("rel_pos_text_len", expected, rel_pos_text_len, owner)
        super().__init__()
        from transformers.models.bert.modeling_bert import BertConfig, BertEmbeddings

        self.heads = tuple(h for h in HEADS if h in heads)
        self.in_chans = in_chans
        self.num_features = self.embed_dim = embed_dim
        self.depth, self.num_heads = depth, num_heads
        self.vlffn_start_layer_index = vlffn_start_layer_index
        self.max_text_len, self.vocab_size, self.pad_token_id = max_text_len, vocab_size, pad_token_id
        self.use_rel_pos_bias, self.rel_pos_text_len = use_rel_pos_bias, rel_pos_text_len
        self.moe_layer_indices = moe_layer_indices
        self.init_std = init_std
        self.grad_checkpointing = False

        # image embedding
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(drop_rate)

        # text embedding: BERT word / position / token-type(0) embeddings + LayerNorm
        self.bert_config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=embed_dim,
            num_attention_heads=num_heads,
            intermediate_size=int(embed_dim * mlp_ratio),
            max_position_embeddings=max_text_len,
            type_vocab_size=2,
            hidden_dropout_prob=drop_rate,
            pad_token_id=pad_token_id,
        )
        self.text_embeddings = BertEmbeddings(self.bert_config)
        # modality type embedding added to every token: row 0 = text, row 1 = image (row 2: NLVR2's second image)
        self.token_type_embeddings = nn.Embedding(3 if "nlvr2" in self.heads else 2, embed_dim)

        # blocks
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            VLMoBlock(
                embed_dim,
                num_heads,
                mlp_ratio,
                vl_expert=i >= vlffn_start_layer_index,
                layer_scale_init_values=layer_scale_init_values if use_layer_scale else None,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rates[i],
                moe=dict(moe) if i in moe_layer_indices else None,
            )
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # relative position bias, one table for all layers
        if use_rel_pos_bias:
            window = self.patch_embed.grid_size
            self.num_image_rel_rows = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
            num_rows = self.num_image_rel_rows + 2 * rel_pos_text_len + 2
            self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rows, num_heads * depth))
            image_index = image_relative_position_index(window)
            text_index = text_relative_position_index(max_text_len, rel_pos_text_len, self.num_image_rel_rows + 2)
            fusion_index = fusion_relative_position_index(text_index, image_index, self.num_image_rel_rows)
            self.register_buffer("relative_position_index", image_index, persistent=False)
            self.register_buffer("text_relative_position_index", text_index, persistent=False)
            self.register_buffer("text_imag_relative_position_index", fusion_index, persistent=False)
        else:
            self.num_image_rel_rows = 0
            self.register_parameter("relative_position_bias_table", None)
            self.relative_position_index = self.text_relative_position_index = None
            self.text_imag_relative_position_index = None

        # heads
        self.pooler = _Pooler(embed_dim)
        has = self.heads.__contains__
        self.itm_score = nn.Linear(embed_dim, 2) if has("itm") else None
        self.itc_image_proj = nn.Linear(embed_dim, embed_dim, bias=False) if has("itc") else None
        self.itc_text_proj = nn.Linear(embed_dim, embed_dim, bias=False) if has("itc") else None
        self.itc_vl_image_proj = nn.Linear(embed_dim, embed_dim, bias=False) if has("itc_vl") else None
        self.itc_vl_text_proj = nn.Linear(embed_dim, embed_dim, bias=False) if has("itc_vl") else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if has("itc") else None
        self.logit_vl_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if has("itc_vl") else None
        self.mlm_score = _MLMHead(self.bert_config) if has("mlm") else None
        self.vqa_classifier = _classifier(embed_dim, 2 * embed_dim, vqa_num_classes) if has("vqa") else None
        self.nlvr2_classifier = _classifier(2 * embed_dim, 2 * embed_dim, 2) if has("nlvr2") else None

        self.init_weights()
        if tie_mlm_decoder:
            self.mlm_score.decoder.weight = self.text_embeddings.word_embeddings.weight
        self.pretrained_cfg = PretrainedCfg(
            input_size=(in_chans, *self.patch_embed.img_size),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            crop_pct=1.0,
            context_length=max_text_len,
            tokenizer=_default_tokenizer(vocab_size),
            paper_ids="arXiv:2111.02358",
            paper_name="VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-Experts",
        )

    # ------------------------------------------------------------------------------- init / utils
    def init_weights(self) -> None:
        """Upstream's init: truncated normal (std ``init_std``, upstream's 0.02) linears and experts, normal
        (``init_std``) embeddings, LayerNorms to identity, zero relative-position table,
        ``logit_scale = log(1 / 0.07)``."""
        self.apply(self._init_module)
        trunc_normal_(self.cls_token, std=self.init_std)
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=self.init_std)
        if self.relative_position_bias_table is not None:
            nn.init.zeros_(self.relative_position_bias_table)
        with torch.no_grad():
            for scale in (self.logit_scale, self.logit_vl_scale):
                if scale is not None:
                    scale.fill_(math.log(1 / 0.07))

    def _init_module(self, module: nn.Module) -> None:
        std = self.init_std
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, Experts):
            trunc_normal_(module.w_in, std=std)
            trunc_normal_(module.w_out, std=std)
            for bias in (module.b_in, module.b_out):
                if bias is not None:
                    nn.init.zeros_(bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "relative_position_bias_table", "logit_scale", "logit_vl_scale"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def relative_position_bias(self, index: Tensor) -> list[Tensor | None]:
        """Per-layer bias ``[heads, N, N]`` for an ``[N, N]`` index: layer ``l`` reads the table's
        columns ``[l * heads, (l + 1) * heads)``. ``[None] * depth`` without relative positions."""
        if self.relative_position_bias_table is None:
            return [None] * self.depth
        bias = F.embedding(index, self.relative_position_bias_table)  # [N, N, heads * depth]
        return list(bias.permute(2, 0, 1).chunk(self.depth, dim=0))

    def fusion_position_index(self, text_len: int) -> Tensor:
        """The fusion index for ``text_len`` text tokens followed by the image tokens."""
        full = self.text_imag_relative_position_index
        device = full.device
        keep = torch.cat(
            [torch.arange(text_len, device=device), torch.arange(self.max_text_len, full.shape[0], device=device)]
        )
        return full.index_select(0, keep).index_select(1, keep)

    # ------------------------------------------------------------------------------- embeddings
    def embed_image(self, image: Tensor, token_type: int = 1) -> Tensor:
        """``[B, C, H, W]`` -> ``[B, 1 + P, D]``: CLS + patches (+ ``pos_embed``) + the image type embedding
        (row ``token_type``: 1, or 2 for NLVR2's second image)."""
        owner = owner_name(self)
        if token_type not in range(1, self.token_type_embeddings.num_embeddings):
            types = "1 (or 2 with the 'nlvr2' head: NLVR2's second image)"
            raise InvalidArgumentError("image_token_type", types, token_type, owner)
        check_images("image", image, self.in_chans, self.patch_embed.img_size, self.patch_embed, owner)
        x = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x) + self.token_type_embeddings.weight[token_type]

    def embed_text(self, text_ids: Tensor) -> Tensor:
        """``[B, L]`` ids -> ``[B, L, D]``: BERT embeddings (absolute positions only without the relative
        bias, as upstream's ``rel_pos`` BERT config) + text type embedding.

        ``text_ids`` must be integer ids ``[B, L]``, ``1 <= L <= max_text_len``, each in ``[0, vocab_size)``, else
        :class:`~mome.InvalidInputError` (named ``text``, as the public methods call it)."""
        owner = owner_name(self)
        check_ids_in_range("text", text_ids, self.vocab_size, owner=owner, what="token ids")
        if text_ids.dim() != 2 or not 1 <= text_ids.shape[1] <= self.max_text_len:
            expected = f"token ids [B, L] with 1 <= L <= max_text_len={self.max_text_len}"
            raise InvalidInputError("text", expected, f"shape {tuple(text_ids.shape)}", owner)
        emb = self.text_embeddings
        if self.use_rel_pos_bias:
            x = emb.dropout(emb.LayerNorm(emb.word_embeddings(text_ids) + emb.token_type_embeddings.weight[0]))
        else:
            x = emb(input_ids=text_ids)
        return x + self.token_type_embeddings.weight[0]

    def text_key_mask(self, text_ids: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """Boolean ``[B, L]`` of the text keys to attend to: ``text_mask``, else ``text_ids != pad``
        (the CLS position is always kept). A ``text_mask`` of another shape than ``text_ids`` is an
        :class:`~mome.InvalidInputError`."""
        if text_mask is not None:
            check_tensor_shape("text_mask", text_mask, text_ids.shape, "one flag per text id", owner_name(self))
            return text_mask.bool()
        mask = text_ids != self.pad_token_id
        mask[:, 0] = True
        return mask

    # ------------------------------------------------------------------------------- trunk
    def _run_blocks(
        self, x: Tensor, modality_ids: Tensor, index: Tensor | None, key_mask: Tensor | None, vl_from: int
    ) -> Tensor:
        biases = self.relative_position_bias(index) if index is not None else [None] * self.depth
        mask_bias = None
        if key_mask is not None:
            mask_bias = x.new_zeros(key_mask.shape).masked_fill(~key_mask, float("-inf"))[:, None, None, :]
        for i, block in enumerate(self.blocks):
            attn_bias = biases[i]
            if mask_bias is not None:
                attn_bias = mask_bias if attn_bias is None else attn_bias.unsqueeze(0) + mask_bias
            use_vl = i >= vl_from
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(block, x, modality_ids, use_vl, attn_bias, use_reentrant=False)
            else:
                x = block(x, modality_ids, use_vl=use_vl, attn_bias=attn_bias)
        return self.norm(x)

    def forward_image(
        self, image: Tensor, vlffn: bool = False, patch_mask: Tensor | None = None, mask_embedding: Tensor | None = None
    ) -> Tensor:
        """Image-only path: normalised tokens ``[B, 1 + P, D]``. Every block uses its V-FFN, or with
        ``vlffn=True`` the blocks from ``vlffn_start_layer_index`` on use the VL-FFN.

        ``patch_mask`` (bool ``[B, P]``) replaces those patch embeddings by ``mask_embedding`` ``[D]``
        (plus the image type embedding) before the blocks: masked image modelling, as BEiT's stage 1.
        """
        x = self.embed_image(image)
        if patch_mask is not None:
            owner = owner_name(self)
            if mask_embedding is None:
                raise InvalidInputError("mask_embedding", "a [D] tensor when a patch_mask is given", None, owner)
            check_tensor_shape("patch_mask", patch_mask, (x.shape[0], x.shape[1] - 1), "one flag per patch", owner)
            masked = mask_embedding + self.token_type_embeddings.weight[1]
            patches = torch.where(patch_mask[..., None], masked.to(x.dtype), x[:, 1:])  # [B, P, D]
            x = torch.cat([x[:, :1], patches], dim=1)
        modality_ids = x.new_full(x.shape[:2], IMAGE, dtype=torch.long)
        vl_from = self.vlffn_start_layer_index if vlffn else self.depth
        return self._run_blocks(x, modality_ids, self.relative_position_index, None, vl_from)

    def forward_text(self, text_ids: Tensor, text_mask: Tensor | None = None, vlffn: bool = False) -> Tensor:
        """Text-only path: normalised tokens ``[B, L, D]`` (L-FFNs; ``vlffn`` as in :meth:`forward_image`)."""
        x = self.embed_text(text_ids)
        length = text_ids.shape[1]
        modality_ids = x.new_full(x.shape[:2], TEXT, dtype=torch.long)
        index = (
            None if self.text_relative_position_index is None else self.text_relative_position_index[:length, :length]
        )
        vl_from = self.vlffn_start_layer_index if vlffn else self.depth
        return self._run_blocks(x, modality_ids, index, self.text_key_mask(text_ids, text_mask), vl_from)

    def forward_fusion(
        self, image: Tensor, text_ids: Tensor, text_mask: Tensor | None = None, image_token_type: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Fusion path on ``[text; image]``: ``(tokens [B, L + 1 + P, D], pooled [B, D])``.

        Below ``vlffn_start_layer_index`` text tokens use the L-FFN and image tokens the V-FFN; from
        it on all tokens use the VL-FFN. ``pooled`` is ``tanh(dense(text CLS))`` (ITM / VQA input).
        ``image_token_type`` picks the image's type embedding (2: NLVR2's second image).
        """
        text = self.embed_text(text_ids)
        image_tokens = self.embed_image(image, image_token_type)
        if image_tokens.shape[0] != text.shape[0]:
            expected = f"one image per text ({text.shape[0]} texts)"
            raise InvalidInputError("image", expected, f"{image_tokens.shape[0]} images", owner_name(self))
        x = torch.cat([text, image_tokens], dim=1)
        modality_ids = torch.cat(
            [
                text.new_full(text.shape[:2], TEXT, dtype=torch.long),
                image_tokens.new_full(image_tokens.shape[:2], IMAGE, dtype=torch.long),
            ],
            dim=1,
        )
        key_mask = self.text_key_mask(text_ids, text_mask)
        key_mask = torch.cat([key_mask, key_mask.new_ones(image_tokens.shape[:2])], dim=1)
        index = None if self.text_imag_relative_position_index is None else self.fusion_position_index(text.shape[1])
        x = self._run_blocks(x, modality_ids, index, key_mask, self.vlffn_start_layer_index)
        return x, self.pooler(x)

    # ------------------------------------------------------------------------------- open_clip API
    def encode_image(self, image: Tensor, normalize: bool = False, vlffn: bool = False) -> Tensor:
        """Image embedding ``[B, D]``: ``itc_image_proj(CLS)`` of the image-only path (with ``vlffn``:
        ``itc_vl_image_proj`` of the path whose top blocks use the VL-FFN)."""
        proj = self._head("itc_vl" if vlffn else "itc", self.itc_vl_image_proj if vlffn else self.itc_image_proj)
        cls = self.forward_image(image, vlffn=vlffn)[:, 0]
        features = proj(cls)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(
        self, text: Tensor, normalize: bool = False, text_mask: Tensor | None = None, vlffn: bool = False
    ) -> Tensor:
        """Text embedding ``[B, D]``: ``itc_text_proj(CLS)`` of the text-only path (``vlffn`` as above)."""
        proj = self._head("itc_vl" if vlffn else "itc", self.itc_vl_text_proj if vlffn else self.itc_text_proj)
        cls = self.forward_text(text, text_mask, vlffn=vlffn)[:, 0]
        features = proj(cls)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self,
        image: Tensor | None = None,
        text: Tensor | None = None,
        *,
        text_mask: Tensor | None = None,
        output_dict: bool = False,
    ) -> tuple[Tensor | None, Tensor | None, Tensor] | dict[str, Tensor | None]:
        """Dual encoder (open_clip): ``(image_features, text_features, logit_scale.exp())``, normalised."""
        self._head("itc", self.logit_scale)
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = self.encode_text(text, normalize=True, text_mask=text_mask) if text is not None else None
        if output_dict:
            return {
                "image_features": image_features,
                "text_features": text_features,
                "logit_scale": self.logit_scale.exp(),
            }
        return image_features, text_features, self.logit_scale.exp()

    # ------------------------------------------------------------------------------- task heads
    def itm_logits(self, image: Tensor, text_ids: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """Image-text matching logits ``[B, 2]`` (index 1 = match) from the pooled fusion CLS."""
        head = self._head("itm", self.itm_score)
        return head(self.forward_fusion(image, text_ids, text_mask)[1])

    def mlm_logits(self, text_ids: Tensor, image: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        """Masked-LM logits ``[B, L, vocab]`` over the text tokens of the fusion path (with an image)
        or of the text-only path (without, as in VLMo's text pre-training)."""
        head = self._head("mlm", self.mlm_score)
        if image is None:
            tokens = self.forward_text(text_ids, text_mask)
        else:
            tokens = self.forward_fusion(image, text_ids, text_mask)[0][:, : text_ids.shape[1]]
        return head(tokens)

    def vqa_logits(self, image: Tensor, text_ids: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """VQA answer logits ``[B, vqa_num_classes]``: ``vqa_classifier(pooled fusion CLS)`` (upstream scores
        them with a sigmoid per answer, binary cross-entropy against soft VQA scores)."""
        head = self._head("vqa", self.vqa_classifier)
        return head(self.forward_fusion(image, text_ids, text_mask)[1])

    def nlvr2_logits(
        self, image_0: Tensor, image_1: Tensor, text_ids: Tensor, text_mask: Tensor | None = None
    ) -> Tensor:
        """NLVR2 logits ``[B, 2]`` (index 1 = true) for a sentence about two images: each image is fused with
        the text (the second with token type 2) and the two pooled CLS vectors, concatenated ``[B, 2D]``,
        go through ``nlvr2_classifier``."""
        head = self._head("nlvr2", self.nlvr2_classifier)
        pooled_0 = self.forward_fusion(image_0, text_ids, text_mask, image_token_type=1)[1]
        pooled_1 = self.forward_fusion(image_1, text_ids, text_mask, image_token_type=2)[1]
        return head(torch.cat([pooled_0, pooled_1], dim=-1))

    def _head(self, name: str, module: Any) -> Any:
        if module is None:
            raise UnsupportedModelError(
                f"this VLMo has no {name!r} head (heads={list(self.heads)}); build it with heads=[..., {name!r}]"
            )
        return module


def _classifier(in_dim: int, hidden: int, num_classes: int) -> nn.Sequential:
    """Upstream's task MLP: ``Linear -> LayerNorm -> GELU -> Linear`` (keys ``0``, ``1``, ``3``)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, num_classes))


# ----------------------------------------------------------------------------------- variants
def _default_tokenizer(vocab_size: int) -> str | None:
    """BERT's uncased WordPiece for the upstream vocabulary (30522); the built-in word-level tokenizer
    (``mome:tiny-wordlevel``, 135 tokens, offline) for small demo vocabularies that hold it."""
    if vocab_size == 30522:
        return "bert-base-uncased"
    from .._tokenizer import TINY_VOCAB_SIZE

    return "mome:tiny-wordlevel" if vocab_size >= TINY_VOCAB_SIZE else None


_VLMO_ARGS = parameter_names(VLMo)


def _create_vlmo(arch: str, /, **kwargs: Any) -> VLMo:
    """``VLMo(**kwargs)``; errors name ``arch``, and a keyword :class:`VLMo` does not take is an
    :class:`~mome.UnsupportedOptionError`."""
    reject_unknown_options(arch, kwargs, _VLMO_ARGS, "not an argument of VLMo")
    with building(arch):
        return VLMo(**kwargs)


#: The sizes of the VLMo variants (``VLMo`` keyword arguments), shared with the families built on VLMo (VL-MoE).
VLMO_SIZES: dict[str, dict[str, Any]] = {
    "base": dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, vlffn_start_layer_index=10, rel_pos_text_len=196
    ),
    "base_plus": dict(
        patch_size=16,
        embed_dim=544,
        depth=24,
        num_heads=16,
        vlffn_start_layer_index=21,
        use_abs_pos_emb=True,
        use_rel_pos_bias=False,
        use_layer_scale=False,
    ),
    "large": dict(
        patch_size=16, embed_dim=1024, depth=24, num_heads=16, vlffn_start_layer_index=21, rel_pos_text_len=196
    ),
    "tiny": dict(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
        vlffn_start_layer_index=2,
        vocab_size=1000,
        max_text_len=16,
        # At width 64, upstream's init (std 0.02, layer scale 0.1) leaves the dual encoder's CLS features all but
        # input-independent (see vlmo_tiny_patch8_32); the base's per-layer gain and an undamped residual instead.
        init_std=0.02 * math.sqrt(768 / 64),
        layer_scale_init_values=1.0,
    ),
}


@register_model
def vlmo_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VLMo:
    """VLMo-Base: 12 layers, width 768, 12 heads; VL-FFN in blocks 10-11; shared relative bias, layer scale."""
    return _create_vlmo("vlmo_base_patch16_224", **{**VLMO_SIZES["base"], **kwargs})


@register_model
def vlmo_base_plus_patch16_224(pretrained: bool = False, **kwargs: Any) -> VLMo:
    """VLMo-Base+: 24 layers, width 544, 16 heads; VL-FFN in blocks 21-23; absolute positions, no layer scale."""
    return _create_vlmo("vlmo_base_plus_patch16_224", **{**VLMO_SIZES["base_plus"], **kwargs})


@register_model
def vlmo_large_patch16_224(pretrained: bool = False, **kwargs: Any) -> VLMo:
    """VLMo-Large: 24 layers, width 1024, 16 heads; VL-FFN in blocks 21-23; shared relative bias, layer scale."""
    return _create_vlmo("vlmo_large_patch16_224", **{**VLMO_SIZES["large"], **kwargs})


@register_model
def vlmo_tiny_patch8_32(pretrained: bool = False, **kwargs: Any) -> VLMo:
    """A tiny VLMo for tests and demos: 32px, patch 8, 4 layers of width 64, 4 heads, VL-FFN in blocks 2-3,
    vocabulary 1000 (tokenizer ``mome:tiny-wordlevel``, built offline), 16 text tokens; base-style positions
    (shared relative bias) and layer scale.

    Its init is scaled to its width: ``init_std = 0.02 * sqrt(768 / 64)`` (about 0.069) and layer scale 1.0,
    where upstream's base uses 0.02 and 0.1. A linear of std ``sigma`` and width ``D`` scales its input by about
    ``sigma * sqrt(D)``: 0.55 at the base's 768, 0.16 at 64. The text CLS token enters the blocks as a
    LayerNorm'd constant of norm ``sqrt(D)`` and learns about the words only through attention, whose update is
    ``gamma * W_proj W_v (mean of the words)``; with upstream's values that update is ~0.1% of the CLS token at
    width 64, so ``encode_text`` gives nearly the same vector for every caption (spread 0.05% of its norm over
    the ten "the digit {}." captions; the images' 1-2%). Against constant text features, ITC's text-to-image
    term is minimised by making every image feature the same too, where its gradient vanishes: ITC then sits
    at ln(batch) and zero-shot at chance. With the base's per-layer gain (the std scaled by ``sqrt(768 / D)``)
    and the layer scale at 1.0 (a 4-layer residual needs no damping; upstream's base_plus has none) the
    spreads at init are 4-8% (text) and 17-24% (image), ``tests/test_vlmo.py::
    test_tiny_init_makes_the_dual_encoder_features_depend_on_the_input``. The upstream-sized variants keep
    upstream's init."""
    return _create_vlmo("vlmo_tiny_patch8_32", **{**VLMO_SIZES["tiny"], **kwargs})
