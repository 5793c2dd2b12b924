"""Model registry and factory, in timm's API shapes (``timm.models._registry`` / ``_factory``).

A model is named ``arch.tag``: ``arch`` is a registered entrypoint function
``fn(pretrained: bool = False, **kwargs) -> nn.Module`` and ``tag`` names one set of weights (a
:class:`PretrainedCfg`, the "card"). Omitting the tag means the arch's default tag: the one whose
key ends in ``*``, else the first registered. ``create_model`` also takes ``hf-hub:org/repo`` and
``local-dir:/path``, both holding the saved-folder format that timm and open_clip converged on:
``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg``) + ``model.safetensors``.

Weights are always loaded *exactly*: every key present, no extra key, every shape equal, checked
before ``load_state_dict`` so a failed load leaves the model untouched. Pickled checkpoints go
through ``torch.load(weights_only=True)``. ``import mome`` imports :mod:`mome.models`, which
registers mome's own families.

The checkpoint cards of the zoo (``zoo/*.yaml``, see :mod:`mome.zoo`) are read on the first lookup
that needs cards (``list_pretrained``, ``get_pretrained_cfg``, ``create_model``), with those of the
folders in ``MOME_ZOO_PATH`` (``os.pathsep``-separated) and of :func:`add_zoo_dir`. A card whose
weights are in a foreign format is downloaded (:mod:`mome._download`), converted by
``mome.convert.load_converted`` and loaded exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._download import (
    ChecksumMismatchError,
    PretrainedUnavailableError,
    check_sha256,
    download_url,
    hub_download,
    hub_snapshot,
)
from ._folders import hidden_sibling, remove_stale_siblings, swap_into_place

__all__ = [
    "CheckpointMismatchError",
    "ChecksumMismatchError",
    "CorruptCheckpointError",
    "PretrainedCfg",
    "PretrainedUnavailableError",
    "UnknownModelError",
    "UnsafeCheckpointError",
    "add_zoo_dir",
    "create_model",
    "fetch_pretrained",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "list_pretrained",
    "model_entrypoint",
    "parse_model_name",
    "push_to_hub",
    "register_model",
    "register_pretrained_cfg",
    "save_pretrained",
    "split_model_name_tag",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MODEL_SOURCES = ("hf-hub", "local-dir")
_SOURCE_PREFIX = re.compile(r"[A-Za-z][A-Za-z0-9+.\-_]+")  # 2+ chars, so a drive letter (C:\) is no prefix
_PATH_CHARS = ("/", "\\", ":")
_NATIVE_FORMAT = "mome"
_CHECKPOINT_HINT = "; or pass checkpoint_path= to load weights you have"
_MANIFEST_KEY = "files"  # config.json lists the files save_pretrained wrote, so a re-save may replace them
_README_NAME = "README.md"


class UnknownModelError(ValueError):
    """A model name, or a tag of it, that the registry does not know."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model exactly."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, not the format its name says)."""


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint that ``torch.load(weights_only=True)`` refuses (it would run code on load)."""


