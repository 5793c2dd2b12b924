"""The MoE layer part of ``tools/bench.py`` with this script's original options (kept for old commands).

    python tools/bench_moe.py --shapes 4096:8:2:2048 512:64:2:256 --act swiglu --json out.json

A shape is ``T:E:k:H`` (tokens, experts, top-k, expert hidden width); ``--dim`` sets D. Each
``--act`` runs as its own ``tools/bench.py --only layers peers --no-soft`` pass; prefer ``tools/bench.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096:8:2:2048", "512:64:2:256"], help="T:E:k:H")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--act", nargs="+", default=["gelu", "swiglu"], choices=["gelu", "swiglu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true", help="skip the peer implementations")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    for text in args.shapes:
        if len(text.split(":")) != 4:
            parser.error(f"a shape is T:E:k:H, got {text!r}")
    rows = []
    for act in args.act:
        common = ["--shapes", *args.shapes, "--dim", str(args.dim), "--act", act, "--no-soft"]
        common += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", "2"]
        common += ["--only", "layers"] if args.no_peers else ["--only", "layers", "peers"]
        outputs = []
        if args.json:
            outputs += ["--json", str(args.json.with_suffix(f".{act}.json"))]
        if args.markdown:
            outputs += ["--markdown", str(args.markdown.with_suffix(f".{act}.md"))]
        rows += bench.main(common + outputs)["layers"]
    return rows


if __name__ == "__main__":
    main()
