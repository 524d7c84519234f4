"""Whole ingest jobs (level 0 + pyramid) on object storage and icechunk, on a real cluster.

Real parts only: SeaweedFS on 127.0.0.1 (``s3_server``), the 2-process
``LocalCluster`` (``dask_client``), icechunk repositories on S3 and on local
disk, and the reference reader (zarr-vectors 0.9.2) checking every level.
"""

from __future__ import annotations

import icechunk
import numpy as np
import pytest
import zarr
from distributed import get_task_stream
from helpers import canon

import zv_dask
from zv_dask import StoreError

CHUNK = (50.0, 50.0, 50.0)
BIN = (6.25, 6.25, 6.25)
N = 30_000
JOB = dict(chunk_shape=CHUNK, base_bin_shape=BIN, partition_rows=6000, group_points=2500,
           pyramid={"levels": 3, "links": "explicit"})


@pytest.fixture
def points(rng):
    pts = rng.uniform(0, 100, (N, 3)).astype("f4")
    return pts, {"intensity": rng.integers(0, 65535, N).astype("u2")}


def _reference(store, levels, pts=None, attrs=None):
    """Validate with the reference and read every level; level 0 must equal ``pts``."""
    import zarr_vectors
    from zarr_vectors.core.store import open_store as zv_open_group
    from zarr_vectors.validate import validate

    result = validate(zv_open_group(store), level=5)
    assert result.ok, result.errors
    ds = zarr_vectors.open(store)
    assert ds.levels == tuple(lv["level"] for lv in levels)
    for lv in levels:
        got = ds.level(lv["level"]).read()
        assert len(got.positions) == lv["vertex_count"] > 0, lv
    if pts is not None:
        got = ds.level(0).read()
        np.testing.assert_array_equal(canon(got.positions, got.attributes["intensity"]),
                                      canon(pts, attrs["intensity"]))
    return ds


def _no_secret(secret, *objs):
    for obj in objs:
        assert secret not in str(obj) and secret not in repr(obj), type(obj).__name__


def _graph_text(pending) -> str:
    """The printed task graph of a pending job: every key and every task."""
    dsk = {k: v for obj in pending.dask_objects for k, v in dict(obj.__dask_graph__()).items()}
    return "\n".join(f"{k!s} {k!r}: {v!s} {v!r}" for k, v in dsk.items())


# -- plain S3 through obstore -------------------------------------------------------------------
def test_ingest_with_pyramid_on_s3(s3_server, s3_prefix, s3_options, dask_client, points):
    pts, attrs = points
    url = s3_server.url(s3_prefix, "x.zv")
    secret = s3_options["secret_access_key"]
    pending = zv_dask.prepare_ingest(pts, url, attributes=attrs, storage_options=s3_options, client=dask_client,
                                     **JOB)
    assert secret not in _graph_text(pending)
    with get_task_stream(client=dask_client) as ts:
        rep = pending.run()

    writers = {t["worker"] for t in ts.data if str(t["key"]).startswith("write_group")}
    assert len(writers) == 2, "both worker processes write (the storage options reached each of them)"
    assert rep.points_written == N and rep.snapshot_id is None
    assert [lv["level"] for lv in rep.levels] == list(range(len(rep.levels))) and len(rep.levels) == 4
    assert rep.links == "explicit" and rep.link_counts["0/+1"] == rep.link_counts["1/-1"] == N
    _no_secret(secret, rep, rep.to_dict(), pending)

    store = zarr.storage.ObjectStore(s3_server.obstore(prefix=f"{s3_prefix}/x.zv"), read_only=True)
    _reference(store, rep.levels, pts, attrs)
    # no rename on object storage: an overwrite that would delete these points first is refused, nothing touched
    with pytest.raises(StoreError, match="refusing to overwrite .*another prefix"):
        zv_dask.ingest(pts[:10], url, storage_options=s3_options, overwrite=True, **JOB)
    _reference(store, rep.levels, pts, attrs)
    # every reader opens the URL with the same storage options
    parents = zv_dask.parent_rows(url, 0, storage_options=s3_options)
    assert len(parents) == N and (parents >= 0).all()
    assert len(zv_dask.read_links(url, 1, -1, storage_options=s3_options)["src_vi"]) == N
    assert len(zv_dask.read_points(url, level=1, storage_options=s3_options)) == rep.levels[1]["vertex_count"]


def test_lazy_job_on_s3_keeps_the_keys_out_of_its_graph(s3_server, s3_prefix, s3_options, dask_client, points):
    pts, attrs = points
    url = s3_server.url(s3_prefix, "lazy.zv")
    secret = s3_options["secret_access_key"]
    job = zv_dask.ingest(pts[:3000], url, attributes={k: v[:3000] for k, v in attrs.items()},
                         storage_options=s3_options, compute=False, **JOB)
    text = "\n".join(f"{k!r}: {v!s} {v!r}" for k, v in dict(job.__dask_graph__()).items())
    assert secret not in text and secret not in repr(job)
    rep = dask_client.compute(job).result()  # the job's driver runs on a worker, its tasks on the cluster
    assert rep.points_written == 3000 and rep.scheduler.startswith("tcp://")
    _no_secret(secret, rep, rep.to_dict())
    store = zarr.storage.ObjectStore(s3_server.obstore(prefix=f"{s3_prefix}/lazy.zv"), read_only=True)
    _reference(store, rep.levels, pts[:3000], {k: v[:3000] for k, v in attrs.items()})


