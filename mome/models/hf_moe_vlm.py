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
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import (
    CheckpointMismatchError,
    InvalidArgumentError,
    PretrainedUnavailableError,
    ProcessorMismatchError,
    UnsupportedModelError,
)
from .._registry import register_model
from ..layers.hf_routing import RouterTap, RoutingCapture

__all__ = [
    "FAMILIES",
    "HFMoEFamily",
    "check_processor",
    "enable_routing_capture",
    "example_inputs",
    "family_of",
    "load_processor",
    "router_taps",
    "routing_capture",
    "set_top_k",
    "tiny_config",
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


def _decoder(family: HFMoEFamily) -> Callable[[nn.Module, Any], tuple[Tensor, Tensor, Tensor, Tensor]]:
    def scores_of(logits: Tensor) -> Tensor:
        logits = logits.float()
        if family.score == "softmax":
            return logits.softmax(-1)
        scores = logits.sigmoid()
        return scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)

    if family.router_output == "scores_logits":

        def decode(module: nn.Module, output: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            scores, logits = output
            index = torch.topk(logits, module.top_k, dim=-1).indices  # the router's own choice (same call)
            return logits, scores_of(logits), index, scores.gather(-1, index)

        return decode

    def decode(module: nn.Module, output: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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


def _ernie_subset(masks: dict[str, Tensor | None], block: str, vision: bool) -> Callable[[], Tensor | None]:
    def subset() -> Tensor | None:
        mask = masks.get(block)
        if mask is None or not bool(mask.any()):
            return None if not vision else torch.zeros(0, dtype=torch.bool)  # all tokens go to the text experts
        mask = mask.reshape(-1).bool()
        return mask if vision else ~mask

    return subset


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

        def of(args: tuple, kwargs: dict) -> Tensor | None:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                return None
            return modality_ids(model, input_ids, kwargs.get("mm_token_type_ids"))

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
    whole_class = _transformers_class(family, _WHOLE_MODEL.get(model_type, family.model_class), card)
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
    if whole_class is model_class:
        return model_class.from_pretrained(folder, dtype=dtype or "auto").eval()
    # Qwen3-Omni: the repo is the whole model (thinker.* + talker.* + code2wav.*); only the Thinker is built
    whole = whole_class.from_pretrained(folder, dtype=dtype or "auto", enable_audio_output=False)
    return whole.thinker.eval()


#: families whose release is a larger model holding the registered one (Qwen3-Omni: the Thinker of the whole model)
_WHOLE_MODEL = {"qwen3_omni_moe": "Qwen3OmniMoeForConditionalGeneration"}

_MODALITY_WORDS = {IMAGE: "image", VIDEO: "video", AUDIO: "audio"}


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
        token = getattr(processor, f"{_MODALITY_WORDS[modality]}_token", None)
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
