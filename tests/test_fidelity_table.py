"""The fidelity tables (docs/fidelity.md, zoo/README.md) are the tests' cases and cover every zoo card.

Each case's own test compares its measurement with its recorded row (``FidelityCase.check``); here, without
re-measuring, the rows must be exactly the cases of ``tests/test_fidelity_*.py``, name the fixture's
upstream commit, and be rendered as ``tools/fidelity_table.py`` renders them, and every card of
the zoo (``mome.zoo_dir()``) must be loaded by at least one case.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from fidelity import CARD_TABLE_MARKERS, CASE_TABLE_MARKERS, FIDELITY_DOC, ZOO_README, agrees_with_record, between

import mome

TOOL = Path(__file__).resolve().parents[1] / "tools" / "fidelity_table.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("fidelity_table", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fidelity_table"] = module
    spec.loader.exec_module(module)
    return module


def test_the_case_table_is_every_case_as_the_tool_renders_it(tool):
    cases = tool.load_cases()
    assert len(cases) >= 80
    rows = tool.recorded_rows(cases)  # a case without a row raises, naming it
    assert between(FIDELITY_DOC.read_text(), CASE_TABLE_MARKERS) == tool.render_case_table(rows)


def test_the_card_table_is_every_card_of_the_zoo(tool):
    cases = tool.load_cases()
    covered = {card for case in cases for card in case.cards}
    shipped = {path.stem for path in mome.zoo_dir().glob("*.yaml")}  # the zoo's cards, not a test's additions
    assert len(shipped) >= 37 and shipped <= set(mome.list_pretrained())
    assert covered == shipped, "zoo cards no fidelity case loads"
    rendered = tool.render_card_table(tool.recorded_rows(cases))
    assert between(ZOO_README.read_text(), CARD_TABLE_MARKERS) == rendered
    for card in shipped:
        assert f"| `{card}` |" in rendered


def test_a_case_name_the_table_lacks_or_a_stale_figure_fails(tool, monkeypatch):
    from fidelity import FidelityCase

    case = tool.load_cases()[0]
    recorded = tool.recorded_rows([case])[0].max_diff
    moved = FidelityCase(case.name, case.folder, lambda: {"logits": recorded * 3 + 1e-6}, tolerance=1.0)
    with pytest.raises(AssertionError, match="records"):
        moved.check()
    renamed = FidelityCase(case.name + " (renamed)", case.folder, lambda: {"logits": 0.0})
    with pytest.raises(AssertionError, match="no row"):
        renamed.check()


def test_agreement_allows_rounding_not_a_change():
    assert agrees_with_record(2.9e-6, 2.9e-6) and agrees_with_record(2.0e-6, 2.9e-6)
    assert agrees_with_record(0.0, 1.0e-7)  # below fp32's epsilon both read as exact
    assert not agrees_with_record(1.0e-5, 2.9e-6) and not agrees_with_record(9.5e-4, 8.4e-5)


def test_the_case_table_names_the_cpu_kernels_it_was_measured_with():
    """The strict agreement with the table applies where torch's CPU kernels are those it was measured with."""
    from fidelity import CAPABILITY_SENTENCE, recorded_capability

    capability = recorded_capability()
    assert capability and CAPABILITY_SENTENCE.format(capability) in FIDELITY_DOC.read_text()
