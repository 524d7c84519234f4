"""The memory budget and the staged (out-of-core) shuffle.

A job whose shuffle pieces would not fit in its budget stages them on scratch
storage; it must write exactly the bytes the in-memory shuffle writes, leave no
scratch behind, refuse a budget too small for one chunk before writing
anything, and fail clearly (leaving the target as it was) when scratch runs out.
Real parts: worker processes (``dask_client``, and a scheduler plus workers
started in their own directories), the loopback S3 server, icechunk, a small
tmpfs for a full disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from helpers import (
    canon,
    reference_points,
    reference_validate,
    store_contents,
    tree_bytes,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import zv_dask
from zv_dask.budget import MemoryBudget, parse_size, plan_shuffle, resolve_budget
from zv_dask.errors import InputError, StoreError
from zv_dask.format.grid import Grid
from zv_dask.ingest.batch import Batch
from zv_dask.ingest.shuffle import merge_pieces, sort_by_group, split_partition
from zv_dask.ingest.staging import SCRATCH_DIR, PieceLayout

JOB = dict(chunk_shape=(250.0,) * 3, base_bin_shape=(25.0,) * 3, bounds=([0, 0, 0], [1000, 1000, 1000]),
           partition_rows=5000, pyramid={"levels": 3, "links": "explicit"})
TINY = "1.5MiB"  # room for a task, not for the pieces of these clouds as well: the shuffle stages them


def _cloud(rng, n=60_000, ids=False):
    pts = rng.uniform(0, 1000, (n, 3)).astype("f4")
    attrs = {"intensity": rng.integers(0, 65535, n).astype("u2"), "rgb": rng.integers(0, 255, (n, 3)).astype("u1"),
             "t": rng.random(n)}
    oids = rng.integers(-5, 400, n) if ids else None
    return pts, attrs, oids


def _twin(tmp_path, name="s.zv"):
    """Two store paths with the same name (the root metadata records it)."""
    (tmp_path / "memory").mkdir(exist_ok=True)
    (tmp_path / "staged").mkdir(exist_ok=True)
    return tmp_path / "memory" / name, tmp_path / "staged" / name


# -- the budget ----------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500 MB") == 500 * 10**6
    assert parse_size("1.5gib") == int(1.5 * 2**30)
    assert parse_size(123456) == 123456
    for bad in ("lots", "-1GiB", "0", True, [1], "2 parsecs"):
        with pytest.raises(InputError, match="memory_budget"):
            parse_size(bad)


def test_budget_defaults_to_half_the_worker_memory_limit(dask_client):
    b = resolve_budget(None, dask_client)
    assert b.per_worker == 3 * 2**30 // 2 and b.workers == 2 and b.threads_per_worker == 1
    assert "memory limit" in b.origin
    asked = resolve_budget("700MiB", dask_client)
    assert asked.per_worker == 700 * 2**20 and asked.origin == "as asked"
    assert resolve_budget(None, None).workers == 1


def test_shuffle_mode_follows_the_budget():
    small = MemoryBudget(1 << 30, 2, 1, "as asked")
    big = MemoryBudget(8 << 30, 2, 1, "as asked")
    kw = dict(largest_partition=2_000_000, largest_group=2_000_000, in_row=20, piece_row=26, stored_row=20)
    assert plan_shuffle(big, n_points=100_000_000, **kw).mode == "memory"
    staged = plan_shuffle(small, n_points=100_000_000, **kw)
    assert staged.mode == "staged" and staged.staged_bytes == 2_600_000_000
    assert staged.peak_per_worker < staged.in_memory_per_worker
    # the staged peak does not depend on N: only the tasks and the worker itself
    assert plan_shuffle(small, n_points=10**10, **kw).peak_per_worker == staged.peak_per_worker


# -- pieces round trip ---------------------------------------------------------------------------
@st.composite
def _batches(draw):
    n = draw(st.integers(0, 300))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    attrs = {}
    for i in range(draw(st.integers(0, 3))):
        dt = draw(st.sampled_from(["u1", "i2", "u2", "i4", "f4", "f8", "?"]))
        ch = draw(st.sampled_from([None, 1, 3]))
        shape = (n,) if ch is None else (n, ch)
        attrs[f"a{i}"] = (rng.random(shape) * 100).astype(dt)
    ids = rng.integers(-2**40, 2**40, n) if draw(st.booleans()) else None
    starts = np.unique(np.r_[0, rng.integers(0, 64, draw(st.integers(0, 6)))])
    return Batch(rng.uniform(-50, 50, (n, 2)), attrs, ids), starts


@settings(max_examples=60, deadline=None)
@given(_batches())
def test_staged_pieces_are_the_memory_pieces(data):
    batch, starts = data
    grid = Grid((-50.0, -50.0), (50.0, 50.0), (12.5, 12.5), (2.5, 2.5), "float32")
    layout = PieceLayout.of(grid, {k: (v.dtype.name, v.shape[1] if v.ndim == 2 else None)
                                   for k, v in batch.attributes.items()}, batch.object_ids is not None)
    pieces = split_partition(batch, grid, starts, False)
    sorted_ = sort_by_group(batch, grid, starts, False)
    if sorted_ is None:
        assert all(p is None for p in pieces)
        return
    buf, offsets = layout.encode(*sorted_)
    assert offsets[-1] == len(buf) and (np.diff(offsets) % 8 == 0).all()
    rows = np.diff(sorted_[2])
    for g, piece in enumerate(pieces):
        # two halves of the same piece decode to their concatenation, as a write task reads them
        one = bytes(buf[offsets[g]:offsets[g + 1]])
        got = layout.decode([one, one], [rows[g], rows[g]])
        want = merge_pieces([piece, piece])
        if want is None:
            assert got is None
            continue
        np.testing.assert_array_equal(got.positions, want.positions)
        np.testing.assert_array_equal(got.cells, want.cells)
        np.testing.assert_array_equal(got.fragments, want.fragments)
        assert got.cells.dtype == want.cells.dtype and got.fragments.dtype == want.fragments.dtype
        for k, v in want.attributes.items():
            assert got.attributes[k].dtype == v.dtype and got.attributes[k].shape == v.shape
            np.testing.assert_array_equal(got.attributes[k], v)
        if want.object_ids is not None:
            np.testing.assert_array_equal(got.object_ids, want.object_ids)


# -- whole jobs: the same bytes --------------------------------------------------------------------
@pytest.mark.parametrize("ids", [False, True])
def test_staged_job_writes_the_same_bytes(tmp_path, rng, dask_client, ids):
    pts, attrs, oids = _cloud(rng, ids=ids)
    mem, stg = _twin(tmp_path)
    a = zv_dask.ingest(pts, mem, attributes=attrs, object_ids=oids, client=dask_client, **JOB)
    b = zv_dask.ingest(pts, stg, attributes=attrs, object_ids=oids, client=dask_client, memory_budget=TINY, **JOB)
    assert a.shuffle == "memory" and a.bytes_staged == 0 and a.scratch is None
    assert b.shuffle == "staged" and b.bytes_staged >= len(pts) * 12 and b.scratch == str(stg / SCRATCH_DIR)
    assert b.memory_budget == parse_size(TINY) and b.partitions == a.partitions
    assert b.groups > a.groups, "the small budget makes smaller write groups"
    assert not (stg / SCRATCH_DIR).exists(), "the scratch space goes when the job ends"
    assert tree_bytes(mem) == tree_bytes(stg)
    assert [lv["vertex_count"] for lv in a.levels] == [lv["vertex_count"] for lv in b.levels]
    assert reference_validate(stg) == []
    got = reference_points(stg, 0, ["intensity"])
    np.testing.assert_array_equal(canon(got["positions"], got["vertex_attributes"]["intensity"]),
                                  canon(pts, attrs["intensity"]))


def test_staged_parquet_on_the_local_scheduler(tmp_path, rng):
    """Parquet files, no distributed client (threads in this process), scratch given as a relative path."""
    pts, attrs, _ = _cloud(rng, 40_000)
    src = tmp_path / "pq"
    src.mkdir()
    for i in range(4):
        sl = slice(i * 10_000, (i + 1) * 10_000)
        pd.DataFrame({"x": pts[sl, 0], "y": pts[sl, 1], "z": pts[sl, 2], "t": attrs["t"][sl]}).to_parquet(
            src / f"part-{i}.parquet")
    mem, stg = _twin(tmp_path)
    job = {k: v for k, v in JOB.items() if k != "partition_rows"}
    a = zv_dask.ingest(str(src / "*.parquet"), mem, **job)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        b = zv_dask.ingest(str(src / "*.parquet"), stg, memory_budget=TINY, scratch="my-scratch", **job)
    finally:
        os.chdir(cwd)
    assert a.shuffle == "memory" and b.shuffle == "staged" and b.scratch == str(tmp_path / "my-scratch")
    assert list((tmp_path / "my-scratch").iterdir()) == [], "the job's own prefix is gone, the user's directory stays"
    assert tree_bytes(mem) == tree_bytes(stg)


def test_staged_icechunk_job_is_one_commit(tmp_path, rng, dask_client):
    import icechunk

    pts, attrs, _ = _cloud(rng, 30_000)
    mem, stg = _twin(tmp_path, "repo")
    zv_dask.ingest(pts, str(mem), attributes=attrs, backend="icechunk", client=dask_client, **JOB)
    rep = zv_dask.ingest(pts, str(stg), attributes=attrs, backend="icechunk", client=dask_client,
                         memory_budget=TINY, **JOB)
    assert rep.shuffle == "staged" and rep.scratch == str(stg) + SCRATCH_DIR
    assert not os.path.exists(rep.scratch)
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(stg)))
    assert len(list(repo.ancestry(branch="main"))) == 2, "the initial snapshot and the job's one commit"

    def contents(path):
        r = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
        return store_contents(r.readonly_session(branch="main").store)

    assert contents(mem) == contents(stg)


def test_pyramid_tasks_follow_the_budget(tmp_path, rng, dask_client):
    pts, attrs, _ = _cloud(rng, 60_000)
    mem, stg = _twin(tmp_path)
    job = dict(JOB, pyramid=None)
    for p in (mem, stg):
        zv_dask.ingest(pts, p, attributes=attrs, client=dask_client, **job)
    big = zv_dask.build_pyramid(mem, levels=3, links="explicit", client=dask_client)
    small = zv_dask.build_pyramid(stg, levels=3, links="explicit", client=dask_client, memory_budget="1MiB")
    assert sum(small.tasks.values()) > sum(big.tasks.values())
    assert tree_bytes(mem) == tree_bytes(stg)


# -- refusals and faults -------------------------------------------------------------------------
def test_budget_too_small_for_one_chunk_is_refused_before_writing(tmp_path, rng):
    pts, attrs, _ = _cloud(rng, 50_000)
    target = tmp_path / "x.zv"
    with pytest.raises(InputError, match=r"too small: chunk \d+\.\d+\.\d+ holds .* smallest budget that works is"):
        zv_dask.ingest(pts, target, attributes=attrs, chunk_shape=1000.0, memory_budget="1MiB")  # one chunk
    assert not target.exists()
    with pytest.raises(InputError, match=r"too small: shard holds .* smallest budget .* or shard shape"):
        zv_dask.ingest(pts, target, attributes=attrs, chunk_shape=250.0, shard_shape=(4, 4, 4),
                       memory_budget="1MiB")  # one shard of 64 chunks holds everything
    assert not target.exists()
    empty = tmp_path / "empty.zv"
    zv_dask.create_store(empty, bounds=([0] * 3, [1000] * 3), chunk_shape=(1000.0,) * 3)
    before = tree_bytes(empty)
    with pytest.raises(InputError, match="smallest budget"):
        zv_dask.ingest(pts, empty, attributes=attrs, memory_budget="1MiB")
    assert tree_bytes(empty) == before


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 6 MiB tmpfs (needs root to mount; skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_scratch_too_small_is_refused_before_writing(tmp_path, rng, small_tmpfs):
    pts, attrs, _ = _cloud(rng, 400_000)
    target = tmp_path / "x.zv"
    with pytest.raises(StoreError, match=r"needs ~.* of scratch space at .* only .* is free"):
        zv_dask.ingest(pts, target, attributes=attrs, memory_budget="3MiB", scratch=small_tmpfs, **JOB)
    assert not target.exists() and list(small_tmpfs.iterdir()) == []


def test_scratch_filling_up_mid_job_leaves_the_target_as_it_was(tmp_path, rng, small_tmpfs, dask_client):
    pts, attrs, _ = _cloud(rng, 60_000)
    target = tmp_path / "x.zv"
    zv_dask.create_store(target, bounds=JOB["bounds"], chunk_shape=JOB["chunk_shape"],
                         base_bin_shape=JOB["base_bin_shape"])
    before = tree_bytes(target)
    pending = zv_dask.prepare_ingest(pts, target, attributes=attrs, memory_budget=TINY, scratch=small_tmpfs,
                                     client=dask_client, **JOB)
    # another program takes the space between the plan and the job
    with open(small_tmpfs / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * (6 << 20))
        except OSError:
            pass
    with pytest.raises(StoreError, match="scratch space at .* ran out"):
        pending.run()
    assert tree_bytes(target) == before
    assert [p.name for p in small_tmpfs.iterdir()] == ["filler"]


# -- plan, CLI -----------------------------------------------------------------------------------
def test_dry_run_shows_the_budget_and_the_staging(tmp_path, rng):
    pts, _, _ = _cloud(rng)
    np.save(tmp_path / "p.npy", pts)  # read by the tasks: nothing of the input is shipped from here
    plan = zv_dask.plan_ingest(str(tmp_path / "p.npy"), tmp_path / "x.zv", memory_budget=TINY, **JOB)
    assert plan.shuffle == "staged" and plan.memory_budget == parse_size(TINY)
    assert plan.estimated_scratch_bytes >= len(pts) * 12 and plan.scratch == str(tmp_path / "x.zv" / SCRATCH_DIR)
    assert 0 < plan.estimated_peak_worker_memory <= plan.memory_budget
    text = repr(plan)
    assert "budget" in text and "staged on" in text
    assert not (tmp_path / "x.zv").exists()
    free = zv_dask.plan_ingest(str(tmp_path / "p.npy"), tmp_path / "x.zv", **JOB)
    assert free.shuffle == "memory" and free.estimated_scratch_bytes == 0


def test_cli_memory_budget(tmp_path, rng):
    pts, _, _ = _cloud(rng, 40_000)
    src = tmp_path / "p.parquet"
    pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2]}).to_parquet(src)
    base = [sys.executable, "-m", "zv_dask", "ingest", str(src), str(tmp_path / "c.zv"), "--chunk-shape", "250",
            "--bin-shape", "25", "--levels", "2", "--scheduler", "synchronous", "--json", "--quiet"]
    plan = json.loads(subprocess.run(base + ["--dry-run", "--memory-budget", "1.5MiB", "--partition-rows", "5000"],
                                     capture_output=True, text=True, check=True).stdout)
    assert plan["shuffle"] == "staged" and plan["memory_budget"] == int(1.5 * 2**20)
    rep = json.loads(subprocess.run(base + ["--memory-budget", "1.5MiB", "--partition-rows", "5000"],
                                    capture_output=True, text=True, check=True).stdout)
    assert rep["shuffle"] == "staged" and rep["bytes_staged"] > 0 and rep["points_written"] == len(pts)
    bad = subprocess.run(base + ["--memory-budget", "lots"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--memory-budget" in bad.stderr and "lots" in bad.stderr


# -- a cluster whose workers share nothing but the object store ----------------------------------
@pytest.fixture
def separate_cluster(tmp_path):
    """A ``dask scheduler`` and two ``dask worker`` processes, each started in a directory of its own."""
    from distributed import Client

    dirs = [tmp_path / d for d in ("scheduler", "w1", "w2")]
    for d in dirs:
        d.mkdir()
    sf = str(dirs[0] / "scheduler.json")
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--no-dashboard", "--scheduler-file", sf], cwd=dirs[0],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not os.path.exists(sf) and time.monotonic() < deadline:
        time.sleep(0.2)
    for d in dirs[1:]:
        procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", sf,
                                       "--nthreads", "1", "--memory-limit", "2GiB", "--no-dashboard",
                                       "--local-directory", str(d)], cwd=d,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        with Client(scheduler_file=sf, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            yield client
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.mark.s3
def test_staged_on_object_storage_with_workers_in_their_own_directories(s3_server, s3_prefix, s3_options, rng,
                                                                       separate_cluster):
    pts, attrs, _ = _cloud(rng, 40_000)
    urls = [s3_server.url(s3_prefix, d, "s.zv") for d in ("memory", "staged")]
    a = zv_dask.ingest(pts, urls[0], attributes=attrs, storage_options=s3_options, client=separate_cluster, **JOB)
    b = zv_dask.ingest(pts, urls[1], attributes=attrs, storage_options=s3_options, client=separate_cluster,
                       memory_budget=TINY, **JOB)
    assert a.shuffle == "memory" and b.shuffle == "staged" and b.scratch == f"{urls[1]}/{SCRATCH_DIR}"
    workers = separate_cluster.run(os.getcwd)
    assert len(set(workers.values())) == 2, "each worker runs in a directory of its own"

    def objects(url):
        import obstore

        st = s3_server.obstore(url[len(f"s3://{s3_server.bucket}/"):])
        keys = sorted(m["path"] for batch in obstore.list(st) for m in batch)
        return {k: bytes(obstore.get(st, k).bytes()) for k in keys}

    mem, stg = objects(urls[0]), objects(urls[1])
    assert not any(k.startswith(SCRATCH_DIR) for k in stg), "no staged piece is left on the object store"
    assert mem == stg
