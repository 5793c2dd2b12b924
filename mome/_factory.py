"""Building models by name: ``create_model``, ``get_tokenizer``, ``fetch_pretrained`` (timm's ``_factory``
and ``_builder``; open_clip's ``factory.get_tokenizer``).

``create_model(name)`` resolves ``name`` (``arch``, ``arch.tag``, ``local-dir:<folder>``, ``hf-hub:<repo>``),
calls the registered entrypoint, and loads weights exactly: a saved folder's ``model.safetensors``, or
with ``pretrained=True`` the card's checkpoint, fetched (:mod:`mome._hub`), read and converted by the
one table of formats and converters (:mod:`mome._formats`, through :func:`mome.convert.load_converted`)
and checked key by key before anything is loaded (:mod:`mome._checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_state_fits,
    file_kind,
    load_checkpoint,
    load_state_exactly,
    read_config_json,
    read_state_dict,
)
from ._errors import (
    CheckpointFormatError,
    CheckpointMismatchError,
    CorruptCheckpointError,
    PretrainedUnavailableError,
    UnknownModelError,
    UnsupportedModelError,
    UnsupportedOptionError,
)
from ._formats import DEFAULT_CONVERTERS, FORMAT_DESCRIPTIONS, FORMATS, detect_format
from ._hub import (
    CHECKPOINT_HINT,
    TRANSFORMERS_PATTERNS,
    fetch_checkpoint,
    hub_download,
    hub_snapshot,
    transformers_source,
)
from ._loading import DevicePlacement, build_empty, load_into_empty, resolve_device_map
from ._pretrained import CFG_FIELDS, PretrainedCfg
from ._quantize import quantize_from_config
from ._registry import get_pretrained_cfg, is_model, model_entrypoint, split_model_name_tag
from ._tokenizer import Tokenizer, create_tokenizer
from .peft import ADAPTER_CONFIG_NAME, load_lora_experts

__all__ = [
    "MODEL_SOURCES",
    "create_model",
    "fetch_pretrained",
    "get_tokenizer",
    "load_checkpoint_file",
    "load_pretrained",
    "parse_model_name",
    "read_saved_config",
]

MODEL_SOURCES = ("hf-hub", "local-dir")
_SOURCE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-_]+")  # 2+ chars, so a drive letter (C:\) is no prefix
_PATH_CHARS = ("/", "\\", ":")


def parse_model_name(model_name: str) -> tuple[str | None, str]:
    """Split off a source prefix: ``'hf-hub:org/repo'`` -> ``('hf-hub', 'org/repo')``; ``(None, name)`` if none.

    As in timm, an unprefixed name containing ``/``, ``\\`` or ``:`` is refused rather than silently
    resolved to a registry model of the same basename.
    """
    prefix, sep, rest = model_name.partition(":")
    if not sep or not _SOURCE_PREFIX.fullmatch(prefix):
        if any(c in model_name for c in _PATH_CHARS):
            raise UnknownModelError(
                f"model name {model_name!r} looks like a Hub repo id or a path; use 'hf-hub:{model_name}' to "
                f"load from the Hugging Face Hub or 'local-dir:{model_name}' to load a saved folder"
            )
        return None, model_name
    source = prefix.lower().replace("_", "-")
    if source not in MODEL_SOURCES:
        raise UnknownModelError(f"unknown model source {prefix!r} in {model_name!r}; the sources are {MODEL_SOURCES}")
    if not rest:
        raise UnknownModelError(f"model name {model_name!r} has nothing after '{prefix}:'")
    return source, rest


def _load_converted(
    model: nn.Module,
    path: Path,
    source_format: str,
    converter: str,
    options: Mapping[str, Any],
    allow_non_finite: bool = False,
) -> None:
    """Read and convert ``path`` (:func:`mome.convert.load_converted`: keys, shapes, dtypes and values checked),
    then load it into ``model``."""
    try:
        from .convert import load_converted
    except ImportError as err:
        raise PretrainedUnavailableError(
            f"{path}: converting the {source_format!r} format needs mome.convert, which this installation lacks"
            f"{CHECKPOINT_HINT} ({type(err).__name__}: {err})"
        ) from err
    state = load_converted(path, source_format, converter, model, allow_non_finite=allow_non_finite, **options)
    model.load_state_dict(state, strict=True)


def load_pretrained(
    model: nn.Module,
    cfg: PretrainedCfg,
    name: str,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_non_finite: bool = False,
    placement: DevicePlacement | None = None,
) -> None:
    """Fetch the card's checkpoint, convert it if its format is not mome's (with the card's
    ``converter_options``), and load it into ``model`` exactly (NaN/Inf refused unless ``allow_non_finite``).
    With ``placement``, ``model`` is an empty one (:func:`mome._loading.build_empty`) filled tensor by tensor."""
    path = fetch_checkpoint(cfg, name, cache_dir, local_files_only, progress=True)
    if placement is not None:
        converter = cfg.converter if cfg.needs_conversion() else None
        _load_empty(model, path, cfg.source_format, converter, cfg.converter_options, allow_non_finite, placement)
    elif not cfg.needs_conversion():
        load_checkpoint(model, path, allow_non_finite=allow_non_finite)
    else:
        _load_converted(model, path, cfg.source_format, cfg.converter, cfg.converter_options, allow_non_finite)


def _load_empty(
    model: nn.Module,
    path: Path,
    source_format: str,
    converter: str | None,
    options: Mapping[str, Any],
    allow_non_finite: bool,
    placement: DevicePlacement,
) -> None:
    """Fill the empty ``model`` from ``path``: mome's safetensors (a file, the shards of a folder, a saved folder's
    ``model.safetensors``) streamed tensor by tensor; a torch file memory-mapped; an upstream format converted in
    memory first (the converter needs the whole checkpoint), then set in place without a second copy."""
    if converter is not None:
        try:
            from .convert import load_converted
        except ImportError as err:
            raise PretrainedUnavailableError(
                f"{path}: converting the {source_format!r} format needs mome.convert ({type(err).__name__}: {err})"
            ) from err
        state = load_converted(path, source_format, converter, model, allow_non_finite=allow_non_finite, **options)
        load_into_empty(model, state, placement, f"{path} (converted)", allow_non_finite=True)  # checked above
        return
    if options:
        raise UnsupportedOptionError(
            "converter_options", f"checkpoint_format={source_format!r}", "that format has no converter", sorted(options)
        )
    if path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        path = path / WEIGHTS_NAME  # a saved folder: its weights (adapters, if any, are separate files)
    if source_format == "mome" and (path.is_dir() or file_kind(path) == "safetensors"):
        source: Path | dict = path
    elif source_format == "mome":
        source = read_state_dict(path, mmap=True)
    else:
        source = FORMATS[source_format](path)
    load_into_empty(model, source, placement, str(path), allow_non_finite=allow_non_finite)


def _load_as(
    model: nn.Module, path: Path, source_format: str, converter: str | None, options: dict, allow_non_finite: bool
) -> None:
    if converter is not None:
        _load_converted(model, path, source_format, converter, options, allow_non_finite)
        return
    if options:
        raise UnsupportedOptionError(
            "converter_options", f"checkpoint_format={source_format!r}", "that format has no converter", sorted(options)
        )
    load_state_exactly(model, FORMATS[source_format](path), str(path), allow_non_finite=allow_non_finite)


def load_checkpoint_file(
    model: nn.Module,
    checkpoint_path: str | Path,
    checkpoint_format: str | None = None,
    converter_options: Mapping[str, Any] | None = None,
    *,
    allow_non_finite: bool = False,
) -> str:
    """Load a checkpoint in any known format into ``model`` exactly; returns the format it was read as.

    ``checkpoint_format`` (a name of :data:`mome.convert.READERS`: ``"mome"``, ``"timm"``, ``"open_clip"``,
    ``"unilm_vlmo"``, ``"vmoe"``, ``"moe_llava"``) is told from the file when omitted
    (:func:`mome._formats.detect_format`); its default converter maps the upstream keys onto the model's,
    with ``converter_options`` (e.g. ``ignore_prefixes``) as keyword arguments.

    Raises:
        CheckpointFormatError: the format cannot be told, or the file is not of the format named.
        CheckpointMismatchError: the keys or shapes do not fit ``model``; names the keys (with the format
            the keys look like when that is not the one named); ``model`` is left unchanged.
        NonFiniteWeightsError: weights with NaN or Inf (unless ``allow_non_finite=True``); ``model`` is left
            unchanged.
    """
    path = Path(checkpoint_path).expanduser()
    if checkpoint_format is not None and checkpoint_format not in FORMATS:
        raise CheckpointFormatError(
            f"unknown checkpoint_format {checkpoint_format!r}; the formats are {sorted(FORMATS)}"
        )
    model_keys = list(model.state_dict())
    source_format = checkpoint_format
    if source_format is None:
        try:
            source_format = detect_format(path, model_keys)
        except CheckpointFormatError as err:
            if file_kind(path) not in ("safetensors", "torch"):
                raise
            # a tensor file with no upstream's keys: report its key diff against the model
            check_state_fits(model, read_state_dict(path), f"{err}\n{path}")
            raise
    converter = DEFAULT_CONVERTERS[source_format]
    options = dict(converter_options or {})
    try:
        _load_as(model, path, source_format, converter, options, allow_non_finite)
    except CheckpointFormatError as err:
        if checkpoint_format is None:
            raise
        raise CheckpointFormatError(
            f"checkpoint_format={source_format!r} ({FORMAT_DESCRIPTIONS[source_format]}) cannot read it: {err}"
        ) from None
    except CheckpointMismatchError as err:
        if checkpoint_format is None:
            raise
        try:
            looks_like = detect_format(path, model_keys)
        except (CheckpointFormatError, OSError, ValueError):
            raise err from None
        if looks_like == source_format:
            raise
        raise CheckpointMismatchError(
            f"{path} looks like the {looks_like!r} format, not {source_format!r} "
            f"(pass checkpoint_format={looks_like!r}): {err}"
        ) from None
    return source_format


def load_empty_from_file(
    model: nn.Module,
    path: Path,
    checkpoint_format: str | None,
    converter_options: Mapping[str, Any] | None,
    allow_non_finite: bool,
    placement: DevicePlacement,
) -> None:
    """Fill the empty ``model`` from ``checkpoint_path`` (its format told as :func:`load_checkpoint_file` tells it)."""
    if checkpoint_format is not None and checkpoint_format not in FORMATS:
        raise CheckpointFormatError(
            f"unknown checkpoint_format {checkpoint_format!r}; the formats are {sorted(FORMATS)}"
        )
    source_format = checkpoint_format or detect_format(path, list(model.state_dict()))
    converter = DEFAULT_CONVERTERS[source_format]
    _load_empty(model, path, source_format, converter, dict(converter_options or {}), allow_non_finite, placement)


def _snapshot(repo_id: str, model_name: str, cache_dir: str | Path | None, local_files_only: bool = False) -> Path:
    """The ``config.json`` + safetensors of a saved-folder Hub repo (errors name ``model_name``)."""
    try:
        return hub_snapshot(repo_id, [CONFIG_NAME, "*.safetensors"], cache_dir, local_files_only=local_files_only)
    except PretrainedUnavailableError as err:
        raise PretrainedUnavailableError(f"{model_name}: {err}") from err


def _is_transformers_vlm_folder(folder: Path) -> bool:
    from .models.hf_moe_vlm import transformers_folder_family

    return transformers_folder_family(folder) is not None


def _transformers_vlm_snapshot(
    repo_id: str, model_name: str, cache_dir: str | Path | None, local_files_only: bool
) -> Path:
    """The snapshot of a Hub repo of a transformers MoE VLM (:mod:`mome.models.hf_moe_vlm`), whole: its config,
    safetensors weights, processor and tokenizer files (:data:`~mome._hub.TRANSFORMERS_PATTERNS`), through
    huggingface_hub's cache, offline-aware. Every weights file the folder needs
    (:func:`~mome.models.hf_moe_vlm.weights_files`) must be there; one that is not (a cache that lost it, with no
    listing of the repo to tell) is fetched alone, which offline raises the one-line error naming the repo and the
    file.

    Raises:
        PretrainedUnavailableError: the repo, or one of its files, is not cached and cannot be fetched; the message
            names ``model_name``, the repo and the file, and the ``hf download`` command that pre-fetches it.
    """
    from .models.hf_moe_vlm import weights_files

    options = {"local_files_only": local_files_only}
    try:
        folder = hub_snapshot(repo_id, TRANSFORMERS_PATTERNS, cache_dir, **options)
        for file in weights_files(folder):
            if not (folder / file).is_file():
                hub_download(repo_id, file, cache_dir, **options)
    except PretrainedUnavailableError as err:
        raise PretrainedUnavailableError(f"{model_name}: {err}") from err
    return folder


def _transformers_vlm_folder(folder: Path, model_name: str, options: dict[str, Any]) -> nn.Module:
    """A transformers ``save_pretrained`` folder of a MoE VLM family of :mod:`mome.models.hf_moe_vlm` (its
    ``config.json`` names the family's ``model_type``): the family class's own ``from_pretrained``; mome's loading
    options do not apply to it and are refused by name."""
    given = sorted(key for key, value in options.items() if value not in (None, False))
    if given:
        why = f"{folder} is a transformers save_pretrained folder, loaded by its model class's from_pretrained"
        raise UnsupportedOptionError("/".join(given), "create_model", why, {key: options[key] for key in given})
    from .models.hf_moe_vlm import load_folder

    model = load_folder(folder, model_name)
    model.mome_model_name = model_name
    return model


def _build(
    arch: str, pretrained: bool, kwargs: dict[str, Any], cfg: PretrainedCfg, source: Any = None, empty: bool = False
) -> nn.Module:
    """Call the entrypoint; ``source`` (a transformers-format card's fetch function) goes to it as ``source=``; with
    ``empty`` the parameters are built on the meta device (:func:`mome._loading.build_empty`)."""
    entrypoint = model_entrypoint(arch)
    extra = {} if source is None else {"source": source}
    if empty:
        model = build_empty(lambda: entrypoint(pretrained=pretrained, **kwargs, **extra))
    else:
        model = entrypoint(pretrained=pretrained, **kwargs, **extra)
    # The entrypoint may set the architecture's data defaults; the card's fields take precedence.
    defaults = getattr(model, "pretrained_cfg", None)
    model.pretrained_cfg = defaults.replace(**cfg.to_dict(remove_null=True)) if defaults is not None else cfg
    model.mome_model_name = arch
    model.mome_model_args = dict(kwargs)
    return model


def create_model(
    model_name: str,
    pretrained: bool = False,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_format: str | None = None,
    converter_options: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    allow_non_finite: bool = False,
    low_cpu_mem_usage: bool = False,
    device_map: str | int | torch.device | Mapping[str, Any] | None = None,
    max_memory: Mapping[Any, int | str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name (timm's ``create_model``).

    Args:
        model_name: ``arch``, ``arch.tag``, ``local-dir:/saved/folder`` or ``hf-hub:org/repo``; a saved
            folder is built from its ``config.json`` (``kwargs`` override its ``model_args``) and its
            ``model.safetensors`` is always loaded (``pretrained`` is not needed). A ``local-dir:`` folder or an
            ``hf-hub:`` repo that transformers' ``save_pretrained`` wrote for one of transformers' MoE VLM families
            (:mod:`mome.models.hf_moe_vlm`) is loaded by the family class's ``from_pretrained``; of such a repo the
            whole snapshot is fetched (config, weights, processor and tokenizer files), so that its processor is
            found beside the weights.
        pretrained: load the card's weights (``file``, ``hf_hub_id`` via ``huggingface_hub``, or ``url``),
            sha256-checked before loading and converted first when the card's format is not mome's.
        pretrained_cfg_overlay: card fields to override, e.g. ``dict(file="w.safetensors")``.
        checkpoint_path: a checkpoint loaded exactly after construction: mome's own (a ``.safetensors``
            or torch file, a saved folder) or an upstream one you already have (a vmoe ``.index`` or
            msgpack file, a unilm VLMo ``.pt``, a timm or open_clip file, a MoE-LLaVA folder), converted.
        checkpoint_format: the format of ``checkpoint_path`` (``"mome"``, ``"timm"``, ``"open_clip"``,
            ``"unilm_vlmo"``, ``"vmoe"``, ``"moe_llava"``); told from the file when omitted.
        converter_options: keyword options of the format's converter (e.g. ``ignore_prefixes``); for a
            card's own checkpoint they come from its ``converter_options``.
        cache_dir: the Hugging Face cache to use (URL downloads go under it too).
        local_files_only: never download; use only what is cached.
        allow_non_finite: load weights holding NaN or Inf; by default they are refused with a
            :class:`~mome.NonFiniteWeightsError` naming the file and the tensors (on every route: card,
            saved folder, ``checkpoint_path``, converted), and the model is not built half-loaded.
        low_cpu_mem_usage: build the model with its parameters on the meta device and fill it from the
            checkpoint tensor by tensor (:mod:`mome._loading`), so the weights are held once, not twice (random init,
            then the checkpoint). Needs weights to load (``pretrained``, a saved folder or ``checkpoint_path``);
            not for a quantized folder.
        device_map: where the loaded weights go (implies ``low_cpu_mem_usage``): ``"cpu"``, a device
            (``"cuda:0"``, an int: a CUDA index), ``"auto"`` (accelerate's ``infer_auto_device_map``) or a dict of
            layer name (``""``: the whole model) -> device. The model goes onto one device. A device that is not
            available, a layer the map lacks or names wrongly, or weights over ``max_memory`` raise a
            :class:`~mome.DeviceMapError` naming the device or the layer before any tensor is read.
        max_memory: device -> bytes (or ``"10GiB"``) the weights may take there, with ``device_map``.
        **kwargs: passed to the entrypoint; those set to None are dropped (so a CLI can pass them).
            They override the card's ``model_kwargs``, which apply when the tag is named or
            ``pretrained`` is set (a bare ``arch`` keeps the entrypoint's defaults).

    The model gets ``pretrained_cfg`` (unless the entrypoint set one), ``mome_model_name`` and
    ``mome_model_args`` (what :func:`save_pretrained` writes).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    empty = bool(low_cpu_mem_usage) or device_map is not None
    if max_memory is not None and device_map is None:
        why = "it bounds a device_map=; none was given"
        raise UnsupportedOptionError("max_memory", "create_model", why, max_memory)
    source, name = parse_model_name(model_name)
    if source is None:
        cfg = get_pretrained_cfg(name)
        cfg = cfg.replace(**(pretrained_cfg_overlay or {}))
        arch, tag = split_model_name_tag(name)
        if empty and not pretrained and checkpoint_path is None:
            why = "no weights are loaded (no pretrained=True, local-dir:, hf-hub: or checkpoint_path=)"
            option = "device_map" if device_map is not None else "low_cpu_mem_usage"
            raise UnsupportedOptionError(option, "create_model", why, device_map if device_map is not None else True)
        # a named tag (or pretrained weights) means that checkpoint's model: its card's kwargs apply
        card_kwargs = cfg.model_kwargs if (tag or pretrained) else {}
        source = transformers_source(cfg, cache_dir, local_files_only)
        # a card without a checkpoint of its own (transformers' released MoE VLMs) has its entrypoint load the weights
        own_weights = source is not None or (pretrained and not cfg.has_weights())
        model = _build(arch, pretrained, {**card_kwargs, **kwargs}, cfg, source, empty=empty and not own_weights)
        placement = resolve_device_map(model, device_map, max_memory) if empty else None
        if pretrained:
            if source is None:
                load_pretrained(model, cfg, name, cache_dir, local_files_only, allow_non_finite, placement)
        elif placement is not None:  # fill the empty model from checkpoint_path itself
            path = Path(checkpoint_path).expanduser()
            load_empty_from_file(model, path, checkpoint_format, converter_options, allow_non_finite, placement)
            checkpoint_path = checkpoint_format = converter_options = None
        elif allow_non_finite and checkpoint_path is None:
            why = "no weights are loaded (no pretrained=True or checkpoint_path=)"
            raise UnsupportedOptionError("allow_non_finite", "create_model", why, True)
    else:
        folder = (
            Path(name).expanduser()
            if source == "local-dir"
            else _snapshot(name, model_name, cache_dir, local_files_only)
        )
        if _is_transformers_vlm_folder(folder):
            if source == "hf-hub":  # the rest of the repo: its processor and tokenizer, read from the same snapshot
                folder = _transformers_vlm_snapshot(name, model_name, cache_dir, local_files_only)
            options = dict(
                pretrained_cfg_overlay=pretrained_cfg_overlay,
                checkpoint_path=checkpoint_path,
                low_cpu_mem_usage=low_cpu_mem_usage,
                device_map=device_map,
                allow_non_finite=allow_non_finite,
                **kwargs,
            )
            return _transformers_vlm_folder(folder, model_name, options)
        config = read_saved_config(folder, model_name)
        arch = split_model_name_tag(config["architecture"])[0]
        if empty and "quantization" in config:
            raise UnsupportedOptionError(
                "low_cpu_mem_usage/device_map",
                "create_model",
                f"{folder} holds a quantized model, which is rebuilt and quantized before its int weights load",
                True,
            )
        cfg = PretrainedCfg.from_dict({**config.get("pretrained_cfg", {}), **(pretrained_cfg_overlay or {})})
        args = {**config.get("model_args", {}), **kwargs}
        model = _build(arch, False, args, cfg.replace(architecture=arch), empty=empty)
        if empty:
            placement = resolve_device_map(model, device_map, max_memory)
            weights = folder / WEIGHTS_NAME
            load_into_empty(model, weights, placement, str(weights), allow_non_finite=allow_non_finite)
        else:
            if "quantization" in config:  # a quantized save: quantize the same way, then load the int data and scales
                quantize_from_config(model, config["quantization"], str(folder / CONFIG_NAME))
            load_checkpoint(model, folder / WEIGHTS_NAME, allow_non_finite=allow_non_finite)
        if (folder / ADAPTER_CONFIG_NAME).is_file():  # a model saved with its LoRA experts (mome.peft)
            load_lora_experts(model, folder, allow_noncausal=True)  # saved as trained: its routing was accepted
    if checkpoint_path is not None:
        load_checkpoint_file(
            model, checkpoint_path, checkpoint_format, converter_options, allow_non_finite=allow_non_finite
        )
    elif checkpoint_format is not None or converter_options:
        raise UnsupportedOptionError(
            "checkpoint_format/converter_options",
            "create_model",
            "they apply to a checkpoint_path; none was given",
            [checkpoint_format, converter_options],
        )
    return model


def fetch_pretrained(
    model_name: str | PretrainedCfg,
    *,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> Path:
    """Download (or find in the cache) the checkpoint of the card ``arch.tag`` and check its sha256.

    Returns the file (or, for a whole Hub repo, the snapshot folder) in the upstream format of the
    card (``cfg.source_format``). ``python -m mome.zoo download NAME`` calls this.

    Raises:
        PretrainedUnavailableError: offline / ``local_files_only`` and not cached, or the transfer failed;
            the message says how to pre-fetch the file or pass ``checkpoint_path=``.
        ChecksumMismatchError: the file does not hash to the card's sha256 (a download is deleted).
    """
    cfg = model_name if isinstance(model_name, PretrainedCfg) else get_pretrained_cfg(model_name)
    name = model_name if isinstance(model_name, str) else f"{cfg.architecture}.{cfg.tag}"
    return fetch_checkpoint(cfg, name, cache_dir, local_files_only, progress)


#: the fields of a saved folder's config.json that :func:`create_model` reads, and the JSON type each must have
_SAVED_FIELDS = {
    "architecture": (str, "a model name"),
    "model_args": (dict, "an object"),
    "pretrained_cfg": (dict, "an object"),
    "quantization": (dict, "an object"),
}


def read_saved_config(folder: Path, model_name: str) -> dict[str, Any]:
    """The ``config.json`` of a saved folder, checked: ``architecture`` (a registered model's name),
    ``model_args`` and ``pretrained_cfg`` (objects; the latter with :class:`PretrainedCfg` fields only).

    Raises:
        FileNotFoundError: ``folder`` is no folder or has no ``config.json`` (the message names ``model_name``).
        CorruptCheckpointError: the config is not a JSON object (names the file, and the line and column of a JSON
            error), or a field has the wrong type or an unknown card field.
        CheckpointFormatError: the config names no ``architecture`` (not a mome saved folder).
        UnknownModelError: its ``architecture`` is not a registered model.
    """
    config_path = folder / CONFIG_NAME
    if folder.is_file():
        raise FileNotFoundError(f"{model_name}: {folder} is a file, not a saved folder (pass it as checkpoint_path=)")
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_name}: no {CONFIG_NAME} in {folder}")
    config = read_config_json(config_path)
    if "architecture" not in config:
        raise CheckpointFormatError(
            f"{config_path} names no 'architecture': not a mome saved folder (fields {sorted(config)[:8]}); "
            "an upstream folder loads with create_model(ARCH, checkpoint_path=FOLDER)"
        )
    for field, (kind, words) in _SAVED_FIELDS.items():
        if field in config and not (isinstance(config[field], kind) and config[field] != ""):
            raise CorruptCheckpointError(f"{config_path}: field {field!r} must be {words}, got {config[field]!r}")
    unknown = sorted(set(config.get("pretrained_cfg", {})) - CFG_FIELDS)
    if unknown:
        raise CorruptCheckpointError(f"{config_path}: unknown pretrained_cfg field(s) {unknown}")
    if not is_model(split_model_name_tag(config["architecture"])[0]):
        raise UnknownModelError(
            f"{config_path}: architecture {config['architecture']!r} is not a registered model; see mome.list_models()"
        )
    return config


def _model_cfg(model_name: str, cache_dir: str | Path | None) -> PretrainedCfg:
    """The model's card merged over the data defaults its entrypoint sets (built on the meta device)."""
    source, name = parse_model_name(model_name)
    if source is None:
        cfg, arch, args = get_pretrained_cfg(name), name, {}
    else:
        folder = Path(name).expanduser() if source == "local-dir" else hub_download(name, CONFIG_NAME, cache_dir).parent
        config = read_saved_config(folder, model_name)
        arch = split_model_name_tag(config["architecture"])[0]
        cfg, args = PretrainedCfg.from_dict(config.get("pretrained_cfg", {})), config.get("model_args", {})
    if cfg.tokenizer is None:
        with torch.device("meta"):
            model = create_model(arch, **args)
        defaults = getattr(model, "pretrained_cfg", None)
        if isinstance(defaults, PretrainedCfg):
            cfg = defaults.replace(**cfg.to_dict(remove_null=True))
    return cfg


def get_tokenizer(model_name: str, context_length: int | None = None, cache_dir: str | Path | None = None) -> Tokenizer:
    """The text tokenizer of ``model_name`` (``arch``, ``arch.tag``, ``local-dir:...`` or ``hf-hub:...``).

    Args:
        model_name: a model with a text side (LIMoE, VLMo, ...).
        context_length: tokens per text; defaults to the model's ``pretrained_cfg.context_length``.
        cache_dir: the Hugging Face cache (for ``hf-hub`` tokenizers and configs).

    Raises:
        ValueError: the model has no text side (its cfg names no tokenizer).
        PretrainedUnavailableError: the tokenizer must come from the Hugging Face Hub and is not cached.
    """
    cfg = _model_cfg(model_name, cache_dir)
    if not cfg.tokenizer:
        raise UnsupportedModelError(f"{model_name} has no text side: its pretrained_cfg names no tokenizer")
    return create_tokenizer(cfg.tokenizer, context_length or cfg.context_length, cache_dir)