@dataclass
class PretrainedCfg:
    """One checkpoint card (timm's ``PretrainedCfg``, with mome's multimodal and provenance fields).

    Fixed fields only: an unknown key is a ``TypeError``. Lists given for ``input_size``, ``mean``,
    ``std`` and ``paper_ids`` (YAML, JSON) become tuples. ``cfg.get(key)`` / ``cfg[key]`` read
    fields by name, so timm's ``resolve_model_data_config(model)`` accepts ``model.pretrained_cfg``.
    """

    # weight source
    hf_hub_id: str | None = None
    hf_hub_filename: str | None = None
    url: str | None = None
    file: str | None = None
    sha256: str | None = None
    source_format: str = _NATIVE_FORMAT  # "mome", "vmoe", "unilm_vlmo", "timm", "open_clip", ...
    converter: str | None = None
    # data
    input_size: tuple[int, ...] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    num_classes: int | None = None
    context_length: int | None = None
    tokenizer: str | None = None
    # provenance
    license: str | None = None
    paper_ids: str | tuple[str, ...] | None = None
    paper_name: str | None = None
    notes: str | None = None
    origin_url: str | None = None
    results: dict[str, Any] = field(default_factory=dict)
    # entrypoint kwargs this checkpoint needs (image size, classes, ...); the caller's kwargs win
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # filled in by the registry
    architecture: str | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "mean", "std", "paper_ids"):
            value = getattr(self, name)
            if isinstance(value, list):
                setattr(self, name, tuple(value))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainedCfg:
        unknown = sorted(set(values) - _CFG_FIELDS)
        if unknown:
            raise TypeError(f"unknown PretrainedCfg field(s) {unknown}; the fields are {sorted(_CFG_FIELDS)}")
        return cls(**values)

    def has_weights(self) -> bool:
        """Whether the card names a weight source (``file``, ``hf_hub_id`` or ``url``), as in timm."""
        return bool(self.file or self.hf_hub_id or self.url)

    def needs_conversion(self) -> bool:
        return self.source_format != _NATIVE_FORMAT or self.converter not in (None, _NATIVE_FORMAT)

    def to_dict(self, remove_null: bool = True) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if not (remove_null and v is None)}

    def replace(self, **changes: Any) -> PretrainedCfg:
        return PretrainedCfg.from_dict({**self.to_dict(remove_null=False), **changes})

    def __getitem__(self, key: str) -> Any:
        if key not in _CFG_FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key) if key in _CFG_FIELDS else None
        return default if value is None else value


_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))


_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_model_to_module: dict[str, str] = {}
_tags: dict[str, list[str]] = {}  # arch -> its tags, the default first
_cfgs: dict[str, PretrainedCfg] = {}  # "arch.tag" -> card
_zoo_loaded = False
_zoo_pending: dict[str, tuple[PretrainedCfg, bool]] = {}  # "arch.tag" -> (card, is default) of unregistered archs


def split_model_name_tag(model_name: str, no_tag: str = "") -> tuple[str, str]:
    """``'vmoe_b16_e8.jft_ft_in1k'`` -> ``('vmoe_b16_e8', 'jft_ft_in1k')``, split on the first ``.``."""
    arch, _, tag = model_name.partition(".")
    return arch, tag or no_tag


