"""The schema of checkpoint cards (``zoo/<arch>.<tag>.yaml``) and reading them.

A card is data only: one YAML mapping per ``arch.tag`` whose keys are the fields of
:class:`mome.PretrainedCfg` (plus ``default: true`` for the arch's default tag), checked by
:data:`CARD_SCHEMA`. Its ``source_format`` and ``converter`` must be names of the one table of
formats and converters (:mod:`mome._formats`). The registry reads the cards through
:func:`read_cards`; :mod:`mome.zoo` is the public face (and the ``python -m mome.zoo`` command line).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import CardError
from ._formats import CONVERTERS as CONVERTER_TABLE
from ._formats import FORMATS
from ._hub import SHA256_PATTERN
from ._pretrained import TRANSFORMERS_FORMAT, PretrainedCfg

__all__ = [
    "CARD_SCHEMA",
    "CARD_SUFFIX",
    "CONVERTERS",
    "SOURCE_FORMATS",
    "PREPROCESSING_FIELDS",
    "FieldSpec",
    "read_card",
    "read_cards",
    "validate_card",
]

#: Upstream checkpoint formats a card may name (the table of :mod:`mome._formats`).
SOURCE_FORMATS = tuple(FORMATS)
#: Converters a card may name (the table of :mod:`mome._formats`).
CONVERTERS = tuple(CONVERTER_TABLE)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_TAG = re.compile(r"[a-z0-9][a-z0-9_]*")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
#: a Hub revision: a 40-hex commit (a pin) or a branch / tag name (``main``, ``refs/pr/3``), which follows the repo
_REVISION = re.compile(r"[0-9a-f]{40}|[A-Za-z0-9][\w.\-]*(/[\w.\-]+)*")
#: the evaluation-preprocessing fields; a transformers-format card may leave them out (its processor holds them)
PREPROCESSING_FIELDS = ("input_size", "mean", "std", "interpolation", "crop_pct")
CARD_SUFFIX = ".yaml"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _triple(positive_int: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, list) and len(value) == 3
        ok = ok and all(
            (isinstance(v, int) and not isinstance(v, bool) and v > 0) if positive_int else _is_number(v) for v in value
        )
        return None if ok else f"must be a list of 3 {'positive integers' if positive_int else 'numbers'}"

    return check


def _one_of(choices: Sequence[str]) -> Callable[[Any], str | None]:
    return lambda value: None if value in choices else f"must be one of {list(choices)}, not {value!r}"


def _pattern(regex: re.Pattern, what: str) -> Callable[[Any], str | None]:
    return lambda value: None if regex.fullmatch(value) else f"{value!r} is not {what}"


def _url(value: str) -> str | None:
    return None if re.fullmatch(r"https?://[^\s/]+/\S+", value) else f"{value!r} is not an http(s) URL to a file"


def _crop(value: float) -> str | None:
    return None if _is_number(value) and 0 < value <= 1 else f"must be in (0, 1], not {value!r}"


def _paper_ids(value: Any) -> str | None:
    ok = isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
    return None if ok else "must be a string or a non-empty list of strings"


def _results(value: Mapping) -> str | None:
    for bench, metrics in value.items():
        if not isinstance(bench, str):
            return f"benchmark names must be strings, not {bench!r}"
        if _is_number(metrics):
            continue
        if not isinstance(metrics, Mapping) or not metrics:
            return f"{bench!r} must map metric names to numbers"
        bad = [m for m, v in metrics.items() if not isinstance(m, str) or not _is_number(v)]
        if bad:
            return f"{bench!r}: metric(s) {bad} must be named by strings and be numbers"
    return None


def _companions(value: Mapping) -> str | None:
    bad = [f"{k}: {v}" for k, v in value.items() if not isinstance(k, str) or "/" in k or not k or k.startswith(".")]
    bad += [f"{k}: {v}" for k, v in value.items() if not isinstance(v, str) or not _HUB_ID.fullmatch(v)]
    return f"entries {bad} are not 'folder name: org/name'" if bad else None


def _kwargs(value: Mapping) -> str | None:
    bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
    return f"keys {bad} are not keyword names" if bad else None


@dataclass(frozen=True)
class FieldSpec:
    """One card field: accepted YAML types, whether it is required, an extra check, what it means."""

    types: tuple[type, ...]
    doc: str
    required: bool = False
    check: Callable[[Any], str | None] | None = None


_STR, _NUM = (str,), (int, float)
#: The card schema: every :class:`mome.PretrainedCfg` field, plus ``default``.
CARD_SCHEMA: dict[str, FieldSpec] = {
    "architecture": FieldSpec(_STR, "registered entrypoint name (mome.list_models())", True),
    "tag": FieldSpec(_STR, "weights name: pretraining data, recipe, fine-tune", True, _pattern(_TAG, "snake_case")),
    "default": FieldSpec((bool,), "the arch's default tag"),
    "hf_hub_id": FieldSpec(_STR, "Hugging Face Hub repo id", check=_pattern(_HUB_ID, "an 'org/name' repo id")),
    "hf_hub_filename": FieldSpec(_STR, "file in the repo; omitted for a foreign whole-repo checkpoint"),
    "revision": FieldSpec(
        _STR,
        "Hub revision of hf_hub_id: a 40-hex commit pins it; a branch name (main) follows the repo",
        check=_pattern(_REVISION, "a 40-hex commit or a branch / tag name"),
    ),
    "hf_hub_companions": FieldSpec(
        (dict,),
        "other Hub repos the checkpoint is read with, {folder name: 'org/name'}, laid out beside hf_hub_id's folder",
        check=_companions,
    ),
    "url": FieldSpec(_STR, "plain URL or GitHub release asset", check=_url),
    "file": FieldSpec(_STR, "local file (relative to the card's folder)"),
    "sha256": FieldSpec(
        _STR,
        "sha256 of the file, 64 lower-case hex; null when unknown",
        check=_pattern(SHA256_PATTERN, "64 lower-case hex digits"),
    ),
    "source_format": FieldSpec(_STR, "upstream checkpoint format", True, _one_of(SOURCE_FORMATS)),
    "converter": FieldSpec(_STR, "mome.convert converter for a foreign format", check=_one_of(CONVERTERS + ("mome",))),
    "converter_options": FieldSpec((dict,), "keyword options of the converter (e.g. ignore_prefixes)", check=_kwargs),
    "input_size": FieldSpec((list,), "[channels, height, width]", True, _triple(True)),
    "mean": FieldSpec((list,), "per-channel normalisation mean", True, _triple(False)),
    "std": FieldSpec((list,), "per-channel normalisation std", True, _triple(False)),
    "interpolation": FieldSpec(_STR, "resize interpolation", True, _one_of(INTERPOLATIONS)),
    "crop_pct": FieldSpec(_NUM, "centre-crop fraction at evaluation", True, _crop),
    "num_classes": FieldSpec((int,), "classifier outputs"),
    "context_length": FieldSpec((int,), "text tokens"),
    "tokenizer": FieldSpec(_STR, "'open_clip:<name>' or 'hf-hub:<repo id>'"),
    "license": FieldSpec(_STR, "license of the weights (SPDX id or 'other', see notes)", True),
    "paper_ids": FieldSpec((str, list), "arXiv ids", check=_paper_ids),
    "paper_name": FieldSpec(_STR, "paper title"),
    "notes": FieldSpec(_STR, "provenance and caveats"),
    "origin_url": FieldSpec(_STR, "where the checkpoint is documented", check=_url),
    "results": FieldSpec((dict,), "paper numbers: benchmark -> {metric: value}", check=_results),
    "model_kwargs": FieldSpec((dict,), "entrypoint kwargs these weights need", check=_kwargs),
}


def validate_card(data: Any, path: str | Path | None = None) -> list[CardError]:
    """All schema problems of one card (a parsed YAML mapping); an empty list when it is valid."""
    if not isinstance(data, Mapping):
        return [CardError(path, None, f"a card is a YAML mapping, not a {type(data).__name__}")]
    errors = [CardError(path, k, "unknown field") for k in data if k not in CARD_SCHEMA]
    processor_holds = data.get("source_format") == TRANSFORMERS_FORMAT  # the repo's processor preprocesses
    for key, spec in CARD_SCHEMA.items():
        value = data.get(key)
        if value is None:
            if spec.required and not (processor_holds and key in PREPROCESSING_FIELDS):
                errors.append(CardError(path, key, "is required"))
            continue
        is_bool = isinstance(value, bool) and bool not in spec.types
        if is_bool or not isinstance(value, spec.types):
            names = "/".join(t.__name__ for t in spec.types)
            errors.append(CardError(path, key, f"must be {names}, not {type(value).__name__} {value!r}"))
        elif spec.check and (problem := spec.check(value)):
            errors.append(CardError(path, key, problem))
    if errors:
        return errors
    if not (data.get("hf_hub_id") or data.get("url") or data.get("file")):
        errors.append(CardError(path, "hf_hub_id", "the card names no weight source (hf_hub_id, url or file)"))
    if data.get("hf_hub_filename") and not data.get("hf_hub_id"):
        errors.append(CardError(path, "hf_hub_filename", "needs hf_hub_id"))
    native = data["source_format"] == "mome"
    if native and data.get("converter") not in (None, "mome"):
        errors.append(CardError(path, "converter", "a 'mome' format card needs no converter"))
    if data.get("revision") and not data.get("hf_hub_id"):
        errors.append(CardError(path, "revision", "needs hf_hub_id"))
    if data.get("hf_hub_companions") and (not data.get("hf_hub_id") or data.get("hf_hub_filename")):
        errors.append(CardError(path, "hf_hub_companions", "needs a whole-repo hf_hub_id (no hf_hub_filename)"))
    if processor_holds:
        if data.get("converter") is not None:
            errors.append(CardError(path, "converter", "a 'transformers' card needs none (from_pretrained reads it)"))
        if data.get("url") or data.get("hf_hub_filename"):
            errors.append(CardError(path, "hf_hub_id", "a 'transformers' card names a whole repo (hf_hub_id or file)"))
        native = True  # no converter to require below
    if not native and data.get("converter") in (None, "mome"):
        errors.append(CardError(path, "converter", f"the {data['source_format']!r} format needs one of {CONVERTERS}"))
    whole_repo = data.get("hf_hub_id") and not data.get("hf_hub_filename") and data["source_format"] != "mome"
    if whole_repo and data.get("sha256"):
        errors.append(CardError(path, "sha256", "a whole-repo checkpoint (no hf_hub_filename) has no single sha256"))
    if data.get("file") and path is not None:
        file = Path(path).parent / Path(data["file"]).expanduser()
        if not file.exists():
            errors.append(CardError(path, "file", f"{file} does not exist"))
    if path is not None and Path(path).name != f"{data['architecture']}.{data['tag']}{CARD_SUFFIX}":
        expected = f"{data['architecture']}.{data['tag']}{CARD_SUFFIX}"
        errors.append(CardError(path, None, f"a card file is named after its arch.tag: {expected}"))
    return errors


def read_card(path: str | Path) -> tuple[str, PretrainedCfg, bool]:
    """Parse and validate one card file: ``(arch.tag, cfg, is_default)``; raises :class:`CardError`."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CardError(path, None, f"not valid YAML: {err}") from err
    errors = validate_card(data, path)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        problems = [e.problem if e.field is None else f"field {e.field!r}: {e.problem}" for e in errors]
        raise CardError(path, None, "; ".join(problems))
    values = {k: v for k, v in data.items() if k != "default" and v is not None}
    if values.get("file"):
        values["file"] = str((path.parent / Path(values["file"]).expanduser()).resolve())
    cfg = PretrainedCfg.from_dict(values)
    return f"{cfg.architecture}.{cfg.tag}", cfg, bool(data.get("default", False))


def read_cards(folder: str | Path) -> dict[str, tuple[PretrainedCfg, bool]]:
    """The cards (``*.yaml``) of a folder, by ``arch.tag``, validated; raises :class:`CardError`."""
    cards: dict[str, tuple[PretrainedCfg, bool]] = {}
    defaults: dict[str, str] = {}
    for path in sorted(Path(folder).glob(f"*{CARD_SUFFIX}")):
        name, cfg, default = read_card(path)
        if default:
            arch = cfg.architecture or ""
            if arch in defaults:
                raise CardError(path, "default", f"{defaults[arch]} is already the default of {arch}")
            defaults[arch] = name
        cards[name] = (cfg, default)
    return cards
