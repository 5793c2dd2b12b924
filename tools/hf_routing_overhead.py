"""What routing capture costs on transformers' MoE VLMs (:mod:`mome.models.hf_moe_vlm`), on their tiny configs.

    python tools/hf_routing_overhead.py [--rounds 9] [--calls 20] [--families qwen3_vl_moe aria ...]
    python tools/hf_routing_overhead.py --count-ops [--families ...]

Per family: one forward pass of :func:`~mome.models.hf_moe_vlm.example_inputs` (batch 2, no grad, eval),
timed as the mean of ``--calls`` calls, without capture and with capture on (:func:`routing_capture`), the two
interleaved in each round (alternating which goes first) so a slower moment of the machine hits both. Prints
the median of each over the rounds, the median of the per-round ratios with their min-max, and, without
capture, checks that no hook is installed (the "off" cost is nothing by construction).

``--count-ops`` times nothing (a busy machine gives the same answer): it counts the aten operations dispatched
(:class:`AtenOpCount`) by one such forward without and with capture, and by the first read of the statistics
(``mome.routing_stats``), where the capture decodes the router outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class AtenOpCount(TorchDispatchMode):
    """Counts the aten operations dispatched inside the ``with`` block (``count``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(model_type: str) -> dict[str, int]:
    """``{"routers", "off", "on", "read"}``: the family's hooked routers, the aten operations of one forward of its
    tiny config (batch 2, no grad) without and with capture, and those of the first read of the statistics."""
    import mome
    from mome.models import hf_moe_vlm as H

    torch.manual_seed(0)
    model = mome.create_model(f"{model_type}_tiny")
    inputs = H.example_inputs(model, batch_size=2)
    with torch.no_grad():
        model(**inputs)  # warm-up: lazily built buffers
        with AtenOpCount() as off:
            model(**inputs)
        with H.routing_capture(model) as capture:
            with AtenOpCount() as on:
                model(**inputs)
            with AtenOpCount() as read:
                mome.routing_stats(model)
    return {"routers": len(capture.records), "off": off.count, "on": on.count, "read": read.count}


def _mean_call(model, inputs, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(**inputs)
    return (time.perf_counter() - start) / calls


def measure(model_type: str, rounds: int, calls: int) -> dict:
    import mome
    from mome.models import hf_moe_vlm as H

    torch.manual_seed(0)
    model = mome.create_model(f"{model_type}_tiny")
    inputs = H.example_inputs(model, batch_size=2)
    off, on, ratios = [], [], []
    with torch.no_grad():
        for _ in range(3):  # warm-up, both paths
            model(**inputs)
            with H.routing_capture(model):
                model(**inputs)
        for round_index in range(rounds):
            pair = {}
            for mode in ("off", "on") if round_index % 2 == 0 else ("on", "off"):
                if mode == "on":
                    with H.routing_capture(model):
                        pair[mode] = _mean_call(model, inputs, calls)
                else:
                    assert not model._forward_pre_hooks, "capture off must leave no hook"
                    pair[mode] = _mean_call(model, inputs, calls)
            off.append(pair["off"])
            on.append(pair["on"])
            ratios.append(pair["on"] / pair["off"])
    return {"off": off, "on": on, "ratios": ratios}


def main(argv: list[str] | None = None) -> int:
    from mome.models import hf_moe_vlm as H

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20, help="forward calls per timing (their mean is taken)")
    parser.add_argument("--families", nargs="+", default=sorted(H.FAMILIES))
    parser.add_argument("--count-ops", action="store_true", help="count aten operations instead of timing")
    args = parser.parse_args(argv)
    if args.count_ops:
        print("aten operations of one forward of the tiny configs (batch 2), and of the first statistics read:")
        print("family           routers   off    on  read")
        for family in args.families:
            c = count_ops(family)
            print(f"{family:<16} {c['routers']:7d} {c['off']:5d} {c['on']:5d} {c['read']:5d}")
        return 0
    print(f"forward of the tiny configs, batch 2, {args.rounds} interleaved rounds of {args.calls} calls:")
    print("family            off ms   on ms   on/off median (min-max)")
    for family in args.families:
        r = measure(family, args.rounds, args.calls)
        med = statistics.median
        spread = f"{min(r['ratios']):.3f}-{max(r['ratios']):.3f}"
        print(f"{family:<16} {med(r['off']) * 1e3:7.2f} {med(r['on']) * 1e3:7.2f}   {med(r['ratios']):.3f} ({spread})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
