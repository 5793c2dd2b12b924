"""Forward+backward cost of a mixture of LoRA experts (``mome.peft``) against a single peft LoRA of the same total
rank, on a frozen ``nn.Linear(D, D)`` over ``T`` tokens.

Candidates (interleaved: each round times every candidate once, so a shared machine's drifts hit all alike):

- ``experts-token``: :class:`mome.peft.LoRAExpertsLinear`, ``E`` experts of rank ``r``, top-``k`` per token;
- ``experts-soft``: the same, every expert per token (``routing="soft"``);
- ``peft-lora-Er``: one ``peft.tuners.lora.Linear`` of rank ``E r`` (the same total rank: the target is at most 1.3x);
- ``peft-lora-kr``: one peft LoRA of rank ``k r`` (the rank a token's chosen experts hold).

Each call is ``loss = out.square().mean(); loss.backward()`` on a fresh forward; reported: the median over the
rounds and the min-max, in milliseconds, and each candidate's median over ``peft-lora-Er``'s.

    python tools/bench_lora_experts.py --tokens 512 4096 --dim 512 --experts 8 --rank 8 --top-k 2 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn


def _candidates(tokens: int, dim: int, experts: int, rank: int, top_k: int) -> dict[str, tuple[nn.Module, object]]:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    from mome.peft import LoRAExpertsConfig, LoRAExpertsLinear

    def experts_layer(routing: str) -> nn.Module:
        config = LoRAExpertsConfig(
            target_modules=["x"],
            r=rank,
            num_experts=experts,
            top_k=None if routing == "soft" else top_k,
            routing=routing,
            init_lora_weights=False,
        )
        layer = LoRAExpertsLinear(nn.Linear(dim, dim), config, "x")
        layer.base_layer.requires_grad_(False)
        return layer

    def peft_lora(total_rank: int) -> nn.Module:
        config = LoraConfig(r=total_rank, lora_alpha=16, init_lora_weights=False)
        layer = PeftLoraLinear(
            nn.Linear(dim, dim), "default", config=config, r=total_rank, lora_alpha=16, init_lora_weights=False
        )
        layer.base_layer.requires_grad_(False)
        return layer

    x = torch.randn(tokens, dim)
    return {
        "experts-token": (experts_layer("token"), x),
        "experts-soft": (experts_layer("soft"), x),
        f"peft-lora-{experts * rank}": (peft_lora(experts * rank), x),
        f"peft-lora-{top_k * rank}": (peft_lora(top_k * rank), x),
    }


def _step(layer: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    layer(x).square().mean().backward()
    elapsed = time.perf_counter() - start
    layer.zero_grad(set_to_none=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    baseline = f"peft-lora-{args.experts * args.rank}"
    print(
        f"D={args.dim}, E={args.experts}, r={args.rank}, k={args.top_k}, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads; forward+backward, ms (median [min-max]) and median / {baseline}"
    )
    print("| T | candidate | ms | / " + baseline + " |")
    print("|---|---|---|---|")
    for tokens in args.tokens:
        candidates = _candidates(tokens, args.dim, args.experts, args.rank, args.top_k)
        for layer, x in candidates.values():
            for _ in range(args.warmup):
                _step(layer, x)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(args.rounds):
            for name, (layer, x) in candidates.items():
                times[name].append(_step(layer, x))
        reference = statistics.median(times[baseline])
        for name, samples in times.items():
            median = statistics.median(samples)
            spread = f"{1e3 * min(samples):.2f}-{1e3 * max(samples):.2f}"
            print(f"| {tokens} | {name} | {1e3 * median:.2f} [{spread}] | {median / reference:.2f}x |")


if __name__ == "__main__":
    main()
