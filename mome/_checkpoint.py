"""Reading checkpoint files safely and loading them exactly (timm's ``_helpers``: ``load_checkpoint``).

Exactness: :func:`check_state_fits` compares keys, shapes and dtypes *before* anything is loaded, so a
failed load leaves the model untouched and names every mismatching key. Safety: torch files go through
``torch.load(weights_only=True)`` only, so a pickle that would run code is refused (nothing in it runs).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import CheckpointMismatchError, CorruptCheckpointError, UnsafeCheckpointError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_state_fits",
    "load_checkpoint",
    "load_state_exactly",
    "read_state_dict",
    "read_state_dict_folder",
]

#: The two files of a saved folder (``save_pretrained``; timm's and open_clip's Hub layout).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Keys that wrap a state dict in training files (Lightning/unilm, DeepSpeed, timm train scripts).
_WRAPPER_KEYS = ("state_dict", "module", "model")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint.

    A state dict wrapped in ``"state_dict"``, ``"module"`` or ``"model"`` is unwrapped and a ``module.``
    prefix (DDP, DeepSpeed) stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: the file cannot be read (truncated, another format) or holds no state dict.
        UnsafeCheckpointError: a pickle that ``torch.load(weights_only=True)`` refuses; nothing in it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptCheckpointError(f"{path}: not a readable safetensors file (truncated?): {err}") from err
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused by torch.load(weights_only=True) (it is not a plain tensor checkpoint): {err}"
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for damaged archives
        raise CorruptCheckpointError(f"{path}: not a readable torch checkpoint (truncated?): {err}") from err
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CorruptCheckpointError(f"{path}: non-tensor entries {bad[:20]} in the state dict")
    return state


def read_state_dict_folder(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a Hugging Face ``save_pretrained`` folder (all ``*.safetensors`` shards, else all
    ``pytorch_model*.bin`` shards), or of a single file (:func:`read_state_dict`)."""
    path = Path(path)
    if not path.is_dir():
        return read_state_dict(path)
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise CorruptCheckpointError(f"{path}: no *.safetensors or pytorch_model*.bin weights in the folder")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        shard = read_state_dict(file)
        repeated = sorted(set(shard) & set(state))
        if repeated:
            raise CorruptCheckpointError(f"{file}: key(s) {repeated[:5]} also stored in another shard of {path}")
        state.update(shard)
    return state


def _fill_tied(model_state: Mapping[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Give tied parameters (stored once by ``safetensors.torch.save_model``) their shared tensor."""
    groups: dict[tuple, list[str]] = {}
    for key, tensor in model_state.items():
        if tensor.device.type != "meta" and tensor.numel():
            ident = (
                tensor.device,
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.stride(),
                tensor.dtype,
            )
            groups.setdefault(ident, []).append(key)
    for keys in groups.values():
        present = [k for k in keys if k in state]
        for key in keys:
            if present and key not in state:
                state[key] = state[present[0]]


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`~mome.CheckpointMismatchError` (naming ``source`` and the keys) unless ``state`` fits
    ``model`` exactly: the same keys, shapes, and no integer values for float parameters.

    Tied parameters stored once are filled in ``state``. Nothing is loaded. The message's first line
    stands alone (a command line prints only it): counts and a few keys of each kind.
    """
    model_state = model.state_dict()
    _fill_tied(model_state, state)
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in state and state[k].shape != v.shape
    ]
    shapes += [  # integer values cast into float parameters would load silently wrong
        f"{k}: checkpoint dtype {state[k].dtype} vs model {v.dtype}"
        for k, v in model_state.items()
        if k in state and v.is_floating_point() and not (state[k].is_floating_point() or state[k].is_complex())
    ]
    if missing or unexpected or shapes:
        groups = (("missing", missing), ("unexpected", unexpected), ("mis-shaped or mis-typed", shapes))
        summary = "; ".join(f"{len(keys)} {label} key(s), e.g. {', '.join(keys[:3])}" for label, keys in groups if keys)
        lines = [f"{source} does not match {type(model).__name__} exactly: {summary}"]
        for label, keys in groups:
            if keys:
                more = f" (+{len(keys) - 20} more)" if len(keys) > 20 else ""
                lines.append(f"  {len(keys)} {label} key(s): {', '.join(keys[:20])}{more}")
        raise CheckpointMismatchError("\n".join(lines))


def load_state_exactly(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` exactly, or raise :class:`~mome.CheckpointMismatchError` leaving it unchanged."""
    check_state_fits(model, state, source)
    model.load_state_dict(state, strict=True)


def load_checkpoint(model: nn.Module, checkpoint_path: str | Path) -> nn.Module:
    """Load a ``.safetensors`` or torch checkpoint file into ``model`` exactly (timm's ``load_checkpoint``,
    always strict); returns ``model``.

    Raises:
        FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: see :func:`read_state_dict`.
        CheckpointMismatchError: the keys, shapes or dtypes differ; ``model`` is left unchanged.
    """
    path = Path(checkpoint_path)
    load_state_exactly(model, read_state_dict(path), str(path))
    return model
