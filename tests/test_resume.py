"""Resumable jobs: a killed or failed ingest / pyramid build continues where it stopped.

The kills are real: the CLI process dies by SIGKILL at a named point
(``ZV_DASK_KILL_AT``), then every process of its session (the LocalCluster's
workers) is SIGKILLed too. The failures are real task failures
(``ZV_DASK_FAIL_AT`` in the workers' environment). After each, ``--resume``
completes, the store is byte-identical to an uninterrupted run's, and the work
the interrupted job had finished is not done again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from helpers import icechunk_state, reference_validate, tree_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zv_dask
from zv_dask.errors import IngestError, InputError, StoreError, UnfinishedJobWarning
from zv_dask.store.journal import JOURNAL_DIR, Journal

BIN = Path(sys.executable).parent / "zv-dask"
N = 150_000
JOB = ["--chunk-shape", "250", "--bin-shape", "25", "--group-points", "7000", "--levels", "3",
       "--levels-per-task", "1", "--points-per-task", "3000", "--links", "explicit", "--workers", "2",
       "--memory-limit", "1.5GiB", "--quiet"]
IN_PROCESS = JOB[:JOB.index("--workers")] + ["--quiet", "--scheduler", "synchronous"]


def _cli(*args, env=None, timeout=300):
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e)


def _killed_at(point: str, *args, timeout=300) -> int:
    """Run the CLI until it SIGKILLs itself at ``point``; then SIGKILL what is left of its session (workers)."""
    e = {**os.environ, "PYTHONWARNINGS": "ignore", "ZV_DASK_KILL_AT": point}
    proc = subprocess.Popen([str(BIN), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=e, start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the workers, the nannies: the whole job is gone
        except ProcessLookupError:
            pass
    time.sleep(0.3)
    return proc.returncode


def _done(store: Path, stage: str) -> int:
    d = store / JOURNAL_DIR / "done" / stage
    return len([f for f in os.listdir(d) if f.endswith(".npz")]) if d.exists() else 0


def _same_tree(a: Path, b: Path) -> None:
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb), (f"files only in the resumed store: {sorted(set(tb) - set(ta))[:5]}, "
                                      f"only in the reference: {sorted(set(ta) - set(tb))[:5]}")
    diff = [k for k in ta if ta[k] != tb[k]]
    assert not diff, f"{len(diff)} files differ, e.g. {diff[:5]}"


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A Parquet input and the store an uninterrupted CLI run makes of it (``<dir>/x.zv``)."""
    d = tmp_path_factory.mktemp("survey")
    rng = np.random.default_rng(7)
    df = pd.DataFrame({"x": rng.uniform(0, 1000, N), "y": rng.uniform(0, 1000, N),
                       "z": rng.normal(500, 150, N).clip(0, 1000),
                       "intensity": rng.integers(0, 65535, N).astype("u2")})
    src = d / "survey.parquet"
    df.to_parquet(src, row_group_size=50_000)
    ref = d / "ref" / "x.zv"
    ref.parent.mkdir()
    rep = json.loads(_cli("ingest", src, ref, *JOB, "--json").stdout)
    assert rep["groups"] >= 15 and rep["levels_in_write_tasks"] == [1], rep
    return src, ref, rep


