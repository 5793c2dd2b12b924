"""The zoo: checkpoint cards (``zoo/<arch>.<tag>.yaml``), their schema, and ``python -m mome.zoo``.

A card is data only: one YAML mapping per ``arch.tag`` whose keys are the fields of
:class:`mome.PretrainedCfg` (plus ``default: true`` for the arch's default tag), checked by
:data:`CARD_SCHEMA`; its ``source_format`` and ``converter`` are names of the one table of formats and
converters (:data:`SOURCE_FORMATS`, :data:`CONVERTERS`, the keys of ``mome.convert.READERS`` and
``mome.convert.CONVERTERS``). The registry reads the cards of ``mome.zoo_dir()`` (and ``MOME_ZOO_PATH``,
:func:`mome.add_zoo_dir`) on first use, so ``mome.list_pretrained()`` and
``mome.create_model("arch.tag", pretrained=True)`` see them.

Command line::

    python -m mome.zoo list [FILTER]          # cards with weights, fnmatch filter
    python -m mome.zoo show NAME              # the card as YAML
    python -m mome.zoo download NAME          # fetch into the cache, sha256-checked (pre-fetch for offline use)
    python -m mome.zoo convert NAME --out DIR # fetch, convert, write a mome folder (save_pretrained)
    python -m mome.zoo convert NAME --file FILE --out DIR         # the card's model from a file you have
    python -m mome.zoo convert --file FILE [--format F] --arch ARCH [--set k=v ...] [--option k=v ...] --out DIR
    python -m mome.zoo verify NAME            # sha256 of the cached file against the card

Bad arguments and unusable inputs (every :class:`mome.MomeError`, a missing or existing path) end the command
before any work where they can be seen up front (``convert`` checks ``--out``, ``--file``, ``--set`` and
``--option`` before it builds or reads anything) with one line on stderr, ``mome.zoo <command>: error: <Type>:
<message>``, and exit status 2 (as argparse's usage errors); nothing partial is written (``save_pretrained``
swaps a complete folder into place).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._cards import CARD_SCHEMA, CONVERTERS, SOURCE_FORMATS, FieldSpec, read_card, read_cards, validate_card
from ._errors import (
    CardError,
    ChecksumMismatchError,
    InvalidArgumentError,
    MomeError,
    PretrainedUnavailableError,
    UnsupportedOptionError,
)
from ._factory import create_model, fetch_pretrained
from ._hub import cached_checkpoint, sha256_file
from ._pretrained import TRANSFORMERS_FORMAT, PretrainedCfg
from ._registry import get_pretrained_cfg, list_pretrained
from ._saving import check_save_target, save_pretrained

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


# ------------------------------------------------------------------------------------ command line


def _card_yaml(cfg: PretrainedCfg) -> str:
    import yaml

    values = json.loads(json.dumps(cfg.to_dict()))  # tuples -> lists
    first = {"architecture": values.pop("architecture", None), "tag": values.pop("tag", None)}
    values = {k: v for k, v in {**first, **values}.items() if v not in ({}, [], None)}
    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True)


def _source(cfg: PretrainedCfg) -> str:
    if cfg.hf_hub_id:
        source = f"hf-hub:{cfg.hf_hub_id}" + (f"/{cfg.hf_hub_filename}" if cfg.hf_hub_filename else "")
        return source + (f"@{cfg.revision}" if cfg.revision else "")
    return cfg.url or cfg.file or ""


def _cmd_list(args: argparse.Namespace) -> int:
    for name in list_pretrained(args.filter or ""):
        cfg = get_pretrained_cfg(name)
        print(f"{name}\t{cfg.source_format}\t{_source(cfg)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(_card_yaml(get_pretrained_cfg(args.name)), end="")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    path = fetch_pretrained(args.name, cache_dir=args.cache_dir, progress=not args.no_progress)
    print(path)
    return 0


def _assignments(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: v}``, each value parsed as YAML (``depth=2``, ``ignore_prefixes=[a.]``); an item
    without ``=``, with a key that is not a name, repeated, or with a value that is not YAML names ``flag``."""
    import yaml

    values = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise InvalidArgumentError(flag, "NAME=VALUE (a YAML value)", item)
        if key in values:
            raise InvalidArgumentError(flag, f"given once per name ({key} is repeated)", item)
        try:
            values[key] = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problem = " ".join(str(err).split())
            raise InvalidArgumentError(flag, f"NAME=VALUE with a YAML value ({problem})", item) from err
    return values


