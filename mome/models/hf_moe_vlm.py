"""transformers' multimodal MoE models in the zoo: loadable by name, with mome's routing statistics.

The models are transformers' own classes (no re-implementation), built from their config classes:

- ``qwen3_vl_moe``: Qwen3-VL-MoE (Qwen Team, "Qwen3-VL Technical Report", arXiv:2511.21631),
  :class:`~transformers.Qwen3VLMoeForConditionalGeneration`, router ``Qwen3VLMoeTextTopKRouter`` (softmax top-k).
- ``ernie4_5_vl_moe``: ERNIE-4.5-VL-MoE (Baidu, "ERNIE 4.5 Technical Report", 2025),
  :class:`~transformers.Ernie4_5_VLMoeForConditionalGeneration`: separate text and vision experts per layer
  (``text_moe`` / ``vision_moe``, each with its own ``Ernie4_5_VLMoeMoeTopKRouter`` that routes only its own
  tokens, chosen by the processor's ``moe_mm_token_type_ids``) plus shared experts.
- ``glm4v_moe``: GLM-4.5V (Z.ai / Zhipu, "GLM-4.5V and GLM-4.1V-Thinking", arXiv:2507.01006),
  :class:`~transformers.Glm4vMoeForConditionalGeneration`, router ``Glm4vMoeTextTopkRouter`` (sigmoid scores,
  group-limited top-k with a score-correction bias, DeepSeek-V3 style), first layers dense.
- ``llama4``: Llama 4 (Meta, "The Llama 4 herd", 2025), :class:`~transformers.Llama4ForConditionalGeneration`,
  router ``Llama4Router`` (top-k of the logits, sigmoid gate) plus a shared expert.
- ``aria``: Aria (Rhymes AI, "Aria: An Open Multimodal Native Mixture-of-Experts Model", arXiv:2410.05993),
  :class:`~transformers.AriaForConditionalGeneration`, router ``AriaTextTopKRouter``.
- ``qwen3_omni_moe``: Qwen3-Omni's Thinker (Qwen Team, "Qwen3-Omni Technical Report", arXiv:2509.17765):
  audio, image, video and text into one MoE LLM, ``Qwen3OmniMoeThinkerForConditionalGeneration``
  (the Talker and the code-to-wave decoder, which make speech, are not built).

DeepSeek-VL (``deepseek_vl``, ``deepseek_vl_hybrid``) is not here: its language model in transformers is a
dense Llama (``text_config`` of model type ``llama``), there is no MoE to analyse.

Names: ``<family>_tiny`` (random weights, a tiny config of the family's real config class: 2 layers of width
32, 4 experts, a 1-block vision tower, 32 px images; a few hundred kB) and the released sizes,
``qwen3_vl_moe_30b_a3b``, ``ernie4_5_vl_moe_28b_a3b``, ``glm4_5v_106b_a12b``, ``llama4_scout_17b_16e``,
``aria_25b_a3_9b``, ``qwen3_omni_moe_30b_a3b``, each with a zoo card (``zoo/<name>.<tag>.yaml``, format
``transformers``: the Hub repo of the release and its revision). Their architecture is the ``config.json`` of
the card's repo and ``pretrained=True`` loads the weights with the class's ``from_pretrained``; ``create_model``
fetches the repo at the card's revision through huggingface_hub's cache (offline-aware) after the entrypoint has
checked that the installed transformers has the family. :func:`load_processor` gives the card's processor,
checked against the model's config by :func:`check_processor`.

Routing: :func:`enable_routing_capture` hooks the family's router modules (found by class) and records,
per router call, mome's routing statistics (:mod:`mome.layers.hf_routing`), read with :func:`mome.routing_stats`.
Modality ids (0 image, 1 text, 2 video, 3 audio) come from the processor's token types
(``mm_token_type_ids``: 0 text, 1 image, 2 video, 3 audio) when the forward is given them, else from
``input_ids`` and the config's image / video / audio token ids (the rule the processors apply).

Evaluation through the family's processor (``mome-eval``, docs/hf_moe_vlms.md): :func:`generate_answers` (greedy
answers to a batch of chat turns, left-padded) and :func:`answer_log_likelihoods` (``log p(answer | prompt)`` of
candidate answers, for zero-shot classification by likelihood).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    InvalidArgumentError,
    PretrainedUnavailableError,
    ProcessorMismatchError,
    UnsupportedModelError,
)
from .._registry import register_model
from ..layers.hf_routing import RouterTap, RoutingCapture

__all__ = [
    "FAMILIES",
    "DisabledExperts",
    "HFMoEFamily",
    "answer_log_likelihoods",
    "chat_prompt",
    "check_processor",
    "disable_experts",
    "enable_routing_capture",
    "example_inputs",
    "experts_disabled",
    "family_of",
    "folder_processor",
    "generate_answer",
    "generate_answers",
    "is_hf_moe_vlm",
    "load_folder",
    "load_processor",
    "processor_inputs",
    "router_taps",
    "routing_capture",
    "save_tiny",
    "set_top_k",
    "tiny_config",
    "tiny_processor",
    "transformers_folder_family",
    "weights_files",
]

IMAGE, TEXT, VIDEO, AUDIO = range(4)
#: the processors' ``mm_token_type_ids`` (0 text, 1 image, 2 video, 3 audio) -> mome's modality ids
_PROCESSOR_TYPES = torch.tensor([TEXT, IMAGE, VIDEO, AUDIO])


@dataclass(frozen=True)
class HFMoEFamily:
    """One transformers MoE VLM family: where its classes live and how its router reports."""

    model_type: str
    config_class: str
    model_class: str
    router_class: str
    #: ``"logits_weights_index"``: the router returns ``(logits [T, E], weights [T, k], index [T, k])``;
    #: ``"scores_logits"``: ``(scores [T, E] (0 off the chosen experts), logits [T, E])`` (Llama 4)
    router_output: str
    #: how the router turns logits into scores: ``"softmax"`` or ``"sigmoid"`` (probabilities for the
    #: statistics are the scores normalised to sum 1)
    score: str
    #: config fields holding the token ids of each non-text modality
    token_ids: tuple[tuple[int, str], ...]
    num_modalities: int
    paper: str
    text_config_experts: str  # the text config's field with the number of routed experts
    text_config_top_k: str


FAMILIES: dict[str, HFMoEFamily] = {
    "qwen3_vl_moe": HFMoEFamily(
        "qwen3_vl_moe",
        "Qwen3VLMoeConfig",
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3VLMoeTextTopKRouter",
        "logits_weights_index",
        "softmax",
        ((IMAGE, "image_token_id"), (VIDEO, "video_token_id")),
        3,
        "arXiv:2511.21631",
        "num_experts",
        "num_experts_per_tok",
    ),
    "ernie4_5_vl_moe": HFMoEFamily(
        "ernie4_5_vl_moe",
        "Ernie4_5_VLMoeConfig",
        "Ernie4_5_VLMoeForConditionalGeneration",
        "Ernie4_5_VLMoeMoeTopKRouter",
        "logits_weights_index",
        "softmax",
        ((IMAGE, "image_token_id"), (VIDEO, "video_token_id")),
        3,
        "ERNIE 4.5 Technical Report (Baidu, 2025)",
        "moe_num_experts",
        "moe_k",
    ),
    "glm4v_moe": HFMoEFamily(
        "glm4v_moe",
        "Glm4vMoeConfig",
        "Glm4vMoeForConditionalGeneration",
        "Glm4vMoeTextTopkRouter",
        "logits_weights_index",
        "sigmoid",
        ((IMAGE, "image_token_id"), (VIDEO, "video_token_id")),
        3,
        "arXiv:2507.01006",
        "n_routed_experts",
        "num_experts_per_tok",
    ),
    "llama4": HFMoEFamily(
        "llama4",
        "Llama4Config",
        "Llama4ForConditionalGeneration",
        "Llama4Router",
        "scores_logits",
        "sigmoid",
        ((IMAGE, "image_token_index"),),
        2,
        "The Llama 4 herd (Meta, 2025)",
        "num_local_experts",
        "num_experts_per_tok",
    ),
    "aria": HFMoEFamily(
        "aria",
        "AriaConfig",
        "AriaForConditionalGeneration",
        "AriaTextTopKRouter",
        "logits_weights_index",
        "softmax",
        ((IMAGE, "image_token_index"),),
        2,
        "arXiv:2410.05993",
        "moe_num_experts",
        "moe_topk",
    ),
    "qwen3_omni_moe": HFMoEFamily(
        "qwen3_omni_moe",
        "Qwen3OmniMoeThinkerConfig",
        "Qwen3OmniMoeThinkerForConditionalGeneration",
        "Qwen3OmniMoeThinkerTextTopKRouter",
        "logits_weights_index",
        "softmax",
        ((IMAGE, "image_token_id"), (VIDEO, "video_token_id"), (AUDIO, "audio_token_id")),
        4,
        "arXiv:2509.17765",
        "num_experts",
        "num_experts_per_tok",
    ),
}


def _transformers_class(family: HFMoEFamily, name: str, owner: str) -> type:
    """``name`` from ``transformers.models.<model_type>``; a transformers without it is a typed error."""
    import transformers

    try:
        module = importlib.import_module(f"transformers.models.{family.model_type}.modeling_{family.model_type}")
        if name.endswith("Config"):
            module = importlib.import_module(f"transformers.models.{family.model_type}")
        return getattr(module, name)
    except (ImportError, AttributeError):
        raise UnsupportedModelError(
            f"{owner}: the installed transformers {transformers.__version__} has no {name} "
            f"(model type {family.model_type!r}); install a transformers version that has it"
        ) from None


def _family(model_type: str, owner: str) -> HFMoEFamily:
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{owner}: model type {model_type!r} is not a transformers MoE VLM family of mome;"
            f" known: {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def is_hf_moe_vlm(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' MoE VLMs of :data:`FAMILIES` (by its ``config.model_type``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in FAMILIES or model_type == "qwen3_omni_moe_thinker"


def family_of(model: nn.Module) -> HFMoEFamily:
    """The family of a transformers model (by its ``config.model_type``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type == "qwen3_omni_moe_thinker":
        model_type = "qwen3_omni_moe"
    if model_type is None:
        raise UnsupportedModelError(f"{type(model).__name__}: not a transformers model (no config.model_type)")
    return _family(model_type, type(model).__name__)


# -- tiny configs ------------------------------------------------------------------------------------------------

_VOCAB = 128
_IDS = dict(image=100, video=101, start=102, end=103, audio=104, audio_start=105, audio_end=106)


def _text(**changes: Any) -> dict[str, Any]:
    text = dict(
        vocab_size=_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
    )
    text.update(changes)
    return text


_QWEN_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=8,
    spatial_merge_size=2,
    temporal_patch_size=2,
    out_hidden_size=32,
    num_position_embeddings=16,
    deepstack_visual_indexes=[0],
)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}


