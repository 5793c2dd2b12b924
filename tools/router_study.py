"""The router study as one command: the same tiny V-MoE, trained with each router on the embedded digits.

For every router (a ``conf/moe`` recipe, or the ``mome-train`` overrides that define it: :data:`ROUTERS`) and
every seed, the tool composes the config ``mome-train experiment=vmoe_digits <overrides> seed=<s>`` would run
(``vmoe_tiny_patch8_e4``: 4 blocks of width 64, E=4 experts in blocks 1 and 3; scikit-learn's digits), trains it
with mome's Lightning task for exactly ``--steps`` optimizer steps (the cosine schedule spans them), then tests
it on the test split (250 images) and writes a Markdown table:

- **top-1**: test accuracy, mean +- sample standard deviation over the seeds;
- **dropped**: share of the routed (token, expert) assignments that capacity dropped, over the whole test
  split (:class:`mome.lit.routing_report.RoutingRecorder`, every MoE layer together), and **unrouted**: share of
  the tokens no expert computed (expert choice can leave tokens out without "dropping" a request);
  "-" for layers that route no token to one expert (Soft MoE, SMEAR);
- **load CV**: coefficient of variation (std / mean over experts) of each layer's per-expert load over the
  test split, averaged over the MoE layers (0 = perfectly even). Soft MoE: each expert's share of the token
  outputs; SMEAR: its mean merge weight per example (:func:`mome.routing_stats`' ``expert_load``);
- **train dropped**, **train load CV**: the same at training, from each step's forward pass (the mean over the
  steps of :func:`mome.routing_stats`: BASE and Sinkhorn balance only at training, so they differ most);
- **step / dense**: median time of a training step (forward, backward, optimizer step; data loading not
  included) divided by that of the dense ViT of the same size (``model.moe_layers=none``) trained with the same
  seed just before (mean over seeds). The dense model is trained and tested too (its own row).

By default the MoE layers are tested at their training capacity (``task.eval_capacity=model``: a capacity
router drops at test as it did in training); ``--eval-capacity dropless`` tests as ``mome-train`` does by
default. Runs go seed by seed (dense first, then every router) so that a slow spell of a shared machine hits
every router alike. One thread by default (``--threads``): on a small CPU more threads only contend. The table of
docs/routers.md (36 runs, 22.5 minutes on a 2-core CPU)::

    python tools/router_study.py --steps 250 --seeds 0 1 2 --out table.md --json runs.json
    python tools/router_study.py --routers top_k expert_choice soft_moe --steps 50 --seeds 0   # a quick look
    python tools/router_study.py --device cuda --steps 2000 --seeds 0 1 2 --threads 4           # on a GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import mome  # noqa: E402
import mome.cli  # noqa: E402,F401  (registers the mome-model:// config source of conf/train.yaml)
from mome.cli._common import build_datamodule, build_task, build_trainer, check_trainer, seed_everything  # noqa: E402
from mome.layers import SMEAR  # noqa: E402
from mome.lit.routing_report import RoutingRecorder  # noqa: E402

#: The routers of the study: name -> (what it is, the ``mome-train`` overrides on top of experiment=vmoe_digits).
ROUTERS: dict[str, tuple[str, list[str]]] = {
    "top_k": ("top-2 of the softmax (V-MoE without noise)", ["model.router=top_k"]),
    "noisy_top_k_bpr": ("noisy top-2 + BPR (V-MoE)", ["moe=vmoe", "model.moe_kwargs.batch_priority=true"]),
    "expert_choice": ("expert choice (c = 2)", ["moe=expert_choice"]),
    "sinkhorn": ("Sinkhorn / S-BASE top-1", ["moe=sinkhorn"]),
    "base": ("BASE layers (balanced assignment)", ["moe=base"]),
    "xmoe": ("X-MoE (cosine, 16-d)", ["moe=xmoe"]),
    "hash": ("hash (position)", ["moe=hash"]),
    "gshard": ("GShard top-2 (sampled 2nd)", ["moe=gshard"]),
    "soft_moe": ("Soft MoE (1 slot / expert)", ["moe=soft_moe"]),
    "smear": ("SMEAR (merged experts)", ["moe=smear"]),
    "deepseek": ("DeepSeekMoE (2x fine, 1 shared, aux-free)", ["moe=deepseek"]),
}
DENSE = ("dense", ("dense ViT (no MoE layer)", ["model.moe_layers=none"]))
BASE_OVERRIDES = ["experiment=vmoe_digits"]


def run_overrides(router_overrides: Sequence[str], seed: int, steps: int, eval_capacity: str, device: str) -> list[str]:
    """The ``mome-train`` overrides of one run: the experiment, the router's, the seed and a fixed step budget
    (no validation, checkpoints, loggers or callbacks: nothing but training and the test)."""
    return [
        *BASE_OVERRIDES,
        *router_overrides,
        f"seed={seed}",
        f"trainer={'gpu' if device == 'cuda' else 'cpu'}",
        "trainer.max_epochs=-1",
        f"trainer.max_steps={steps}",
        "trainer.min_epochs=0",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "+trainer.enable_checkpointing=false",
        "+trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        f"task.eval_capacity={eval_capacity}",
        "callbacks=none",
        "~logger",
    ]


def compose_run(overrides: Sequence[str], output_dir: Path) -> Any:
    """The config ``mome-train <overrides>`` composes, its outputs in ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(mome.conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*overrides, f"trainer.default_root_dir={output_dir}"])
    return cfg


