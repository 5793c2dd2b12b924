"""LIMoE: one sparse mixture-of-experts Transformer for images and text, trained contrastively.

Paper: "Multimodal Contrastive Learning with LIMoE: the Language-Image Mixture of Experts",
Mustafa, Riquelme, Puigcerver, Jenatton, Houlsby, NeurIPS 2022 (https://arxiv.org/abs/2206.02770).
No official code and **no checkpoint was ever released** (the models were trained on proprietary
data), so these variants have no pretrained weights: train them (e.g. with open_clip's data).

One tower, shared by both modalities (image ``m = 0``, text ``m = 1``):

    x_img = PatchEmbed(image) + P_img                      [B, N, D]   (no class token)
    x_txt = TokenEmbed(text) + P_txt                       [B, L, D]
    per block:  x_m <- x_m + Attn(LN(x_m))                 (each modality attends to itself only;
                                                            text keys at padding ids are masked)
                x   <- x + FFN(LN(x))                      (FFN, or in every other block an MoE
                                                            whose experts are shared by both modalities)
    z_img = W_img LN(mean_i x_img[i]),   z_txt = W_txt LN(x_txt[eot])
    L_clip = (CE(s Z_img Z_txt^T, I) + CE(s Z_txt Z_img^T, I)) / 2,   s = exp(logit_scale)

The MoE is V-MoE's (top-1 of ``p(x) = softmax(x W + eps)``, ``eps ~ N(0, 1/E^2)`` at training,
capacity ``ceil(T k C / E)`` rounded up to a multiple of 4 with ``C = 1``, batch-prioritised routing)
with the V-MoE importance and load losses and LIMoE's entropy losses, computed per modality ``m`` on
the router probabilities of that modality's ``n_m`` tokens:

    Omega_local(m)  = (1/n_m) sum_{x in m} H(p(.|x))                 (confident per-token routing)
    Omega_global(m) = -H((1/n_m) sum_{x in m} p(.|x))                 (diverse expert usage)
    Omega^tau_global(m) = max(0, tau + Omega_global(m)),  tau = log S  (soft minimum of S experts)

Design (one MoE call per layer and step): :meth:`LIMoE.forward` runs both streams block by block.
Attention runs per modality, then the MoE runs once on all image and text tokens of the step,
flattened to ``[1, T_img + T_txt, D]`` with their modality ids, so capacity, BPR and the
per-modality losses see both modalities together (as in the paper) and :func:`mome.aux_losses`
reads one record per layer. ``encode_image`` / ``encode_text`` run one stream alone. Text padding
tokens (id 0) are not routed by default (``route_padding=False``): they are never attended to or
pooled, so routing them would only spend capacity and skew the text losses; they get no FFN update.
Soft MoE layers (``moe_type="soft"``) mix the tokens of one sequence, so they run per modality
(image sequences and text sequences separately; text padding takes part in the soft mixing).

Choices where the paper is silent or was not verifiable here [UNVERIFIED]: the projection width
``embed_dim`` equals the Transformer width (as big_vision's contrastive towers), the text is pooled
at its end-of-text token (open_clip's convention, ``text.argmax(-1)``), the text tokenizer is
open_clip's CLIP BPE (the paper used SentencePiece) with 16 tokens, MLPs use the tanh GELU (Flax's
``nn.gelu``), and the entropy weights (0.01 each) and ``tau = log 2`` (:data:`LIMOE_MOE_DEFAULTS`).
Headline numbers (arXiv v1 / NeurIPS camera-ready): LIMoE-L/16 78.6% / 77.9% and LIMoE-H/14
84.1% / 83.8% zero-shot ImageNet.

A third modality (``audio=True``, modality ``m = 2``; not in the LIMoE paper, which has images and text only):
log-mel spectrograms ``[B, 80, 100]`` (Whisper's 80 mel bins x 100 frames of 10 ms,
:class:`mome.data.AudioFeatures`) embedded as the Audio Spectrogram Transformer embeds them (Gong, Chung, Glass,
"AST: Audio Spectrogram Transformer", Interspeech 2021, arXiv:2104.01778): the spectrogram is a one-channel
image cut into patches by timm's ``PatchEmbed(in_chans=1)`` plus learned positions (AST's 16 x 16 patches
overlap with stride 10; here the patches do not overlap, ``audio_patch_size`` divides ``audio_size``):

    x_aud = PatchEmbed_1ch(audio[:, None]) + P_aud        [B, N_a, D]
    z_aud = W_aud LN(mean_i x_aud[i])

The audio tokens run through the same tower: attention over the audio stream alone, and the MoE layers see the
image, text and audio tokens of a step in one call with modality ids 0 / 1 / 2, so capacity, BPR and the
per-modality importance / load / entropy losses cover the three modalities (``num_modalities = 3``).
``encode_audio`` is the audio stream alone; ``forward(image, text, audio)`` returns the three unit-norm
embeddings and the one shared ``logit_scale`` (:class:`mome.lit.ContrastiveTask` sums the three pairs' InfoNCE).
Without ``audio`` the model, its parameters and its outputs are the two-modality LIMoE's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # CLIP's normalisation
from timm.layers import LayerNorm, PatchEmbed, get_act_layer, trunc_normal_
from timm.models import checkpoint
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from .._checks import check_finite, check_ids_in_range, check_int
from .._errors import CheckpointMismatchError, InvalidArgumentError, InvalidInputError
from .._pretrained import PretrainedCfg
from .._registry import register_model
from ..layers import MoE
from ..layers.moe import TOP_K_ROUTER_OPTIONS, TOP_K_ROUTERS
from ._moe_vit import (
    SOFT_MOE_TYPES,
    MoEType,
    build_moe_ffn,
    building,
    check_images,
    check_moe_options,
    check_patch_grid,
    check_transformer,
    owner_name,
    parameter_names,
    reject_unknown_options,
    resolve_moe_layers,
)

__all__ = ["LIMOE_MOE_DEFAULTS", "LIMoE", "MODALITY_NAMES", "limoe_state_dict_from_open_clip_text"]

IMAGE, TEXT, AUDIO = 0, 1, 2
#: The modality of each id: a two-modality LIMoE has the first two, ``audio=True`` all three.
MODALITY_NAMES = ("image", "text", "audio")


#: MoE options of LIMoE's sparse layers: the one source of these values. ``conf/moe/limoe.yaml`` restates them as
#: a recipe for the other families (``moe=limoe``); tests/test_moe_configs.py fails when the two differ.
LIMOE_MOE_DEFAULTS: dict[str, Any] = {
    "batch_priority": True,
    "capacity_factor": 1.0,
    "capacity_multiple": 4,
    "num_modalities": 2,
    "aux_loss_weights": {"importance": 0.005, "load": 0.005, "local_entropy": 0.01, "global_entropy": 0.01},
    "global_entropy_threshold": math.log(2),
}


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LIMoE(nn.Module):
    """LIMoE one-tower contrastive model with the open_clip interface.

    ``encode_image(image, normalize=False) -> [B, embed_dim]``, ``encode_text(text, normalize=False)
    -> [B, embed_dim]``, ``forward(image, text) -> (image_features, text_features, logit_scale.exp())``
    with unit-norm features (a dict with ``output_dict=True``), ``logit_scale``, ``pretrained_cfg``; with
    ``audio=True`` also ``encode_audio(audio, normalize=False) -> [B, embed_dim]`` and ``forward(image, text, audio)
    -> (image_features, text_features, audio_features, logit_scale.exp())``.
    Parameter names follow timm's ViT for the image embedding and the blocks (``patch_embed``,
    ``pos_embed``, ``blocks.i.{norm1,attn,norm2,mlp}``) and open_clip for the text embedding
    (``token_embedding``, ``positional_embedding``), so dense weights map onto it by name.

    Args:
        img_size, patch_size, in_chans: image input.
        width, depth, num_heads, mlp_ratio: the shared Transformer.
        embed_dim: width of the joint image-text embedding.
        vocab_size, context_length: text input (open_clip's CLIP BPE has 49408 ids; id 0 pads).
        num_experts: experts per MoE layer (shared by both modalities).
        top_k: experts per token (sparse and modality-pool layers).
        moe_layers: which blocks are MoE (see :func:`~mome.models.resolve_moe_layers`).
        moe_type: ``"sparse"`` (:class:`~mome.layers.SparseMoE`), ``"soft"``
            (:class:`~mome.layers.SoftMoE`, run per modality), ``"smear"`` (:class:`~mome.layers.SMEAR`, run per
            modality: an example's image or text tokens pool into its routing) or ``"modality_pools"``
            (:class:`~mome.layers.ModalityMoE`: ``num_experts`` split into an image and a text pool,
            unless ``moe_kwargs["experts_per_modality"]`` says otherwise, plus a shared expert).
        router: router of the sparse layers (``"noisy_top_k"``, ``"top_k"``, ``"expert_choice"``, ...).
        slots_per_expert: Soft MoE slots per expert.
        moe_kwargs: further options of the sparse layers (capacity, BPR, losses, ...).
        route_padding: route text padding tokens through the MoE too (off: they skip the FFN).
        act_layer: MLP activation (timm name or class).
        qkv_bias: biases on the attention's qkv projection.
        drop_path_rate: stochastic depth, linearly increasing over the blocks.
        init_logit_scale: initial ``logit_scale`` (``log(1 / 0.07)``, as CLIP).
        output_dict: ``forward`` returns a dict (open_clip's ``output_dict``).
        pad_id: text padding id.
        audio: add the audio modality (modality id 2; see the module docstring): ``encode_audio``, ``audio=`` in
            ``forward``, three modalities in the MoE statistics and losses.
        audio_size: ``(mel bins, frames)`` of the audio features (Whisper's ``(80, 100)``: 1 s of 10 ms frames).
        audio_patch_size: ``(mel bins, frames)`` of one audio patch; divides ``audio_size``.
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        embed_dim: int = 768,
        vocab_size: int = 49408,
        context_length: int = 16,
        num_experts: int = 8,
        top_k: int = 1,
        moe_layers: str | Sequence[int] = "every_2",
        moe_type: MoEType = "sparse",
        router: str = "noisy_top_k",
        slots_per_expert: int = 1,
        moe_kwargs: Mapping[str, Any] | None = None,
        route_padding: bool = False,
        act_layer: str | type[nn.Module] = "gelu_tanh",
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_logit_scale: float = math.log(1 / 0.07),
        output_dict: bool = False,
        pad_id: int = 0,
        audio: bool = False,
        audio_size: tuple[int, int] = (80, 100),
        audio_patch_size: int | tuple[int, int] = (16, 10),
    ) -> None:
        owner = owner_name(self)
        check_transformer(
            owner,
            width_name="width",
            width=width,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            rates={"drop_path_rate": drop_path_rate},
        )
        check_int("embed_dim", embed_dim, owner=owner)
        check_int("vocab_size", vocab_size, owner=owner)
        check_int("context_length", context_length, owner=owner)
        check_int("pad_id", pad_id, minimum=0, owner=owner)
        if pad_id >= vocab_size:
            raise InvalidArgumentError("pad_id", f"an id in [0, vocab_size={vocab_size})", pad_id, owner)
        check_finite("init_logit_scale", init_logit_scale, owner=owner)
        if not isinstance(audio, bool):
            raise InvalidArgumentError("audio", "true or false", audio, owner)
        modality_names = MODALITY_NAMES if audio else MODALITY_NAMES[:2]
        options = dict(moe_kwargs or {})
        if audio:
            audio_size, audio_patch_size = (
                tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v  # a YAML list, a ListConfig
                for v in (audio_size, audio_patch_size)
            )
            check_patch_grid(audio_size, audio_patch_size, owner, names=("audio_size", "audio_patch_size"))
            options = _three_modality_options(options, moe_type, num_experts, owner)
        check_moe_options(
            owner,
            moe_type=moe_type,
            num_experts=num_experts,
            top_k=top_k,
            router=router,
            slots_per_expert=slots_per_expert,
            moe_kwargs=options,
            defaults=(1, "noisy_top_k"),
        )
        moe_layer_indices = resolve_moe_layers(moe_layers, depth, owner)  # all checked: now build
        super().__init__()
        self.in_chans = in_chans
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.route_padding = route_padding
        self.output_dict = output_dict
        self.modality_names = modality_names
        self.audio_size = (int(audio_size[0]), int(audio_size[1])) if audio else None  # (mel bins, frames)
        self.grad_checkpointing = False
        act = get_act_layer(act_layer)

        # Image input: timm's patch embedding + learned positions (no class token: the head pools).
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=width)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches, width))
        # Text input: open_clip's names.
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))

        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, act_layer=act, norm_layer=LayerNorm)
            for rate in rates
        )
        # Per-modality heads: pooled token -> LayerNorm -> linear projection into the joint space.
        self.image_norm = LayerNorm(width)
        self.image_proj = nn.Linear(width, embed_dim)
        self.text_norm = LayerNorm(width)
        self.text_proj = nn.Linear(width, embed_dim)
        if audio:  # AST's input: the spectrogram as a one-channel image; mean-pooled like the image stream
            self.audio_embed = PatchEmbed(
                img_size=audio_size, patch_size=audio_patch_size, in_chans=1, embed_dim=width
            )  # [B, 1, mel, frames] -> [B, N_a, D]
            self.audio_pos_embed = nn.Parameter(torch.zeros(1, self.audio_embed.num_patches, width))
            self.audio_norm = LayerNorm(width)
            self.audio_proj = nn.Linear(width, embed_dim)
        else:
            self.audio_embed = self.audio_pos_embed = self.audio_norm = self.audio_proj = None
        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)
        self.logit_bias = None  # open_clip's SigLIP slot; LIMoE trains with the softmax (CLIP) loss
        self._init_weights()

        # The MoE layers are built after the init so that they keep their own (router, experts).
        self.moe_layer_indices = moe_layer_indices
        for index in self.moe_layer_indices:
            block = self.blocks[index]
            block.mlp = build_moe_ffn(block.mlp, num_experts, top_k, moe_type, router, slots_per_expert, options)

        self.pretrained_cfg = PretrainedCfg(
            input_size=(in_chans, *self.patch_embed.img_size),
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            interpolation="bicubic",
            crop_pct=1.0,
            context_length=context_length,
            tokenizer="open_clip:ViT-B-16",  # open_clip's CLIP BPE (SimpleTokenizer), shipped with open_clip
            paper_ids="arXiv:2206.02770",
            paper_name="Multimodal Contrastive Learning with LIMoE: the Language-Image Mixture of Experts",
            notes="No LIMoE checkpoint was released; train from scratch.",
        )

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        if self.audio_pos_embed is not None:
            trunc_normal_(self.audio_pos_embed, std=0.02)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.apply(_init_linear)

    @property
    def num_experts(self) -> int:
        return self.blocks[self.moe_layer_indices[0]].mlp.num_experts if self.moe_layer_indices else 0

    # -- embeddings and heads ---------------------------------------------------------------------

    def _embed_image(self, image: Tensor) -> Tensor:
        """``image``: a floating ``[B, in_chans, H, W]`` batch of the model's image size, else
        :class:`~mome.InvalidInputError`."""
        check_images("image", image, self.in_chans, self.patch_embed.img_size, self.patch_embed, owner_name(self))
        return self.patch_embed(image) + self.pos_embed  # [B, N, D]

    def _embed_text(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Token + position embeddings ``[B, L, D]`` and the mask of real (non-padding) tokens ``[B, L]``.

        ``text``: integer ids ``[B, L]`` with ``1 <= L <= context_length``, each in ``[0, vocab_size)``, else
        :class:`~mome.InvalidInputError`."""
        owner = owner_name(self)
        check_ids_in_range("text", text, self.vocab_size, owner=owner, what="token ids")
        if text.dim() != 2 or not 1 <= text.shape[1] <= self.context_length:
            expected = f"token ids [B, L] with 1 <= L <= context_length={self.context_length}"
            raise InvalidInputError("text", expected, f"shape {tuple(text.shape)}", owner)
        keep = text != self.pad_id
        keep[:, 0] = True  # every sequence keeps a key to attend to
        return self.token_embedding(text) + self.positional_embedding[: text.shape[1]], keep

    def _embed_audio(self, audio: Tensor) -> Tensor:
        """``audio``: floating log-mel features ``[B, mel, frames]`` of the model's ``audio_size`` (``[B, 80, 100]``),
        else :class:`~mome.InvalidInputError` (as any audio given to a model without the audio modality)."""
        owner = owner_name(self)
        if self.audio_embed is None:
            expected = (
                f"None: this LIMoE's modalities are {' and '.join(self.modality_names)} (build it with audio=True)"
            )
            got = f"shape {tuple(audio.shape)}" if isinstance(audio, Tensor) else type(audio).__name__
            raise InvalidInputError("audio", expected, got, owner)
        mel, frames = self.audio_embed.img_size
        expected = f"log-mel features [B, {mel}, {frames}] (mel bins x frames, mome.data.AudioFeatures)"
        if not isinstance(audio, Tensor):
            raise InvalidInputError("audio", expected, type(audio).__name__, owner)
        if audio.dim() != 3 or tuple(audio.shape[1:]) != (mel, frames):
            raise InvalidInputError("audio", expected, f"shape {tuple(audio.shape)}", owner)
        check_images("audio", audio[:, None], 1, (mel, frames), self.audio_embed, owner)  # floating, model's dtype
        return self.audio_embed(audio[:, None]) + self.audio_pos_embed  # [B, 1, mel, frames] -> [B, N_a, D]

    def _audio_head(self, x: Tensor) -> Tensor:
        return self.audio_proj(self.audio_norm(x.mean(dim=1)))  # [B, N_a, D] -> [B, embed_dim]

    def _image_head(self, x: Tensor) -> Tensor:
        return self.image_proj(self.image_norm(x.mean(dim=1)))  # [B, N, D] -> [B, embed_dim]

    def _text_head(self, x: Tensor, text: Tensor) -> Tensor:
        eot = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]  # [B, D]
        return self.text_proj(self.text_norm(eot))

    # -- the shared tower ---------------------------------------------------------------------------

    def _ffn(self, block: Block, xs: list[Tensor], modalities: list[int], routed: list[Tensor | None]) -> list[Tensor]:
        """``x + FFN(LN(x))`` for every stream; a routed MoE sees all streams' tokens in one call."""
        hs = [block.norm2(x) for x in xs]
        if not isinstance(block.mlp, MoE):  # dense Mlp or Soft MoE: per modality
            outs = [block.mlp(h) for h in hs]
        else:
            tokens, ids = [], []
            for h, modality, keep in zip(hs, modalities, routed):
                chunk = h.reshape(-1, h.shape[-1]) if keep is None else h[keep]  # [T_m, D]
                tokens.append(chunk)
                ids.append(torch.full((chunk.shape[0],), modality, dtype=torch.long, device=h.device))
            sizes = [chunk.shape[0] for chunk in tokens]
            joint = block.mlp(torch.cat(tokens)[None], torch.cat(ids)[None])[0]  # [1, T, D] -> [T, D]
            outs = [
                chunk.view_as(h) if keep is None else torch.zeros_like(h).index_put((keep,), chunk)
                for h, keep, chunk in zip(hs, routed, joint.split(sizes))
            ]
        return [x + block.drop_path2(block.ls2(out)) for x, out in zip(xs, outs)]

    def _block(
        self,
        block: Block,
        xs: list[Tensor],
        masks: list[Tensor | None],
        modalities: list[int],
        routed: list[Tensor | None],
    ) -> list[Tensor]:
        """One pre-norm block over every stream: attention per stream, then the (joint) FFN."""
        xs = [x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=m))) for x, m in zip(xs, masks)]
        return self._ffn(block, xs, modalities, routed)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing of every block (timm's switch): a block's activations are recomputed in
        backward instead of stored (``torch.utils.checkpoint``, non-reentrant; the MoE layers record their aux
        losses and statistics once, in the forward pass: :func:`mome.layers.moe.recomputing`)."""
        self.grad_checkpointing = enable

    def _encode(
        self, image: Tensor | None, text: Tensor | None, audio: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Unnormalised features of the given streams (image, text, audio), run together through the tower."""
        xs, masks, modalities, routed = [], [], [], []
        if image is not None:
            xs.append(self._embed_image(image))
            masks.append(None)
            modalities.append(IMAGE)
            routed.append(None)
        if text is not None:
            x, keep = self._embed_text(text)
            xs.append(x)
            masks.append(keep[:, None, None, :])  # [B, 1, 1, L], True = attend (SDPA's boolean mask)
            modalities.append(TEXT)
            routed.append(None if self.route_padding else keep)
        if audio is not None:
            xs.append(self._embed_audio(audio))
            masks.append(None)
            modalities.append(AUDIO)
            routed.append(None)
        if not xs:
            given = "an image batch, a text batch" + (", an audio batch" if self.audio_embed is not None else "")
            raise InvalidInputError(", ".join(self.modality_names), f"{given}, or several", "none", owner_name(self))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                # timm's checkpoint, non-reentrant always: the aux losses the MoE records in the forward keep
                # their graph (a reentrant checkpoint runs the forward under no_grad).
                xs = checkpoint(self._block, block, xs, masks, modalities, routed, use_reentrant=False)
            else:
                xs = self._block(block, xs, masks, modalities, routed)
        streams = dict(zip(modalities, xs))
        image_features = self._image_head(streams[IMAGE]) if image is not None else None
        text_features = self._text_head(streams[TEXT], text) if text is not None else None
        audio_features = self._audio_head(streams[AUDIO]) if audio is not None else None
        return image_features, text_features, audio_features

    # -- open_clip interface -------------------------------------------------------------------------

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """``[B, C, H, W] -> [B, embed_dim]`` (the image stream alone)."""
        features = self._encode(image, None)[0]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        """Token ids ``[B, L]`` (``L <= context_length``, 0 pads) ``-> [B, embed_dim]`` (the text stream alone)."""
        features = self._encode(None, text)[1]
        return F.normalize(features, dim=-1) if normalize else features

    def encode_audio(self, audio: Tensor, normalize: bool = False) -> Tensor:
        """Log-mel features ``[B, 80, 100]`` (``audio_size``) ``-> [B, embed_dim]`` (the audio stream alone;
        a model built with ``audio=True``)."""
        features = self._encode(None, None, audio)[2]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: Tensor | None = None, text: Tensor | None = None, audio: Tensor | None = None) -> Any:
        """The given streams through one pass: unit-norm features and ``logit_scale.exp()`` (open_clip's CLIP).

        Without ``audio``: ``(image_features, text_features, logit_scale)`` (open_clip's tuple); with ``audio``:
        ``(image_features, text_features, audio_features, logit_scale)``. ``output_dict=True``: a dict, with
        ``audio_features`` when audio was given."""
        features = [None if f is None else F.normalize(f, dim=-1) for f in self._encode(image, text, audio)]
        image_features, text_features, audio_features = features
        if self.output_dict:
            out = {"image_features": image_features, "text_features": text_features}
            if audio is not None:
                out["audio_features"] = audio_features
            return {**out, "logit_scale": self.logit_scale.exp()}
        if audio is not None:
            return image_features, text_features, audio_features, self.logit_scale.exp()
        return image_features, text_features, self.logit_scale.exp()


