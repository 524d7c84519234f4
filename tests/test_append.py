"""Append: new points into a store that holds points, only the touched chunks and regions rewritten.

The bar is equivalence: ``ingest(A)`` then appends of ``B, C, ...`` give a store
byte-identical, in every file, to ``ingest(A + B + C ...)`` with the same final
bounds, and the reference reader validates it. Failures leave the store as it
was (plain stores roll back from the append's journal; icechunk discards the
session); a killed append (a real SIGKILL) is marked unfinished and is undone
by ``zv-dask rollback`` or redone by ``--append --resume``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from helpers import reference_validate, store_contents, tree_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zv_dask
from zv_dask.errors import InputError, StoreError, UnfinishedJobWarning
from zv_dask.store.journal import JOURNAL_DIR

BIN = Path(sys.executable).parent / "zv-dask"


@pytest.fixture(autouse=True)
def _sync():
    with dask.config.set(scheduler="sync"):
        yield


def _same_tree(a, b) -> None:
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb), (f"only in the appended store: {sorted(set(ta) - set(tb))[:5]}, "
                                      f"only in the one-shot store: {sorted(set(tb) - set(ta))[:5]}")
    diff = [k for k in ta if ta[k] != tb[k]]
    assert not diff, f"{len(diff)} files differ, e.g. {diff[:5]}"


def _batch(rng, n, ndim, lo, hi, attrs, oids, id_range):
    pts = rng.uniform(lo, hi, (n, ndim))
    a = {"intensity": rng.integers(0, 4000, n).astype("uint16"), "rgb": rng.random((n, 3)).astype("float32")} \
        if attrs else None
    o = rng.integers(*id_range, n) if oids else None
    return pts, a, o


def _cat(batches):
    pts = np.concatenate([b[0] for b in batches])
    a = None if batches[0][1] is None else {k: np.concatenate([b[1][k] for b in batches]) for k in batches[0][1]}
    o = None if batches[0][2] is None else np.concatenate([b[2] for b in batches])
    return pts, a, o


def _ingest(batch, store, **kw):
    pts, a, o = batch
    return zv_dask.ingest(pts, store, attributes=a, object_ids=o, **kw)


@settings(max_examples=7, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                               HealthCheck.too_slow])
@given(ndim=st.sampled_from([2, 3]), chunk=st.sampled_from([10.0, 25.0]), bpc=st.sampled_from([1, 5]),
       attrs=st.booleans(), oids=st.booleans(), links=st.sampled_from(["none", "explicit", "implicit"]),
       pyramid=st.sampled_from([None, {"levels": 2}, {}]), sizes=st.lists(st.integers(1, 300), min_size=2, max_size=4),
       local=st.booleans(), seed=st.integers(0, 2**16))
def test_appends_equal_one_ingest_of_all_points(tmp_path_factory, ndim, chunk, bpc, attrs, oids, links, pyramid,
                                                 sizes, local, seed):
    rng = np.random.default_rng(seed)
    d = tmp_path_factory.mktemp("eq")
    (d / "a").mkdir()
    (d / "b").mkdir()
    bounds = ([0.0] * ndim, [60.0] * ndim)
    batches = [_batch(rng, sizes[0], ndim, 0, 60, attrs, oids, (0, 40))]
    for i, n in enumerate(sizes[1:]):  # later batches: one corner (few chunks) or everywhere; new and old ids
        lo, hi = (5.0 * i, 5.0 * i + 18.0) if local else (0.0, 60.0)
        batches.append(_batch(rng, n, ndim, lo, hi, attrs, oids, (20, 70)))
    pyr = None if pyramid is None else {**pyramid, "links": links}
    kw = dict(chunk_shape=chunk, base_bin_shape=chunk / bpc, bounds=bounds, pyramid=pyr)
    a, b = d / "a" / "s.zv", d / "b" / "s.zv"
    _ingest(batches[0], a, **kw)
    for batch in batches[1:]:
        r = _ingest(batch, a, mode="append")
        assert r.mode == "append" and r.points_written == len(batch[0])
    _ingest(_cat(batches), b, **kw)
    _same_tree(a, b)
    report = zv_dask.validate_store(a)
    assert report.ok, report.errors


def test_the_reference_reads_and_validates_an_appended_store(tmp_path, rng):
    """Objects, attributes and explicit links after two appends: zarr-vectors 0.9.2 validates and reads it."""
    from helpers import reference_points

    s = tmp_path / "s.zv"
    kw = dict(chunk_shape=10, base_bin_shape=5, bounds=([0, 0, 0], [20, 20, 20]))
    batches = [_batch(rng, n, 3, 0, 20, True, True, (0, 15)) for n in (600, 150, 90)]
    _ingest(batches[0], s, **kw, pyramid={"levels": 2, "links": "explicit"})
    for batch in batches[1:]:
        _ingest(batch, s, mode="append")
    reference_validate(s)
    pts, a, _ = _cat(batches)
    got = reference_points(s, 0, ["intensity"])
    from helpers import canon

    np.testing.assert_array_equal(canon(got["positions"], got["vertex_attributes"]["intensity"]),
                                  canon(pts.astype("float32"), a["intensity"]))


def test_expand_grows_the_bounds_and_the_grids(tmp_path, rng):
    """Growing past the max side resizes every array; the store equals an ingest fitted to all points."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = (rng.uniform(0, 50, (800, 3)), {"i": rng.integers(0, 9, 800).astype("int32")}, None)
    more = (rng.uniform(30, 90, (300, 3)), {"i": rng.integers(0, 9, 300).astype("int32")}, None)
    kw = dict(chunk_shape=20, base_bin_shape=5, pyramid={"levels": 2, "links": "explicit"})
    a, b = tmp_path / "a" / "s.zv", tmp_path / "b" / "s.zv"
    _ingest(first, a, **kw)
    with pytest.raises(zv_dask.OutOfBoundsError):  # the default policy refuses, and writes nothing
        before = tree_bytes(a)
        _ingest(more, a, mode="append")
    assert tree_bytes(a) == before
    r = _ingest(more, a, mode="append", out_of_bounds="expand")
    assert r.bounds[1][0] > 85
    _ingest(_cat([first, more]), b, **kw)
    _same_tree(a, b)
    assert zv_dask.validate_store(a).ok
    # below the grid's origin: every cell would move; refused with what it costs, nothing written
    before = tree_bytes(a)
    below = (rng.uniform(-30, 10, (50, 3)), {"i": np.zeros(50, "int32")}, None)
    with pytest.raises(StoreError, match=r"below the store's chunk grid.*chunk origin \[0, 0, 0\] -> \[-2, -2, -2\]"):
        _ingest(below, a, mode="append", out_of_bounds="expand")
    assert tree_bytes(a) == before


