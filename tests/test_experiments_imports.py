"""The import graph of the project has no cycle, and every experiments module imports.

The graph is read from the source (ast), every ``import`` counted, also those inside
functions: a cycle hidden behind a function-level import is still a cycle.  Only the
project's own packages (jattn, experiments, tests, scripts) are followed.
"""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jattn", "experiments")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return {_module_name(p): p for p in files}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a import b`` counts as an
    import of ``a.b`` when that is a module, else of ``a``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a function: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_project_has_no_import_cycle():
    graph = import_graph()
    assert "experiments.train" in graph and "experiments.run" in graph["experiments.plot"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_plot_sample_and_throughput_use_the_run_library_not_the_cli():
    graph = import_graph()
    for module in ("experiments.plot", "experiments.sample", "experiments.throughput"):
        assert "experiments.train" not in graph[module], module
        assert "experiments.run" in graph[module], module


def test_the_loops_and_plots_never_name_a_task():
    """train, plot, sample and data go through the Task protocol (experiments.tasks)."""
    from experiments import tasks

    for module in ("train", "plot", "sample", "data", "run", "config", "throughput"):
        source = (ROOT / "experiments" / f"{module}.py").read_text()
        strings = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)]
        named = sorted({name for name in tasks.REGISTRY for s in strings if s == name})
        assert not named, f"experiments/{module}.py names the task(s) {named}"


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m.startswith("experiments")))
def test_every_experiments_module_imports(module):
    importlib.import_module(module)