def _cmd_convert(args: argparse.Namespace) -> int:
    """Every argument is checked before the model is built or a checkpoint read: ``--set``/``--option`` parse,
    a card NAME or ``--arch`` with ``--file`` (not both), ``--file`` exists, ``--out`` may be written."""
    model_kwargs = _assignments(args.set, "--set")
    options = _assignments(args.option, "--option")
    own = sorted(set(model_kwargs) & (set(inspect.signature(create_model).parameters) - {"kwargs"}))
    if own:
        raise InvalidArgumentError("--set", "a keyword of the architecture, not one of create_model's own", own)
    if args.name is not None and args.arch is not None:
        raise InvalidArgumentError("--arch", "absent when a card NAME is given (give one of them)", args.arch)
    if args.name is None and (args.arch is None or args.file is None):
        given = [flag for flag, value in (("--file", args.file), ("--arch", args.arch)) if value is not None]
        raise InvalidArgumentError("convert", "given a card NAME, or --file FILE with --arch ARCH", " ".join(given))
    if args.file is not None and not Path(args.file).expanduser().exists():
        raise FileNotFoundError(f"--file {args.file}: no such file or folder")
    if args.name is not None and get_pretrained_cfg(args.name).source_format == TRANSFORMERS_FORMAT:
        raise UnsupportedOptionError(
            "convert",
            args.name,
            "a transformers card is not converted: `python -m mome.zoo download NAME` fetches its repo, which "
            "mome.create_model(NAME, pretrained=True) reads with the class's from_pretrained",
            args.name,
        )
    check_save_target(args.out)
    build = {"cache_dir": args.cache_dir, "allow_non_finite": args.allow_non_finite, **model_kwargs}
    try:
        if args.name is not None:  # a card: its checkpoint, or --file in the card's format
            overlay = {"file": args.file} if args.file else {}
            if args.format is not None:
                overlay["source_format"] = args.format
            if options:
                overlay["converter_options"] = options
            model = create_model(args.name, pretrained=True, pretrained_cfg_overlay=overlay, **build)
        else:
            model = create_model(
                args.arch,
                checkpoint_path=args.file,
                checkpoint_format=args.format,
                converter_options=options or None,
                **build,
            )
    except TypeError as err:  # an entrypoint that does not take a --set keyword
        if "keyword argument" not in str(err):
            raise
        raise InvalidArgumentError("--set", "keyword arguments the architecture takes", sorted(model_kwargs)) from err
    print(save_pretrained(model, args.out))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    cfg = get_pretrained_cfg(args.name)
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


#: what the command line reports in one line (exit 2): every mome error, a path that is missing, taken or not
#: readable, and a value refused by a library it calls
_ERRORS = (MomeError, OSError, ValueError)


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
        ("convert", _cmd_convert, "convert a card's or a local upstream checkpoint into a mome folder"),
        ("verify", _cmd_verify, "check the sha256 of the cached checkpoint"),
    ):
        cmd = sub.add_parser(command, help=text)
        cmd.add_argument("name", nargs="?" if command == "convert" else None, help="arch.tag")
        cmd.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: its cache root)")
        if command == "download":
            cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
        if command == "convert":
            cmd.add_argument("--out", required=True, help="folder to write (config.json, model.safetensors, ...)")
            cmd.add_argument("--file", default=None, help="an upstream checkpoint you have (file or folder)")
            cmd.add_argument(
                "--format",
                default=None,
                choices=sorted(SOURCE_FORMATS),
                help="its format (default: told from the file)",
            )
            cmd.add_argument("--arch", default=None, help="the architecture to build (with --file, without a card)")
            cmd.add_argument("--set", action="append", metavar="K=V", help="a model kwarg (YAML value); repeatable")
            cmd.add_argument(
                "--option", action="append", metavar="K=V", help="a converter option (YAML value); repeatable"
            )
            cmd.add_argument(
                "--allow-non-finite", action="store_true", help="convert weights holding NaN or Inf (refused otherwise)"
            )
        cmd.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the zoo command line; returns the exit status: 0 ok, 2 a bad argument or input (one line on stderr,
    see the module docstring; argparse's usage errors exit 2 too)."""
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except _ERRORS as err:
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"mome.zoo {args.command}: error: {type(err).__name__}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the imported module's main, so error classes match those the registry raises.
    from mome.zoo import main as _main

    sys.exit(_main())