def test_ignore_drops_what_is_outside(tmp_path, rng):
    s = tmp_path / "s.zv"
    zv_dask.ingest(rng.uniform(0, 10, (500, 2)), s, chunk_shape=5, bounds=([0, 0], [10, 10]))
    r = zv_dask.ingest(rng.uniform(5, 15, (400, 2)), s, mode="append", out_of_bounds="ignore")
    assert r.points_dropped > 0 and r.points_written == 400 - r.points_dropped
    assert zv_dask.open_store(s).metadata.bounds == ((0.0, 0.0), (10.0, 10.0))
    assert len(zv_dask.read_points(s)) == 500 + r.points_written


@pytest.fixture
def full_store(tmp_path, rng):
    s = tmp_path / "s.zv"
    pts = rng.uniform(0, 40, (3000, 3))
    zv_dask.ingest(pts, s, attributes={"i": rng.integers(0, 9, 3000).astype("uint8")},
                   object_ids=rng.integers(0, 30, 3000), chunk_shape=10, base_bin_shape=5, bounds=([0] * 3, [40] * 3),
                   pyramid={"levels": 2, "links": "explicit"})
    return s


@pytest.mark.parametrize("case, error, match", [
    ("missing attribute", InputError, r"lack the store's attributes \['i'\]"),
    ("extra attribute", InputError, r"attributes \['j'\] that the store does not"),
    ("attribute dtype", InputError, r"'i' is int16 here but uint8 in the store"),
    ("no object ids", InputError, r"carry object ids and the new points do not"),
    ("ndim", InputError, r"2 coordinates but the store .* has 3 axes"),
    ("outside", zv_dask.OutOfBoundsError, r"outside"),
    ("dtype", InputError, r"dtype float64 differs from the store's position dtype float32"),
    ("chunk shape", InputError, r"chunk_shape \[20.0\] differs from the store's"),
    ("bounds", InputError, r"keeps the store's bounds"),
    ("overwrite", InputError, r"append and overwrite contradict"),
])
def test_bad_appends_name_the_problem_and_change_nothing(full_store, rng, case, error, match):
    n = 100
    pts = rng.uniform(0, 40, (n, 3))
    kw = dict(attributes={"i": np.ones(n, "uint8")}, object_ids=np.arange(n))
    if case == "missing attribute":
        kw["attributes"] = None
    elif case == "extra attribute":
        kw["attributes"] = {"i": np.ones(n, "uint8"), "j": np.ones(n)}
    elif case == "attribute dtype":
        kw["attributes"] = {"i": np.ones(n, "int16")}
    elif case == "no object ids":
        kw["object_ids"] = None
    elif case == "ndim":
        pts = pts[:, :2]
    elif case == "outside":
        pts[7] = [50, 1, 1]
    elif case == "dtype":
        kw["dtype"] = "float64"
    elif case == "chunk shape":
        kw["chunk_shape"] = 20
    elif case == "bounds":
        kw["bounds"] = ([0, 0, 0], [40, 40, 40])
    elif case == "overwrite":
        kw["overwrite"] = True
    before = tree_bytes(full_store)
    with pytest.raises(error, match=match):
        zv_dask.ingest(pts, full_store, mode="append", **kw)
    assert tree_bytes(full_store) == before


