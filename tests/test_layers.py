"""The package's layering: no import (top level or inside a function) runs upward."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "smi"
FRONT = {"smi.cli", "smi.demo", "smi.__main__"}
# what each layer may not import (anything in it, at any depth)
FORBIDDEN = {
    "utils": ("smi.data", "smi.models", "smi.inversion", "smi.quant", "smi.transfer", "smi.evaluation",
              "smi.runner"),
    "data": ("smi.models", "smi.inversion", "smi.quant", "smi.transfer", "smi.evaluation", "smi.runner"),
    "models": ("smi.inversion", "smi.quant", "smi.transfer"),
    "inversion": ("smi.quant", "smi.transfer"),
}


def _module(path: Path) -> str:
    return ".".join(("smi", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {n for n in names if n == "smi" or n.startswith("smi.")}


FILES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_import_runs_upward(path):
    module, imported = _module(path), _imports(path)
    if module not in FRONT:
        assert not imported & FRONT, f"{module} imports the CLI/demo: {imported & FRONT}"
    layer = module.split(".")[1] if module.count(".") else ""
    for name in imported:
        bad = [f for f in FORBIDDEN.get(layer, ()) if name == f or name.startswith(f + ".")]
        assert not bad, f"{module} ({layer}/) imports {name}"
