"""MoE-LLaVA: a LLaVA vision-language model whose LLM has sparse mixture-of-experts FFNs.

Paper: "MoE-LLaVA: Mixture of Experts for Large Vision-Language Models", Lin, Tang, Ye, Cui, Zhu, Jin,
Huang, Zhang, Pang, Ning, Yuan, arXiv:2401.15947 (2024); code: PKU-YuanGroup/MoE-LLaVA (DeepSpeed v0.9.5 MoE).

The model is transformers' :class:`~transformers.LlavaForConditionalGeneration` (CLIP vision tower,
``mlp2x_gelu`` projector, causal LM, ``generate``, ``save_pretrained``) with the FFN of every other LLM
layer (0, 2, 4, ...; upstream ``moe_mode="sparse"``) replaced by mome's :class:`~mome.layers.MoE`:

    v      = CLIP_{-2}(image)[1:]                         [N_img, P, D_v]  (penultimate layer, patch tokens, no CLS)
    e_img  = W_2 GELU(W_1 v + b_1) + b_2                  [N_img, P, D]    (mlp2x_gelu projector)
    x      = Embed(input_ids), x[input_ids == <image>] = e_img             (one placeholder id per patch token)
    per LLM layer l:  h <- Attn/LN as the LLM,  FFN_l = MoE if l in {0, 2, 4, ...} else dense
    MoE(x) = sum_{j<2} g_j(x) FFN_{e_j(x)}(x),  p = softmax(x W_g),  g_j = p_{e_j} / (p_{e_1} + p_{e_2})
    L      = CE(next token | answer tokens) + 0.01 * sum_l L_aux^l,   L_aux = E * sum_e f_e P_e

``f_e`` is the fraction of tokens whose first choice is expert ``e`` and ``P_e`` the mean router
probability (GShard / Switch; DeepSpeed's ``l_aux``). ``forward`` returns a transformers
:class:`~transformers.modeling_outputs.CausalLMOutputWithPast` whose ``loss`` is the LM loss only: the
weighted load-balancing term is read with :func:`mome.aux_losses` (``{"load_balance": tensor}``) and
the training task adds it, as for every mome model.

Experts: E = 4, top-2 (DeepSpeed's gate, :class:`~mome.layers.GShardTop2Router`), capacity
``max(ceil(T k c / E), min_capacity)`` with ``c = 1.5`` in training and ``c = 2.0`` at evaluation (= T for
E = 4, k = 2: no token is dropped at evaluation, so cached and uncached generation agree),
``min_capacity = 0``; ``capacity_factor=None`` (``"dropless"`` through ``mome.create_model``) is dropless.
DeepSpeed v0.9.5's top-2 capacity ``ceil(2 c S / E)`` (at least ``min_capacity``) is the same number, it
serves every first choice before any second choice, in token order, as mome does, and it renormalises
the gates over the choices it kept (a token whose second choice is dropped gets weight 1 on its first):
``Routing.renormalize_kept``. DeepSpeed v0.9.5 chooses the second expert by adding Gumbel noise to the
logits, also at evaluation, which makes upstream inference stochastic. ``top2_2nd_expert_sampling=True``
(DeepSpeed's later name for it) does the same, drawing the noise from torch's global generator as
DeepSpeed does, so a run seeded as an upstream run reproduces it (the ``moe_tuned`` cards set it); the
default ``False`` takes the second most probable expert, so ``model.eval()`` is deterministic. All tokens
of a batch, padding included, are routed together (as upstream).

Images: the prompt holds one placeholder id ``config.image_token_id`` per patch token of each image
(``config.image_seq_length`` per image, images in prompt order, any number per sample); upstream
instead splices the features at a single ``-200`` id, which changes the sequence length inside the
model. Labels at image positions are -100. ``mome.data.conversation`` builds such inputs. The full-size
variants use ``vocab_size - 1`` (an embedding row beyond their tokenizers' vocabularies) as the
placeholder id; its embedding is always overwritten by image features.

Three-stage "MoE-tuning" (paper section 3.2), see :func:`configure_stage`: I: only the projector trains
(dense LLM); II: projector + the whole LLM (still dense: build with ``moe_layers="none"``);
III: :meth:`MoELLaVA.upcycle` copies each chosen layer's FFN into every expert (sparse upcycling,
Komatsuzaki et al. 2023), the router starts random, and only experts + routers train.

Variants (sizes from the released configs; LLMs built from transformers configs, nothing is
downloaded): ``moe_llava_stablelm_1_6b_e4`` (StableLM-2-1.6B), ``moe_llava_qwen_1_8b_e4`` (Qwen-1.8B,
built as a transformers Qwen2 LM: the same computation as Qwen v1 with the fused ``c_attn`` split into
``q/k/v``), ``moe_llava_phi2_2_7b_e4`` (Phi-2; upstream's LM head has no bias, as LLaVA's), each with
CLIP ViT-L/14-336, and ``moe_llava_tiny_e4`` (random init, 32 px CLIP, 4-layer LLM of width 64, and a
word-level tokenizer built in code: :func:`moe_llava_tiny_tokenizer`). Headline numbers (README):
StableLM-1.6Bx4-Top2 VQAv2 76.7 / GQA 60.3 / POPE 85.7; Qwen-1.8Bx4 76.2 / 61.5 / 87.0;
Phi2-2.7Bx4 77.6 / 61.4 / 86.3. Upstream checkpoints convert with :func:`moe_llava_state_dict_from_hf`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from huggingface_hub.dataclasses import strict
from timm.data.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # CLIP's normalisation
from torch import Tensor, nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PhiConfig,
    PreTrainedModel,
    Qwen2Config,
    StableLmConfig,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .._checks import (
    check_choice,
    check_finite,
    check_finite_positive,
    check_ids_in_range,
    check_image_batch,
    check_int,
)
from .._errors import CheckpointMismatchError, InvalidArgumentError, InvalidInputError, UnsupportedOptionError
from .._pretrained import PretrainedCfg
from .._registry import register_model
from .._tokenizer import MOE_LLAVA_TINY_SPECIAL_TOKENS as TINY_SPECIAL_TOKENS
from .._tokenizer import MOE_LLAVA_TINY_VOCAB as MOE_LLAVA_TINY_VOCAB
from .._tokenizer import moe_llava_tiny_tokenizer as moe_llava_tiny_tokenizer
from ..layers import Experts, GShardTop2Router, MoE, Router, TopKRouter
from ._moe_vit import (
    building,
    check_patch_grid,
    check_tensor_shape,
    owner_name,
    parameter_names,
    reject_unknown_options,
    resolve_moe_layers,
)

__all__ = [
    "MOE_LLAVA_TINY_VOCAB",
    "MoELLaVA",
    "MoELLaVAConfig",
    "configure_stage",
    "moe_llava_state_dict_from_hf",
    "moe_llava_tiny_tokenizer",
]

PAPER = dict(
    paper_ids="arXiv:2401.15947",
    paper_name="MoE-LLaVA: Mixture of Experts for Large Vision-Language Models",
    license="apache-2.0",
)

_UPCYCLE_OPTIONS = (
    "capacity_factor",
    "eval_capacity_factor",
    "min_capacity",
    "router_aux_loss_coef",
    "top2_2nd_expert_sampling",
)
#: Upstream ``moe_mode`` names accepted for ``moe_layers`` besides those of ``resolve_moe_layers``.
_UPSTREAM_MOE_MODES = {"sparse": "every_2_from_0", "dense": "all", "second_half": "last_half"}


def _moe_layer_indices(spec: str | Sequence[int], depth: int, owner: str | None = None) -> list[int]:
    """``"every_2_from_0"`` (upstream ``"sparse"``: 0, 2, 4, ...), ``"first_half"``, ``"all"``, ``"none"``, indices."""
    if spec == "first_half":
        return list(range(depth // 2))
    if isinstance(spec, str):
        spec = _UPSTREAM_MOE_MODES.get(spec, spec)
    return resolve_moe_layers(spec, depth, owner)


def _check_moe_options(
    owner: str,
    *,
    num_experts: Any,
    top_k: Any,
    capacity_factor: Any,
    eval_capacity_factor: Any,
    min_capacity: Any,
    router_aux_loss_coef: Any,
    top2_2nd_expert_sampling: Any,
) -> None:
    """The MoE options of the LLM (entrypoint arguments, or a config's fields with ``top_k`` as
    ``num_experts_per_tok``): positive ``num_experts``, ``top_k`` in ``[1, num_experts]``, finite positive capacity
    factors (None: dropless), ``min_capacity >= 0``, a finite ``router_aux_loss_coef >= 0``, and
    ``top2_2nd_expert_sampling`` a bool that only top-2 routing may set."""
    check_int("num_experts", num_experts, owner=owner)
    check_int("top_k", top_k, owner=owner)
    if top_k > num_experts:
        raise InvalidArgumentError("top_k", f"an integer in [1, num_experts={num_experts}]", top_k, owner)
    check_finite_positive("capacity_factor", capacity_factor, owner=owner, optional=True)
    check_finite_positive("eval_capacity_factor", eval_capacity_factor, owner=owner, optional=True)
    check_int("min_capacity", min_capacity, minimum=0, owner=owner)
    check_finite("router_aux_loss_coef", router_aux_loss_coef, minimum=0, owner=owner)
    check_choice("top2_2nd_expert_sampling", top2_2nd_expert_sampling, (False, True), owner=owner)
    if top2_2nd_expert_sampling and top_k != 2:
        reason = f"it samples the second of top-2 experts (DeepSpeed's top-2 gate), and top_k={top_k}"
        raise UnsupportedOptionError("top2_2nd_expert_sampling", owner, reason, top2_2nd_expert_sampling)


def _check_config(config: MoELLaVAConfig, owner: str) -> None:
    """A :class:`MoELLaVAConfig` the model can be built from: its MoE options (:func:`_check_moe_options`),
    ``moe_layers`` within the LLM's layers, an image placeholder id within the vocabulary, and a vision tower whose
    image size is a multiple of its patch size."""
    _check_moe_options(
        owner,
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        capacity_factor=config.capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor,
        min_capacity=config.min_capacity,
        router_aux_loss_coef=config.router_aux_loss_coef,
        top2_2nd_expert_sampling=config.top2_2nd_expert_sampling,
    )
    text, vision = config.text_config, config.vision_config
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        check_int(f"text_config.{name}", getattr(text, name), owner=owner)
    resolve_moe_layers(list(config.moe_layers or []), text.num_hidden_layers, owner)
    vocab = text.vocab_size
    check_int("image_token_index", config.image_token_id, minimum=0, owner=owner)
    if config.image_token_id >= vocab:
        raise InvalidArgumentError(
            "image_token_index", f"an id in [0, vocab_size={vocab})", config.image_token_id, owner
        )
    for name in ("num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        check_int(f"vision_config.{name}", getattr(vision, name), owner=owner)
    check_patch_grid(vision.image_size, vision.patch_size, owner, ("vision_config.image_size", "patch_size"))


@strict
class MoELLaVAConfig(LlavaConfig):
    """:class:`~transformers.LlavaConfig` plus the MoE options of the LLM.

    Args (besides LLaVA's ``vision_config``, ``text_config``, ``image_token_index``, ``image_seq_length``,
    ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"`` (drop CLS)):
        moe_layers: LLM layer indices with an MoE FFN (empty: a dense LLaVA, stages I and II).
        num_experts, num_experts_per_tok: ``E`` and ``k`` (named as Mixtral's config; ``top_k`` would be
            read as a generation option).
        capacity_factor, eval_capacity_factor: ``c`` in training / evaluation; None is dropless.
        min_capacity: DeepSpeed's ``min_capacity``.
        router_aux_loss_coef: weight of the load-balancing loss (0.01).
        top2_2nd_expert_sampling: sample the second expert with Gumbel noise, in training and evaluation, as
            DeepSpeed v0.9.5's top-2 gate does (see :class:`~mome.layers.GShardTop2Router`); top-2 only.
    """

    model_type = "mome_moe_llava"

    moe_layers: list[int] | None = None
    num_experts: int = 4
    num_experts_per_tok: int = 2
    capacity_factor: float | None = 1.5
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 0
    router_aux_loss_coef: float = 0.01
    top2_2nd_expert_sampling: bool = False


def _moe_from_dense(mlp: nn.Module, config: MoELLaVAConfig) -> MoE:
    """The MoE FFN of one layer: ``E`` copies of ``mlp`` (sparse upcycling) and a random router: DeepSpeed's
    top-2 gate for ``k = 2`` (as upstream), a renormalised top-k softmax router otherwise."""
    weights = {"load_balance": config.router_aux_loss_coef} if config.router_aux_loss_coef else {}
    top_k, sample = config.num_experts_per_tok, config.top2_2nd_expert_sampling
    if sample and top_k != 2:
        raise UnsupportedOptionError(
            "top2_2nd_expert_sampling", f"num_experts_per_tok={top_k}", "it applies to top-2 routing", sample
        )
    experts = Experts.from_dense(mlp, config.num_experts)
    if top_k == 2:  # built after the experts, as MoE.from_dense builds its router: the same random init
        router: Router = GShardTop2Router(experts.dim, config.num_experts, sample_second=sample)
    else:
        router = TopKRouter(experts.dim, config.num_experts, top_k, renormalize=True)
    return MoE(
        router.to(experts.w_in.dtype),
        experts,
        capacity_factor=config.capacity_factor,
        eval_capacity_factor=config.eval_capacity_factor,
        min_capacity=config.min_capacity,
        aux_loss_weights=weights,
    )


class MoELLaVA(LlavaForConditionalGeneration):
    """LLaVA with MoE FFNs in the LLM layers ``config.moe_layers`` (transformers contract).

    Parameter names are transformers LLaVA's: ``model.vision_tower.*`` (``CLIPVisionModel``),
    ``model.multi_modal_projector.linear_{1,2}``, ``model.language_model.*`` (``PhiModel``,
    ``StableLmModel``, ``Qwen2Model``), ``lm_head``; an MoE layer's FFN is
    ``model.language_model.layers.{i}.mlp.router.proj.weight [E, D]`` and ``...mlp.experts.{w_in
    [E, H', D], b_in, w_out [E, D, H], b_out}`` (``H' = 2H``: gate rows then up rows for SwiGLU LLMs).

    ``forward(input_ids, pixel_values=None, attention_mask=None, ..., labels=None, images=None)`` returns
    :class:`~transformers.modeling_outputs.CausalLMOutputWithPast` (``images`` is an alias of
    ``pixel_values [N_img, 3, H, W]``, so a batch of ``mome.data.conversation`` feeds it directly; an
    empty image tensor means no image). ``loss`` is the LM loss; add ``sum(mome.aux_losses(model).values())``
    for the load-balancing term. ``generate`` works with and without the KV cache.

    A model built from a config with ``moe_layers`` starts each MoE layer as an upcycled copy of the
    freshly initialised dense FFN (all experts equal, random router), as MoE-LLaVA never trains experts
    from scratch; pretrained weights replace them.
    """

    config_class = MoELLaVAConfig
    #: The modalities of the LLM's tokens, in the order of :meth:`token_modality_ids`.
    modality_names: tuple[str, ...] = ("image", "text")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickling (e.g. into a ``ddp_spawn`` process) skips ``__init__``, where transformers registers
        each model class's ``_can_record_outputs`` (keyed by class name in a process-wide registry); without
        it the sub-models return no hidden states in a fresh process. Register them again here."""
        super().__setstate__(state)
        from transformers.utils import output_capturing

        registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
        if registry is not None:
            for module in self.modules():
                if isinstance(module, PreTrainedModel):
                    registry[module] = module._can_record_outputs

    def __init__(self, config: MoELLaVAConfig) -> None:
        _check_config(config, owner_name(self))
        super().__init__(config)
        self.loss_type = "ForCausalLM"
        for index in config.moe_layers or []:
            layer = self.model.language_model.layers[index]
            layer.mlp = self._sparse_ffn(layer.mlp)
        vision = config.vision_config
        self.pretrained_cfg = PretrainedCfg(
            input_size=(vision.num_channels, vision.image_size, vision.image_size),
            mean=OPENAI_CLIP_MEAN,
            std=OPENAI_CLIP_STD,
            interpolation="bicubic",
            crop_pct=1.0,
            context_length=config.text_config.max_position_embeddings,
            **PAPER,
        )

    def _sparse_ffn(self, mlp: nn.Module) -> MoE:
        """The MoE FFN replacing the dense ``mlp`` of an LLM layer (at build and in :meth:`upcycle`): MoE-LLaVA's
        upcycled layer (:func:`_moe_from_dense`); a family built on this class (Uni-MoE) overrides it."""
        return _moe_from_dense(mlp, self.config)

    # -- parts ---------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (``PhiModel``, ``StableLmModel``, ``Qwen2Model``) without its LM head."""
        return self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the LLM layers whose FFN is an :class:`~mome.layers.MoE`."""
        return [i for i, layer in enumerate(self.language_model.layers) if isinstance(layer.mlp, MoE)]

    @property
    def num_experts(self) -> int:
        return self.config.num_experts if self.moe_layers else 0

    @property
    def num_image_tokens(self) -> int:
        """Placeholder ids per image: the vision tower's patch count (576 for ViT-L/14 at 336 px)."""
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def token_modality_ids(self, input_ids: Tensor) -> Tensor:
        """``[B, L]`` token ids -> ``[B, L]`` modality ids (indices into :attr:`modality_names`): the image
        placeholder ids ``config.image_token_id`` are image tokens, every other id text."""
        names = self.modality_names
        image = input_ids == self.config.image_token_id
        return torch.where(image, names.index("image"), names.index("text"))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch (what ``task.grad_checkpointing`` calls) over transformers' own:
        ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})`` (named
        ``activation_checkpointing_enable`` from transformers 5.x on; every decoder and vision layer re-runs its
        forward in backward; non-reentrant, so the aux losses the MoE layers record in the forward keep their
        graph, and the layers record them once: :func:`mome.layers.moe.recomputing`), or its ``_disable()``."""
        new_api = hasattr(self, "activation_checkpointing_enable")
        if enable and new_api:
            self.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enable:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif new_api:
            self.activation_checkpointing_disable()
        else:
            self.gradient_checkpointing_disable()

    # -- stage III: sparse upcycling -----------------------------------------------------------------
    def upcycle(
        self,
        moe_layers: str | Sequence[int] = "every_2_from_0",
        num_experts: int | None = None,
        top_k: int | None = None,
        **moe_options: Any,
    ) -> MoELLaVA:
        """Turn the dense FFNs of ``moe_layers`` into MoE layers in place (MoE-LLaVA stage III).

        Every expert is a copy of the layer's dense FFN (``Experts.from_dense``); the router is random
        (``nn.Linear`` init). With dropless routing (``capacity_factor=None``) the upcycled model
        computes exactly what the dense one did: ``sum_j g_j FFN(x) = FFN(x)`` since ``sum_j g_j = 1``.
        ``moe_options`` overrides ``capacity_factor``, ``eval_capacity_factor``, ``min_capacity``,
        ``router_aux_loss_coef``, ``top2_2nd_expert_sampling`` in the config (which ``save_pretrained`` writes).
        """
        owner = f"{owner_name(self)}.upcycle"
        reject_unknown_options(owner, moe_options, _UPCYCLE_OPTIONS, f"the MoE options are {list(_UPCYCLE_OPTIONS)}")
        layers = self.language_model.layers
        indices = _moe_layer_indices(moe_layers, len(layers), owner)
        already = [i for i in indices if isinstance(layers[i].mlp, MoE)]
        if already:
            raise InvalidArgumentError(
                "moe_layers", f"dense LLM layers (layers {already} already have an MoE FFN)", moe_layers, owner
            )
        config = self.config
        options = {name: getattr(config, name) for name in _UPCYCLE_OPTIONS} | moe_options
        num_experts = num_experts or config.num_experts
        top_k = top_k or config.num_experts_per_tok
        _check_moe_options(owner, num_experts=num_experts, top_k=top_k, **options)  # before the config changes
        config.num_experts, config.num_experts_per_tok = num_experts, top_k
        for name, value in moe_options.items():
            setattr(config, name, value)
        for index in indices:
            layers[index].mlp = self._sparse_ffn(layers[index].mlp)
        config.moe_layers = self.moe_layers
        if isinstance(getattr(self, "mome_model_args", None), dict):  # so mome.save_pretrained rebuilds the MoE
            args = dict(moe_layers=list(config.moe_layers), num_experts=config.num_experts)
            options = {k: "dropless" if v is None else v for k, v in moe_options.items()}  # create_model drops None
            self.mome_model_args.update(args, top_k=config.num_experts_per_tok, **options)
        return self

    # -- transformers interface ----------------------------------------------------------------------
    def _check_inputs(
        self,
        input_ids: Tensor | None,
        attention_mask: Tensor | None,
        labels: Tensor | None,
        pixel_values: Tensor | None,
        images: Tensor | None,
    ) -> Tensor | None:
        """The checks of :meth:`forward` (see its doc), each an :class:`~mome.InvalidInputError` naming the input;
        returns the images to encode (``pixel_values``, else ``images``) in the vision tower's dtype, or None for
        no images (None or an empty tensor)."""
        owner = owner_name(self)
        if input_ids is not None:
            check_ids_in_range(
                "input_ids", input_ids, self.config.text_config.vocab_size, owner=owner, what="token ids"
            )
            if input_ids.dim() != 2 or not input_ids.numel():
                expected = "token ids [B, L] with B, L >= 1"
                raise InvalidInputError("input_ids", expected, f"shape {tuple(input_ids.shape)}", owner)
            batch, length = input_ids.shape
            if attention_mask is not None and (
                not isinstance(attention_mask, Tensor)
                or attention_mask.dim() != 2
                or attention_mask.shape[0] != batch
                or attention_mask.shape[1] < length
            ):
                got = f"shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, Tensor) else attention_mask
                expected = f"a [B={batch}, >= L={length}] mask (past positions, then these ids)"
                raise InvalidInputError("attention_mask", expected, got, owner)
            if labels is not None:
                check_tensor_shape("labels", labels, input_ids.shape, "one target id per input id, -100 ignored", owner)
        name = "pixel_values" if pixel_values is not None else "images"
        if pixel_values is None:
            pixel_values = images
        if pixel_values is not None:
            vision = self.config.vision_config
            if not isinstance(pixel_values, Tensor) or pixel_values.numel():
                size = (vision.image_size, vision.image_size)
                check_image_batch(name, pixel_values, vision.num_channels, size, owner=owner)
                if input_ids is not None and not torch.compiler.is_compiling():
                    placeholders = int((input_ids == self.config.image_token_id).sum())
                    per_image = self.config.image_seq_length
                    if placeholders != pixel_values.shape[0] * per_image:
                        expected = (
                            f"{placeholders // per_image if placeholders % per_image == 0 else 'whole'} images: "
                            f"input_ids hold {placeholders} image placeholder ids, {per_image} per image"
                        )
                        got = f"{pixel_values.shape[0]} images"
                        raise InvalidInputError(name, expected, got, owner)
            pixel_values = pixel_values.to(self.vision_tower.dtype) if pixel_values.numel() else None
        return pixel_values

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
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Causal LM pass over text with images spliced in at the placeholder ids (see the class doc).

        Checked first (:class:`~mome.InvalidInputError` naming the input): ``input_ids`` integer ``[B, L]`` ids
        within the LLM's vocabulary; ``attention_mask`` ``[B, >= L]`` (the cache's past positions and these);
        ``labels`` ``[B, L]``; ``pixel_values`` (or ``images``) a floating ``[N_img, C, H, W]`` batch of the vision
        tower's channels and size (an empty tensor means no image), one image per ``image_seq_length`` placeholder
        ids in ``input_ids`` (counted outside ``torch.compile``)."""
        pixel_values = self._check_inputs(input_ids, attention_mask, labels, pixel_values, images)
        out = super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )
        return CausalLMOutputWithPast(
            loss=out.loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """As transformers', with ``images=`` accepted for ``pixel_values`` (used in the prefill step only)."""
        images = kwargs.pop("images", None)
        if images is not None and kwargs.get("pixel_values") is None:
            kwargs["pixel_values"] = images
        return super().prepare_inputs_for_generation(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Training stages (paper section 3.2; upstream scripts/v1/*/{pretrain,finetune,finetune_moe}.sh)
# ---------------------------------------------------------------------------------------------
def configure_stage(model: MoELLaVA, stage: Literal[1, 2, 3], *, train_dense_ffn: bool = False) -> MoELLaVA:
    """Set ``requires_grad`` for MoE-tuning stage ``stage``; the vision tower is always frozen.

    1. projector only (``--tune_mm_mlp_adapter``), on a dense model (``moe_layers="none"``);
    2. projector + the whole LLM (embeddings, attention, FFNs, norms, LM head), still dense;
    3. after :meth:`MoELLaVA.upcycle`: experts + routers only. Upstream selects the trainable tensors
       by substring (phi: ``fc1 fc2 wg``), which also trains the dense FFNs of the odd layers;
       ``train_dense_ffn=True`` reproduces that.

    Returns the model; raises :class:`~mome.InvalidArgumentError` for a stage that does not fit the model (MoE layers in
    stage 1/2, none in stage 3).
    """
    if stage not in (1, 2, 3):
        raise InvalidArgumentError("stage", "1, 2 or 3", stage, "set_stage")
    moe_layers = model.moe_layers
    if stage in (1, 2) and moe_layers:
        raise InvalidArgumentError(
            "stage",
            f"3 for a model whose LLM layers {moe_layers} are MoE (stages 1-2 train a dense LLaVA)",
            stage,
            "set_stage",
        )
    if stage == 3 and not moe_layers:
        raise InvalidArgumentError(
            "stage",
            "1 or 2 for a dense model (stage 3 trains MoE layers: call model.upcycle() first)",
            stage,
            "set_stage",
        )
    model.requires_grad_(False)
    if stage in (1, 2):
        model.projector.requires_grad_(True)
    if stage == 2:
        model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if stage == 3:
        for layer in model.language_model.layers:
            if isinstance(layer.mlp, MoE) or train_dense_ffn:
                layer.mlp.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------
# Upstream checkpoint (HF save_pretrained folder of the moellava package) -> MoELLaVA.
#
#   upstream (Phi-2 / StableLM: prefix P = "model.")      MoELLaVA
#   P.image_tower.image_tower.[vision_model.]*              model.vision_tower.*
#   P.mm_projector.[image_spatial_proj.]{0,2}.*             model.multi_modal_projector.linear_{1,2}.*
#   model.{embed_tokens,layers.i.*,final_layernorm,norm}    model.language_model.*
#   model.layers.i.mlp.deepspeed_moe.gate.wg.weight         model.language_model.layers.i.mlp.router.proj.weight
#   ...deepspeed_moe.experts.deepspeed_experts.{e}.fc1/fc2  ...mlp.experts.{w_in,b_in}[e] / {w_out,b_out}[e]  (Phi)
#   ...deepspeed_experts.{e}.{gate_proj,up_proj,down_proj}  ...mlp.experts.w_in[e] = [gate; up], w_out[e] = down
#   lm_head.weight                                          lm_head.weight
#
#   Qwen-1.8B (v1, prefix P = "transformer."): wte -> embed_tokens, ln_f -> norm, h.i.ln_1 / ln_2 ->
#   layers.i.input_layernorm / post_attention_layernorm, h.i.attn.c_attn [3D, D] -> q/k/v_proj (rows
#   split in thirds), h.i.attn.c_proj -> o_proj, mlp.w2 / w1 / c_proj -> gate_proj / up_proj / down_proj
#   (Qwen v1 computes c_proj(w1(x) * silu(w2(x)))), the same inside each DeepSpeed expert.
#
# Rotary ``inv_freq`` buffers, if saved, are skipped (recomputed from the config).
# ---------------------------------------------------------------------------------------------
_EXPERT_PREFIX = "mlp.deepspeed_moe.experts.deepspeed_experts."
_PROJECTOR = "model.multi_modal_projector."
_ROUTER_KEY = "mlp.deepspeed_moe.gate.wg.weight"
_EXPERT_PARAMS = (  # DeepSpeed expert Linear -> stacked Experts parameter (gate/up are concatenated first)
    ("down_proj.weight", "w_out"),
    ("fc1.weight", "w_in"),
    ("fc1.bias", "b_in"),
    ("fc2.weight", "w_out"),
    ("fc2.bias", "b_out"),
)
_QWEN_LAYER_KEYS = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_QWEN_EXPERT_KEYS = {
    "w2.weight": "gate_proj.weight",
    "w1.weight": "up_proj.weight",
    "c_proj.weight": "down_proj.weight",
}


def _translate_llm_key(key: str, qwen: bool) -> list[tuple[str, int | None]]:
    """Our language-model key(s) for an upstream LLM key (no MoE part): ``[(key, third of the rows or None)]``."""
    if not qwen:
        return [("model.language_model." + key.removeprefix("model."), None)]
    rest = key.removeprefix("transformer.")
    if rest == "wte.weight":
        return [("model.language_model.embed_tokens.weight", None)]
    if rest.startswith("ln_f."):
        return [("model.language_model.norm." + rest.removeprefix("ln_f."), None)]
    if rest.startswith("h."):
        _, index, tail = rest.split(".", 2)
        prefix = f"model.language_model.layers.{index}."
        if tail in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = tail.rsplit(".", 1)[1]
            return [(f"{prefix}self_attn.{p}_proj.{kind}", i) for i, p in enumerate("qkv")]
        if tail in _QWEN_LAYER_KEYS:
            return [(prefix + _QWEN_LAYER_KEYS[tail], None)]
    return [("transformer." + rest, None)]  # no counterpart: reported as unmatched


def _upstream_key(ours: str, qwen: bool, vision_has_prefix: bool) -> str:
    """The upstream name a missing key of ours would have come from (the inverse of the key map above)."""
    root = "transformer." if qwen else "model."
    if ours.startswith("model.vision_tower."):
        tail = ours.removeprefix("model.vision_tower.")
        return f"{root}image_tower.image_tower." + (tail if vision_has_prefix else "vision_model." + tail)
    if ours.startswith(_PROJECTOR):
        linear, _, param = ours.removeprefix(_PROJECTOR).partition(".")
        return f"{root}mm_projector.image_spatial_proj.{ {'linear_1': 0, 'linear_2': 2}.get(linear, linear) }.{param}"
    rest = ours.removeprefix("model.language_model.")
    if not rest.startswith("layers."):
        if qwen:
            rest = {"embed_tokens.weight": "wte.weight", "norm.weight": "ln_f.weight"}.get(rest, rest)
        return ours if ours == rest else root + rest
    _, index, tail = rest.split(".", 2)
    layer = f"{root}{'h' if qwen else 'layers'}.{index}."
    if tail == "mlp.router.proj.weight":
        return layer + _ROUTER_KEY
    if tail.startswith("mlp.experts."):
        name = tail.removeprefix("mlp.experts.")
        params = [p for p, ours_name in _EXPERT_PARAMS if ours_name == name]
        if name == "w_in":
            params = ["gate_proj.weight", "up_proj.weight", *params]
        if qwen:
            params = [{v: k for k, v in _QWEN_EXPERT_KEYS.items()}.get(p, p) for p in params]
        return " / ".join(f"{layer}{_EXPERT_PREFIX}*.{p}" for p in params)
    if qwen:
        for kind in ("weight", "bias"):
            if tail in (f"self_attn.{p}_proj.{kind}" for p in "qkv"):
                return f"{layer}attn.c_attn.{kind}"
        tail = {v: k for k, v in _QWEN_LAYER_KEYS.items()}.get(tail, tail)
    return layer + tail


def moe_llava_state_dict_from_hf(
    state_dict: Mapping[str, Tensor], model: MoELLaVA, *, upcycle_dense: bool = False, projector_only: bool = False
) -> dict[str, Tensor]:
    """Map an upstream MoE-LLaVA state dict (Phi-2, StableLM, Qwen v1 layouts; see the key map above) onto ``model``.

    Strict: every upstream key must be used, every key of ``model`` produced, every shape equal;
    otherwise :class:`mome.CheckpointMismatchError` lists the unmatched (upstream names), missing and
    mis-shaped keys. DeepSpeed's per-expert 2-D Linear weights are stacked into ``[E, ...]`` tensors.
    Load the result with ``model.load_state_dict(mapped, strict=True)``. Works for dense (stage-2) and
    MoE checkpoints alike, provided ``model`` has the same MoE layers.

    ``upcycle_dense=True`` loads a dense (stage-II) checkpoint into an MoE model (the start of stage III):
    the dense FFN of each of ``model``'s MoE layers is copied into every expert and the router keeps
    ``model``'s current (random) weights, as :meth:`MoELLaVA.upcycle` does.

    ``projector_only=True`` reads a stage-I file (upstream's ``mm_projector.bin``: the ``mlp2x_gelu``
    projector and nothing else, written by ``safe_save_model_for_hf_trainer`` with ``tune_mm_mlp_adapter``):
    the file must hold exactly the projector's keys, and every other tensor of ``model`` keeps its current
    value. Upstream pairs that file with the LLM's and CLIP's own releases; load those into
    ``model.language_model`` / ``model.vision_tower`` yourself.
    """
    target = model.state_dict()
    qwen = any(k.startswith("transformer.h.") for k in state_dict)
    layer_prefix = "transformer.h." if qwen else "model.layers."
    vision_has_prefix = any(k.startswith("model.vision_tower.vision_model.") for k in target)
    mapped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}  # our key -> the upstream key it came from
    unmatched: list[str] = []
    shapes: list[str] = []
    absent: list[str] = []  # upstream expert keys the checkpoint lacks (a gap in the expert numbering)
    experts: dict[tuple[str, str], dict[int, tuple[str, Tensor]]] = {}  # (layer, param) -> {e: (key, tensor)}

    def put(ours: str, value: Tensor, source: str) -> None:
        if ours in mapped:
            unmatched.append(source)
        mapped[ours], origin[ours] = value, source

    for key, value in state_dict.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        rest = key.partition(".")[2]
        if rest.startswith("image_tower.image_tower."):
            tail = rest.removeprefix("image_tower.image_tower.")
            put("model.vision_tower." + (tail if vision_has_prefix else tail.removeprefix("vision_model.")), value, key)
        elif rest.startswith("mm_projector."):
            index, _, param = rest.removeprefix("mm_projector.").removeprefix("image_spatial_proj.").partition(".")
            linear = {"0": "linear_1", "2": "linear_2"}.get(index)
            put(f"model.multi_modal_projector.{linear}.{param}", value, key) if linear else unmatched.append(key)
        elif key.startswith("lm_head."):
            put(key, value, key)
        elif key.startswith(layer_prefix) and ".mlp.deepspeed_moe." in key:
            index, _, tail = key.removeprefix(layer_prefix).partition(".")
            if tail == _ROUTER_KEY:
                put(f"model.language_model.layers.{index}.mlp.router.proj.weight", value, key)
            elif tail.startswith(_EXPERT_PREFIX):
                expert, _, param = tail.removeprefix(_EXPERT_PREFIX).partition(".")
                param = _QWEN_EXPERT_KEYS.get(param, param) if qwen else param
                experts.setdefault((index, param), {})[int(expert)] = (key, value)
            else:
                unmatched.append(key)
        else:
            for ours, third in _translate_llm_key(key, qwen):
                # Qwen's fused c_attn [3D, (D)]: q, k, v are its thirds along the output rows.
                put(ours, value if third is None else value.chunk(3, dim=0)[third], key)

    # DeepSpeed experts: E x [out, in] -> [E, out, in]; fc1 / [gate_proj; up_proj] -> w_in, fc2 / down_proj -> w_out.
    def stack(index: str, param: str) -> tuple[Tensor, str] | None:
        by_expert = experts.pop((index, param), None)
        if by_expert is None:
            return None
        order = sorted(by_expert)
        if order != list(range(len(order))):  # a gap: name the experts' keys the checkpoint lacks
            template = by_expert[order[0]][0].replace(f"{_EXPERT_PREFIX}{order[0]}.", _EXPERT_PREFIX + "{}.")
            absent.extend(template.format(e) for e in range(order[-1]) if e not in by_expert)
            return None
        reference = tuple(by_expert[0][1].shape)
        odd = [f"{k}: {tuple(t.shape)} vs expert 0 {reference}" for k, t in by_expert.values() if t.shape != reference]
        if odd:
            shapes.extend(odd)
            return None
        first = by_expert[0][0].replace(f"{_EXPERT_PREFIX}0.", f"{_EXPERT_PREFIX}*.")
        return torch.stack([by_expert[e][1] for e in order]), first

    for index in sorted({i for i, _ in experts}, key=int):
        ours = f"model.language_model.layers.{index}.mlp.experts."
        gate, up = stack(index, "gate_proj.weight"), stack(index, "up_proj.weight")
        if gate and up:
            put(ours + "w_in", torch.cat([gate[0], up[0]], dim=1), gate[1])  # [E, 2H, D]: gate rows, then up rows
        elif gate or up:
            unmatched.append((gate or up)[1])
        for param, name in _EXPERT_PARAMS:
            if (found := stack(index, param)) is not None:
                put(ours + name, *found)
    unmatched.extend(by[e][0] for by in experts.values() for e in sorted(by))
    if upcycle_dense:
        _upcycle_mapped(mapped, origin, model)
    if projector_only:  # a stage-I file: the projector from the file, everything else as the model has it
        unmatched.extend(origin.pop(k) for k in [k for k in mapped if not k.startswith(_PROJECTOR)])
        mapped = {k: v for k, v in mapped.items() if k.startswith(_PROJECTOR)}
        for key, value in target.items():
            if not key.startswith(_PROJECTOR):
                mapped[key], origin[key] = value, "(kept: not part of a stage-I projector file)"

    unmatched.extend(origin[k] for k in mapped if k not in target)
    missing = [k for k in target if k not in mapped]
    shapes += [
        f"{origin[k]} -> {k}: {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in mapped.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if unmatched or missing or shapes or absent:
        lines = [f"the upstream MoE-LLaVA state dict does not match {type(model).__name__} exactly:"]
        unmatched = [f"{k} (upstream layer {k.rpartition('.')[0]}, no counterpart)" for k in sorted(unmatched)]
        missing = [f"{k} (upstream {_upstream_key(k, qwen, vision_has_prefix)})" for k in missing]
        absent = [f"{k} (upstream layer {k.rpartition('.')[0]})" for k in absent]
        labelled = (
            ("unmatched", unmatched),
            ("missing", missing),
            ("mis-shaped", shapes),
            ("missing upstream", absent),
        )
        for label, keys in labelled:
            if keys:
                more = f" (+{len(keys) - 20} more)" if len(keys) > 20 else ""
                lines.append(f"  {len(keys)} {label} key(s): {', '.join(keys[:20])}{more}")
        raise CheckpointMismatchError("\n".join(lines))
    return mapped


def _upcycle_mapped(mapped: dict[str, Tensor], origin: dict[str, str], model: MoELLaVA) -> None:
    """Replace the dense FFN tensors of ``model``'s MoE layers in ``mapped`` by ``E`` stacked copies (+ its router)."""
    num_experts = model.config.num_experts
    for index in model.moe_layers:
        prefix = f"model.language_model.layers.{index}.mlp."
        moe_keys = (prefix + "router.", prefix + "experts.")
        dense = {k.removeprefix(prefix): k for k in mapped if k.startswith(prefix) and not k.startswith(moe_keys)}
        if not dense:
            continue
        tensors = {name: mapped.pop(key) for name, key in dense.items()}
        sources = {name: origin.pop(key) for name, key in dense.items()}
        pieces = {"w_in": ("fc1.weight",), "b_in": ("fc1.bias",), "w_out": ("fc2.weight",), "b_out": ("fc2.bias",)}
        if "gate_proj.weight" in tensors:
            pieces = {"w_in": ("gate_proj.weight", "up_proj.weight"), "w_out": ("down_proj.weight",)}
        for name, parts in pieces.items():
            if all(part in tensors for part in parts):
                value = torch.cat([tensors.pop(part) for part in parts])  # [gate; up] rows for SwiGLU
                mapped[f"{prefix}experts.{name}"] = value.unsqueeze(0).expand(num_experts, *value.shape).clone()
                origin[f"{prefix}experts.{name}"] = sources[parts[0]]
        for name, value in tensors.items():  # leftovers are reported as unmatched
            mapped[prefix + name], origin[prefix + name] = value, sources[name]
        router = prefix + "router.proj.weight"
        mapped[router] = model.state_dict()[router].detach().clone()
        origin[router] = f"(random router of layer {index})"


TINY_VOCAB_SIZE = len(TINY_SPECIAL_TOKENS) + len(MOE_LLAVA_TINY_VOCAB)
TINY_IMAGE_TOKEN_ID = TINY_SPECIAL_TOKENS.index("<image>")


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------
def clip_vit_l14_336() -> dict[str, Any]:
    """openai/clip-vit-large-patch14-336's vision tower (24 layers, width 1024, 576 patches)."""
    return dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        hidden_act="quick_gelu",
        projection_dim=768,
        layer_norm_eps=1e-5,
    )


def create_moe_llava(
    text_config: PhiConfig | StableLmConfig | Qwen2Config,
    vision_config: Mapping[str, Any],
    *,
    image_token_index: int,
    tokenizer: str | None,
    moe_layers: str | Sequence[int] = "every_2_from_0",
    num_experts: int = 4,
    top_k: int = 2,
    capacity_factor: float | Literal["dropless"] | None = 1.5,
    eval_capacity_factor: float | Literal["dropless"] | None = 2.0,
    min_capacity: int = 0,
    router_aux_loss_coef: float = 0.01,
    top2_2nd_expert_sampling: bool = False,
    vision_overrides: Mapping[str, Any] | None = None,
    text_overrides: Mapping[str, Any] | None = None,
    owner: str = "MoELLaVA",
    model_class: type[MoELLaVA] | None = None,
    extra_config: Mapping[str, Any] | None = None,
) -> MoELLaVA:
    """Build a variant of ``model_class`` (default :class:`MoELLaVA`; a subclass such as Uni-MoE's passes its
    config's own fields in ``extra_config``). ``capacity_factor="dropless"`` (or None) is dropless:
    ``mome.create_model`` drops None-valued kwargs, so configs and the command line say ``dropless``. Every option
    is checked before anything is built (:func:`_check_moe_options`, ``moe_layers``, the overrides: keys the configs
    have, an image size that is a multiple of the patch size), each error naming ``owner``."""
    capacity_factor = None if capacity_factor == "dropless" else capacity_factor
    eval_capacity_factor = None if eval_capacity_factor == "dropless" else eval_capacity_factor
    _check_moe_options(
        owner,
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        min_capacity=min_capacity,
        router_aux_loss_coef=router_aux_loss_coef,
        top2_2nd_expert_sampling=top2_2nd_expert_sampling,
    )
    text_overrides, vision_overrides = dict(text_overrides or {}), dict(vision_overrides or {})
    reason = f"not a field of transformers' {type(text_config).__name__}"
    reject_unknown_options(owner, text_overrides, [k for k in text_overrides if hasattr(text_config, k)], reason)
    reject_unknown_options(
        owner, vision_overrides, _CLIP_VISION_FIELDS, "not a field of transformers' CLIPVisionConfig"
    )
    for name, value in text_overrides.items():
        setattr(text_config, name, value)
    vision = {**vision_config, **vision_overrides}
    check_patch_grid(vision.get("image_size", 224), vision.get("patch_size", 32), owner, ("image_size", "patch_size"))
    layer_indices = _moe_layer_indices(moe_layers, text_config.num_hidden_layers, owner)
    vision = CLIPVisionConfig(**vision)
    num_patches = (vision.image_size // vision.patch_size) ** 2
    model_class = model_class or MoELLaVA
    config = model_class.config_class(
        vision_config=vision,
        text_config=text_config,
        image_token_index=image_token_index,
        image_seq_length=num_patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        moe_layers=layer_indices,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        min_capacity=min_capacity,
        router_aux_loss_coef=router_aux_loss_coef,
        top2_2nd_expert_sampling=top2_2nd_expert_sampling,
        **dict(extra_config or {}),
    )
    with building(owner):
        model = model_class(config)
    model.pretrained_cfg = model.pretrained_cfg.replace(tokenizer=tokenizer)
    return model


_CLIP_VISION_FIELDS = tuple(CLIPVisionConfig().to_dict())
#: What an entrypoint's ``**kwargs`` may hold (the variant's text and vision configs are its own).
VARIANT_ARGS = [
    name
    for name in parameter_names(create_moe_llava)
    if name not in ("text_config", "vision_config", "model_class", "extra_config")
]


def _create_variant(arch: str, /, text_config: Any, vision_config: Mapping[str, Any], **kwargs: Any) -> MoELLaVA:
    """:func:`create_moe_llava` for the registered ``arch``; a keyword it does not take is an
    :class:`~mome.UnsupportedOptionError` naming ``arch``."""
    reject_unknown_options(arch, kwargs, VARIANT_ARGS, "not an argument of the MoE-LLaVA variants")
    return create_moe_llava(text_config, vision_config, owner=arch, **kwargs)


@register_model
def moe_llava_stablelm_1_6b_e4(pretrained: bool = False, **kwargs: Any) -> MoELLaVA:
    """MoE-LLaVA-StableLM-1.6B-4e: CLIP ViT-L/14-336 + StableLM-2-1.6B (24 layers, width 2048), E=4 in 12 layers."""
    text = StableLmConfig(
        vocab_size=100352,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=4096,
        layer_norm_eps=1e-5,
        use_qkv_bias=True,
        partial_rotary_factor=0.25,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=100257,
        eos_token_id=100257,
    )
    args = dict(image_token_index=100352 - 1, tokenizer="hf-hub:stabilityai/stablelm-2-1_6b")
    return _create_variant("moe_llava_stablelm_1_6b_e4", text, clip_vit_l14_336(), **{**args, **kwargs})


@register_model
def moe_llava_qwen_1_8b_e4(pretrained: bool = False, **kwargs: Any) -> MoELLaVA:
    """MoE-LLaVA-Qwen-1.8B-4e: CLIP ViT-L/14-336 + Qwen-1.8B as a Qwen2 LM (24 layers, width 2048), E=4 in 12 layers."""
    text = Qwen2Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=5504,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151643,
    )
    args = dict(image_token_index=151936 - 1, tokenizer="hf-hub:Qwen/Qwen-1_8B")
    return _create_variant("moe_llava_qwen_1_8b_e4", text, clip_vit_l14_336(), **{**args, **kwargs})


@register_model
def moe_llava_phi2_2_7b_e4(pretrained: bool = False, **kwargs: Any) -> MoELLaVA:
    """MoE-LLaVA-Phi2-2.7B-4e: CLIP ViT-L/14-336 + Phi-2 (32 layers, width 2560), 4 experts in 16 layers."""
    text = PhiConfig(
        vocab_size=51200,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="gelu_new",
        max_position_embeddings=2048,
        layer_norm_eps=1e-5,
        partial_rotary_factor=0.4,
        rope_theta=10000.0,
        resid_pdrop=0.1,
        embd_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    args = dict(image_token_index=51200 - 1, tokenizer="hf-hub:microsoft/phi-2")
    return _create_variant("moe_llava_phi2_2_7b_e4", text, clip_vit_l14_336(), **{**args, **kwargs})


def tiny_text_config(
    llm: str, owner: str = "moe_llava_tiny_e4"
) -> PhiConfig | StableLmConfig | Qwen2Config | LlamaConfig:
    """The tiny variants' 4-layer LLM of width 64 (FFN 128, 4 heads, 128 positions) over the tiny tokenizer's
    vocabulary, as ``llm`` (``"phi"``, ``"stablelm"``, ``"qwen2"``, ``"llama"``); a bad ``llm`` names ``owner``."""
    common = dict(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=TINY_SPECIAL_TOKENS.index("<s>"),
        eos_token_id=TINY_SPECIAL_TOKENS.index("</s>"),
        pad_token_id=TINY_SPECIAL_TOKENS.index("<pad>"),
    )
    if llm == "phi":
        return PhiConfig(**common, hidden_act="gelu_new", partial_rotary_factor=0.5, resid_pdrop=0.0)
    if llm == "stablelm":
        return StableLmConfig(**common, use_qkv_bias=True, partial_rotary_factor=0.25)
    if llm == "llama":
        return LlamaConfig(**common)
    check_choice("llm", llm, ("phi", "stablelm", "qwen2", "llama"), owner=owner)
    return Qwen2Config(**common)


@register_model
def moe_llava_tiny_e4(pretrained: bool = False, llm: str = "phi", **kwargs: Any) -> MoELLaVA:
    """A tiny MoE-LLaVA for tests and demos: 32 px CLIP (patch 8, 16 image tokens, 3 layers of width 32),
    a 4-layer LLM of width 64 (``llm="phi"``, ``"stablelm"``, ``"qwen2"`` or ``"llama"``), 4 experts in layers 0 and 2,
    and the word-level :func:`moe_llava_tiny_tokenizer` (pretrained cfg ``tokenizer="mome:moe_llava_tiny"``)."""
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8
    )
    args = dict(image_token_index=TINY_IMAGE_TOKEN_ID, tokenizer="mome:moe_llava_tiny")
    return _create_variant("moe_llava_tiny_e4", tiny_text_config(llm), vision, **{**args, **kwargs})
