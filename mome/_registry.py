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
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
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

__all__ = [
    "CheckpointMismatchError",
    "PretrainedCfg",
    "PretrainedUnavailableError",
    "UnknownModelError",
    "create_model",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "list_pretrained",
    "model_entrypoint",
    "parse_model_name",
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


class UnknownModelError(ValueError):
    """A model name, or a tag of it, that the registry does not know."""


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not match the model exactly."""


class PretrainedUnavailableError(RuntimeError):
    """Pretrained weights that cannot be fetched or loaded here (offline, not converted, ...)."""


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
    results: dict[str, Any] = field(default_factory=dict)
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
    tags = _tags.setdefault(arch, [])
    if tag in tags:
        warnings.warn(f"overwriting the pretrained cfg {arch}.{tag}", UserWarning, stacklevel=3)
        if is_default:
            tags.remove(tag)
    if tag not in tags:
        tags.insert(0 if is_default else len(tags), tag)
    _cfgs[f"{arch}.{tag}"] = stored = _as_cfg(cfg, arch, tag)
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str | None, *, delete: bool) -> None:
    if expected is None:
        return
    actual = _sha256(path)
    if actual != expected.lower():
        if delete:  # a corrupt download: drop it from the cache (and the blob a Hub snapshot links to)
            target = path.resolve()
            path.unlink(missing_ok=True)
            target.unlink(missing_ok=True)
        raise ValueError(
            f"{path}: sha256 {actual} does not match the expected {expected}"
            + ("; the file was deleted, try again" if delete else "")
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (``state_dict``/``model`` key, ``module.`` prefix)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path}: refused by torch.load(weights_only=True) (it is not a plain tensor checkpoint): {err}"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: non-tensor entries {bad[:20]} in the state dict")
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


def _load_weights(model: nn.Module, path: str | Path) -> None:
    """Load ``path`` into ``model`` exactly, or raise :class:`CheckpointMismatchError` leaving it unchanged."""
    path = Path(path)
    state = _read_state_dict(path)
    model_state = model.state_dict()
    _fill_tied(model_state, state)
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{path} does not match {type(model).__name__} exactly:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if keys:
                more = f" (+{len(keys) - 20} more)" if len(keys) > 20 else ""
                lines.append(f"  {len(keys)} {label} key(s): {', '.join(keys[:20])}{more}")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def _unavailable(what: str, err: Exception | None = None, hint: str = _CHECKPOINT_HINT) -> PretrainedUnavailableError:
    return PretrainedUnavailableError(what + hint + (f" ({type(err).__name__}: {err})" if err else ""))


def _hub_download(repo_id: str, filename: str, cache_dir: str | Path | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache_dir))
    except (OSError, EntryNotFoundError) as err:
        raise _unavailable(
            f"could not fetch {filename} from the Hugging Face Hub repo {repo_id} (offline or not found); "
            f"pre-fetch it where there is network with `hf download {repo_id} {filename}` into the same cache",
            err,
        ) from err


def _load_pretrained(model: nn.Module, cfg: PretrainedCfg, name: str, cache_dir: str | Path | None) -> None:
    """Load a card's weights: ``file``, then ``hf_hub_id`` (timm's order); ``url`` and conversions come with the zoo."""
    if not cfg.has_weights():
        raise ValueError(f"{name} has no pretrained weights (mome.list_pretrained() lists those that do)")
    if cfg.needs_conversion():
        raise _unavailable(
            f"{name}: its weights are in the {cfg.source_format!r} format (converter {cfg.converter!r}); "
            "downloading and converting them comes with the zoo loader"
        )
    if cfg.file:
        path = Path(cfg.file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{name}: pretrained file {path} does not exist")
        _check_sha256(path, cfg.sha256, delete=False)
    elif cfg.hf_hub_id:
        path = _hub_download(cfg.hf_hub_id, cfg.hf_hub_filename or WEIGHTS_NAME, cache_dir)
        _check_sha256(path, cfg.sha256, delete=True)
    else:
        raise _unavailable(f"{name}: downloading from a URL ({cfg.url}) comes with the zoo loader")
    _load_weights(model, path)


def _snapshot(repo_id: str, cache_dir: str | Path | None) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, allow_patterns=[CONFIG_NAME, "*.safetensors"], cache_dir=cache_dir
            )
        )
    except (OSError, EntryNotFoundError) as err:
        raise _unavailable(
            f"could not fetch the Hugging Face Hub repo {repo_id} (offline or not found); pre-fetch it where "
            f"there is network with `hf download {repo_id}` into the same cache",
            err,
            hint="",
        ) from err


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
    **kwargs: Any,
) -> nn.Module:
    """Build a model by name (timm's ``create_model``).

    Args:
        model_name: ``arch``, ``arch.tag``, ``local-dir:/saved/folder`` or ``hf-hub:org/repo``; a saved
            folder is built from its ``config.json`` (``kwargs`` override its ``model_args``) and its
            ``model.safetensors`` is always loaded (``pretrained`` is not needed).
        pretrained: load the card's weights (``file``, or ``hf_hub_id`` via ``huggingface_hub``).
        pretrained_cfg_overlay: card fields to override, e.g. ``dict(file="w.safetensors")``.
        checkpoint_path: a ``.safetensors`` or torch checkpoint loaded exactly after construction.
        cache_dir: the Hugging Face cache to use.
        **kwargs: passed to the entrypoint; those set to None are dropped (so a CLI can pass them).

    The model gets ``pretrained_cfg`` (unless the entrypoint set one), ``mome_model_name`` and
    ``mome_model_args`` (what :func:`save_pretrained` writes).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    source, name = parse_model_name(model_name)
    if source is None:
        cfg = _lookup_cfg(name)
        cfg = cfg.replace(**(pretrained_cfg_overlay or {}))
        model = _build(split_model_name_tag(name)[0], pretrained, kwargs, cfg)
        if pretrained:
            _load_pretrained(model, cfg, name, cache_dir)
    else:
        folder = Path(name).expanduser() if source == "local-dir" else _snapshot(name, cache_dir)
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


def save_pretrained(
    model: nn.Module,
    directory: str | Path,
    *,
    model_name: str | None = None,
    model_args: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``directory``, readable by ``create_model("local-dir:...")``.

    ``model_name``/``model_args`` default to what :func:`create_model` recorded on the model. The
    folder is written next to ``directory`` and renamed into place, so it is complete or absent; an
    existing folder is replaced only if it holds nothing but those two files.
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
    config = {"architecture": arch, "model_args": args, "pretrained_cfg": cfg.replace(architecture=arch).to_dict()}

    directory = Path(directory).expanduser()
    if directory.exists():
        extra = sorted(p.name for p in directory.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME))
        if extra:
            raise FileExistsError(f"{directory} exists and holds other files ({extra}); not replacing it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        st.save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if directory.exists():
            old = tmp.with_suffix(".old")
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
