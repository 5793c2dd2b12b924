"""Expert-parallel scaling: measure all-to-all here, predict the step time of an MoE transformer on 8-1024 GPUs.

Two sub-commands::

    python tools/simulate_scaling.py measure --json a2a.json     # gloo all_to_all_single on 2 CPU processes
    python tools/simulate_scaling.py predict                     # preset vmoe_b16_e32 on H100 nodes
    python tools/simulate_scaling.py predict --preset mixtral_8x7b --markdown table.md

``measure`` times ``torch.distributed.all_to_all_single`` between 2 gloo processes over message
sizes from 4 KiB to 64 MiB, fits ``t(V) = alpha + V / beta`` (latency from small messages, bandwidth
from large ones), and times one expert-parallel :class:`~mome.layers.SparseMoE` forward+backward,
profiling the share of its collectives, so the all-to-all's part in a real layer is measured.

``predict`` is the analytic model of ``docs/scaling.md``. Per GPU and training step, for each MoE layer
(``T`` tokens per GPU, width ``D``, expert width ``H``, top-``k``, capacity factor ``c``, ``b`` bytes per
element, expert-parallel group of ``P`` GPUs):

- all-to-all: 4 exchanges (dispatch and combine, forward and backward) of ``V = c k T D b`` bytes, of
  which ``(P - 1) / P`` leave the GPU; ``t_a2a = alpha (P - 1) + V (G - 1) / (P B_nvlink) + V (P - G)
  / (P B_ib)`` (``G`` GPUs per node; the second term only for ``P > G``; intra- and inter-node bytes
  are sent one after the other, a conservative choice);
- compute: ``3 x`` the forward FLOPs ``4 c k T D H`` (experts) plus ``8 T D^2 + 4 T S D`` (attention
  of the block) at ``peak x mfu``; dense blocks add ``8 T D^2 + 4 T S D + 4 T D H_dense``;
- gradient all-reduce (ring): ``2 (n - 1) / n x bytes / B`` over the ``W`` data-parallel ranks for dense
  weights and over the ``W / P`` replicas for expert weights, ``B`` = NVLink within a node, else the
  per-GPU InfiniBand bandwidth; a fraction ``overlap`` of it is hidden behind the backward pass;
- memory: the expert state per GPU, 16 bytes per expert parameter (bf16 weights and gradients, fp32
  master weights and Adam moments) over ``P`` GPUs, reported, not enforced.

The hardware defaults are public specifications, not measurements: H100 SXM bf16 dense peak 989
TFLOP/s, NVLink 4 450 GB/s per direction per GPU, one 400 Gb/s (50 GB/s) NDR InfiniBand NIC per GPU,
8 GPUs per node, an all-to-all start-up latency of 10 us per peer, and 40 % MFU. Every one is a flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ------------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class ModelShape:
    """The MoE transformer being scaled (one training step, per GPU)."""

    name: str
    dim: int  # D
    expert_hidden: int  # H, per expert
    dense_hidden: int  # H of the dense FFN blocks
    layers: int
    moe_every: int  # every n-th block is MoE (1: all)
    num_experts: int  # E
    top_k: int  # k
    capacity_factor: float  # c (1.0: dropless average)
    seq_len: int  # S, for the attention term
    tokens_per_gpu: int  # T
    bytes_per_element: int = 2  # bf16

    @property
    def moe_layers(self) -> int:
        return self.layers // self.moe_every

    @property
    def dense_layers(self) -> int:
        return self.layers - self.moe_layers

    def expert_parameters_per_layer(self) -> int:
        return self.num_experts * 2 * self.dim * self.expert_hidden

    def dense_parameters(self) -> int:
        attention = 4 * self.dim * self.dim * self.layers
        return attention + self.dense_layers * 2 * self.dim * self.dense_hidden


PRESETS = {
    # V-MoE B/16 with 32 experts in every other block (Riquelme et al. 2021 train E=8/32), 32 images of 197 tokens.
    "vmoe_b16_e32": ModelShape("vmoe_b16_e32", 768, 3072, 3072, 12, 2, 32, 2, 1.05, 197, 32 * 197),
    # Mixtral 8x7B-like: 32 blocks, all MoE, 8 SwiGLU experts (counted as 2 matrices of 14336 x 1.5), 8k tokens.
    "mixtral_8x7b": ModelShape("mixtral_8x7b", 4096, 21504, 0, 32, 1, 8, 2, 1.0, 4096, 8192),
    # A many-expert stack where expert parallelism must cross nodes: 128 experts of width 1024.
    "fine_grained_e128": ModelShape("fine_grained_e128", 2048, 1024, 8192, 24, 2, 128, 8, 1.0, 2048, 8192),
}


@dataclass(frozen=True)
class Hardware:
    peak_flops: float = 989e12  # H100 SXM bf16 dense
    mfu: float = 0.40
    nvlink_bytes_per_s: float = 450e9  # per GPU, per direction
    ib_bytes_per_s: float = 50e9  # one 400 Gb/s NIC per GPU
    gpus_per_node: int = 8
    a2a_latency_s: float = 10e-6  # per peer
    overlap: float = 0.5  # share of the gradient all-reduce hidden behind the backward pass


def all_to_all_bytes(shape: ModelShape, ep_size: int) -> float:
    """Bytes one GPU sends to *other* GPUs per MoE layer per step: 4 exchanges of ``c k T D b (P-1)/P``."""
    per_exchange = shape.capacity_factor * shape.top_k * shape.tokens_per_gpu * shape.dim * shape.bytes_per_element
    return 4 * per_exchange * (ep_size - 1) / ep_size


def all_to_all_seconds(shape: ModelShape, ep_size: int, hw: Hardware) -> float:
    """Time of the 4 exchanges of one MoE layer (latency per peer, NVLink within a node, IB across)."""
    if ep_size == 1:
        return 0.0
    per_exchange = shape.capacity_factor * shape.top_k * shape.tokens_per_gpu * shape.dim * shape.bytes_per_element
    in_node = min(ep_size, hw.gpus_per_node)
    intra = per_exchange * (in_node - 1) / ep_size / hw.nvlink_bytes_per_s
    inter = per_exchange * max(ep_size - in_node, 0) / ep_size / hw.ib_bytes_per_s
    return 4 * (hw.a2a_latency_s * (ep_size - 1) + intra + inter)


def ring_all_reduce_seconds(num_bytes: float, ranks: int, hw: Hardware, across_nodes: bool) -> float:
    """``2 (n - 1) / n x bytes / B``, B = NVLink inside a node, the per-GPU IB bandwidth when the ring crosses nodes."""
    if ranks <= 1:
        return 0.0
    bandwidth = hw.ib_bytes_per_s if across_nodes else hw.nvlink_bytes_per_s
    return 2 * (ranks - 1) / ranks * num_bytes / bandwidth


def compute_seconds(shape: ModelShape, hw: Hardware) -> float:
    """Forward+backward (3x forward) FLOPs of all blocks at ``peak x mfu``."""
    tokens, dim = shape.tokens_per_gpu, shape.dim
    attention = 8 * tokens * dim * dim + 4 * tokens * shape.seq_len * dim
    experts = 4 * shape.capacity_factor * shape.top_k * tokens * dim * shape.expert_hidden
    dense_ffn = 4 * tokens * dim * shape.dense_hidden
    forward = shape.layers * attention + shape.moe_layers * experts + shape.dense_layers * dense_ffn
    return 3 * forward / (hw.peak_flops * hw.mfu)


def predict(shape: ModelShape, world_size: int, hw: Hardware, max_ep_size: int | None = None) -> dict[str, float]:
    """Step-time terms (seconds) of one training step on ``world_size`` GPUs, expert parallelism ``P = min(E, W)``."""
    ep_size = min(shape.num_experts, world_size, max_ep_size or world_size)
    replicas = world_size // ep_size
    b = shape.bytes_per_element
    compute = compute_seconds(shape, hw)
    a2a = shape.moe_layers * all_to_all_seconds(shape, ep_size, hw)
    across_nodes = world_size > hw.gpus_per_node  # the replicas of a shard are P ranks apart: same node iff W <= G
    dense_reduce = ring_all_reduce_seconds(shape.dense_parameters() * b, world_size, hw, across_nodes)
    local_expert_bytes = shape.moe_layers * shape.expert_parameters_per_layer() / ep_size * b
    expert_reduce = ring_all_reduce_seconds(local_expert_bytes, replicas, hw, across_nodes)
    exposed_reduce = (1 - hw.overlap) * (dense_reduce + expert_reduce)
    step = compute + a2a + exposed_reduce
    return {
        "gpus": world_size,
        "ep_size": ep_size,
        "replicas": replicas,
        "compute_ms": 1e3 * compute,
        "all_to_all_ms": 1e3 * a2a,
        "all_reduce_ms": 1e3 * exposed_reduce,
        "step_ms": 1e3 * step,
        "all_to_all_share": a2a / step,
        "a2a_mb_per_layer": all_to_all_bytes(shape, ep_size) / 1e6,
        "tokens_per_s": world_size * shape.tokens_per_gpu / step,
        # bf16 weights and grads, fp32 master weights and two Adam moments: 16 bytes per expert parameter
        "expert_state_gb": shape.moe_layers * shape.expert_parameters_per_layer() / ep_size * 16 / 1e9,
    }


def prediction_table(shape: ModelShape, hw: Hardware, gpus: list[int], max_ep_size: int | None) -> list[dict]:
    rows = [predict(shape, w, hw, max_ep_size) for w in gpus]
    base = rows[0]["tokens_per_s"] / rows[0]["gpus"]
    for row in rows:
        row["weak_scaling_efficiency"] = row["tokens_per_s"] / row["gpus"] / base
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- measure
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_seconds(fn, repeats: int, before=None) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up; ``before()`` runs untimed."""
    times = []
    for index in range(repeats + 1):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        if index:  # the first call is the warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


