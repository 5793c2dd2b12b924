"""The registry of model names and checkpoint cards, in timm's API shapes (``timm.models._registry``).

A model is named ``arch.tag``: ``arch`` is a registered entrypoint function
``fn(pretrained: bool = False, **kwargs) -> nn.Module`` and ``tag`` names one set of weights (a
:class:`~mome.PretrainedCfg`, the "card"). Omitting the tag means the arch's default tag: the one whose
key ends in ``*``, else the first registered. Building models and loading weights is the factory's job
(:mod:`mome._factory`); this module only knows names.

Families register lazily where their dependencies are heavy: :func:`register_lazy_family` names a
module and the fnmatch pattern of the archs it registers, and the module is imported the first time a
name it could own is looked up (``is_model``, ``create_model``, ``get_pretrained_cfg``) or anything is
listed (``list_models``, ``list_pretrained``). So ``import mome`` does not import transformers, which
only MoE-LLaVA needs.

The checkpoint cards of the zoo (``zoo/*.yaml``, schema in :mod:`mome._cards`) are read on the first
lookup that needs cards, with those of the folders in ``MOME_ZOO_PATH`` (``os.pathsep``-separated)
and of :func:`add_zoo_dir`; a card waits until its arch is registered.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ._cards import read_cards
from ._errors import CardError, InvalidArgumentError, UnknownModelError
from ._pretrained import PretrainedCfg
from ._resources import zoo_dir

__all__ = [
    "add_zoo_dir",
    "get_pretrained_cfg",
    "is_model",
    "list_models",
    "list_pretrained",
    "model_entrypoint",
    "model_module",
    "register_lazy_family",
    "register_model",
    "register_pretrained_cfg",
    "split_model_name_tag",
]

_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_model_to_module: dict[str, str] = {}
_tags: dict[str, list[str]] = {}  # arch -> its tags, the default first
_cfgs: dict[str, PretrainedCfg] = {}  # "arch.tag" -> card
_lazy_families: dict[str, tuple[str, ...]] = {}  # module not imported yet -> fnmatch patterns of its archs
_zoo_loaded = False
_zoo_pending: dict[str, tuple[PretrainedCfg, bool]] = {}  # "arch.tag" -> (card, is default) of unregistered archs


def register_lazy_family(module: str, pattern: str | Iterable[str]) -> None:
    """Import ``module`` (which registers its models) only when a name matching ``pattern`` is looked up.

    ``pattern`` is an fnmatch pattern of the archs the module registers (``"moe_llava_*"``), or several;
    listing models imports every lazy family. A family already imported is not registered again.
    """
    import sys

    if module not in sys.modules:
        _lazy_families[module] = (pattern,) if isinstance(pattern, str) else tuple(pattern)


def _import_families(arch: str | None = None, modules: Iterable[str] = ()) -> None:
    """Import the lazy families that could register ``arch``, or those of ``modules`` (last part of the
    module name), or all of them when neither is given."""
    modules = set(modules)
    for module, patterns in list(_lazy_families.items()):
        if arch is not None:
            wanted = any(fnmatch.fnmatchcase(arch, pattern) for pattern in patterns)
        else:
            wanted = not modules or module.rsplit(".", 1)[-1] in modules
        if wanted:
            del _lazy_families[module]  # first: an import error is raised once, not on every lookup
            importlib.import_module(module)
            if _zoo_pending:
                _register_pending()


def split_model_name_tag(model_name: str, no_tag: str = "") -> tuple[str, str]:
    """``'vmoe_b16_e8.jft_ft_in1k'`` -> ``('vmoe_b16_e8', 'jft_ft_in1k')``, split on the first ``.``."""
    arch, _, tag = model_name.partition(".")
    return arch, tag or no_tag


def _natural_key(name: str) -> list[int | str]:
    """Sort key putting ``x2`` before ``x10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _close_matches(name: str) -> str:
    _import_families()
    candidates = list(_entrypoints) + list(_cfgs)
    matches = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(matches)}?" if matches else "; see mome.list_models()"


def _as_cfg(cfg: PretrainedCfg | Mapping[str, Any], arch: str, tag: str) -> PretrainedCfg:
    cfg = cfg if isinstance(cfg, PretrainedCfg) else PretrainedCfg.from_dict(cfg)
    if cfg.architecture not in (None, arch):
        raise CardError(None, "architecture", f"card {arch}.{tag} says architecture={cfg.architecture!r}")
    return cfg.replace(architecture=arch, tag=tag)


def _add_cfg(arch: str, tag: str, cfg: PretrainedCfg | Mapping[str, Any]) -> PretrainedCfg:
    is_default = tag.endswith("*")
    tag = tag.rstrip("*")
    if not tag:
        raise InvalidArgumentError("tag", "a non-empty pretrained tag", tag, arch)
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
        raise InvalidArgumentError("pretrained_cfgs", "at most one default tag (ending in '*')", list(cfgs), arch)
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
        raise InvalidArgumentError("model_name", "a card name 'arch.tag'", model_name)
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
        extra = [p for p in os.environ.get("MOME_ZOO_PATH", "").split(os.pathsep) if p]
        for folder in [zoo_dir(), *extra]:
            _read_zoo_dir(Path(folder))  # a broken card raises here, and again on the next lookup
        _zoo_loaded = True
    if _zoo_pending:
        _register_pending()


def _read_zoo_dir(folder: Path) -> list[str]:
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
    include, exclude, modules = _to_list(filter), _to_list(exclude_filters), _to_list(module)
    _import_families(modules=modules)
    _ensure_zoo()
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
    arch = split_model_name_tag(model_name)[0]
    if arch not in _entrypoints:
        _import_families(arch)
    return arch in _entrypoints


def model_entrypoint(model_name: str) -> Callable[..., nn.Module]:
    """The entrypoint function of ``model_name`` (tag ignored)."""
    arch = split_model_name_tag(model_name)[0]
    if not is_model(arch):
        raise UnknownModelError(f"unknown model {model_name!r}{_close_matches(model_name)}")
    return _entrypoints[arch]


def _lookup_cfg(model_name: str) -> PretrainedCfg:
    arch, tag = split_model_name_tag(model_name)
    registered = is_model(arch)  # imports the lazy family that may own it
    _ensure_zoo()
    if not registered:
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


def model_module(model_name: str) -> str:
    """The family (last part of the module name, e.g. ``"vmoe"``) that registered ``model_name``'s arch."""
    model_entrypoint(model_name)
    return _model_to_module[split_model_name_tag(model_name)[0]]