# -- a real SIGKILL at each point of the job ------------------------------------------------------------
# ("scan" and "level0" were dropped for CI time: "write:4" and "pyramid:2" bracket them)
@pytest.mark.parametrize("point", ["write:4", "pyramid:2", "commit"])
def test_sigkill_then_resume_is_byte_identical(point, survey, tmp_path):
    src, ref, full = survey
    store = tmp_path / "x.zv"
    assert _killed_at(point, "ingest", src, store, *JOB) == -signal.SIGKILL

    if point == "scan":  # nothing was written: there is nothing to lose and nothing to resume
        assert not store.exists()
    else:
        groups_before = _done(store, "level0")
        tasks_before = _done(store, "round-002") + _done(store, "round-003")
        if point == "write:4":
            assert 4 <= groups_before < full["groups"]
        else:
            assert groups_before == full["groups"]
        if point == "pyramid:2":
            assert tasks_before >= 2
        # the store says so, and a plain run is refused without touching it
        info = _cli("info", store)
        assert info.returncode == 0 and "UNFINISHED" in info.stdout and "unfinished ingest job" in info.stdout
        assert f"{groups_before} of {full['groups']} groups written" in info.stdout
        before = tree_bytes(store)
        plain = _cli("ingest", src, store, *JOB)
        assert plain.returncode == 2 and "unfinished ingest job" in plain.stderr and "--resume" in plain.stderr
        assert tree_bytes(store) == before
        val = _cli("validate", store, "--json")
        assert val.returncode == 1 and any("unfinished" in e for e in json.loads(val.stdout)["errors"])

    resumed = _cli("ingest", src, store, *JOB, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    rep = json.loads(resumed.stdout)
    if point == "scan":
        assert not rep["resumed"] and any("nothing to resume" in w for w in rep["warnings"])
    else:
        assert rep["resumed"] and rep["groups_resumed"] == groups_before, "finished groups are not written again"
        if point == "pyramid:2":  # the tasks of the unfinished round are not run again
            assert rep["pyramid_tasks_resumed"] >= 2
        else:  # no round was under way: none to reuse
            assert rep["pyramid_tasks_resumed"] == 0
    assert rep["points_written"] == N and rep["levels"] == full["levels"]
    assert not (store / JOURNAL_DIR).exists()
    _same_tree(ref, store)


def test_a_killed_overwrite_keeps_the_old_store_and_resumes_beside_it(survey, tmp_path):
    src, ref, full = survey
    store = tmp_path / "x.zv"
    old_src = tmp_path / "old.parquet"
    pd.read_parquet(src).iloc[:20_000].to_parquet(old_src)
    assert _cli("ingest", old_src, store, *IN_PROCESS).returncode == 0
    before = tree_bytes(store)
    assert _killed_at("write:4", "ingest", src, store, *JOB, "--overwrite") == -signal.SIGKILL
    assert tree_bytes(store) == before, "the old store stays as it was while its replacement is built beside it"
    beside = tmp_path / ".x.zv.zv-overwrite"
    assert (beside / JOURNAL_DIR).is_dir() and _done(beside, "level0") >= 4
    assert zv_dask.validate_store(store).ok and zv_dask.store_info(store)["levels"][0]["vertex_count"] == 20_000

    resumed = _cli("ingest", src, store, *JOB, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    rep = json.loads(resumed.stdout)
    assert rep["resumed"] and rep["groups_resumed"] >= 4 and rep["store"] == str(store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.parquet", "x.zv"], "no copy is left beside it"
    _same_tree(ref, store)


# -- injected failures (a task raises on a worker) -------------------------------------------------------
def _points(n, seed=3):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 1000, (n, 3))
    return pts, {"intensity": rng.integers(0, 65535, n).astype("u2"), "w": rng.random(n).astype("f4")}


API_JOB = dict(chunk_shape=250.0, base_bin_shape=25.0, group_points=6000,
               pyramid={"levels": 3, "links": "explicit", "levels_per_task": 1, "points_per_task": 2000})


@pytest.fixture(scope="module")
def failing_cluster(tmp_path_factory):
    """Makes a cluster whose workers fail at ``point`` (``ZV_DASK_FAIL_AT`` in their environment)."""
    from distributed import Client, LocalCluster

    def make(point):
        cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0",
                               scheduler_kwargs={"dashboard": False}, host="127.0.0.1", memory_limit="1.5GiB",
                               # the failing task waits: the groups before it finish first, on a busy machine too
                               env={"ZV_DASK_FAIL_AT": point, "ZV_DASK_FAIL_DELAY": "3"},
                               local_directory=str(tmp_path_factory.mktemp("failing")))
        return cluster, Client(cluster, set_as_default=False)

    return make


@pytest.mark.parametrize("point, stage", [("group:9", "write")])
def test_failed_task_then_resume(point, stage, failing_cluster, dask_client, tmp_path):
    pts, attrs = _points(60_000)
    ref = tmp_path / "ref" / "x.zv"
    ref.parent.mkdir()
    full = zv_dask.ingest(pts, ref, attributes=attrs, client=dask_client, **API_JOB)
    store = tmp_path / "run" / "x.zv"
    store.parent.mkdir()
    cluster, client = failing_cluster(point)
    with cluster, client:
        with pytest.raises(IngestError, match=r"resume=True \(--resume\)") as info:
            zv_dask.ingest(pts, store, attributes=attrs, client=client, **API_JOB)
    assert info.value.stage == stage and "injected failure" in str(info.value)
    done = _done(store, "level0")
    assert (0 < done < full.groups) if stage == "write" else done == full.groups
    with pytest.warns(UnfinishedJobWarning, match="unfinished ingest job"):
        zs = zv_dask.open_store(store)
    assert "unfinished ingest job" in zv_dask.store_info(zs)["unfinished_job"]
    assert any("unfinished" in e for e in zv_dask.validate_store(store).errors)

    rep = zv_dask.ingest(pts, store, attributes=attrs, client=dask_client, resume=True, **API_JOB)
    assert rep.resumed and rep.groups_resumed == done
    assert rep.levels == full.levels and rep.link_counts == full.link_counts
    _same_tree(ref, store)
    assert reference_validate(store) == []


# -- refusals: nothing changes ----------------------------------------------------------------------------
def test_resume_refusals_leave_the_store_as_it_was(survey, tmp_path):
    src, ref, full = survey
    mine = tmp_path / "survey.parquet"
    mine.write_bytes(src.read_bytes())
    store = tmp_path / "x.zv"
    assert _killed_at("write:3", "ingest", mine, store, *JOB) == -signal.SIGKILL
    before = tree_bytes(store)

    other = [a if a != "25" else "50" for a in JOB]  # another bin shape
    r = _cli("ingest", mine, store, *other, "--resume")
    assert r.returncode == 2 and "other options" in r.stderr and "--bin-shape" in r.stderr, r.stderr
    assert tree_bytes(store) == before

    os.utime(mine, ns=(time.time_ns(), time.time_ns()))  # the input file changed since the job started
    r = _cli("ingest", mine, store, *JOB, "--resume")
    assert r.returncode == 2 and f"input file {mine} was modified" in r.stderr, r.stderr
    assert tree_bytes(store) == before

    r = _cli("ingest", src, store, *JOB, "--resume")  # another file altogether
    assert r.returncode == 2 and "is gone" in r.stderr and "is new" in r.stderr, r.stderr
    assert tree_bytes(store) == before

    r = _cli("ingest", src, ref, *JOB, "--resume")  # a finished store: no journal
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    r = _cli("pyramid", ref, "--levels", "3", "--resume")
    assert r.returncode == 2 and "no unfinished pyramid build" in r.stderr

    # --overwrite discards the unfinished job and starts again
    r = _cli("ingest", mine, store, *JOB, "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    assert not (store / JOURNAL_DIR).exists() and not json.loads(r.stdout)["resumed"]


def test_a_live_job_holds_the_store(tmp_path, dask_client):
    pts, attrs = _points(20_000)
    store = tmp_path / "x.zv"
    with dask.config.set(scheduler="sync"):
        for g in (2, 3, 1, 0):  # the first group the scheduler runs must not be the failing one
            os.environ["ZV_DASK_FAIL_AT"] = f"group:{g}"
            try:
                with pytest.raises(IngestError):
                    zv_dask.ingest(pts, store, attributes=attrs, client=None, **{**API_JOB, "pyramid": None})
            finally:
                del os.environ["ZV_DASK_FAIL_AT"]
            if store.exists():
                break
    done = _done(store, "level0")
    assert done >= 1
    lease = Journal(str(store)).acquire("a job in another process")  # this process stands for a live job
    try:
        before = tree_bytes(store)
        with pytest.raises(StoreError, match="another job is writing this store"):
            zv_dask.ingest(pts, store, attributes=attrs, client=dask_client, resume=True,
                           **{**API_JOB, "pyramid": None})
        assert tree_bytes(store) == before
    finally:
        lease.release()
    rep = zv_dask.ingest(pts, store, attributes=attrs, client=dask_client, resume=True, **{**API_JOB, "pyramid": None})
    assert rep.resumed and rep.groups_resumed == done


# -- the property: wherever a job stops, resuming it gives the uninterrupted store --------------------------
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2_000, 12_000), seed=st.integers(0, 2**16), fail_at=st.integers(0, 12),
       group_points=st.sampled_from([800, 1500, 4000]), with_ids=st.booleans(),
       links=st.sampled_from(["explicit", "implicit", "none"]))
