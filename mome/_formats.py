"""The one table of checkpoint formats and converters, read by the card schema, the loader and ``mome.convert``.

A *format* (a card's ``source_format``) says how a checkpoint is laid out on disk and which reader turns
it into ``{upstream key: tensor}``; a *converter* (a card's ``converter``) maps those upstream keys onto
a mome model's state dict. Both are named here by ``"module:function"``: the functions are imported
when first used, so the table (and the card schema built on it) imports no model family, and adding a
format or a converter is one line here plus its function.

Reader: ``fn(path) -> dict[str, Tensor]``. Converter: ``fn(upstream_state, model, **options) -> state
dict`` with exactly ``model.state_dict()``'s keys and shapes (it raises
:class:`~mome.CheckpointMismatchError` otherwise).

Each format also names the converter that reads it by default (:data:`DEFAULT_CONVERTERS`) and the key
prefixes that give it away (:data:`KEY_SIGNATURES`), so :func:`detect_format` can tell a file's format
when the caller does not say it: ``create_model(arch, checkpoint_path=FILE)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ._checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    checkpoint_keys,
    describe_checkpoint,
    file_kind,
    read_config_json,
    shard_prefix,
)
from ._errors import CheckpointFormatError

__all__ = [
    "CONVERTERS",
    "DEFAULT_CONVERTERS",
    "FORMATS",
    "FORMAT_DESCRIPTIONS",
    "KEY_SIGNATURES",
    "LazyFunctionTable",
    "detect_format",
]


class LazyFunctionTable(Mapping[str, Callable[..., Any]]):
    """A read-only ``{name: function}`` mapping whose functions are imported on first access."""

    def __init__(self, kind: str, paths: Mapping[str, str]) -> None:
        self.kind, self.paths = kind, dict(paths)
        self._resolved: dict[str, Callable[..., Any]] = {}

    def __getitem__(self, name: str) -> Callable[..., Any]:
        if name not in self.paths:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self.paths)}")
        if name not in self._resolved:
            module, _, attr = self.paths[name].partition(":")
            self._resolved[name] = getattr(importlib.import_module(module), attr)
        return self._resolved[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"LazyFunctionTable({self.kind!r}, {self.paths!r})"


_TORCH_FILE = "mome._checkpoint:read_state_dict"
_FOLDER = "mome._checkpoint:read_state_dict_folder"

#: source format -> (reader, default converter, what the files are, key signatures)
_FORMATS: dict[str, tuple[str, str | None, str, tuple[tuple[str, ...], ...]]] = {
    "mome": (_FOLDER, None, "mome's model.safetensors (or its save_pretrained folder)", ()),
    "safetensors": (_TORCH_FILE, None, "a .safetensors file with the model's own key names", ()),
    "timm": (_TORCH_FILE, "timm_vit", "a timm ViT checkpoint (.safetensors or torch file)", (("patch_embed.proj.",),)),
    "open_clip": (
        _TORCH_FILE,
        "open_clip",
        "an open_clip CLIP checkpoint (.safetensors or torch file)",
        (("visual.", "token_embedding.weight"),),
    ),
    "unilm_vlmo": (
        _TORCH_FILE,
        "unilm_vlmo",
        "a microsoft/unilm VLMo torch.save file (state_dict/module/model wrapper)",
        (("transformer.blocks.", "text_embeddings."),),
    ),
    "vmoe": (
        "mome.convert.vmoe:read_vmoe_checkpoint",
        "vmoe",
        "google-research/vmoe Flax msgpack (sharded or one file)",
        (),  # told by the file's bytes (msgpack, npz), not by key names
    ),
    "moe_llava": (
        _FOLDER,
        "moe_llava",
        "a MoE-LLaVA Hugging Face save_pretrained folder",
        (("model.layers.", "lm_head."), ("transformer.h.", "lm_head.")),
    ),
    "uni_moe": (
        "mome.convert.uni_moe:read_uni_moe_checkpoint",
        "uni_moe",
        "Uni-MoE's stage-3 LoRA folder beside its base, CLIP and Whisper folders (upstream's checkpoint/ layout)",
        (),  # told by the folder's files (adapter_config.json + mm_audio_aligner.bin), not by key names
    ),
    "transformers": (
        _FOLDER,
        None,
        "a transformers save_pretrained repo, read by the model class's own from_pretrained (no converter)",
        (),  # a card format: the weights are loaded by transformers, never told from a file
    ),
}

#: source format -> reader ``fn(path) -> {upstream key: tensor}``
FORMATS = LazyFunctionTable("source_format", {name: entry[0] for name, entry in _FORMATS.items()})
#: source format -> the converter that reads it by default (None: the file has mome's key names)
DEFAULT_CONVERTERS: dict[str, str | None] = {name: entry[1] for name, entry in _FORMATS.items()}
#: source format -> one line on what its files are
FORMAT_DESCRIPTIONS = {name: entry[2] for name, entry in _FORMATS.items()}
#: source format -> alternatives, each a tuple of key prefixes that must all occur in the file
KEY_SIGNATURES = {name: entry[3] for name, entry in _FORMATS.items() if entry[3]}
#: dense upstream formats: a file with stacked experts (mome's own names) is not one of them
_NOT_DENSE = {"timm": ".experts.", "open_clip": ".experts."}

#: converter -> ``fn(upstream_state, model, **options) -> model state dict``
CONVERTERS = LazyFunctionTable(
    "converter",
    {
        "unilm_vlmo": "mome.convert.vlmo:convert_unilm_vlmo",
        "vmoe": "mome.convert.vmoe:convert_vmoe",
        "timm_vit": "mome.convert.dense:convert_timm_vit",
        "open_clip": "mome.convert.dense:convert_open_clip",
        "moe_llava": "mome.models.moe_llava:moe_llava_state_dict_from_hf",
        "uni_moe": "mome.convert.uni_moe:convert_uni_moe",
    },
)


def _signature_matches(keys: Iterable[str], alternatives: tuple[tuple[str, ...], ...]) -> bool:
    keys = list(keys)
    return any(all(any(k.startswith(prefix) for k in keys) for prefix in prefixes) for prefixes in alternatives)


def _signature_text(alternatives: tuple[tuple[str, ...], ...]) -> str:
    return " or ".join("+".join(f"{p}*" for p in prefixes) for prefixes in alternatives)


def detect_format(path: str | Path, model_keys: Iterable[str] | None = None) -> str:
    """The source format of the checkpoint at ``path``, told from its bytes and key names.

    A msgpack or ``.npz`` file, a sharded vmoe checkpoint (its ``<prefix>``, ``<prefix>.index`` or a
    ``<prefix>.data-*`` shard) or a folder holding a vmoe ``.index`` is ``"vmoe"``; a folder with a peft
    ``adapter_config.json`` and ``mm_audio_aligner.bin`` is ``"uni_moe"`` (the LoRA folder); a folder with
    mome's ``config.json`` + ``model.safetensors`` is ``"mome"``; a file whose keys are exactly
    ``model_keys`` (the target model's state-dict keys) is ``"mome"``; otherwise the one format of
    :data:`KEY_SIGNATURES` whose key prefixes all occur.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: a folder whose ``config.json`` is not a JSON object (names the line and column).
        CheckpointFormatError: no format or several fit; the message says what the file looks like and
            which formats were tried (pass ``checkpoint_format=`` to choose).
    """
    path = Path(path)
    if _is_vmoe_shard_set(path):
        return "vmoe"
    kind = file_kind(path)
    if kind in ("msgpack", "npz"):
        return "vmoe"
    if kind == "folder":
        config = path / CONFIG_NAME
        saved = read_config_json(config) if config.is_file() else {}
        if "architecture" in saved and (path / WEIGHTS_NAME).is_file():
            return "mome"
        if any(path.glob("*.index")):
            return "vmoe"
        if (path / "adapter_config.json").is_file() and (path / "mm_audio_aligner.bin").is_file():
            return "uni_moe"
    tried = []
    if kind in ("folder", "safetensors", "torch"):
        keys = checkpoint_keys(path)
        if model_keys is not None:
            expected = set(model_keys)
            if set(keys) == expected:
                return "mome"
            tried.append(
                f"mome (the model's own keys: {len(expected - set(keys))} missing, {len(set(keys) - expected)} extra)"
            )
        found = [
            name
            for name, alternatives in KEY_SIGNATURES.items()
            if _signature_matches(keys, alternatives)
            and not (name in _NOT_DENSE and any(_NOT_DENSE[name] in k for k in keys))
        ]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointFormatError(
                f"{path}: its keys fit several formats {found}; pass checkpoint_format= one of them "
                f"(it is {describe_checkpoint(path)})"
            )
        tried += [f"{name} (keys {_signature_text(alts)})" for name, alts in KEY_SIGNATURES.items()]
    tried.append("vmoe (a msgpack or .npz file, or a folder with a .index)")
    raise CheckpointFormatError(
        f"{path}: cannot tell its checkpoint format; it is {describe_checkpoint(path)}; tried {'; '.join(tried)}. "
        f"Pass checkpoint_format= one of {sorted(FORMATS)}"
    )


def _is_vmoe_shard_set(path: Path) -> bool:
    """Whether ``path`` is the prefix, index or a data shard of a sharded checkpoint with a msgpack index."""
    prefix = shard_prefix(path)
    index = Path(f"{prefix}.index") if prefix is not None else None
    return index is not None and index.is_file() and file_kind(index) == "msgpack"
