"""The notebooks in notebooks/: they run green, top to bottom, and their committed copies carry their plots."""

from __future__ import annotations

import ast
import base64
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["quickstart", "las_tiles", "cell_detections"]


def images(nb) -> list[bytes]:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            png = o.get("data", {}).get("image/png") if o.get("output_type") in ("display_data",
                                                                                  "execute_result") else None
            if png:
                out.append(base64.b64decode(png))
    return out


def cluster_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code" and "LocalCluster(" in c.source]


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook(name):
    """Committed with outputs: executed in order, no errors, plots included, the cluster as required."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run top to bottom, then saved"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    pngs = images(nb)
    assert pngs and all(p.startswith(b"\x89PNG") for p in pngs)
    (cell,) = cluster_cells(nb)
    tree = ast.parse(cell)
    assert not any(isinstance(node, ast.If) for node in ast.walk(tree)), "the cluster cell has no `if`"
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "LocalCluster")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert kw["dashboard_address"] is None and kw["host"] == "127.0.0.1"
    assert kw["n_workers"] == 2 and kw["processes"] is True
    assert "cluster.close()" in nb.cells[-1].source


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path, monkeypatch):
    """Execute a fresh copy with nbclient (scratch data under tmp_path) and check it plots."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks keep their data under tempfile.gettempdir()
    monkeypatch.setenv("ICECHUNK_LOG", "error")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    assert images(nb), "the notebook produced no plot"
    assert (tmp_path / "zv-dask-notebooks" / name).is_dir()