def test_property_resume_equals_uninterrupted(tmp_path_factory, n, seed, fail_at, group_points, with_ids, links):
    rng = np.random.default_rng(seed)
    pts = rng.normal(500, 180, (n, 3)).clip(0, 999.9)
    attrs = {"a": rng.random(n).astype("f4")}
    ids = rng.integers(0, 40, n) if with_ids else None
    job = dict(attributes=attrs, object_ids=ids, chunk_shape=250.0, base_bin_shape=50.0, group_points=group_points,
               bounds=([0.0] * 3, [1000.0] * 3), pyramid={"levels": 2, "links": links, "levels_per_task": 1})
    d = tmp_path_factory.mktemp("prop")
    ref, store = d / "a" / "x.zv", d / "b" / "x.zv"
    ref.parent.mkdir()
    store.parent.mkdir()
    with dask.config.set(scheduler="sync"):  # tasks in this process, in order: groups before fail_at finish
        full = zv_dask.ingest(pts, ref, client=None, **job)
        os.environ["ZV_DASK_FAIL_AT"] = f"group:{fail_at}"
        try:
            zv_dask.ingest(pts, store, client=None, **job)
            failed = False
        except IngestError:
            failed = True
        finally:
            del os.environ["ZV_DASK_FAIL_AT"]
        assert failed == (fail_at < full.groups)
        if failed:
            done = _done(store, "level0")
            assert store.exists() == (done > 0), "a job that finished nothing is undone; one that did stays"
            rep = zv_dask.ingest(pts, store, client=None, resume=True, **job)
            assert rep.resumed == (done > 0) and rep.groups_resumed == done
    _same_tree(ref, store)


