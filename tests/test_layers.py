"""The package is layered (STYLE rule 10): a module imports only from its own layer or below, and no
modules import each other in a circle. Read from the source with ``ast`` (imports inside functions
count: they are dependencies too), so a lazy import cannot hide an upward one."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "diffsynth_c")

# Bottom up. A module's layer is the entry naming it or, failing that, the longest package prefix
# listed; a module matching nothing fails test_every_module_has_a_layer (a new module is placed
# here on purpose).
LAYERS = [
    (
        "core",
        [
            "diffsynth_c._core",  # the C extension
            "diffsynth_c.core",
            "diffsynth_c.dlpack",
            "diffsynth_c.kernels",
            "diffsynth_c.progress",
            "diffsynth_c.upstream",  # what the patch and the VRAM layers share about DiffSynth's objects
        ],
    ),
    ("loader and vram", ["diffsynth_c.hub", "diffsynth_c.loader", "diffsynth_c.vram"]),
    (
        "model",
        [
            "diffsynth_c.loader.model",  # DiffSynth's path for load_model
            "diffsynth_c.loader.device_map",
            "diffsynth_c.loader.__init__",  # DiffSynth's loader package exports load_model
        ],
    ),
    (
        "patch, CLI, package",
        [
            "diffsynth_c.patch",
            "diffsynth_c.patch_routes",
            "diffsynth_c.__main__",
            "diffsynth_c._startup",
            "diffsynth_c.auto",
            "diffsynth_c.__init__",
        ],
    ),
]


def modules() -> dict[str, str]:
    """{dotted module name: file} of every Python module of the package (a package's own module
    named ``pkg.__init__``)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3]
                out[rel.replace(os.sep, ".")] = os.path.join(folder, f)
    return out


MODULES = modules()


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if module == n:
                return i
            if module.startswith(n + ".") and len(n) > best_len:
                best, best_len = i, len(n)
    return best


def _target(name: str) -> str:
    """The module an import of name reaches: a package's own module is ``pkg.__init__``."""
    return name + ".__init__" if name + ".__init__" in MODULES else name


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(imported module of the package, line, lazy re-export) for every import statement in
    module. A lazy re-export is an import inside a module-level ``__getattr__`` (PEP 562): it keeps
    an old public path finding a name that moved, and is not a dependency of the module's code."""
    with open(MODULES[module], encoding="utf-8") as f:
        tree = ast.parse(f.read())
    package = module.rsplit(".", 1)[0]
    lazy = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            lazy |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import name` reaches the submodule pkg.name when there is one
            found = [
                f"{base}.{a.name}"
                if _target(f"{base}.{a.name}") in MODULES or f"{base}.{a.name}" == "diffsynth_c._core"
                else base
                for a in node.names
            ]
        else:
            continue
        for name in found:
            if name == "diffsynth_c" or name.startswith("diffsynth_c."):
                out.append((_target(name), node.lineno, id(node) in lazy))
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    assert [m for m in MODULES if layer_of(m) is None] == []


def upward_imports(graph: dict) -> list[str]:
    """Each import (lazy re-exports aside) of a module from a higher layer than its own."""
    upward = []
    for m, deps in graph.items():
        for dep, line, lazy in deps:
            if not lazy and layer_of(dep) > layer_of(m):
                upward.append(f"{m}:{line} imports {dep} ({LAYERS[layer_of(m)][0]} -> {LAYERS[layer_of(dep)][0]})")
    return upward


def cycles(graph: dict) -> list[list[str]]:
    """Tarjan's strongly connected components over module -> imported module (lazy re-exports
    included): each component of more than one module is a cycle."""
    edges = {m: sorted({d for d, _, _ in deps if d in graph and d != m}) for m, deps in graph.items()}
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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

    for m in sorted(edges):
        if m not in index:
            visit(m)
    return found


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(GRAPH) == []


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_the_checks_can_fail():
    """Today's code before the layering had both faults: the VRAM layers' registry written by the
    patch, load_model_auto importing the patch from the model layer. A made-up graph of that shape
    must be caught."""
    graph = {
        "diffsynth_c.loader.model": [("diffsynth_c.patch", 3, False)],
        "diffsynth_c.patch": [("diffsynth_c.vram.layers", 5, False)],
        "diffsynth_c.vram.layers": [("diffsynth_c.upstream", 1, False), ("diffsynth_c.patch", 9, False)],
        "diffsynth_c.upstream": [],
    }
    assert upward_imports(graph) == [
        "diffsynth_c.loader.model:3 imports diffsynth_c.patch (model -> patch, CLI, package)",
        "diffsynth_c.vram.layers:9 imports diffsynth_c.patch (loader and vram -> patch, CLI, package)",
    ]
    assert cycles(graph) == [["diffsynth_c.patch", "diffsynth_c.vram.layers"]]
    assert upward_imports({"diffsynth_c.loader.model": [("diffsynth_c.patch", 3, True)]}) == []


@pytest.mark.parametrize("module", sorted(m.removesuffix(".__init__") for m in MODULES))
def test_every_module_imports_first(module):
    """Each module imports as the first one of a fresh interpreter (an import circle would show as
    a partly initialised module here). In a child process: some modules patch DiffSynth on import."""
    r = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
