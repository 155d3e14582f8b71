"""The package's import graph has no cycle, and report helpers import no study.

The graph is built from the source with ``ast``: an edge for every ``import``
and ``from ... import`` anywhere in a module, also inside functions (an import
that runs late is still a circle). ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def import_graph(root: Path = SRC / "negbatch") -> dict[str, set[str]]:
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, (path, package) in modules.items():
        here = name if package else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "negbatch.lab.studies.negatives" in graph and graph["negbatch.cli"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    # The check above can fail: a report helper that imports the registry closes a circle.
    graph = import_graph()
    graph["negbatch.lab.report"] = graph["negbatch.lab.report"] | {"negbatch.lab.studies"}
    assert any("negbatch.lab.report" in c and "negbatch.lab.studies" in c for c in cycles(graph))


def test_report_helpers_and_statistics_import_no_study():
    graph = import_graph()
    for module in ("negbatch.lab.report", "negbatch.lab.stats", "negbatch.lab.memory"):
        reached, todo = set(), [module]
        while todo:
            for nxt in graph[todo.pop()] - reached:
                reached.add(nxt)
                todo.append(nxt)
        assert not any(m.startswith("negbatch.lab.studies") for m in reached), module
