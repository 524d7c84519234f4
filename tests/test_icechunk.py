"""zv-dask on icechunk, on local disk and on real S3 (SeaweedFS on 127.0.0.1), with a real
LocalCluster for the distributed fork / merge / one-commit path. No mocks.

The task functions below run on the cluster's worker processes: they are imported
there by reference, so they live at module level here.
"""

from __future__ import annotations

import icechunk
import numpy as np
import pytest
from conftest import canon
from helpers import store_contents

import zv_dask
from zv_dask import StoreError
from zv_dask.format.layout import encode_plan, plan_chunks
from zv_dask.format.metadata import LevelMetadata
from zv_dask.local import read_points, write_points
from zv_dask.store.levels import AttributeSpec, ChunkSummary, finalize_level, prepare_level, write_chunk_payloads
from zv_dask.transaction import WriteJob, returned_fork, worker_store

BOUNDS = ([0.0, 0.0, 0.0], [100.0, 100.0, 100.0])
CHUNK = (25.0, 25.0, 25.0)


# -- tasks (run on the workers) ---------------------------------------------------------------
def write_task(target, level, grid, payloads, attributes):
    """Write some chunks through the job's target; return the fork (or None) and the summary."""
    nbytes = write_chunk_payloads(worker_store(target), level, grid, payloads, attributes)
    summary = ChunkSummary(np.array([p.chunk for p in payloads], np.int64).reshape(-1, grid.ndim),
                           np.array([p.n_rows for p in payloads], np.int64), bytes_written=nbytes)
    return returned_fork(target), summary


def failing_write_task(target, level, grid, payloads, attributes):
    """Write its chunks, then fail (as a task dying half-way would)."""
    write_chunk_payloads(worker_store(target), level, grid, payloads, attributes)
    raise RuntimeError("injected task failure after writing")


# -- helpers ----------------------------------------------------------------------------------
def _points(rng, n=3000):
    pts = rng.uniform(0, 100, (n, 3)).astype("f4")
    return pts, {"intensity": rng.integers(0, 65535, n).astype("u2")}


def _repo(storage) -> icechunk.Repository:
    return icechunk.Repository.open(storage)


def _ancestry(storage, branch="main") -> list:
    return list(_repo(storage).ancestry(branch=branch))


def _tip(storage, branch="main") -> str:
    return _repo(storage).lookup_branch(branch)


def _contents(storage, branch="main") -> dict[str, bytes]:
    """Every key and its bytes as the branch tip shows them (what a reader sees)."""
    return store_contents(_repo(storage).readonly_session(branch=branch).store)


def _reference_read(storage, branch="main"):
    import zarr_vectors
    from zarr_vectors.core.store import open_store as zv_open_group
    from zarr_vectors.validate import validate

    store = _repo(storage).readonly_session(branch=branch).store
    result = validate(zv_open_group(store), level=5)
    assert result.ok, result.errors
    return zarr_vectors.open(store).read()


def _warm_store(url, opts):
    """A committed empty store: the base every job below starts from."""
    zs = zv_dask.create_store(url, bounds=BOUNDS, chunk_shape=CHUNK, backend="icechunk", storage_options=opts)
    return zv_dask.commit(zs, "warm store")


# -- single process -----------------------------------------------------------------------------
def test_write_points_commits_once_and_reads_back(repo_target, rng):
    url, opts, storage = repo_target
    base = _warm_store(url, opts)
    before = _ancestry(storage)
    pts, attrs = _points(rng)

    zs = write_points(url, pts, attributes=attrs, backend="icechunk", storage_options=opts)
    assert zs.backend.kind == "icechunk"
    after = _ancestry(storage)
    assert len(after) == len(before) + 1, "write_points must make exactly one commit"
    assert after[0].parent_id == base and after[1].id == base
    assert not zs.session.has_uncommitted_changes

    ro = zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts)
    assert ro.read_only and ro.session is None and ro.store.read_only
    assert ro.store.session.snapshot_id == after[0].id
    back = read_points(ro)
    np.testing.assert_array_equal(canon(back["positions"], back["attributes"]["intensity"]),
                                  canon(pts, attrs["intensity"]))
    ref = _reference_read(storage)
    np.testing.assert_array_equal(canon(ref.positions, ref.attributes["intensity"]), canon(pts, attrs["intensity"]))

    # mode r is honoured: nothing can be written through it, and the branch does not move
    with pytest.raises(StoreError, match="read-only"):
        zv_dask.add_resolution_level(ro, 1, 2)
    with pytest.raises(icechunk.ReadOnlyError):  # icechunk's read-only session refuses below the API too
        ro.root.attrs.update({"sneaky": 1})
    assert _tip(storage) == after[0].id


