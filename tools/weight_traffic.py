"""How far an MoE layer's forward+backward is from its weight-traffic bound on this machine.

At few rows per expert (T=512, E=64, k=2: 16 rows) the expert matmuls are bound by moving the expert weights, not by
FLOPs. A forward+backward of SwiGLU experts (``w_in [E, 2H, D]``, ``w_out [E, D, H]``, fp32) moves at least:

- the weights, read by the forward pass and again by the input-gradient matmuls: ``2 W`` bytes;
- the weight gradients, written once into fresh memory (``zero_grad(set_to_none=True)``, the default): ``W`` bytes,
  each page first touched by that write,

with ``W = 4 * E * 3 * D * H``. This tool measures, in one process, the machine's copy bandwidth (``dst.copy_(src)``
on a 256 MiB buffer: bytes read + written per second) and its first-touch rate (``torch.empty(...).fill_``: bytes
of fresh memory written per second), and prints the bound ``2 W / copy_bandwidth + W / first_touch_rate`` for each
shape, next to the measured forward+backward of mome's ``SparseMoE`` (median of ``--repeats`` rounds).

    python tools/weight_traffic.py --shapes 512:64:2 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mome.layers import SparseMoE  # noqa: E402

MIB = 2**20


def median_seconds(call, repeats: int) -> float:
    call()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def copy_bandwidth(repeats: int, size_mib: int = 256) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``size_mib`` MiB (both already touched)."""
    src = torch.ones(size_mib * MIB // 4)
    dst = torch.zeros_like(src)
    return 2 * src.numel() * 4 / median_seconds(lambda: dst.copy_(src), repeats)


def first_touch_rate(repeats: int, size_mib: int = 256) -> float:
    """Bytes per second of writing fresh memory (``torch.empty`` then ``fill_``: page faults included)."""
    numel = size_mib * MIB // 4
    return numel * 4 / median_seconds(lambda: torch.empty(numel).fill_(1.0), repeats)


def layer_seconds(tokens: int, experts: int, top_k: int, dim: int, repeats: int) -> tuple[float, int]:
    """Median forward+backward seconds of a SwiGLU ``SparseMoE`` (H = 4D/k) and its expert weight bytes."""
    hidden = 4 * dim // top_k
    torch.manual_seed(0)
    layer = SparseMoE(dim, hidden, experts, top_k, gated=True, act_layer=torch.nn.SiLU, bias=False, renormalize=True)
    x = torch.randn(1, tokens, dim)
    upstream = torch.randn_like(x)

    def step():
        layer(x.requires_grad_(True)).backward(upstream)
        layer.zero_grad(set_to_none=True)

    weight_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
    return median_seconds(step, repeats), weight_bytes


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["512:64:2"], help="T:E:k shapes (D=--dim, H=4D/k)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bandwidth, touch = copy_bandwidth(args.repeats), first_touch_rate(args.repeats)
    print(f"copy bandwidth {bandwidth / 1e9:.2f} GB/s (read + write), first touch {touch / 1e9:.2f} GB/s")
    rows = []
    for text in args.shapes:
        tokens, experts, top_k = (int(v) for v in text.split(":"))
        seconds, weight_bytes = layer_seconds(tokens, experts, top_k, args.dim, args.repeats)
        bound = 2 * weight_bytes / bandwidth + weight_bytes / touch
        rows.append({"shape": text, "weights_mb": weight_bytes / 1e6, "bound_s": bound, "measured_s": seconds})
        print(
            f"T={tokens} E={experts} k={top_k}: expert weights {weight_bytes / 1e6:.0f} MB, "
            f"bound {1e3 * bound:.1f} ms, measured {1e3 * seconds:.1f} ms ({seconds / bound:.2f}x the bound)"
        )
    return rows


if __name__ == "__main__":
    main()
