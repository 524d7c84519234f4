"""compute=False: ingest and build_pyramid as Dask collections that write nothing until computed."""

from __future__ import annotations

import dask
import icechunk
import numpy as np
import pytest
from distributed import progress, wait
from helpers import canon, cell_bytes, reference_validate

import zv_dask
from zv_dask.errors import IngestError, InputError, StoreError

CS = (25.0, 25.0, 25.0)


@pytest.fixture
def cloud(rng):
    pts = rng.uniform(0, 100, (20_000, 3))
    return pts, {"intensity": rng.random(len(pts)).astype(np.float32)}


def _same_points(path, pts, attrs):
    df = zv_dask.read_points(path).compute()
    np.testing.assert_array_equal(canon(df[["x", "y", "z"]].to_numpy(), df["intensity"].to_numpy()),
                                  canon(pts.astype(np.float32), attrs["intensity"]))


def test_nothing_exists_until_computed_and_paths_are_the_callers(tmp_path, monkeypatch, cloud):
    pts, attrs = cloud
    np.save(tmp_path / "in.npy", pts)
    monkeypatch.chdir(tmp_path)
    job = zv_dask.ingest("in.npy", "lazy.zv", chunk_shape=CS, pyramid={"levels": 2}, compute=False)
    assert isinstance(job, zv_dask.PendingIngest) and dask.is_dask_collection(job)
    assert not (tmp_path / "lazy.zv").exists(), "nothing is written before compute"
    assert len(dict(job.__dask_graph__())) == 1 and "lazy.zv" in repr(job)
    monkeypatch.chdir(tmp_path.parent)  # computed elsewhere: the paths were the caller's, made absolute
    (rep,) = dask.compute(job, scheduler="threads")
    assert rep.points_written == len(pts) and [lv["level"] for lv in rep.levels] == [0, 1, 2]
    eager = zv_dask.ingest(pts, tmp_path / "eager.zv", chunk_shape=CS, pyramid={"levels": 2})
    assert eager.points_written == rep.points_written
    assert cell_bytes(tmp_path / "lazy.zv") == cell_bytes(tmp_path / "eager.zv"), "the same cells as compute=True"
    assert reference_validate(tmp_path / "lazy.zv") == []


def test_bad_input_fails_when_the_job_is_made(tmp_path, cloud):
    pts, _ = cloud
    with pytest.raises(InputError, match="does not exist"):
        zv_dask.ingest(str(tmp_path / "missing.npy"), tmp_path / "x.zv", compute=False)
    with pytest.raises(InputError, match="out_of_bounds"):
        zv_dask.ingest(pts, tmp_path / "x.zv", out_of_bounds="wrap", compute=False)
    with pytest.raises(InputError, match="pyramid options"):
        zv_dask.ingest(pts, tmp_path / "x.zv", chunk_shape=CS, pyramid={"levles": 2}, compute=False)
    zv_dask.ingest(pts[:100], tmp_path / "full.zv", chunk_shape=CS)
    with pytest.raises(StoreError, match="already holds points"):
        zv_dask.ingest(pts, tmp_path / "full.zv", chunk_shape=CS, compute=False)
    with pytest.raises(StoreError):
        zv_dask.build_pyramid(tmp_path / "nowhere.zv", compute=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.zv"]


def test_a_writable_icechunk_session_is_refused_with_what_to_pass(tmp_path, cloud):
    pts, _ = cloud
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(tmp_path / "repo")))
    with pytest.raises(InputError, match="cannot travel.*Repository"):
        zv_dask.ingest(pts, repo.writable_session("main"), chunk_shape=CS, compute=False)
    job = zv_dask.ingest(pts, repo, chunk_shape=CS, compute=False, message="lazy")  # a Repository travels
    assert [s.message for s in repo.ancestry(branch="main")] == ["Repository initialized"]
    rep = job.compute()
    assert rep.snapshot_id == next(iter(repo.ancestry(branch="main"))).id


def test_on_a_cluster_compute_progress_persist_and_several_jobs(tmp_path, dask_client, cloud):
    pts, attrs = cloud
    np.save(tmp_path / "in.npy", pts)
    fut = dask_client.compute(zv_dask.ingest(str(tmp_path / "in.npy"), tmp_path / "a.zv", chunk_shape=CS,
                                             compute=False))
    progress(fut)  # distributed's own progress bar follows the job
    rep = fut.result()
    assert rep.points_written == len(pts) and rep.scheduler.startswith("tcp://")

    pyr = dask_client.persist(zv_dask.build_pyramid(tmp_path / "a.zv", levels=2, compute=False))
    wait(pyr)
    assert isinstance(pyr, zv_dask.PendingPyramid) and pyr.compute().levels == [1, 2]
    assert zv_dask.open_store(tmp_path / "a.zv").levels == [0, 1, 2]

    # two jobs in one compute, one of them an append of the other half
    half = len(pts) // 2
    zv_dask.ingest(pts[:half], tmp_path / "b.zv", chunk_shape=CS, bounds=([0.0] * 3, [100.0] * 3),
                   attributes={"i": attrs["intensity"][:half]}, pyramid={"levels": 1})
    both = dask.compute(zv_dask.ingest(pts, tmp_path / "c.zv", chunk_shape=CS, compute=False),
                        zv_dask.ingest(pts[half:], tmp_path / "b.zv", mode="append", compute=False,
                                       attributes={"i": attrs["intensity"][half:]}))
    assert [r.points_written for r in both] == [len(pts), half] and both[1].mode == "append"
    assert zv_dask.store_info(tmp_path / "b.zv")["levels"][0]["vertex_count"] == len(pts)
    assert zv_dask.validate_store(tmp_path / "b.zv").ok


def test_a_job_failing_on_a_worker_raises_its_error_here_and_leaves_nothing(tmp_path, dask_client, cloud):
    pts, _ = cloud
    pts = pts.copy()
    pts[123] = np.nan  # found by the scan, on the cluster
    job = zv_dask.ingest(pts, tmp_path / "bad.zv", chunk_shape=CS, compute=False)
    with pytest.raises((InputError, IngestError), match="NaN"):
        dask_client.compute(job).result()
    assert not (tmp_path / "bad.zv").exists()
