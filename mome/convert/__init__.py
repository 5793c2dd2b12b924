"""Upstream checkpoints into mome's models: readers, key-map converters, strict loading.

    state = read_checkpoint(path, source_format)           # upstream names, torch tensors
    mapped = CONVERTERS[converter](state, model)           # mome names; model read for its config only
    mapped = load_converted(path, source_format, converter, model)   # both, plus a strict key/shape check

Formats (``source_format``):

- ``"unilm_vlmo"``: ``torch.save`` files of ``microsoft/unilm/vlmo`` (raw state dict, or wrapped in
  ``"state_dict"`` / ``"module"`` / ``"model"``; DeepSpeed's ``module.`` prefix is stripped);
- ``"timm"``, ``"open_clip"``, ``"safetensors"``, ``"mome"``: ``.safetensors``, or a torch file;
- ``"vmoe"``: ``google-research/vmoe``'s sharded msgpack checkpoints (``<prefix>.index`` +
  ``.data-nnnnn-of-NNNNN``), single Flax msgpack files and ``.npz`` (:mod:`mome.convert.vmoe`).

Torch files are read with ``torch.load(weights_only=True)`` only: a pickle that would run code or
build arbitrary objects is refused. Converters (``converter``): ``"unilm_vlmo"``, ``"vmoe"``,
``"timm_vit"``, ``"open_clip"``; each raises :class:`~mome.CheckpointMismatchError` naming every
upstream key without a counterpart (unless the caller passes ``ignore_prefixes``), every needed key
the checkpoint lacks and every shape that disagrees.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._registry import CheckpointMismatchError
from ._keymap import KeyMap as KeyMap
from ._keymap import check_state_dict
from .dense import OPEN_CLIP_NO_COUNTERPART as OPEN_CLIP_NO_COUNTERPART
from .dense import convert_open_clip as convert_open_clip
from .dense import convert_timm_vit as convert_timm_vit
from .vlmo import convert_unilm_vlmo as convert_unilm_vlmo
from .vmoe import convert_vmoe as convert_vmoe
from .vmoe import read_vmoe_checkpoint as read_vmoe_checkpoint

__all__ = [
    "CONVERTERS",
    "READERS",
    "Converter",
    "convert_open_clip",
    "convert_timm_vit",
    "convert_unilm_vlmo",
    "convert_vmoe",
    "load_converted",
    "read_checkpoint",
    "read_torch_state_dict",
    "read_vmoe_checkpoint",
]

Converter = Callable[..., dict[str, Tensor]]

#: converter name -> ``fn(upstream_state, model, *, ignore_prefixes=(), ...) -> model state dict``
CONVERTERS: dict[str, Converter] = {
    "unilm_vlmo": convert_unilm_vlmo,
    "vmoe": convert_vmoe,
    "timm_vit": convert_timm_vit,
    "open_clip": convert_open_clip,
}

_WRAPPER_KEYS = ("state_dict", "module", "model")


def read_torch_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint, never executing pickled code.

    A torch file is loaded with ``weights_only=True``; a state dict wrapped in ``"state_dict"``,
    ``"module"`` or ``"model"`` (unilm/DeepSpeed/timm training files) is unwrapped and a
    ``module.`` prefix stripped.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path}: refused by torch.load(weights_only=True) (it is not a plain tensor checkpoint): {err}"
        ) from err
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries {bad[:20]} in the state dict")
    return state


#: source format -> reader
READERS: dict[str, Callable[[str | Path], dict[str, Tensor]]] = {
    "unilm_vlmo": read_torch_state_dict,
    "timm": read_torch_state_dict,
    "open_clip": read_torch_state_dict,
    "safetensors": read_torch_state_dict,
    "mome": read_torch_state_dict,
    "vmoe": read_vmoe_checkpoint,
}


def read_checkpoint(path: str | Path, source_format: str) -> dict[str, Tensor]:
    """The tensors of an upstream checkpoint, by upstream name (see the module docstring for formats)."""
    if source_format not in READERS:
        raise ValueError(f"unknown source_format {source_format!r}; known: {sorted(READERS)}")
    return READERS[source_format](path)


def load_converted(
    path: str | Path,
    source_format: str,
    converter: str | Converter | None,
    model: nn.Module,
    **converter_kwargs: Any,
) -> dict[str, Tensor]:
    """Read ``path`` and convert it for ``model``: a state dict with exactly ``model.state_dict()``'s keys and shapes.

    ``converter``: a name in :data:`CONVERTERS`, a function, or None (the file already has mome's
    names). ``converter_kwargs`` (e.g. ``ignore_prefixes=("vqa_classifier.",)``) go to the
    converter. Raises :class:`~mome.CheckpointMismatchError` naming ``path`` and the keys.
    """
    state = read_checkpoint(path, source_format)
    if converter is None:
        if converter_kwargs:
            raise ValueError(f"converter=None takes no converter arguments, got {sorted(converter_kwargs)}")
        check_state_dict(state, model.state_dict(), str(path))
        return state
    if isinstance(converter, str):
        if converter not in CONVERTERS:
            raise ValueError(f"unknown converter {converter!r}; known: {sorted(CONVERTERS)}")
        converter = CONVERTERS[converter]
    try:
        converted = converter(state, model, **converter_kwargs)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{path}: {err}") from None
    check_state_dict(converted, model.state_dict(), str(path))
    return converted
