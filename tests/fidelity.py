"""Fidelity to upstream code: mome's models against outputs the upstream code itself produced.

Each upstream fixture lives in ``tests/data/upstream/<folder>/``: the checkpoint as the upstream's own
writer saved it, the inputs, the upstream forward's outputs, a ``README.md`` naming the upstream commit and
the function that produced each file, and a ``meta.json``::

    {"upstream": "google-research/vmoe", "commit": "<40 hex>", "generator": "tools/upstream_vmoe.py"}

A ``tests/test_fidelity_<family>.py`` module lists its comparisons as ``CASES`` (a list of
:class:`FidelityCase`) and checks each with ``case.check()``. ``tools/fidelity_table.py`` imports those
modules, runs every case and writes the fidelity table (model, upstream commit, max diff) into
``zoo/README.md`` and ``docs/fidelity.md``; ``case.check()`` compares each measurement with its recorded
row and ``tests/test_fidelity_table.py`` checks the rows are exactly the cases and the zoo's cards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

UPSTREAM_DATA = Path(__file__).parent / "data" / "upstream"
ROOT = Path(__file__).resolve().parent.parent
#: where tools/fidelity_table.py writes the measured tables, between these markers
FIDELITY_DOC = ROOT / "docs" / "fidelity.md"
ZOO_README = ROOT / "zoo" / "README.md"
CASE_TABLE_MARKERS = ("<!-- fidelity-cases:start -->", "<!-- fidelity-cases:end -->")
CARD_TABLE_MARKERS = ("<!-- fidelity-cards:start -->", "<!-- fidelity-cards:end -->")
#: a measurement agrees with its recorded row when within this factor (the table keeps two digits) or both are below
#: ``_EXACT`` (fp32's epsilon: exact up to rounding)
_AGREE_FACTOR, _EXACT = 2.0, 2e-7
#: the sentence of the case table naming the CPU kernels it was measured with: rounding depends on them (an AVX-512
#: machine measured 6.7e-6 on fp32 rows that another CPU recorded exact, 5.4e-5 on a bf16 row recorded 9.5e-4)
CAPABILITY_SENTENCE = "Measured with torch's `{}` CPU kernels"


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here (``AVX512``, ``AVX2``, ...)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def recorded_capability(path: Path = FIDELITY_DOC) -> str | None:
    """The CPU capability ``docs/fidelity.md``'s case table was measured with (None where it does not say)."""
    import re

    prefix = re.escape(CAPABILITY_SENTENCE.split("{}")[0])
    found = re.search(prefix + r"([A-Za-z0-9_]+)`", between(path.read_text(), CASE_TABLE_MARKERS))
    return found.group(1) if found else None


def between(text: str, markers: tuple[str, str]) -> str:
    """The text between ``markers`` (which must both occur, in order)."""
    start, end = markers
    if start not in text or end not in text.split(start, 1)[1]:
        raise ValueError(f"the markers {start} ... {end} are missing")
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def replace_between(text: str, markers: tuple[str, str], block: str) -> str:
    between(text, markers)
    head, rest = text.split(markers[0], 1)
    return f"{head}{markers[0]}\n{block}\n{markers[1]}{rest.split(markers[1], 1)[1]}"


def read_case_table(path: Path = FIDELITY_DOC) -> dict[str, tuple[float, str]]:
    """``{case name: (max diff, worst output)}`` as recorded in ``docs/fidelity.md``'s case table."""
    rows = {}
    for line in between(path.read_text(), CASE_TABLE_MARKERS).splitlines():
        if not line.startswith("| ") or line.startswith("| case |"):
            continue  # headings, prose, table headers and separators
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name, diff, output = cells[0], cells[1].split()[0], cells[2].strip("`")
        rows[name] = (float(diff), output)
    return rows


def agrees_with_record(measured: float, recorded: float) -> bool:
    if max(measured, recorded) <= _EXACT:
        return True
    return recorded / _AGREE_FACTOR <= measured + _EXACT and measured <= recorded * _AGREE_FACTOR + _EXACT


def fixture_dir(folder: str) -> Path:
    """``tests/data/upstream/<folder>``, which must exist and hold a ``meta.json``."""
    path = UPSTREAM_DATA / folder
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"upstream fixture {path} has no meta.json")
    return path


def fixture_meta(folder: str) -> dict:
    return json.loads((fixture_dir(folder) / "meta.json").read_text())


def max_abs_diff(ours: Tensor, theirs: Tensor, *, relative: bool = False) -> float:
    """``max |ours - theirs|`` (shapes must agree), divided by ``max |theirs|`` when ``relative``."""
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    if ours.shape != theirs.shape:
        raise AssertionError(f"shape {tuple(ours.shape)} != upstream {tuple(theirs.shape)}")
    diff = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    return diff / max(theirs.abs().max().item(), 1e-12) if relative else diff


@dataclass(frozen=True)
class FidelityCase:
    """One comparison of a mome model with an upstream fixture.

    Attributes:
        name: the row's label in the fidelity table, e.g. ``"V-MoE S/32, pre_logits, fp32"``.
        folder: the fixture folder under ``tests/data/upstream/``.
        compare: builds the mome model through the public route, runs the fixture's inputs and returns
            ``{output name: max diff}`` for every output the upstream produced.
        tolerance: the largest allowed diff (1e-5 for fp32, 1e-2 for the bf16 dispatch option).
        relative: whether ``compare`` reports diffs relative to the output's scale (say so for large outputs).
        cards: the zoo cards (``arch.tag``) whose format and architecture options this fixture covers.
    """

    name: str
    folder: str
    compare: Callable[[], Mapping[str, float]]
    tolerance: float = 1e-5
    relative: bool = False
    cards: tuple[str, ...] = ()

    def measure(self) -> dict[str, float]:
        diffs = dict(self.compare())
        if not diffs:
            raise AssertionError(f"{self.name}: compared no outputs")
        return diffs

    def check(self) -> dict[str, float]:
        """Every output within ``tolerance``, and the largest diff as ``docs/fidelity.md`` records it."""
        diffs = self.measure()
        too_far = {k: v for k, v in diffs.items() if not v <= self.tolerance}
        assert not too_far, f"{self.name}: outputs differ from upstream beyond {self.tolerance}: {too_far}"
        rerun = "; rerun HF_HUB_OFFLINE=1 python tools/fidelity_table.py"
        recorded = read_case_table().get(self.name)
        assert recorded is not None, f"{self.name}: no row in {FIDELITY_DOC.name}{rerun}"
        if recorded_capability() != cpu_capability():
            return diffs  # other kernels round differently: the tolerance above is what holds everywhere
        largest = max(diffs.values())
        assert agrees_with_record(largest, recorded[0]), (
            f"{self.name}: largest diff {largest:.1e} but {FIDELITY_DOC.name} records {recorded[0]:.1e}{rerun}"
        )
        return diffs
