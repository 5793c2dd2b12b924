"""Memory-aware loading: ``create_model(..., low_cpu_mem_usage=True, device_map=...)`` (transformers' spelling).

The normal load builds the model with random weights, reads the whole checkpoint, and copies it in, so its peak
memory holds the weights twice. The memory-aware load holds them once:

1. The model is built with its parameters on the meta device (as accelerate's ``init_empty_weights`` with
   ``include_buffers=False``, keeping tied parameters tied: :func:`build_empty`): no memory and no random init.
   Buffers are built as usual, so non-persistent ones (relative position indices, routing tables, rotary
   frequencies) get the values their constructor computes.
2. The checkpoint's keys, shapes and dtypes are checked against the empty model before any tensor is read
   (:func:`mome._checkpoint.check_state_fits`, the same readable diff as the normal load).
3. The tensors are read one at a time (safetensors' ``safe_open``) onto the device the device map names and set
   in place as the model's parameters, each checked for NaN and Inf. A tensor is never copied into a second buffer
   (unless its dtype differs from the model's, when it is cast as ``load_state_dict`` would). Tied parameters are
   read once and stay one parameter. On the CPU, the tensors ``safe_open`` returns (safetensors 0.8) are views of a
   private, copy-on-write memory map of the file: the weights are the file's pages, a write to a parameter copies
   only its pages, and the file may be deleted or replaced (``save_pretrained`` renames a new folder into place)
   while the model lives; it must not be truncated in place.

Any error (a key diff, NaN or Inf, a device map that does not fit) raises before the model is returned, so no
half-loaded model is handed out. accelerate (which comes with peft, a mome dependency) places ``device_map="auto"``
and reads ``max_memory`` sizes; it is imported only then.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checkpoint import check_finite_state, check_state_fits
from ._errors import CorruptCheckpointError, DeviceMapError, UnsupportedModelError

__all__ = ["DevicePlacement", "build_empty", "load_into_empty", "resolve_device_map", "safetensors_files"]

_MIB = 2**20


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers are left alone.

    accelerate's ``init_empty_weights(include_buffers=False)`` does the same, but wraps each registered parameter in
    a new ``Parameter``, so a weight tied by assigning one parameter to two modules (an LM head sharing the token
    embedding) becomes two; here a parameter already on the meta device is registered as it is, and ties stay.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            moved = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
            param = moved
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_empty(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with every parameter on the meta device (no memory, no random init) and the buffers built as
    usual."""
    with _parameters_on_meta():
        return build()


def _check_plain_loading(model: nn.Module) -> None:
    """Refuse a model whose modules change what ``load_state_dict`` does (hooks, ``_load_from_state_dict``): setting
    its tensors one by one would skip them."""
    if model._load_state_dict_pre_hooks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has load_state_dict pre-hooks (a quantized model?); memory-aware loading "
            "sets tensors one by one and would skip them: load it without low_cpu_mem_usage/device_map"
        )
    for name, module in model.named_modules():
        custom = type(module)._load_from_state_dict is not nn.Module._load_from_state_dict
        if custom or module._load_state_dict_pre_hooks:
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) customises load_state_dict; memory-aware loading sets "
                "tensors one by one and would skip it: load the model without low_cpu_mem_usage/device_map"
            )


# --------------------------------------------------------------------------- device maps


def _device(value: Any, where: str) -> torch.device:
    """A device of a device map or ``max_memory`` (``"cpu"``, ``"cuda:0"``, an int: a CUDA index), checked to exist."""
    if isinstance(value, str) and value == "disk":
        raise DeviceMapError(f"{where}: 'disk' is not supported (mome does not offload weights to disk)")
    try:
        device = torch.device("cuda", value) if isinstance(value, int) and not isinstance(value, bool) else None
        device = device or torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceMapError(f"{where}: {value!r} is not a device (e.g. 'cpu', 'cuda:0')") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "meta":
        raise DeviceMapError(f"{where}: 'meta' holds no weights; name a device such as 'cpu'")
    backend = getattr(torch, device.type, None)
    count = backend.device_count() if backend is not None and hasattr(backend, "device_count") else 0
    available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
    if not available or (device.index or 0) >= count:
        raise DeviceMapError(f"{where}: device {str(device)!r} is not available here ({count} {device.type} device(s))")
    return device if device.index is not None else torch.device(device.type, 0)