def _natural_key(name: str) -> list[int | str]:
    """Sort key putting ``x2`` before ``x10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _close_matches(name: str) -> str:
    candidates = list(_entrypoints) + list(_cfgs)
    matches = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(matches)}?" if matches else "; see mome.list_models()"


def _as_cfg(cfg: PretrainedCfg | Mapping[str, Any], arch: str, tag: str) -> PretrainedCfg:
    cfg = cfg if isinstance(cfg, PretrainedCfg) else PretrainedCfg.from_dict(cfg)
    if cfg.architecture not in (None, arch):
        raise ValueError(f"card {arch}.{tag} says architecture={cfg.architecture!r}")
    return cfg.replace(architecture=arch, tag=tag)


def _add_cfg(arch: str, tag: str, cfg: PretrainedCfg | Mapping[str, Any]) -> PretrainedCfg:
    is_default = tag.endswith("*")
    tag = tag.rstrip("*")
    if not tag:
        raise ValueError(f"{arch}: pretrained tags must be non-empty")
    stored = _as_cfg(cfg, arch, tag)  # validate first: a refused card leaves the registry as it was
    tags = _tags.setdefault(arch, [])
    if tag in tags:
        warnings.warn(f"overwriting the pretrained cfg {arch}.{tag}", UserWarning, stacklevel=3)
        if is_default:
            tags.remove(tag)
    if tag not in tags:
        tags.insert(0 if is_default else len(tags), tag)
    _cfgs[f"{arch}.{tag}"] = stored
    return stored


def register_model(
    fn: Callable[..., nn.Module] | None = None,
    *,
    pretrained_cfgs: Mapping[str, PretrainedCfg | Mapping[str, Any]] | None = None,
) -> Any:
    """Register an entrypoint under ``fn.__name__`` (``@register_model`` or ``@register_model(pretrained_cfgs=...)``).

    ``pretrained_cfgs`` maps tags to cards; the tag ending in ``*`` (else the first) is the default,
    like timm's ``generate_default_cfgs``. Re-registering a name warns and replaces the entrypoint
    and all its cards. Entrypoints only build the architecture: :func:`create_model` loads weights.
    """
    if fn is None:
        return lambda f: register_model(f, pretrained_cfgs=pretrained_cfgs)
    arch = fn.__name__
    cfgs = dict(pretrained_cfgs or {})
    if sum(tag.endswith("*") for tag in cfgs) > 1:
        raise ValueError(f"{arch}: more than one default tag (ending in '*') in {list(cfgs)}")
    if arch in _entrypoints:
        warnings.warn(f"overwriting the registered model {arch} with {fn.__module__}.{arch}", UserWarning, stacklevel=2)
        for tag in _tags.pop(arch, []):
            _cfgs.pop(f"{arch}.{tag}", None)
    _entrypoints[arch] = fn
    _model_to_module[arch] = fn.__module__.rsplit(".", 1)[-1]
    _tags[arch] = []
    for tag, cfg in cfgs.items():
        _add_cfg(arch, tag, cfg)
    return fn


def register_pretrained_cfg(model_name: str, cfg: PretrainedCfg | Mapping[str, Any]) -> PretrainedCfg:
    """Add (or replace, with a warning) the card ``arch.tag`` of a registered arch.

    ``arch.tag*`` makes it the default tag. The zoo loads its YAML cards through this.
    """
    arch, tag = split_model_name_tag(model_name)
    if not tag:
        raise ValueError(f"{model_name!r}: name the card 'arch.tag'")
    if not is_model(arch):
        raise UnknownModelError(f"cannot add card {model_name}: unknown model {arch!r}{_close_matches(arch)}")
    return _add_cfg(arch, tag, cfg)


def _register_pending() -> None:
    """Register the zoo cards whose architecture is registered by now (others wait for it)."""
    for name, (cfg, default) in list(_zoo_pending.items()):
        arch, tag = split_model_name_tag(name)
        if arch in _entrypoints:
            del _zoo_pending[name]
            _add_cfg(arch, tag + ("*" if default else ""), cfg)


def _ensure_zoo() -> None:
    """Read the cards of ``mome.zoo_dir()`` and ``MOME_ZOO_PATH`` once; register cards of newly added archs."""
    global _zoo_loaded
    if not _zoo_loaded:
        from ._resources import zoo_dir

        extra = [p for p in os.environ.get("MOME_ZOO_PATH", "").split(os.pathsep) if p]
        for folder in [zoo_dir(), *extra]:
            _read_zoo_dir(Path(folder))  # a broken card raises here, and again on the next lookup
        _zoo_loaded = True
    if _zoo_pending:
        _register_pending()


def _read_zoo_dir(folder: Path) -> list[str]:
    from .zoo import read_cards

    cards = read_cards(folder)
    for name, (cfg, default) in cards.items():
        _zoo_pending[name] = (cfg, default)
    _register_pending()
    return list(cards)


def add_zoo_dir(path: str | Path) -> list[str]:
    """Add the checkpoint cards (``*.yaml``, the :mod:`mome.zoo` schema) of a folder; returns their names.

    Like open_clip's ``add_model_config``. Its cards replace (with a warning) built-in cards of the same
    ``arch.tag``; cards of architectures not registered yet are kept until they are.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        mome.zoo.CardError: a card breaks the schema (the error names the file and field).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"add_zoo_dir: {folder} is not a folder")
    _ensure_zoo()
    return _read_zoo_dir(folder)


def _to_list(value: str | Iterable[str] | None) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _expand_filter(pattern: str) -> list[str]:
    """A filter without a tag also matches ``arch.*`` (timm)."""
    return [pattern] if split_model_name_tag(pattern)[1] else [pattern, f"{pattern}.*"]


