"""Atomicity under real faults: a write that raises mid-job, a worker process killed mid-job, the S3
server going down and coming back mid-write, and a pyramid failing at level 2.

After every failure: an icechunk branch is exactly as it was (same snapshot, same bytes); a plain
store that existed keeps its metadata byte for byte; a plain store the job created is removed (or
reads as empty when the storage was down during the clean-up). The error is an ``IngestError``
naming the stage (and the chunk, when one is known), with the cause kept.

The faults come from :mod:`faults`: a real zarr store wrapper, a dask array whose block fails on its
second load, a worker that SIGKILLs itself, and the real server process being killed. No mocks.
"""

from __future__ import annotations

import re
import time

import dask
import icechunk
import numpy as np
import pytest
from faults import FaultyStore, bounce_during, faulty_cloud
from helpers import canon, reference_points, reference_validate, store_contents, tree_bytes
from zarr.storage import LocalStore, ObjectStore

import zv_dask
from zv_dask import IngestError

BOUNDS = ([0.0] * 3, [100.0] * 3)
CHUNK = (25.0, 25.0, 25.0)
BIN = (6.25, 6.25, 6.25)
N, ROWS = 20_000, 5000
JOB = dict(partition_rows=ROWS, group_points=1500)
CHUNK_KEY = re.compile(r"^-?\d+(\.-?\d+){2}$")


# -- helpers ----------------------------------------------------------------------------------
def _metadata(root) -> dict[str, bytes]:
    return {k: v for k, v in tree_bytes(root).items() if k.endswith("zarr.json")}


def _warm_local(path):
    zv_dask.create_store(path, bounds=BOUNDS, chunk_shape=CHUNK, base_bin_shape=BIN)
    return _metadata(path)


def _assert_stage_error(err, stage, *, chunk=True, secret=None):
    assert isinstance(err, IngestError), type(err)
    named = stage in str(err) or (stage == "write" and "writing group" in str(err))
    assert err.stage == stage and named, (err.stage, str(err))
    if chunk:
        assert err.chunk and CHUNK_KEY.match(err.chunk) and err.chunk in str(err), (err.chunk, str(err))
    assert err.__cause__ is not None, "the cause is kept"
    if secret is not None:
        e = err
        while e is not None:
            assert secret not in str(e) and secret not in repr(e)
            e = e.__cause__


def _repo_contents(storage) -> tuple[str, int, dict]:
    """(tip snapshot, history length, every key -> bytes) of ``main`` as a reader sees it."""
    repo = icechunk.Repository.open(storage)
    store = repo.readonly_session(branch="main").store
    return repo.lookup_branch("main"), len(list(repo.ancestry(branch="main"))), store_contents(store)


@pytest.fixture(params=["local", "s3"])
def repo_with_points(request, tmp_path, rng):
    """(url, storage_options, Storage) of a repository whose ``main`` holds a committed store with points."""
    if request.param == "local":
        url, opts = str(tmp_path / "repo"), None
        storage = icechunk.local_filesystem_storage(url)
    else:
        srv, prefix = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_prefix")
        url, opts, storage = srv.url(prefix, "repo"), srv.storage_options(), srv.icechunk_storage(f"{prefix}/repo")
    return _repo_with_points(url, opts, storage, rng)


def _repo_with_points(url, opts, storage, rng):
    from zv_dask.local import write_points

    write_points(url, rng.uniform(0, 100, (3000, 3)).astype("f4"), chunk_shape=CHUNK, base_bin_shape=BIN,
                 bounds=BOUNDS, backend="icechunk", storage_options=opts)
    return url, opts, storage


@pytest.fixture(scope="module")
def fragile_client(tmp_path_factory):
    """A cluster of its own (2 worker processes) that gives up on a task at the first worker death."""
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0",
                         scheduler_kwargs={"dashboard": False},
                         host="127.0.0.1", memory_limit="2GiB",
                         local_directory=str(tmp_path_factory.mktemp("fragile"))) as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


