"""Benchmark mome's MoE FFN against a dense FFN of equal active FLOPs and transformers' Mixtral block.

All implementations run in one process, side by side, on the same inputs; each figure is the median
of ``--repeats`` timed rounds after warm-up (each round calls every implementation once). Ratios
are to the dense FFN with hidden width ``k * H`` (same active FLOPs as ``k`` experts of width ``H``). Example::

    python tools/bench_moe.py                      # the two reference shapes of the foundation issue
    python tools/bench_moe.py --shapes 4096:8:2:2048 --act swiglu --json out.json

A shape is ``T:E:k:H`` (tokens, experts, top-k, expert hidden width); ``--dim`` sets D.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mome.layers import SparseMoE  # noqa: E402


@dataclass
class Shape:
    tokens: int
    experts: int
    top_k: int
    hidden: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        tokens, experts, top_k, hidden = (int(v) for v in text.split(":"))
        return cls(tokens, experts, top_k, hidden)

    def __str__(self) -> str:
        return f"T={self.tokens} E={self.experts} k={self.top_k} H={self.hidden}"


class DenseSwiGLU(nn.Module):
    """Dense SwiGLU FFN (Mixtral's expert shape): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


def dense_ffn(dim: int, hidden: int, act: str) -> nn.Module:
    if act == "gelu":
        from timm.layers import Mlp

        return Mlp(dim, hidden)
    return DenseSwiGLU(dim, hidden)


def mixtral_block(dim: int, shape: Shape, implementation: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=dim,
        intermediate_size=shape.hidden,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    for param in block.parameters():
        nn.init.normal_(param, std=dim**-0.5)
    return block


def timed_calls(module: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The two measured calls of a module: a forward without grad, and a forward + backward."""
    upstream = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        inputs = x.detach().requires_grad_(True)
        module(inputs).backward(upstream)
        module.zero_grad(set_to_none=True)

    return {"forward_s": forward, "forward_backward_s": forward_backward}


def measure_interleaved(modules: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call for every module, timed in rounds (one call of each module per round)
    so that slow drifts of a shared machine hit all implementations alike."""
    calls = {name: timed_calls(module, x) for name, module in modules.items()}
    results: dict[str, dict[str, float]] = {name: {} for name in modules}
    for kind in ("forward_s", "forward_backward_s"):
        for name in modules:
            for _ in range(warmup):
                calls[name][kind]()
        samples: dict[str, list[float]] = {name: [] for name in modules}
        for _ in range(repeats):
            for name in modules:
                start = time.perf_counter()
                calls[name][kind]()
                samples[name].append(time.perf_counter() - start)
        for name in modules:
            results[name][kind] = statistics.median(samples[name])
    return results


def bench_shape(dim: int, shape: Shape, act: str, repeats: int, peers: bool) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(1, shape.tokens, dim)
    gated = act == "swiglu"
    moe_options = dict(renormalize=gated, gated=gated, act_layer=nn.SiLU if gated else nn.GELU, bias=not gated)
    candidates: dict[str, nn.Module] = {
        "dense": dense_ffn(dim, shape.top_k * shape.hidden, act),
        "mome sorted (dropless)": SparseMoE(dim, shape.hidden, shape.experts, shape.top_k, **moe_options),
        "mome buffers (cf 1.25)": SparseMoE(
            dim, shape.hidden, shape.experts, shape.top_k, dispatch="buffers", capacity_factor=1.25, **moe_options
        ),
    }
    if peers and gated:
        for implementation in ("eager", "grouped_mm", "batched_mm"):
            # batched_mm gathers one weight matrix per assignment: skip it where that exceeds 4 GiB.
            gathered = shape.tokens * shape.top_k * dim * 3 * shape.hidden * 4
            if implementation == "batched_mm" and gathered > 4 * 2**30:
                continue
            candidates[f"transformers Mixtral {implementation}"] = mixtral_block(dim, shape, implementation)
    for module in candidates.values():
        module.train()
    results = measure_interleaved(candidates, x, repeats)
    rows = [
        {"shape": str(shape), "act": act, "dim": dim, "implementation": name, **result}
        for name, result in results.items()
    ]
    dense = rows[0]
    for row in rows:
        row["forward_ratio"] = row["forward_s"] / dense["forward_s"]
        row["forward_backward_ratio"] = row["forward_backward_s"] / dense["forward_backward_s"]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096:8:2:2048", "512:64:2:256"], help="T:E:k:H")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--act", nargs="+", default=["gelu", "swiglu"], choices=["gelu", "swiglu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true", help="skip transformers' Mixtral block")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the environment here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables as Markdown here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for text in args.shapes:
        for act in args.act:
            rows.extend(bench_shape(args.dim, Shape.parse(text), act, args.repeats, peers=not args.no_peers))
            print_table(rows_for(rows, text, act))
    import transformers

    env = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown_report(rows, env, argv if argv is not None else sys.argv[1:]))
    return rows


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where available, else the platform's machine string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_report(rows: list[dict], env: dict, argv: list[str]) -> str:
    """The results as Markdown tables, one per (shape, activation), with the environment."""
    lines = [
        "# MoE FFN performance",
        "",
        f"Generated by `python tools/bench_moe.py {' '.join(argv)}` on {env['date']}: {env['machine']}, "
        f"{env['threads']} threads, fp32, torch {env['torch']}, transformers {env['transformers']}, "
        f"Python {env['python']}. Median of repeated runs; ratio = time / dense FFN with the same active FLOPs.",
    ]
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["shape"], row["act"]), []).append(row)
    for (shape, act), group in groups.items():
        lines += ["", f"## {shape}, D={group[0]['dim']}, {act}", ""]
        lines += ["| implementation | forward (s) | fwd+bwd (s) | fwd ratio | fwd+bwd ratio |", "|---|---|---|---|---|"]
        for row in group:
            lines.append(
                f"| {row['implementation']} | {row['forward_s']:.4f} | {row['forward_backward_s']:.4f} | "
                f"{row['forward_ratio']:.2f} | {row['forward_backward_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def rows_for(rows: list[dict], shape_text: str, act: str) -> list[dict]:
    shape = str(Shape.parse(shape_text))
    return [row for row in rows if row["shape"] == shape and row["act"] == act]


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\n{rows[0]['shape']}  D={rows[0]['dim']}  {rows[0]['act']}  (seconds; ratio to dense)")
    print(f"{'implementation':34s} {'forward':>10s} {'fwd+bwd':>10s} {'fwd ratio':>10s} {'f+b ratio':>10s}")
    for row in rows:
        print(
            f"{row['implementation']:34s} {row['forward_s']:10.4f} {row['forward_backward_s']:10.4f} "
            f"{row['forward_ratio']:10.2f} {row['forward_backward_ratio']:10.2f}"
        )


if __name__ == "__main__":
    main()