def tiny_config(model_type: str) -> Any:
    """A tiny random-init config of ``model_type`` built from the family's real config class: 2 LLM layers of
    width 32, 4 experts (top-2; Llama 4: top-1 as released), a one-block vision tower on 32 px images, vocabulary
    of 128 with the image / video / audio placeholders at ids 100 / 101 / 104."""
    family = _family(model_type, f"tiny_config({model_type!r})")
    cls = _transformers_class(family, family.config_class, f"{model_type}_tiny")
    ids = _IDS
    if model_type == "qwen3_vl_moe":
        return cls(
            text_config=_text(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, rope_parameters=_MROPE),
            vision_config=dict(_QWEN_VISION),
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            vision_start_token_id=ids["start"],
            vision_end_token_id=ids["end"],
        )
    if model_type == "qwen3_omni_moe":
        return cls(
            text_config=_text(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, rope_parameters=_MROPE),
            vision_config=dict(_QWEN_VISION),
            audio_config=dict(
                num_mel_bins=16,
                encoder_layers=1,
                encoder_attention_heads=2,
                encoder_ffn_dim=64,
                d_model=32,
                output_dim=32,
                downsample_hidden_size=8,
                max_source_positions=64,
                n_window=4,
                n_window_infer=8,
            ),
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            audio_token_id=ids["audio"],
            vision_start_token_id=ids["start"],
            vision_end_token_id=ids["end"],
            audio_start_token_id=ids["audio_start"],
            audio_end_token_id=ids["audio_end"],
        )
    if model_type == "glm4v_moe":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
        return cls(
            text_config=_text(
                moe_intermediate_size=32,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE (as released: first layer dense)
                n_group=1,
                topk_group=1,
                rope_parameters=rope,
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=8,
                image_size=32,
                spatial_merge_size=2,
                temporal_patch_size=2,
                out_hidden_size=32,
            ),
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            image_start_token_id=ids["start"],
            image_end_token_id=ids["end"],
            video_start_token_id=ids["audio"],
            video_end_token_id=ids["audio_start"],
        )
    if model_type == "ernie4_5_vl_moe":
        return cls(
            text_config=_text(
                moe_intermediate_size=[32, 16],
                moe_num_experts=4,
                moe_k=2,
                moe_num_shared_experts=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [3, 3, 2]},
            ),
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=8,
                spatial_merge_size=2,
                temporal_merge_size=2,
            ),
            image_token_id=ids["image"],
            video_token_id=ids["video"],
            image_start_token_id=ids["start"],
            image_end_token_id=ids["end"],
            video_start_token_id=ids["audio"],
            video_end_token_id=ids["audio_start"],
        )
    if model_type == "llama4":
        return cls(
            text_config=_text(
                intermediate_size_mlp=64,
                num_local_experts=4,
                num_experts_per_tok=1,
                attention_chunk_size=64,
                interleave_moe_layer_step=1,
            ),
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=128,  # 4 x hidden: the pixel-shuffle MLP's input (as released)
                image_size=32,
                patch_size=8,
                vision_output_dim=32,
                projector_input_dim=32,
                projector_output_dim=32,
                pixel_shuffle_ratio=0.5,
            ),
            image_token_index=ids["image"],
            boi_token_index=ids["start"],
            eoi_token_index=ids["end"],
        )
    # aria
    return cls(
        text_config=_text(intermediate_size=32, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        ),
        projector_patch_to_query_dict={16: 4},
        image_token_index=ids["image"],
    )


