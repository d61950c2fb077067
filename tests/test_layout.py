"""The shape of the code: what a newcomer relies on when reading it.

- No two modules of ``sidecar`` import each other, directly or around a longer
  cycle: each layer owns the ones below it (docs/README.md has the map).
- Code comments cite the project's own docs/ pages, and every page they cite exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sidecar"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> the ``sidecar`` modules it imports (at any level: lazy imports count,
    ``if TYPE_CHECKING`` ones do not, since they never run)."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        type_only: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                type_only.update(id(n) for sub in node.body for n in ast.walk(sub))
        deps: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = name.split(".")
                    keep = len(base_parts) - node.level + (1 if is_package else 0)
                    base = ".".join(base_parts[:keep] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                candidates = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            deps.update(c for c in candidates if c in files and c != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    assert "sidecar.process.main" in graph  # the walk found the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above could not fail if this did not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_process_layer_points_one_way() -> None:
    graph = import_graph()
    assert "sidecar.process.main" not in graph["sidecar.process.server"]
    assert "sidecar.process.workers" not in graph["sidecar.process.server"]
    assert "sidecar.cli" not in graph["sidecar.demo"]


def test_code_cites_no_document_users_do_not_have() -> None:
    pattern = re.compile(r"SPEC(\.md)? ?(§|section) ?\d")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for path in PACKAGE.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_every_docs_page_the_code_cites_exists() -> None:
    """Pages still being written (routes, spool, connections) are cited by the code
    that builds them; they must land with it."""
    cited = {
        (path.relative_to(REPO), page)
        for folder in ("sidecar", "tests", "bench", "deploy")
        for path in (REPO / folder).rglob("*")
        if path.is_file() and path.suffix in {".py", ".yaml", ".json", ".md"}
        for page in re.findall(r"docs/([a-z0-9-]+\.md)", path.read_text())
    }
    assert cited  # the walk found citations
    missing = sorted(
        f"{where}: docs/{page}" for where, page in cited if not (REPO / "docs" / page).exists()
    )
    assert missing == []