# -- (a) a task raises in the middle of its chunk writes -------------------------------------------
def test_write_failure_keeps_an_existing_plain_store(tmp_path, dask_client, rng):
    path = tmp_path / "warm.zv"
    before = _warm_local(path)
    pts = rng.uniform(0, 100, (N, 3)).astype("f4")
    attrs = {"intensity": rng.integers(0, 65535, N).astype("u2")}  # adds root attribute specs and arrays

    with pytest.raises(IngestError) as info:
        zv_dask.ingest(pts, FaultyStore(LocalStore(path), after=3), attributes=attrs, client=dask_client,
                       pyramid=True, **JOB)
    _assert_stage_error(info.value, "write")
    assert "injected fault" in str(info.value.__cause__)
    assert any("/c/" in k for k in tree_bytes(path)), "the fault hit after some cells had landed"
    assert _metadata(path) == before, "every zarr.json as it was, and none added"
    assert reference_validate(path) == ["resolution_0: no chunk data"]  # as for the store before the job
    assert len(reference_points(path)["positions"]) == 0

    # the store is still a good target: the same job without the fault fills it
    rep = zv_dask.ingest(pts, path, attributes=attrs, client=dask_client, **JOB)
    assert rep.points_written == N
    got = reference_points(path, attribute_names=["intensity"])
    np.testing.assert_array_equal(canon(got["positions"], got["vertex_attributes"]["intensity"]),
                                  canon(pts, attrs["intensity"]))


def test_write_failure_removes_a_store_the_job_created_on_s3(s3_server, s3_prefix, dask_client, rng):
    import obstore

    raw = s3_server.obstore(prefix=f"{s3_prefix}/new.zv")
    store = FaultyStore(ObjectStore(raw, read_only=False), after=2)
    with pytest.raises(IngestError) as info:
        zv_dask.ingest(rng.uniform(0, 100, (N, 3)), store, chunk_shape=CHUNK, client=dask_client, **JOB)
    _assert_stage_error(info.value, "write", secret=s3_server.secret_key)
    time.sleep(0.3)  # a task still running would land its cells now; none may be left
    assert obstore.list(s3_server.obstore(), prefix=f"{s3_prefix}/").collect() == []


def test_write_failure_leaves_the_icechunk_branch_as_it_was(repo_with_points, dask_client, tmp_path):
    url, opts, storage = repo_with_points
    before = _repo_contents(storage)
    pts = faulty_cloud(N, ROWS, tmp_path, fail_block=2)  # block 2 loads for the scan, fails in the shuffle
    with pytest.raises(IngestError) as info:
        zv_dask.ingest(pts, url, backend="icechunk", storage_options=opts, overwrite=True, chunk_shape=CHUNK,
                       base_bin_shape=BIN, client=dask_client, pyramid=True, message="doomed", **JOB)
    _assert_stage_error(info.value, "write", chunk=False, secret=(opts or {}).get("secret_access_key"))
    assert "injected fault" in str(info.value) and "input block 2" in str(info.value)
    assert _repo_contents(storage) == before, "same snapshot, same history, same bytes"


# -- (b) a worker process killed mid-job -----------------------------------------------------------
def test_killed_worker_keeps_an_existing_plain_store(tmp_path, fragile_client, rng):
    from distributed import KilledWorker

    fragile_client.wait_for_workers(2, timeout=30)
    path = tmp_path / "warm.zv"
    before = _warm_local(path)
    with pytest.raises(IngestError) as info:
        zv_dask.ingest(rng.uniform(0, 100, (N, 3)), FaultyStore(LocalStore(path), after=2, action="kill"),
                       client=fragile_client, **JOB)
    _assert_stage_error(info.value, "write")
    assert isinstance(info.value.__cause__, KilledWorker) and f"(first chunk {info.value.chunk})" in str(info.value)
    assert _metadata(path) == before
    assert reference_validate(path) == ["resolution_0: no chunk data"]


