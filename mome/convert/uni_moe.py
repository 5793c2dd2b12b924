"""Uni-MoE's released checkpoints (HITsz-TMG/UMOE-Scaling-Unified-Multimodal-LLMs, ``Uni_MoE/``) -> mome's UniMoE.

Upstream ships a model as four folders, side by side in its README's ``checkpoint/`` layout:

- the stage-3 **LoRA folder** (``Uni-MoE-speech-e2``): peft's ``adapter_config.json`` + ``adapter_model.bin`` (a LoRA
  on every LLM linear layer but the routers and ``lm_head``: attention and each expert's
  ``gate_proj``/``up_proj``/``down_proj``), ``non_lora_trainables.bin`` (the image projector),
  ``mm_audio_aligner.bin`` (the audio aligner: a Whisper decoder, its projector, the query tokens),
  ``mlp_gates.bin`` (the routers) and ``config.json``;
- the **base** (``Uni-MoE-speech-base``): the stage-2 LLaMA with its experts, a ``save_pretrained`` folder;
- the **towers** it names in ``config.json``: CLIP (``mm_vision_tower``, e.g. ``clip-vit-large-patch14-336``) and
  Whisper (``mm_audio_tower``, e.g. ``whisper-small``).

:func:`read_uni_moe_checkpoint` assembles them as upstream's loader does (``model/all_builder.py``,
``load_all_pretrained_model``, the ``unimoe`` + ``lora`` branch) and returns the state dict of the model it builds:

1. the base's tensors (``LlavaLlamaForCausalLM.from_pretrained(base)``); its tower entries are not used (upstream
   builds the towers without weights and loads them from their own folders in step 6);
2. ``non_lora_trainables.bin`` over them (``base_model.`` / ``model.`` prefixes stripped as upstream strips them);
3. the LoRA merged: ``W <- W + (alpha / r) B A`` for every adapted linear layer (peft's ``merge_and_unload``),
   computed in float32;
4. ``mm_audio_aligner.bin`` over them, then 5. ``mlp_gates.bin``;
6. the towers: CLIP's ``vision_model.*`` (``CLIPVisionModel.from_pretrained``) and Whisper's encoder
   (``WhisperModel.from_pretrained(...).encoder``); Whisper's decoder is the aligner's start, which the two files
   above replace.

Keys of the result are upstream's names (``model.layers.*``, ``model.mm_projector.*``, ``model.mm_audio_aligner.*``,
``model.query_tokens``, ``model.vision_tower.vision_tower.vision_model.*``, ``model.audio_tower.audio_tower.*``,
``lm_head.weight``); :func:`convert_uni_moe` maps them onto :class:`~mome.models.uni_moe.UniMoE`. The pickled
``.bin`` files are read without executing code (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._checkpoint import read_config_json, read_state_dict, read_state_dict_folder
from .._errors import CheckpointFormatError, UnsupportedOptionError
from ._keymap import KeyMap

__all__ = ["convert_uni_moe", "read_uni_moe_checkpoint"]

ADAPTER_CONFIG = "adapter_config.json"
LORA_FILES = ("adapter_model.bin", "adapter_model.safetensors")
#: the stage-3 files upstream's loader reads after the base, in its order (the first is optional)
OVERLAYS = ("non_lora_trainables.bin", "mm_audio_aligner.bin", "mlp_gates.bin")
VISION_PREFIX = "model.vision_tower.vision_tower."
AUDIO_PREFIX = "model.audio_tower.audio_tower."
ALIGNER_DECODER = "model.mm_audio_aligner.decoder.audio_decoder."


def _config(folder: Path) -> dict[str, Any]:
    return read_config_json(folder / "config.json") if (folder / "config.json").is_file() else {}


def _is_base(folder: Path) -> bool:
    config = _config(folder)
    return "moe" in config and not (folder / ADAPTER_CONFIG).is_file()


def _is_tower(folder: Path, model_types: tuple[str, ...]) -> bool:
    return _config(folder).get("model_type") in model_types


def _lora_folder(path: Path) -> Path:
    """``path`` itself when it holds ``adapter_config.json``, else its one subfolder that does."""
    if not path.is_dir():
        raise CheckpointFormatError(
            f"{path}: a Uni-MoE checkpoint is a folder (the LoRA folder, e.g. Uni-MoE-speech-e2)"
        )
    if (path / ADAPTER_CONFIG).is_file():
        return path
    found = sorted(p for p in path.iterdir() if (p / ADAPTER_CONFIG).is_file())
    if len(found) != 1:
        listed = [p.name for p in found] or "none"
        raise CheckpointFormatError(
            f"{path}: expected a Uni-MoE LoRA folder (with {ADAPTER_CONFIG}) or a folder holding exactly one; "
            f"found {listed}. Pass the LoRA folder itself (e.g. checkpoint/Uni-MoE-speech-e2)"
        )
    return found[0]


def _companion(lora: Path, recorded: Any, field: str, kind: str, fits: Any) -> Path:
    """The folder a LoRA folder's config names in ``field``: the recorded path if it exists, else the sibling of
    that name, else the one sibling that ``fits`` (upstream's README puts them side by side)."""
    candidates = []
    if isinstance(recorded, str) and recorded:
        candidates = [Path(recorded), lora.parent / Path(recorded).name]
    for candidate in candidates:
        if candidate.is_dir() and fits(candidate):
            return candidate
    siblings = sorted(p for p in lora.parent.iterdir() if p.is_dir() and p != lora and fits(p))
    if len(siblings) == 1:
        return siblings[0]
    found = f"several fit: {[p.name for p in siblings]}" if siblings else "none fits"
    raise CheckpointFormatError(
        f"{lora}: its {field} records {recorded!r}, and no such {kind} folder is beside it in {lora.parent} "
        f"({found}). Put the {kind} folder next to the LoRA folder under that name (upstream's checkpoint layout)"
    )


def _strip_wrappers(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Upstream's key clean-up of the stage-3 files: ``base_model.`` dropped, then ``model.`` if keys start
    ``model.model.``."""
    state = {(k[len("base_model.") :] if k.startswith("base_model.") else k): v for k, v in state.items()}
    if any(k.startswith("model.model.") for k in state):
        state = {(k[len("model.") :] if k.startswith("model.") else k): v for k, v in state.items()}
    return state


def _merge_lora(state: dict[str, Tensor], lora: Path) -> None:
    """peft's ``merge_and_unload`` of the adapter in ``lora`` into ``state``: ``W += (alpha / r) B A``."""
    config = json.loads((lora / ADAPTER_CONFIG).read_text())
    what = f"{lora / ADAPTER_CONFIG}"
    checks = {
        "peft_type": (config.get("peft_type", "LORA"), "LORA"),
        "bias": (config.get("bias", "none"), "none"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out", False)), False),
        "modules_to_save": (config.get("modules_to_save") or None, None),
        "rank_pattern": (config.get("rank_pattern") or None, None),
        "alpha_pattern": (config.get("alpha_pattern") or None, None),
        "use_rslora": (bool(config.get("use_rslora", False)), False),
        "use_dora": (bool(config.get("use_dora", False)), False),
    }
    for field, (value, supported) in checks.items():
        if value != supported:
            raise UnsupportedOptionError(field, what, f"Uni-MoE's adapters use {field}={supported!r}", value)
    scaling = float(config["lora_alpha"]) / float(config["r"])
    files = [lora / name for name in LORA_FILES if (lora / name).is_file()]
    if not files:
        raise CheckpointFormatError(f"{lora}: no LoRA weights ({' or '.join(LORA_FILES)})")
    adapter = read_state_dict(files[0])
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, value in adapter.items():
        module, sep, part = key.rpartition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise CheckpointFormatError(f"{files[0]}: {key!r} is not a LoRA A/B weight (bias='none' adapters only)")
        pairs.setdefault(module.removeprefix("base_model.model."), {})[part[0]] = value
    for module, pair in pairs.items():
        weight_key = module + ".weight"
        if set(pair) != {"A", "B"}:
            raise CheckpointFormatError(f"{files[0]}: {module} has lora_{''.join(pair)} only (A and B expected)")
        if weight_key not in state:
            raise CheckpointFormatError(f"{files[0]}: the LoRA of {module} adapts {weight_key}, which the base lacks")
        weight = state[weight_key]
        delta = pair["B"].float() @ pair["A"].float() * scaling  # [out, r] @ [r, in] -> [out, in]
        if delta.shape != weight.shape:
            raise CheckpointFormatError(
                f"{files[0]}: the LoRA of {module} is {tuple(delta.shape)}, its weight {tuple(weight.shape)}"
            )
        state[weight_key] = (weight.float() + delta).to(weight.dtype)


def read_uni_moe_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict of the model upstream's loader builds from a LoRA folder and the folders it names (module
    doc). ``path``: the LoRA folder, or a folder holding exactly one (upstream's ``checkpoint/``).

    Raises :class:`~mome.CheckpointFormatError` naming the folder or file for a missing companion folder, a missing
    stage-3 file, or an adapter that does not fit the base; :class:`~mome.UnsupportedOptionError` for adapter
    options upstream never uses (a LoRA bias, ``fan_in_fan_out``, ...).
    """
    lora = _lora_folder(Path(path))
    config = _config(lora)
    adapter_config = json.loads((lora / ADAPTER_CONFIG).read_text())
    base = _companion(
        lora,
        adapter_config.get("base_model_name_or_path") or config.get("_name_or_path"),
        "base_model_name_or_path (adapter_config.json)",
        "base",
        _is_base,
    )
    vision = _companion(
        lora,
        config.get("mm_vision_tower"),
        "mm_vision_tower (config.json)",
        "CLIP",
        lambda p: _is_tower(p, ("clip", "clip_vision_model")),
    )
    audio = _companion(
        lora,
        config.get("mm_audio_tower"),
        "mm_audio_tower (config.json)",
        "Whisper",
        lambda p: _is_tower(p, ("whisper",)),
    )

    whisper = {k.removeprefix("model."): v for k, v in read_state_dict_folder(audio).items()}
    state = {ALIGNER_DECODER + k.removeprefix("decoder."): v for k, v in whisper.items() if k.startswith("decoder.")}
    towers = ("model.vision_tower.", "model.audio_tower.")
    state.update({k: v for k, v in read_state_dict_folder(base).items() if not k.startswith(towers)})
    non_lora, *after_merge = OVERLAYS
    if (lora / non_lora).is_file():
        state.update(_strip_wrappers(read_state_dict(lora / non_lora)))
    _merge_lora(state, lora)  # upstream merges after non_lora_trainables, before the aligner and the gates
    for name in after_merge:
        if not (lora / name).is_file():
            raise CheckpointFormatError(f"{lora}: {name} is missing (upstream's stage-3 save writes it)")
        state.update(_strip_wrappers(read_state_dict(lora / name)))
    state.update(
        {VISION_PREFIX + k: v for k, v in read_state_dict_folder(vision).items() if k.startswith("vision_model.")}
    )
    state.update({AUDIO_PREFIX + k.removeprefix("encoder."): v for k, v in whisper.items() if k.startswith("encoder.")})
    return state


def _padded_rows(rows: int):
    """``[V_up, D] -> [rows, D]``: zero rows appended for mome's placeholder ids beyond upstream's vocabulary
    (upstream marks images and clips with negative ids, never looked up)."""

    def pad(value: Tensor) -> Tensor:
        if value.shape[0] >= rows:
            return value
        return torch.cat([value, value.new_zeros(rows - value.shape[0], *value.shape[1:])])

    return pad


def convert_uni_moe(
    state: Mapping[str, Tensor], model: nn.Module, *, ignore_prefixes: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """Map :func:`read_uni_moe_checkpoint`'s upstream names onto ``model`` (a
    :class:`~mome.models.uni_moe.UniMoE` with ``audio_connector="whisper_decoder"``), strictly
    (:class:`~mome.CheckpointMismatchError` lists every unused, absent, missing or mis-shaped key).

    - ``model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight`` -> ``w_in`` ``[E, 2F, D]`` (gate rows, then up)
      and ``w_out`` ``[E, D, F]``; ``mlp.gate.weight`` -> the router;
    - ``model.mm_projector.{0,2}`` -> ``model.multi_modal_projector.linear_{1,2}``;
    - ``model.mm_audio_aligner.decoder.audio_decoder.*`` -> ``model.audio_aligner.*`` (its token embedding is not
      kept: the aligner reads the query tokens, never ids), ``...projector.*`` -> ``model.audio_projector.*``,
      ``model.query_tokens`` -> ``model.audio_query_tokens``;
    - the towers -> ``model.vision_tower.*`` / ``model.audio_tower.*``;
    - ``embed_tokens`` / ``lm_head`` get zero rows for mome's ``<image>`` / ``<audio>`` / ``<video>`` ids past
      upstream's vocabulary (``generate`` suppresses them).
    """
    target = model.state_dict()
    keys = KeyMap(state, target, "the Uni-MoE checkpoint", ignore_prefixes)
    vocab = target["lm_head.weight"].shape[0]
    llm = "model.language_model."
    keys.copy(llm + "embed_tokens.weight", "model.embed_tokens.weight", _padded_rows(vocab))
    keys.copy("lm_head.weight", "lm_head.weight", _padded_rows(vocab))
    keys.copy(llm + "norm.weight", "model.norm.weight")
    for key in keys.keys("model.layers."):
        if key.endswith("rotary_emb.inv_freq"):
            keys.consume(key)  # a buffer recomputed from the config
    num_experts = getattr(model.config, "num_experts", 0)
    for index in range(model.config.text_config.num_hidden_layers):
        up, ours = f"model.layers.{index}.", f"{llm}layers.{index}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
            keys.copy(f"{ours}{name}.weight", f"{up}{name}.weight")
        for name in ("input_layernorm", "post_attention_layernorm"):
            keys.copy(f"{ours}{name}.weight", f"{up}{name}.weight")
        keys.copy(f"{ours}mlp.router.proj.weight", f"{up}mlp.gate.weight")
        experts = [f"{up}mlp.experts.{e}." for e in range(num_experts)]
        keys.merge(
            f"{ours}mlp.experts.w_in",
            [p + proj for p in experts for proj in ("gate_proj.weight", "up_proj.weight")],
            lambda values: torch.stack([torch.cat(values[i : i + 2]) for i in range(0, len(values), 2)]),
        )
        keys.merge(f"{ours}mlp.experts.w_out", [p + "down_proj.weight" for p in experts])
    for index, linear in (("0", "linear_1"), ("2", "linear_2")):
        for param in ("weight", "bias"):
            keys.copy(f"model.multi_modal_projector.{linear}.{param}", f"model.mm_projector.{index}.{param}")
    keys.copy("model.audio_query_tokens", "model.query_tokens")
    keys.consume(ALIGNER_DECODER + "embed_tokens.weight")
    targets = (
        ("model.audio_aligner.", ALIGNER_DECODER),
        ("model.audio_projector.", "model.mm_audio_aligner.projector."),
        ("model.audio_tower.", AUDIO_PREFIX),
    )
    vision_has_prefix = any(k.startswith("model.vision_tower.vision_model.") for k in target)
    vision_source = VISION_PREFIX if vision_has_prefix else VISION_PREFIX + "vision_model."
    for key in target:
        for ours, up in (*targets, ("model.vision_tower.", vision_source)):
            if key.startswith(ours):
                keys.copy(key, up + key.removeprefix(ours))
    return keys.finish()
