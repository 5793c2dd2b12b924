"""The compression study as one command: quality of the tiny V-MoE and LIMoE before and after expert pruning and
MC-SMoE merging (:mod:`mome.compress`), on the embedded digits.

For each model the tool composes the config ``mome-train experiment=<vmoe_digits|limoe_digits>
model.num_experts=<E>`` would run (the V-MoE classifies the digits, top-2 of E experts in blocks 1 and 3; the LIMoE is
trained contrastively on the digits captions, top-1), trains it with mome's Lightning task for exactly ``--steps``
optimizer steps (the training loop of ``tools/router_study.py``), then reads its routing on the validation split
(250 images; the calibration set) and tests, on the test split (250 images, dropless routing):

- the trained model (E experts);
- for every size in ``--sizes``: :func:`mome.compress.prune_experts` (keep the most used experts) and
  :func:`mome.compress.merge_experts` (MC-SMoE: dominant experts, router-logit grouping, weight matching,
  frequency-weighted averaging), each from the trained model, without any further training.

Quality is the test top-1: classification accuracy for the V-MoE, zero-shot accuracy over the digits class names
(6 templates) for the LIMoE. Deterministic given ``--seed`` on one machine (one torch thread by default). The table of
docs/compression.md (2.6 minutes on a 2-core CPU)::

    python tools/compress_study.py --steps 500 --experts 8 --sizes 6 4 2 --seed 0 --out table.md
    python tools/compress_study.py --models vmoe --steps 20 --sizes 2    # a quick look
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # router_study, beside this file

import router_study as study  # noqa: E402

from mome.compress import expert_usage, merge_experts, prune_experts  # noqa: E402

#: The models of the study: name -> (experiment, its test metric, what the metric is, a calibration batch's inputs).
MODELS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "vmoe": ("vmoe_digits", "test/top1", "classification top-1", ("image",)),
    "limoe": ("limoe_digits", "test/zeroshot_top1", "zero-shot top-1", ("image", "text")),
}
METHODS = {"prune": prune_experts, "merge": merge_experts}


def overrides(model: str, experts: int, seed: int, steps: int, device: str) -> list[str]:
    """The ``mome-train`` overrides of one run: the router study's fixed step budget and nothing but training and
    testing, on the experiment of ``model`` with ``experts`` experts, tested dropless."""
    full = study.run_overrides([f"model.num_experts={experts}"], seed, steps, "dropless", device)
    return [f"experiment={MODELS[model][0]}", *full[len(study.BASE_OVERRIDES) :]]


def test_top1(trainer: Any, task: Any, datamodule: Any, metric: str) -> float:
    trainer.test(task, datamodule=datamodule, verbose=False)
    return float(trainer.callback_metrics[metric])


def run_model(model: str, args: argparse.Namespace, work_dir: Path) -> list[dict[str, Any]]:
    """Train one model, then test it and every compressed copy; one row per (method, size)."""
    start = time.perf_counter()
    _, metric, _, inputs = MODELS[model]
    task, datamodule, trainer = study.build_run(
        overrides(model, args.experts, args.seed, args.steps, args.device), work_dir
    )
    trainer.fit(task, datamodule=datamodule)
    trained = task.model.eval()
    device = next(trained.parameters()).device
    calibration = [tuple(batch[name].to(device) for name in inputs) for batch in datamodule.val_dataloader()]
    usage = expert_usage(trained, calibration)
    rows = [{"model": model, "method": "trained", "experts": args.experts}]
    rows[0]["top1"] = test_top1(trainer, task, datamodule, metric)
    for size in args.sizes:
        for method, compress in METHODS.items():
            task.model = compress(trained, size, usage=usage)
            rows.append({"model": model, "method": method, "experts": size})
            rows[-1]["top1"] = test_top1(trainer, task, datamodule, metric)
    task.model = trained
    print(f"[{time.perf_counter() - start:6.1f}s] {model}: trained and tested {len(rows)} models", flush=True)
    return rows


def markdown(rows: Sequence[dict[str, Any]], command: str, environment: str) -> str:
    """One line per model and size: the trained model's top-1, then the pruned and the merged models' (percent)."""
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {environment}",
        "",
        "| model (test metric) | experts per layer | pruned top-1 % | merged top-1 % |",
        "|---|---|---|---|",
    ]
    for model in dict.fromkeys(row["model"] for row in rows):
        mine = [row for row in rows if row["model"] == model]
        label = f"{model} ({MODELS[model][2]})"
        trained = next(row for row in mine if row["method"] == "trained")
        lines.append(f"| {label} | {trained['experts']} (trained) | {100 * trained['top1']:.1f} | - |")
        for size in dict.fromkeys(row["experts"] for row in mine if row["method"] != "trained"):
            value = {
                row["method"]: row["top1"] for row in mine if row["experts"] == size and row["method"] != "trained"
            }
            lines.append(f"| {label} | {size} | {100 * value['prune']:.1f} | {100 * value['merge']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the study; returns its rows (``model``, ``method``, ``experts``, ``top1``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps of each training run (batch 64)")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer of the trained models")
    parser.add_argument("--sizes", type=int, nargs="+", default=[6, 4, 2], help="experts per layer after compression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="the Markdown table (default: stdout only)")
    parser.add_argument("--json", type=Path, default=None, help="every row's numbers")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if any(not 1 <= size <= args.experts for size in args.sizes):
        parser.error(f"--sizes must lie in [1, --experts={args.experts}]")
    command = "python tools/compress_study.py " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    rows: list[dict[str, Any]] = []
    with study.quiet_training(args.threads), tempfile.TemporaryDirectory(prefix="compress_study_") as tmp:
        for model in args.models:
            rows += run_model(model, args, Path(tmp) / model)
        text = markdown(rows, command, study.environment(args.device))  # names the threads the runs used
    study.write_outputs(text, args.out, args.json, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