def _three_modality_options(options: Mapping[str, Any], moe_type: str, num_experts: int, owner: str) -> dict[str, Any]:
    """The MoE options of a LIMoE with audio: three modality ids in the sparse layers' statistics and losses
    (``num_modalities = 3``; another value given is an error), and for ``moe_type="modality_pools"`` three pools
    (``experts_per_modality``: ``num_experts`` split as evenly as possible, the remainder to the first pools)."""
    options = dict(options)
    if moe_type in SOFT_MOE_TYPES:
        return options  # run per modality: no modality ids
    given = options.get("num_modalities", len(MODALITY_NAMES))
    if given != len(MODALITY_NAMES):
        expected = f"{len(MODALITY_NAMES)} (image, text, audio) for a LIMoE with audio=True"
        raise InvalidArgumentError("moe_kwargs.num_modalities", expected, given, owner)
    options["num_modalities"] = len(MODALITY_NAMES)
    if moe_type == "modality_pools":
        if "experts_per_modality" not in options:
            if num_experts < len(MODALITY_NAMES):
                expected = f"at least {len(MODALITY_NAMES)} experts: one pool per modality (image, text, audio)"
                raise InvalidArgumentError("num_experts", expected, num_experts, owner)
            base, extra = divmod(num_experts, len(MODALITY_NAMES))
            options["experts_per_modality"] = {name: base + (m < extra) for m, name in enumerate(MODALITY_NAMES)}
        pools = options["experts_per_modality"]
        if len(pools) != len(MODALITY_NAMES):
            expected = f"{len(MODALITY_NAMES)} pools (image, text, audio) for a LIMoE with audio=True"
            raise InvalidArgumentError("moe_kwargs.experts_per_modality", expected, pools, owner)
    return options


