"""Reading checkpoint files safely and loading them exactly (timm's ``_helpers``: ``load_checkpoint``).

Exactness: :func:`check_state_fits` compares keys, shapes and dtypes, and :func:`check_finite_state` the values
(no NaN or Inf), *before* anything is loaded, so a failed load leaves the model untouched and names every
mismatching key. Safety: torch files go through ``torch.load(weights_only=True)`` only (:func:`read_torch_file`),
so a pickle that would run code is refused (nothing in it runs); bytes that are no pickle at all are a
:class:`~mome.CorruptCheckpointError`, never called unsafe.
"""

from __future__ import annotations

import io
import json
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    NonFiniteWeightsError,
    UnsafeCheckpointError,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_finite_state",
    "check_state_fits",
    "checkpoint_keys",
    "describe_checkpoint",
    "file_kind",
    "load_checkpoint",
    "load_state_exactly",
    "read_config_json",
    "read_state_dict",
    "read_state_dict_folder",
    "read_torch_file",
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
                values = read_config_json(config)
            except CorruptCheckpointError as err:
                return f"a folder whose {CONFIG_NAME} cannot be read ({err})"
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
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        return f"{path.stat().st_size} bytes of a zip archive that cannot be read (truncated?)"
    return f"{path.stat().st_size} bytes of no known checkpoint format (starting {head!r})"


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The JSON object of a ``config.json`` (a saved folder's, a Hugging Face folder's).

    Raises:
        FileNotFoundError: no such file.
        CorruptCheckpointError: not UTF-8, not valid JSON (the message names the file and the line and column of
            the problem: a truncated file ends mid-value) or valid JSON that is not an object.
    """
    path = Path(path)
    try:
        values = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CorruptCheckpointError(f"{path}: not a UTF-8 JSON file ({err})") from err
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(
            f"{path}: not valid JSON (truncated?): {err.msg} (line {err.lineno}, column {err.colno})"
        ) from err
    if not isinstance(values, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, found a JSON {type(values).__name__}")
    return values


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


#: pickle opcodes that import a global (a class or function to call on load)
_GLOBAL_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "INST"})


def _pickle_imports_globals(path: Path) -> bool:
    """Whether ``path`` holds well-formed pickles (the ``data.pkl`` of a torch zip archive, or the consecutive
    pickles of torch's legacy format), each parsed to its STOP, one of which imports a global: a real pickle that
    ``weights_only=True`` refused for what it would build, not damaged bytes. Parses opcodes only; runs nothing."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                return bool(names) and _imports_globals(io.BytesIO(archive.read(names[0])), pickles=1)
        with open(path, "rb") as f:  # legacy torch files: magic number, protocol, system info, then the objects
            return _imports_globals(f, pickles=4)
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return False


def _imports_globals(stream: Any, pickles: int) -> bool:
    """Whether one of the first ``pickles`` pickles of ``stream`` imports a global; False at the first one that
    does not parse to its STOP (an unknown opcode, truncated bytes)."""
    for _ in range(pickles):
        try:
            names = {op.name for op, _, _ in pickletools.genops(stream)}
        except (ValueError, UnicodeDecodeError, TypeError):
            return False
        if names & _GLOBAL_OPCODES:
            return True
    return False


def _starts_like_torch(path: Path) -> bool:
    """Whether the file's first bytes are those of a torch file: a zip archive or a pickle (PROTO 2-5)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def read_torch_file(path: str | Path, *, mmap: bool = False, what: str = "torch checkpoint") -> Any:
    """The object of a torch file, read with ``torch.load(weights_only=True)`` only (``mmap=True``: a zip archive's
    tensors memory-mapped). ``what`` names the file's kind in messages (``"Lightning checkpoint"``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: a well-formed pickle that ``weights_only=True`` refuses because of the globals it
            would import or call; nothing in it runs.
        CheckpointFormatError: a file of another format (safetensors, msgpack, ``.npz``, a folder) or bytes of no
            known format (text, random bytes); the message says what the file looks like.
        CorruptCheckpointError: a torch file that cannot be read (a truncated archive, a damaged pickle).
    """
    path = Path(path)
    kind = file_kind(path)
    if kind not in ("torch", "unknown"):
        raise CheckpointFormatError(f"{path} is {describe_checkpoint(path)}, not a {what}")
    try:
        if mmap and zipfile.is_zipfile(path):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        with open(path, "rb") as f:  # from an open file: torch.load reads a path named *.safetensors as safetensors
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError, ... of refused or damaged files
        if isinstance(err, pickle.UnpicklingError) and _pickle_imports_globals(path):
            raise UnsafeCheckpointError(
                f"{path}: a pickle that holds more than tensors, refused unread (mome loads torch files with "
                f"weights_only=True only): {_torch_refusal(err)}"
            ) from err
        if not _starts_like_torch(path):
            raise CheckpointFormatError(f"{path}: not a {what}: it is {describe_checkpoint(path)}") from err
        raise CorruptCheckpointError(
            f"{path}: not a readable {what} (truncated or damaged): {_torch_refusal(err)}"
        ) from err


def read_state_dict(path: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch checkpoint (told apart by their bytes, not their names).

    A state dict wrapped in ``"state_dict"``, ``"module"`` or ``"model"`` is unwrapped and a ``module.``
    prefix (DDP, DeepSpeed) stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointFormatError: another format (a Flax msgpack or ``.npz`` file, a folder) or bytes of no known
            format (text, random bytes).
        CorruptCheckpointError: the file cannot be read (truncated) or holds no state dict.
        UnsafeCheckpointError: a pickle that ``torch.load(weights_only=True)`` refuses for the globals it would
            import; nothing in it runs (:func:`read_torch_file`).
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
    obj = read_torch_file(path, mmap=mmap)
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


def check_finite_state(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`~mome.NonFiniteWeightsError` if a floating tensor of ``state`` holds NaN or Inf; the message
    names ``source`` (the file), how many tensors do and the first five with their NaN and Inf counts. Tensors on
    the meta device (no values) are skipped."""
    bad = [
        key
        for key, tensor in state.items()
        if (tensor.is_floating_point() or tensor.is_complex())
        and tensor.device.type != "meta"
        and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        counts = []
        for key in bad[:5]:
            tensor = state[key]
            nan = int(torch.isnan(tensor).sum())
            counts.append(f"{key} ({nan} NaN, {int(torch.isinf(tensor).sum())} Inf of {tensor.numel()})")
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise NonFiniteWeightsError(
            f"{source}: {len(bad)} tensor(s) hold NaN or Inf: {', '.join(counts)}{more}; nothing was loaded "
            "(pass allow_non_finite=True to load them anyway)"
        )


def load_state_exactly(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, *, allow_non_finite: bool = False
) -> None:
    """Load ``state`` into ``model`` exactly, or raise leaving it unchanged: :class:`~mome.CheckpointMismatchError`
    (:func:`check_state_fits`), :class:`~mome.NonFiniteWeightsError` (:func:`check_finite_state`, skipped with
    ``allow_non_finite=True``)."""
    check_state_fits(model, state, source)
    if not allow_non_finite:
        check_finite_state(state, source)
    model.load_state_dict(state, strict=True)


def load_checkpoint(model: nn.Module, checkpoint_path: str | Path, *, allow_non_finite: bool = False) -> nn.Module:
    """Load a ``.safetensors`` or torch checkpoint file into ``model`` exactly (timm's ``load_checkpoint``,
    always strict); returns ``model``. Weights holding NaN or Inf are refused unless ``allow_non_finite=True``.

    Raises:
        FileNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: see :func:`read_state_dict`.
        CheckpointMismatchError: the keys, shapes or dtypes differ; ``model`` is left unchanged.
        NonFiniteWeightsError: a tensor holds NaN or Inf; ``model`` is left unchanged.
    """
    path = Path(checkpoint_path)
    load_state_exactly(model, read_state_dict(path), str(path), allow_non_finite=allow_non_finite)
    return model