# -- icechunk: progress on a job branch, one commit on the user's branch ------------------------------------
def _repo_state(path):
    """:func:`helpers.icechunk_state` of a local icechunk repository."""
    import icechunk

    return icechunk_state(icechunk.local_filesystem_storage(str(path)))


@pytest.fixture(scope="module")
def icechunk_survey(survey):
    src, _, _ = survey
    ref = src.parent / "iref" / "x.zv"
    ref.parent.mkdir()
    r = _cli("ingest", src, ref, "--icechunk", *JOB, "--json")
    assert r.returncode == 0, r.stderr
    return src, ref, json.loads(r.stdout)


@pytest.mark.parametrize("point", ["write:5"])
def test_icechunk_sigkill_then_resume_is_one_commit(point, icechunk_survey, tmp_path):
    src, ref, full = icechunk_survey
    store = tmp_path / "x.zv"
    env = {"ZV_DASK_CHECKPOINT_SECONDS": "0"}  # a checkpoint after every group: the kill finds them durable
    e = {**os.environ, "PYTHONWARNINGS": "ignore", "ZV_DASK_KILL_AT": point, **env}
    proc = subprocess.Popen([str(BIN), "ingest", src, store, "--icechunk", *JOB], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=e, start_new_session=True)
    proc.wait(timeout=300)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert proc.returncode == -signal.SIGKILL
    journal = Path(str(store) + JOURNAL_DIR) / "main"
    done = len(os.listdir(journal / "done" / "level0"))
    assert done >= (5 if point == "write:5" else full["groups"])
    _, history, branches = _repo_state(store)
    assert history == ["Repository initialized"], "readers of main never see a partial job"
    assert "zv-dask-job/main" in branches
    r = _cli("info", store, "--icechunk")
    assert r.returncode == 2 and "unfinished ingest job" in r.stderr

    r = _cli("ingest", src, store, "--icechunk", *JOB, "--resume", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["resumed"] and rep["groups_resumed"] == done
    got, history, branches = _repo_state(store)
    want, want_history, _ = _repo_state(ref)
    assert history == want_history == ["zv-dask ingest", "Repository initialized"], "one commit for the whole job"
    assert branches == ["main"], "the job branch is gone"
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in want), "byte-identical to the uninterrupted"
    assert not Path(str(store) + JOURNAL_DIR).exists()


def test_not_durable_jobs_keep_no_journal(tmp_path):
    pts, attrs = _points(20_000)
    store = tmp_path / "x.zv"
    job = {**API_JOB, "pyramid": None}
    with dask.config.set(scheduler="sync"):
        os.environ["ZV_DASK_FAIL_AT"] = "group:2"
        try:
            with pytest.raises(IngestError) as info:
                zv_dask.ingest(pts, store, attributes=attrs, client=None, durable=False, **job)
        finally:
            del os.environ["ZV_DASK_FAIL_AT"]
        assert "resume" not in str(info.value)
        assert not store.exists(), "a job without a journal is undone as a whole"
        with pytest.raises(InputError, match="resume=True and durable=False"):
            zv_dask.ingest(pts, store, attributes=attrs, client=None, durable=False, resume=True, **job)
        rep = zv_dask.ingest(pts, store, attributes=attrs, client=None, durable=False, **job)
    assert rep.points_written == 20_000 and not (store / JOURNAL_DIR).exists()