# ---------------------------------------------------------------------------------------------
# Key map: an open_clip text transformer into LIMoE's text path (the layouts correspond there).
#
#   open_clip                                         LIMoE
#   token_embedding.weight                            token_embedding.weight
#   positional_embedding [ctx, D]                     positional_embedding (first context_length rows)
#   transformer.resblocks.{i}.ln_1 / ln_2             blocks.{i}.norm1 / norm2
#   transformer.resblocks.{i}.attn.in_proj_*          blocks.{i}.attn.qkv.*   (same [q; k; v] row order)
#   transformer.resblocks.{i}.attn.out_proj.*         blocks.{i}.attn.proj.*
#   transformer.resblocks.{i}.mlp.c_fc / c_proj       blocks.{i}.mlp.fc1 / fc2, or in an MoE block every
#                                                     expert's w_in, b_in / w_out, b_out (upcycling)
#   ln_final                                          text_norm
#   text_projection [D, E]                            text_proj.weight (transposed)
#
# Not covered (no open_clip counterpart): the image side, routers, text_proj.bias, logit_scale. The
# blocks are shared with the image stream, so loading a text tower also initialises the image path.
# open_clip's text attention is causal and its MLP uses exact (or Quick) GELU; LIMoE's text is
# bidirectional with tanh GELU, so outputs differ until fine-tuned.
# ---------------------------------------------------------------------------------------------
_OPEN_CLIP_BLOCK_KEYS = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": "attn.proj.weight",
    "attn.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
}
# open_clip MLP key -> (dense timm Mlp key, stacked Experts parameter)
_OPEN_CLIP_MLP_KEYS = {
    "mlp.c_fc.weight": ("mlp.fc1.weight", "w_in"),
    "mlp.c_fc.bias": ("mlp.fc1.bias", "b_in"),
    "mlp.c_proj.weight": ("mlp.fc2.weight", "w_out"),
    "mlp.c_proj.bias": ("mlp.fc2.bias", "b_out"),
}


