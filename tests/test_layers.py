"""The package's import structure: no cycles between its modules, and the seams the design names (docs/design.md,
section 8): event mode as a host that only ``events.py`` knows, the error helpers in a leaf module."""

from __future__ import annotations

import ast
from pathlib import Path

import symadj_plugins

ROOT = Path(symadj_plugins.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """``{module: modules of the package it imports at module level}`` (names relative to ``symadj_plugins``; ``""``
    the package), ``if TYPE_CHECKING:`` imports included; an import deferred into a function is not counted."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        tree = ast.parse(path.read_text())
        top_level = [*tree.body, *(n for stmt in tree.body if isinstance(stmt, ast.If) for n in stmt.body)]
        for node in top_level:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    edges.add(sub if sub in modules else target)
    return graph


def test_no_module_of_the_package_imports_itself_back():
    graph = _imports()
    done: set[str] = set()

    def visit(module: str, stack: tuple[str, ...]) -> None:
        assert module not in stack, f"import cycle: {' -> '.join((*stack, module))}"
        if module not in done:
            for imported in sorted(graph.get(module, ())):
                visit(imported, (*stack, module))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_event_mode_is_a_host_only_events_knows():
    from symadj_plugins.torchdiffeq.events import _TorchdiffeqEventHost
    from symadj_plugins.torchdiffeq.host import _TorchdiffeqHost

    graph = _imports()
    assert "torchdiffeq.events" not in graph["torchdiffeq.host"]
    assert [m for m, imported in graph.items() if "torchdiffeq.events" in imported] == ["torchdiffeq.api"]
    assert issubclass(_TorchdiffeqEventHost, _TorchdiffeqHost)
    plain = _TorchdiffeqHost(lambda t, y: y, "rk4", 1e-7, 1e-9, {"step_size": 0.1})
    assert not any(hasattr(plain, name) for name in ("event_fn", "event_t", "time_shift", "event_rate"))


def test_the_error_helpers_are_a_leaf_the_adapters_import():
    graph = _imports()
    assert graph["errors"] == set()
    assert all("_registry" not in graph[m] for m in graph if m.startswith(("torchdiffeq", "torchdyn")))
