"""Merge ``mome-eval`` result files (CLIP_benchmark JSON schema) into one CSV and a Markdown table.

Like ``clip_benchmark build *.json --output benchmark.csv``: one row per record, the columns ``dataset``,
``model``, ``pretrained``, ``task``, ``split``, ``n_samples`` then one column per metric (fractions in
[0, 1]; the Markdown table shows them in percent with 2 decimals). Other JSON files (e.g. ``routing.json``)
are skipped. Example::

    python tools/collect_results.py logs/eval/runs --csv results.csv --markdown results.md
    python tools/collect_results.py logs/eval/runs/*/results.json          # the Markdown table to stdout
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

KEYS = ("dataset", "model", "pretrained", "task", "split", "n_samples")
REQUIRED = ("dataset", "model", "pretrained", "task", "metrics")


def find_records(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """The result records in ``paths`` (JSON files, or folders searched recursively), in path order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(path.rglob("*.json")))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    records = []
    for file in files:
        try:
            record = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and all(key in record for key in REQUIRED) and isinstance(record["metrics"], dict):
            records.append({**record, "file": str(file)})
    return records


def to_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and flat rows: the record keys, then every metric (union over records, first-seen order)."""
    metrics: list[str] = []
    for record in records:
        metrics.extend(name for name in record["metrics"] if name not in metrics)
    rows = [{**{k: record.get(k, "") for k in KEYS}, **record["metrics"]} for record in records]
    return [*KEYS, *metrics], rows


def write_csv(columns: Sequence[str], rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """A GitHub Markdown table; metrics in percent (2 decimals), missing ones as ``-``."""

    def cell(column: str, value: Any) -> str:
        if value == "" or value is None:
            return "-"
        if column not in KEYS and isinstance(value, (int, float)):
            return f"{100 * value:.2f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(c, row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="result JSON files or folders (searched recursively)")
    parser.add_argument("--csv", help="write the CSV here")
    parser.add_argument("--markdown", help="write the Markdown table here (default: print it)")
    args = parser.parse_args(argv)
    try:
        records = find_records(args.paths)
    except FileNotFoundError as err:
        print(f"collect_results: error: {err}", file=sys.stderr)
        return 2
    if not records:
        print(f"collect_results: error: no mome-eval result in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    columns, rows = to_rows(records)
    if args.csv:
        write_csv(columns, rows, args.csv)
    table = markdown_table(columns, rows)
    if args.markdown:
        Path(args.markdown).write_text(table)
    else:
        print(table, end="")
    print(f"collect_results: {len(rows)} result(s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
