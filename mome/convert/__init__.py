"""Upstream checkpoints into mome's models: readers, key-map converters, strict loading.

    state = read_checkpoint(path, source_format)           # upstream names, torch tensors
    mapped = CONVERTERS[converter](state, model)           # mome names; model read for its config only
    mapped = load_converted(path, source_format, converter, model)   # both, plus a strict key/shape check

:data:`READERS` and :data:`CONVERTERS` are the one table of formats and converters
(:mod:`mome._formats`), which the zoo's card schema reads too; their functions are imported on first use.

Formats (``source_format``):

- ``"unilm_vlmo"``: ``torch.save`` files of ``microsoft/unilm/vlmo`` (raw state dict, or wrapped in
  ``"state_dict"`` / ``"module"`` / ``"model"``; DeepSpeed's ``module.`` prefix is stripped);
- ``"timm"``, ``"open_clip"``, ``"safetensors"``, ``"mome"``: ``.safetensors``, or a torch file;
- ``"vmoe"``: ``google-research/vmoe``'s sharded msgpack checkpoints (``<prefix>.index`` +
  ``.data-nnnnn-of-NNNNN``), single Flax msgpack files and ``.npz`` (:mod:`mome.convert.vmoe`);
- ``"moe_llava"``: a Hugging Face ``save_pretrained`` folder of MoE-LLaVA (all its weight shards);
- ``"uni_moe"``: Uni-MoE's stage-3 LoRA folder beside its base, CLIP and Whisper folders, read as upstream's
  loader does, LoRA merged (:mod:`mome.convert.uni_moe`).

Torch files are read with ``torch.load(weights_only=True)`` only: a pickle that would run code or
build arbitrary objects is refused. Converters (``converter``): ``"unilm_vlmo"``, ``"vmoe"``,
``"timm_vit"``, ``"open_clip"``, ``"moe_llava"``, ``"uni_moe"``; each raises :class:`~mome.CheckpointMismatchError`
naming every upstream key without a counterpart (unless the caller passes ``ignore_prefixes``), every
needed key the checkpoint lacks and every shape that disagrees.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from .._checkpoint import check_finite_state, check_state_fits
from .._checkpoint import read_state_dict as read_torch_state_dict
from .._errors import CheckpointMismatchError, InvalidArgumentError, UnsupportedOptionError
from .._formats import CONVERTERS as CONVERTERS
from .._formats import FORMATS as READERS
from ._keymap import KeyMap as KeyMap
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
    "KeyMap",
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


def read_checkpoint(path: str | Path, source_format: str) -> dict[str, Tensor]:
    """The tensors of an upstream checkpoint, by upstream name (see the module docstring for formats)."""
    if source_format not in READERS:
        raise InvalidArgumentError("source_format", f"one of {sorted(READERS)}", source_format, "read_checkpoint")
    return READERS[source_format](path)


def load_converted(
    path: str | Path,
    source_format: str,
    converter: str | Converter | None,
    model: nn.Module,
    *,
    allow_non_finite: bool = False,
    **converter_kwargs: Any,
) -> dict[str, Tensor]:
    """Read ``path`` and convert it for ``model``: a state dict with exactly ``model.state_dict()``'s keys and shapes.

    ``converter``: a name in :data:`CONVERTERS`, a function, or None (the file already has mome's
    names). ``converter_kwargs`` (e.g. ``ignore_prefixes=("vqa_classifier.",)``) go to the
    converter. Raises :class:`~mome.CheckpointMismatchError` naming ``path`` and the keys, and
    :class:`~mome.NonFiniteWeightsError` naming ``path`` and the (converted) tensors holding NaN or Inf
    unless ``allow_non_finite=True``.
    """
    if isinstance(converter, str) and converter not in CONVERTERS:
        raise InvalidArgumentError(
            "converter", f"one of {sorted(CONVERTERS)}, a function or None", converter, "load_converted"
        )
    if converter is None and converter_kwargs:
        raise UnsupportedOptionError(
            ", ".join(sorted(converter_kwargs)),
            "load_converted(converter=None)",
            "converter arguments need a converter",
        )
    state = read_checkpoint(path, source_format)
    if converter is None:
        converted, source = state, str(path)
    else:
        convert = CONVERTERS[converter] if isinstance(converter, str) else converter
        try:
            converted = convert(state, model, **converter_kwargs)
        except CheckpointMismatchError as err:
            raise CheckpointMismatchError(f"{path}: {err}") from None
        name = converter if isinstance(converter, str) else getattr(converter, "__name__", repr(converter))
        source = f"{path} (converted with {name!r})"
    check_state_fits(model, converted, source)
    if not allow_non_finite:
        check_finite_state(converted, source)
    return converted