def test_killed_worker_leaves_the_icechunk_branch_as_it_was(tmp_path, fragile_client, rng):
    from distributed import KilledWorker

    from zv_dask.local import write_points

    fragile_client.wait_for_workers(2, timeout=30)
    url = str(tmp_path / "repo")
    write_points(url, rng.uniform(0, 100, (3000, 3)).astype("f4"), chunk_shape=CHUNK, bounds=BOUNDS,
                 backend="icechunk")
    storage = icechunk.local_filesystem_storage(url)
    before = _repo_contents(storage)
    pts = faulty_cloud(N, ROWS, tmp_path, fail_block=1, action="kill")
    with pytest.raises(IngestError) as info:
        zv_dask.ingest(pts, url, backend="icechunk", overwrite=True, chunk_shape=CHUNK, base_bin_shape=BIN,
                       client=fragile_client, **JOB)
    _assert_stage_error(info.value, "write", chunk=False)
    assert isinstance(info.value.__cause__, KilledWorker)
    assert _repo_contents(storage) == before


def test_killed_worker_on_s3_leaves_nothing_half_made(s3_server, s3_prefix, s3_options, fragile_client, rng):
    """A new store on S3 whose writer dies mid-write: removed, or kept with its journal and finished by resume."""
    import obstore
    from distributed import KilledWorker

    fragile_client.wait_for_workers(2, timeout=30)
    pts = rng.uniform(0, 100, (N, 3)).astype("f4")
    store = FaultyStore(ObjectStore(s3_server.obstore(prefix=f"{s3_prefix}/new.zv"), read_only=False), after=2,
                        action="kill")
    with pytest.raises(IngestError) as info:
        zv_dask.ingest(pts, store, chunk_shape=CHUNK, bounds=BOUNDS, client=fragile_client, **JOB)
    _assert_stage_error(info.value, "write", secret=s3_server.secret_key)
    assert isinstance(info.value.__cause__, KilledWorker)
    time.sleep(0.3)
    left = [m["path"] for m in obstore.list(s3_server.obstore(), prefix=f"{s3_prefix}/").collect()]
    url = s3_server.url(s3_prefix, "new.zv")
    if left:  # groups finished before the death: the store says it is unfinished, and --resume completes it
        assert any("/.zv-job/" in k for k in left), left[:5]
        with pytest.raises(zv_dask.StoreError, match="unfinished ingest job"):
            zv_dask.ingest(pts, url, chunk_shape=CHUNK, bounds=BOUNDS, storage_options=s3_options,
                           client=fragile_client, **JOB)
        rep = zv_dask.ingest(pts, url, chunk_shape=CHUNK, bounds=BOUNDS, storage_options=s3_options,
                             client=fragile_client, resume=True, **JOB)
        assert rep.resumed
        assert zv_dask.validate_store(url, storage_options=s3_options).ok
        assert len(zv_dask.read_points(url, storage_options=s3_options).compute()) == N


# -- (c) the S3 server stops mid-write and comes back ----------------------------------------------
FLAKY = {"timeout": 2, "connect_timeout": 1, "max_retries": 1}


def _bounced(srv, prefix, job):
    """Run ``job()`` while the server is killed once chunks appear and started again 1 s later."""
    seen = bounce_during(srv, prefix, job, down=1.0)
    assert seen.stopped_at is not None and seen.stopped_at < seen.ended, "the server went down mid-job"
    assert srv.running
    print(f"job {'failed: ' + repr(seen.error)[:300] if seen.error else 'succeeded'}")
    return seen.error