def limoe_state_dict_from_open_clip_text(state_dict: Mapping[str, Tensor], model: LIMoE) -> dict[str, Tensor]:
    """Map an open_clip text-transformer state dict onto ``model``'s keys (see the key map above).

    Every open_clip key must be used and every shape must match, else a ``ValueError`` names the
    keys. Load the result with ``model.load_state_dict(mapped, strict=False)``: the keys it does not
    cover are listed above.
    """
    state = dict(state_dict)
    target = model.state_dict()
    mapped: dict[str, Tensor] = {}
    used: set[str] = set()

    def put(key: str, value: Tensor, source: str) -> None:
        if key not in target:
            raise CheckpointMismatchError(f"open_clip key {source!r} maps to {key!r}, which this LIMoE does not have")
        if tuple(value.shape) != tuple(target[key].shape):
            raise CheckpointMismatchError(
                f"{source!r} has shape {tuple(value.shape)}, {key!r} needs {tuple(target[key].shape)}"
            )
        mapped[key] = value
        used.add(source)

    put("token_embedding.weight", state["token_embedding.weight"], "token_embedding.weight")
    context = target["positional_embedding"].shape[0]
    put("positional_embedding", state["positional_embedding"][:context], "positional_embedding")
    put("text_norm.weight", state["ln_final.weight"], "ln_final.weight")
    put("text_norm.bias", state["ln_final.bias"], "ln_final.bias")
    put("text_proj.weight", state["text_projection"].t(), "text_projection")
    for index, block in enumerate(model.blocks):
        prefix = f"transformer.resblocks.{index}."
        for source, dest in _OPEN_CLIP_BLOCK_KEYS.items():
            put(f"blocks.{index}.{dest}", state[prefix + source], prefix + source)
        experts = getattr(block.mlp, "experts", None)
        for source, (dense_key, expert_param) in _OPEN_CLIP_MLP_KEYS.items():
            value = state[prefix + source]
            if experts is None:
                put(f"blocks.{index}.{dense_key}", value, prefix + source)
            else:  # [out, in] or [out] -> every expert: [E, out, in] / [E, out]
                stacked = value.unsqueeze(0).expand(experts.num_experts, *value.shape).clone()
                put(f"blocks.{index}.mlp.experts.{expert_param}", stacked, prefix + source)
    unused = sorted(set(state) - used)
    if unused:
        raise CheckpointMismatchError(f"open_clip keys with no LIMoE counterpart: {unused[:20]}")
    return mapped