def _budgets(max_memory: Mapping[Any, Any] | None) -> dict[torch.device, int]:
    """``max_memory`` (device -> bytes, or a size such as ``"10GiB"``) with checked devices and sizes."""
    if max_memory is None:
        return {}
    if not isinstance(max_memory, Mapping):
        raise DeviceMapError(f"max_memory must be a dict of device -> size, got {max_memory!r}")
    from accelerate.utils import convert_file_size_to_int

    budgets = {}
    for key, size in max_memory.items():
        device = _device(key, f"max_memory[{key!r}]")
        try:
            budgets[device] = convert_file_size_to_int(size)
        except (ValueError, TypeError):
            raise DeviceMapError(f"max_memory[{key!r}]: {size!r} is not a size (bytes, or e.g. '10GiB')") from None
    return budgets


class DevicePlacement:
    """Which device each tensor of a model goes to: ``prefixes`` (a module or tensor name, ``""`` the whole model)
    -> device, the longest matching prefix deciding."""

    def __init__(self, prefixes: Mapping[str, torch.device]) -> None:
        self.prefixes = dict(prefixes)

    def __call__(self, key: str) -> torch.device:
        parts = key.split(".")
        for cut in range(len(parts), -1, -1):
            device = self.prefixes.get(".".join(parts[:cut]))
            if device is not None:
                return device
        raise KeyError(key)  # resolve_device_map checked that every tensor is covered

    def devices(self) -> set[torch.device]:
        return set(self.prefixes.values())