def test_write_points_into_an_open_zvstore_is_one_commit(repo_target, rng):
    """create_store + write_points on the same handle: creation and data in one commit."""
    url, opts, storage = repo_target
    zs = zv_dask.create_store(url, bounds=BOUNDS, chunk_shape=CHUNK, backend="icechunk", storage_options=opts)
    n0 = len(_ancestry(storage))  # the repository's initial snapshot only
    pts, _ = _points(rng, 500)
    write_points(zs, pts)
    assert len(_ancestry(storage)) == n0 + 1
    np.testing.assert_array_equal(canon(read_points(zv_dask.open_store(url, backend="icechunk",
                                                                       storage_options=opts))["positions"]),
                                  canon(pts))


def test_open_missing_repository(repo_target):
    url, opts, _ = repo_target
    with pytest.raises(StoreError, match="no icechunk repository"):
        zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts)
    with pytest.raises(StoreError, match="no icechunk repository"):
        zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)


def test_discard_changes_leaves_the_branch_untouched(repo_target, rng):
    url, opts, storage = repo_target
    pts, attrs = _points(rng, 800)
    _warm_store(url, opts)
    write_points(url, pts, attributes=attrs, backend="icechunk", storage_options=opts)
    tip, contents, history = _tip(storage), _contents(storage), _ancestry(storage)

    zs = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    zv_dask.add_resolution_level(zs, 1, 2)
    zv_dask.write_parametric_types(zs, [{"name": "radius", "dtype": "float32"}])
    zs.root.attrs.update({"scratch": True})
    assert zs.session.has_uncommitted_changes and zs.levels == [0, 1]
    zv_dask.discard_changes(zs)
    assert not zs.session.has_uncommitted_changes
    assert zs.levels == [0] and "scratch" not in zs.root.attrs
    assert zv_dask.commit(zs) == tip  # nothing left to commit
    assert _tip(storage) == tip and len(_ancestry(storage)) == len(history)
    assert _contents(storage) == contents


def test_icechunk_options_share_the_obstore_vocabulary(s3_server, s3_prefix, s3_options, rng):
    url = s3_server.url(s3_prefix, "repo")
    _warm_store(url, {**s3_options, "timeout": 30, "max_retries": 2, "connect_timeout": "5s", "concurrency": 4})
    for extra in ({"timeout": "30s"}, {"endpoint_url": s3_options["endpoint"], "endpoint": None},
                  {"virtual_hosted_style_request": False}, {"client_options": {"allow_http": True}}):
        opts = {k: v for k, v in {**s3_options, **extra}.items() if v is not None}
        assert zv_dask.open_store(url, backend="icechunk", storage_options=opts).levels == [0], extra
    with pytest.raises(StoreError, match="not_an_option"):
        zv_dask.open_store(url, backend="icechunk", storage_options={**s3_options, "not_an_option": 1})
    with pytest.raises(StoreError, match="key prefix"):
        zv_dask.create_store("s3://test", backend="icechunk", storage_options=s3_options)