# -- icechunk: one commit for ingest + pyramid -------------------------------------------------------
def _history(storage) -> list:
    return list(icechunk.Repository.open(storage).ancestry(branch="main"))


def _tip_store(storage):
    return icechunk.Repository.open(storage).readonly_session(branch="main").store


def test_icechunk_ingest_and_pyramid_is_one_commit(repo_target, dask_client, points):
    url, opts, storage = repo_target
    pts, attrs = points
    pending = zv_dask.prepare_ingest(pts, url, attributes=attrs, backend="icechunk", storage_options=opts,
                                     client=dask_client, message="survey 7: level 0 + pyramid", **JOB)
    assert icechunk.Repository.exists(storage), "the repository is created when missing"
    if opts:
        assert opts["secret_access_key"] not in _graph_text(pending)
    assert _history(storage)[0].message == "Repository initialized"
    rep = pending.run()

    history = _history(storage)
    assert len(history) == 2, "ONE commit for the whole job"
    assert history[0].id == rep.snapshot_id and history[0].message == "survey 7: level 0 + pyramid"
    assert len(rep.levels) == 4 and rep.points_written == N
    _reference(_tip_store(storage), rep.levels, pts, attrs)
    if opts:
        _no_secret(opts["secret_access_key"], rep, rep.to_dict())


def test_icechunk_repository_object_as_the_store(repo_target, dask_client, points):
    url, opts, storage = repo_target
    pts, attrs = points
    repo = icechunk.Repository.create(storage)
    rep = zv_dask.ingest(pts, repo, attributes=attrs, client=dask_client, message="from a Repository", **JOB)
    history = _history(storage)
    assert len(history) == 2 and history[0].id == rep.snapshot_id and history[0].message == "from a Repository"
    _reference(_tip_store(storage), rep.levels, pts, attrs)


# -- another writer commits to the branch while the job runs ---------------------------------------
def _warm(url, opts):
    zs = zv_dask.create_store(url, bounds=([0.0] * 3, [100.0] * 3), chunk_shape=CHUNK, base_bin_shape=BIN,
                              backend="icechunk", storage_options=opts)
    return zv_dask.commit(zs, "warm store")


def test_concurrent_commit_on_other_nodes_is_rebased(repo_target, dask_client, points):
    url, opts, storage = repo_target
    pts, attrs = points
    warm = _warm(url, opts)
    pending = zv_dask.prepare_ingest(pts, url, attributes=attrs, backend="icechunk", storage_options=opts,
                                     client=dask_client, message="our job", **JOB)
    other = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    zv_dask.write_parametric_types(other, [{"name": "radius", "dtype": "float32"}])  # a group the job never touches
    theirs = zv_dask.commit(other, "other writer")

    rep = pending.run()
    history = _history(storage)
    assert [s.id for s in history[:3]] == [rep.snapshot_id, theirs, warm], "rebased on top of the other commit"
    assert history[0].message == "our job"
    tip = zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts)
    assert zv_dask.read_parametric_types(tip) == [{"name": "radius", "dtype": "float32"}]
    _reference(_tip_store(storage), rep.levels, pts, attrs)


def test_concurrent_commit_on_the_same_level_is_a_clear_conflict(repo_target, dask_client, points):
    url, opts, storage = repo_target
    pts, attrs = points
    warm = _warm(url, opts)
    pending = zv_dask.prepare_ingest(pts, url, attributes=attrs, backend="icechunk", storage_options=opts,
                                     client=dask_client, message="our job", **JOB)
    other = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    other.root["0"].attrs.update({"note": "edited by the other writer"})  # level 0's metadata, which the job writes
    theirs = zv_dask.commit(other, "other writer")

    with pytest.raises(StoreError, match=r"conflicts with a concurrent commit.*'main'.*/0\b") as info:
        pending.run()
    assert theirs in str(info.value) and "nothing of this job was committed" in str(info.value)
    assert isinstance(info.value.__cause__, icechunk.ConflictError)  # the branch had moved; both touched /0
    assert "resume" not in str(info.value), "a job that lost a conflict is over"
    history = _history(storage)
    assert [s.id for s in history[:2]] == [theirs, warm], "the branch holds the other writer's commit only"
    tip = zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts)
    assert tip.root["0"].attrs["note"] == "edited by the other writer" and tip.levels == [0]
    assert zv_dask.read_level_metadata(tip, 0).vertex_count == 0
    if opts:
        _no_secret(opts["secret_access_key"], info.value)