def list_models(
    filter: str | Iterable[str] = "",
    module: str | Iterable[str] = "",
    pretrained: bool = False,
    exclude_filters: str | Iterable[str] = "",
    include_tags: bool | None = None,
) -> list[str]:
    """Registered model names matching the fnmatch ``filter`` (str or list), naturally sorted.

    Args:
        filter: wildcard pattern(s) to include; empty lists everything.
        module: only models registered from these module(s) (the last part of the module name).
        pretrained: only models/cards with weights (:meth:`PretrainedCfg.has_weights`).
        exclude_filters: wildcard pattern(s) removed after ``filter``.
        include_tags: list ``arch.tag`` names (an arch without cards stays untagged); defaults to ``pretrained``.
    """
    _ensure_zoo()
    include, exclude, modules = _to_list(filter), _to_list(exclude_filters), _to_list(module)
    include_tags = pretrained if include_tags is None else include_tags
    archs = [a for a in _entrypoints if not modules or _model_to_module[a] in modules]
    if include_tags:
        names = {f"{a}.{t}" for a in archs for t in _tags[a]} | {a for a in archs if not _tags[a]}
        include = [p for f in include for p in _expand_filter(f)]
        exclude = [p for f in exclude for p in _expand_filter(f)]
    else:
        names = set(archs)
    if include:
        names = {n for pattern in include for n in fnmatch.filter(names, pattern)}
    for pattern in exclude:
        names -= set(fnmatch.filter(names, pattern))
    if pretrained:
        names = {n for n in names if _lookup_cfg(n).has_weights()}
    return sorted(names, key=_natural_key)


def list_pretrained(filter: str | Iterable[str] = "", exclude_filters: str | Iterable[str] = "") -> list[str]:
    """``arch.tag`` names with weights: ``list_models(filter, pretrained=True, include_tags=True)``."""
    return list_models(filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)


def is_model(model_name: str) -> bool:
    """Whether the arch of ``model_name`` (tag ignored) is registered."""
    return split_model_name_tag(model_name)[0] in _entrypoints


def model_entrypoint(model_name: str) -> Callable[..., nn.Module]:
    """The entrypoint function of ``model_name`` (tag ignored)."""
    arch = split_model_name_tag(model_name)[0]
    if not is_model(arch):
        raise UnknownModelError(f"unknown model {model_name!r}{_close_matches(model_name)}")
    return _entrypoints[arch]


def _lookup_cfg(model_name: str) -> PretrainedCfg:
    _ensure_zoo()
    arch, tag = split_model_name_tag(model_name)
    if not is_model(arch):
        raise UnknownModelError(f"unknown model {model_name!r}{_close_matches(model_name)}")
    tag = tag or (_tags[arch][0] if _tags[arch] else "")
    if not tag:
        return PretrainedCfg(architecture=arch)
    if tag not in _tags[arch]:
        known = ", ".join(f"{arch}.{t}" for t in _tags[arch]) or "none"
        raise UnknownModelError(f"unknown pretrained tag {model_name!r}{_close_matches(model_name)} (tags: {known})")
    return _cfgs[f"{arch}.{tag}"]


def get_pretrained_cfg(model_name: str) -> PretrainedCfg:
    """A copy of the card of ``arch.tag``, or of ``arch``'s default tag (a bare card if it has none)."""
    return _lookup_cfg(model_name).replace()


def parse_model_name(model_name: str) -> tuple[str | None, str]:
    """Split off a source prefix: ``'hf-hub:org/repo'`` -> ``('hf-hub', 'org/repo')``; ``(None, name)`` if none.

    As in timm, an unprefixed name containing ``/``, ``\\`` or ``:`` is refused rather than silently
    resolved to a registry model of the same basename.
    """
    prefix, sep, rest = model_name.partition(":")
    if not sep or not _SOURCE_PREFIX.fullmatch(prefix):
        if any(c in model_name for c in _PATH_CHARS):
            raise ValueError(
                f"model name {model_name!r} looks like a Hub repo id or a path; use 'hf-hub:{model_name}' to "
                f"load from the Hugging Face Hub or 'local-dir:{model_name}' to load a saved folder"
            )
        return None, model_name
    source = prefix.lower().replace("_", "-")
    if source not in _MODEL_SOURCES:
        raise ValueError(f"unknown model source {prefix!r} in {model_name!r}; the sources are {_MODEL_SOURCES}")
    if not rest:
        raise ValueError(f"model name {model_name!r} has nothing after '{prefix}:'")
    return source, rest


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (``state_dict``/``model`` key, ``module.`` prefix).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: the file cannot be read (truncated, another format).
        UnsafeCheckpointError: a pickle that ``torch.load(weights_only=True)`` refuses; nothing in it runs.
    """
    import pickle

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
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused by torch.load(weights_only=True) (it is not a plain tensor checkpoint): {err}"
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for damaged archives
        raise CorruptCheckpointError(f"{path}: not a readable torch checkpoint (truncated?): {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise CorruptCheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CorruptCheckpointError(f"{path}: non-tensor entries {bad[:20]} in the state dict")
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
    """Raise :class:`CheckpointMismatchError` (naming ``source`` and the keys) unless ``state`` fits ``model``
    exactly: the same keys, shapes, and no integer values for float parameters. Tied parameters stored once
    are filled in ``state``. Nothing is loaded."""
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
        # the first line stands alone (a CLI prints only it): counts and a few keys of each kind
        summary = "; ".join(f"{len(keys)} {label} key(s), e.g. {', '.join(keys[:3])}" for label, keys in groups if keys)
        lines = [f"{source} does not match {type(model).__name__} exactly: {summary}"]
        for label, keys in groups:
            if keys:
                more = f" (+{len(keys) - 20} more)" if len(keys) > 20 else ""
                lines.append(f"  {len(keys)} {label} key(s): {', '.join(keys[:20])}{more}")
        raise CheckpointMismatchError("\n".join(lines))


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` exactly, or raise :class:`CheckpointMismatchError` leaving it unchanged."""
    check_state_fits(model, state, source)
    model.load_state_dict(state, strict=True)