class StepTimer(L.Callback):
    """Times every training step (``on_train_batch_start`` to ``on_train_batch_end``: forward, backward, optimizer
    step) and reads the dropped share and the load CV of that step's forward pass (:func:`mome.routing_stats`)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.dropped: list[float] = []
        self.load_cv: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._sync(pl_module.device)
        self.times.append(time.perf_counter() - self._start)
        stats = mome.routing_stats(pl_module.model).values()
        drops = [float(layer["dropped_fraction"]) for layer in stats if "dropped_fraction" in layer]
        if drops:
            self.dropped.append(sum(drops) / len(drops))
        cvs = [coefficient_of_variation(layer["expert_load"].tolist()) for layer in stats if "expert_load" in layer]
        if cvs:
            self.load_cv.append(sum(cvs) / len(cvs))


class SoftLoadRecorder:
    """Per-expert load of the routed layers :class:`RoutingRecorder` does not hook (SMEAR): the layer's own
    ``expert_load`` of each forward pass (:func:`mome.routing_stats`), weighted by the pass's tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.loads: dict[str, Tensor] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if isinstance(module, SMEAR)
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            load = module.last_routing_stats.get("expert_load")
            if load is not None:
                tokens = float(output.shape[:-1].numel())
                self.loads[name] = self.loads.get(name, 0) + load.detach().double().cpu() * tokens

        return hook

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()


def coefficient_of_variation(load: Sequence[float]) -> float:
    """``std / mean`` of the per-expert loads (population std; 0 when every expert has the same load)."""
    values = torch.tensor(list(load), dtype=torch.float64)
    mean = values.mean()
    return float(values.std(unbiased=False) / mean) if mean > 0 else 0.0


def build_run(overrides: Sequence[str], work_dir: Path) -> tuple[Any, Any, L.Trainer]:
    """The task, data module and trainer ``mome-train <overrides>`` builds (seeded, checked), its outputs in
    ``work_dir``."""
    cfg = compose_run(overrides, work_dir)
    check_trainer(cfg)
    seed_everything(cfg)
    task = build_task(cfg)
    datamodule = build_datamodule(cfg, task)
    task.check_datamodule(datamodule)
    return task, datamodule, build_trainer(cfg)


