"""The import graph of ``conveyor`` points one way (docs/architecture.md, "Shape and data path").

Every ``import`` and ``from … import`` of every module is read with :mod:`ast` — function-level
and ``TYPE_CHECKING`` imports included, since they tie modules together just the same. A *unit*
is a sub-package (``conveyor.engine``) or a top-level module (``conveyor.metrics``). Run this
file as a script to print the unit graph and its cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import conveyor

ROOT = Path(conveyor.__file__).parent
#: Units that hold the services; they never reach up into the HTTP adapters.
SERVICES = ("operations", "engine", "store", "queue", "sandbox")
ADAPTERS = ("api", "board")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], node.module or ""])
                base = base.rstrip(".")
            else:
                base = node.module or ""
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        yield from (t for t in targets if t in known and t != name)


def module_graph() -> dict[str, set[str]]:
    """Module -> the ``conveyor`` modules it imports."""
    known = _modules()
    return {name: set(_imports(name, path, known)) for name, path in known.items()}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def unit_graph() -> dict[str, set[str]]:
    """Unit -> units it imports (self-edges dropped)."""
    out: dict[str, set[str]] = {}
    for src, targets in module_graph().items():
        out.setdefault(unit(src), set()).update(unit(t) for t in targets if unit(t) != unit(src))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each listed once from its smallest node."""
    found: list[list[str]] = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.append([*path])
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def violations() -> list[str]:
    """Imports against the direction: services -> adapters, store -> engine."""
    bad = []
    for src, targets in module_graph().items():
        for t in sorted(targets):
            u, v = unit(src), unit(t)
            if (u in SERVICES and v in ADAPTERS) or (u == "store" and v == "engine"):
                bad.append(f"{src} -> {t}")
    return sorted(bad)


def test_no_cycle_between_units() -> None:
    """No import cycle between sub-packages and top-level modules of conveyor."""
    assert cycles(unit_graph()) == []


def test_services_never_import_adapters() -> None:
    """operations, engine, store, queue and sandbox never import api or board; store never
    imports engine."""
    assert violations() == []


def _imports_aiohttp_web(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            if any(a.name.startswith("aiohttp.web") for a in node.names):
                return True
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("aiohttp.web"):
                return True
            if node.module == "aiohttp" and any(a.name == "web" for a in node.names):
                return True
    return False


def test_services_never_see_an_application() -> None:
    """No service imports aiohttp's server side (``aiohttp.web``), not even through another
    ``conveyor`` module (``metrics`` once held the HTTP middleware): none can take an
    application or a request; the composition root passes them their dependencies."""
    modules, graph = _modules(), module_graph()
    web = {n for n, p in modules.items() if _imports_aiohttp_web(p)}
    assert web, "scan finds nothing"
    reached = []
    for name in sorted(n for n in modules if unit(n) in SERVICES):
        seen, todo = {name}, [name]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        reached += [f"{name} -> {w}" for w in sorted(seen & web)]
    assert reached == []


def test_graph_sees_function_level_imports() -> None:
    """The scan finds imports inside functions (a cycle could hide there otherwise)."""
    graph = module_graph()
    assert graph, "no module found"
    assert any(unit(t) == "store" for t in graph["conveyor.engine.worker"])


if __name__ == "__main__":
    units = unit_graph()
    for name in sorted(units):
        print(f"{name:12} -> {', '.join(sorted(units[name]))}")
    found = cycles(units)
    print(f"cycles between units: {len(found)}")
    print(f"direction violations: {len(violations())}")
    for line in violations():
        print("  ", line)