def test_append_needs_a_zv_store(tmp_path, rng):
    pts = rng.uniform(0, 1, (10, 3))
    with pytest.raises(StoreError, match="no ZV store there"):
        zv_dask.ingest(pts, tmp_path / "nothing.zv", mode="append")
    assert not (tmp_path / "nothing.zv").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a store")
    with pytest.raises(StoreError, match="not a ZV store"):
        zv_dask.ingest(pts, other, mode="append")
    assert tree_bytes(other) == {"notes.txt": b"not a store"}
    with pytest.raises(InputError, match="mode='merge' is not one of"):
        zv_dask.ingest(pts, other, mode="merge")
    # an object-id store must not take plain points, nor the other way round
    plain = tmp_path / "plain.zv"
    zv_dask.ingest(pts, plain, chunk_shape=0.5)
    before = tree_bytes(plain)
    with pytest.raises(InputError, match="carry object ids and the store's points do not"):
        zv_dask.ingest(pts, plain, mode="append", object_ids=np.arange(10))
    assert tree_bytes(plain) == before


@pytest.mark.parametrize("point", ["group:1", "level:1", "level:2"])
def test_a_failed_append_is_rolled_back(full_store, rng, monkeypatch, point):
    """A task fails in the level-0 write or in a pyramid level: the store is byte for byte what it was."""
    before = tree_bytes(full_store)
    monkeypatch.setenv("ZV_DASK_FAIL_AT", point)
    with pytest.raises(zv_dask.IngestError, match="injected failure"):
        zv_dask.ingest(rng.uniform(0, 40, (2000, 3)), full_store, mode="append", group_points=300,
                       attributes={"i": np.ones(2000, "uint8")}, object_ids=rng.integers(20, 60, 2000))
    assert tree_bytes(full_store) == before
    assert not (full_store / JOURNAL_DIR).exists()


def _killed(point: str, *args) -> int:
    e = {**os.environ, "PYTHONWARNINGS": "ignore", "ZV_DASK_KILL_AT": point}
    proc = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, env=e, timeout=300)
    return proc.returncode


