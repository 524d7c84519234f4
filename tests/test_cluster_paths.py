"""A real cluster the way clusters run: a ``dask scheduler`` and two ``dask worker`` processes, each started
in a working directory of its own, and a client in a third. Paths a user gives are relative to the client.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import zv_dask

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``(scheduler address, scheduler file, directory)`` of a scheduler and two workers in separate directories."""
    base = tmp_path_factory.mktemp("cluster")
    procs = []
    sched_file = base / "scheduler.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    (base / "s").mkdir()
    wenv = {**env, "ZV_DASK_FAIL_AT": "level:4"}  # (a build of 4 levels fails there: errors cross processes)
    procs.append(subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                   "--no-dashboard", "--scheduler-file", str(sched_file)], cwd=base / "s",
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    deadline = time.monotonic() + 60
    while not sched_file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    for i in range(2):
        d = base / f"w{i}"
        d.mkdir()
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(sched_file),
                                       "--nthreads", "1", "--memory-limit", "2GiB", "--no-dashboard",
                                       "--host", "127.0.0.1", "--local-directory", str(d)], cwd=d,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=wenv))
    from distributed import Client

    with Client(scheduler_file=str(sched_file), timeout="60s") as c:
        c.wait_for_workers(2, timeout=120)
        address = c.scheduler.address
    yield address, sched_file, base
    for p in procs[::-1]:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


def test_relative_paths_on_a_cluster(cluster, tmp_path, monkeypatch, rng):
    """Relative input, store and scratch from the client's directory: ingest (CLI and API), read, validate."""
    address, sched_file, base = cluster
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    monkeypatch.chdir(client_dir)
    pts = rng.uniform(0, 100, (20_000, 3))
    pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], "i": np.arange(20_000, dtype="int32")}) \
        .to_parquet("cloud.parquet")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([str(BIN / "zv-dask"), "ingest", "cloud.parquet", "rel.zv", "--chunk-shape", "25",
                        "--levels", "2", "--scheduler", address, "--quiet"], cwd=client_dir, capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (client_dir / "rel.zv" / "0" / "zarr.json").exists()
    p = subprocess.run([str(BIN / "zv-dask"), "pyramid", "rel.zv", "--levels", "3", "--scheduler-file",
                        str(sched_file), "--quiet"], cwd=client_dir, capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert zv_dask.open_store(client_dir / "rel.zv").levels == [0, 1, 2, 3]
    v = subprocess.run([str(BIN / "zv-dask"), "validate", "rel.zv"], cwd=client_dir, capture_output=True, text=True,
                       env=env, timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    missing = subprocess.run([str(BIN / "zv-dask"), "ingest", "nothere.parquet", "x.zv", "--chunk-shape", "25",
                              "--scheduler", address, "--quiet"], cwd=client_dir, capture_output=True, text=True,
                             env=env, timeout=120)
    local = subprocess.run([str(BIN / "zv-dask"), "ingest", "nothere.parquet", "x.zv", "--chunk-shape", "25",
                            "--scheduler", "synchronous", "--quiet"], cwd=client_dir, capture_output=True,
                           text=True, env=env, timeout=120)
    assert missing.returncode == local.returncode == 2
    assert missing.stderr == local.stderr
    from distributed import Client

    with Client(address) as c:
        rep = zv_dask.ingest(pts, "api.zv", chunk_shape=25, client=c, memory_budget="8MiB", scratch="scratch",
                             partition_rows=5000)
        assert rep.shuffle == "staged"
        more = zv_dask.ingest(rng.uniform(0, 50, (3000, 3)), "api.zv", mode="append", client=c)
        assert more.points_written == 3000
        pr = zv_dask.build_pyramid("api.zv", levels=2, client=c)
        assert pr.levels == [1, 2]
    assert len(zv_dask.read_points("rel.zv")) == 20_000
    assert len(zv_dask.read_points("api.zv")) == 23_000
    assert zv_dask.validate_store("api.zv").ok
    assert not (client_dir / "scratch").exists() or not any((client_dir / "scratch").iterdir())
    for w in ("w0", "w1"):  # nothing was written relative to a worker's directory
        names = {p.name for p in (base / w).iterdir()}
        assert not names & {"rel.zv", "api.zv", "scratch", "x.zv"}, names


def test_worker_errors_keep_their_type(cluster, tmp_path, rng):
    """A task failing on a worker reaches the client as the IngestError it raised, stage and all."""
    from distributed import Client

    address, _, _ = cluster
    store = tmp_path / "s.zv"
    with Client(address) as c:
        zv_dask.ingest(rng.uniform(0, 100, (3000, 3)), store, chunk_shape=10, client=c)
        with pytest.raises(zv_dask.IngestError, match="injected failure") as err:
            zv_dask.build_pyramid(store, levels=4, levels_per_task=1, client=c)
    assert err.value.stage == "pyramid level 4"


def test_an_unpicklable_cause_does_not_hide_the_error():
    import pickle

    import tblib.pickling_support
    from zarr.errors import ArrayNotFoundError

    try:
        try:
            raise ArrayNotFoundError("store", "0/vertices")
        except ArrayNotFoundError as cause:
            raise zv_dask.IngestError("writing group 0 failed: ArrayNotFoundError", stage="write",
                                      chunk="0.0.0") from cause
    except zv_dask.IngestError as e:
        tblib.pickling_support._install_for_instance(e, set())  # what distributed does with a task's error
        back = pickle.loads(pickle.dumps(e))
    assert type(back) is zv_dask.IngestError and (back.stage, back.chunk) == ("write", "0.0.0")
    assert "ArrayNotFoundError" in str(back)
