"""The package's architecture, checked: imports point only downward and there is no import cycle.

Every import between the package's modules is read from the source (``ast``, function-level
imports included), so a lazy import inside a function cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "xception"
# Bottom to top; a module may import its own layer's modules and those below.
LAYERS = [("fileio", "extras", "preprocessing", "runtime", "plotting"), ("models",), ("weights",), ("factory",),
          ("data",), ("deploy",), ("inference",), ("training",), ("segmentation", "serve"), ("bench",), ("demo", "app"),
          ("cli", "__main__")]
LAYER = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(path: Path) -> set[str]:
    """Modules of the package that ``path`` imports (``from . import x`` counts as ``pkg.x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base == "xception" or base.startswith("xception."):
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if _exists(candidate) else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("xception.")}
    return found


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {module_name(p): internal_imports(p) for p in PACKAGE.rglob("*.py")}


def test_imports_point_downward():
    upward = []
    for source, targets in _graph().items():
        parts = source.split(".")
        if len(parts) == 1:  # the package facade (xception/__init__.py) re-exports from every layer
            continue
        for target in targets:
            tparts = target.split(".")
            if len(tparts) > 1 and LAYER[tparts[1]] > LAYER[parts[1]]:
                upward.append(f"{source} -> {target}")
    assert not upward, "imports pointing up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt.startswith(node + ".") and node in graph and _is_package(node):
                continue  # a package importing its own submodules is not a cycle
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _is_package(module: str) -> bool:
    return (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").is_file()


def test_every_module_is_in_a_layer():
    tops = {module_name(p).split(".")[1] for p in PACKAGE.rglob("*.py") if module_name(p) != "xception"}
    assert tops <= set(LAYER), sorted(tops - set(LAYER))


def _reach(start: str, graph: dict[str, set[str]]) -> set[str]:
    """Every module of the package that importing ``start`` can load (function-level imports included)."""
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo += [t for t in graph.get(node, ()) if t in graph]
        parts = node.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ first
        todo += [".".join(parts[:i]) for i in range(2, len(parts))]
    return seen


def _layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


@pytest.mark.parametrize("wing,forbidden", [("data", {"training", "inference", "deploy", "bench", "serve"}),
                                            ("deploy", {"training", "inference", "bench", "serve"}),
                                            ("inference", {"training", "bench", "serve"}),
                                            ("training", {"bench", "serve"}), ("serve", {"training", "bench"})])
def test_each_wing_stays_out_of_the_ones_above(wing, forbidden):
    graph = _graph()
    bad = sorted(f"{m} -> {t}" for m in graph if _layer(m) == wing for t in _reach(m, graph) if _layer(t) in forbidden)
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_the_benchmark_harness():
    graph = _graph()
    importers = sorted(m for m, targets in graph.items() if _layer(m) not in ("bench", "cli")
                       and any(_layer(t) == "bench" for t in targets))
    assert importers == [], importers


@pytest.mark.parametrize("command", ["xception.inference.predict", "xception.inference.evaluate"])
def test_predict_and_eval_never_enter_training(command):
    reached = _reach(command, _graph())
    assert not [m for m in reached if _layer(m) == "training"]
    assert {"xception.data.images", "xception.runtime"} <= reached  # the shared layers, not copies
