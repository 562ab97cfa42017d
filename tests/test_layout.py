"""the package boundaries DESIGN.md draws, read from the source: annotate imports neither pipeline nor train,
pipeline never imports train, train touches pipeline only through the shard contract, and no module imports
itself back through others (imports inside functions count: they run too)"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("annotate", "pipeline", "train")


def project_imports() -> dict[str, set[str]]:
    """{module: project modules it imports anywhere in its source}."""
    graph = {}
    for package in PACKAGES:
        for path in (REPO / package).glob("*.py"):
            module = f"{package}.{path.stem}" if path.stem != "__init__" else package
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                    found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline import format`
            graph[module] = {m for m in found if m.split(".")[0] in PACKAGES}
    known = set(graph)
    return {m: {i for i in imports if i in known and i != m} for m, imports in graph.items()}


def test_the_arrows_point_one_way():
    graph = project_imports()
    for module, imports in graph.items():
        top = module.split(".")[0]
        if top == "annotate":
            assert not {i for i in imports if not i.startswith("annotate")}, module
        if top == "pipeline":
            assert not {i for i in imports if i.startswith("train")}, module
        if top == "train":
            assert {i for i in imports if i.startswith("pipeline")} <= {"pipeline", "pipeline.format"}, module


def test_no_module_imports_itself_back():
    graph = project_imports()
    graph = {m: {i for i in imports if i not in PACKAGES} for m, imports in graph.items()}  # package inits aside

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for nxt in graph.get(module, ()):
                if nxt == start:
                    return [*path, start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [c for c in (cycle_from(m) for m in sorted(graph)) if c]
    assert not cycles, cycles