def train_and_test(overrides: Sequence[str], work_dir: Path) -> dict[str, Any]:
    """Train one configuration, test it; its accuracy, routing shares over the test split and step times."""
    start = time.perf_counter()
    task, datamodule, trainer = build_run(overrides, work_dir)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    trainer.fit(task, datamodule=datamodule)

    recorder = RoutingRecorder().attach(task.model)
    soft = SoftLoadRecorder(task.model)
    try:
        trainer.test(task, datamodule=datamodule, verbose=False)
    finally:
        recorder.detach()
        soft.detach()
    report = recorder.report()["layers"]
    sparse = [layer for layer in report.values() if layer["kind"] == "sparse"]
    loads = [layer["expert_load"] for layer in report.values()]
    loads += [(load / load.sum()).tolist() for load in soft.loads.values()]
    times = timer.times[min(5, len(timer.times) // 2) :]  # the first steps warm up allocators and caches
    return {
        "top1": float(trainer.callback_metrics["test/top1"]),
        "dropped": recorder.drops()["dropped_fraction"] if sparse else None,
        "unrouted": sum(layer["unrouted_fraction"] for layer in sparse) / len(sparse) if sparse else None,
        "load_cv": sum(map(coefficient_of_variation, loads)) / len(loads) if loads else None,
        "train_dropped": sum(timer.dropped) / len(timer.dropped) if timer.dropped else None,
        "train_load_cv": sum(timer.load_cv) / len(timer.load_cv) if timer.load_cv else None,
        "step_s": statistics.median(times),
        "steps": int(trainer.global_step),
        "wall_s": time.perf_counter() - start,
    }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per router (dense first, then the study's order): means over seeds; the step-time ratio of each
    seed's run to the dense run of the same seed, averaged."""
    dense_step = {run["seed"]: run["step_s"] for run in runs if run["router"] == DENSE[0]}
    rows = []
    for name in dict.fromkeys(run["router"] for run in runs):
        mine = [run for run in runs if run["router"] == name]
        row: dict[str, Any] = {"router": name, "label": mine[0]["label"], "seeds": [run["seed"] for run in mine]}
        row["top1_mean"], row["top1_std"] = _mean_std([run["top1"] for run in mine])
        for key in ("dropped", "unrouted", "load_cv", "train_dropped", "train_load_cv"):
            values = [run[key] for run in mine if run[key] is not None]
            row[key] = statistics.fmean(values) if values else None
        ratios = [run["step_s"] / dense_step[run["seed"]] for run in mine if run["seed"] in dense_step]
        row["step_ratio"] = statistics.fmean(ratios) if ratios else None
        row["step_ms"] = 1000 * statistics.fmean(run["step_s"] for run in mine)
        row["steps"] = mine[0]["steps"]
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], command: str, environment: str) -> str:
    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {environment}",
        "",
        "| router | top-1 % (mean ± std) | dropped | unrouted | load CV | train dropped | train load CV "
        "| step / dense | step ms | seeds | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['router']}: {row['label']} | {100 * row['top1_mean']:.1f} ± {100 * row['top1_std']:.1f} "
            f"| {number(row['dropped'])} | {number(row['unrouted'])} | {number(row['load_cv'], 2)} "
            f"| {number(row['train_dropped'])} | {number(row['train_load_cv'], 2)} | {number(row['step_ratio'], 2)} "
            f"| {row['step_ms']:.1f} "
            f"| {','.join(map(str, row['seeds']))} | {row['steps']} |"
        )
    return "\n".join(lines) + "\n"


def environment(device: str) -> str:
    """The machine in words: the accelerator or the CPU (its model, cores and the torch threads used)."""
    import os
    import platform

    if device == "cuda":
        where = torch.cuda.get_device_name(0)
    else:
        model = platform.processor() or platform.machine()
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
            model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        where = f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"
    return f"{where}; torch {torch.__version__}, lightning {L.__version__}, Python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the study; returns the table's rows (:func:`summarize`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps of every run (batch 64)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    parser.add_argument("--out", type=Path, default=None, help="the Markdown table (default: stdout only)")
    parser.add_argument("--json", type=Path, default=None, help="every run's numbers, and the rows")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--eval-capacity", default="model", help="model (default), dropless or a capacity factor")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: for a model this small more threads contend)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    command = "python tools/router_study.py " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    with quiet_training(args.threads):
        runs = _run_all(args)
        rows = summarize(runs)
        text = markdown(rows, command, environment(args.device))  # names the threads the runs used
    write_outputs(text, args.out, args.json, {"runs": runs, "rows": rows})
    return rows


@contextmanager
def quiet_training(threads: int) -> Iterator[None]:
    """Inside: ``threads`` torch threads, Lightning's loggers at ERROR and its warnings off; a caller in the same
    process (the tests) gets its threads and logging back afterwards."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    saved = torch.get_num_threads(), [logger.level for logger in loggers]
    try:
        torch.set_num_threads(threads)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        torch.set_num_threads(saved[0])
        for logger, level in zip(loggers, saved[1]):
            logger.setLevel(level)


def write_outputs(text: str, out: Path | None, json_path: Path | None, numbers: dict[str, Any]) -> None:
    """Print the Markdown ``text`` (its first line names the command), write it to ``out`` and, with the command,
    ``numbers`` to ``json_path`` (each when given)."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    if json_path:
        command = text.splitlines()[0].removeprefix("Command: `").removesuffix("`")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"command": command, **numbers}, indent=1))


def _run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every run, seed by seed: the dense model, then each router."""
    configs = [DENSE, *((name, ROUTERS[name]) for name in args.routers)]
    runs: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="router_study_") as tmp:
        for seed in args.seeds:
            for name, (label, overrides) in configs:
                full = run_overrides(overrides, seed, args.steps, args.eval_capacity, args.device)
                result = train_and_test(full, Path(tmp) / f"{name}_{seed}")
                runs.append({"router": name, "label": label, "seed": seed, "overrides": full, **result})
                print(
                    f"[{time.perf_counter() - start:7.1f}s] {name:16s} seed {seed}: top-1 {result['top1']:.3f}, "
                    f"step {1000 * result['step_s']:.1f} ms",
                    flush=True,
                )
    return runs


if __name__ == "__main__":
    rows = main()
    raise SystemExit(0 if all(math.isfinite(row["top1_mean"]) for row in rows) else 1)