def _tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` with its first name, in the model's order."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def _layer_of(key: str) -> str:
    return key.rpartition(".")[0] or key


def resolve_device_map(
    model: nn.Module, device_map: Any, max_memory: Mapping[Any, Any] | None = None
) -> DevicePlacement:
    """Check ``device_map`` against the (empty) ``model`` and ``max_memory``; returns where each tensor goes.

    ``device_map``: None or ``"cpu"`` (the CPU), a device (``"cuda:0"``, ``torch.device``, an int: a CUDA index),
    ``"auto"`` (accelerate's ``infer_auto_device_map`` over the GPUs, then the CPU, within ``max_memory``), or a
    dict of module name (``""``: the whole model) -> device. The whole model must land on one device: mome does not
    split a model across devices (no offloading hooks).

    Raises:
        DeviceMapError: a device that is not one or is not available here, a dict key that is no layer of the model,
            a layer the dict does not place, a model that would span several devices, or weights that do not fit
            ``max_memory`` (names the first layer that does not fit and the device).
    """
    budgets = _budgets(max_memory)
    if isinstance(device_map, str) and device_map == "auto":
        prefixes = _auto_map(model, budgets)
    elif isinstance(device_map, Mapping):
        prefixes = _dict_map(model, device_map)
    else:
        prefixes = {"": _device("cpu" if device_map is None else device_map, "device_map")}
    placement = DevicePlacement(prefixes)
    if len(placement.devices()) > 1:
        names = ", ".join(f"{k or '(model)'!r}: {str(v)!r}" for k, v in list(prefixes.items())[:4])
        raise DeviceMapError(
            f"device_map places the model on several devices ({names}, ...); mome loads a model onto one device "
            "(load it onto one and split it with accelerate.dispatch_model)"
        )
    _check_budgets(model, placement, budgets)
    return placement


def _dict_map(model: nn.Module, device_map: Mapping[Any, Any]) -> dict[str, torch.device]:
    names = {name for name, _ in model.named_modules()} | {key for key, _ in _tensors(model)}
    prefixes = {}
    for key, value in device_map.items():
        if not isinstance(key, str) or key not in names:
            raise DeviceMapError(f"device_map: {key!r} is not a layer of {type(model).__name__} (e.g. 'blocks.0')")
        prefixes[key] = _device(value, f"device_map[{key!r}]")
    placement = DevicePlacement(prefixes)
    missing = []
    for key, _ in _tensors(model):
        try:
            placement(key)
        except KeyError:
            missing.append(_layer_of(key))
    if missing:
        missing = list(dict.fromkeys(missing))
        raise DeviceMapError(
            f"device_map places no device for {len(missing)} layer(s), e.g. {', '.join(missing[:4])} "
            "(add them, or '' for the whole model)"
        )
    return prefixes


def _auto_map(model: nn.Module, budgets: dict[torch.device, int]) -> dict[str, torch.device]:
    """accelerate's ``infer_auto_device_map``; what it would put on disk is an error naming the first such layer."""
    from accelerate.utils import get_max_memory, infer_auto_device_map

    max_memory = {(d.index if d.type == "cuda" else d.type): size for d, size in budgets.items()} or None
    if max_memory is None:  # every device accelerate sees (GPUs, then the CPU's free memory)
        max_memory = get_max_memory()
    no_split = getattr(model, "_no_split_modules", None) or sorted(
        {type(block).__name__ for module in model.modules() if isinstance(module, nn.ModuleList) for block in module}
    )
    auto = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())} | {
        key: i for i, (key, _) in enumerate(_tensors(model))
    }
    on_disk = sorted((name for name, device in auto.items() if device == "disk"), key=lambda n: order.get(n, 0))
    if on_disk:
        sizes = _sizes(model)
        need = sum(sizes.values())
        held = ", ".join(f"{k}: {v / _MIB:.1f} MiB" for k, v in max_memory.items())
        raise DeviceMapError(
            f"device_map='auto': layer {on_disk[0]!r} does not fit: the weights need {need / _MIB:.1f} MiB, "
            f"max_memory holds {held} (mome does not offload to disk)"
        )
    return {name: _device(device, f"device_map='auto' ({name!r})") for name, device in auto.items()}


def _sizes(model: nn.Module) -> dict[str, int]:
    return {key: tensor.numel() * tensor.element_size() for key, tensor in _tensors(model)}


def _check_budgets(model: nn.Module, placement: DevicePlacement, budgets: dict[torch.device, int]) -> None:
    """Raise naming the first layer whose weights take a device past its ``max_memory``."""
    used: dict[torch.device, int] = {}
    for key, size in _sizes(model).items():
        device = placement(key)
        used[device] = used.get(device, 0) + size
        if device in budgets and used[device] > budgets[device]:
            total = sum(s for k, s in _sizes(model).items() if placement(k) == device)
            raise DeviceMapError(
                f"device_map: layer {_layer_of(key)!r} does not fit on {str(device)!r}: max_memory holds "
                f"{budgets[device] / _MIB:.2f} MiB there, the weights placed there need {total / _MIB:.2f} MiB"
            )


# --------------------------------------------------------------------------- streaming the weights


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors file ``path``, or every ``*.safetensors`` file of the folder ``path`` (shards)."""
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CorruptCheckpointError(f"{path}: no *.safetensors weights in the folder")
    return files


@contextlib.contextmanager
def _open_safetensors(files: list[Path]) -> Iterator[tuple[dict[str, torch.Tensor], Callable[[str], torch.Tensor]]]:
    """The checkpoint's tensors as meta placeholders (from the headers) and a function that reads one tensor."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import _getdtype

    with contextlib.ExitStack() as stack:
        owner: dict[str, Any] = {}
        placeholders: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                for key in handle.keys():
                    if key in owner:
                        raise CorruptCheckpointError(f"{file}: key {key!r} also stored in another shard")
                    piece = handle.get_slice(key)
                    shape, dtype = piece.get_shape(), _getdtype(piece.get_dtype())
                    placeholders[key] = torch.empty(shape, dtype=dtype, device="meta")
                    owner[key] = (file, handle)
            except (SafetensorError, OSError, ValueError) as err:
                raise CorruptCheckpointError(f"{file}: not a readable safetensors file (truncated?): {err}") from err

        def read(key: str) -> torch.Tensor:
            file, handle = owner[key]
            try:
                return handle.get_tensor(key)
            except (SafetensorError, OSError, ValueError) as err:
                raise CorruptCheckpointError(f"{file}: tensor {key!r} cannot be read (truncated?): {err}") from err

        yield placeholders, read


def _tie_groups(model: nn.Module) -> list[list[tuple[str, nn.Module, str, bool]]]:
    """The model's tensors grouped by identity (tied parameters share a group), each entry
    ``(key, module, attribute, is_parameter)``, in the model's order."""
    groups: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, tensor in module._parameters.items():
            if tensor is not None:
                groups.setdefault(id(tensor), []).append((dot + name, module, name, True))
        for name, tensor in module._buffers.items():
            if tensor is not None:
                groups.setdefault(id(tensor), []).append((dot + name, module, name, False))
    return list(groups.values())


def _set(group: list[tuple[str, nn.Module, str, bool]], tensor: torch.Tensor, old: torch.Tensor) -> None:
    if group[0][3]:
        new = nn.Parameter(tensor, requires_grad=old.requires_grad)
        for _, module, name, _ in group:
            module._parameters[name] = new
    else:
        for _, module, name, _ in group:
            module._buffers[name] = tensor


def load_into_empty(
    model: nn.Module,
    source: Path | Mapping[str, torch.Tensor],
    placement: DevicePlacement,
    what: str,
    *,
    allow_non_finite: bool = False,
) -> nn.Module:
    """Fill the empty ``model`` (built by :func:`build_empty`) from ``source``: safetensors files (a file or a folder
    of shards, read one tensor at a time) or a state dict already in memory (a converted upstream checkpoint), each
    tensor set in place on ``placement``'s device. ``what`` names the checkpoint in errors.

    Raises:
        CheckpointMismatchError: the keys, shapes or dtypes do not fit (before any tensor is read).
        NonFiniteWeightsError: tensors holding NaN or Inf (all of them named), unless ``allow_non_finite``.
        CorruptCheckpointError: a file that cannot be read.
    """
    _check_plain_loading(model)
    groups = _tie_groups(model)
    with contextlib.ExitStack() as stack:
        if isinstance(source, Mapping):
            placeholders, read = dict(source), source.__getitem__
        else:
            placeholders, read = stack.enter_context(_open_safetensors(safetensors_files(source)))
        state_keys = set(model.state_dict(keep_vars=True))
        stored_keys = set(placeholders)
        for group in groups:  # a tied tensor stored once stands for all its names
            present = [key for key, *_ in group if key in placeholders]
            for key, *_ in group:
                if present and key not in placeholders and key in state_keys:
                    placeholders[key] = placeholders[present[0]]
        check_state_fits(model, placeholders, what)  # strict, before anything is read
        unset = [key for key in stored_keys if placeholders[key].is_meta and isinstance(source, Mapping)]
        if unset:  # a converter kept the model's own (here: empty) tensors for keys the upstream file lacks
            raise UnsupportedModelError(
                f"{what} lacks {len(unset)} tensor(s) the converter takes from a freshly initialised model, e.g. "
                f"{', '.join(unset[:3])}; an empty model has no values for them: load it without "
                "low_cpu_mem_usage/device_map"
            )
        bad: dict[str, torch.Tensor] = {}
        for group in groups:
            old = _current(group[0])
            stored = [key for key, *_ in group if key in state_keys and key in stored_keys]
            device = placement(group[0][0])
            if not stored:  # a buffer the checkpoint does not hold: keep what the constructor computed
                if old.device.type == "meta":
                    raise UnsupportedModelError(
                        f"{what}: {group[0][0]!r} is not in the checkpoint and has no value in an empty "
                        f"{type(model).__name__}; load it without low_cpu_mem_usage/device_map"
                    )
                _set(group, old.to(device), old)
                continue
            tensor = read(stored[-1])  # as load_state_dict, the last of several stored names wins
            if not allow_non_finite and _has_non_finite(tensor):
                bad[stored[-1]] = tensor
            _set(group, tensor.to(device=device, dtype=old.dtype), old)
        if bad:
            check_finite_state(bad, what)
    return model


def _has_non_finite(tensor: torch.Tensor) -> bool:
    """Whether a float tensor holds NaN or Inf, without a tensor-sized temporary in the common case: NaN and Inf make
    the sum NaN or Inf, and only then (or if finite values overflowed it) is every value checked."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or bool(torch.isfinite(tensor.sum())):
        return False
    return not bool(torch.isfinite(tensor).all())


def _current(entry: tuple[str, nn.Module, str, bool]) -> torch.Tensor:
    _, module, name, is_param = entry
    return module._parameters[name] if is_param else module._buffers[name]