def example_inputs(model: nn.Module, batch_size: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """A prompt with one random 32 px image per sample, as the family's processor lays it out: 3 text tokens,
    the image's start token, its placeholders, its end token, 3 text tokens; with the processor's token types
    (``mm_token_type_ids``, ERNIE's ``moe_mm_token_type_ids``) where the family's forward takes them. For the
    tiny configs (the placeholder count follows the config's patch and merge sizes)."""
    family = family_of(model)
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    extra: dict[str, Tensor] = {}
    if family.model_type in ("qwen3_vl_moe", "qwen3_omni_moe", "glm4v_moe", "ernie4_5_vl_moe"):
        merge = vision.spatial_merge_size
        grid = (1, 2 * merge, 2 * merge)
        num_image_tokens = 4
        temporal = getattr(vision, "temporal_patch_size", 1)
        if family.model_type == "ernie4_5_vl_moe":
            temporal = 1
        pixels = torch.randn(batch_size * grid[1] * grid[2], 3 * temporal * vision.patch_size**2, generator=generator)
        extra = {"pixel_values": pixels, "image_grid_thw": torch.tensor([grid] * batch_size)}
        start = getattr(config, "vision_start_token_id", None) or config.image_start_token_id
        end = getattr(config, "vision_end_token_id", None) or config.image_end_token_id
    elif family.model_type == "llama4":
        side = vision.image_size
        num_image_tokens = int((side // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)
        extra = {"pixel_values": torch.randn(batch_size, 3, side, side, generator=generator)}
        start, end = config.boi_token_index, config.eoi_token_index
    else:  # aria
        side = vision.image_size
        num_image_tokens = config.projector_patch_to_query_dict[(side // vision.patch_size) ** 2]
        extra = {
            "pixel_values": torch.randn(batch_size, 3, side, side, generator=generator),
            "pixel_mask": torch.ones(batch_size, side, side, dtype=torch.bool),
        }
        start = end = None
    image_id = getattr(config, "image_token_id", None)
    if image_id is None:
        image_id = config.image_token_index
    prompt = [1, 2, 3] + ([start] if start is not None else []) + [image_id] * num_image_tokens
    prompt += ([end] if end is not None else []) + [4, 5, 6]
    input_ids = torch.tensor([prompt] * batch_size)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **extra}
    if family.model_type in ("qwen3_vl_moe", "glm4v_moe", "ernie4_5_vl_moe"):
        inputs["mm_token_type_ids"] = (input_ids == image_id).long()  # the processor's types: 1 image, 0 text
    if family.model_type == "ernie4_5_vl_moe":  # ERNIE routes the image's start and end tokens to vision experts
        inputs["moe_mm_token_type_ids"] = ((input_ids == image_id) | (input_ids == start) | (input_ids == end)).long()
    return inputs


# -- routing capture ---------------------------------------------------------------------------------------------


def _decoder(family: HFMoEFamily) -> Callable[[Any, int | None], tuple[Tensor, Tensor, Tensor, Tensor]]:
    """How the family's router output reads back (when the statistics are read, not in the forward):
    ``(logits [T, E], probabilities [T, E], chosen experts [T, k], their weights [T, k])``, the probabilities being
    the router's scores normalised to sum 1."""

    def scores_of(logits: Tensor) -> Tensor:
        logits = logits.float()
        if family.score == "softmax":
            return logits.softmax(-1)
        scores = logits.sigmoid()
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)

    if family.router_output == "scores_logits":

        def decode(output: Any, top_k: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            scores, logits = output
            index = torch.topk(logits, top_k, dim=-1).indices  # the router's own choice (its top_k at the call)
            return logits, scores_of(logits), index, scores.gather(-1, index)

        return decode

    def decode(output: Any, top_k: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits, weights, index = output[:3]
        return logits, scores_of(logits), index, weights

    return decode


def modality_ids(model: nn.Module, input_ids: Tensor, mm_token_type_ids: Tensor | None = None) -> Tensor:
    """mome's modality id of every token ``[B, T]`` (0 image, 1 text, 2 video, 3 audio): the processor's token
    types when given (and of the same shape), else from ``input_ids`` and the config's placeholder ids."""
    if mm_token_type_ids is not None and mm_token_type_ids.shape == input_ids.shape:
        return _PROCESSOR_TYPES.to(mm_token_type_ids.device)[mm_token_type_ids.long()]
    family = family_of(model)
    ids = torch.full_like(input_ids, TEXT)
    for modality, field in family.token_ids:
        token = getattr(model.config, field, None)
        if token is not None:
            ids[input_ids == token] = modality
    return ids


def router_taps(model: nn.Module, block_masks: dict[str, Tensor | None] | None = None) -> dict[str, RouterTap]:
    """``{module name: RouterTap}`` for every router module of the family's router class in ``model``.

    ERNIE-4.5-VL's routers each see a subset of the tokens: ``block_masks`` (``{MoE block name: the block's
    moe_mm_token_type_ids}``, filled by the block pre-hooks :func:`enable_routing_capture` installs) tells which."""
    family = family_of(model)
    router_class = _transformers_class(family, family.router_class, type(model).__name__)
    taps: dict[str, RouterTap] = {}
    decode = _decoder(family)
    block_masks = {} if block_masks is None else block_masks
    for name, module in model.named_modules():
        if not isinstance(module, router_class):
            continue
        subset = None
        if family.model_type == "ernie4_5_vl_moe":  # .mlp.text_moe.gate / .mlp.vision_moe.gate
            block_name, expert_set = name.rsplit(".", 2)[:2]
            subset = _ernie_subset(block_masks, block_name, vision=expert_set == "vision_moe")
        taps[name] = RouterTap(module, decode, subset)
    return taps


def _ernie_subset(
    masks: dict[str, Tensor | None], block: str, vision: bool
) -> Callable[[], Callable[[], Tensor | None]]:
    def subset() -> Callable[[], Tensor | None]:  # at the router call: the block's mask of this forward, no tensor op
        return functools.partial(_ernie_rows, masks.get(block), vision)

    return subset


def _ernie_rows(mask: Tensor | None, vision: bool) -> Tensor | None:
    """The tokens ``[B * T]`` one of ERNIE's expert sets routes (``mask``: the block's ``moe_mm_token_type_ids``,
    1 for the vision experts' tokens); None: all of them."""
    if mask is None or not bool(mask.any()):
        return None if not vision else torch.zeros(0, dtype=torch.bool)  # all tokens go to the text experts
    mask = mask.reshape(-1).bool()
    return mask if vision else ~mask


class _Capture:
    """A :class:`~mome.layers.hf_routing.RoutingCapture` plus ERNIE's block pre-hooks."""

    def __init__(self, model: nn.Module) -> None:
        family = family_of(model)
        self.model = model
        masks: dict[str, Tensor | None] = {}
        taps = router_taps(model, masks)
        if not taps:
            raise UnsupportedModelError(
                f"{type(model).__name__}: no {family.router_class} module found: nothing to capture"
            )
        self._handles = []
        if family.model_type == "ernie4_5_vl_moe":  # the blocks holding text_moe and vision_moe
            blocks = {name.rsplit(".", 2)[0] for name in taps}
            for name in sorted(blocks):
                block = model.get_submodule(name)
                self._handles.append(block.register_forward_pre_hook(_mask_hook(masks, name), with_kwargs=True))

        def of(args: tuple, kwargs: dict) -> Callable[[], Tensor] | None:  # computed when the statistics are read
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                return None
            return functools.partial(modality_ids, model, input_ids, kwargs.get("mm_token_type_ids"))

        self.capture = RoutingCapture(model, taps, of, family.num_modalities)

    def remove(self) -> None:
        self.capture.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _mask_hook(masks: dict[str, Tensor | None], name: str) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        masks[name] = kwargs.get("moe_mm_token_type_ids", args[1] if len(args) > 1 else None)

    return hook


def enable_routing_capture(model: nn.Module) -> _Capture:
    """Start recording the routing of ``model`` (a family of :data:`FAMILIES`); returns a handle whose
    ``remove()`` stops it and takes every hook away. :func:`mome.routing_stats` reads the records."""
    return _Capture(model)


@contextmanager
def routing_capture(model: nn.Module) -> Iterator[RoutingCapture]:
    """Record the routing of ``model`` inside the ``with`` block (:func:`enable_routing_capture`)."""
    handle = _Capture(model)
    try:
        yield handle.capture
    finally:
        handle.remove()


def set_top_k(model: nn.Module, top_k: int) -> int:
    """Route every token to ``top_k`` experts at inference: sets ``top_k`` on each router module (which its
    forward reads on every call). Returns the previous value. Fewer experts per token, fewer active parameters."""
    taps = router_taps(model)
    if not taps:
        raise UnsupportedModelError(f"{type(model).__name__}: no router module found")
    num_experts = min(tap.module.num_experts for tap in taps.values())
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise InvalidArgumentError("top_k", f"an int in [1, {num_experts}]", top_k, "set_top_k")
    previous = next(iter(taps.values())).module.top_k
    for tap in taps.values():
        tap.module.top_k = top_k
    return previous


# -- disabling experts -------------------------------------------------------------------------------------------


class DisabledExperts:
    """The handle :func:`disable_experts` returns: :meth:`remove` enables the experts again (and takes its hooks and
    changed tensors back). ``experts``: ``{router name: the disabled expert indices}``."""

    def __init__(self, experts: dict[str, list[int]]) -> None:
        self.experts = experts
        self._undo: list[Callable[[], None]] = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def _reselect_hook(disabled: Tensor) -> Callable[..., Any]:
    """A forward hook replacing a softmax top-k router's choice (Qwen3-VL-MoE, Qwen3-Omni, Aria: ``p = softmax(z)``,
    the ``k`` largest ``p_e``, weights ``p_e / sum_top-k p`` (Aria's softmax over the top-k logits is the same)) by
    the same rule on the logits with the disabled experts at ``-inf``; the logits it returns are the router's own."""

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        logits, weights, _ = output[:3]
        probs = logits.float().masked_fill(disabled.to(logits.device), float("-inf")).softmax(-1)  # [T, E]
        top, index = probs.topk(module.top_k, dim=-1)  # [T, k]
        if getattr(module, "norm_topk_prob", True):
            top = top / top.sum(-1, keepdim=True)
        return (logits, top.to(weights.dtype), index, *output[3:])

    return hook


def disable_experts(model: nn.Module, experts: Any) -> DisabledExperts:
    """Route no token to the given experts at inference, without changing transformers' code: ``experts`` is a list
    of expert indices (disabled in every router of the family's router class) or ``{router name: indices}``.
    Returns a :class:`DisabledExperts` handle whose ``remove()`` enables them again; :func:`experts_disabled` is
    the ``with`` form. Each family's own knob where it has one, else a forward hook on the router:

    - GLM-4.5V: the router's ``e_score_correction_bias`` (it enters the choice only, not the weights) is ``-inf``
      for the disabled experts while they are disabled;
    - ERNIE-4.5-VL: a forward hook on the router's ``moe_statics`` (the bias-corrected scores the top-k reads)
      puts ``-inf`` at the disabled experts;
    - Llama 4: the router is an ``nn.Linear`` without bias; a bias (a buffer, not saved) of ``-inf`` at the
      disabled experts and 0 elsewhere is given to it, so its own top-k and sigmoid never pick them;
    - Qwen3-VL-MoE, Qwen3-Omni, Aria: their routers compute logits, softmax and top-k in one forward with no input
      or parameter that could exclude an expert, so a forward hook (run before any other) replaces the router's
      choice by the same rule on the masked logits (:func:`_reselect_hook`; with nothing disabled it gives the
      router's own output, ``tests/test_hf_moe_vlm_eval.py``).

    Raises:
        InvalidArgumentError: an unknown router name, an index outside ``[0, E)``, or fewer than ``top_k`` experts
            left to a router.
    """
    taps = router_taps(model)
    if not taps:
        raise UnsupportedModelError(f"{type(model).__name__}: no router module found")
    chosen = dict(experts) if isinstance(experts, dict) else {name: experts for name in taps}
    unknown = sorted(set(chosen) - set(taps))
    if unknown:
        raise InvalidArgumentError(
            "experts", f"router names of the model ({sorted(taps)[:3]} ...)", unknown, "disable_experts"
        )
    family = family_of(model)
    handle = DisabledExperts({})
    for name, indices in chosen.items():
        router = taps[name].module
        num_experts, top_k = int(router.num_experts), int(router.top_k)
        if isinstance(indices, (str, bytes)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise InvalidArgumentError("experts", f"a list of expert indices (ints) of router {name}", indices)
        indices = sorted(set(indices))
        if any(not 0 <= i < num_experts for i in indices) or num_experts - len(indices) < top_k:
            raise InvalidArgumentError(
                "experts",
                f"indices in [0, {num_experts}) leaving at least top_k={top_k} experts to router {name}",
                indices,
                "disable_experts",
            )
        handle.experts[name] = indices
    try:
        for name, indices in handle.experts.items():
            if indices:
                _disable(family, taps[name].module, indices, handle)
    except BaseException:
        handle.remove()
        raise
    return handle


def _disable(family: HFMoEFamily, router: nn.Module, indices: list[int], handle: DisabledExperts) -> None:
    mask = torch.zeros(int(router.num_experts), dtype=torch.bool)
    mask[indices] = True
    if family.model_type == "glm4v_moe":
        bias = router.e_score_correction_bias
        saved = bias.detach().clone()
        with torch.no_grad():
            bias.masked_fill_(mask.to(bias.device), float("-inf"))

        def restore() -> None:
            with torch.no_grad():
                bias.copy_(saved)

        handle._undo.append(restore)
    elif family.model_type == "ernie4_5_vl_moe":

        def statics_hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            return output.masked_fill(mask.to(output.device), float("-inf"))  # [T, E]

        handle._undo.append(router.moe_statics.register_forward_hook(statics_hook).remove)
    elif family.model_type == "llama4":
        weight = router.weight
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device).masked_fill(
            mask.to(weight.device), float("-inf")
        )
        del router.bias  # nn.Linear(bias=False) holds bias=None as a parameter slot
        router.register_buffer("bias", bias, persistent=False)

        def restore() -> None:
            del router.bias
            router.register_parameter("bias", None)

        handle._undo.append(restore)
    else:
        hook = router.register_forward_hook(_reselect_hook(mask), prepend=True)
        handle._undo.append(hook.remove)


@contextmanager
def experts_disabled(model: nn.Module, experts: Any) -> Iterator[DisabledExperts]:
    """:func:`disable_experts` for the ``with`` block."""
    handle = disable_experts(model, experts)
    try:
        yield handle
    finally:
        handle.remove()


# -- registry ----------------------------------------------------------------------------------------------------

#: arch -> (model type, Hub repo of the released model)
RELEASED = {
    "qwen3_vl_moe_30b_a3b": ("qwen3_vl_moe", "Qwen/Qwen3-VL-30B-A3B-Instruct"),
    "ernie4_5_vl_moe_28b_a3b": ("ernie4_5_vl_moe", "baidu/ERNIE-4.5-VL-28B-A3B-PT"),
    "glm4_5v_106b_a12b": ("glm4v_moe", "zai-org/GLM-4.5V"),
    "llama4_scout_17b_16e": ("llama4", "meta-llama/Llama-4-Scout-17B-16E-Instruct"),
    "aria_25b_a3_9b": ("aria", "rhymes-ai/Aria"),
    "qwen3_omni_moe_30b_a3b": ("qwen3_omni_moe", "Qwen/Qwen3-Omni-30B-A3B-Instruct"),
}


def _build_tiny(model_type: str, pretrained: bool, overrides: dict[str, Any]) -> nn.Module:
    owner = f"{model_type}_tiny"
    if pretrained:
        raise PretrainedUnavailableError(f"{owner}: random weights only (a test and demo model); no checkpoint")
    if overrides:
        raise InvalidArgumentError("kwargs", "none (the tiny config is fixed)", sorted(overrides), owner)
    family = _family(model_type, owner)
    config = tiny_config(model_type)
    model = _transformers_class(family, family.model_class, owner)(config)
    return model.eval()


def _build_released(arch: str, pretrained: bool, source: Callable[[bool], Any] | None, dtype: str | None) -> nn.Module:
    """The released model of ``arch`` from its card's repo (``source``, the fetch function ``create_model`` passes:
    the card's Hub repo at the card's revision, through huggingface_hub's cache, offline-aware): the repo's
    ``config.json`` with random weights, or with ``pretrained`` the class's ``from_pretrained``. The installed
    transformers must have the family's classes: checked before anything is fetched."""
    model_type, _ = RELEASED[arch]
    card = getattr(source, "card", arch)
    family = _family(model_type, card)
    model_class = _transformers_class(family, family.model_class, card)
    _transformers_class(family, _WHOLE_MODEL.get(model_type, family.model_class), card)
    if source is None:  # the entrypoint called directly, or a folder mome.save_pretrained would have refused
        raise InvalidArgumentError(
            "source",
            f"the fetch function of its zoo card: build it with mome.create_model({arch!r}) (a transformers "
            "save_pretrained folder: pretrained_cfg_overlay=dict(file=FOLDER))",
            None,
            arch,
        )
    folder = source(not pretrained)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if config.model_type != model_type:
        raise CheckpointMismatchError(
            f"{card}: {folder} holds a {config.model_type!r} config.json, not the card's family {model_type!r}"
        )
    if not pretrained:
        return model_class(getattr(config, "thinker_config", config)).eval()
    return _from_pretrained(family, folder, card, dtype)


def _from_pretrained(
    family: HFMoEFamily, folder: Any, owner: str, dtype: str | None = None, whole: bool = True
) -> nn.Module:
    """The family's model class's ``from_pretrained(folder)``, in eval mode (Qwen3-Omni: the whole model's
    Thinker, unless ``whole`` is False: a folder of the Thinker alone)."""
    model_class = _transformers_class(family, family.model_class, owner)
    whole_class = _transformers_class(family, _WHOLE_MODEL.get(family.model_type, family.model_class), owner)
    if whole_class is model_class or not whole:
        return model_class.from_pretrained(folder, dtype=dtype or "auto").eval()
    # Qwen3-Omni: the repo is the whole model (thinker.* + talker.* + code2wav.*); only the Thinker is built
    whole_model = whole_class.from_pretrained(folder, dtype=dtype or "auto", enable_audio_output=False)
    return whole_model.thinker.eval()


def _folder_model_type(folder: Any) -> str | None:
    """The ``model_type`` of a transformers ``config.json`` in ``folder`` (None: none, or a mome saved folder's)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "architecture" in config:  # mome's own saved folders name an architecture
        return None
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


def transformers_folder_family(folder: Any) -> str | None:
    """The family (``model_type``) of a transformers ``save_pretrained`` folder (or Hub snapshot) of one of
    :data:`FAMILIES`, read from its ``config.json``; None for any other folder (e.g. a mome saved folder)."""
    model_type = _folder_model_type(folder)
    if model_type == "qwen3_omni_moe_thinker":  # a Qwen3-Omni Thinker saved alone
        return "qwen3_omni_moe"
    return model_type if model_type in FAMILIES else None


def weights_files(folder: Any) -> list[str]:
    """The safetensors files the ``from_pretrained`` of a transformers ``save_pretrained`` folder (or Hub snapshot)
    reads: the shards its ``model.safetensors.index.json`` maps the weights to, else ``model.safetensors``.

    Raises:
        CorruptCheckpointError: the index is not JSON with a ``weight_map`` of file names.
    """
    import json
    from pathlib import Path

    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    index = Path(folder) / SAFE_WEIGHTS_INDEX_NAME
    if not index.is_file():
        return [SAFE_WEIGHTS_NAME]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({str(file) for file in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpointError(f"{index}: not a safetensors index with a weight_map ({err})") from None


def load_folder(folder: Any, name: str, dtype: str | None = None) -> nn.Module:
    """The model of a transformers ``save_pretrained`` folder of one of :data:`FAMILIES` (the class's own
    ``from_pretrained``; what ``create_model("local-dir:FOLDER")`` builds for such a folder, and
    ``create_model("hf-hub:ORG/REPO")`` for the snapshot of such a repo). Its processor, when
    saved beside it, is :func:`folder_processor`'s.

    Raises:
        UnsupportedModelError: the folder is not one of these families, or the installed transformers lacks it.
    """
    model_type = transformers_folder_family(folder)
    if model_type is None:
        raise UnsupportedModelError(
            f"{name}: {folder} is not a transformers save_pretrained folder of a MoE VLM family of mome"
            f" (config.json model_type one of {sorted(FAMILIES)})"
        )
    whole = _folder_model_type(folder) != "qwen3_omni_moe_thinker"  # the whole Qwen3-Omni, or its Thinker alone
    return _from_pretrained(_family(model_type, name), folder, name, dtype, whole)


#: families whose release is a larger model holding the registered one (Qwen3-Omni: the Thinker of the whole model)
_WHOLE_MODEL = {"qwen3_omni_moe": "Qwen3OmniMoeForConditionalGeneration"}

_MODALITY_WORDS = {IMAGE: "image", VIDEO: "video", AUDIO: "audio"}
#: processors whose placeholder token (the one the config's id names) is not ``<modality>_token``: Llama 4's
#: ``image_token`` (``<|image|>``) marks an image's global tile, its patches are ``img_patch_token`` (``<|patch|>``)
_PLACEHOLDER_ATTRIBUTES = {("llama4", IMAGE): "img_patch_token"}


def check_processor(processor: Any, config: Any, name: str) -> None:
    """Raise :class:`~mome.ProcessorMismatchError` (one line, naming ``name`` and every field that disagrees) when
    ``processor`` does not fit a model of ``config``: each of its placeholder tokens (``image_token``,
    ``video_token``, ``audio_token``) must be the id the config names (``image_token_id`` / ``image_token_index``
    ...), and its tokenizer's vocabulary must fit the language model's embedding (``text_config.vocab_size``)."""
    model_type = "qwen3_omni_moe" if config.model_type == "qwen3_omni_moe_thinker" else config.model_type
    family = _family(model_type, name)
    config = getattr(config, "thinker_config", config)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ProcessorMismatchError(f"{name}: {type(processor).__name__} has no tokenizer: not a VLM processor")
    problems = []
    for modality, field in family.token_ids:
        expected = getattr(config, field, None)
        attribute = _PLACEHOLDER_ATTRIBUTES.get((family.model_type, modality), f"{_MODALITY_WORDS[modality]}_token")
        token = getattr(processor, attribute, None)
        if expected is None or token is None:
            continue
        found, word = tokenizer.convert_tokens_to_ids(token), _MODALITY_WORDS[modality]
        if found != expected:
            problems.append(f"its {word} token {token!r} is id {found}, config.{field} is {expected}")
    vocab = config.get_text_config().vocab_size
    if len(tokenizer) > vocab:
        problems.append(f"its tokenizer has {len(tokenizer)} tokens, the model's embedding {vocab}")
    if problems:
        raise ProcessorMismatchError(f"{name}: the processor does not fit the model: {'; '.join(problems)}")


def load_processor(
    name: str,
    *,
    pretrained_cfg_overlay: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> Any:
    """The processor (tokenizer, image / video / audio processors, chat template) of the card ``name``
    (``arch`` or ``arch.tag``), from the card's repo at its revision (huggingface_hub's cache, offline-aware),
    checked against the repo's ``config.json`` by :func:`check_processor`.

    Raises:
        UnsupportedModelError: the installed transformers lacks the family.
        PretrainedUnavailableError: the card's repo or revision is not cached and cannot be fetched.
        ProcessorMismatchError: the processor's placeholder ids or vocabulary do not fit the model's config.
    """
    from transformers import AutoConfig, AutoProcessor

    from .._hub import transformers_source
    from .._registry import get_pretrained_cfg, split_model_name_tag

    cfg = get_pretrained_cfg(name).replace(**(pretrained_cfg_overlay or {}))
    arch = split_model_name_tag(name)[0]
    source = transformers_source(cfg, cache_dir, local_files_only)
    if arch not in RELEASED or source is None:
        raise UnsupportedModelError(f"{name}: not a released transformers MoE VLM card (those of {sorted(RELEASED)})")
    family = _family(RELEASED[arch][0], source.card)
    _transformers_class(family, family.model_class, source.card)
    folder = source(False)
    processor = AutoProcessor.from_pretrained(folder)
    check_processor(processor, AutoConfig.from_pretrained(folder), source.card)
    return processor


# -- processors and answers -----------------------------------------------------------------------------------

#: files a processor's ``save_pretrained`` writes (beside the tokenizer's): their presence marks a processor
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def folder_processor(model: nn.Module, name: str) -> Any:
    """The processor saved beside ``model``'s weights (the folder its ``from_pretrained`` read,
    ``config._name_or_path``: a Hub snapshot, a ``save_pretrained`` folder), checked against the model's config
    by :func:`check_processor`; None when that folder holds no processor (a tiny random model, a card built
    from its ``config.json`` alone).

    Raises:
        ProcessorMismatchError: the saved processor does not fit the model.
    """
    from pathlib import Path

    folder = str(getattr(model.config, "_name_or_path", "") or "")
    if not folder or not any((Path(folder) / file).is_file() for file in PROCESSOR_FILES):
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    check_processor(processor, model.config, name)
    return processor


def _chatml_template(image: str) -> str:
    """A Jinja chat template in the ChatML turn format of the Qwen models (``<|im_start|>{role}\n...<|im_end|>``),
    each image item of a turn written as ``image`` (the processor expands its placeholder per patch group)."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image + "{% elif item['type'] == "
        "'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


@dataclass(frozen=True)
class _TinyProcessor:
    """How :func:`tiny_processor` builds a family's processor: transformers' processor, image and video processor
    classes, the placeholder tokens at the tiny config's ids (:data:`_IDS`), how the chat template writes one image,
    the frames of an image's temporal patch, and the tokenizer attributes naming the tokens (ERNIE's processor
    reads them from the tokenizer)."""

    processor: str
    image_processor: str
    video_processor: str | None
    tokens: dict[str, int]
    image_item: str
    temporal_patch_size: int = 2
    tokenizer_tokens: dict[str, str] = dataclass_field(default_factory=dict)
    video_options: dict[str, Any] = dataclass_field(default_factory=dict)
    feature_extractor: str | None = None  # the audio features' (Qwen3-Omni: Whisper's log-mel)
    #: the image processor's options when they are not the patch / merge sizes (Llama 4: one 32 px tile)
    image_options: dict[str, Any] | None = None
    processor_options: dict[str, Any] = dataclass_field(default_factory=dict)


_ERNIE_TOKENS = {
    "image_token": "<|IMAGE_PLACEHOLDER|>",
    "video_token": "<|VIDEO_PLACEHOLDER|>",
    "image_start_token": "<|IMAGE_START|>",
    "image_end_token": "<|IMAGE_END|>",
    "video_start_token": "<|VIDEO_START|>",
    "video_end_token": "<|VIDEO_END|>",
}
_OMNI_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_token": "<|audio_pad|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
_TINY_PROCESSORS: dict[str, _TinyProcessor] = {
    "qwen3_vl_moe": _TinyProcessor(
        "Qwen3VLProcessor",
        "Qwen2VLImageProcessor",
        "Qwen3VLVideoProcessor",
        {"<|image_pad|>": 100, "<|video_pad|>": 101, "<|vision_start|>": 102, "<|vision_end|>": 103},
        "<|vision_start|><|image_pad|><|vision_end|>",
    ),
    "glm4v_moe": _TinyProcessor(
        "Glm4vProcessor",
        "Glm4vImageProcessor",
        "Glm4vVideoProcessor",
        {
            "<|image|>": 100,
            "<|video|>": 101,
            "<|begin_of_image|>": 102,
            "<|end_of_image|>": 103,
            "<|begin_of_video|>": 104,
            "<|end_of_video|>": 105,
        },
        "<|begin_of_image|><|image|><|end_of_image|>",
    ),
    "ernie4_5_vl_moe": _TinyProcessor(
        "Ernie4_5_VLMoeProcessor",
        "Ernie4_5_VLMoeImageProcessor",
        "Ernie4_5_VLMoeVideoProcessor",
        {token: 100 + i for i, token in enumerate(_ERNIE_TOKENS.values())},  # the tiny config's 100 ... 105
        "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>",
        temporal_patch_size=1,  # ERNIE's vision tower merges frames later; an image is one frame
        tokenizer_tokens=_ERNIE_TOKENS,
        video_options={"draw_on_frames": False},  # no timestamp font to ship
    ),
    "qwen3_omni_moe": _TinyProcessor(
        "Qwen3OmniMoeProcessor",
        "Qwen2VLImageProcessor",
        "Qwen2VLVideoProcessor",
        {token: 100 + i for i, token in enumerate(_OMNI_TOKENS.values())},  # the tiny config's 100 ... 106
        "<|vision_bos|><|image_pad|><|vision_eos|>",
        tokenizer_tokens=_OMNI_TOKENS,
        feature_extractor="WhisperFeatureExtractor",
    ),
    "llama4": _TinyProcessor(
        "Llama4Processor",
        "Llama4ImageProcessor",
        None,
        {  # the config's image_token_index is the patch placeholder; <|image|> marks the image's global tile
            "<|patch|>": 100,
            "<|image|>": 101,
            "<|image_start|>": 102,
            "<|image_end|>": 103,
            "<|tile_x_separator|>": 104,
            "<|tile_y_separator|>": 105,
        },
        "<|image|>",  # the processor expands it into start, patches and end
        image_options={"size": {"height": 32, "width": 32}, "max_patches": 1},
        processor_options={"patch_size": 8, "pixel_shuffle_ratio": 0.5},
    ),
}
_CHAT_TOKENS = {"<|im_start|>": 107, "<|im_end|>": 108, "<|endoftext|>": 109, "<unk>": 110}


def tiny_processor(model_type: str, words: list[str]) -> Any:
    """A processor for the tiny config of ``model_type`` (:func:`tiny_config`), built in code, no download: the
    family's processor class over a word-level tokenizer (``tokenizers``' ``WordLevel`` on a whitespace and
    punctuation split, in ``PreTrainedTokenizerFast``) whose vocabulary is ``words`` (e.g. the shapes VQA set's,
    ``mome.data.shapes.vocabulary()``) plus the chat roles, the family's placeholder tokens at the tiny
    config's ids and unused tokens up to the tiny vocabulary (128); a ChatML chat template; the image and video
    processors sized for 32 px images (a 4 x 4 grid of 8 px patches, 4 placeholders after the 2 x 2 merge).
    Families: ``qwen3_vl_moe``, ``glm4v_moe``, ``ernie4_5_vl_moe``, ``qwen3_omni_moe`` (with Whisper's audio
    features at the tiny audio tower's mel bins), ``llama4`` (one 32 px tile: 16 patches, 4 placeholders after
    the pixel shuffle).

    Raises:
        UnsupportedModelError: a family without a tiny processor.
    """
    if model_type not in _TINY_PROCESSORS:
        raise UnsupportedModelError(
            f"tiny_processor({model_type!r}): a tiny processor is built for {sorted(_TINY_PROCESSORS)} only"
        )
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    spec = _TINY_PROCESSORS[model_type]
    specials = {**spec.tokens, **_CHAT_TOKENS}
    plain = list(dict.fromkeys(["system", "user", "assistant", *words]))
    free = [i for i in range(_VOCAB) if i not in specials.values()]
    if len(plain) > len(free):
        raise InvalidArgumentError("words", f"at most {len(free)} distinct words", len(plain), "tiny_processor")
    vocab = {word: free[i] for i, word in enumerate(plain)}
    vocab |= {f"<unused{i}>": i for i in free[len(plain) :]} | specials  # every id of the embedding decodes
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(specials))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        **({"extra_special_tokens": spec.tokenizer_tokens} if spec.tokenizer_tokens else {}),
    )
    config = tiny_config(model_type)
    parts: dict[str, Any] = {"tokenizer": tokenizer, **spec.processor_options}
    if spec.image_options is not None:  # Llama 4: tiles of the tiny tower's image size
        parts["image_processor"] = getattr(transformers, spec.image_processor)(**spec.image_options)
    else:  # Qwen2-VL-style patches merged 2 x 2
        vision = config.vision_config
        sizes = dict(
            patch_size=vision.patch_size,
            temporal_patch_size=spec.temporal_patch_size,
            merge_size=vision.spatial_merge_size,
            # the pixels of a 32 px image; GLM's budget counts the temporal patch's frames of a still image too
            size={"shortest_edge": 32 * 32, "longest_edge": spec.temporal_patch_size * 32 * 32},
        )
        frames = getattr(vision, "temporal_patch_size", None) or vision.temporal_merge_size  # a video's patch
        parts["image_processor"] = getattr(transformers, spec.image_processor)(**sizes)
        video_class = getattr(transformers, spec.video_processor)
        parts["video_processor"] = video_class(**sizes | {"temporal_patch_size": frames}, **spec.video_options)
    if spec.feature_extractor is not None:
        mel_bins = config.audio_config.num_mel_bins
        parts["feature_extractor"] = getattr(transformers, spec.feature_extractor)(feature_size=mel_bins)
    return getattr(transformers, spec.processor)(**parts, chat_template=_chatml_template(spec.image_item))


def save_tiny(folder: Any, model_type: str, words: list[str], seed: int = 0) -> Any:
    """Write the tiny random model of ``model_type`` (weights from ``seed``) and its :func:`tiny_processor` over
    ``words`` into ``folder`` with transformers' ``save_pretrained``, laid out like a Hub snapshot:
    ``create_model("local-dir:FOLDER")`` loads it and ``mome-eval model=local-dir:FOLDER eval_task=vqa`` runs it.
    Returns the folder (a ``Path``)."""
    from pathlib import Path

    processor = tiny_processor(model_type, words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_tiny(model_type, False, {})
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def chat_prompt(processor: Any, content: list[dict[str, Any]]) -> str:
    """The text of one user turn through ``processor``'s chat template, with the generation prompt (the assistant's
    turn opened): ``content`` is the turn in transformers' chat format (``{"type": "image"}`` and
    ``{"type": "text", "text": ...}`` items, in order)."""
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def processor_inputs(
    model: nn.Module, processor: Any, texts: list[str], images: list[Any], padding_side: str = "left"
) -> dict[str, Any]:
    """The model inputs of ``texts`` (each with its image placeholders) and ``images`` (the PIL images of all texts'
    image items, in order) through ``processor``: token ids padded on ``padding_side`` with the attention mask zero on
    the pads, the processor's pixel values, placeholders and token types; tensors on the model's device, floating
    ones in its dtype (Llama 4's processor gives bfloat16 pixels)."""
    batch = processor(
        text=list(texts), images=list(images) or None, padding=True, padding_side=padding_side, return_tensors="pt"
    )
    weight = next(model.parameters())
    return {
        key: value.to(weight.device, weight.dtype if value.is_floating_point() else None)
        if isinstance(value, Tensor)
        else value
        for key, value in batch.items()
    }


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    processor: Any,
    contents: list[list[dict[str, Any]]],
    images: list[list[Any]],
    max_new_tokens: int,
) -> list[str]:
    """The greedy answers of ``model`` to a batch of user turns through its family's ``processor``, in one
    transformers ``generate`` call: each turn (``contents[i]``, transformers' chat format) through the processor's
    chat template with the generation prompt (:func:`chat_prompt`), its PIL images ``images[i]`` through its image
    handling, the prompts left-padded with the attention mask zero on the pads (:func:`processor_inputs`). At most
    ``max_new_tokens`` new tokens each (a row stops at the tokenizer's ``eos`` and is padded after it), decoded
    without special tokens.

    The answers equal those of one turn at a time (``tests/test_hf_moe_vlm_eval.py``): these models route each
    token alone (no capacity), so a pad changes no other token's experts; the pads are routed too, which a routing
    count of the batch would include."""
    if len(contents) != len(images):
        raise InvalidArgumentError("images", f"one list per turn ({len(contents)})", len(images), "generate_answers")
    if not contents:
        return []
    texts = [chat_prompt(processor, content) for content in contents]
    inputs = processor_inputs(model, processor, texts, [image for turn in images for image in turn], "left")
    tokenizer = processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]  # [B, <= max_new_tokens]
    return [answer.strip() for answer in processor.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_answer(
    model: nn.Module, processor: Any, content: list[dict[str, Any]], images: list[Any], max_new_tokens: int
) -> str:
    """The greedy answer of ``model`` to one user turn through its family's ``processor`` (:func:`generate_answers`
    of a batch of one: no padding): ``content`` is the turn in transformers' chat format and ``images`` the PIL
    images of its image items, in order."""
    return generate_answers(model, processor, [content], [list(images)], max_new_tokens)[0]


@torch.no_grad()
def answer_log_likelihoods(
    model: nn.Module, processor: Any, content: list[dict[str, Any]], images: list[Any], answers: list[str]
) -> Tensor:
    """``[A]``: the log-likelihood of each of ``answers`` as the assistant's reply to one user turn,
    ``log p(a | prompt) = sum_t log p(a_t | prompt, a_<t)`` over the answer's tokens, the prompt being the turn
    through the family's ``processor`` (:func:`chat_prompt`, with its images). The answers are scored in one
    forward (the prompt followed by each answer, right-padded, the attention mask zero on the pads); a generative
    VLM classifies an image by the class whose answer is the most likely.

    Raises:
        InvalidArgumentError: an answer with no token, or one whose tokens do not follow the prompt's (a tokenizer
            that merges the prompt's last token with the answer's first).
    """
    if not answers:
        raise InvalidArgumentError("answers", "at least one answer to score", answers, "answer_log_likelihoods")
    images = list(images)
    prompt = chat_prompt(processor, content)
    prompt_ids = processor_inputs(model, processor, [prompt], images)["input_ids"][0]  # [P]
    inputs = processor_inputs(model, processor, [prompt + answer for answer in answers], images * len(answers), "right")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]  # [A, L]
    num_prompt = prompt_ids.shape[0]
    lengths = mask.sum(1)  # [A]
    broken = [a for a, row in zip(answers, ids, strict=True) if not torch.equal(row[:num_prompt], prompt_ids)]
    empty = [a for a, length in zip(answers, lengths.tolist(), strict=True) if length <= num_prompt]
    if broken or empty:
        what = "answers whose tokens follow the prompt's" if broken else "answers of at least one token"
        raise InvalidArgumentError("answers", what, broken or empty, "answer_log_likelihoods")
    keep = ids.shape[1] - num_prompt + 1  # the logits predicting the answers' tokens: positions P - 1 ... L - 1
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(**inputs, logits_to_keep=keep).logits  # [A, keep, V]
    else:  # Qwen3-Omni's Thinker computes them all
        logits = model(**inputs).logits[:, -keep:]  # [A, L, V] -> [A, keep, V]
    log_probs = logits[:, :-1].float().log_softmax(-1)  # [A, L - P, V]: predicting tokens P ... L - 1
    targets = ids[:, num_prompt:]  # [A, L - P]
    token_log_probs = log_probs.gather(-1, targets[..., None]).squeeze(-1)  # [A, L - P]
    positions = torch.arange(num_prompt, ids.shape[1], device=ids.device)  # [L - P]
    return (token_log_probs * (positions[None, :] < lengths[:, None])).sum(1)  # the answers' tokens, not the pads


def _register_tiny(model_type: str) -> None:
    def entrypoint(pretrained: bool = False, **overrides: Any) -> nn.Module:
        return _build_tiny(model_type, pretrained, overrides)

    entrypoint.__name__ = entrypoint.__qualname__ = f"{model_type}_tiny"
    entrypoint.__doc__ = f"{model_type} with a tiny random config (:func:`tiny_config`); tests and demos."
    entrypoint.__module__ = __name__
    register_model(entrypoint)


def _register_released(arch: str) -> None:
    def entrypoint(pretrained: bool = False, dtype: str | None = None, source: Any = None) -> nn.Module:
        return _build_released(arch, pretrained, source, dtype)

    model_type, repo_id = RELEASED[arch]
    entrypoint.__name__ = entrypoint.__qualname__ = arch
    entrypoint.__doc__ = (
        f"{model_type} as released ({repo_id}): the card's repo config (and weights with pretrained=True), "
        "fetched by mome.create_model at the card's revision."
    )
    entrypoint.__module__ = __name__
    register_model(entrypoint)


for _model_type in FAMILIES:
    _register_tiny(_model_type)
for _arch in RELEASED:
    _register_released(_arch)