#: Profiler event names of the collectives an expert-parallel layer issues (functional and c10d ones).
_COLLECTIVE_EVENTS = ("all_to_all", "alltoall", "all_gather", "allgather", "wait_tensor")


def _measure_worker(rank: int, world_size: int, port: int, sizes: list[int], repeats: int, out: str, layer) -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from mome.layers import SparseMoE
    from mome.layers.expert_parallel import shard_experts

    torch.set_num_threads(1)  # one core per process on this 2-core machine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {"all_to_all": [], "layer": {}}
    for size in sizes:
        send, recv = torch.randn(size // 4), torch.empty(size // 4)
        seconds = _median_seconds(
            lambda send=send, recv=recv: dist.all_to_all_single(recv, send), repeats, dist.barrier
        )
        results["all_to_all"].append({"bytes": size, "seconds": seconds})

    tokens, dim, hidden, experts, top_k = layer
    torch.manual_seed(0)
    moe = SparseMoE(dim, hidden, experts, top_k)
    shard_experts(moe)
    x = torch.randn(tokens, dim, requires_grad=True)

    def step():
        moe(x).square().mean().backward()

    fwd_bwd = _median_seconds(step, repeats, dist.barrier)
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # where one step's time goes
        step()
    collective_us = sum(
        event.self_cpu_time_total
        for event in prof.key_averages()
        if any(name in event.key.lower() for name in _COLLECTIVE_EVENTS)
    )
    profiled_us = sum(event.self_cpu_time_total for event in prof.key_averages())
    results["layer"] = {
        "tokens_per_rank": tokens,
        "dim": dim,
        "hidden": hidden,
        "experts": experts,
        "top_k": top_k,
        "fwd_bwd_seconds": fwd_bwd,
        "bytes_per_exchange": tokens * top_k * dim * 4,
        "profiled_collective_share": collective_us / profiled_us,
        "collective_events": sorted(
            {e.key for e in prof.key_averages() if any(n in e.key.lower() for n in _COLLECTIVE_EVENTS)}
        ),
    }
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def fit_latency_bandwidth(points: list[dict], small: int = 2**16, large: int = 2**22) -> tuple[float, float]:
    """``t(V) = alpha + V / beta`` from ``[{bytes, seconds}]``, robust to outliers: ``1 / beta`` is the median slope
    between consecutive messages of at least ``large`` bytes, ``alpha`` the median of ``t - V / beta`` over
    messages of at most ``small`` bytes."""
    small_points = [p for p in points if p["bytes"] <= small]
    large_points = sorted((p for p in points if p["bytes"] >= large), key=lambda p: p["bytes"])
    if not small_points or len(large_points) < 2:
        raise ValueError(f"the fit needs messages of at most {small} bytes and two of at least {large} bytes")
    slopes = [(b["seconds"] - a["seconds"]) / (b["bytes"] - a["bytes"]) for a, b in zip(large_points, large_points[1:])]
    beta = 1.0 / max(statistics.median(slopes), 1e-15)
    alpha = statistics.median(p["seconds"] - p["bytes"] / beta for p in small_points)
    return alpha, beta


def measure(args: argparse.Namespace) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    sizes = [2**p for p in range(args.min_log2, args.max_log2 + 1)]
    layer = (args.tokens, args.dim, args.hidden, args.experts, args.top_k)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(_measure_worker, args=(2, _free_port(), sizes, args.repeats, out, layer), nprocs=2, join=True)
        results = json.loads(Path(out).read_text())
    alpha, beta = fit_latency_bandwidth(results["all_to_all"])
    layer_result = results["layer"]
    exchange = alpha + layer_result["bytes_per_exchange"] / 2 / beta  # half the rows stay on the rank (P = 2)
    layer_result["predicted_a2a_seconds"] = 4 * exchange
    layer_result["a2a_share"] = 4 * exchange / layer_result["fwd_bwd_seconds"]
    results.update(
        alpha_seconds=alpha,
        beta_bytes_per_s=beta,
        backend="gloo",
        processes=2,
        threads_per_process=1,
        torch=torch.__version__,
    )
    print("| bytes | seconds | GB/s |\n|---|---|---|")
    for point in results["all_to_all"]:
        print(f"| {point['bytes']} | {point['seconds']:.3g} | {point['bytes'] / point['seconds'] / 1e9:.3g} |")
    print(f"fit: alpha = {alpha * 1e6:.1f} us, beta = {beta / 1e9:.2f} GB/s")
    print(
        f"SparseMoE T={args.tokens}/rank D={args.dim} H={args.hidden} E={args.experts} k={args.top_k}, P=2: "
        f"fwd+bwd {layer_result['fwd_bwd_seconds'] * 1e3:.1f} ms; the 4 exchanges: "
        f"{layer_result['predicted_a2a_seconds'] * 1e3:.1f} ms predicted by the fit "
        f"({100 * layer_result['a2a_share']:.1f} %), collectives {100 * layer_result['profiled_collective_share']:.1f} "
        f"% of the profiled CPU time ({', '.join(layer_result['collective_events'])})"
    )
    return results


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="time gloo all_to_all_single on 2 CPU processes")
    m.add_argument("--min-log2", type=int, default=12)
    m.add_argument("--max-log2", type=int, default=26)
    m.add_argument("--repeats", type=int, default=7)
    m.add_argument("--tokens", type=int, default=2048, help="tokens per rank of the timed MoE layer")
    m.add_argument("--dim", type=int, default=512)
    m.add_argument("--hidden", type=int, default=2048)
    m.add_argument("--experts", type=int, default=8)
    m.add_argument("--top-k", type=int, default=2)
    m.add_argument("--json", type=Path)
    p = sub.add_parser("predict", help="the analytic step-time model for 8-1024 GPUs")
    p.add_argument("--preset", choices=sorted(PRESETS), default="vmoe_b16_e32")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--max-ep-size", type=int, help="cap P (default: min(E, W))")
    p.add_argument("--tokens-per-gpu", type=int, help="override the preset's T")
    for field in dataclasses.fields(Hardware):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)

    if args.command == "measure":
        results = measure(args)
    else:
        shape = PRESETS[args.preset]
        if args.tokens_per_gpu:
            shape = dataclasses.replace(shape, tokens_per_gpu=args.tokens_per_gpu)
        hw = Hardware(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hardware)})
        rows = prediction_table(shape, hw, sorted(args.gpus), args.max_ep_size)
        columns = [
            "gpus",
            "ep_size",
            "replicas",
            "compute_ms",
            "all_to_all_ms",
            "all_reduce_ms",
            "step_ms",
            "all_to_all_share",
            "a2a_mb_per_layer",
            "expert_state_gb",
            "weak_scaling_efficiency",
        ]
        table = markdown(rows, columns)
        header = f"{shape}\n{hw}"
        print(header)
        print(table)
        if args.markdown:
            args.markdown.write_text(f"```\n{header}\n```\n\n{table}\n")
        results = {"shape": dataclasses.asdict(shape), "hardware": dataclasses.asdict(hw), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