def _cli(*args):
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_a_killed_append_is_marked_and_undone_or_redone(tmp_path, rng):
    """SIGKILL mid-append (after a level-0 group, and inside the pyramid): info and validate say so,
    ``rollback`` restores the store exactly, ``--append --resume`` ends as an ingest of everything."""
    def parquet(name, pts, i):
        p = tmp_path / name
        pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], "i": i}).to_parquet(p)
        return p

    a_pts, b_pts = rng.uniform(0, 100, (6000, 3)), rng.uniform(0, 100, (3000, 3))
    a_i, b_i = rng.integers(0, 99, 6000).astype("int32"), rng.integers(0, 99, 3000).astype("int32")
    a, b = parquet("a.parquet", a_pts, a_i), parquet("b.parquet", b_pts, b_i)
    both = parquet("both.parquet", np.concatenate([a_pts, b_pts]), np.concatenate([a_i, b_i]))
    geo = ["--chunk-shape", "20", "--bin-shape", "5", "--bounds", "0,0,0,100,100,100", "--levels", "2",
           "--links", "explicit", "--scheduler", "synchronous", "--quiet"]
    store, whole = tmp_path / "s.zv", tmp_path / "whole" / "s.zv"
    assert _cli("ingest", a, store, *geo).returncode == 0
    assert _cli("ingest", both, whole, *geo).returncode == 0
    before = tree_bytes(store)
    job = ["ingest", b, store, "--append", "--group-points", "500", "--scheduler", "synchronous", "--quiet"]
    assert _killed("append:2", *job) == -signal.SIGKILL
    assert (store / JOURNAL_DIR / "job.json").exists()
    info = _cli("info", store)
    assert "UNFINISHED" in info.stdout and "unfinished append job" in info.stdout and "rollback" in info.stdout
    assert any("unfinished" in e for e in zv_dask.validate_store(store).errors)
    with pytest.warns(UnfinishedJobWarning):
        zv_dask.open_store(store)
    with pytest.raises(StoreError, match="unfinished append job"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnfinishedJobWarning)
        zv_dask.ingest(b_pts, store, attributes={"i": b_i}, mode="append")
    done = _cli("rollback", store)
    assert done.returncode == 0 and "rolled back" in done.stdout
    assert tree_bytes(store) == before
    # killed again, in the pyramid this time; the resume undoes it and appends again
    assert _killed("pyramid:1", *job) == -signal.SIGKILL
    assert tree_bytes(store) != before
    r = _cli(*job, "--resume")
    assert r.returncode == 0, r.stderr
    assert "(append)" in r.stdout and "rewritten" in r.stdout
    _same_tree(store, whole)
    assert _cli("rollback", store).stdout.strip().endswith("no unfinished append to roll back")


def test_dry_run_predicts_the_rewrites(full_store, rng):
    pts = rng.uniform(0, 8, (200, 3))  # one corner: 1 level-0 chunk
    plan = zv_dask.plan_ingest(pts, full_store, mode="append", attributes={"i": np.ones(200, "uint8")},
                               object_ids=np.arange(200))
    assert plan.store_action == "append"
    assert plan.rewrites[0] == {"level": 0, "chunks": 1, "existing": 1, "regions": 0}
    assert [r["level"] for r in plan.rewrites] == [0, 1, 2]
    assert all(r["regions"] >= 1 for r in plan.rewrites[1:])
    assert "append      level 0: 1 chunks touched" in repr(plan)
    r = zv_dask.ingest(pts, full_store, mode="append", attributes={"i": np.ones(200, "uint8")},
                       object_ids=np.arange(200))
    got = {lv["level"]: lv for lv in r.levels}
    assert got[0]["rewritten"] == 1
    for p in plan.rewrites[1:]:
        assert got[p["level"]]["regions"] == p["regions"]