def test_s3_server_restart_mid_write_plain(s3_server, s3_prefix, s3_options, dask_client, rng):
    url = s3_server.url(s3_prefix, "x.zv")
    pts = rng.uniform(0, 100, (N, 3)).astype("f4")
    opts = {**s3_options, **FLAKY}
    err = _bounced(s3_server, s3_prefix, lambda: zv_dask.ingest(pts, url, storage_options=opts, chunk_shape=CHUNK,
                                                                base_bin_shape=BIN, client=dask_client, **JOB))
    raw = s3_server.obstore(prefix=f"{s3_prefix}/x.zv")
    if err is None:  # obstore's retries rode it out: the store is complete
        got = reference_points_s3(raw)
        np.testing.assert_array_equal(canon(got), canon(pts))
        return
    assert isinstance(err, IngestError) and err.stage in ("write", "finalize"), repr(err)
    _assert_stage_error(err, err.stage, chunk=False, secret=s3_options["secret_access_key"])
    import obstore

    keys = [m["path"] for m in obstore.list(raw).collect()]
    if any(k.endswith("zarr.json") for k in keys):  # the clean-up ran while the server was down
        assert len(reference_points_s3(raw)) == 0, "what is left claims no points"


def reference_points_s3(raw):
    import zarr_vectors
    from zarr_vectors.core.store import open_store as zv_open_group
    from zarr_vectors.validate import validate

    store = ObjectStore(raw, read_only=True)
    assert validate(zv_open_group(store), level=5).ok
    return zarr_vectors.open(store).read().positions


def test_s3_server_restart_mid_write_icechunk(s3_server, s3_prefix, dask_client, rng):
    url, opts, storage = _repo_with_points(s3_server.url(s3_prefix, "repo"), s3_server.storage_options(),
                                           s3_server.icechunk_storage(f"{s3_prefix}/repo"), rng)
    before = _repo_contents(storage)
    pts = rng.uniform(0, 100, (N, 3)).astype("f4")
    err = _bounced(s3_server, f"{s3_prefix}/repo",
                   lambda: zv_dask.ingest(pts, url, backend="icechunk", storage_options={**opts, **FLAKY},
                                          overwrite=True, chunk_shape=CHUNK, base_bin_shape=BIN, client=dask_client,
                                          pyramid=True, **JOB))
    if err is None:
        tip, n, _ = _repo_contents(storage)
        assert n == before[1] + 1
        store = icechunk.Repository.open(storage).readonly_session(branch="main").store
        import zarr_vectors

        np.testing.assert_array_equal(canon(zarr_vectors.open(store).read().positions), canon(pts))
        return
    assert isinstance(err, IngestError), repr(err)
    _assert_stage_error(err, err.stage, chunk=False, secret=opts["secret_access_key"])
    assert _repo_contents(storage) == before


# -- 4. plain store: build_pyramid failing at level 2 keeps levels 0 and 1 ---------------------------
def test_pyramid_failure_at_level_2_keeps_levels_0_and_1(tmp_path, dask_client, rng):
    path = tmp_path / "p.zv"
    pts = rng.uniform(0, 100, (N, 3)).astype("f4")
    first = zv_dask.ingest(pts, path, chunk_shape=CHUNK, base_bin_shape=BIN, client=dask_client,
                           pyramid={"levels": 3}, **JOB)
    assert [lv["level"] for lv in first.levels] == [0, 1, 2, 3]

    failing = FaultyStore(LocalStore(path), match=r"^2/.*/c/", after=0)  # level 2's cells
    with pytest.raises(IngestError) as info:  # one level per round: level 1 is finished before level 2 starts
        zv_dask.build_pyramid(failing, levels=3, client=dask_client, levels_per_task=1)
    _assert_stage_error(info.value, "pyramid level 2")

    zs = zv_dask.open_store(path)
    assert zs.levels == [0, 1]
    assert [lv["level"] for lv in zv_dask.store_info(zs)["levels"]] == [0, 1]
    assert len(zs.root.attrs["multiscales"][0]["datasets"]) == 2, "the root metadata lists levels 0 and 1"
    assert reference_validate(path) == []
    np.testing.assert_array_equal(canon(reference_points(path, level=0)["positions"]), canon(pts))
    level1 = reference_points(path, level=1)["positions"]
    assert len(level1) == first.levels[1]["vertex_count"] == zv_dask.read_level_metadata(zs, 1).vertex_count
    assert not (path / "2").exists() and not (path / "3").exists()