def test_icechunk_wrong_secret_and_unreachable_fail_fast(s3_server, s3_prefix, s3_options):
    import socket
    import time

    url = s3_server.url(s3_prefix, "repo")
    _warm_store(url, s3_options)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    for opts in ({**s3_options, "secret_access_key": "not-the-secret"},
                 {**s3_options, "endpoint": f"http://127.0.0.1:{closed}", "timeout": 2, "max_retries": 0}):
        t0 = time.monotonic()
        with pytest.raises((StoreError, icechunk.IcechunkError)) as info:
            zv_dask.open_store(url, backend="icechunk", storage_options=opts)
        assert time.monotonic() - t0 < 10
        assert "not-the-secret" not in str(info.value)


def test_credentials_stay_out_of_icechunk_reprs(s3_server, s3_prefix, s3_options):
    url = s3_server.url(s3_prefix, "repo")
    secret = s3_options["secret_access_key"]
    zs = zv_dask.create_store(url, bounds=BOUNDS, chunk_shape=CHUNK, backend="icechunk", storage_options=s3_options)
    zv_dask.commit(zs)
    ro = zv_dask.open_store(url, "r", backend="icechunk", storage_options=s3_options)
    for obj in (zs, ro, zs.backend, ro.backend, zs.store, ro.store, zs.session, zs.backend.repository,
                zs.backend.repository.storage):
        assert secret not in repr(obj) and secret not in str(obj), type(obj).__name__


def test_concurrent_commits_conflict_and_lose_nothing(repo_target):
    url, opts, storage = repo_target
    base = _warm_store(url, opts)
    a = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    b = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    zv_dask.write_parametric_types(a, [{"name": "from_a"}])  # a new group: root untouched
    zv_dask.add_resolution_level(b, 1, 2)  # a new level, and the root's multiscales
    snap_a = zv_dask.commit(a, "writer a")
    with pytest.raises((icechunk.ConflictError, StoreError)):
        zv_dask.commit(b, "writer b")
    # the winner is intact at the tip; the loser kept its changes in its session
    assert _tip(storage) == snap_a and _ancestry(storage)[1].id == base
    tip = zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts)
    assert zv_dask.read_parametric_types(tip) == [{"name": "from_a"}] and tip.levels == [0]
    assert b.session.has_uncommitted_changes and b.levels == [0, 1]
    # the two changes do not overlap, so the loser can rebase onto the winner and commit
    b.session.rebase(icechunk.ConflictDetector())
    snap_b = b.session.commit("writer b, rebased")
    assert _ancestry(storage)[0].id == snap_b and _ancestry(storage)[0].parent_id == snap_a
    both = zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts)
    assert both.levels == [0, 1] and zv_dask.read_parametric_types(both) == [{"name": "from_a"}]


def test_a_jobs_commit_is_rebased_by_icechunk_or_names_the_conflict(repo_target):
    """WriteJob.commit (icechunk's own rebase): onto a concurrent commit on other nodes; a clear error on the same."""
    url, opts, storage = repo_target
    _warm_store(url, opts)
    a = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    b = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    job = WriteJob(b, "writer b")
    zv_dask.add_resolution_level(b, 1, 2)  # the root's multiscales and a new level group
    zv_dask.write_parametric_types(a, [{"name": "from_a"}])  # a new group: root untouched
    snap_a = zv_dask.commit(a, "writer a")
    snap_b = job.commit()
    assert _ancestry(storage)[0].id == snap_b and _ancestry(storage)[0].parent_id == snap_a
    both = zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts)
    assert both.levels == [0, 1] and zv_dask.read_parametric_types(both) == [{"name": "from_a"}]

    c = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    d = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    job = WriteJob(d, "writer d")
    zv_dask.write_parametric_types(c, [{"name": "from_c"}])
    zv_dask.write_parametric_types(d, [{"name": "from_d"}])  # the same node
    snap_c = zv_dask.commit(c, "writer c")
    with pytest.raises(StoreError, match=r"conflicts with a concurrent commit on branch 'main'"):
        job.commit()
    assert _tip(storage) == snap_c
    tip = zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts)
    assert zv_dask.read_parametric_types(tip) == [{"name": "from_c"}]