def _create_limoe(arch: str, /, **kwargs: Any) -> LIMoE:
    """LIMoE defaults (top-1 noisy router with BPR, C = 1, V-MoE + entropy losses) under user overrides; errors
    name ``arch``, and a keyword :class:`LIMoE` does not take is an :class:`~mome.UnsupportedOptionError`."""
    reject_unknown_options(arch, kwargs, _LIMOE_ARGS, "not an argument of LIMoE")
    user = dict(kwargs.pop("moe_kwargs", None) or {})
    moe_type = kwargs.get("moe_type", "sparse")
    options = {"router": "noisy_top_k", "top_k": 1, "moe_layers": "every_2", **kwargs}
    defaults = LIMOE_MOE_DEFAULTS
    if options["router"] not in TOP_K_ROUTERS:  # BPR is a top-k router's option: not a default for the others
        defaults = {k: v for k, v in defaults.items() if k not in TOP_K_ROUTER_OPTIONS}
    moe_kwargs = user if moe_type in SOFT_MOE_TYPES else {**defaults, **user}
    if options.get("audio") is True and moe_type not in SOFT_MOE_TYPES and "num_modalities" not in user:
        moe_kwargs["num_modalities"] = len(MODALITY_NAMES)  # image, text, audio (LIMoE's default counts two)
    with building(arch):
        return LIMoE(moe_kwargs=moe_kwargs, **options)