def _load_weights(model: nn.Module, path: str | Path) -> None:
    """Load the checkpoint file ``path`` into ``model`` exactly (see :func:`_load_state`)."""
    path = Path(path)
    _load_state(model, _read_state_dict(path), str(path))


def _unavailable(what: str, err: Exception | None = None, hint: str = _CHECKPOINT_HINT) -> PretrainedUnavailableError:
    return PretrainedUnavailableError(what + hint + (f" ({type(err).__name__}: {err})" if err else ""))


_hub_download = hub_download  # a Hub file, or a PretrainedUnavailableError saying how to pre-fetch it


# Files a Hub snapshot of a foreign checkpoint needs (HF ``save_pretrained`` folders: MoE-LLaVA).
_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.tiktoken", "*.py"]


def _vmoe_shards(index: Path) -> list[str]:
    """File names of the data shards of a vmoe sharded checkpoint (``<prefix>.data-nnnnn-of-NNNNN``).

    The ``.index`` file is a msgpack map whose ``shard_count`` says how many there are (vmoe
    ``checkpoints/partitioned.py``).
    """
    import msgpack

    try:
        header = msgpack.unpackb(index.read_bytes(), raw=False, strict_map_key=False)
        count = int(header["shard_count"])
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as err:
        raise CorruptCheckpointError(f"{index}: not a vmoe checkpoint index (no shard_count): {err}") from err
    prefix = index.name.removesuffix(".index")
    return [f"{prefix}.data-{shard:05d}-of-{count:05d}" for shard in range(count)]