# -- distributed: one fork per stage, tasks return forks, merge, one commit ------------------------
def _job_payloads(zs, pts, attrs):
    grid = zs.grid(0)
    plan = plan_chunks(grid.cast(pts), grid, None)
    specs = [AttributeSpec.of(n, v) for n, v in attrs.items()]
    payloads = list(encode_plan(plan, grid.cast(pts), attrs, grid.dtype, specs))
    return grid, payloads, specs


def _start_level(zs, pts, attrs):
    """Coordinator: settle the bounds' metadata, create level 0's arrays in the session."""
    grid, payloads, specs = _job_payloads(zs, pts, attrs)
    prepare_level(zs.root, 0, grid, specs)
    return grid, payloads, specs


@pytest.mark.parametrize("n_tasks", [4])
def test_writejob_on_localcluster_commits_once(repo_target, dask_client, rng, n_tasks):
    url, opts, storage = repo_target
    base = _warm_store(url, opts)
    history = _ancestry(storage)
    pts, attrs = _points(rng, 4000)

    zs = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    job = WriteJob(zs, "distributed write")
    assert job.transactional
    grid, payloads, specs = _start_level(zs, pts, attrs)
    fork = job.target()
    assert job.target() is fork, "one fork per stage"
    assert type(fork).__name__ == "ForkSession"
    groups = [payloads[i::n_tasks] for i in range(n_tasks)]
    futures = [dask_client.submit(write_task, fork, 0, grid, g, specs, pure=False) for g in groups]
    results = dask_client.gather(futures)
    assert _tip(storage) == base, "nothing reaches the branch before the commit"
    job.absorb([f for f, _ in results])
    summary = ChunkSummary.concat([s for _, s in results], grid.ndim)
    assert int(summary.rows.sum()) == len(pts)
    finalize_level(zs.root, 0, grid, summary, LevelMetadata(level=0, fragments_tile=True), specs)
    snap = job.commit()

    after = _ancestry(storage)
    assert len(after) == len(history) + 1 and after[0].id == snap and after[0].parent_id == base
    assert after[0].message == "distributed write"
    back = read_points(zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts))
    np.testing.assert_array_equal(canon(back["positions"], back["attributes"]["intensity"]),
                                  canon(pts, attrs["intensity"]))
    ref = _reference_read(storage)
    np.testing.assert_array_equal(canon(ref.positions, ref.attributes["intensity"]), canon(pts, attrs["intensity"]))


def test_writejob_failed_task_aborts_and_leaves_the_branch_as_it_was(repo_target, dask_client, rng):
    url, opts, storage = repo_target
    _warm_store(url, opts)
    first, first_attrs = _points(rng, 600)
    write_points(url, first, attributes=first_attrs, backend="icechunk", storage_options=opts)
    tip, contents, history = _tip(storage), _contents(storage), _ancestry(storage)

    zs = zv_dask.open_store(url, "r+", backend="icechunk", storage_options=opts)
    job = WriteJob(zs, "doomed write")
    pts, attrs = _points(rng, 2000)
    grid, payloads, specs = _start_level(zs, pts, attrs)  # replaces level 0's arrays in the session
    fork = job.target()
    half = len(payloads) // 2
    futures = [dask_client.submit(write_task, fork, 0, grid, payloads[:half], specs, pure=False),
               dask_client.submit(failing_write_task, fork, 0, grid, payloads[half:], specs, pure=False)]
    with pytest.raises(RuntimeError, match="injected task failure"):
        dask_client.gather(futures)
    job.abort()

    assert not zs.session.has_uncommitted_changes
    assert _tip(storage) == tip and len(_ancestry(storage)) == len(history)
    assert _contents(storage) == contents
    back = read_points(zv_dask.open_store(url, "r", backend="icechunk", storage_options=opts))
    np.testing.assert_array_equal(canon(back["positions"], back["attributes"]["intensity"]),
                                  canon(first, first_attrs["intensity"]))
    # the aborted handle is still usable, and the same store can take a new job afterwards
    assert zv_dask.commit(zs) == tip
