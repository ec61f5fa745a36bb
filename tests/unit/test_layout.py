"""The project's layout rules, read from the source: how the next person finds out.

- ``protocol`` is pure and shared: it imports neither ``agent`` nor ``control_plane``;
- ``agent`` and ``control_plane`` never import each other (they meet only in ``protocol`` and
  on the wire; the command line is assembled through entry points, ADR 1);
- no import circle between the project's modules (a module importing its own package, as
  ``from pkg import sibling`` does, is none).

Every import counts: one inside a function (a lazy import is still a dependency) and one under
``if TYPE_CHECKING:`` (a module that needs another's types to be read depends on it; a circle
of those is two ideas that have not been pulled apart).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "agent", "control_plane", "migrations")
# What stands on the packages: checked for the rules that concern them (bench never imports
# tests), and counted as importers, never as part of an import circle of the product.
USERS = ("bench", "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of ``packages``, by dotted name."""
    return {
        _module_name(p): p
        for package in packages
        for p in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Dotted names this module imports (absolute, relative ones resolved)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                if not is_package:
                    anchor = anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # ``from pkg import mod`` imports a module when pkg.mod is one.
            yield from (f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))


@cache
def import_graph(packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports."""
    modules = project_modules(packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = set()
        for imported in _imports(tree, name, path.name == "__init__.py"):
            # A module's own packages are already being imported when it runs: no circle.
            if imported in modules and not (name == imported or name.startswith(f"{imported}.")):
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


FORBIDDEN = {
    ("protocol", "agent"),
    ("protocol", "control_plane"),
    ("agent", "control_plane"),
    ("control_plane", "agent"),
    ("bench", "tests"),
}


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Imports that cross a forbidden boundary, as ``module imports target``."""
    return sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if (_top(module), _top(target)) in FORBIDDEN
    )


def test_the_graph_is_the_project() -> None:
    # A wrong root or package list would make every other check pass on nothing.
    graph = import_graph()
    assert len(graph) > 150
    assert "control_plane.state" in graph["control_plane.app"]
    assert "protocol.keyset" in graph["agent.keyring"]


def test_protocol_is_pure_and_the_two_sides_meet_only_there() -> None:
    found = crossings(import_graph((*PACKAGES, *USERS)))
    assert not found, "\n".join(found)


def test_no_import_circle_between_project_modules() -> None:
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_see_a_circle_and_a_crossing() -> None:
    # The graph reader itself: a planted circle is found, relative imports are resolved.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from . import x\nfrom ..p import q\nif TYPE_CHECKING:\n    import z\n")
    got = set(_imports(tree, "pkg.sub.mod", is_package=False))
    assert {"pkg.sub.x", "pkg.p.q", "z"} <= got
    planted = {
        "protocol.a": {"protocol.b"},
        "agent.x": {"control_plane.y", "protocol.a"},
        "bench.z": {"tests.support.w"},
    }
    assert crossings(planted) == [
        "agent.x imports control_plane.y",
        "bench.z imports tests.support.w",
    ]


def _importers_of(prefix: str) -> dict[str, set[str]]:
    """Modules importing ``prefix`` or a module under it, with what they import."""
    out: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        hits = {t for t in targets if t == prefix or t.startswith(f"{prefix}.")}
        if hits and not (module == prefix or module.startswith(f"{prefix}.")):
            out[module] = hits
    return out


def test_services_never_speak_http() -> None:
    # Services raise domain errors and take typed requests; only the REST edge (api/) and the
    # wiring (app.py) know its types, so MQTT and any later transport reuse them (ADR 14).
    wrong = {
        m: t for m, t in _importers_of("control_plane.api").items() if m != "control_plane.app"
    }
    assert not wrong, f"outside control_plane/api: {wrong}"


def test_library_code_never_lives_in_a_command_line_module() -> None:
    # The CLI parses arguments and calls the library; nothing else may need a CLI module.
    wrong = {**_importers_of("control_plane.cli"), **_importers_of("agent.cli")}
    assert not wrong, f"imports of a CLI module: {wrong}"
