"""The zoo: checkpoint cards (``zoo/<arch>.<tag>.yaml``), their schema, and ``python -m mome.zoo``.

A card is data only: one YAML mapping per ``arch.tag`` whose keys are the fields of
:class:`mome.PretrainedCfg` (plus ``default: true`` for the arch's default tag), checked by
:data:`CARD_SCHEMA`. The registry reads the cards of ``mome.zoo_dir()`` (and ``MOME_ZOO_PATH``,
:func:`mome._registry.add_zoo_dir`) on first use, so ``mome.list_pretrained()`` and
``mome.create_model("arch.tag", pretrained=True)`` see them.

Command line::

    python -m mome.zoo list [FILTER]          # cards with weights, fnmatch filter
    python -m mome.zoo show NAME              # the card as YAML
    python -m mome.zoo download NAME          # fetch into the cache, sha256-checked (pre-fetch for offline use)
    python -m mome.zoo convert NAME --out DIR # fetch, convert, write a mome folder (save_pretrained)
    python -m mome.zoo verify NAME            # sha256 of the cached file against the card

Errors end the command with exit status 1 and one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._download import (
    SHA256_PATTERN,
    ChecksumMismatchError,
    PretrainedUnavailableError,
    sha256_file,
    url_cache_path,
)
from ._registry import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    PretrainedCfg,
    UnknownModelError,
    UnsafeCheckpointError,
    _lookup_cfg,
    create_model,
    fetch_pretrained,
    list_pretrained,
    save_pretrained,
)

__all__ = [
    "CARD_SCHEMA",
    "CONVERTERS",
    "SOURCE_FORMATS",
    "CardError",
    "FieldSpec",
    "cached_checkpoint",
    "main",
    "read_card",
    "read_cards",
    "validate_card",
]

#: Upstream checkpoint formats a card may name (``mome``: a saved-folder ``model.safetensors``).
SOURCE_FORMATS = ("mome", "unilm_vlmo", "vmoe", "timm", "open_clip", "moe_llava")
#: Converters of ``mome.convert`` (``load_converted(path, source_format, converter, model)``).
CONVERTERS = ("unilm_vlmo", "vmoe", "timm_vit", "open_clip", "moe_llava")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
_TAG = re.compile(r"[a-z0-9][a-z0-9_]*")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
_CARD_SUFFIX = ".yaml"


class CardError(ValueError):
    """A card that breaks :data:`CARD_SCHEMA`; names the file (``path``) and the ``field``."""

    def __init__(self, path: str | Path | None, field: str | None, problem: str) -> None:
        self.path, self.field, self.problem = path, field, problem
        where = f"{path}: " if path else ""
        super().__init__(f"{where}field {field!r}: {problem}" if field else f"{where}{problem}")


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
    "url": FieldSpec(_STR, "plain URL or GitHub release asset", check=_url),
    "file": FieldSpec(_STR, "local file (relative to the card's folder)"),
    "sha256": FieldSpec(
        _STR,
        "sha256 of the file, 64 lower-case hex; null when unknown",
        check=_pattern(SHA256_PATTERN, "64 lower-case hex digits"),
    ),
    "source_format": FieldSpec(_STR, "upstream checkpoint format", True, _one_of(SOURCE_FORMATS)),
    "converter": FieldSpec(_STR, "mome.convert converter for a foreign format", check=_one_of(CONVERTERS + ("mome",))),
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
    for key, spec in CARD_SCHEMA.items():
        value = data.get(key)
        if value is None:
            if spec.required:
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
    if not native and data.get("converter") in (None, "mome"):
        errors.append(CardError(path, "converter", f"the {data['source_format']!r} format needs one of {CONVERTERS}"))
    if data.get("hf_hub_id") and not data.get("hf_hub_filename") and not native and data.get("sha256"):
        errors.append(CardError(path, "sha256", "a whole-repo checkpoint (no hf_hub_filename) has no single sha256"))
    if data.get("file") and path is not None:
        file = Path(path).parent / Path(data["file"]).expanduser()
        if not file.exists():
            errors.append(CardError(path, "file", f"{file} does not exist"))
    if path is not None and Path(path).name != f"{data['architecture']}.{data['tag']}{_CARD_SUFFIX}":
        expected = f"{data['architecture']}.{data['tag']}{_CARD_SUFFIX}"
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
    for path in sorted(Path(folder).glob(f"*{_CARD_SUFFIX}")):
        name, cfg, default = read_card(path)
        if default:
            arch = cfg.architecture or ""
            if arch in defaults:
                raise CardError(path, "default", f"{defaults[arch]} is already the default of {arch}")
            defaults[arch] = name
        cards[name] = (cfg, default)
    return cards


def cached_checkpoint(cfg: PretrainedCfg, cache_dir: str | Path | None = None) -> Path | None:
    """Where the card's checkpoint file sits in the cache (or its ``file``), without downloading; None if absent."""
    if cfg.file:
        path = Path(cfg.file).expanduser()
        return path if path.exists() else None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        if not cfg.hf_hub_filename and cfg.needs_conversion():
            return None
        found = try_to_load_from_cache(cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors", cache_dir=cache_dir)
        return Path(found) if isinstance(found, str) else None
    if cfg.url:
        path = url_cache_path(cfg.url, cache_dir)
        return path if path.is_file() else None
    return None


# ------------------------------------------------------------------------------------ command line


def _card_yaml(cfg: PretrainedCfg) -> str:
    import yaml

    values = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists
    first = {"architecture": values.pop("architecture", None), "tag": values.pop("tag", None)}
    values = {k: v for k, v in {**first, **values}.items() if v not in ({}, [], None)}
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _source(cfg: PretrainedCfg) -> str:
    if cfg.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id}" + (f"/{cfg.hf_hub_filename}" if cfg.hf_hub_filename else "")
    return cfg.url or cfg.file or ""


