"""The code reads bottom-up: no module imports from a layer above its own (bench/__init__.py: LAYERS).

Checked on the source (every `import` and `from ... import`, at module level or inside functions), so a
lazy import inside a function counts as much as one at the top.
"""
import ast
from pathlib import Path

import pytest

from bench import LAYERS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("architectures", "tasks", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """Index into LAYERS of one of our modules; None for anything else (third-party modules, and names
    that `from package import name` imports from a module)."""
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith(".*") and module.startswith(name[:-1])):
                return i
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module the file imports, by full name (`from bench import distributed` -> bench.distributed)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)  # submodules; names fall back below
    return out


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in sources() if layer_of(module_name(p)) is None]
    assert not unplaced, f"add these modules to bench/__init__.py LAYERS: {unplaced}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_from_a_higher_layer(path):
    own = layer_of(module_name(path))
    upward = []
    for name in sorted(imported_modules(path)):
        layer = layer_of(name)
        if layer is not None and layer > own:
            upward.append(f"{name} ({LAYERS[layer][0]})")
    assert not upward, f"{module_name(path)} ({LAYERS[own][0]}) imports from above: {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a function-level import of a tool from the engine is caught."""
    fake = tmp_path / "x.py"
    fake.write_text("def f():\n    from bench.sweep import main\n    from bench import report\n")
    names = imported_modules(fake)
    assert {"bench.sweep", "bench.report"} <= names
    assert layer_of("bench.sweep") > layer_of("bench.run") > layer_of("tasks.lm") > layer_of("architectures.ttt")
