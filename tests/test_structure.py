"""The package's structure, read from the sources: imports run one way, private names stay private, and
``import mome`` stays light (no transformers, Lightning or Hydra)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mome"


def _modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import of a mome module in ``module``,
    at module level or inside functions alike."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.startswith("mome")]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if target == "mome" or target.startswith("mome."):
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    found.append(
                        (submodule, None, node.lineno) if submodule in MODULES else (target, alias.name, node.lineno)
                    )
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the mome modules importing it runs: the module itself and the packages above it that are
    not the importer's own (a package's ``__init__`` runs on first import of anything inside it)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in _imports(module, path):
            parts = target.split(".")
            for depth in range(2, len(parts) + 1):
                package = ".".join(parts[:depth])
                is_own_package = module == package or module.startswith(package + ".")
                if package in MODULES and package != module and (depth == len(parts) or not is_own_package):
                    graph[module].add(package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# The layers, bottom to top: a module may import only from its own layer or the layers below.
LAYERS = [
    ["mome._errors", "mome._checks", "mome._folders", "mome._resources", "mome._pretrained"],
    ["mome._checkpoint", "mome._formats", "mome._hub", "mome._tokenizer", "mome._loading"],
    ["mome._cards"],
    ["mome._registry"],
    ["mome.layers"],
    ["mome._quant_tensor", "mome._quantize"],
    ["mome.models", "mome.peft"],
    ["mome.convert"],
    ["mome._factory"],
    ["mome._saving", "mome._timm", "mome._upcycle", "mome.compress"],
    ["mome.zoo", "mome"],
    ["mome.data"],
    ["mome.lit"],
    ["mome.cli"],
]


def _layer(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def test_imports_run_one_way():
    upward = []
    for module, path in MODULES.items():
        if module == "mome":
            continue  # the facade re-exports every layer
        for target, _, line in _imports(module, path):
            if target != "mome" and _layer(target) > _layer(module):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def _private_uses(module: str, path: Path) -> list[str]:
    """Private names of *other* mome modules that ``module`` imports or reads as attributes."""
    tree = ast.parse(path.read_text())
    uses, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            if not (target == "mome" or target.startswith("mome.")):
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in MODULES:
                    aliases[alias.asname or alias.name] = submodule
                elif alias.name.startswith("_") and not alias.name.startswith("__") and target != module:
                    uses.append(f"{path.name}:{node.lineno} imports {target}.{alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            name = node.attr
            if name.startswith("_") and not name.startswith("__") and f"{aliases[node.value.id]}.{name}" not in MODULES:
                uses.append(f"{path.name}:{node.lineno} reads {aliases[node.value.id]}.{name}")
    return uses


def test_no_module_uses_another_modules_private_names():
    uses = [use for module, path in MODULES.items() for use in _private_uses(module, path)]
    assert not uses, "\n".join(uses)


_IMPORT_PROBE = """
import json, sys, time
start = time.perf_counter()
import mome
seconds = time.perf_counter() - start
heavy = lambda: sorted(m for m in ("transformers", "lightning", "hydra", "open_clip") if m in sys.modules)
after_import = heavy()
mome.create_model("vmoe_tiny_patch8_e4")
after_vmoe = heavy()
names = mome.list_models("moe_llava_*")
print(json.dumps({"after_import": after_import, "after_vmoe": after_vmoe, "after_list": heavy(), "names": names}))
"""


def test_import_mome_is_light_and_moe_llava_registers_lazily():
    """``import mome`` (and building a ViT family) imports neither transformers nor Lightning nor Hydra;
    listing the models imports the lazy MoE-LLaVA family, whose names are then registered."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["after_import"] == [] and report["after_vmoe"] == []
    assert "transformers" in report["after_list"] and "lightning" not in report["after_list"]
    assert "moe_llava_tiny_e4" in report["names"]


def test_a_lazy_family_is_imported_by_a_lookup_of_its_names():
    code = (
        "import sys, mome; assert 'transformers' not in sys.modules; "
        "assert mome.is_model('moe_llava_tiny_e4'); assert 'mome.models.moe_llava' in sys.modules; "
        "print('ok')"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "ok\n"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(("mome.lit", "mome.cli"))))
def test_training_code_is_not_imported_by_the_library(module):
    """No module below ``mome.lit`` imports it (Lightning) or ``mome.cli`` (Hydra)."""
    importers = [m for m, targets in import_graph().items() if module in targets and _layer(m) < _layer("mome.lit")]
    assert not importers, importers


def test_import_time_tool_reports_both_imports():
    """``python tools/import_time.py`` (the figure docs/architecture.md quotes), one round."""
    tool = PACKAGE.parent / "tools" / "import_time.py"
    out = subprocess.run(
        [sys.executable, str(tool), "--rounds", "1", "--modules", "json", "mome"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "import json" in out
    line = next(line for line in out.splitlines() if "import mome" in line)
    assert "loads torch, timm" in line and "transformers" not in line
