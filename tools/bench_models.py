"""The model part of ``tools/bench.py`` with this script's original options (kept for old commands).

    python tools/bench_models.py --batch-size 8 --models vmoe_s32_e8 --json out.json

Training-step speed (forward, backward, AdamW) of each model against its dense twin of equal active
FLOPs; runs ``tools/bench.py --only models``, which documents the twins. Prefer ``tools/bench.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vmoe_s32_e8", "limoe_tiny_patch8_e4"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    forwarded = ["--only", "models", "--models", *args.models, "--batch-size", str(args.batch_size)]
    forwarded += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    return bench.main(forwarded + (["--json", str(args.json)] if args.json else []))["models"]


if __name__ == "__main__":
    main()
