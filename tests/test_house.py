"""The code's layout: every package imports, imports point down (no circle among modules or among packages), each
package's docstring says what lives in it."""
import ast
import importlib
import os
import pkgutil
import subprocess

from conftest import ROOT

import vega_utils

GROUPS = ("data", "features", "anchors", "runs", "insight", "sweep")


def project_modules():
    """{module name: path} of the project's code (the tests excluded)."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        rel = os.path.relpath(folder, ROOT)
        parts = [] if rel == "." else rel.split(os.sep)
        if parts and (parts[0] in ("tests", "output", "data", "docs") or parts[0].startswith(".")):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
        for f in files:
            if f.endswith(".py"):
                name = parts + ([] if f == "__init__.py" else [f[:-3]])
                if parts and parts[0] == "bench":
                    name = [f[:-3]]          # bench scripts import each other by bare name
                found[".".join(name)] = os.path.join(folder, f)
    return found


def import_graph(modules):
    """{module: set of project modules it imports}, every import counted (also those inside functions)."""
    graph = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                # `from pkg import module` imports the module; `from pkg import name` imports pkg (its __init__)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def group_of(module):
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] in ("vega_utils",) and len(parts) > 1 else parts[0]


def test_no_circular_imports_among_modules():
    cycle = find_cycle(import_graph(project_modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_circular_imports_among_packages():
    groups = {}
    for module, targets in import_graph(project_modules()).items():
        group = group_of(module)
        groups.setdefault(group, set()).update(group_of(t) for t in targets if group_of(t) != group)
    cycle = find_cycle(groups)
    assert cycle is None, "packages import each other: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_group_imports_and_says_what_lives_there():
    for group in GROUPS:
        package = importlib.import_module(f"vega_utils.{group}")
        assert package.__doc__ and len(package.__doc__.split()) > 15, group
    for info in pkgutil.walk_packages(vega_utils.__path__, "vega_utils."):
        importlib.import_module(info.name)


def test_a_fresh_clone_has_the_output_folder():
    tracked = subprocess.run(["git", "ls-files", "output"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert tracked == ["output/README.md"]       # the folder is there, no run is tracked
