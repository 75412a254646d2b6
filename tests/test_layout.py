"""The project's layout: entry points at the root, shared code in toolkit/, imports one way, no cycle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolkit", "transreid", "classification")
SHARED_AT_ROOT = ("model", "pruner")


def project_modules() -> dict[str, Path]:
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        for p in (ROOT / package).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = p
    return modules


def is_entry_point(name: str, path: Path) -> bool:
    if "." not in name:
        return name not in SHARED_AT_ROOT + PACKAGES
    return "__main__" in path.read_text() and not name.startswith("toolkit.")


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in modules and modules[c].name != "__init__.py")
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, Path]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}, modules


def test_no_module_imports_an_entry_point():
    graph, modules = import_graph()
    entry = {name for name, path in modules.items() if is_entry_point(name, path)}
    bad = sorted((name, dep) for name, deps in graph.items() for dep in deps if dep in entry)
    assert bad == []


def test_no_import_cycle():
    graph, _ = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_toolkit_imports_no_entry_point_or_package():
    graph, _ = import_graph()
    bad = sorted((name, dep) for name, deps in graph.items() if name.startswith("toolkit")
                 for dep in deps if dep.startswith(("transreid", "classification")))
    assert bad == []


def test_root_holds_entry_points_and_the_two_shared_modules():
    modules = project_modules()
    helpers = sorted(name for name, path in modules.items() if "." not in name and name not in SHARED_AT_ROOT + PACKAGES
                     and "__main__" not in path.read_text())
    assert helpers == []