_LIMOE_ARGS = parameter_names(LIMoE)


@register_model
def limoe_b16_e8(pretrained: bool = False, **kwargs: Any) -> LIMoE:
    """LIMoE-B/16: ViT-B/16 tower (12 layers, width 768, 12 heads), 8 experts in blocks 1, 3, ..., 11."""
    args = dict(patch_size=16, width=768, depth=12, num_heads=12, embed_dim=768, num_experts=8)
    return _create_limoe("limoe_b16_e8", **{**args, **kwargs})


@register_model
def limoe_l16_e32(pretrained: bool = False, **kwargs: Any) -> LIMoE:
    """LIMoE-L/16: ViT-L/16 tower (24 layers, width 1024, 16 heads), 32 experts in every other block."""
    args = dict(patch_size=16, width=1024, depth=24, num_heads=16, embed_dim=1024, num_experts=32)
    return _create_limoe("limoe_l16_e32", **{**args, **kwargs})


@register_model
def limoe_tiny_patch8_e4(pretrained: bool = False, **kwargs: Any) -> LIMoE:
    """A tiny LIMoE for tests and demos: 32px images, 4 layers of width 64, 4 experts in blocks 1 and 3."""
    args = dict(img_size=32, patch_size=8, width=64, depth=4, num_heads=4, embed_dim=64, num_experts=4)
    return _create_limoe("limoe_tiny_patch8_e4", **{**args, **kwargs})


@register_model
def limoe_audio_tiny_patch8_e4(pretrained: bool = False, **kwargs: Any) -> LIMoE:
    """:func:`limoe_tiny_patch8_e4` with the audio modality (``audio=True``): 32px images, text and ``[80, 100]``
    log-mel audio cut into 16 x 20 patches (25 tokens) through one 4-layer tower of width 64, 4 experts in blocks
    1 and 3 with per-modality losses over the three modalities."""
    args = dict(
        img_size=32,
        patch_size=8,
        width=64,
        depth=4,
        num_heads=4,
        embed_dim=64,
        num_experts=4,
        audio=True,
        audio_patch_size=(16, 20),
    )
    return _create_limoe("limoe_audio_tiny_patch8_e4", **{**args, **kwargs})
