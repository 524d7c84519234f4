"""The ``zv-dask`` command line, run as a user runs it: in a subprocess.

Jobs use the session's LocalCluster through ``--scheduler`` (one cluster for
the whole file), except ``demo``, which starts its own as a user's first run
does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import zv_dask

BIN = Path(sys.executable).parent / "zv-dask"
N = 30_000


def run(*args, cwd=None, timeout=240, module=None):
    """Run the CLI; returns the CompletedProcess (text mode)."""
    cmd = [sys.executable, "-m", module] if module else [str(BIN)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=env)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def as_json(proc):
    return json.loads(ok(proc).stdout)


def one_line_error(proc, code=2):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert lines and lines[-1].startswith("zv-dask"), proc.stderr
    errors = [ln for ln in lines if ": error:" in ln or ": failed:" in ln]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def address(dask_client):
    return dask_client.scheduler.address


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A Parquet file: x, y, z (float64), intensity (float32), gene (int16), cell (int64)."""
    rng = np.random.default_rng(5)
    d = tmp_path_factory.mktemp("cli-input")
    cells = rng.uniform(0, 400, (300, 3))
    cell = rng.integers(0, 300, N)
    df = pd.DataFrame(cells[cell] + rng.normal(0, 4, (N, 3)), columns=["x", "y", "z"])
    df["intensity"] = rng.random(N).astype(np.float32)
    df["gene"] = rng.integers(0, 20, N).astype(np.int16)
    df["cell"] = cell.astype(np.int64)
    path = d / "spots.parquet"
    df.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def ingested(table, address, tmp_path_factory):
    """``zv-dask ingest`` of the table (with its pyramid), via the shared scheduler."""
    store = tmp_path_factory.mktemp("cli-store") / "spots.zv"
    proc = run("ingest", table, store, "--chunk-shape", "100", "--bin-shape", "20", "--attributes", "intensity,gene",
               "--scheduler", address, "--json")
    return store, proc


# -- help and version ------------------------------------------------------------------------
@pytest.mark.parametrize("command", [None, "ingest", "pyramid", "info", "validate", "demo"])
def test_help(command):
    proc = ok(run(*([command] if command else []), "--help"))
    assert proc.stdout.startswith("usage: zv-dask")
    if command == "ingest":
        for flag in ("--chunk-shape", "--bounds", "--bin-shape", "--columns", "--attributes", "--object-ids",
                     "--out-of-bounds", "--dtype", "--shard-shape", "--pyramid", "--no-pyramid", "--levels",
                     "--bin-ratio", "--method", "--icechunk", "--message", "--branch", "--scheduler", "--workers",
                     "--memory-limit", "--storage-option", "--overwrite", "--dry-run", "--json", "--quiet"):
            assert flag in proc.stdout, flag


def test_version_and_module_entry_points():
    assert ok(run("--version")).stdout.strip() == f"zv-dask {zv_dask.__version__} (writes ZV {zv_dask.ZV_VERSION})"
    assert ok(run("--version", module="zv_dask")).stdout == ok(run("--version", module="zv_dask.cli")).stdout


# -- ingest / info / validate / pyramid --------------------------------------------------------
def test_ingest_json(ingested):
    store, proc = ingested
    rep = as_json(proc)
    assert rep["points_written"] == N and rep["points_dropped"] == 0
    assert rep["dtype"] == "float32" and rep["chunk_shape"] == [100.0] * 3
    assert [lv["level"] for lv in rep["levels"]] == list(range(len(rep["levels"])))
    assert len(rep["levels"]) > 1, "the pyramid is built by default"
    assert rep["levels"][0]["vertex_count"] == N
    counts = [lv["vertex_count"] for lv in rep["levels"]]
    assert counts == sorted(counts, reverse=True)
    assert zv_dask.open_store(str(store)).levels == [lv["level"] for lv in rep["levels"]]


def test_ingest_human_output_and_progress(table, address, tmp_path):
    proc = ok(run("ingest", table, tmp_path / "h.zv", "--chunk-shape", "100", "--no-pyramid",
                  "--scheduler", address))
    assert proc.stdout.startswith("IngestReport:")
    assert f"{N:,} written" in proc.stdout
    # progress (stderr is not a terminal here: a start and an end line per stage, no bar frames)
    assert "scan: statistics and chunk counts: " in proc.stderr and "done in" in proc.stderr
    assert "\r" not in proc.stderr
    assert zv_dask.open_store(str(tmp_path / "h.zv")).levels == [0]
    quiet = ok(run("ingest", table, tmp_path / "q.zv", "--chunk-shape", "100", "--no-pyramid", "--quiet",
                   "--scheduler", address))
    assert quiet.stderr.strip() == "", quiet.stderr


