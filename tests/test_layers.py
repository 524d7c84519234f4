"""The package's layers: every import points down (or sideways within a layer), never up, and never in a cycle.

The layers, lowest first (README, "How the code is laid out")::

    errors, faults, format, options <- store <- job machinery <- read <- pyramid <- ingest <- local
        <- checks <- api, cli

A module may import its own layer and those below it. Imports inside
functions count (they are how cycles hide); imports under ``TYPE_CHECKING``
do not (annotations only). No zv_dask import sits inside a function: any
``zv_dask.*`` import loads the package first, so a late one saves no time and
only hides an edge of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "zv_dask"

# module (or package) -> layer; a module not named here takes its package's layer
LAYERS = {
    "errors": 0, "faults": 0, "format": 0, "options": 0, "types": 0,
    "store": 1,
    "transaction": 2, "budget": 2, "progress": 2, "scheduling": 2,   # job machinery
    "lazy": 3, "read": 3,
    "pyramid": 4,
    "read_links": 5, "ingest": 5,
    "local": 6,
    "validate": 7, "stats": 7, "export": 7, "xarray_backend": 7,    # checks, exports, adapters
    "": 8, "cli": 8, "__main__": 8,                                   # zv_dask itself: the api
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _layer(module: str) -> int:
    head = module.split(".")[0]
    if head not in LAYERS:
        raise AssertionError(f"zv_dask.{module} has no layer: add it to LAYERS in tests/test_layers.py and the README")
    return LAYERS[head]


def _imports(path: Path, modules: set[str]):
    """``(imported module, line, inside a function)`` for every zv_dask import of ``path``."""
    tree = ast.parse(path.read_text())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for n in ast.walk(node))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        targets = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("zv_dask"):
            base = node.module[len("zv_dask."):] if node.module != "zv_dask" else ""
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                targets.append(sub if sub in modules else base)
        elif isinstance(node, ast.Import):
            targets = [a.name[len("zv_dask."):] if a.name != "zv_dask" else "" for a in node.names
                       if a.name == "zv_dask" or a.name.startswith("zv_dask.")]
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: a relative import; zv_dask imports are absolute")
        for t in targets:
            yield t, node.lineno, id(node) in in_function


def _graph():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    edges = {}
    for f in files:
        m = _module_name(f)
        edges[m] = [(t, line, local) for t, line, local in _imports(f, modules) if t != m]
    return edges


def test_imports_point_down():
    bad = [f"zv_dask.{m} (layer {_layer(m)}) imports zv_dask.{t} (layer {_layer(t)}) at line {line}"
           for m, deps in _graph().items() for t, line, _ in deps if _layer(t) > _layer(m)]
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    edges = {m: {t for t, _, _ in deps} for m, deps in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, path):
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_function_level_imports():
    bad = [f"zv_dask.{m}:{line} imports zv_dask.{t} inside a function"
           for m, deps in _graph().items() for t, line, local in deps if local]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("where, source, check, expected", [
    ("store/levels.py", "from zv_dask.ingest.plan import preflight\n", "test_imports_point_down", "upward"),
    ("store/levels.py", "def f():\n    from zv_dask.cli import main\n", "test_imports_point_down", "upward"),
    ("store/objects.py", "from zv_dask.store.levels import ChunkData\n", "test_no_import_cycles", "cycles"),
    ("ingest/graph.py", "def f():\n    from zv_dask.store.api import open_store\n",
     "test_no_function_level_imports", "inside a function"),
])
def test_the_checks_catch_what_they_are_for(tmp_path, monkeypatch, where, source, check, expected):
    """Each check over a copy of the package with one bad import added fails, naming the problem."""
    import shutil
    import sys

    copy = tmp_path / "zv_dask"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / where
    target.write_text(target.read_text() + "\n" + source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    with pytest.raises(AssertionError, match=expected):
        globals()[check]()
