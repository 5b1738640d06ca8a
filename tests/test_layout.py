"""The layout itself: what imports what, how big packages and modules grow (read with ``ast``, not run).

Every import counts, function-local ones and those under ``if TYPE_CHECKING`` too: hiding an
import inside a function does not remove the dependency. ``from pkg import mod`` imports the
module ``pkg.mod``; a package's ``__init__`` is a module of its own.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lower layers never import higher ones; packages of one layer do not import each other.
LAYERS = {"common": 0, "blocks": 1, "adapters": 2, "swarm": 2, "blockserver": 3, "gateway": 4, "swarmgate": 5}
CLI = "swarmgate"
MAX_MODULES_PER_FOLDER = 15  # .py files besides __init__.py
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the production packages, by dotted name."""
    return {module_name(path): path for package in LAYERS for path in sorted((ROOT / package).rglob("*.py"))}


def _imported(name: str, node: ast.ImportFrom | ast.Import, path: Path) -> list[str]:
    known = modules()
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing module's package
            package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join([*package, base] if base else package)
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    found = []
    for target in targets:
        while target and target not in known:  # `import a.b.c` of a name in a.b: the module a.b
            target = target.rpartition(".")[0]
        if target:
            found.append(target)
    return found


@cache
def imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (itself excluded)."""
    graph = {}
    for name, path in modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        graph[name] = {target for node in nodes for target in _imported(name, node, path)} - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while (member := stack.pop()) != node:
                on_stack.discard(member)
                component.append(member)
            on_stack.discard(node)
            if component:
                found.append(sorted([node, *component]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_parser_sees_the_project():
    assert {"swarmgate.cli", "gateway.app", "blocks.span", "swarm.node"} <= set(modules())
    assert "swarmgate.options" in imports()["swarmgate.cli"]


def test_no_library_imports_the_cli():
    offenders = {name: sorted(t for t in targets if t.split(".")[0] == CLI)
                 for name, targets in imports().items() if name.split(".")[0] != CLI}
    assert not {name: found for name, found in offenders.items() if found}


def test_lower_layers_never_import_higher_ones():
    def layer(module: str) -> tuple[str, int]:
        package = module.split(".")[0]
        return package, LAYERS[package]

    upward = sorted(
        f"{name} -> {target}"
        for name, targets in imports().items()
        for target in targets
        if layer(target)[0] != layer(name)[0] and layer(target)[1] >= layer(name)[1]
    )
    assert not upward


def test_no_import_cycles():
    assert not cycles(imports())


def test_package_folders_stay_small():
    folders = {path.parent for path in modules().values()}
    crowded = {str(folder.relative_to(ROOT)): count for folder in folders
               if (count := len([p for p in folder.glob("*.py") if p.name != "__init__.py"])) > MAX_MODULES_PER_FOLDER}
    assert not crowded


def test_modules_stay_short():
    long = {name: lines for name, path in modules().items() if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