def test_info(ingested):
    store, proc = ingested
    levels = as_json(proc)["levels"]
    info = as_json(run("info", store, "--json"))
    assert info["zv_version"] == "0.9.2" and info["backend"] == "local" and info["dtype"] == "float32"
    assert [lv["vertex_count"] for lv in info["levels"]] == [lv["vertex_count"] for lv in levels]
    assert set(info["levels"][0]["attributes"]) == {"intensity", "gene"}
    assert info["sizes"]["total"] > 0 and set(info["sizes"]["levels"]) == {str(lv["level"]) for lv in levels}
    text = ok(run("info", store)).stdout
    assert "ZV 0.9.2" in text and "intensity float32" in text and f"{N:,}" in text


def test_validate(ingested):
    store, _ = ingested
    rep = as_json(run("validate", store, "--json", "--quiet"))
    assert rep["ok"] is True and rep["errors"] == [] and rep["chunks_checked"] > 0
    assert "valid" in ok(run("validate", store, "--quiet")).stdout


def test_validate_fails_on_a_broken_store(table, tmp_path):
    import zarr

    store = tmp_path / "broken.zv"
    from zv_dask.local import write_points

    write_points(store, np.random.default_rng(0).uniform(0, 10, (100, 3)), chunk_shape=5.0)
    g = zarr.open_group(str(store / "0"), mode="r+")
    lv = dict(g.attrs["zarr_vectors_level"])
    lv["vertex_count"] = 101
    g.attrs["zarr_vectors_level"] = lv
    proc = run("validate", store, "--json", "--quiet")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    rep = json.loads(proc.stdout)
    assert rep["ok"] is False and any("vertex_count is 101" in e for e in rep["errors"])


def test_pyramid(table, address, tmp_path):
    store = tmp_path / "p.zv"
    ok(run("ingest", table, store, "--chunk-shape", "100", "--bin-shape", "20", "--no-pyramid", "-q",
           "--scheduler", address))
    rep = as_json(run("pyramid", store, "--levels", "2", "--bin-ratio", "2", "--method", "first", "--scheduler",
                      address, "--json"))
    assert [lv["level"] for lv in rep["levels"]] == [0, 1, 2]
    assert rep["levels"][1]["bin_shape"] == [40.0] * 3 and rep["levels"][2]["bin_shape"] == [80.0] * 3
    assert zv_dask.open_store(str(store)).levels == [0, 1, 2]
    text = ok(run("pyramid", store, "--levels", "1", "--scheduler", "synchronous", "-q")).stdout
    assert text.startswith("PyramidReport:") and zv_dask.open_store(str(store)).levels == [0, 1]


def test_ingest_objects_icechunk_and_dry_run(table, address, tmp_path):
    store = tmp_path / "cells-repo"
    plan = as_json(run("ingest", table, store, "--chunk-shape", "100", "--bin-shape", "20", "--object-ids", "cell",
                       "--icechunk", "--dry-run", "--json", "--scheduler", address))
    assert not store.exists(), "a dry run writes nothing"
    assert plan["points"] == N and plan["object_ids"] is True and plan["store_action"] == "create"
    assert plan["chunks"] > 0 and plan["grid_cells"] >= plan["chunks"] and plan["write_groups"] >= 1
    assert plan["estimated_bytes"] > N * 12 and plan["estimated_task_memory"] > 0
    assert set(plan["attributes"]) == {"intensity", "gene"}
    text = ok(run("ingest", table, store, "--chunk-shape", "100", "--object-ids", "cell", "--icechunk",
                  "--dry-run", "--scheduler", address, "-q")).stdout
    assert "nothing written" in text and "bytes" in text and "memory" in text
    assert not store.exists()
    rep = as_json(run("ingest", table, store, "--chunk-shape", "100", "--bin-shape", "20", "--object-ids", "cell",
                      "--icechunk", "-m", "cells from the CLI", "--levels", "1", "--json", "-q",
                      "--scheduler", address))
    assert rep["snapshot_id"] and [lv["level"] for lv in rep["levels"]] == [0, 1]
    info = as_json(run("info", store, "--json"))  # an icechunk repository is recognised without --icechunk
    assert info["backend"] == "icechunk" and info["levels"][0]["num_objects"] == 300
    assert as_json(run("validate", store, "--icechunk", "--json", "-q"))["ok"]
    import icechunk

    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(store)))
    assert next(iter(repo.ancestry(branch="main"))).message == "cells from the CLI"


