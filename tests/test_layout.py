"""Module layout: the layer modules import one way, and every task config names its class as
``mome.lit.<ClassName>``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml
from hydra.utils import get_class

import mome
import mome.layers
from mome.lit import EvaluationTask, MomeTask

CONF = Path(mome.conf_dir())
TASK_CONFIGS = sorted((CONF / "task").glob("*.yaml")) + sorted((CONF / "eval_task").glob("*.yaml"))

#: The layer modules from the bottom up: each may import only those before it.
LAYER_ORDER = ["losses", "routers", "dispatch", "experts", "moe", "soft_moe", "modality"]


def _relative_imports(path: Path) -> set[str]:
    """The sibling modules ``path`` imports (``from .x import ...`` and ``from . import x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
    return found


@pytest.mark.parametrize("name", LAYER_ORDER)
def test_layer_modules_import_one_way(name):
    folder = Path(mome.layers.__file__).parent
    below = set(LAYER_ORDER[: LAYER_ORDER.index(name)])
    imported = _relative_imports(folder / f"{name}.py") & set(LAYER_ORDER)
    assert imported <= below, f"mome/layers/{name}.py imports {sorted(imported - below)}, which build on it"


def test_capacity_plan_lives_in_dispatch():
    from mome.layers import DispatchPlan, compute_capacity, plan_dispatch, routers

    for obj in (DispatchPlan, compute_capacity, plan_dispatch):
        assert obj.__module__ == "mome.layers.dispatch"
        assert not hasattr(routers, obj.__name__)


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_task_targets_are_spelled_mome_lit_class(path):
    target = yaml.safe_load(path.read_text())["_target_"]
    module, _, name = target.rpartition(".")
    assert module == "mome.lit", f"{path.name}: _target_ {target} is not mome.lit.<ClassName>"
    task_class = get_class(target)
    assert issubclass(task_class, EvaluationTask if path.parent.name == "eval_task" else MomeTask)
    assert task_class.__name__ == name
