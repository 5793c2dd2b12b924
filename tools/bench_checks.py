"""What the forward-boundary input checks cost: each family's forward with the checks as they are vs with every
check function of :mod:`mome._checks` (and the models' wrappers of them) replaced by a no-op, interleaved in one
process (check on, check off, ... per round), median of ``--rounds`` rounds with the min-max spread, 2 threads.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_checks.py [--rounds 11] [--calls 20] [--no-vit-b]

Prints a markdown table: family, median ms per forward with checks, without, ratio, spread (min-max of each).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

import mome
import mome._checks as checks
from mome.models import _moe_vit, limoe, moe_llava, vlmo

#: Every module that holds a reference to a check function (``from .._checks import ...`` binds names there).
_HOLDERS = [checks, _moe_vit, limoe, moe_llava, vlmo]


@contextlib.contextmanager
def checks_disabled() -> Iterator[None]:
    """Every ``check_*`` function of :mod:`mome._checks`, wherever a model module imported it, is a no-op."""
    saved = []
    names = [name for name in dir(checks) if name.startswith("check_")] + ["check_images", "check_tensor_shape"]
    for module in _HOLDERS:
        for name in names:
            if hasattr(module, name):
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _time(fn: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of ``fn`` over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def _cases(vit_b: bool) -> list[tuple[str, Callable[[], object]]]:
    torch.manual_seed(0)
    cases = []
    for name in ("vmoe_tiny_patch8_e4", "soft_moe_vit_tiny_patch8_e8"):
        model, images = mome.create_model(name).eval(), torch.randn(8, 3, 32, 32)
        cases.append((name, lambda m=model, x=images: m(x)))
    for name in ("limoe_tiny_patch8_e4", "vlmo_tiny_patch8_32"):
        model, images = mome.create_model(name).eval(), torch.randn(8, 3, 32, 32)
        text = torch.randint(1, 100, (8, 16))
        cases.append((name, lambda m=model, x=images, t=text: m(x, t)))
    model = mome.create_model("moe_llava_tiny_e4").eval()
    ids = torch.randint(5, model.config.text_config.vocab_size, (8, 32))
    cases.append(("moe_llava_tiny_e4", lambda m=model, t=ids: m(input_ids=t)))
    if vit_b:
        model, images = mome.create_model("vmoe_b16_e8").eval(), torch.randn(8, 3, 224, 224)
        cases.append(("vmoe_b16_e8 (ViT-B/16, batch 8)", lambda m=model, x=images: m(x)))
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median and spread over them)")
    parser.add_argument("--calls", type=int, default=20, help="forwards per timing of a tiny model")
    parser.add_argument("--no-vit-b", action="store_true", help="skip the ViT-B/16-sized V-MoE")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    header = "| family | with checks (ms) | without (ms) | ratio | spread with / without (ms) |"
    rows = [header, "|---|---|---|---|---|"]
    with torch.no_grad():
        for name, fn in _cases(not args.no_vit_b):
            calls = 1 if "ViT-B" in name else args.calls
            fn(), fn()  # warm-up
            on, off = [], []
            for _ in range(args.rounds):
                on.append(_time(fn, calls))
                with checks_disabled():
                    off.append(_time(fn, calls))
            with_, without = statistics.median(on), statistics.median(off)
            spread = f"{min(on):.3f}-{max(on):.3f} / {min(off):.3f}-{max(off):.3f}"
            rows.append(f"| {name} | {with_:.3f} | {without:.3f} | {with_ / without:.3f} | {spread} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