def test_las_tiles_glob_keeps_float64(tmp_path, address):
    import laspy

    rng = np.random.default_rng(2)
    for i in range(2):
        header = laspy.LasHeader(point_format=3, version="1.2")
        header.scales = np.array([0.01, 0.01, 0.01])
        header.offsets = np.array([500_000.0, 5_000_000.0, 0.0])
        las = laspy.LasData(header)
        n = 2000
        las.x = 500_000 + 100 * i + rng.uniform(0, 100, n)
        las.y = 5_000_000 + rng.uniform(0, 100, n)
        las.z = 200 + rng.uniform(0, 30, n)
        las.intensity = rng.integers(0, 4000, n).astype(np.uint16)
        las.write(tmp_path / f"tile_{i}.laz")
    rep = as_json(run("ingest", str(tmp_path / "tile_*.laz"), tmp_path / "las.zv", "--chunk-shape", "50",
                      "--no-pyramid", "--json", "-q", "--scheduler", address))
    assert rep["points_written"] == 4000 and rep["dtype"] == "float64" and "LAS" in rep["dtype_reason"]
    assert rep["bounds"][0][0] > 500_000


# -- demo -------------------------------------------------------------------------------------
def test_demo_defaults(tmp_path):
    """What a user runs first: no arguments, a LocalCluster, ./zv-demo.zv."""
    proc = ok(run("demo", cwd=tmp_path))
    assert (tmp_path / "zv-demo.zv" / "zarr.json").exists()
    assert "IngestReport" in proc.stdout and "300,000 written" in proc.stdout
    assert "ZV store" in proc.stdout and ": valid" in proc.stdout
    assert "starting a LocalCluster" in proc.stderr and "shuffle and write level 0 and level 1" in proc.stderr
    assert "pyramid level 2" in proc.stderr  # the levels the write tasks did not build: a round of their own
    info = zv_dask.store_info(zv_dask.open_store(str(tmp_path / "zv-demo.zv")))
    assert info["levels"][0]["vertex_count"] == 300_000 and len(info["levels"]) > 2
    assert set(info["levels"][0]["attributes"]) == {"intensity", "label"}


def test_demo_icechunk_json(tmp_path, address):
    out = as_json(run("demo", "ice", "--icechunk", "--points", "20000", "--json", "-q", "--scheduler", address,
                      cwd=tmp_path))
    assert out["validation"]["ok"] and out["report"]["points_written"] == 20000
    assert out["info"]["backend"] == "icechunk" and out["report"]["snapshot_id"]
    again = as_json(run("demo", "ice", "--icechunk", "--points", "1000", "--json", "-q", "--scheduler", address,
                        cwd=tmp_path))  # a second run replaces the demo store
    assert again["info"]["levels"][0]["vertex_count"] == 1000


