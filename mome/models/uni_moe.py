"""Uni-MoE: a unified multimodal LLM (image, audio/speech, video frames) whose LLM FFNs are sparse MoE layers.

Paper: "Uni-MoE: Scaling Unified Multimodal LLMs with Mixture of Experts", Li, Jiang, Hu, Wang, Zhong, Luo, Ma,
Zhang, arXiv:2405.11273 (2024; IEEE TPAMI 2025); code: HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs (``Uni_MoE/``).

Built on :class:`~mome.models.moe_llava.MoELLaVA` (transformers' ``LlavaForConditionalGeneration``: CLIP vision
tower, ``mlp2x_gelu`` image connector, causal LM, ``generate``) with a second encoder for audio, transformers'
:class:`~transformers.models.whisper.modeling_whisper.WhisperEncoder` (built from a ``WhisperConfig`` in code),
and its own connector:

    e_img = W_2 GELU(W_1 CLIP_{-2}(image)[1:] + b_1) + b_2             [N_img, P, D]   (as MoE-LLaVA)
    a     = Whisper(mel)                                               [N_aud, F, D_a] (mel [N_aud, 80, 2F])
    a'    = mean of s consecutive frames of a                          [N_aud, F/s, D_a]
    e_aud = U_2 GELU(U_1 a' + c_1) + c_2                               [N_aud, F/s, D]
    x     = Embed(input_ids); x[ids == <image>] = e_img; x[ids == <audio>] = e_aud   (prompt order; videos below)
    every LLM layer:  FFN(x) = sum_{j<k} g_j(x) E_{e_j(x)}(x),   g = softmax over the top-k router logits x W_g
    expert i (stage 3):  E_i(x) = FFN(x; W^i + s B^i A^i)   (LoRA of rank r on expert i's own FFN weights)

A video (``config.video_token_id`` set) is upstream's: its frames through the image path, averaged over the frames,
``e_vid = mean_f e_img(frame_f)`` ``[N_vid, P, D]``, at its ``image_seq_length`` placeholders. The router is
Mixtral's (top-k logits, softmax over them: :class:`~mome.layers.TopKRouter` with ``renormalize=True``, which
computes the same gates), every LLM layer is MoE (upstream ``config.moe`` replaces every decoder layer's MLP by its
``MoeLayer``), no token is dropped (``capacity_factor=None``) and the loss is the LM loss only
(``router_aux_loss_coef=0``: upstream's 4-expert ``LlavaLlamaForCausalLM`` adds no balancing term).

Experts: each expert is a full FFN of the LLM's shape (:class:`~mome.layers.Experts`), and stage 3 gives each one
its own LoRA (:func:`mome.peft.add_lora_experts` with ``target_experts``, :class:`~mome.peft.LoRAStackedExperts`:
``w[e] + s B[e] A[e]``), so the MoE's router decides which tokens each adapted expert sees. Upstream's
``find_all_llm_linear_names`` puts a peft LoRA (r = 8, alpha = 16) on every LLM linear layer except the routers
(``mlp.gate``) and ``lm_head``, i.e. on each expert's ``gate_proj``/``up_proj``/``down_proj`` and on attention.
Differences here: the LoRA of ``w_in`` is one rank-r LoRA of the stacked ``[gate; up]`` rows (upstream: one per
projection), attention gets no LoRA (mome.peft adapts linear layers with routed LoRA experts only), and no LoRA
dropout (the delta is added to the stacked weights; upstream 0.05).

Audio connector (``config.audio_connector``): ``"whisper_decoder"`` is upstream's aligner
(``model/audio_aligner/``), the paper-size variant's: ``Q = audio_num_queries`` learned queries (upstream
``query_tokens_size`` = 50) read the encoder output through transformers' ``WhisperDecoder`` (causal self-attention
over the queries plus their positions, cross-attention to the audio, the ``decoder_*`` fields of ``audio_config``),
then a projector (``audio_projector_type``: ``"linear"``, upstream's default, or ``"mlp2x_gelu"``)::

    e_aud = P(WhisperDecoder(q_1..q_Q; Whisper(mel)))                  [N_aud, Q, D]

``"pool_mlp"`` (the tiny variant's default) is the mean pooling over ``s = audio_pool_stride`` frames written above.
Audio placeholders: ``config.audio_seq_length`` ids ``config.audio_token_id`` per clip (one 30 s chunk), as images
(``config.image_seq_length`` ids ``config.image_token_id`` per image). Released weights:
:mod:`mome.convert.uni_moe` (the LoRAs merged into the experts and attention).

Progressive training (the paper's three stages, upstream README "Structure"), :func:`configure_stage`:
1. cross-modality alignment: only the connectors train (``modality="image"`` or ``"audio"`` for one), dense LLM;
2. modality-specific experts: the LLM's FFNs train on one modality's instruction data, one dense run per
   modality (upstream releases no stage-2 script; this follows the paper's description), connectors frozen;
3. unified MoE tuning: :meth:`UniMoE.upcycle` then :meth:`UniMoE.load_modality_experts` puts the stage-2 FFNs into
   the experts ("incorporate multiple trained experts into LLMs"), :func:`add_expert_lora` adds the LoRAs, and the
   LoRAs, the routers and both connectors train on mixed data (upstream ``finetune_speech.sh``:
   ``--llm_lora_enable --tune_mm_mlp_adapter --tune_mm_audio_projector``, routers set trainable by name).

Variants: ``uni_moe_tiny_e4`` (random init: 32 px CLIP, 16 image tokens; a 2-layer Whisper encoder of width 32
over ``[80, 100]`` log-mel features, the embedded digits' DTMF tones, pooled 5x to 10 audio tokens; a 4-layer
LLaMA of width 64 with 4 experts top-2 in every layer; placeholder ids: the tiny MoE-LLaVA tokenizer's ``<image>``
and one embedding row beyond it for ``<audio>``) and ``uni_moe_llama_7b_e4`` (Uni-MoE-speech: CLIP ViT-L/14-336,
Whisper-small's encoder over 30 s ``[80, 3000]`` features read by upstream's aligner (Whisper-small's 12-layer
decoder, 50 queries, a linear projector), a LLaMA-7B LLM (32 layers, width 4096, FFN 11008, 32000 words + the two
placeholder rows), 4 experts top-2 in every layer; weights: the ``speech_e2`` card). Not read from a released
``config.json`` (none is in the upstream repository): the LLM's context length (4096) and RMSNorm epsilon (1e-5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import LlamaConfig, WhisperConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

from .._checks import check_choice, check_int
from .._errors import InvalidArgumentError, InvalidInputError, UnsupportedOptionError
from .._registry import register_model
from ..layers import Experts, MoE
from ..peft import LoRAExpertsConfig, LoRAStackedExperts, adapter_layers, add_lora_experts
from ._moe_vit import owner_name, reject_unknown_options
from .moe_llava import (
    TINY_IMAGE_TOKEN_ID,
    TINY_VOCAB_SIZE,
    VARIANT_ARGS,
    MoELLaVA,
    MoELLaVAConfig,
    clip_vit_l14_336,
    create_moe_llava,
    tiny_text_config,
)

__all__ = ["UniMoE", "UniMoEConfig", "add_expert_lora", "configure_stage"]

PAPER = dict(
    paper_ids="arXiv:2405.11273",
    paper_name="Uni-MoE: Scaling Unified Multimodal LLMs with Mixture of Experts",
    license="other",  # upstream: research use only, under the LLaMA and Vicuna licences (README)
)
MODALITIES = ("image", "audio")
AUDIO_CONNECTORS = ("pool_mlp", "whisper_decoder")


@strict
class UniMoEConfig(MoELLaVAConfig):
    """:class:`~mome.models.moe_llava.MoELLaVAConfig` plus the audio path.

    Args (besides MoE-LLaVA's):
        audio_config: the ``WhisperConfig`` fields of the audio encoder (``d_model``, ``encoder_layers``,
            ``encoder_attention_heads``, ``encoder_ffn_dim``, ``num_mel_bins``, ``max_source_positions``, ...).
        audio_token_id: the audio placeholder id (within the LLM's vocabulary).
        audio_pool_stride: ``s`` (``audio_connector="pool_mlp"``): the encoder's ``max_source_positions`` frames are
            averaged ``s`` at a time, giving ``audio_seq_length = max_source_positions / s`` tokens per clip.
        audio_connector: ``"pool_mlp"`` (mean pooling, then the projector) or ``"whisper_decoder"`` (upstream's
            aligner: ``audio_num_queries`` learned queries read the encoder output through a transformers
            ``WhisperDecoder`` with the ``decoder_*`` fields of ``audio_config``, then the projector; one clip gives
            ``audio_num_queries`` tokens).
        audio_num_queries: the aligner's query tokens (upstream ``query_tokens_size``, 50).
        audio_projector_type: ``"mlp2x_gelu"`` or ``"linear"`` (upstream's ``audio_projector_type``, whose default is
            ``"linear"``).
        video_token_id: the video placeholder id (within the LLM's vocabulary), or None for a model without video
            input. A video gives ``image_seq_length`` tokens: its frames' projected CLIP features averaged over the
            frames (upstream's ``encode_images`` per frame, then the mean over frames).
    """

    model_type = "mome_uni_moe"

    audio_config: dict | None = None
    audio_token_id: int = 0
    audio_pool_stride: int = 1
    audio_connector: str = "pool_mlp"
    audio_num_queries: int = 0
    audio_projector_type: str = "mlp2x_gelu"
    video_token_id: int | None = None

    @property
    def audio_seq_length(self) -> int:
        """Placeholder ids per audio clip (a 30 s chunk for Whisper-small)."""
        if self.audio_connector == "whisper_decoder":
            return self.audio_num_queries
        return int(self.audio_config["max_source_positions"]) // self.audio_pool_stride


def _whisper_config(config: UniMoEConfig, owner: str) -> WhisperConfig:
    """The audio encoder's ``WhisperConfig``, after checking the audio fields of ``config``: known Whisper fields,
    positive sizes, a pool stride dividing ``max_source_positions``, an audio placeholder id within the vocabulary
    and other than the image one."""
    if not isinstance(config.audio_config, dict):
        raise InvalidArgumentError("audio_config", "a dict of WhisperConfig fields", config.audio_config, owner)
    known = tuple(WhisperConfig().to_dict())
    reject_unknown_options(owner, config.audio_config, known, "not a field of transformers' WhisperConfig")
    audio = WhisperConfig(**config.audio_config)
    for name in ("d_model", "encoder_layers", "encoder_attention_heads", "num_mel_bins", "max_source_positions"):
        check_int(f"audio_config.{name}", getattr(audio, name), owner=owner)
    check_choice("audio_connector", config.audio_connector, AUDIO_CONNECTORS, owner=owner)
    check_choice("audio_projector_type", config.audio_projector_type, ("mlp2x_gelu", "linear"), owner=owner)
    if config.audio_connector == "whisper_decoder":
        check_int("audio_num_queries", config.audio_num_queries, owner=owner)
        for name in ("decoder_layers", "decoder_attention_heads", "decoder_ffn_dim", "max_target_positions"):
            check_int(f"audio_config.{name}", getattr(audio, name), owner=owner)
        if config.audio_num_queries > audio.max_target_positions:
            expected = (
                f"at most audio_config.max_target_positions={audio.max_target_positions} (the aligner's positions)"
            )
            raise InvalidArgumentError("audio_num_queries", expected, config.audio_num_queries, owner)
    check_int("audio_pool_stride", config.audio_pool_stride, owner=owner)
    if config.audio_connector == "pool_mlp" and audio.max_source_positions % config.audio_pool_stride:
        expected = f"a divisor of audio_config.max_source_positions={audio.max_source_positions}"
        raise InvalidArgumentError("audio_pool_stride", expected, config.audio_pool_stride, owner)
    vocab = config.text_config.vocab_size
    check_int("audio_token_id", config.audio_token_id, minimum=0, owner=owner)
    if config.audio_token_id >= vocab or config.audio_token_id == config.image_token_id:
        expected = f"an id in [0, vocab_size={vocab}) other than image_token_index={config.image_token_id}"
        raise InvalidArgumentError("audio_token_id", expected, config.audio_token_id, owner)
    if config.video_token_id is not None:
        check_int("video_token_id", config.video_token_id, minimum=0, owner=owner)
        if config.video_token_id >= vocab or config.video_token_id in (config.image_token_id, config.audio_token_id):
            expected = f"None or an id in [0, vocab_size={vocab}) other than the image and audio placeholder ids"
            raise InvalidArgumentError("video_token_id", expected, config.video_token_id, owner)
    return audio


def _given(name: str, value: Any, alias: str, alias_value: Any) -> tuple[str, Any]:
    """The input given as ``name`` or its alias (and the name it came as); an empty tensor means none."""
    if value is None:
        name, value = alias, alias_value
    return name, None if isinstance(value, Tensor) and not value.numel() else value


class UniMoE(MoELLaVA):
    """Uni-MoE (transformers contract): MoE-LLaVA's image path and MoE LLM plus a Whisper encoder and connector.

    Parameter names: MoE-LLaVA's (``model.vision_tower.*``, ``model.multi_modal_projector.*``,
    ``model.language_model.*``, ``lm_head``) and ``model.audio_tower.*`` (transformers' ``WhisperEncoder``),
    ``model.audio_projector.{0,2}.*`` (``mlp2x_gelu``).

    ``forward(input_ids, pixel_values=None, attention_mask=None, ..., labels=None, images=None,
    input_features=None, audios=None)``: ``input_features`` (alias ``audios``) are log-mel features
    ``[N_aud, num_mel_bins, 2 max_source_positions]``, one clip per ``audio_seq_length`` placeholder ids, clips in
    prompt order; an empty tensor means no audio. ``generate`` works with and without the KV cache, with images,
    audio or both (they are read in the prefill step only), and never emits a placeholder id (the model's
    ``generation_config.suppress_tokens``).
    """

    config_class = UniMoEConfig
    modality_names: tuple[str, ...] = ("image", "text", "audio")

    def __init__(self, config: UniMoEConfig) -> None:
        owner = owner_name(self)
        audio = _whisper_config(config, owner)
        if config.top2_2nd_expert_sampling:
            reason = "Uni-MoE's router is Mixtral's top-k softmax (DeepSpeed's sampled second expert is MoE-LLaVA's)"
            raise UnsupportedOptionError("top2_2nd_expert_sampling", owner, reason, True)
        super().__init__(config)
        hidden = config.text_config.hidden_size
        self.model.audio_tower = WhisperEncoder(audio)
        if config.audio_connector == "whisper_decoder":
            # The aligner reads query embeddings, never token ids: a one-row vocabulary, and no embedding table.
            no_ids = dict(vocab_size=1, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
            aligner = WhisperDecoder(WhisperConfig(**{**audio.to_dict(), **no_ids}))
            aligner.embed_tokens = None
            self.model.audio_aligner = aligner
            self.model.audio_query_tokens = nn.Parameter(torch.zeros(1, config.audio_num_queries, audio.d_model))
        if config.audio_projector_type == "linear":
            self.model.audio_projector = nn.Linear(audio.d_model, hidden)
        else:
            self.model.audio_projector = nn.Sequential(
                nn.Linear(audio.d_model, hidden), nn.GELU(), nn.Linear(hidden, hidden)
            )
        self.pretrained_cfg = self.pretrained_cfg.replace(**PAPER)
        # A generated placeholder id would become an image or clip slot without its features (an error when the
        # sequence is re-read without the cache): generate never emits one.
        placeholders = [config.image_token_id, config.audio_token_id, config.video_token_id]
        self.generation_config.suppress_tokens = [token for token in placeholders if token is not None]

    def _sparse_ffn(self, mlp: nn.Module) -> MoE:
        """A layer's MoE FFN: ``E`` copies of ``mlp`` and a random Mixtral-style top-k router (renormalised)."""
        config = self.config
        weights = {"load_balance": config.router_aux_loss_coef} if config.router_aux_loss_coef else {}
        return MoE.from_dense(
            mlp,
            config.num_experts,
            config.num_experts_per_tok,
            capacity_factor=config.capacity_factor,
            eval_capacity_factor=config.eval_capacity_factor,
            min_capacity=config.min_capacity,
            aux_loss_weights=weights,
        )

    # -- parts ---------------------------------------------------------------------------------------
    @property
    def audio_tower(self) -> WhisperEncoder:
        return self.model.audio_tower

    @property
    def audio_projector(self) -> nn.Module:
        return self.model.audio_projector

    @property
    def num_audio_tokens(self) -> int:
        """Placeholder ids per audio clip (``max_source_positions / audio_pool_stride``)."""
        return self.config.audio_seq_length

    @property
    def audio_input_shape(self) -> tuple[int, int]:
        """``(num_mel_bins, frames)`` of one clip's features: Whisper's convolutions halve the frames to
        ``max_source_positions``, and its encoder accepts exactly that length."""
        audio = self.config.audio_config
        return int(audio["num_mel_bins"]), 2 * int(audio["max_source_positions"])

    def token_modality_ids(self, input_ids: Tensor) -> Tensor:
        """MoE-LLaVA's modality ids (image placeholders image, other ids text) with the audio placeholder ids
        ``config.audio_token_id`` audio and the video placeholder ids image (CLIP tokens, as upstream's):
        ``[B, L]`` -> ``[B, L]``, indices into :attr:`modality_names`."""
        ids = super().token_modality_ids(input_ids)
        if self.config.video_token_id is not None:
            ids = ids.masked_fill(input_ids == self.config.video_token_id, self.modality_names.index("image"))
        return ids.masked_fill(input_ids == self.config.audio_token_id, self.modality_names.index("audio"))

    def get_audio_features(self, input_features: Tensor) -> Tensor:
        """``[N_aud, mel, 2F]`` log-mel features -> ``[N_aud, audio_seq_length, D]`` LLM embeddings (module doc)."""
        hidden = self.audio_tower(input_features.to(self.audio_tower.dtype)).last_hidden_state  # [N, F, D_a]
        clips, frames, width = hidden.shape
        if self.config.audio_connector == "whisper_decoder":
            queries = self.model.audio_query_tokens.expand(clips, -1, -1)  # [N, Q, D_a]
            read = self.model.audio_aligner(inputs_embeds=queries, encoder_hidden_states=hidden, use_cache=False)
            return self.audio_projector(read.last_hidden_state)  # [N, Q, D]
        stride = self.config.audio_pool_stride
        pooled = hidden.view(clips, frames // stride, stride, width).mean(dim=2)  # [N, F/s, D_a]
        return self.audio_projector(pooled)  # [N, F/s, D]

    def get_video_features(self, videos: Tensor) -> Tensor:
        """``[N_vid, F, C, H, W]`` frames -> ``[N_vid, P, D]``: each frame through the image path (CLIP, the
        projector), then the mean over the ``F`` frames (upstream's ``encode_images``, then ``mean(dim=0)``)."""
        clips, frames = videos.shape[:2]
        config = self.config
        per_frame = self.model.get_image_features(
            pixel_values=videos.flatten(0, 1).to(self.vision_tower.dtype),  # [N_vid * F, C, H, W]
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        features = torch.stack(list(per_frame))  # [N_vid * F, P, D]
        return features.view(clips, frames, *features.shape[1:]).mean(dim=1)  # [N_vid, P, D]

    def _check_video(self, name: str, videos: Any, input_ids: Tensor | None) -> None:
        """``videos``: a floating ``[N_vid, F, C, H, W]`` tensor of the vision tower's channels and size, with
        ``input_ids`` holding ``image_seq_length`` ids ``config.video_token_id`` per video; else
        :class:`~mome.InvalidInputError`."""
        owner = owner_name(self)
        vision = self.config.vision_config
        expected = f"frames [N_video, F, {vision.num_channels}, {vision.image_size}, {vision.image_size}]"
        if self.config.video_token_id is None:
            expected = "no videos: this model has no video placeholder (config.video_token_id is None)"
            raise InvalidInputError(name, expected, type(videos).__name__, owner)
        if not isinstance(videos, Tensor):
            raise InvalidInputError(name, expected, type(videos).__name__, owner)
        shape = (vision.num_channels, vision.image_size, vision.image_size)
        if videos.dim() != 5 or tuple(videos.shape[2:]) != shape or not videos.shape[1]:
            raise InvalidInputError(name, expected, f"shape {tuple(videos.shape)}", owner)
        if not videos.is_floating_point():
            raise InvalidInputError(name, "a floating tensor of " + expected, f"dtype {videos.dtype}", owner)
        self._check_placeholders(name, "video", "video", videos.shape[0], input_ids)

    def _check_placeholders(self, name: str, kind: str, unit: str, count: int, input_ids: Tensor | None) -> None:
        """``input_ids`` given with ``name``, holding one run of ``kind`` placeholder ids per ``unit`` (``count``
        of them): ``audio_seq_length`` per clip, ``image_seq_length`` per video."""
        owner = owner_name(self)
        if input_ids is None:
            expected = f"given with {name} (their placeholder ids locate the {kind})"
            raise InvalidInputError("input_ids", expected, None, owner)
        if torch.compiler.is_compiling():
            return
        token_id = self.config.audio_token_id if kind == "audio" else self.config.video_token_id
        per_unit = self.num_audio_tokens if kind == "audio" else self.config.image_seq_length
        placeholders = int((input_ids == token_id).sum())
        if placeholders != count * per_unit:
            units = placeholders // per_unit if placeholders % per_unit == 0 else "whole"
            expected = f"{units} {unit}s: input_ids hold {placeholders} {kind} placeholder ids, {per_unit} per {unit}"
            raise InvalidInputError(name, expected, f"{count} {unit}s", owner)

    def _check_audio(self, name: str, audio: Any, input_ids: Tensor | None) -> None:
        """``audio``: a floating ``[N_aud, mel, frames]`` tensor of :attr:`audio_input_shape`, with ``input_ids``
        holding ``audio_seq_length`` placeholder ids per clip; else :class:`~mome.InvalidInputError`."""
        owner = owner_name(self)
        mel, frames = self.audio_input_shape
        expected = f"log-mel features [N_audio, {mel}, {frames}] (num_mel_bins, 2 * max_source_positions)"
        if not isinstance(audio, Tensor):
            raise InvalidInputError(name, expected, type(audio).__name__, owner)
        if audio.dim() != 3 or tuple(audio.shape[1:]) != (mel, frames):
            raise InvalidInputError(name, expected, f"shape {tuple(audio.shape)}", owner)
        if not audio.is_floating_point():
            raise InvalidInputError(name, "a floating tensor of " + expected, f"dtype {audio.dtype}", owner)
        self._check_placeholders(name, "audio", "clip", audio.shape[0], input_ids)

    # -- transformers interface ----------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        images: Tensor | None = None,
        input_features: Tensor | None = None,
        audios: Tensor | None = None,
        pixel_values_videos: Tensor | None = None,
        videos: Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """MoE-LLaVA's forward (images, checks) with audio clips and videos spliced in at their placeholder ids first.
        ``input_features`` (alias ``audios``): ``[N_aud, mel, frames]``; ``pixel_values_videos`` (alias ``videos``):
        ``[N_vid, F, C, H, W]``; an empty tensor means none."""
        audio_name, audio = _given("input_features", input_features, "audios", audios)
        video_name, video = _given("pixel_values_videos", pixel_values_videos, "videos", videos)
        if audio is not None:
            self._check_audio(audio_name, audio, input_ids)
        if video is not None:
            self._check_video(video_name, video, input_ids)
        if audio is not None or video is not None:
            self._check_inputs(input_ids, attention_mask, labels, None, None)  # ids, mask, labels before embedding
            inputs_embeds = self.get_input_embeddings()(input_ids)  # [B, L, D]
            spliced = []
            if audio is not None:
                spliced.append((self.config.audio_token_id, self.get_audio_features(audio)))  # [N_aud, T_a, D]
            if video is not None:
                spliced.append((self.config.video_token_id, self.get_video_features(video)))  # [N_vid, P, D]
            for token_id, features in spliced:
                mask = (input_ids == token_id).unsqueeze(-1)  # [B, L, 1]
                inputs_embeds = inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))  # prompt order
            if pixel_values is None and images is not None:
                pixel_values = images
            if pixel_values is not None and (not isinstance(pixel_values, Tensor) or pixel_values.numel()):
                # the images are counted against the ids here: below, the ids are replaced by embeddings
                self._check_inputs(input_ids, None, None, pixel_values, None)
            input_ids = None  # the image placeholders are found by their (untouched) embedding
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            images=images if pixel_values is None else None,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """As MoE-LLaVA's, with ``audios=`` accepted for ``input_features`` and ``videos=`` for
        ``pixel_values_videos`` (read in the prefill step only, as transformers drops both afterwards)."""
        for alias, name in (("audios", "input_features"), ("videos", "pixel_values_videos")):
            value = kwargs.pop(alias, None)
            if value is not None and kwargs.get(name) is None:
                kwargs[name] = value
        return super().prepare_inputs_for_generation(*args, **kwargs)

    # -- stage 2 -> 3 --------------------------------------------------------------------------------
    def load_modality_experts(self, dense_models: Sequence[UniMoE]) -> UniMoE:
        """Expert ``e`` of every MoE layer becomes the FFN of that layer in ``dense_models[e]`` (a stage-2 run on
        one modality's data, a dense model of this architecture); in place, returns ``self``."""
        owner = f"{owner_name(self)}.load_modality_experts"
        if not self.moe_layers:
            raise InvalidArgumentError("self", "a model with MoE layers (call upcycle() first)", "a dense model", owner)
        if len(dense_models) != self.config.num_experts:
            expected = f"{self.config.num_experts} dense models (one per expert)"
            raise InvalidArgumentError("dense_models", expected, f"{len(dense_models)}", owner)
        for e, dense in enumerate(dense_models):
            if not isinstance(dense, UniMoE) or dense.moe_layers:
                got = type(dense).__name__ if not isinstance(dense, UniMoE) else f"MoE layers {dense.moe_layers}"
                raise InvalidArgumentError(f"dense_models[{e}]", "a dense UniMoE (stage 2)", got, owner)
        layers = self.language_model.layers
        with torch.no_grad():
            for index in self.moe_layers:
                experts = layers[index].mlp.experts
                if isinstance(experts, LoRAStackedExperts):  # the experts' own weights, under their LoRAs
                    experts = experts.base_layer
                for e, dense in enumerate(dense_models):
                    source = Experts.from_dense(dense.language_model.layers[index].mlp, 1)
                    for param in ("w_in", "b_in", "w_out", "b_out"):
                        target = getattr(experts, param, None)
                        if target is not None:
                            if tuple(target.shape[1:]) != tuple(getattr(source, param).shape[1:]):
                                shapes = f"{tuple(getattr(source, param).shape[1:])} vs {tuple(target.shape[1:])}"
                                raise InvalidArgumentError(f"dense_models[{e}]", "this LLM's FFN shapes", shapes, owner)
                            target[e].copy_(getattr(source, param)[0])
        return self


def add_expert_lora(model: UniMoE, r: int = 8, lora_alpha: float = 16.0, **options: Any) -> list[str]:
    """Stage 3's LoRA: one rank-``r`` LoRA per expert of every MoE layer (:class:`~mome.peft.LoRAStackedExperts`,
    scaling ``lora_alpha / r``; upstream's ``lora_r=8``, ``lora_alpha=16``). ``options`` go to
    :class:`~mome.peft.LoRAExpertsConfig` (e.g. ``init_lora_weights=False``). Returns the adapted experts' names."""
    if not isinstance(model, UniMoE) or not model.moe_layers:
        raise InvalidArgumentError(
            "model", "a UniMoE with MoE layers (upcycle() first)", type(model).__name__, "add_expert_lora"
        )
    config = LoRAExpertsConfig(target_experts=["experts"], r=r, lora_alpha=lora_alpha, **options)
    return add_lora_experts(model, config, freeze_base=False)


def _connectors(model: UniMoE, modality: str | None, stage: int) -> list[nn.Module | nn.Parameter]:
    """What trains of the connectors in ``stage``: the image projector; the audio projector, with (stage 1 only) the
    Whisper-decoder aligner and its queries (upstream: ``tune_mm_audio_aligner`` in alignment,
    ``tune_mm_audio_projector`` in unified tuning)."""
    check_choice("modality", modality, (None, *MODALITIES), owner="configure_stage")
    audio: list[nn.Module | nn.Parameter] = [model.audio_projector]
    if stage == 1 and model.config.audio_connector == "whisper_decoder":
        audio += [model.model.audio_aligner, model.model.audio_query_tokens]
    parts = {"image": [model.projector], "audio": audio}
    return [part for m in MODALITIES if modality in (None, m) for part in parts[m]]


def configure_stage(model: UniMoE, stage: Literal[1, 2, 3], *, modality: str | None = None) -> UniMoE:
    """Set ``requires_grad`` for Uni-MoE's training stage ``stage`` (see the module doc); encoders stay frozen.

    1. the connectors (``modality="image"`` / ``"audio"``: that one only), on a dense model; with
       ``audio_connector="whisper_decoder"`` the whole aligner (decoder, queries, projector: upstream's
       ``tune_mm_audio_aligner``);
    2. the FFN of every LLM layer (a dense model; one run per modality gives that modality's expert);
    3. after :meth:`UniMoE.upcycle`, :meth:`UniMoE.load_modality_experts` and :func:`add_expert_lora`: the experts'
       LoRA ``A``/``B``, the routers and both projectors (the experts' own weights and the aligner's decoder stay
       frozen: upstream's ``tune_mm_audio_projector``).

    Returns the model; :class:`~mome.InvalidArgumentError` for a stage that does not fit it (MoE layers in stage
    1/2, none or no LoRA in stage 3, ``modality`` outside stage 1).
    """
    owner = "configure_stage"
    if stage not in (1, 2, 3):
        raise InvalidArgumentError("stage", "1, 2 or 3", stage, owner)
    if modality is not None and stage != 1:
        raise InvalidArgumentError(
            "modality", "None outside stage 1 (stage-1 connectors train one at a time)", modality, owner
        )
    connectors = _connectors(model, modality, stage)
    moe_layers = model.moe_layers
    if stage in (1, 2) and moe_layers:
        expected = f"3 for a model whose LLM layers {moe_layers} are MoE (stages 1-2 train a dense model)"
        raise InvalidArgumentError("stage", expected, stage, owner)
    lora = {name: layer for name, layer in adapter_layers(model).items() if isinstance(layer, LoRAStackedExperts)}
    if stage == 3 and (not moe_layers or not lora):
        expected = "1 or 2 for a model without MoE layers with LoRA (stage 3: upcycle(), then add_expert_lora())"
        raise InvalidArgumentError("stage", expected, stage, owner)
    model.requires_grad_(False)
    if stage in (1, 3):
        for connector in connectors:
            connector.requires_grad_(True)
    if stage == 2:
        for layer in model.language_model.layers:
            layer.mlp.requires_grad_(True)
    if stage == 3:
        for index in moe_layers:
            model.language_model.layers[index].mlp.router.requires_grad_(True)
        for adapter in lora.values():
            for name, param in adapter.named_parameters():
                if not name.startswith("base_layer."):
                    param.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------
_UNI_MOE_ARGS = [name for name in VARIANT_ARGS if name != "top2_2nd_expert_sampling"] + [
    "audio_overrides",
    "audio_token_id",
    "video_token_id",
    "audio_connector",
    "audio_num_queries",
    "audio_projector_type",
]


def _create_uni_moe(
    arch: str,
    /,
    text_config: Any,
    vision_config: dict[str, Any],
    audio_config: dict[str, Any],
    *,
    audio_token_id: int,
    audio_pool_stride: int,
    audio_overrides: dict[str, Any] | None = None,
    audio_connector: str = "pool_mlp",
    audio_num_queries: int = 0,
    audio_projector_type: str = "mlp2x_gelu",
    video_token_id: int | None = None,
    **kwargs: Any,
) -> UniMoE:
    """A Uni-MoE variant: every LLM layer MoE, 4 experts top-2, dropless, no aux loss unless ``kwargs`` say so."""
    reject_unknown_options(arch, kwargs, _UNI_MOE_ARGS, "not an argument of the Uni-MoE variants")
    options = dict(moe_layers="all", capacity_factor=None, eval_capacity_factor=None, router_aux_loss_coef=0.0) | kwargs
    extra = dict(
        audio_config={**audio_config, **(audio_overrides or {})},
        audio_token_id=audio_token_id,
        audio_pool_stride=audio_pool_stride,
        audio_connector=audio_connector,
        audio_num_queries=audio_num_queries,
        audio_projector_type=audio_projector_type,
        video_token_id=video_token_id,
    )
    return create_moe_llava(text_config, vision_config, owner=arch, model_class=UniMoE, extra_config=extra, **options)


def _whisper_small() -> dict[str, Any]:
    """openai/whisper-small: an encoder of 12 layers of width 768 over 80 mel bins and 1500 positions (30 s at
    20 ms), and a decoder of 12 layers (448 positions), the start of upstream's audio aligner."""
    return dict(
        d_model=768,
        encoder_layers=12,
        encoder_attention_heads=12,
        encoder_ffn_dim=3072,
        decoder_layers=12,
        decoder_attention_heads=12,
        decoder_ffn_dim=3072,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=448,
    )


@register_model
def uni_moe_llama_7b_e4(pretrained: bool = False, **kwargs: Any) -> UniMoE:
    """Uni-MoE-speech (the released model's architecture): CLIP ViT-L/14-336 + Whisper-small's encoder, read by
    upstream's aligner (50 queries through Whisper-small's decoder, a linear projector: 50 audio tokens per 30 s) +
    a LLaMA-7B (Vicuna) LLM (32 layers, width 4096), 4 experts top-2 in every layer. The weights:
    ``uni_moe_llama_7b_e4.speech_e2`` (:mod:`mome.convert.uni_moe`)."""
    text = LlamaConfig(
        vocab_size=32000 + 3,  # LLaMA's 32000 words, then the <image>, <audio> and <video> placeholder rows
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    args = dict(
        image_token_index=32000,
        audio_token_id=32001,
        video_token_id=32002,
        tokenizer=None,
        audio_connector="whisper_decoder",
        audio_num_queries=50,
        audio_projector_type="linear",
    )
    return _create_uni_moe(
        "uni_moe_llama_7b_e4",
        text,
        clip_vit_l14_336(),
        _whisper_small(),
        audio_pool_stride=30,
        **{**args, **kwargs},
    )


TINY_AUDIO_TOKEN_ID = TINY_VOCAB_SIZE  # one embedding row beyond the tiny MoE-LLaVA tokenizer


@register_model
def uni_moe_tiny_e4(pretrained: bool = False, llm: str = "llama", **kwargs: Any) -> UniMoE:
    """A tiny Uni-MoE for tests and demos: 32 px CLIP (16 image tokens), a 2-layer Whisper encoder of width 32 over
    ``[80, 100]`` log-mel features (the digits' DTMF tones) pooled to 10 audio tokens, a 4-layer LLM of width 64
    (``llm="llama"``, or MoE-LLaVA tiny's ``"phi"``, ``"stablelm"``, ``"qwen2"``) with 4 experts top-2 in every
    layer, and the tiny MoE-LLaVA word-level tokenizer (``<audio>`` is the embedding row after its vocabulary).
    ``audio_connector="whisper_decoder", audio_num_queries=Q``: upstream's aligner instead of the pooling (a 2-layer
    Whisper decoder of width 32 reading ``Q`` queries, at most 16)."""
    text = tiny_text_config(llm, owner="uni_moe_tiny_e4")
    text.vocab_size, text.max_position_embeddings = TINY_VOCAB_SIZE + 1, 256
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    audio = dict(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=80,
        max_source_positions=50,
        max_target_positions=16,
    )
    args = dict(
        image_token_index=TINY_IMAGE_TOKEN_ID, audio_token_id=TINY_AUDIO_TOKEN_ID, tokenizer="mome:moe_llava_tiny"
    )
    return _create_uni_moe(
        "uni_moe_tiny_e4",
        text,
        vision,
        audio,
        audio_pool_stride=5,
        **{**args, **kwargs},
    )
