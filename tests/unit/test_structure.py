"""The package's import structure, read from the source with ``ast`` (nothing is imported).

Layers, bottom to top (README, Architecture): compat and config, then ops, model, data, parallel,
train, infer. A module may import only from its own layer or below, inside functions too
(``TYPE_CHECKING`` imports count as well: they are what a reader follows), and no two modules
may import each other, directly or round a longer circle. tools/ and benchmarks/ sit on top and
are not checked here.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megamod"

LAYERS = {"compat": 0, "config": 0, "ops": 1, "model": 2, "data": 3, "parallel": 4, "train": 5, "infer": 6}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package modules it imports. ``from megamod.ops import moba_attn_varlen``
    points at the package ``megamod.ops``; ``from megamod.model import gpt`` at the module."""
    files = {module_name(root, p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..model import gpt
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in files else base)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if top not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add megamod.{top} to LAYERS (and the README's layers)")
    return LAYERS[top]


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in graph.items() if a != "megamod" for b in targets
                  if b != "megamod" and layer(b) > layer(a))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def problems(root: Path) -> list[str]:
    graph = import_graph(root)
    msgs = [f"upward import: {a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b in upward_imports(graph)]
    for comp in circles(graph):
        pairs = [f"{a} -> {b}" for a in comp for b in sorted(graph[a]) if b in comp]
        msgs.append(f"import circle among {comp}: {', '.join(pairs)}")
    return msgs


def test_the_tree_has_no_upward_imports_and_no_circles():
    graph = import_graph(PACKAGE)
    assert "megamod.model.gpt" in graph and "megamod.train.trainer" in graph  # the walk found the package
    assert "megamod.model.block" in graph["megamod.model.gpt"]
    assert problems(PACKAGE) == []


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    root = tmp_path / "megamod"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert problems(root) == []
    return root


def _plant(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_a_planted_upward_import_inside_a_function_is_named(tree_copy: Path):
    # signals imports nothing of megamod, so this adds no circle: the only problem is the direction.
    _plant(tree_copy / "model" / "rope.py", "from megamod.train.signals import StopController  # noqa")
    assert problems(tree_copy) == [
        "upward import: megamod.model.rope (layer 2) imports megamod.train.signals (layer 5)"]


def test_a_planted_circle_is_named_with_its_pairs(tree_copy: Path):
    # attention imports rope; rope importing attention back closes a circle inside one layer.
    _plant(tree_copy / "model" / "rope.py", "from megamod.model.attention import SDPAttention  # noqa")
    assert problems(tree_copy) == [
        "import circle among ['megamod.model.attention', 'megamod.model.rope']: "
        "megamod.model.attention -> megamod.model.rope, megamod.model.rope -> megamod.model.attention"]


def test_a_relative_import_counts_like_an_absolute_one(tree_copy: Path):
    _plant(tree_copy / "ops" / "moba_plan.py", "from ..parallel import dims  # noqa")
    assert problems(tree_copy) == [
        "upward import: megamod.ops.moba_plan (layer 1) imports megamod.parallel.dims (layer 4)"]


def test_a_module_outside_every_layer_is_refused(tree_copy: Path):
    (tree_copy / "extras.py").write_text("from megamod.config import Config\n")
    with pytest.raises(AssertionError, match="megamod.extras is in no layer"):
        problems(tree_copy)
