"""mome's performance suite: MoE layers, peer implementations, full models and peak memory, side by side.

Everything is measured in one process (memory: one fresh subprocess per item), fp32, on ``--threads``
CPU threads or on ``--device cuda`` (timed with ``torch.cuda.synchronize``). Each figure is the median
of ``--repeats`` timed rounds after warm-up; a round calls every implementation of a shape once, so
slow drifts of a shared machine hit all of them alike. Sections (``--only``, default all):

- ``layers``: the sparse MoE layer (``SparseMoE``, both dispatch paths, and the modality MoE with two
  modality pools) and Soft MoE, forward and forward+backward, against a dense FFN of the same active
  FLOPs, over tokens x experts x top-k;
- ``peers``: adds, on the same shapes and in the same rounds, transformers' Mixtral sparse block with
  every experts implementation it offers and lucidrains' ``mixture-of-experts``, ``st-moe-pytorch``
  and ``soft-moe-pytorch`` (``pip install -e ".[bench]"``; a missing one is reported as unavailable);
- ``models``: training images/s (or tokens/s) of V-MoE S/32, Soft-MoE S/16, LIMoE-tiny and
  MoE-LLaVA-tiny against their dense twins of equal active FLOPs, and MoE-LLaVA-tiny's decode latency
  per token with the KV cache;
- ``memory``: peak memory of the target shapes and of every model's training step;
- ``routers`` (only when named): every router and expert design of ``mome.layers`` in a ``SparseMoE`` of the
  sparse shapes (and SMEAR), forward and forward+backward, against the top-k router of the same shape.

Examples::

    python tools/bench.py                                   # the full suite (about 20 minutes on 2 cores)
    python tools/bench.py --quick                           # a smoke test (tiny shapes and models)
    python tools/bench.py --only layers peers --shapes 4096:8:2 512:64:2 --repeats 7
    python tools/bench.py --json /tmp/bench.json --markdown docs/benchmarks.md   # the generated tables
    python tools/bench.py --only routers --shapes 4096:8:2 4096:8:1 --repeats 9     # the routers' cost
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mome  # noqa: E402
from mome.layers import SMEAR, ModalityMoE, MoE, SoftMoE, SparseMoE  # noqa: E402
from mome.layers import experts as experts_module  # noqa: E402

SECTIONS = ("layers", "peers", "models", "memory", "routers")
DEFAULT_SECTIONS = ("layers", "peers", "models", "memory")  # ``routers`` runs when named (``--only routers``)
#: (tokens, experts, ratio limit) of every router's forward+backward against top-k (BASE's exact assignment excepted:
#: its cost is reported, not held to the limit).
ROUTER_TARGET = (4096, 8, 1.10)
#: Designs whose cost is reported, not held to the router target: BASE's exact assignment, and DeepSeekMoE's
#: fine-grained segmentation, which dispatches ``m`` times the rows (``T m k`` assignments of width ``D``: the gather,
#: the weighting and the scatter-add grow with it, while the expert FLOPs stay those of top-k).
REPORTED_ONLY = ("base", "deepseek fine-grained")
TOP_K = "top_k"
MIXTRAL_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "deepgemm", "sonicmoe")
#: (tokens, experts, top-k or None for any, ratio limit) of the forward+backward targets of mome's sorted dispatch.
SPARSE_TARGETS = ((4096, 8, 2, 1.05), (4096, 8, 1, 1.15), (512, 64, None, 1.5), (64, 8, None, 2.5))
SOFT_TARGET = 1.2
DENSE = "dense"
SORTED = "mome sorted (dropless)"
#: The sorted dispatch with the CPU per-expert loop off, on the shapes where mome takes the loop.
GROUPED_ONLY = "mome sorted, grouped matmul only"
SOFT = "mome SoftMoE"
SOFT_SEQUENCE = 256  # Soft MoE routes within sequences of at most this many tokens
DEFAULT_MODELS = ("vmoe_s32_e8", "soft_moe_vit_small_patch16_224_e128", "limoe_tiny_patch8_e4", "moe_llava_tiny_e4")
QUICK_MODELS = ("vmoe_tiny_patch8_e4", "soft_moe_vit_tiny_patch8_e8", "limoe_tiny_patch8_e4", "moe_llava_tiny_e4")
#: Default training batch per model (the ViTs at 224 px cost most; the rest are tiny).
MODEL_BATCH = {"vmoe_s32_e8": 32, "soft_moe_vit_small_patch16_224_e128": 8}
#: timm ViT timed beside a vision MoE model, for reference.
TIMM_REFERENCE = {
    "vmoe_s32_e8": "vit_small_patch32_224",
    "soft_moe_vit_small_patch16_224_e128": "vit_small_patch16_224",
}

METHOD = [
    "Sparse MoE (`SparseMoE`, SwiGLU experts unless `--act gelu`): expert hidden width H = 4D/k, so the "
    "k active experts of a token cost exactly one dense FFN of width kH = 4D (the standard transformer "
    "FFN); the dense baseline is that FFN. `mome modality` is `ModalityMoE` with two pools of E/2 experts "
    "(first half of the tokens modality 0, second half modality 1), no shared expert, same H.",
    "Soft MoE (`SoftMoE`, GELU experts of width H = 4D): tokens form sequences of M = min(T, 256); each "
    "has E x P = M/2 slots. The dense equivalent is a GELU FFN of width H/2 on every token (the same "
    "expert FLOPs: M/2 slots x H = M tokens x H/2); Soft MoE also pays its dispatch/combine products.",
    "Peers run on the same inputs in the same rounds: transformers' `MixtralSparseMoeBlock` (each "
    "experts implementation; dropless, SwiGLU, width H), lucidrains' `mixture-of-experts` (GShard top-2, "
    "capacity 1.25, ReLU experts of width H; k=2 only), `st-moe-pytorch` (top-n >= 2, capacity 1.25, "
    "GEGLU experts of width H) and `soft-moe-pytorch` (GELU experts of width H, same slots).",
    "Ratio = time / the dense baseline's time on the same shape, measured in the same rounds. An "
    "implementation whose first call takes longer than `--max-call-seconds` is timed once more, warm, and "
    "that call is its figure (n=1; the cold call itself where it took over four times the limit).",
    "Models: one training step = forward, loss + `mome.aux_losses`, backward, AdamW step. The dense twin "
    "of a sparse model has FFNs of width kH in its MoE blocks; of a Soft MoE model, FFNs of width "
    "H x slots / tokens; of LIMoE (k=1), the model without MoE layers; of MoE-LLaVA, the same LLM with "
    "FFN width kH in its MoE layers. Decode: greedy steps with the KV cache after an image prompt.",
    "Peak memory: on CUDA `torch.cuda.max_memory_allocated` in a fresh process; on CPU each item runs "
    "in a fresh subprocess and reports its peak resident set (VmHWM of /proc/self/status) minus the "
    "resident set after imports, i.e. weights, inputs, activations, gradients (and AdamW state for "
    "models) plus allocator slack. Layers (target shapes, k=2; mome, dense, Mixtral grouped_mm): "
    "two forward+backward calls; models: two training steps.",
]


# ---------------------------------------------------------------------------------------------
# Shapes and candidates
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """One layer benchmark: ``family`` ``"sparse"`` (T, E, k, H) or ``"soft"`` (T, E, P slots, H)."""

    family: str
    tokens: int
    experts: int
    top_k: int
    hidden: int
    dim: int = 512
    act: str = "swiglu"

    @property
    def seq_len(self) -> int:
        return min(self.tokens, SOFT_SEQUENCE) if self.family == "soft" else self.tokens

    @property
    def slots(self) -> int:
        """Soft MoE slots per expert (``E * P = M / 2``); 0 when fewer than one."""
        return self.seq_len // 2 // self.experts

    def __str__(self) -> str:
        if self.family == "soft":
            batch = self.tokens // self.seq_len
            return f"T={self.tokens} ({batch}x{self.seq_len}) E={self.experts} P={self.slots} H={self.hidden}"
        return f"T={self.tokens} E={self.experts} k={self.top_k} H={self.hidden}"

    @classmethod
    def parse(cls, text: str, dim: int = 512, act: str = "swiglu", family: str = "sparse") -> LayerShape:
        """``T:E:k`` or ``T:E:k:H`` (H defaults to 4D/k; Soft MoE: 4D)."""
        values = [int(v) for v in text.split(":")]
        if len(values) not in (3, 4) or min(values) < 1:
            raise ValueError(f"a shape is T:E:k or T:E:k:H with positive integers, got {text!r}")
        tokens, experts, top_k = values[:3]
        hidden = values[3] if len(values) == 4 else default_hidden(family, dim, top_k)
        return cls(family, tokens, experts, top_k, hidden, dim, act)


def default_hidden(family: str, dim: int, top_k: int) -> int:
    return 4 * dim if family == "soft" else 4 * dim // top_k


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


class CallWith(nn.Module):
    """``module(x, *extra)`` as a one-argument module; the first output of a tuple result."""

    def __init__(self, module: nn.Module, *extra) -> None:
        super().__init__()
        self.module, self.extra = module, extra

    def forward(self, x):
        out = self.module(x, *self.extra)
        return out[0] if isinstance(out, tuple) else out


class GroupedMatmulOnly(nn.Module):
    """``module`` with the sorted dispatch's per-expert loop turned off (``mome.layers.experts.PER_EXPERT_MIN_ROWS``
    raised during its forward pass): the grouped-matmul computation, the other side of the selection rule."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        previous, experts_module.PER_EXPERT_MIN_ROWS = experts_module.PER_EXPERT_MIN_ROWS, sys.maxsize
        try:
            return self.module(x)
        finally:
            experts_module.PER_EXPERT_MIN_ROWS = previous


