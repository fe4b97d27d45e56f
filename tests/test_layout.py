"""The house: no import circles among jaxmed's modules (function-level imports included), files small enough to
read, and the scripts the README runs directly executable in git."""

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jaxmed"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module → the jaxmed modules it imports anywhere in its body. `from package import submodule` is an edge to
    the submodule alone (that is what Python loads for it)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                submodules = [f"{base}.{alias.name}" for alias in node.names]
                targets = submodules if all(t in modules for t in submodules) else [base]
            else:
                continue
            graph[name].update(target for target in targets if target in modules and target != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    graph = import_graph()
    assert graph["jaxmed.evaluate.report"] >= {"jaxmed.train", "jaxmed.evaluate.metrics"}  # the parser sees imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_by_stage():
    for stage, members in {"train": ("run", "step", "loop", "optim", "mesh", "checkpoint"),
                           "evaluate": ("report", "metrics", "figures", "explain", "calibration", "paired")}.items():
        for member in members:
            assert (PACKAGE / stage / f"{member}.py").is_file(), (stage, member)


def test_no_python_file_over_500_lines():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    long = {path: n for path in tracked if (n := len((ROOT / path).read_text().splitlines())) > 500}
    assert not long, long


def test_scripts_the_readme_runs_directly_are_executable_in_git():
    modes = subprocess.run(["git", "ls-files", "-s", "launch/tpu.py", ".ci/run"], cwd=ROOT, capture_output=True,
                           text=True).stdout.splitlines()
    assert len(modes) == 2 and all(line.startswith("100755") for line in modes), modes
