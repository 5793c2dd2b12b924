"""How long ``import mome`` takes next to ``import timm`` (what it builds on), in fresh interpreters.

    python tools/import_time.py [--rounds 9]

Each round starts one fresh ``python -c "import <module>"`` per module, in alternating order (so a
slower moment of the machine hits both), and reads the import's own time (``time.perf_counter``
around the import statement, interpreter start-up excluded). Prints the median and the spread
(min-max) of each, and which heavy packages each import pulled in.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_PROBE = """
import json, sys, time
start = time.perf_counter()
import {module}
seconds = time.perf_counter() - start
heavy = [m for m in ("torch", "timm", "open_clip", "transformers", "lightning", "hydra") if m in sys.modules]
print(json.dumps({{"seconds": seconds, "modules": heavy}}))
"""


def time_import(module: str) -> dict:
    """One fresh interpreter's ``import module``: ``{"seconds": ..., "modules": [heavy packages loaded]}``."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(module=module)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="fresh interpreters per module (default 9)")
    parser.add_argument("--modules", nargs="+", default=["timm", "mome"], help="modules to time, interleaved")
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {m: [] for m in args.modules}
    loaded: dict[str, list[str]] = {}
    for round_index in range(args.rounds):
        order = args.modules if round_index % 2 == 0 else args.modules[::-1]
        for module in order:
            result = time_import(module)
            times[module].append(result["seconds"])
            loaded[module] = result["modules"]
    print(f"import time, {args.rounds} fresh interpreters each, interleaved (median, min-max):")
    for module, values in times.items():
        spread = f"{min(values):.2f}-{max(values):.2f} s"
        print(f"  import {module:<8} {statistics.median(values):.2f} s ({spread}); loads {', '.join(loaded[module])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