def mixtral_block(shape: LayerShape, implementation: str) -> nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=shape.dim,
        intermediate_size=shape.hidden,
        num_local_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    for param in block.parameters():
        nn.init.normal_(param, std=shape.dim**-0.5)
    return CallWith(block)


def lucidrains_moe(shape: LayerShape) -> nn.Module:
    from mixture_of_experts import MoE as LucidrainsMoE

    return CallWith(LucidrainsMoE(shape.dim, num_experts=shape.experts, hidden_dim=shape.hidden))


def st_moe(shape: LayerShape) -> nn.Module:
    from st_moe_pytorch import MoE as STMoE

    mult = shape.hidden * 3 / (2 * shape.dim)  # st-moe's GEGLU expert is int(dim * mult * 2 / 3) wide
    return CallWith(STMoE(shape.dim, num_experts=shape.experts, expert_hidden_mult=mult, gating_top_n=shape.top_k))


def lucidrains_soft_moe(shape: LayerShape) -> nn.Module:
    from soft_moe_pytorch import SoftMoE as LucidrainsSoftMoE

    layer = LucidrainsSoftMoE(
        dim=shape.dim, num_slots=shape.slots, num_experts=shape.experts, expert_mult=shape.hidden / shape.dim
    )
    return CallWith(layer)


Factory = Callable[[], nn.Module]


