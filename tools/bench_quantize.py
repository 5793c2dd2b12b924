"""Quality and cost of ``mome.quantize`` (int8 / int4 weight-only, torchao) for every family, on this machine.

For the tiny model of each family (seeded random weights) and fixed seeded inputs it reports, for fp32, int8 and
int4 copies of the same model:

- **max / mean |Δ|** and **rel**: the largest and the mean absolute difference of the outputs to fp32's, and
  ``||Δ|| / ||y_fp32||`` (vision: the logits; LIMoE, VLMo: the image and text embeddings; MoE-LLaVA: the logits of
  an image prompt);
- **weights**: bytes of all parameters and buffers (a quantized weight counts its int data, scales and zero
  points), and the ratio to fp32;
- **forward** (and for MoE-LLaVA **decode**, one greedy step with the KV cache, per token): the median of
  ``--rounds`` interleaved rounds (fp32, int8, int4 in turn, after ``--warmup`` calls), with the min-max spread;
- for MoE-LLaVA, **tokens/s** of greedy generation (16 new tokens for each of 8 image prompts of different
  lengths) at batch 1 (one prompt at a time) and batch 8 (one left-padded ``generate`` call, as
  :func:`mome.lit.llava.generate_answers` makes it), from ``max(3, rounds // 3)`` interleaved rounds.

Then LIMoE-tiny is trained on the embedded digits (``mome-train experiment=limoe_digits`` for ``--limoe-steps``
optimizer steps, batch 64, through mome's Lightning task as ``tools/router_study.py`` does) and its zero-shot
top-1 on the digits test split is measured before and after quantizing (``--limoe-steps 0`` skips it).

With ``--llava-model <folder>`` (a saved MoE-LLaVA, e.g. the ``model`` folder of the shapes demo's stage III,
``make llava-demo``), its VQA exact match on the shapes test split is measured in fp32, int8 and int4 by
``mome-eval model=local-dir:<folder> eval_task=vqa data=shapes routing_report=false quantize=<mode>`` (in-process,
plus any ``--llava-overrides``), the path a user takes.

The tables of docs/quantization.md::

    python tools/bench_quantize.py --rounds 9 --limoe-steps 600 --out /tmp/quantization.md
    make llava-demo && python tools/bench_quantize.py --families --limoe-steps 0 \
        --llava-model logs/moe_llava_shapes/stage3/model
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402  (tools/bench.py: timing helpers and the MoE-LLaVA decode step)

import mome  # noqa: E402
from mome.layers.experts import is_quantized  # noqa: E402

FAMILIES = (
    "vmoe_tiny_patch8_e4",
    "soft_moe_vit_tiny_patch8_e8",
    "limoe_tiny_patch8_e4",
    "vlmo_tiny_patch8_32",
    "moe_llava_tiny_e4",
)
MODES = ("fp32", "int8", "int4")
DEVICE = torch.device("cpu")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (each once); a quantized weight counts the tensors it holds."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        parts = [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]] if is_quantized(tensor) else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


def family_inputs(name: str, model: nn.Module, batch: int) -> tuple[Callable[[nn.Module], Tensor], Any]:
    """``(forward, decode)``: ``forward(model)`` -> one flat output tensor on fixed inputs; ``decode(model)`` -> a
    callable making one greedy KV-cache step (MoE-LLaVA only, from tools/bench.py), else None."""
    generator = torch.Generator().manual_seed(1)
    if name.startswith("moe_llava"):
        prompt = [1, *[model.config.image_token_id] * model.num_image_tokens, *[5 + (i * 7) % 40 for i in range(32)]]
        ids = torch.tensor([prompt] * batch)
        pixels = torch.randn(batch, *model.pretrained_cfg.input_size, generator=generator)
        decode = bench.llava_bench(name, 1, DEVICE).decode
        return (lambda m: m(input_ids=ids, pixel_values=pixels).logits.flatten()), decode
    size = model.pretrained_cfg.input_size[1:]
    images = torch.randn(batch, 3, *size, generator=generator)
    if name.startswith(("limoe", "vlmo")):
        texts = mome.get_tokenizer(name)([f"a photo of the digit {i}" for i in range(batch)])

        def dual(m):
            image_features, text_features, _ = m(images, texts)
            return torch.cat([image_features.flatten(), text_features.flatten()])

        return dual, None
    return (lambda m: m(images).flatten()), None


def interleaved(calls: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median and min-max seconds per call, the candidates timed in turn each round (``bench.timed``); the samples
    are kept for the spread (``bench.measure_interleaved`` keeps medians only)."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            samples[name].append(bench.timed(call, DEVICE))
    return {name: {"median": statistics.median(s), "min": min(s), "max": max(s)} for name, s in samples.items()}


def no_grad(call: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            call()

    return run


GENERATE_TOKENS = 16


def generation_calls(model: nn.Module, batch_size: int) -> Callable[[], None]:
    """Greedy generation of ``GENERATE_TOKENS`` tokens for 8 image prompts of 4 to 32 words (MoE-LLaVA), as
    :func:`mome.lit.llava.generate_answers` runs it: ``batch_size`` 8 is one left-padded ``generate`` call, 1 is
    the 8 prompts one after the other."""
    from mome.lit.llava import left_pad

    generator = torch.Generator().manual_seed(2)
    image = [model.config.image_token_id] * model.num_image_tokens
    prompts = [
        torch.tensor([[1, *image, *torch.randint(5, 80, (4 + 4 * i,), generator=generator).tolist()]]) for i in range(8)
    ]
    images = [torch.randn(1, *model.pretrained_cfg.input_size, generator=generator) for _ in prompts]
    groups = [list(range(8))] if batch_size == 8 else [[i] for i in range(8)]

    def run() -> None:
        with torch.no_grad():
            for group in groups:
                ids, mask = left_pad([prompts[i] for i in group], 0)
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    images=torch.cat([images[i] for i in group]),
                    max_new_tokens=GENERATE_TOKENS,
                    min_new_tokens=GENERATE_TOKENS,  # every row makes as many tokens
                    do_sample=False,
                    pad_token_id=0,
                )

    return run


def bench_family(name: str, batch: int, rounds: int, warmup: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    models = {"fp32": mome.create_model(name).eval()}
    for mode in MODES[1:]:
        models[mode] = mome.quantize(copy.deepcopy(models["fp32"]), mode)
    forward, decode = family_inputs(name, models["fp32"], batch)
    with torch.no_grad():
        outputs = {mode: forward(model) for mode, model in models.items()}
    fp32_bytes = weight_bytes(models["fp32"])
    times = interleaved({mode: no_grad(lambda m=m: forward(m)) for mode, m in models.items()}, rounds, warmup)
    decode_times = interleaved({mode: decode(m) for mode, m in models.items()}, rounds, warmup) if decode else {}
    generate_times = {}
    if decode:  # tokens/s of batched generation: the same 8 prompts at batch 1 and batch 8
        calls = {(mode, size): generation_calls(m, size) for mode, m in models.items() for size in (1, 8)}
        generate_times = interleaved(calls, max(3, rounds // 3), 1)
    rows = []
    for mode, model in models.items():
        diff = (outputs[mode] - outputs["fp32"]).abs()
        size = weight_bytes(model)
        rows.append(
            {
                "family": name,
                "mode": mode,
                "max_abs_diff": float(diff.max()),
                "mean_abs_diff": float(diff.mean()),
                "rel_diff": float(diff.norm() / outputs["fp32"].norm()),
                "weight_bytes": size,
                "weight_ratio": size / fp32_bytes,
                "forward_s": times[mode],
                "decode_s": decode_times.get(mode),
                "generate_tokens_per_s": {
                    size: 8 * GENERATE_TOKENS / generate_times[(mode, size)]["median"] for size in (1, 8)
                }
                if generate_times
                else None,
                "generate_s": {size: generate_times[(mode, size)] for size in (1, 8)} if generate_times else None,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def limoe_zero_shot(steps: int, seed: int) -> dict[str, float]:
    """Train LIMoE-tiny on the digits for ``steps`` steps, then its zero-shot test top-1 in fp32, int8 and int4."""
    import router_study  # tools/router_study.py: composing and running a mome-train config in-process

    from mome.cli._common import build_datamodule, build_task, build_trainer, check_trainer, seed_everything

    base = router_study.run_overrides([], seed, steps, "model", "cpu")  # vmoe_digits' step budget, no callbacks
    overrides = ["experiment=limoe_digits", *(o for o in base if o not in router_study.BASE_OVERRIDES)]
    with tempfile.TemporaryDirectory(prefix="bench_quantize_") as tmp:
        cfg = router_study.compose_run(overrides, Path(tmp))
        check_trainer(cfg)
        seed_everything(cfg)
        task = build_task(cfg)
        datamodule = build_datamodule(cfg, task)
        task.check_datamodule(datamodule)
        trainer = build_trainer(cfg)
        start = time.perf_counter()
        trainer.fit(task, datamodule=datamodule)
        train_s = time.perf_counter() - start
        trained = task.model.eval()
        accuracy = {"steps": int(trainer.global_step), "train_s": train_s}
        for mode in MODES:
            task.model = trained if mode == "fp32" else mome.quantize(copy.deepcopy(trained), mode)
            metrics = trainer.test(task, datamodule=datamodule, verbose=False)[0]
            key = next(k for k in metrics if k.endswith("top1"))
            accuracy[mode] = float(metrics[key])
            accuracy["metric"] = key
            print(json.dumps({"limoe_zero_shot": mode, key: accuracy[mode]}), flush=True)
    return accuracy


def llava_vqa(folder: Path, overrides: Sequence[str]) -> dict[str, Any]:
    """VQA exact match (overall and per question type) of the saved MoE-LLaVA in ``folder`` in fp32, int8 and int4,
    each by the command ``mome-eval ... eval_task=vqa quantize=<mode>`` (a subprocess, its results.json read)."""
    base = [f"model=local-dir:{folder}", "eval_task=vqa", "data=shapes", "routing_report=false", "routing_maps=0"]
    base += ["cost=false", "+trainer.enable_progress_bar=false", *overrides]
    result: dict[str, Any] = {"model": str(folder), "overrides": list(overrides)}
    with tempfile.TemporaryDirectory(prefix="bench_quantize_vqa_") as tmp:
        for mode in MODES:
            out = Path(tmp) / mode
            command = [sys.executable, "-m", "mome.cli.eval", *base, f"quantize={'null' if mode == 'fp32' else mode}"]
            start = time.perf_counter()
            done = subprocess.run([*command, f"hydra.run.dir={out}"], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
            record = json.loads((out / "results.json").read_text())
            result[mode] = {"metrics": record["metrics"], "n_samples": record["n_samples"]}
            result[mode]["eval_s"] = time.perf_counter() - start
            print(json.dumps({"llava_vqa": mode, **record["metrics"]}), flush=True)
    return result


def environment() -> str:
    import torchao

    return (
        f"{platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()}, "
        f"torch {torch.__version__}, torchao {torchao.__version__}, Python {platform.python_version()}"
    )


def spread(times: dict[str, float] | None, scale: float = 1e3) -> str:
    if not times:
        return "-"
    return f"{times['median'] * scale:.2f} ({times['min'] * scale:.2f}-{times['max'] * scale:.2f})"


def markdown(
    rows: Sequence[dict[str, Any]],
    zero_shot: dict[str, float] | None,
    command: str,
    args,
    vqa: dict[str, Any] | None = None,
) -> str:
    lines = [f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}: {environment()}."]
    if rows:
        lines[0] += (
            f" Forward: batch {args.batch}, median (min-max) of {args.rounds} interleaved rounds after "
            f"{args.warmup} warm-up calls, in ms."
        )
        lines += [
            "",
            "| family | mode | max \\|Δ\\| | mean \\|Δ\\| | rel | weights (KiB) | ratio | forward ms "
            "| decode ms/token |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    for row in rows:
        lines.append(
            f"| {row['family']} | {row['mode']} | {row['max_abs_diff']:.2e} | {row['mean_abs_diff']:.2e} | "
            f"{row['rel_diff']:.2e} | {row['weight_bytes'] / 1024:.0f} | {row['weight_ratio']:.3f} | "
            f"{spread(row['forward_s'])} | {spread(row['decode_s'])} |"
        )
    generated = [row for row in rows if row.get("generate_s")]
    if generated:
        lines += [
            "",
            f"MoE-LLaVA greedy generation, {GENERATE_TOKENS} new tokens for each of 8 image prompts: batch 1 (one "
            "prompt at a time) and batch 8 (one left-padded `generate` call); tokens/s from the median of the "
            "interleaved rounds, the time of the 8 prompts in ms as median (min-max):",
            "",
            "| model | mode | batch 1 tokens/s | batch 8 tokens/s | batch 1 ms | batch 8 ms |",
            "|---|---|---|---|---|---|",
        ]
        for row in generated:
            speed, times = row["generate_tokens_per_s"], row["generate_s"]
            lines.append(
                f"| {row['family']} | {row['mode']} | {speed[1]:.0f} | {speed[8]:.0f} | "
                f"{spread(times[1])} | {spread(times[8])} |"
            )
    if zero_shot:
        lines += [
            "",
            f"LIMoE-tiny trained {zero_shot['steps']} steps on the digits ({zero_shot['train_s']:.0f} s), zero-shot "
            f"`{zero_shot['metric']}` on the test split:",
            "",
            "| mode | zero-shot top-1 | change (points) |",
            "|---|---|---|",
        ]
        for mode in MODES:
            change = 100 * (zero_shot[mode] - zero_shot["fp32"])
            lines.append(f"| {mode} | {100 * zero_shot[mode]:.1f} % | {change:+.1f} |")
    if vqa:
        fp32 = vqa["fp32"]["metrics"]
        kinds = sorted(k for k in fp32 if k.startswith("exact_match/"))
        lines += [
            "",
            f"MoE-LLaVA `{vqa['model']}`, VQA exact match on {vqa['fp32']['n_samples']} shapes test questions "
            "(`mome-eval eval_task=vqa quantize=<mode>`), overall and per question type, in %:",
            "",
            "| mode | exact match | change (points) | " + " | ".join(k.split("/", 1)[1] for k in kinds) + " |",
            "|---|---|---|" + "---|" * len(kinds),
        ]
        for mode in MODES:
            metrics = vqa[mode]["metrics"]
            change = 100 * (metrics["exact_match"] - fp32["exact_match"])
            per_kind = " | ".join(f"{100 * metrics[k]:.1f}" for k in kinds)
            lines.append(f"| {mode} | {100 * metrics['exact_match']:.1f} | {change:+.1f} | {per_kind} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families", nargs="*", choices=FAMILIES, default=list(FAMILIES), help="none given: skip the per-family table"
    )
    parser.add_argument("--batch", type=int, default=8, help="images or prompts per forward (decode: 1)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--limoe-steps", type=int, default=600, help="0: skip the LIMoE zero-shot accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: a shared small CPU times more steadily)"
    )
    parser.add_argument("--llava-model", type=Path, default=None, help="a saved MoE-LLaVA folder: its VQA exact match")
    parser.add_argument(
        "--llava-overrides", nargs="*", default=[], help="mome-eval overrides of the VQA runs (e.g. data.root=...)"
    )
    parser.add_argument("--out", type=Path, default=None, help="the Markdown table")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.llava_model is not None and not (args.llava_model / "config.json").is_file():
        parser.error(f"--llava-model {args.llava_model}: no saved model there (no config.json)")
    command = "python tools/bench_quantize.py " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = [row for name in args.families for row in bench_family(name, args.batch, args.rounds, args.warmup)]
        zero_shot = None
        if args.limoe_steps > 0:
            for logger in ("lightning.pytorch", "lightning.fabric"):
                logging.getLogger(logger).setLevel(logging.ERROR)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore")
                zero_shot = limoe_zero_shot(args.limoe_steps, args.seed)
        vqa = None
        if args.llava_model is not None:
            vqa = llava_vqa(args.llava_model.resolve(), args.llava_overrides)
        text = markdown(rows, zero_shot, command.strip(), args, vqa)
    finally:  # a caller in the same process (the tests) keeps its threads
        torch.set_num_threads(threads)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(
            json.dumps({"command": command, "rows": rows, "zero_shot": zero_shot, "vqa": vqa}, indent=1)
        )
    return {"rows": rows, "zero_shot": zero_shot, "vqa": vqa}


if __name__ == "__main__":
    main()