# -- bad arguments and bad input: exit 2, one line, no traceback --------------------------------
BAD = {
    "no command": ([], "the following arguments are required: COMMAND"),
    "unknown command": (["frob"], "invalid choice: 'frob'"),
    "ingest without args": (["ingest"], "the following arguments are required: SOURCE, STORE"),
    "bad number": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "abc"], "argument --chunk-shape"),
    "odd bounds": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "--bounds", "1,2,3"], "--bounds"),
    "missing chunk shape": (["ingest", "{table}", "{tmp}/o.zv"], "--chunk-shape is required"),
    "missing input": (["ingest", "{tmp}/nope.parquet", "{tmp}/o.zv", "--chunk-shape", "9"], "does not exist"),
    "unknown column": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "--columns", "a,b,c"],
                       "coordinate columns"),
    "storage option": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "-S", "novalue"], "KEY=VALUE"),
    "zero workers": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "--workers", "0"], "--workers"),
    "memory limit": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "--memory-limit", "lots"],
                     "--memory-limit"),
    "scheduler and workers": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "--workers", "2",
                               "--scheduler", "threads"], "not allowed with argument --scheduler"),
    "scheduler": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "--scheduler", "nonsense"],
                  "not a scheduler address"),
    "out of bounds": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "--bounds", "0,0,0,1,1,1",
                       "--scheduler", "synchronous"], "pass --out-of-bounds ignore to drop them"),
    "store holds points": (["ingest", "{table}", "{store}", "--chunk-shape", "9"],
                           "already holds points; pass --overwrite to replace it, or --append to add the points"),
    "scheduler file": (["ingest", "{table}", "{tmp}/o.zv", "--chunk-shape", "9", "--scheduler-file",
                        "{tmp}/nope.json"], "--scheduler-file '"),
    "append to nothing": (["ingest", "{table}", "{tmp}/o.zv", "--append"], "no ZV store there"),
    "unwritable store": (["ingest", "{table}", "/proc/o.zv", "--chunk-shape", "9"],
                         "cannot make a store at '/proc/o.zv': '/proc' does not take new directories"),
    "file in the way": (["ingest", "{table}", "{table}/o.zv", "--chunk-shape", "9"], "is a file, not a directory"),
    "info missing": (["info", "{tmp}/nope.zv"], "no store at"),
    "info on a file": (["info", "{table}"], "is a file"),
    "validate missing": (["validate", "{tmp}/nope.zv"], "no store at"),
    "pyramid ratio": (["pyramid", "{store}", "--bin-ratio", "1"], "would not be coarser"),
    "pyramid axes": (["pyramid", "{store}", "--bin-ratio", "2,2"], "bin_ratio"),
    "demo points": (["demo", "--points", "-5"], "--points"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments(case, table, ingested, tmp_path):
    argv, expected = BAD[case]
    store, _ = ingested
    argv = [a.format(table=table, tmp=tmp_path, store=store) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_line_error(run(*argv, cwd=tmp_path))
    assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "bad input writes nothing"


def test_json_errors_and_log_friendly_progress(table, tmp_path):
    """Under --json an error is JSON on stdout; progress in a log (stderr not a terminal) has no bar frames."""
    bad = run("ingest", tmp_path / "nope.parquet", tmp_path / "o.zv", "--chunk-shape", "9", "--json", "-q")
    assert bad.returncode == 2
    doc = json.loads(bad.stdout)
    assert doc["exit_code"] == 2 and doc["type"] == "InputError" and "does not exist" in doc["error"]
    good = run("ingest", table, tmp_path / "p.zv", "--chunk-shape", "9", "--levels", "1", "--workers", "1")
    assert good.returncode == 0, good.stderr
    assert "\r" not in good.stderr
    assert "tasks" in good.stderr and "done in" in good.stderr


def test_no_cluster_asked_runs_in_process_with_sampling_options_and_cli_spelling(table, tmp_path):
    """No cluster asked for: threads in this process, said in the report; --sample-size/--seed
    reach the pyramid; the report's messages use the CLI's spelling."""
    proc = ok(run("ingest", table, tmp_path / "s.zv", "--chunk-shape", "100", "--bin-shape", "10", "--levels", "1",
                  "--method", "sample", "--sample-size", "2", "--seed", "5"))
    assert "LocalCluster" not in proc.stderr and "\r" not in proc.stderr
    assert "scheduler   threads in this process" in proc.stdout
    assert "--dtype float64" in proc.stdout or "positions   float64" in proc.stdout
    messages = [ln for ln in proc.stdout.splitlines() if ln.lstrip().startswith(("warning", "positions"))]
    assert messages and not [ln for ln in messages if "dtype='" in ln or "chunk_shape" in ln], messages
    df = pd.read_parquet(table)
    api = zv_dask.ingest(df, tmp_path / "api.zv", columns=["x", "y", "z"], chunk_shape=100, base_bin_shape=10,
                         pyramid={"levels": 1, "method": "sample", "sample_size": 2, "seed": 5})
    got = zv_dask.read_points(tmp_path / "s.zv", level=1).compute()
    want = zv_dask.read_points(tmp_path / "api.zv", level=1).compute()
    assert len(got) == api.levels[1]["vertex_count"] and got.equals(want)
    other = zv_dask.read_points(ok(run("ingest", table, tmp_path / "t.zv", "--chunk-shape", "100", "--bin-shape",
                                       "10", "--levels", "1", "--method", "sample", "--sample-size", "2", "--seed",
                                       "6", "-q")) and
                                tmp_path / "t.zv", level=1).compute()
    assert not other.equals(got), "another seed picks other points"
    doc = as_json(run("ingest", table, tmp_path / "w.zv", "--chunk-shape", "100", "--no-pyramid", "--workers", "1",
                      "--json", "-q"))
    assert doc["scheduler"].startswith("tcp://127.0.0.1:") and "1 worker" in doc["scheduler"]
