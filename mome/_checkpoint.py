"""Reading checkpoint files safely and loading them exactly (timm's ``_helpers``: ``load_checkpoint``).

Exactness: :func:`check_state_fits` compares keys, shapes and dtypes *before* anything is loaded, so a
failed load leaves the model untouched and names every mismatching key. Safety: torch files go through
``torch.load(weights_only=True)`` only, so a pickle that would run code is refused (nothing in it runs).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import CheckpointFormatError, CheckpointMismatchError, CorruptCheckpointError, UnsafeCheckpointError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_state_fits",
    "checkpoint_keys",
    "describe_checkpoint",
    "file_kind",
    "load_checkpoint",
    "load_state_exactly",
    "read_state_dict",
    "read_state_dict_folder",
    "shard_prefix",
    "starts_msgpack_map",
]

#: The two files of a saved folder (``save_pretrained``; timm's and open_clip's Hub layout).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: Keys that wrap a state dict in training files (Lightning/unilm, DeepSpeed, timm train scripts).
_WRAPPER_KEYS = ("state_dict", "module", "model")
#: msgpack string markers (fixstr 0xa0-0xbf, str8, str16, str32)
_MSGPACK_STRINGS = {*range(0xA0, 0xC0), 0xD9, 0xDA, 0xDB}


def starts_msgpack_map(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes, at least 6) starts a msgpack map whose first key is a string.

    A fixmap (``0x80``-``0x8f``) holds its size in its first byte; map16 (``0xde``) and map32 (``0xdf``)
    are followed by a 2- or 4-byte size, so the first key's marker is byte 1, 3 or 5.
    """
    if not head:
        return False
    if 0x80 <= head[0] <= 0x8F:
        first_key = 1
    elif head[0] in (0xDE, 0xDF):
        first_key = 3 if head[0] == 0xDE else 5
    else:
        return False
    return len(head) > first_key and head[first_key] in _MSGPACK_STRINGS


#: a data shard of a sharded checkpoint (vmoe, TensorFlow): ``<prefix>.data-00000-of-00002``
_SHARD_SUFFIX = re.compile(r"\.data-\d{5}-of-\d{5}$")


def shard_prefix(path: str | Path) -> Path | None:
    """The ``<prefix>`` of a sharded checkpoint (``<prefix>.index`` + ``<prefix>.data-*``) given its prefix,
    its index or one of its data shards; None for any other path. Reads nothing but the index's existence."""
    text = str(path)
    if text.endswith(".index"):
        return Path(text[: -len(".index")])
    if _SHARD_SUFFIX.search(text):
        return Path(_SHARD_SUFFIX.sub("", text))
    if Path(text + ".index").is_file():
        return Path(path)
    return None


def file_kind(path: str | Path) -> str:
    """What a checkpoint path holds, from its first bytes (not its name): ``"folder"``, ``"safetensors"``,
    ``"torch"`` (zip archive or legacy pickle), ``"msgpack"`` (Flax, vmoe), ``"npz"`` or ``"unknown"``.

    Raises ``FileNotFoundError`` if ``path`` does not exist.
    """
    path = Path(path)
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        return "npz" if names and all(n.endswith(".npy") for n in names) else "unknown"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch"  # a pickle (torch's legacy format): PROTO 2-5
    if starts_msgpack_map(head):
        return "msgpack"
    return "unknown"


_KIND_WORDS = {
    "safetensors": "a safetensors file",
    "torch": "a torch checkpoint",
    "msgpack": "a msgpack file (Flax serialisation, as vmoe writes)",
    "npz": "a numpy .npz archive",
}


def describe_checkpoint(path: str | Path) -> str:
    """One phrase on what ``path`` looks like, for error messages (kind, tensor count, a few keys)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "folder":
        config = path / CONFIG_NAME
        files = sorted(p.name for p in path.iterdir())[:6]
        if config.is_file():
            try:
                values = json.loads(config.read_text())
            except ValueError:
                values = {}
            fields = {k: values[k] for k in ("architecture", "model_type", "architectures") if k in values}
            return f"a folder with {CONFIG_NAME} ({fields or 'no architecture or model_type'}) and files {files}"
        return f"a folder with files {files}"
    if kind in ("safetensors", "torch"):
        try:
            keys = checkpoint_keys(path)
        except (CorruptCheckpointError, UnsafeCheckpointError) as err:
            return f"{_KIND_WORDS[kind]} that cannot be read ({type(err).__name__})"
        return f"{_KIND_WORDS[kind]} with {len(keys)} tensors, e.g. {', '.join(keys[:4])}"
    if kind in _KIND_WORDS:
        return _KIND_WORDS[kind]
    with open(path, "rb") as f:
        return f"{path.stat().st_size} bytes of no known checkpoint format (starting {f.read(8)!r})"


def checkpoint_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors or torch file (unwrapped, ``module.`` stripped), or of every
    weight file of a folder, reading as little as the format allows (safetensors: the header only)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        return [key for file in files for key in checkpoint_keys(file)]
    if file_kind(path) == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptCheckpointError(f"{path}: not a readable safetensors file (truncated?): {err}") from err
    return list(read_state_dict(path, mmap=True))


def _torch_refusal(err: Exception) -> str:
    """The part of torch's ``weights_only`` refusal that says what was refused, without its advice to retry
    unsafely (mome never does)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    said = [line for line in lines if line.startswith(("Unsupported", "Trying to", "Can only build"))]
    return (said or lines or [type(err).__name__])[0].removeprefix("WeightsUnpickler error: ")


def read_state_dict(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch checkpoint (told apart by their bytes, not their names).

    A state dict wrapped in ``"state_dict"``, ``"module"`` or ``"model"`` is unwrapped and a ``module.``
    prefix (DDP, DeepSpeed) stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointFormatError: another format (a Flax msgpack or ``.npz`` file, a folder).
        CorruptCheckpointError: the file cannot be read (truncated) or holds no state dict.
        UnsafeCheckpointError: a pickle that ``torch.load(weights_only=True)`` refuses; nothing in it runs.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    kind = file_kind(path)
    if kind not in ("safetensors", "torch", "unknown"):
        raise CheckpointFormatError(
            f"{path} is {describe_checkpoint(path)}, not a torch or safetensors file"
            + (" (pass checkpoint_format='vmoe' to read it as vmoe's format)" if kind in ("msgpack", "npz") else "")
        )
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise CorruptCheckpointError(f"{path}: not a readable safetensors file (truncated?): {err}") from err
    try:
        if mmap and zipfile.is_zipfile(path) and path.suffix != ".safetensors":
            obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:  # from an open file: torch.load reads a path named *.safetensors as safetensors
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: a pickle that holds more than tensors, refused unread (mome loads torch files with "
            f"weights_only=True only): {_torch_refusal(err)}"
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
