"""Peak resident memory of ``mome.create_model("local-dir:...")``, normal load vs ``low_cpu_mem_usage=True``.

A model of each ``--model`` (seeded random weights) is saved with ``save_pretrained`` to a temporary folder, then loaded
in a fresh Python process per mode, one after the other:

- **normal**: ``create_model("local-dir:FOLDER")``: the model is built with random weights, the whole
  ``model.safetensors`` is read, then copied in;
- **low_cpu_mem_usage**: ``create_model("local-dir:FOLDER", low_cpu_mem_usage=True)``: built on the meta device,
  the tensors streamed from the file into place (``mome/_loading.py``).

Each child imports mome, resets its peak resident set (Linux: ``5`` written to ``/proc/self/clear_refs``; the peak is
``VmHWM`` of ``/proc/self/status``), records its resident set, calls ``create_model`` and reads the peak. Reported:
the weights' bytes (every parameter and buffer of the loaded model), the RSS before the call, the peak during it,
and ``(peak - before) / weights``: what the load itself held at its worst, in units of the weights (1.0: the weights
once). The page cache is not counted (file pages are in RSS only while mapped into the process).

The figures of docs/quantization.md ("Memory-aware loading")::

    python tools/bench_loading.py --model limoe_b16_e8 vmoe_b16_e8
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES = {"normal": {}, "low_cpu_mem_usage": {"low_cpu_mem_usage": True}}
_MIB = 2**20

_SAVE = """
import sys, torch, mome
torch.manual_seed(0)
model = mome.create_model(sys.argv[1]).eval()
mome.save_pretrained(model, sys.argv[2])
"""

_LOAD = """
import gc, json, sys, time
import torch, mome

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field + " not in /proc/self/status")

gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM) to the current one
    f.write("5")
before = status("VmRSS")
start = time.perf_counter()
model = mome.create_model("local-dir:" + sys.argv[1], **json.loads(sys.argv[2]))
seconds = time.perf_counter() - start
peak = status("VmHWM")
tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
weights = sum(t.numel() * t.element_size() for t in tensors)
print(json.dumps({"weights": weights, "before": before, "peak": peak, "seconds": seconds}))
"""


def _python(code: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=_env(), check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}): {out.stderr[-3000:]}")
    return out.stdout


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def measure(model: str) -> list[dict[str, Any]]:
    """One row per mode: weights, RSS before, peak RSS and the seconds of ``create_model``."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="mome-bench-loading-") as tmp:
        folder = str(Path(tmp) / "model")
        _python(_SAVE, model, folder)
        for mode, kwargs in MODES.items():
            row = json.loads(_python(_LOAD, folder, json.dumps(kwargs)).strip().splitlines()[-1])
            row.update(model=model, mode=mode)
            row["peak_over_weights"] = row["peak"] / row["weights"]
            row["increase_over_weights"] = (row["peak"] - row["before"]) / row["weights"]
            rows.append(row)
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| model | load | weights (MiB) | RSS before (MiB) | peak RSS (MiB) | (peak - before) / weights "
        "| peak / weights | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['weights'] / _MIB:.0f} | {r['before'] / _MIB:.0f} | "
            f"{r['peak'] / _MIB:.0f} | {r['increase_over_weights']:.2f} | {r['peak_over_weights']:.2f} | "
            f"{r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", nargs="+", default=["limoe_b16_e8"], help="registered architectures (built with random weights)"
    )
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("bench_loading: needs Linux's /proc/self/clear_refs and VmHWM to measure the peak RSS")
    rows = [row for model in args.model for row in measure(model)]
    import safetensors
    import torch

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, safetensors {safetensors.__version__}, "
        f"{platform.machine()}; children run with OMP_NUM_THREADS=1"
    )
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