def _cmd_list(args: argparse.Namespace) -> int:
    for name in list_pretrained(args.filter or ""):
        cfg = _lookup_cfg(name)
        print(f"{name}\t{cfg.source_format}\t{_source(cfg)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(_card_yaml(_lookup_cfg(args.name)), end="")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    path = fetch_pretrained(args.name, cache_dir=args.cache_dir, progress=not args.no_progress)
    print(path)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    model = create_model(args.name, pretrained=True, cache_dir=args.cache_dir)
    print(save_pretrained(model, args.out))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    cfg = _lookup_cfg(args.name)
    path = cached_checkpoint(cfg, args.cache_dir)
    if path is None or not path.is_file():
        raise PretrainedUnavailableError(
            f"{args.name}: no single cached checkpoint file to verify; fetch it with `python -m mome.zoo download "
            f"{args.name}`"
        )
    actual = sha256_file(path)
    if cfg.sha256 is None:
        print(f"{path}: sha256 {actual} (the card records no sha256: not verified)")
        return 0
    if actual != cfg.sha256.lower():
        raise ChecksumMismatchError(path, cfg.sha256, actual, deleted=False)
    print(f"{path}: sha256 {actual} OK")
    return 0


_ERRORS = (
    CardError,
    CheckpointMismatchError,
    ChecksumMismatchError,
    CorruptCheckpointError,
    FileExistsError,
    FileNotFoundError,
    PretrainedUnavailableError,
    UnknownModelError,
    UnsafeCheckpointError,
    ValueError,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mome.zoo", description="mome's checkpoint cards")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("list", help="cards with weights")
    cmd.add_argument("filter", nargs="?", help="fnmatch pattern, e.g. 'vlmo_*'")
    cmd.set_defaults(run=_cmd_list)
    cmd = sub.add_parser("show", help="print a card as YAML")
    cmd.add_argument("name", help="arch.tag")
    cmd.set_defaults(run=_cmd_show)
    for command, run, text in (
        ("download", _cmd_download, "fetch a checkpoint into the cache (sha256-checked)"),
        ("convert", _cmd_convert, "fetch, convert and write a mome folder"),
        ("verify", _cmd_verify, "check the sha256 of the cached checkpoint"),
    ):
        cmd = sub.add_parser(command, help=text)
        cmd.add_argument("name", help="arch.tag")
        cmd.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: its cache root)")
        if command == "download":
            cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
        if command == "convert":
            cmd.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, ...)")
        cmd.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the zoo command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except _ERRORS as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"mome.zoo {args.command}: error: {type(err).__name__}: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run the imported module's main, so error classes match those the registry raises.
    from mome.zoo import main as _main

    sys.exit(_main())
