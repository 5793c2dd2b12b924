"""The one table of checkpoint formats and converters, read by the card schema, the loader and ``mome.convert``.

A *format* (a card's ``source_format``) says how a checkpoint is laid out on disk and which reader turns
it into ``{upstream key: tensor}``; a *converter* (a card's ``converter``) maps those upstream keys onto
a mome model's state dict. Both are named here by ``"module:function"``: the functions are imported
when first used, so the table (and the card schema built on it) imports no model family, and adding a
format or a converter is one line here plus its function.

Reader: ``fn(path) -> dict[str, Tensor]``. Converter: ``fn(upstream_state, model, **options) -> state
dict`` with exactly ``model.state_dict()``'s keys and shapes (it raises
:class:`~mome.CheckpointMismatchError` otherwise).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["CONVERTERS", "FORMATS", "FORMAT_DESCRIPTIONS", "LazyFunctionTable"]


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

#: source format -> (reader, what the files are)
_FORMATS: dict[str, tuple[str, str]] = {
    "mome": (_TORCH_FILE, "mome's model.safetensors (a save_pretrained folder's weights)"),
    "safetensors": (_TORCH_FILE, "a .safetensors file with the model's own key names"),
    "timm": (_TORCH_FILE, "a timm ViT checkpoint (.safetensors or torch file)"),
    "open_clip": (_TORCH_FILE, "an open_clip CLIP checkpoint (.safetensors or torch file)"),
    "unilm_vlmo": (_TORCH_FILE, "a microsoft/unilm VLMo torch.save file (state_dict/module/model wrapper)"),
    "vmoe": ("mome.convert.vmoe:read_vmoe_checkpoint", "google-research/vmoe Flax msgpack (sharded or one file)"),
    "moe_llava": ("mome._checkpoint:read_state_dict_folder", "a MoE-LLaVA Hugging Face save_pretrained folder"),
}

#: source format -> reader ``fn(path) -> {upstream key: tensor}``
FORMATS = LazyFunctionTable("source_format", {name: reader for name, (reader, _) in _FORMATS.items()})
#: source format -> one line on what its files are
FORMAT_DESCRIPTIONS = {name: text for name, (_, text) in _FORMATS.items()}

#: converter -> ``fn(upstream_state, model, **options) -> model state dict``
CONVERTERS = LazyFunctionTable(
    "converter",
    {
        "unilm_vlmo": "mome.convert.vlmo:convert_unilm_vlmo",
        "vmoe": "mome.convert.vmoe:convert_vmoe",
        "timm_vit": "mome.convert.dense:convert_timm_vit",
        "open_clip": "mome.convert.dense:convert_open_clip",
        "moe_llava": "mome.models.moe_llava:moe_llava_state_dict_from_hf",
    },
)
