"""The layout is the architecture: one namespace (``loadlab.*``), imports that run one way between the layers, no
import cycle between modules, and none of the five generic folder names importable after an install.

The import graph is read from the source (every ``import`` statement, those inside functions too), so an import
that would only run on some path counts as much as one at the top of a module."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import loadlab
from tests.conftest import REPO

# Lowest first: a module may import its own layer's and lower layers' modules, never a higher one's.
LAYERS = [
    ("loadlab.config",),
    ("loadlab.exporters",),
    ("loadlab.stack",),
    ("loadlab.reports", "loadlab.dashboards"),
    ("loadlab.loadtests",),
    ("loadlab.bench",),
    ("loadlab.cli",),
]
GENERIC_NAMES = ("stack", "exporters", "loadtests", "reports", "dashboards")


def _modules() -> dict[str, Path]:
    """Every module of the installed namespace, by dotted name, from the packages' own paths (the editable
    install's mapping, not a guess from the repository's folders)."""
    import importlib
    import pkgutil

    found = {"loadlab": Path(loadlab.__file__)}
    roots = [("loadlab", loadlab.__path__)] + [
        (f"loadlab.{name}", importlib.import_module(f"loadlab.{name}").__path__) for name in GENERIC_NAMES]
    for prefix, path in roots:
        found[prefix] = Path(importlib.util.find_spec(prefix).origin)
        for info in pkgutil.walk_packages(path, prefix + "."):
            spec = info.module_finder.find_spec(info.name, None)
            if spec and spec.origin and spec.origin.endswith(".py"):
                found[info.name] = Path(spec.origin)
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def _layer(module: str) -> int:
    for index, packages in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in packages):
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS: add its package there")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_package_of_the_namespace_is_in_a_layer_and_the_graph_is_read():
    graph = _graph()
    assert {"loadlab.stack.app", "loadlab.exporters.tracing", "loadlab.cli.main", "loadlab.reports.render"} <= set(graph)
    assert "loadlab.config.settings" in graph["loadlab.stack.app"]  # the reader sees imports
    for module in graph:
        if module != "loadlab":
            _layer(module)


def test_no_import_runs_upward():
    upward = sorted(f"{module} -> {target}" for module, targets in _graph().items() if module != "loadlab"
                    for target in targets if target != "loadlab" and _layer(target) > _layer(module))
    assert not upward, "imports that run from a lower layer to a higher one:\n" + "\n".join(upward)


def test_the_system_under_test_imports_nothing_of_the_reports():
    offending = sorted(f"{m} -> {t}" for m, targets in _graph().items() if m.startswith("loadlab.stack")
                       for t in targets if t.startswith("loadlab.reports"))
    assert not offending, offending


def test_no_import_cycle():
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
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
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in graph:
        if node not in index:
            visit(node)
    # a package's __init__ importing its own modules is not a cycle of design; none of ours does, so none is allowed
    assert not cycles, f"import cycles: {cycles}"


def test_none_of_the_generic_names_is_importable_and_loadlab_is(tmp_path):
    """From a neutral directory, with the interpreter the suite runs on (the README's install)."""
    code = ("import importlib.util, json; "
            f"print(json.dumps({{n: importlib.util.find_spec(n) is not None for n in {list(GENERIC_NAMES)!r}}} | "
            "{'loadlab': importlib.util.find_spec('loadlab.stack.app') is not None}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    found = json.loads(out.stdout)
    assert found.pop("loadlab") is True
    assert not any(found.values()), f"importable from a neutral directory: {[n for n, v in found.items() if v]}"


def test_child_processes_start_inside_the_namespace():
    """Every ``-m`` and ``-A`` the code passes to a child names a ``loadlab.`` module."""
    offending = []
    for path in sorted(list((REPO / "stack").glob("*.py")) + list((REPO / "loadlab").rglob("*.py"))):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.List):
                values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                for flag, value in zip(values, values[1:]):
                    if flag in ("-m", "-A") and isinstance(value, str) and value not in ("uvicorn", "celery") \
                            and not value.startswith("loadlab."):
                        offending.append(f"{path.relative_to(REPO)}: {flag} {value}")
                    if flag == "uvicorn" and isinstance(value, str) and not value.startswith("loadlab."):
                        offending.append(f"{path.relative_to(REPO)}: uvicorn {value}")
    assert not offending, offending