def layer_candidates(shape: LayerShape, peers: bool, device_type: str = "cpu") -> dict[str, Factory | str]:
    """Implementation name -> module factory, or the reason it is not measured on this shape.

    The first entry is the dense baseline. Modules take ``x [B, N, D]`` and return a tensor of its shape.
    """
    if shape.family == "soft":
        return soft_candidates(shape, peers)
    dim, hidden, experts, top_k = shape.dim, shape.hidden, shape.experts, shape.top_k
    gated = shape.act == "swiglu"
    options = dict(renormalize=gated, gated=gated, act_layer=nn.SiLU if gated else nn.GELU, bias=not gated)
    half = shape.tokens // 2
    modality_ids = torch.cat([torch.zeros(1, half), torch.ones(1, shape.tokens - half)], 1).long()
    candidates: dict[str, Factory | str] = {
        f"{DENSE} (width {top_k * hidden})": lambda: dense_ffn(dim, top_k * hidden, shape.act),
        SORTED: lambda: SparseMoE(dim, hidden, experts, top_k, **options),
        GROUPED_ONLY: (
            (lambda: GroupedMatmulOnly(SparseMoE(dim, hidden, experts, top_k, **options)))
            if device_type == "cpu" and shape.tokens * top_k >= experts_module.PER_EXPERT_MIN_ROWS * experts
            else f"skipped: the same computation as {SORTED!r} here (grouped matmul)"
        ),
        "mome buffers (cf 1.25)": lambda: SparseMoE(
            dim, hidden, experts, top_k, dispatch="buffers", capacity_factor=1.25, **options
        ),
    }
    if experts >= 2 and top_k <= experts // 2:
        candidates["mome modality (2 pools, sorted)"] = lambda: CallWith(
            ModalityMoE(dim, hidden, [experts // 2, experts - experts // 2], top_k, num_shared_experts=0, **options),
            modality_ids,
        )
    else:
        candidates["mome modality (2 pools, sorted)"] = f"skipped: k={top_k} > E/2 experts per pool"
    if not peers:
        return candidates
    for implementation in MIXTRAL_IMPLEMENTATIONS:
        name = f"transformers Mixtral {implementation}"
        if not gated:
            candidates[name] = "skipped: Mixtral experts are SwiGLU (use --act swiglu)"
            continue
        # batched_mm gathers one weight matrix per assignment: skip it where that exceeds 4 GiB.
        gathered = shape.tokens * top_k * dim * 3 * hidden * 4
        if implementation == "batched_mm" and gathered > 4 * 2**30:
            candidates[name] = f"skipped: gathers {gathered / 2**30:.0f} GiB of expert weights"
            continue
        if implementation == "eager" and experts >= 64 and device_type == "cpu":
            # Measured on 2 cores: one forward+backward takes 10-30 s at E=64 and about 2 minutes at E=128.
            candidates[name] = "skipped: its backward takes 10 s to minutes per call on CPU at E >= 64"
            continue
        candidates[name] = lambda implementation=implementation: mixtral_block(shape, implementation)
    candidates["mixture-of-experts (GShard top-2, cf 1.25)"] = (
        (lambda: lucidrains_moe(shape)) if top_k == 2 else "skipped: top-2 gating only"
    )
    candidates["st-moe-pytorch (top-n, cf 1.25)"] = (
        (lambda: st_moe(shape)) if top_k >= 2 else "skipped: top-n >= 2 only"
    )
    return candidates


def router_candidates(shape: LayerShape) -> dict[str, Factory | str]:
    """Router or design name -> factory of a layer of ``shape`` (dropless, sorted dispatch); the first entry, the
    top-k router, is the baseline of the ratios. Designs that fix ``k`` (BASE: 1, GShard: 2) are skipped on the
    other shapes."""
    dim, hidden, experts, top_k = shape.dim, shape.hidden, shape.experts, shape.top_k
    gated = shape.act == "swiglu"
    options = dict(gated=gated, act_layer=nn.SiLU if gated else nn.GELU, bias=not gated)

    def sparse(router: str = "top_k", k: int = top_k, **extra) -> Factory:
        return lambda: SparseMoE(dim, hidden, experts, k, router=router, **options, **extra)

    fine = 2 if hidden % 2 == 0 else 1
    return {
        TOP_K: sparse(renormalize=gated),
        "noisy_top_k + BPR": sparse("noisy_top_k", batch_priority=True),
        "expert_choice (c=k)": sparse("expert_choice", capacity_factor=float(top_k)),
        "sinkhorn": sparse("sinkhorn"),
        "xmoe": sparse("xmoe"),
        "hash (top-1 by design)": sparse("hash"),
        "base (exact assignment)": sparse("base", 1) if top_k == 1 else "skipped: BASE routes top-1",
        "gshard": sparse("gshard", 2) if top_k == 2 else "skipped: GShard routes top-2",
        "deepseek routing (aux-free bias, sequence loss)": sparse(
            bias_update_rate=1e-3, renormalize=True, aux_loss_weights={"sequence_balance": 1e-4}
        ),
        f"deepseek fine-grained (m={fine}, aux-free bias)": sparse(
            fine_grained=fine, bias_update_rate=1e-3, renormalize=True
        ),
        f"deepseek fine-grained (m={fine}, aux-free, 1 shared)": sparse(
            fine_grained=fine, bias_update_rate=1e-3, renormalize=True, num_shared_experts=1
        ),
        "SMEAR (per-sequence merged expert)": lambda: SMEAR(dim, hidden, experts, **options),
    }


def soft_candidates(shape: LayerShape, peers: bool) -> dict[str, Factory | str]:
    dim, hidden = shape.dim, shape.hidden
    candidates: dict[str, Factory | str] = {
        f"{DENSE} (width {hidden // 2})": lambda: dense_ffn(dim, hidden // 2, "gelu"),
        SOFT: lambda: SoftMoE(dim, hidden, shape.experts, shape.slots),
    }
    if peers:
        candidates["soft-moe-pytorch"] = lambda: lucidrains_soft_moe(shape)
    return candidates


def layer_input(shape: LayerShape, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape.tokens // shape.seq_len, shape.seq_len, shape.dim, generator=generator)
    return x.to(device)


def skip_reason(shape: LayerShape) -> str | None:
    if shape.family == "soft" and shape.slots < 1:
        return f"skipped: E={shape.experts} experts > M/2={shape.seq_len // 2} slots per sequence"
    if shape.family == "soft" and shape.tokens % shape.seq_len:
        return f"skipped: T is not a multiple of the sequence length {shape.seq_len}"
    if shape.top_k > shape.experts:
        return f"skipped: k={shape.top_k} > E={shape.experts}"
    return None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - start


def layer_calls(module: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """The two measured calls of a layer: a forward without grad, and a forward + backward."""
    upstream = torch.randn_like(x)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        inputs = x.detach().requires_grad_(True)
        module(inputs).backward(upstream)
        module.zero_grad(set_to_none=True)

    return {"forward_s": forward, "forward_backward_s": forward_backward}


def measure_interleaved(
    calls: dict[str, dict[str, Callable[[], None]]],
    repeats: int,
    warmup: int,
    device: torch.device,
    max_call_s: float = math.inf,
) -> dict[str, dict]:
    """Median seconds per call of every candidate and kind of call, in interleaved rounds.

    ``results[name][kind]`` is the median, ``results[name][kind + "_rounds"]`` the seconds of every round (in
    order: round ``i`` of two candidates ran back to back, so :func:`ratio_range` compares them round by round).
    The first (cold) warm-up call of each candidate is timed; over ``max_call_s``, a second (warm) call is
    its only sample (``samples`` records how many), or the cold one where that took over four times the
    limit. A candidate that raises is reported ``unavailable``.
    """
    results: dict[str, dict] = {name: {"samples": repeats} for name in calls}
    kinds = list(next(iter(calls.values()))) if calls else []
    for kind in kinds:
        live, samples = [], {}
        for name in calls:
            if results[name].get("note", "").startswith("unavailable"):
                continue
            try:
                first = timed(calls[name][kind], device)  # cold: allocations, caches, lazy initialisation
                if max_call_s < first <= 4 * max_call_s:
                    first = timed(calls[name][kind], device)  # warm
                for _ in range(warmup - 1 if first <= max_call_s else 0):
                    calls[name][kind]()
            except Exception as error:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
                results[name] = {"note": f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:160]}"}
                continue
            if first > max_call_s:
                results[name][kind] = first
                results[name]["samples"] = 1
                results[name]["note"] = f"timed once: a call takes {first:.1f} s > --max-call-seconds"
            else:
                live.append(name)
                samples[name] = []
        for _ in range(repeats):
            for name in live:
                samples[name].append(timed(calls[name][kind], device))
        for name in live:
            results[name][kind] = statistics.median(samples[name])
            results[name][f"{kind}_rounds"] = samples[name]
    return results


def ratio_range(row: dict, baseline: dict, kind: str) -> tuple[float, float] | None:
    """The lowest and highest round-by-round ratio ``row[kind] / baseline[kind]`` (the spread of a ratio whose
    median :func:`measure_interleaved` reports); None where either side has fewer than two rounds."""
    ours, theirs = row.get(f"{kind}_rounds") or [], baseline.get(f"{kind}_rounds") or []
    if len(ours) < 2 or len(ours) != len(theirs):
        return None
    ratios = [a / b for a, b in zip(ours, theirs)]
    return min(ratios), max(ratios)


def add_ratio(out: dict, row: dict, baseline: dict, kind: str, name: str) -> None:
    """``out[name]``: the ratio of the medians of ``kind`` of ``row`` and ``baseline``; ``out[name + "_range"]``: its
    round-by-round spread."""
    if row.get(kind) and baseline.get(kind):
        out[name] = row[kind] / baseline[kind]
        spread = ratio_range(row, baseline, kind)
        if spread is not None:
            out[f"{name}_range"] = list(spread)


@dataclass
class Budget:
    """A wall-clock budget for the whole run (``--max-seconds``)."""

    seconds: float = math.inf
    start: float = field(default_factory=time.perf_counter)

    def spent(self) -> bool:
        return time.perf_counter() - self.start > self.seconds


def build(candidates: dict[str, Factory | str], device: torch.device) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Instantiate the factories (seeded alike); a factory that fails makes its candidate unavailable."""
    modules, notes = {}, {}
    for name, factory in candidates.items():
        if isinstance(factory, str):
            notes[name] = factory
            continue
        torch.manual_seed(0)
        try:
            modules[name] = factory().to(device).train()
        except Exception as error:  # noqa: BLE001 - e.g. a peer package that is not installed
            notes[name] = f"unavailable: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return modules, notes


def bench_layer_shape(
    shape: LayerShape, args, device: torch.device, budget: Budget, section: str = "layers"
) -> list[dict]:
    """Rows of every implementation of one shape (ratios to its first row: the dense FFN, or for ``section=
    "routers"`` the top-k router)."""
    base = {"section": section, "family": shape.family, "shape": str(shape), **asdict(shape)}
    reason = skip_reason(shape) or ("skipped: --max-seconds spent" if budget.spent() else None)
    if section == "routers":
        candidates = router_candidates(shape)
    else:
        candidates = layer_candidates(shape, peers="peers" in args.sections, device_type=device.type)
    if reason:
        return [{**base, "implementation": name, "note": reason} for name in candidates]
    modules, notes = build(candidates, device)
    x = layer_input(shape, device)
    calls = {name: layer_calls(module, x) for name, module in modules.items()}
    results = measure_interleaved(calls, args.repeats, args.warmup, device, args.max_call_seconds)
    del modules, calls
    rows = []
    dense = results.get(next(iter(candidates)), {})
    for name in candidates:
        row = {**base, "implementation": name, **results.get(name, {})}
        if name in notes:
            row["note"] = notes[name]
        for kind in ("forward", "forward_backward"):
            add_ratio(row, row, dense, f"{kind}_s", f"{kind}_ratio")
        rows.append(row)
    return rows


def layer_shapes(args) -> list[LayerShape]:
    """The sparse sweep (or ``--shapes``) and the Soft MoE sweep over tokens x experts."""
    if args.shapes:
        sparse = [LayerShape.parse(text, args.dim, args.act) for text in args.shapes]
    else:
        sparse = [
            LayerShape("sparse", t, e, k, args.hidden or default_hidden("sparse", args.dim, k), args.dim, args.act)
            for t in args.tokens
            for e in args.experts
            for k in args.top_k
        ]
    tokens = sorted({s.tokens for s in sparse})
    experts = sorted({s.experts for s in sparse})
    soft = [
        LayerShape("soft", t, e, 1, default_hidden("soft", args.dim, 1), args.dim, "gelu")
        for t in tokens
        for e in experts
    ]
    return ([] if args.no_sparse else sparse) + ([] if args.no_soft else soft)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def dense_vit_twin(model: nn.Module) -> nn.Module:
    """The same ViT with every MoE (or Soft MoE) FFN replaced by a timm ``Mlp`` of equal active FLOPs:
    width ``k * H`` for token-choice layers, ``H * slots / tokens`` for Soft MoE layers."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    blocks = model.blocks
    twin = VisionTransformer(
        img_size=model.patch_embed.img_size,
        patch_size=model.patch_embed.patch_size,
        embed_dim=model.embed_dim,
        depth=len(blocks),
        num_heads=blocks[0].attn.num_heads,
        num_classes=model.num_classes,
        class_token=model.cls_token is not None,
        global_pool=model.global_pool,
        qk_norm=not isinstance(blocks[0].attn.q_norm, nn.Identity),
        mlp_ratio=blocks[0].mlp.fc1.out_features / model.embed_dim if hasattr(blocks[0].mlp, "fc1") else 4.0,
        act_layer="gelu_tanh",
    )
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    for index, block in enumerate(blocks):
        mlp = block.mlp
        if isinstance(mlp, MoE):
            width = mlp.router.top_k * mlp.experts.hidden_dim
        elif isinstance(mlp, SoftMoE):
            width = round(mlp.experts.hidden_dim * mlp.num_experts * mlp.slots_per_expert / tokens)
        else:
            continue
        twin.blocks[index].mlp = Mlp(mlp.experts.dim, width, act_layer=type(mlp.experts.act))
    return twin


def dense_llava_twin(model: nn.Module) -> nn.Module:
    """MoE-LLaVA with each MoE FFN replaced by the LLM's dense FFN of width ``k * H`` (equal active FLOPs)."""
    import copy

    twin = copy.deepcopy(model)
    for index in model.moe_layers:
        layer = twin.model.language_model.layers[index]
        config = copy.deepcopy(model.config.text_config)
        config.intermediate_size = layer.mlp.router.top_k * layer.mlp.experts.hidden_dim
        torch.manual_seed(0)
        layer.mlp = DENSE_LLM_MLP[type(model.model.language_model).__name__](config)
    twin.config.moe_layers = []
    return twin


def _llm_mlp(module: str, name: str):
    def make(config):
        import importlib

        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)(config)

    return make


DENSE_LLM_MLP = {
    "PhiModel": _llm_mlp("phi", "PhiMLP"),
    "StableLmModel": _llm_mlp("stablelm", "StableLmMLP"),
    "Qwen2Model": _llm_mlp("qwen2", "Qwen2MLP"),
}


@dataclass
class ModelBench:
    """Models timed together: ``{label: model}``, a loss, a unit (images or tokens) per step."""

    candidates: dict[str, nn.Module]
    loss_fn: Callable[[nn.Module], torch.Tensor]
    unit: str
    units_per_step: int
    decode: Callable[[nn.Module], Callable[[], None]] | None = None


def vision_bench(name: str, batch_size: int, device: torch.device, reference: bool = True) -> ModelBench:
    import timm

    model = mome.create_model(name, num_classes=1000)
    size = tuple(model.patch_embed.img_size)
    images = torch.randn(batch_size, 3, *size, device=device)
    labels = torch.randint(0, 1000, (batch_size,), device=device)
    candidates = {name: model, f"{name} dense twin": dense_vit_twin(model)}
    if reference and name in TIMM_REFERENCE:
        candidates[f"timm {TIMM_REFERENCE[name]}"] = timm.create_model(TIMM_REFERENCE[name], img_size=size)
    return ModelBench(candidates, lambda m: nn.functional.cross_entropy(m(images), labels), "images", batch_size)


def limoe_bench(name: str, batch_size: int, device: torch.device) -> ModelBench:
    """A LIMoE model and its dense one-tower twin (top-1: one expert = one dense FFN), CLIP loss."""
    model = mome.create_model(name)
    if model.moe_layer_indices and model.blocks[model.moe_layer_indices[0]].mlp.router.top_k != 1:
        raise ValueError(f"{name}: the dense twin of a top-k>1 LIMoE is not implemented here")
    size = model.pretrained_cfg.input_size[1:]
    images = torch.randn(batch_size, 3, *size, device=device)
    texts = mome.get_tokenizer(name)([f"a photo of object number {i}" for i in range(batch_size)]).to(device)
    targets = torch.arange(batch_size, device=device)

    def clip_loss(m):
        image_features, text_features, scale = m(images, texts)
        logits = scale * image_features @ text_features.t()
        return (nn.functional.cross_entropy(logits, targets) + nn.functional.cross_entropy(logits.t(), targets)) / 2

    candidates = {name: model, f"{name} dense twin": mome.create_model(name, moe_layers="none")}
    tokens = batch_size * (model.patch_embed.num_patches + texts.shape[1])
    return ModelBench(candidates, clip_loss, "tokens", tokens)


def llava_bench(name: str, batch_size: int, device: torch.device, decode_tokens: int = 32) -> ModelBench:
    """MoE-LLaVA and its dense twin: causal-LM training on image prompts, and greedy decoding."""
    model = mome.create_model(name)
    image = [model.config.image_token_id] * model.num_image_tokens
    words = [5 + (i * 7) % 40 for i in range(32)]
    ids = torch.tensor([[1, *image, *words]] * batch_size, device=device)
    labels = ids.masked_fill(ids == model.config.image_token_id, -100)
    pixels = torch.randn(batch_size, *model.pretrained_cfg.input_size, device=device)

    def lm_loss(m):
        return m(input_ids=ids, pixel_values=pixels, labels=labels).loss

    def decode(m):
        """One greedy step with the KV cache after the prompt (the prefill runs at each new sequence)."""
        state = {}

        def step():
            with torch.no_grad():
                if "cache" not in state or state["length"] >= decode_tokens:
                    out = m(input_ids=ids[:1], pixel_values=pixels[:1], use_cache=True)
                    state.update(cache=out.past_key_values, length=0)
                    state["token"] = out.logits[:, -1:].argmax(-1)
                out = m(input_ids=state["token"], past_key_values=state["cache"], use_cache=True)
                state.update(cache=out.past_key_values, token=out.logits[:, -1:].argmax(-1), length=state["length"] + 1)

        return step

    candidates = {name: model, f"{name} dense twin": dense_llava_twin(model)}
    return ModelBench(candidates, lm_loss, "tokens", ids.numel(), decode=decode)


def model_bench(name: str, batch_size: int | None, device: torch.device) -> ModelBench:
    torch.manual_seed(0)
    if name.startswith("limoe"):
        bench = limoe_bench(name, batch_size or 32, device)
    elif name.startswith("moe_llava"):
        bench = llava_bench(name, batch_size or 8, device)
    else:
        bench = vision_bench(name, batch_size or MODEL_BATCH.get(name, 32), device)
    for model in bench.candidates.values():
        model.to(device)
    return bench


def train_step_fn(
    model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor], fused: bool = False
) -> Callable[[], None]:
    """One training step: forward, task loss + ``mome.aux_losses``, backward, AdamW step (torch's fused AdamW
    kernel with ``fused``; ``mome-train ... +task.optimizer.fused=true`` builds the same)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if fused else {}))
    model.train()

    def step():
        loss = loss_fn(model) + sum(mome.aux_losses(model).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bench_model(name: str, args, device: torch.device, budget: Budget) -> list[dict]:
    if budget.spent():
        return [{"section": "models", "model": name, "note": "skipped: --max-seconds spent"}]
    bench = model_bench(name, args.batch_size, device)
    calls = {
        label: {"step_s": train_step_fn(m, bench.loss_fn, fused=args.fused_adamw)}
        for label, m in bench.candidates.items()
    }
    results = measure_interleaved(calls, args.repeats, args.warmup, device, args.max_call_seconds)
    if bench.decode is not None:
        for model in bench.candidates.values():
            model.eval()
        decode = {label: {"decode_token_s": bench.decode(m)} for label, m in bench.candidates.items()}
        for label, result in measure_interleaved(decode, 4 * args.repeats, args.warmup, device).items():
            results[label].update({k: v for k, v in result.items() if k != "samples"})
    twin = results[f"{name} dense twin"]
    rows = []
    for label, result in results.items():
        row = {"section": "models", "model": label, "unit": bench.unit, "per_step": bench.units_per_step, **result}
        row["params_m"] = sum(p.numel() for p in bench.candidates[label].parameters()) / 1e6
        if row.get("step_s"):
            row["per_s"] = bench.units_per_step / row["step_s"]
        add_ratio(row, row, twin, "step_s", "ratio_to_dense_twin")
        add_ratio(row, row, twin, "decode_token_s", "decode_ratio_to_dense_twin")
        rows.append(row)
    return rows


def profile_model(name: str, args, device: torch.device, row_limit: int = 12) -> dict[str, list]:
    """``torch.profiler`` op tables of one warm training step of model ``name`` and of its dense twin (after one
    step of each as warm-up): ``{label: [(op, self seconds, share of the total)]}``, printed with the step's wall
    time."""
    from torch.profiler import ProfilerActivity, profile

    bench = model_bench(name, args.batch_size, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for label, model in bench.candidates.items():
        step = train_step_fn(model, bench.loss_fn, fused=args.fused_adamw)
        step()  # warm-up: AdamW's state, allocations
        with profile(activities=activities) as prof:
            wall = timed(step, device)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        tables[label] = [(e.key, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total) for e in events][
            :row_limit
        ]
        print(f"\n{label}: one warm training step, {wall:.2f} s wall, {total / 1e6:.2f} s of op time")
        for op, seconds, share in tables[label]:
            print(f"  {op:<60} {seconds:9.3f} s  {100 * share:5.1f}%")
    return tables


# ---------------------------------------------------------------------------------------------
# Peak memory (one fresh process per item)
# ---------------------------------------------------------------------------------------------
def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def memory_item(spec: dict) -> dict:
    """Peak memory of one item, measured in this (fresh) process: see ``METHOD``."""
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    baseline = _status_kib("VmRSS") if device.type == "cpu" else 0
    if spec["kind"] == "layer":
        shape = LayerShape(**spec["shape"])
        modules, notes = build({spec["name"]: layer_candidates(shape, True, device.type)[spec["name"]]}, device)
        if notes:
            return {"note": notes[spec["name"]]}
        call = layer_calls(modules[spec["name"]], layer_input(shape, device))["forward_backward_s"]
        calls = [call, call]
    else:
        bench = model_bench(spec["model"], spec["batch_size"], device)
        step = train_step_fn(bench.candidates[spec["name"]], bench.loss_fn)
        for other in set(bench.candidates) - {spec["name"]}:
            del bench.candidates[other]
        calls = [step, step]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for call in calls:
        call()
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"peak_mib": (_status_kib("VmHWM") - baseline) / 1024}


def memory_specs(args, timed_rows: list[dict]) -> list[dict]:
    """The items of the memory section: mome's implementations, the dense baseline, transformers'
    grouped_mm (and soft-moe-pytorch) forward+backward on the target shapes (k=2) and on the largest
    Soft MoE shape in the sweep, and every model's training step. Items the timing sections found
    skipped or unavailable are left out."""
    common = {"device": args.device, "threads": args.threads}
    peers = "peers" in args.sections or args.sections == ["memory"]
    targets = {(t, e) for t, e, _, _ in SPARSE_TARGETS}
    shapes = [shape for shape in layer_shapes(args) if not skip_reason(shape)]
    soft = [shape for shape in shapes if shape.family == "soft"]
    chosen = [
        s
        for s in shapes
        if s.family == "sparse" and (args.quick or ((s.tokens, s.experts) in targets and s.top_k == 2))
    ]
    chosen += [max(soft, key=lambda s: (s.tokens, s.experts))] if soft else []
    not_run = {
        (row.get("shape") or row.get("model"), row.get("implementation", row.get("model")))
        for row in timed_rows
        if row.get("note", "").startswith(("skipped", "unavailable"))
    }
    specs = []
    for shape in chosen:
        candidates = layer_candidates(shape, peers, torch.device(args.device).type)
        # mome's paths, the dense baseline and the fastest transformers path on CPU (quick: dense, sorted).
        names = [
            n for n in candidates if n.startswith((DENSE, "mome")) or n.endswith(("grouped_mm", "soft-moe-pytorch"))
        ]
        names = names[:2] if args.quick else names
        for name in names:
            if not isinstance(candidates[name], str) and (str(shape), name) not in not_run:
                specs.append({**common, "kind": "layer", "label": str(shape), "shape": asdict(shape), "name": name})
    for model in args.models[:1] if args.quick else args.models:
        labels = [model, f"{model} dense twin"]
        labels += [f"timm {TIMM_REFERENCE[model]}"] if model in TIMM_REFERENCE else []
        for label in labels:
            if (label, label) not in not_run:
                spec = {**common, "kind": "model", "label": model, "model": model, "name": label}
                specs.append({**spec, "batch_size": args.batch_size})
    return specs


def bench_memory(specs: list[dict], budget: Budget) -> list[dict]:
    rows = []
    for spec in specs:
        row = {"section": "memory", "item": spec["label"], "implementation": spec["name"]}
        if budget.spent():
            rows.append({**row, "note": "skipped: --max-seconds spent"})
            continue
        script = Path(__file__).resolve()
        done = subprocess.run(
            [sys.executable, str(script), "--memory-item", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            rows.append({**row, "note": f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:160]}"})
        else:
            rows.append({**row, **json.loads(lines[-1])})
    return rows


# ---------------------------------------------------------------------------------------------
# Profile (where the time of one shape goes)
# ---------------------------------------------------------------------------------------------
def profile_shape(shape: LayerShape, device: torch.device, rounds: int = 3, row_limit: int = 12) -> dict[str, list]:
    """``torch.profiler`` op tables of the dense baseline, mome's implementations and transformers' Mixtral
    block (``grouped_mm``, where transformers is installed) on one shape, for ``rounds`` forward+backward
    calls after a warm-up: ``{implementation: [(op, self seconds per call, share of the total)]}`` (also
    printed, with the number of calls of each op per forward+backward)."""
    from torch.profiler import ProfilerActivity, profile

    candidates = layer_candidates(shape, peers=True, device_type=device.type)
    profiled = (DENSE, "mome", "transformers Mixtral grouped_mm")
    modules, _ = build({n: f for n, f in candidates.items() if n.startswith(profiled) and callable(f)}, device)
    x = layer_input(shape, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for name, module in modules.items():
        call = layer_calls(module, x)["forward_backward_s"]
        call()  # warm-up
        with profile(activities=activities) as prof:
            for _ in range(rounds):
                call()
            synchronize(device)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        rows = [(e.key, e.self_cpu_time_total / 1e6 / rounds, e.self_cpu_time_total / total) for e in events]
        calls = {e.key: e.count / rounds for e in events}
        tables[name] = rows[:row_limit]
        print(f"\n{shape}: {name}, {total / 1e6 / rounds:.4f} s of op time per forward+backward")
        for op, seconds, share in tables[name]:
            print(f"  {op:<60} {seconds:9.4f} s  {100 * share:5.1f}%  {calls[op]:7.1f} calls")
    return tables


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def check_targets(layer_rows: list[dict]) -> list[dict]:
    """PASS/MISS of every target against the measured forward+backward ratios."""
    checks = []
    by_shape: dict[str, dict[str, dict]] = {}
    for row in layer_rows:
        by_shape.setdefault(row["shape"], {})[row["implementation"]] = row
    for shape, rows in by_shape.items():
        first = next(iter(rows.values()))
        if first["family"] == "sparse":
            mome_row = rows.get(SORTED, {})
            for tokens, experts, top_k, limit in SPARSE_TARGETS:
                if (first["tokens"], first["experts"]) == (tokens, experts) and top_k in (None, first["top_k"]):
                    checks.append(_check(f"{shape}: {SORTED} f+b / dense", mome_row, "forward_backward_ratio", limit))
            peers = [
                (row["forward_backward_s"], name)
                for name, row in rows.items()
                if name.startswith("transformers") and row.get("forward_backward_s")
            ]
            if peers and mome_row.get("forward_backward_s"):
                peer = min(peers)[1]
                versus = {}
                add_ratio(versus, mome_row, rows[peer], "forward_backward_s", "ratio")
                target = f"{shape}: {SORTED} f+b / fastest Mixtral ({peer.split()[-1]})"
                checks.append(_check(target, versus, "ratio", 1.0, within_spread=True))
        elif SOFT in rows:
            checks.append(_check(f"{shape}: {SOFT} f+b / dense", rows[SOFT], "forward_backward_ratio", SOFT_TARGET))
    return checks


def check_router_targets(router_rows: list[dict]) -> list[dict]:
    """PASS/MISS of every router's forward+backward ratio to top-k on the target shape (``REPORTED_ONLY`` excepted)."""
    tokens, experts, limit = ROUTER_TARGET
    return [
        _check(f"{row['shape']}: {row['implementation']} f+b / {TOP_K}", row, "forward_backward_ratio", limit)
        for row in router_rows
        if (row["tokens"], row["experts"]) == (tokens, experts)
        and row["implementation"] != TOP_K
        and not row["implementation"].startswith(REPORTED_ONLY)
        and row.get("forward_backward_ratio") is not None
    ]


def _check(target: str, row: dict, name: str, limit: float, within_spread: bool = False) -> dict:
    """PASS where the median ratio ``row[name]`` is at most ``limit``; the round-by-round range comes along. With
    ``within_spread`` (against a peer: "never slower, within the measured spread"), a median above the limit whose
    range reaches down to it is ``PASS (spread)``."""
    value, spread = row.get(name), row.get(f"{name}_range")
    status = "n/a" if value is None else ("PASS" if value <= limit else "MISS")
    if status == "MISS" and within_spread and spread and spread[0] <= limit:
        status = "PASS (spread)"
    check = {"section": "targets", "target": f"{target} <= {limit:g}", "value": value, "status": status}
    if row.get(f"{name}_range"):
        check["value_range"] = row[f"{name}_range"]
    return check


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
def fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def fmt_ratio(row: dict, name: str) -> str:
    """A ratio of medians with its round-by-round range: ``1.11 [1.05-1.18]``."""
    spread = row.get(f"{name}_range")
    text = fmt(row.get(name), 2)
    return f"{text} [{spread[0]:.2f}-{spread[1]:.2f}]" if text and spread else text


def _shape_rows(rows: list[dict]) -> list[list[str]]:
    """The table cells of per-shape timing rows (layers and routers)."""
    return [
        [
            r["shape"],
            r["implementation"],
            fmt(r.get("forward_s")),
            fmt(r.get("forward_backward_s")),
            fmt_ratio(r, "forward_ratio"),
            fmt_ratio(r, "forward_backward_ratio"),
            str(r.get("samples", "")) if r.get("forward_s") else "",
            r.get("note", ""),
        ]
        for r in rows
    ]


def tables(results: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, header, rows)`` of every section present, shared by the terminal and Markdown output."""
    out = []
    for family, title in (("sparse", "Sparse MoE layers"), ("soft", "Soft MoE layers")):
        rows = [r for r in results.get("layers", []) if r["family"] == family]
        if rows:
            header = ["shape", "implementation", "fwd (s)", "f+b (s)", "fwd ratio", "f+b ratio", "n", "note"]
            out.append((f"{title} (D={rows[0]['dim']}, {rows[0]['act']})", header, _shape_rows(rows)))
    if results.get("routers"):
        rows = results["routers"]
        header = ["shape", "router", "fwd (s)", "f+b (s)", f"fwd / {TOP_K}", f"f+b / {TOP_K}", "n", "note"]
        title = f"Routers (D={rows[0]['dim']}, {rows[0]['act']}; ratios to the top-k router)"
        out.append((title, header, _shape_rows(rows)))
    if results.get("models"):
        header = ["model", "step (s)", "units/s", "ratio", "decode ms/token", "decode ratio", "params (M)", "note"]
        body = [
            [
                r["model"],
                fmt(r.get("step_s"), 3),
                f"{r['per_s']:.1f} {r['unit']}/s" if r.get("per_s") else "",
                fmt_ratio(r, "ratio_to_dense_twin"),
                fmt(1e3 * r["decode_token_s"], 2) if r.get("decode_token_s") else "",
                fmt_ratio(r, "decode_ratio_to_dense_twin"),
                fmt(r.get("params_m"), 1),
                r.get("note", ""),
            ]
            for r in results["models"]
        ]
        out.append(("Models: training step (fwd+bwd+AdamW) and decoding; ratio to the dense twin", header, body))
    if results.get("memory"):
        header = ["item", "implementation", "peak (MiB)", "note"]
        body = [
            [r["item"], r["implementation"], fmt(r.get("peak_mib"), 1), r.get("note", "")] for r in results["memory"]
        ]
        out.append(("Peak memory", header, body))
    if results.get("targets"):
        header = ["target", "measured", "status"]
        body = [[r["target"], fmt_ratio(r, "value"), r["status"]] for r in results["targets"]]
        out.append(("Targets (forward+backward)", header, body))
    return out


def print_tables(results: dict) -> None:
    for title, header, body in tables(results):
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        print(f"\n{title}")
        for row in [header, *body]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


#: First line of the generated Markdown report; a file without it is never overwritten by ``--markdown``.
GENERATED_MARKER = "<!-- generated by tools/bench.py --markdown: do not edit by hand, rerun the tool -->"


def environment_line(env: dict, argv: list[str]) -> str:
    """The report's header sentence: the command, the date, the machine and the software."""
    return (
        f"Generated by `python tools/bench.py {' '.join(argv)}` on {env['date']}: {env['machine']}, "
        f"device {env['device']}, {env['threads']} threads, fp32, torch {env['torch']}, transformers "
        f"{env['transformers']}, timm {env['timm']}, Python {env['python']}; peers: {env['peers']}. "
        f"Median of {env['repeats']} rounds after {env['warmup']} warm-up call(s), ratios with the range of "
        f"their round-by-round values in brackets; the suite took "
        f"{env['seconds']:.0f} s."
    )


def markdown_tables(sections: list[tuple[str, list[str], list[list[str]]]]) -> list[str]:
    """Markdown lines of ``(title, header, rows)`` sections.

    Rows without a single figure (an implementation that is unavailable or skipped on a shape) leave the
    table: they are listed once per implementation and reason below it, with the shapes they concern, so
    every row of a table holds measurements and stays short enough to read on a screen.
    """
    lines: list[str] = []
    for title, header, body in sections:
        labels = ("shape", "implementation", "item", "model", "note")
        numeric = [i for i, name in enumerate(header) if name not in labels]
        note = header.index("note") if "note" in header else None
        name_column = header.index("implementation") if "implementation" in header else 0
        timed, untimed = [], {}
        for row in body:
            if note is not None and row[note] and not any(row[i] for i in numeric):
                untimed.setdefault((row[0], row[note]), []).append(row[name_column])
            else:
                timed.append(row)
        names = {}
        for row in body:
            names.setdefault(row[0], []).append(row[name_column])
        grouped: dict[tuple[str, tuple[str, ...]], list[str]] = {}
        for (shape, reason), which in untimed.items():
            everything = name_column != 0 and len(which) == len(names[shape]) > 1
            grouped.setdefault((reason, ("every implementation",) if everything else tuple(which)), []).append(shape)
        lines += ["", f"## {title}", ""]
        if timed:
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in timed]
        if grouped:
            lines += ["", "Not timed:", ""]
            for (reason, which), shapes in grouped.items():
                scope = "every shape" if len(shapes) == len(names) > 1 else "; ".join(shapes)
                subject = ", ".join(which)
                lines.append(f"- {subject} ({scope}): {reason}" if name_column != 0 else f"- {scope}: {reason}")
    return lines


def markdown_report(results: dict, argv: list[str]) -> str:
    """The whole generated report: header, method and every table; nothing in it is written by hand."""
    lines = [
        GENERATED_MARKER,
        "",
        "# Benchmark tables",
        "",
        environment_line(results["environment"], argv),
        "",
        "What the figures mean and which targets they meet: [the performance analysis](performance.md).",
        "",
        "## Method",
        "",
        *[f"- {line}" for line in METHOD],
        *markdown_tables(tables(results)),
    ]
    return "\n".join(lines) + "\n"


def check_markdown_target(path: Path) -> str | None:
    """Why ``path`` must not be overwritten (an existing file the tool did not generate), else ``None``."""
    if path.is_dir():
        return f"{path} is a folder"
    if path.exists():
        with path.open() as handle:
            first = handle.readline().rstrip("\n")
        if first != GENERATED_MARKER:
            return f"{path} was not generated by tools/bench.py (its first line is not the marker); not overwriting it"
    return None


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where available, else the platform's machine string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peer_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("mixture-of-experts", "st-moe-pytorch", "soft-moe-pytorch"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def environment(args) -> dict:
    import timm
    import transformers

    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "device": args.device,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "peers": peer_versions(),
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS), dest="sections")
    parser.add_argument("--quick", action="store_true", help="a small subset (D=64, T=64, E=8, tiny models)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 512, 4096])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64, 128])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=None, help="expert width H (default 4D/k)")
    parser.add_argument("--act", choices=["swiglu", "gelu"], default="swiglu")
    parser.add_argument("--shapes", nargs="+", default=None, help="T:E:k[:H] sparse shapes instead of the sweep")
    parser.add_argument("--no-soft", action="store_true", help="no Soft MoE shapes")
    parser.add_argument("--no-sparse", action="store_true", help="only the Soft MoE shapes (of --tokens x --experts)")
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="training batch of every model")
    parser.add_argument("--fused-adamw", action="store_true", help="models: torch's fused AdamW kernel")
    parser.add_argument("--max-call-seconds", type=float, default=3.0, help="time slower implementations once")
    parser.add_argument("--max-seconds", type=float, default=math.inf, help="skip what is left after this long")
    parser.add_argument("--json", type=Path, default=None, help="write every row and the environment here")
    parser.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="write the generated tables as Markdown here (docs/benchmarks.md); a hand-written file is refused",
    )
    parser.add_argument(
        "--profile", default=None, metavar="T:E:k[:H]", help="print the op profile of one sparse shape and exit"
    )
    parser.add_argument(
        "--profile-rounds", type=int, default=3, help="forward+backward calls profiled per implementation"
    )
    parser.add_argument(
        "--profile-model",
        default=None,
        metavar="NAME",
        help="print the op profile of one warm training step of a "
        "model of the models section and of its dense twin, and exit",
    )
    parser.add_argument("--memory-item", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("repeats", "warmup", "threads", "dim"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be positive")
    if args.markdown and (problem := check_markdown_target(args.markdown)):
        parser.error(f"--markdown: {problem}")
    if args.profile:
        try:
            LayerShape.parse(args.profile, args.dim, args.act)
        except ValueError as error:
            parser.error(f"--profile: {error}")
    if args.quick:
        args.tokens, args.experts, args.top_k, args.dim = [64], [8], [2], 64
        args.models = args.models or list(QUICK_MODELS)
        args.batch_size = args.batch_size or 2
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
    args.models = args.models or list(DEFAULT_MODELS)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_item:
        print(json.dumps(memory_item(json.loads(args.memory_item))))
        return {}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.profile:
        return profile_shape(LayerShape.parse(args.profile, args.dim, args.act), device, rounds=args.profile_rounds)
    if args.profile_model:
        return profile_model(args.profile_model, args, device)
    budget = Budget(args.max_seconds)
    results: dict = {"layers": [], "routers": [], "models": [], "memory": [], "targets": []}
    if {"layers", "peers"} & set(args.sections):
        for shape in layer_shapes(args):
            rows = bench_layer_shape(shape, args, device, budget)
            results["layers"] += rows
            print_tables({"layers": rows})
        results["targets"] = check_targets(results["layers"])
    if "routers" in args.sections:
        for shape in [s for s in layer_shapes(args) if s.family == "sparse"]:
            rows = bench_layer_shape(shape, args, device, budget, section="routers")
            results["routers"] += rows
            print_tables({"routers": rows})
        results["targets"] += check_router_targets(results["routers"])
    if "models" in args.sections:
        for name in args.models:
            results["models"] += bench_model(name, args, device, budget)
        print_tables({"models": results["models"]})
    if "memory" in args.sections:
        specs = memory_specs(args, results["layers"] + results["models"])
        results["memory"] = bench_memory(specs, budget)
        print_tables({"memory": results["memory"]})
    results["environment"] = {**environment(args), "seconds": time.perf_counter() - budget.start}
    print_tables({"targets": results["targets"]})
    argv_text = argv if argv is not None else sys.argv[1:]
    for path in (args.json, args.markdown):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.markdown:
        args.markdown.write_text(markdown_report(results, argv_text))
    return results


if __name__ == "__main__":
    main()
