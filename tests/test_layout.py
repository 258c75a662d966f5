"""The code's shape: one owner per concept, no import cycles, uvicorn's internals in one
module, no module past a few hundred lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "runners")
MAX_LINES = 400
# Names outside uvicorn's public API; only gateway/protocol.py may use them.
UVICORN_PRIVATE = ("httptools_impl", "HttpToolsProtocol", "RequestResponseCycle",
                   "_start_asgi_task", "server_state", "on_response_complete",
                   "_unset_keepalive_if_required")


def modules() -> dict[str, Path]:
    return {f"{p.parent.name}.{p.stem}": p for package in PACKAGES
            for p in sorted((ROOT / package).glob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """The modules of this project that ``name`` imports (TYPE_CHECKING ones included)."""
    package = name.split(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package if node.level else (node.module or "").split(".")[0]
            module = node.module or ""
            target = f"{base}.{module}" if node.level else module
            if node.level and not module:  # from . import x
                found.update(f"{base}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    known = modules()
    out = set()
    for target in found:
        if target in known:
            out.add(target)
        elif target in PACKAGES:
            out.add(f"{target}.__init__")
    return out - {name}


def test_runners_never_import_the_gateway() -> None:
    for name, path in modules().items():
        if name.startswith("runners."):
            assert not [m for m in imports(name, path) if m.startswith("gateway.")], name


def test_no_import_cycles() -> None:
    graph = {name: imports(name, path) for name, path in modules().items()}
    # __init__ re-exports its package: edges into it are edges into what it imports.
    for name, edges in graph.items():
        for init in [e for e in edges if e.endswith(".__init__")]:
            if not name.startswith(init.split(".")[0]):
                edges.discard(init)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if nxt.endswith(".__init__"):
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_no_module_is_longer_than_a_few_hundred_lines() -> None:
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def identifiers(path: Path) -> set[str]:
    """Names a module's code uses: variables, attributes, imported modules and names."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.ImportFrom):
            out.update((node.module or "").split("."))
            out.update(alias.name for alias in node.names)
    return out


def test_uvicorn_internals_are_used_in_one_module_only() -> None:
    users = {name for name, path in modules().items()
             if identifiers(path) & set(UVICORN_PRIVATE)}
    assert users == {"gateway.protocol"}