def test_append_on_icechunk_is_one_commit(repo_target, rng, monkeypatch, tmp_path):
    import icechunk

    url, opts, storage = repo_target
    kw = dict(chunk_shape=10, base_bin_shape=5, bounds=([0, 0, 0], [30, 30, 30]),
              pyramid={"levels": 2, "links": "explicit"}, backend="icechunk", storage_options=opts)
    first, more = rng.uniform(0, 30, (1500, 3)), rng.uniform(0, 12, (500, 3))
    zv_dask.ingest(first, url, **kw)
    repo = icechunk.Repository.open(storage)
    tip = repo.lookup_branch("main")
    n = len(list(repo.ancestry(branch="main")))
    monkeypatch.setenv("ZV_DASK_FAIL_AT", "level:2")
    with pytest.raises(zv_dask.IngestError):
        zv_dask.ingest(more, url, mode="append", backend="icechunk", storage_options=opts)
    assert repo.lookup_branch("main") == tip
    monkeypatch.delenv("ZV_DASK_FAIL_AT")
    r = zv_dask.ingest(more, url, mode="append", backend="icechunk", storage_options=opts, message="tile 2")
    assert len(list(repo.ancestry(branch="main"))) == n + 1
    assert r.snapshot_id == repo.lookup_branch("main")
    one = tmp_path / "one" / ("repo" if opts is None else "x")
    zv_dask.ingest(np.concatenate([first, more]), str(one), **{**kw, "storage_options": None})
    got = store_contents(repo.readonly_session("main").store)
    want = store_contents(icechunk.Repository.open(icechunk.local_filesystem_storage(str(one)))
                          .readonly_session("main").store)
    assert sorted(got) == sorted(want)
    if opts is not None:  # the store's name (the last part of its URL) is in the root's "ome" block
        import json

        for d in (got, want):
            doc = json.loads(d["zarr.json"])
            doc["attributes"]["ome"].pop("name")
            d["zarr.json"] = doc
    assert [k for k in got if got[k] != want[k]] == []


def test_append_on_object_storage_with_a_cluster(dask_client, s3_server, s3_prefix, s3_options, rng, tmp_path):
    """Plain store on S3, written by worker processes; equals a one-shot local ingest file for file."""
    url = s3_server.url(s3_prefix, "s.zv")
    kw = dict(chunk_shape=10, base_bin_shape=5, bounds=([0, 0, 0], [30, 30, 30]),
              pyramid={"levels": 2, "links": "explicit"})
    first, more = rng.uniform(0, 30, (3000, 3)), rng.uniform(10, 25, (800, 3))
    zv_dask.ingest(first, url, storage_options=s3_options, client=dask_client, **kw)
    zv_dask.ingest(more, url, storage_options=s3_options, client=dask_client, mode="append", group_points=200)
    one = tmp_path / "s.zv"
    zv_dask.ingest(np.concatenate([first, more]), one, **kw)
    got = store_contents(zv_dask.open_store(url, storage_options=s3_options).store)
    want = tree_bytes(one)
    # the readers open a URL with the same storage options
    assert len(zv_dask.read_points(url, storage_options=s3_options, level=1)) == \
        zv_dask.store_info(url, storage_options=s3_options)["levels"][1]["vertex_count"]
    assert len(zv_dask.open_level(url, 0, storage_options=s3_options)["points"]) == 3800
    assert sorted(got) == sorted(want)
    assert [k for k in got if got[k] != want[k]] == []


def test_a_staged_append_is_the_same(tmp_path, rng):
    """A memory budget too small for the in-memory shuffle stages the new points on scratch; same store."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, more = rng.uniform(0, 100, (60_000, 3)), rng.uniform(0, 50, (40_000, 3))
    kw = dict(chunk_shape=25, base_bin_shape=5, bounds=([0] * 3, [100] * 3), pyramid={"levels": 2})
    a, b = tmp_path / "a" / "s.zv", tmp_path / "b" / "s.zv"
    zv_dask.ingest(first, a, **kw)
    r = zv_dask.ingest(more, a, mode="append", memory_budget="6MiB", partition_rows=10_000)
    assert r.shuffle == "staged" and r.bytes_staged > 0
    zv_dask.ingest(np.concatenate([first, more]), b, **kw)
    _same_tree(a, b)
