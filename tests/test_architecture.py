"""Import structure of ``hirl_ray`` (issue 10, "Done when"), checked on the source (AST).

* Only the Ray glue imports ``ray``: ``hirl_ray/train/ray_*.py``, ``hirl_ray/sweep/*`` and
  ``hirl_ray/hierarchy/actor.py``; ``import hirl_ray`` does not load it.
* ``hirl_ray/config.py`` is the leaf: it imports nothing of ``hirl_ray``.
* No import cycles between modules, counting imports inside functions too (a function-level
  import hides a cycle from Python, not from the layering); ``if TYPE_CHECKING:`` blocks are
  skipped. ``from pkg import name`` counts as importing ``pkg.name`` when that is a module.

The finders are tested on small fake packages first, so the checks cannot pass vacuously.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "hirl_ray"
RAY_GLUE = ("hirl_ray/train/ray_*.py", "hirl_ray/sweep/*.py", "hirl_ray/hierarchy/actor.py")


# ---------------------------------------------------------------- the finders


def package_modules(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``root/package``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, skip_type_checking: bool):
    """Every Import/ImportFrom node, at any depth (functions, classes, try blocks)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(module: str, path: Path, known: set[str],
                     skip_type_checking: bool = True) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import in ``path``.

    Relative imports are resolved against ``module``; ``from a import b`` gives ``a.b`` when
    that is one of the ``known`` modules, else ``a``.
    """
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in _import_nodes(tree, skip_type_checking):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            out.append((sub if sub in known else base, node.lineno))
    return out


def ray_importers(root: Path, package: str, allowed: tuple[str, ...]) -> list[str]:
    """``"file:line imports ray..."`` for every ``ray`` import outside the ``allowed`` globs
    (TYPE_CHECKING blocks included: the rule is about the source, not just the runtime)."""
    modules = package_modules(root, package)
    found = []
    for name, path in modules.items():
        rel = path.relative_to(root).as_posix()
        if any(fnmatch(rel, pattern) for pattern in allowed):
            continue
        for target, line in imported_modules(name, path, set(modules), skip_type_checking=False):
            if target == "ray" or target.startswith("ray."):
                found.append(f"{rel}:{line} imports {target}")
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` (no implicit parent-package edges)."""
    modules = package_modules(root, package)
    return {name: {t for t, _ in imported_modules(name, path, set(modules))
                   if t in modules and t != name}
            for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component with more than one node
    (Tarjan's algorithm, iterative), in a deterministic order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_cycle_through(min(c), c, graph) for c in sorted(components, key=min)]


def _cycle_through(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """Shortest path ``start -> ... -> start`` inside one strongly connected component (BFS)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"{start} is in a strongly connected component but on no cycle")


def format_cycles(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in cycles)


# ---------------------------------------------------------------- the finders, on fake packages


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_ray_finder_sees_function_level_and_aliased_imports(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/pure.py": "import numpy\n",
        "pkg/lazy.py": "def f():\n    from ray.train import report\n    return report\n",
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n",
        "pkg/rayish.py": "import rayon\nimport ray_tools\n",  # not ray
        "pkg/train/__init__.py": "",
        "pkg/train/ray_glue.py": "import ray\n",
    })
    found = ray_importers(tmp_path, "pkg", ("pkg/train/ray_*.py",))
    assert found == ["pkg/lazy.py:2 imports ray.train", "pkg/typed.py:3 imports ray"]
    assert ray_importers(tmp_path, "pkg", ("pkg/*.py", "pkg/train/*.py")) == []


def test_cycle_finder_resolves_submodules_and_skips_type_checking(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import f\n",
        "pkg/a.py": "from pkg import b\n",  # from-import of a submodule: edge a -> b
        "pkg/b.py": "def g():\n    from .c import h\n",  # relative, inside a function: b -> c
        "pkg/c.py": "import pkg.a\n",  # closes a -> b -> c -> a
        "pkg/d.py": "import typing\nif typing.TYPE_CHECKING:\n    from pkg.e import X\n",
        "pkg/e.py": "from pkg.d import Y\n",  # d -> e only under TYPE_CHECKING: no cycle
        "pkg/sub/__init__.py": "from . import leaf\n",
        "pkg/sub/leaf.py": "from .. import a\n",  # sub -> sub.leaf -> a
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"}
    assert graph["pkg.d"] == set() and graph["pkg.e"] == {"pkg.d"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg.a"}
    assert graph["pkg"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_cycle_finder_reports_one_cycle_per_component():
    graph = {"x": {"y"}, "y": {"x", "z"}, "z": set(), "p": {"q"}, "q": {"r"}, "r": {"p", "q"}}
    assert find_cycles(graph) == [["p", "q", "r", "p"], ["x", "y", "x"]]
    assert find_cycles({"x": {"y"}, "y": {"z"}, "z": set()}) == []


# ---------------------------------------------------------------- hirl_ray itself


def test_only_the_ray_glue_imports_ray():
    found = ray_importers(ROOT, PACKAGE, RAY_GLUE)
    assert not found, ("ray imported outside the Ray glue (" + ", ".join(RAY_GLUE)
                       + "):\n" + "\n".join(found))


def test_import_hirl_ray_does_not_load_ray():
    """``import hirl_ray``, then every module outside the glue: Ray stays unloaded (this also
    catches a pure module importing a glue module)."""
    glue = {name for name, path in package_modules(ROOT, PACKAGE).items()
            if any(fnmatch(path.relative_to(ROOT).as_posix(), g) for g in RAY_GLUE)}
    pure = sorted(set(package_modules(ROOT, PACKAGE)) - glue)
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in ["hirl_ray", *{pure!r}]:
            importlib.import_module(name)
            if "ray" in sys.modules:
                sys.exit(f"importing {{name}} loaded ray")
        print("ok")
        """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "hirl_ray.eval.report" in pure and "hirl_ray.train.ray_fit" not in pure


def test_config_is_the_leaf():
    path = ROOT / PACKAGE / "config.py"
    modules = package_modules(ROOT, PACKAGE)
    own = [f"config.py:{line} imports {target}"
           for target, line in imported_modules("hirl_ray.config", path, set(modules),
                                                skip_type_checking=False)
           if target == PACKAGE or target.startswith(f"{PACKAGE}.")]
    assert not own, "hirl_ray/config.py must import nothing of hirl_ray:\n" + "\n".join(own)


def test_no_import_cycles():
    cycles = find_cycles(import_graph(ROOT, PACKAGE))
    if cycles:
        pytest.fail("import cycles in hirl_ray (one per strongly connected component):\n"
                    + format_cycles(cycles))
