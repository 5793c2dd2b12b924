"""What the forward-boundary input checks cost: each family's forward with the checks as they are vs with every
check function of :mod:`mome._checks` (and the models' wrappers of them) replaced by a no-op, interleaved in one
process (check on, check off, ... per round), median of ``--rounds`` rounds with the min-max spread, 2 threads.

    HF_HUB_OFFLINE=1 .venv/bin/python tools/bench_checks.py [--rounds 11] [--calls 20] [--no-vit-b]

Prints a markdown table: family, median ms per forward with checks and without, the median of the rounds'
ratios (with / without, each round's pair timed back to back) and their min-max spread.
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


def _check_functions() -> set[object]:
    """The check functions (each returns None): ``mome._checks.check_*`` and the models' wrappers of them."""
    from mome.models import _moe_vit

    found = {getattr(checks, name) for name in dir(checks) if name.startswith("check_")}
    return found | {_moe_vit.check_images, _moe_vit.check_tensor_shape}


@contextlib.contextmanager
def checks_disabled() -> Iterator[None]:
    """Every check function is a no-op in every ``mome`` module that imported it (``from .._checks import ...``
    binds the name in the importing module, so each binding is replaced)."""
    functions, saved = _check_functions(), []
    for module in [m for name, m in list(sys.modules.items()) if name == "mome" or name.startswith("mome.")]:
        for name, value in list(vars(module).items()):
            if any(value is fn for fn in functions):
                saved.append((module, name, value))
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


def _check_calls() -> list[tuple[str, Callable[[], object]]]:
    """The checks alone, on ViT-B/16-sized inputs (what one forward of a family calls once per input)."""
    images, ids, tokens = torch.randn(8, 3, 224, 224), torch.randint(0, 49408, (8, 77)), torch.randn(8, 197, 768)
    return [
        ("check_image_batch([8, 3, 224, 224])", lambda: checks.check_image_batch("x", images, 3, (224, 224))),
        ("check_ids_in_range([8, 77] ids)", lambda: checks.check_ids_in_range("text", ids, 49408)),
        ("check_token_batch([8, 197, 768])", lambda: checks.check_token_batch("x", tokens, 768)),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median and spread over them)")
    parser.add_argument("--calls", type=int, default=20, help="forwards per timing of a tiny model")
    parser.add_argument("--no-vit-b", action="store_true", help="skip the ViT-B/16-sized V-MoE")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    header = "| family | with checks (ms) | without (ms) | ratio (median of rounds) | ratio spread | rounds |"
    rows = [header, "|---|---|---|---|---|---|"]
    with torch.no_grad():
        for name, fn in _cases(not args.no_vit_b):
            calls = 1 if "ViT-B" in name else args.calls
            fn(), fn()  # warm-up
            on, off = [], []
            for _ in range(args.rounds):
                on.append(_time(fn, calls))
                with checks_disabled():
                    off.append(_time(fn, calls))
            ratios = sorted(a / b for a, b in zip(on, off))  # each round's pair, timed back to back
            with_, without = statistics.median(on), statistics.median(off)
            spread = f"{ratios[0]:.3f}-{ratios[-1]:.3f}"
            row = (
                f"| {name} | {with_:.2f} | {without:.2f} | {statistics.median(ratios):.3f} | {spread} | {args.rounds} |"
            )
            rows.append(row)
            print(rows[-1], file=sys.stderr, flush=True)
        rows += ["", "| check, alone | microseconds per call (median) | spread | rounds |", "|---|---|---|---|"]
        for name, fn in _check_calls():
            times = sorted(_time(fn, 1000) * 1e3 for _ in range(args.rounds))
            rows.append(f"| {name} | {statistics.median(times):.1f} | {times[0]:.1f}-{times[-1]:.1f} | {args.rounds} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
