"""Measure every fidelity case and write the fidelity tables (``docs/fidelity.md``, ``zoo/README.md``).

A fidelity case (``tests/fidelity.py``: :class:`FidelityCase`) loads a checkpoint the upstream code wrote
(``tests/data/upstream/<fixture>/``) through one of mome's public routes, runs the inputs the upstream ran,
and returns ``{output: max |ours - theirs|}`` for every output the upstream produced. This script imports
the ``CASES`` of every ``tests/test_fidelity_*.py``, measures them all and writes

- ``docs/fidelity.md``: one row per case (upstream repository and commit, fixture, the largest diff over
  the case's outputs and which output it was, the tolerance its test allows);
- ``zoo/README.md``: one row per zoo card, the largest diff over the cases that load that card.

Each case's test (``case.check()``) compares its measurement with the recorded row, and
``tests/test_fidelity_table.py`` checks that the rows are exactly the cases and the zoo's cards, so a table
that no longer matches the code fails the tests until this script is rerun::

    HF_HUB_OFFLINE=1 python tools/fidelity_table.py

The fixtures are re-made from the upstream checkouts by ``tools/upstream_{vmoe,vlmo,moe_llava,dense}.py``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from fidelity import (  # noqa: E402  (tests/ joins the path first)
    CAPABILITY_SENTENCE,
    CARD_TABLE_MARKERS,
    CASE_TABLE_MARKERS,
    FIDELITY_DOC,
    ZOO_README,
    FidelityCase,
    cpu_capability,
    fixture_meta,
    read_case_table,
    replace_between,
)


@dataclass(frozen=True)
class Row:
    """One measured case: the largest diff over its outputs and which output it was."""

    case: FidelityCase
    max_diff: float
    worst_output: str


def load_cases() -> list[FidelityCase]:
    """The ``CASES`` of every ``tests/test_fidelity_*.py``, in file order; names must be unique and pipe-free."""
    cases: list[FidelityCase] = []
    for path in sorted(TESTS.glob("test_fidelity_*.py")):
        if path.stem == "test_fidelity_table":
            continue
        cases += importlib.import_module(path.stem).CASES
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"fidelity case names must be unique: {duplicates}")
    if any("|" in name for name in names):
        raise ValueError("a fidelity case name may not contain '|' (a Markdown table cell)")
    return cases


def measure(cases: Iterable[FidelityCase]) -> list[Row]:
    rows = []
    for case in cases:
        diffs = case.measure()
        worst = max(diffs, key=lambda name: diffs[name])  # the first output when all are exact
        rows.append(Row(case, diffs[worst], worst))
        print(f"{diffs[worst]:9.1e}  {case.name}", file=sys.stderr)
    return rows


def format_diff(value: float, relative: bool) -> str:
    return f"{value:.1e}" + (" (rel.)" if relative else "")


def _upstream(folder: str) -> str:
    meta = fixture_meta(folder)
    return f"[{meta['upstream']}@{meta['commit'][:8]}](https://github.com/{meta['upstream']}/tree/{meta['commit']})"


def render_case_table(rows: Sequence[Row]) -> str:
    """One section per fixture (its upstream commit and generator), one row per case."""
    by_folder: dict[str, list[Row]] = {}
    for row in rows:
        by_folder.setdefault(row.case.folder, []).append(row)
    blocks = []
    for folder, folder_rows in by_folder.items():
        meta = fixture_meta(folder)
        lines = [
            f"### `{folder}`",
            "",
            f"Written by {_upstream(folder)} through `{meta['generator']}`.",
            "",
            "| case | max diff | worst output | tolerance |",
            "|---|---|---|---|",
        ]
        for row in folder_rows:
            worst = f"`{row.worst_output}`" if row.max_diff > 0 else "(all exact)"
            diff = format_diff(row.max_diff, row.case.relative)
            lines.append(f"| {row.case.name} | {diff} | {worst} | {row.case.tolerance:.0e} |")
        blocks.append("\n".join(lines))
    capability = CAPABILITY_SENTENCE.format(cpu_capability())
    header = f"{capability}: another CPU rounds differently, within the tolerance of each row."
    return "\n\n".join([header, *blocks])


def render_card_table(rows: Sequence[Row]) -> str:
    """One row per card: the largest diff over the cases whose ``cards`` name it."""
    by_card: dict[str, list[Row]] = {}
    for row in rows:
        for card in row.case.cards:
            by_card.setdefault(card, []).append(row)
    lines = ["| card | upstream fixture | max diff | cases |", "|---|---|---|---|"]
    for card in sorted(by_card):
        card_rows = by_card[card]
        worst = max(card_rows, key=lambda row: row.max_diff)
        folders = ", ".join(f"`{f}`" for f in dict.fromkeys(row.case.folder for row in card_rows))
        lines.append(
            f"| `{card}` | {folders} | {format_diff(worst.max_diff, worst.case.relative)} | {len(card_rows)} |"
        )
    return "\n".join(lines)


def recorded_rows(cases: Sequence[FidelityCase]) -> list[Row]:
    """The rows ``docs/fidelity.md`` holds now, as :class:`Row` of ``cases`` (no measurement)."""
    recorded = read_case_table()
    missing = [case.name for case in cases if case.name not in recorded]
    if missing:
        raise KeyError(f"{FIDELITY_DOC} has no row for {missing}; run python tools/fidelity_table.py")
    return [Row(case, *recorded[case.name]) for case in cases]


def write_tables(rows: Sequence[Row], doc: Path = FIDELITY_DOC, zoo_readme: Path = ZOO_README) -> None:
    for path, markers, table in (
        (doc, CASE_TABLE_MARKERS, render_case_table(rows)),
        (zoo_readme, CARD_TABLE_MARKERS, render_card_table(rows)),
    ):
        path.write_text(replace_between(path.read_text(), markers, table))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="only measure the cases whose name contains this (prints only)")
    args = parser.parse_args(argv)
    cases = load_cases()
    if args.k:
        measure(case for case in cases if args.k in case.name)
        return 0
    write_tables(measure(cases))
    print(f"wrote {FIDELITY_DOC.relative_to(ROOT)} and {ZOO_README.relative_to(ROOT)} ({len(cases)} cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
