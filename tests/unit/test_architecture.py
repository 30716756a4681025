"""The shape README "Architecture" promises: no import cycle in relay/,
workers/ or metrics/ (type-checking imports included), metrics/ imports
nothing else of ours, the supervisor stays small."""

from __future__ import annotations

import ast
import os

from tests.support.relay import ROOT

PACKAGES = ("relay", "workers", "metrics")


def _modules() -> dict[str, str]:
    out = {}
    for top in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3]
                    out[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(dirpath, f)
    return out


def _imports() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module in mods:
                    deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles():
    graph = _imports()
    cycles = set()

    def walk(node, stack):
        for dep in graph[node]:
            if dep in stack:
                cycle = stack[stack.index(dep):]
                cycles.add(" -> ".join(cycle + [dep]))
            elif len(stack) < 30:
                walk(dep, stack + [dep])

    for name in graph:
        walk(name, [name])
    assert not cycles, sorted(cycles)


def test_metrics_imports_nothing_else_of_ours():
    graph = _imports()
    leaks = {m: sorted(d for d in deps if not d.startswith("metrics"))
             for m, deps in graph.items() if m.startswith("metrics")}
    assert not any(leaks.values()), leaks


def test_the_supervisor_stays_signals_reconcile_reap():
    with open(os.path.join(ROOT, "workers", "supervisor.py")) as f:
        assert sum(1 for _ in f) < 350, "workers/supervisor.py grew: move machinery into its own module"