def _fetch(cfg: PretrainedCfg, name: str, cache_dir: str | Path | None, local_files_only: bool, progress: bool) -> Path:
    """The card's checkpoint on disk: ``file``, else ``hf_hub_id``, else ``url`` (timm's order), sha256 checked.

    A foreign card without ``hf_hub_filename`` is a whole Hub repo (the snapshot folder is returned).
    A vmoe ``.index`` brings its data shards into the same folder.
    """
    if cfg.file:
        path = Path(cfg.file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{name}: pretrained file {path} does not exist")
        if path.is_file():
            check_sha256(path, cfg.sha256, delete=False)
        return path
    sibling: Callable[[str], Path]  # fetches another file of the same folder (a shard)
    if cfg.hf_hub_id:
        if cfg.hf_hub_filename is None and cfg.needs_conversion():
            return hub_snapshot(cfg.hf_hub_id, _SNAPSHOT_PATTERNS, cache_dir, local_files_only=local_files_only)
        filename = cfg.hf_hub_filename or WEIGHTS_NAME
        path = hub_download(cfg.hf_hub_id, filename, cache_dir, local_files_only=local_files_only)
        check_sha256(path, cfg.sha256, delete=True)
        folder = filename.rpartition("/")[0]

        def sibling(file: str) -> Path:
            repo_file = f"{folder}/{file}" if folder else file
            return hub_download(cfg.hf_hub_id, repo_file, cache_dir, local_files_only=local_files_only)

    elif cfg.url:
        options = {"cache_dir": cache_dir, "local_files_only": local_files_only, "progress": progress}
        path = download_url(cfg.url, sha256=cfg.sha256, **options)
        base = cfg.url.rpartition("/")[0]

        def sibling(file: str) -> Path:
            return download_url(f"{base}/{file}", **options)

    else:
        raise ValueError(f"{name} has no pretrained weights (mome.list_pretrained() lists those that do)")
    if cfg.source_format == "vmoe" and path.name.endswith(".index"):
        for shard in _vmoe_shards(path):
            sibling(shard)
    return path


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
    cfg = model_name if isinstance(model_name, PretrainedCfg) else _lookup_cfg(model_name)
    name = model_name if isinstance(model_name, str) else f"{cfg.architecture}.{cfg.tag}"
    return _fetch_checked(cfg, name, cache_dir, local_files_only, progress)


def _fetch_checked(
    cfg: PretrainedCfg, name: str, cache_dir: str | Path | None, local_files_only: bool, progress: bool
) -> Path:
    """:func:`_fetch`, its unavailability errors completed with the card's format and how to pre-fetch."""
    try:
        return _fetch(cfg, name, cache_dir, local_files_only, progress)
    except PretrainedUnavailableError as err:
        what = f"{name}: its weights"
        if cfg.needs_conversion():
            what += f" (the {cfg.source_format!r} format, converted by the zoo loader with {cfg.converter!r})"
        raise type(err)(
            f"{what} are not available here: {err}; pre-fetch them with `python -m mome.zoo download {name}`"
            + _CHECKPOINT_HINT
        ) from err


def _convert_checkpoint(path: Path, cfg: PretrainedCfg, model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` from a foreign checkpoint, by ``mome.convert.load_converted``."""
    try:
        from .convert import load_converted
    except ImportError as err:
        raise _unavailable(
            f"{cfg.architecture}.{cfg.tag}: converting the {cfg.source_format!r} format needs mome.convert, "
            "which this installation lacks",
            err,
        ) from err
    return load_converted(path, cfg.source_format, cfg.converter, model)


def _load_pretrained(
    model: nn.Module, cfg: PretrainedCfg, name: str, cache_dir: str | Path | None, local_files_only: bool = False
) -> None:
    """Fetch the card's checkpoint, convert it if it is foreign, and load it exactly."""
    path = _fetch_checked(cfg, name, cache_dir, local_files_only, progress=True)
    if cfg.needs_conversion():
        _load_state(model, _convert_checkpoint(path, cfg, model), f"{path} (converted with {cfg.converter!r})")
    else:
        _load_weights(model, path)


def _snapshot(repo_id: str, cache_dir: str | Path | None, local_files_only: bool = False) -> Path:
    """The ``config.json`` + safetensors of a saved-folder Hub repo."""
    return hub_snapshot(repo_id, [CONFIG_NAME, "*.safetensors"], cache_dir, local_files_only=local_files_only)


def _build(arch: str, pretrained: bool, kwargs: dict[str, Any], cfg: PretrainedCfg) -> nn.Module:
    model = model_entrypoint(arch)(pretrained=pretrained, **kwargs)
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
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name (timm's ``create_model``).

    Args:
        model_name: ``arch``, ``arch.tag``, ``local-dir:/saved/folder`` or ``hf-hub:org/repo``; a saved
            folder is built from its ``config.json`` (``kwargs`` override its ``model_args``) and its
            ``model.safetensors`` is always loaded (``pretrained`` is not needed).
        pretrained: load the card's weights (``file``, ``hf_hub_id`` via ``huggingface_hub``, or ``url``),
            sha256-checked before loading and converted first when the card's format is not mome's.
        pretrained_cfg_overlay: card fields to override, e.g. ``dict(file="w.safetensors")``.
        checkpoint_path: a ``.safetensors`` or torch checkpoint loaded exactly after construction.
        cache_dir: the Hugging Face cache to use (URL downloads go under it too).
        local_files_only: never download; use only what is cached.
        **kwargs: passed to the entrypoint; those set to None are dropped (so a CLI can pass them).
            They override the card's ``model_kwargs``, which apply when the tag is named or
            ``pretrained`` is set (a bare ``arch`` keeps the entrypoint's defaults).

    The model gets ``pretrained_cfg`` (unless the entrypoint set one), ``mome_model_name`` and
    ``mome_model_args`` (what :func:`save_pretrained` writes).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source, name = parse_model_name(model_name)
    if source is None:
        cfg = _lookup_cfg(name)
        cfg = cfg.replace(**(pretrained_cfg_overlay or {}))
        arch, tag = split_model_name_tag(name)
        # a named tag (or pretrained weights) means that checkpoint's model: its card's kwargs apply
        card_kwargs = cfg.model_kwargs if (tag or pretrained) else {}
        model = _build(arch, pretrained, {**card_kwargs, **kwargs}, cfg)
        if pretrained:
            _load_pretrained(model, cfg, name, cache_dir, local_files_only)
    else:
        folder = Path(name).expanduser() if source == "local-dir" else _snapshot(name, cache_dir, local_files_only)
        config_path = folder / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{model_name}: no {CONFIG_NAME} in {folder}")
        config = json.loads(config_path.read_text())
        if "architecture" not in config:
            raise ValueError(f"{config_path} names no 'architecture'")
        arch = split_model_name_tag(config["architecture"])[0]
        cfg = PretrainedCfg.from_dict({**config.get("pretrained_cfg", {}), **(pretrained_cfg_overlay or {})})
        model = _build(arch, False, {**config.get("model_args", {}), **kwargs}, cfg.replace(architecture=arch))
        _load_weights(model, folder / WEIGHTS_NAME)
    if checkpoint_path is not None:
        _load_weights(model, checkpoint_path)
    return model


def _tokenizer_files(cfg: PretrainedCfg, folder: Path) -> list[str]:
    """Save the model's Hugging Face tokenizer into ``folder`` if it is at hand; returns the files written.

    Hub and built-in (``mome:``) tokenizers are Hugging Face tokenizers and are saved; open_clip's
    ship inside open_clip (nothing to write). A Hub tokenizer missing from the local cache is skipped
    with a warning: the folder still loads, ``mome.get_tokenizer`` then needs the cache.
    """
    if not cfg.tokenizer or cfg.tokenizer.startswith("open_clip:"):
        return []
    from ._tokenizer import create_tokenizer

    try:
        tokenizer = create_tokenizer(cfg.tokenizer)
    except PretrainedUnavailableError as err:
        warnings.warn(f"save_pretrained: tokenizer files not written: {err}", UserWarning, stacklevel=3)
        return []
    hf_tokenizer = getattr(tokenizer, "tokenizer", None)
    if not hasattr(hf_tokenizer, "save_pretrained"):
        return []
    before = {p.name for p in folder.iterdir()}
    hf_tokenizer.save_pretrained(str(folder))
    return sorted(p.name for p in folder.iterdir() if p.name not in before)


def _results_table(results: Mapping[str, Any]) -> list[str]:
    """``results`` (benchmark -> metric -> value, or benchmark -> value) as Markdown table rows."""
    rows = ["| benchmark | metric | value |", "|---|---|---|"]
    for bench, value in results.items():
        metrics = value if isinstance(value, Mapping) else {"": value}
        rows += [f"| {bench} | {metric} | {number} |" for metric, number in metrics.items()]
    return rows


def model_card(arch: str, args: Mapping[str, Any], cfg: PretrainedCfg, repo_id: str | None = None) -> str:
    """The ``README.md`` of a saved folder: Hub front-matter, architecture, how to load, results, source."""
    import yaml

    family = _model_to_module.get(arch, "").lstrip("_")
    meta: dict[str, Any] = {"library_name": "mome"}
    if cfg.license:
        meta["license"] = cfg.license
    meta["tags"] = ["mome", "mixture-of-experts", *([family] if family else [])]
    name = f"{arch}.{cfg.tag}" if cfg.tag else arch
    load = f"hf-hub:{repo_id}" if repo_id else "local-dir:/path/to/this/folder"
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {name}", ""]
    if cfg.paper_name:
        lines += [
            f"Paper: {cfg.paper_name}" + (f" ({', '.join(_to_list(cfg.paper_ids))})" if cfg.paper_ids else ""),
            "",
        ]
    lines += ["## Architecture", "", f"`{arch}`, built by `mome.create_model` with:", "", "```json"]
    lines += [json.dumps(dict(args), indent=2, sort_keys=True), "```", ""]
    data = {k: cfg.get(k) for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "tokenizer")}
    data = {k: v for k, v in data.items() if v is not None}
    if data:
        lines += ["Preprocessing: " + ", ".join(f"{k}={v}" for k, v in data.items()), ""]
    lines += ["## How to load", "", "```python", "import mome", "", f'model = mome.create_model("{load}")']
    if cfg.tokenizer:
        lines.append(f'tokenizer = mome.get_tokenizer("{load}")')
    lines += ["```", ""]
    if cfg.results:
        lines += [
            "## Results",
            "",
            "Reported by the upstream authors for these weights:",
            "",
            *_results_table(cfg.results),
        ]
        lines.append("")
    source = cfg.url or (f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else None)
    if source or cfg.notes:
        lines += ["## Source", ""]
        if source:
            lines.append(f"Converted from {source} ({cfg.source_format} format).")
        if cfg.notes:
            lines.append(cfg.notes.strip())
        lines.append("")
    return "\n".join(lines)


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write a saved folder, readable by ``create_model("local-dir:...")`` and ``"hf-hub:..."``.

    The folder holds ``config.json`` (``architecture``, ``model_args``, ``pretrained_cfg`` and the list
    of ``files`` written), ``model.safetensors``, the tokenizer files when the model's tokenizer is a
    Hugging Face one at hand, and a ``README.md`` model card (``repo_id`` is the Hub repo it names).
    ``model_name``/``model_args`` default to what :func:`create_model` recorded on the model. The
    folder is written next to ``directory`` and swapped into place (:mod:`mome._folders`), so the target
    holds a complete save, the earlier or the new one; an existing folder is replaced only if it holds
    nothing but files an earlier save wrote. Hidden leftovers of saves killed earlier are removed.
    """
    from safetensors import torch as st

    arch = split_model_name_tag(model_name or getattr(model, "mome_model_name", None) or "")[0]
    if not arch:
        raise ValueError("save_pretrained: the model was not built by mome.create_model; pass model_name=")
    if not is_model(arch):
        raise UnknownModelError(f"save_pretrained: unknown model {arch!r}{_close_matches(arch)}")
    args = dict(model_args if model_args is not None else getattr(model, "mome_model_args", {}))
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"save_pretrained: model_args[{key!r}] = {value!r} is not JSON-serialisable; pass model_args= "
                "with a JSON form the entrypoint accepts"
            ) from err
    cfg = getattr(model, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, PretrainedCfg) else PretrainedCfg()
    cfg = cfg.replace(architecture=arch)

    directory = Path(directory).expanduser()
    if directory.exists():
        ours = {CONFIG_NAME, WEIGHTS_NAME}
        try:
            ours |= set(json.loads((directory / CONFIG_NAME).read_text()).get(_MANIFEST_KEY, []))
        except (OSError, ValueError, AttributeError):
            pass
        extra = sorted(p.name for p in directory.iterdir() if p.name not in ours)
        if extra:
            raise FileExistsError(f"{directory} exists and holds other files ({extra}); not replacing it")
    remove_stale_siblings(directory)  # what earlier saves killed mid-way left behind
    tmp = hidden_sibling(directory)
    try:
        st.save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        files = [WEIGHTS_NAME, *_tokenizer_files(cfg, tmp), _README_NAME, CONFIG_NAME]
        (tmp / _README_NAME).write_text(model_card(arch, args, cfg, repo_id))
        config = {"architecture": arch, "model_args": args, "pretrained_cfg": cfg.to_dict(), _MANIFEST_KEY: files}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload mome model",
    create_pr: bool = False,
) -> str:
    """Save ``model`` (:func:`save_pretrained`) and upload the folder to the Hub repo ``repo_id``.

    The repo is created if missing (``private`` as given). Returns the commit URL. The uploaded repo
    loads with ``mome.create_model("hf-hub:<repo_id>")``.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mome-push-") as tmp:
        folder = save_pretrained(
            model, Path(tmp) / "model", model_name=model_name, model_args=model_args, repo_id=repo_id
        )
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )
    return str(getattr(commit, "commit_url", commit))
