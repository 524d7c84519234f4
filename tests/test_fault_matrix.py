"""The fault matrix: the client SIGKILLed at each stage of a job, on S3 and on icechunk.

``test_resume.py`` covers a plain local store (a kill mid-write, mid-pyramid and
at the commit, with a LocalCluster); this file runs the same stages where the
store is an S3 prefix on the loopback server, or an icechunk repository (local
and on S3). Each kill is real: the CLI process dies by SIGKILL, either by its own
hand at a named point (``ZV_DASK_KILL_AT``) or from outside, at whatever moment
the job has a few write groups durable. After each case the target is either as
it was (nothing of the job is visible) or ``--resume`` finishes the job, and the
result is byte-identical to an uninterrupted run's. Every subprocess has a timeout
that fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import icechunk_state

BIN = Path(sys.executable).parent / "zv-dask"
N = 60_000
JOB = ["--chunk-shape", "250", "--bin-shape", "25", "--group-points", "4000", "--levels", "3",
       "--levels-per-task", "1", "--points-per-task", "3000", "--links", "explicit",
       "--scheduler", "synchronous", "--quiet"]
TIMEOUT = 240  # seconds for any one CLI run: a hang fails the test


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", **extra}


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=TIMEOUT,
                          env=_env(**(env or {})))


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _killed(args, *, at: str | None = None, when=None, env=None) -> int:
    """Run the CLI until it dies: at point ``at`` by its own SIGKILL, or SIGKILLed from here once ``when()``."""
    e = _env(**(env or {}), **({"ZV_DASK_KILL_AT": at} if at else {}))
    proc = subprocess.Popen([str(BIN), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=e, start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"the job did not die or finish within {TIMEOUT} s: {args}")
            if when is not None and when():
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.05)
    finally:
        _kill(proc)
    return proc.returncode


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    d = tmp_path_factory.mktemp("matrix")
    rng = np.random.default_rng(11)
    df = pd.DataFrame({"x": rng.uniform(0, 1000, N), "y": rng.uniform(0, 1000, N),
                       "z": rng.normal(500, 150, N).clip(0, 1000),
                       "intensity": rng.integers(0, 65535, N).astype("u2")})
    src = d / "survey.parquet"
    df.to_parquet(src, row_group_size=20_000)
    return src


def _s3_args(srv) -> list[str]:
    out = []
    for k, v in srv.storage_options().items():
        out += ["--storage-option", f"{k}={v}"]
    return out


def _s3_objects(srv, prefix: str) -> dict[str, bytes]:
    import obstore

    obs = srv.obstore(prefix=prefix)
    return {m["path"]: bytes(obstore.get(obs, m["path"]).bytes()) for batch in obstore.list(obs) for m in batch}


# -- S3: a plain store under a key prefix ------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_reference(survey, s3_server):
    """An uninterrupted run's objects, keyed relative to the store."""
    prefix = "matrix-ref/x.zv"
    r = _cli("ingest", survey, s3_server.url(prefix), *JOB, *_s3_args(s3_server))
    assert r.returncode == 0, r.stderr
    return _s3_objects(s3_server, prefix)


def _journal_records(srv, prefix: str, stage: str) -> int:
    import obstore

    try:
        return sum(len(b) for b in obstore.list(srv.obstore(prefix=f"{prefix}/.zv-job/done/{stage}")))
    except Exception:  # noqa: BLE001 - the server mid-answer; poll again
        return 0


@pytest.mark.parametrize("stage", ["scan", "mid-write", "pyramid:2", "commit"])
def test_s3_sigkill_then_resume_is_byte_identical(stage, survey, s3_server, s3_prefix, s3_reference):
    prefix = f"{s3_prefix}/x.zv"
    url = s3_server.url(prefix)
    args = ["ingest", survey, url, *JOB, *_s3_args(s3_server)]
    if stage == "mid-write":
        code = _killed(args, when=lambda: _journal_records(s3_server, prefix, "level0") >= 3)
    else:
        code = _killed(args, at=stage)
    assert code == -signal.SIGKILL
    left = _s3_objects(s3_server, prefix)
    if left:  # the job left something: the store says it is unfinished, and refuses a plain run untouched
        info = _cli("info", url, *_s3_args(s3_server))
        assert info.returncode == 0 and "unfinished ingest job" in info.stdout, info.stdout + info.stderr
        plain = _cli(*args)
        assert plain.returncode == 2 and "--resume" in plain.stderr
        assert _s3_objects(s3_server, prefix) == left
    r = _cli(*args, "--resume", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["points_written"] == N and rep["resumed"] == bool(left)
    if stage not in ("scan", "mid-write"):
        assert rep["resumed"] and rep["groups_resumed"] == rep["groups"], "finished groups are not written again"
    got = _s3_objects(s3_server, prefix)
    assert sorted(got) == sorted(s3_reference), (sorted(set(got) ^ set(s3_reference)))[:5]
    assert [k for k in got if got[k] != s3_reference[k]] == []


def test_local_sigkill_at_the_scan_leaves_nothing_and_an_existing_store_as_it_was(survey, tmp_path):
    """(test_resume.py kills a plain local job mid-write, mid-pyramid and at the commit.)"""
    from helpers import tree_bytes

    new = tmp_path / "new.zv"
    assert _killed(["ingest", survey, new, *JOB], at="scan") == -signal.SIGKILL
    assert not new.exists(), "nothing was written before the scan ended"
    old = tmp_path / "old.zv"
    assert _cli("ingest", survey, old, *JOB, "--levels", "2").returncode == 0
    before = tree_bytes(old)
    assert _killed(["ingest", survey, old, *JOB, "--overwrite"], at="scan") == -signal.SIGKILL
    assert tree_bytes(old) == before and sorted(p.name for p in tmp_path.iterdir()) == ["old.zv"]


# -- icechunk: progress on a job branch, readers of main see nothing until the one commit -------------
@pytest.fixture(scope="module")
def icechunk_reference(survey, tmp_path_factory):
    import icechunk

    path = tmp_path_factory.mktemp("iref") / "repo"
    r = _cli("ingest", survey, path, "--icechunk", *JOB)
    assert r.returncode == 0, r.stderr
    return icechunk_state(icechunk.local_filesystem_storage(str(path)))


@pytest.mark.parametrize("stage", ["scan", "pyramid:2", "commit"])
def test_icechunk_sigkill_then_resume_is_one_commit(stage, survey, tmp_path, icechunk_reference):
    import icechunk

    path = tmp_path / "repo"
    args = ["ingest", survey, path, "--icechunk", *JOB]
    env = {"ZV_DASK_CHECKPOINT_SECONDS": "0"}
    assert _killed(args, at=stage, env=env) == -signal.SIGKILL
    storage = icechunk.local_filesystem_storage(str(path))
    if icechunk.Repository.exists(storage):
        _, history, _ = icechunk_state(storage)
        assert history == ["Repository initialized"], "readers of main never see a partial job"
    r = _cli(*args, "--resume", "--json", env=env)
    assert r.returncode == 0, r.stderr
    got, history, branches = icechunk_state(storage)
    want, want_history, _ = icechunk_reference
    assert history == want_history == ["zv-dask ingest", "Repository initialized"], "one commit for the whole job"
    assert branches == ["main"], "the job branch is gone"
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []


def test_icechunk_on_s3_killed_mid_pyramid_resumes(survey, s3_server, s3_prefix, icechunk_reference):
    prefix = f"{s3_prefix}/repo"
    args = ["ingest", survey, s3_server.url(prefix), "--icechunk", *JOB, *_s3_args(s3_server)]
    env = {"ZV_DASK_CHECKPOINT_SECONDS": "0"}
    assert _killed(args, at="pyramid:2", env=env) == -signal.SIGKILL
    storage = s3_server.icechunk_storage(prefix)
    _, history, branches = icechunk_state(storage)
    assert history == ["Repository initialized"] and "zv-dask-job/main" in branches
    r = _cli(*args, "--resume", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed"]
    got, history, branches = icechunk_state(storage)
    want, want_history, _ = icechunk_reference
    assert history == want_history and branches == ["main"]
    assert got.keys() == want.keys() and [k for k in want if got[k] != want[k]] == []


# -- two jobs started at once on one new target ---------------------------------------------------------
LOSER = ("a store already exists at", "already holds points", "another process is running now",
         "another job is writing this store", "another job is creating a store", "already exists", "conflict")


def _race(args_a, args_b, delay: float):
    procs = {"a": subprocess.Popen([str(BIN), *map(str, args_a)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, env=_env())}
    time.sleep(delay)
    procs["b"] = subprocess.Popen([str(BIN), *map(str, args_b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=_env())
    try:
        return {k: (p.wait(timeout=TIMEOUT), p.stderr.read()) for k, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    rng = np.random.default_rng(5)
    out = {}
    for name, n in (("a", 20_000), ("b", 15_000)):
        out[name] = (d / f"{name}.npy", n)
        np.save(out[name][0], rng.uniform(0, 100, (n, 3)).astype(np.float32))
    return out


@pytest.mark.parametrize("backend", ["s3", "icechunk"])
def test_two_jobs_at_once_on_one_new_target(backend, two_inputs, s3_server, s3_prefix, tmp_path):
    """One job writes the target, the other fails with exit 2 and a clear line; never both, never a mix."""
    import zv_dask

    opts = _s3_args(s3_server) if backend == "s3" else ["--icechunk"]
    job = ["--chunk-shape", "25", "--bounds", "0,0,0,100,100,100", "--scheduler", "synchronous", "-q", *opts]
    for i, delay in enumerate((0.0, 0.3, 0.7)):
        target = s3_server.url(f"{s3_prefix}/s{i}.zv") if backend == "s3" else str(tmp_path / f"r{i}")
        out = _race(["ingest", two_inputs["a"][0], target, *job], ["ingest", two_inputs["b"][0], target, *job], delay)
        assert sorted(c for c, _ in out.values()) == [0, 2], out
        winner = next(k for k, (c, _) in out.items() if c == 0)
        err = next(e for c, e in out.values() if c == 2)
        assert any(m in err for m in LOSER) and "Traceback" not in err, err
        kw = ({"storage_options": s3_server.storage_options()} if backend == "s3" else {"backend": "icechunk"})
        assert zv_dask.validate_store(target, **kw).ok
        assert len(zv_dask.read_points(target, **kw).compute()) == two_inputs[winner][1]


# -- the store's own disk fills up mid-job ------------------------------------------------------------
SMALL = ["--chunk-shape", "250", "--bin-shape", "25", "--bounds", "0,0,0,1000,1000,1000",
         "--scheduler", "synchronous", "-q"]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs holding a 20,000-point store (1.6 MiB): too small for a 150,000-point job beside it."""
    from helpers import tree_bytes

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:  # unmounted whatever fails from here on
        rng = np.random.default_rng(2)
        small, big = tmp_path / "small.npy", tmp_path / "big.npy"
        np.save(small, rng.uniform(0, 1000, (20_000, 3)).astype(np.float32))
        np.save(big, rng.uniform(0, 1000, (150_000, 3)).astype(np.float32))
        store = mnt / "x.zv"
        assert _cli("ingest", small, store, *SMALL).returncode == 0
        yield mnt, store, big, tree_bytes(store)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("job", ["new", "overwrite", "append", "pyramid"])
def test_a_full_disk_mid_job_names_it_and_keeps_the_store(job, small_disk):
    from helpers import tree_bytes

    mnt, store, big, before = small_disk
    free = _free(mnt)
    target = mnt / "new.zv" if job == "new" else store
    args = {"new": ["ingest", big, target, *SMALL], "overwrite": ["ingest", big, target, *SMALL, "--overwrite"],
            "append": ["ingest", big, target, "--append", "--scheduler", "synchronous", "-q"],
            "pyramid": ["pyramid", target, "--levels", "6", "--bin-ratio", "2", "--scheduler", "synchronous",
                        "-q"]}[job]
    if job == "pyramid":  # the new levels are small: another program has taken most of the space
        with open(mnt / "filler", "wb") as fh:
            fh.write(b"\0" * (free - (64 << 10)))
        free = _free(mnt)
        clean = mnt.parent / "clean.zv"  # the same build on a disk with room, for the resumed one to equal
        shutil.copytree(store, clean)
        assert _cli("pyramid", clean, *args[2:]).returncode == 0
    r = _cli(*args)
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert "no space left on the device holding" in r.stderr and str(mnt) in r.stderr, r.stderr
    if job == "pyramid":  # a rebuild keeps the levels it finished, beside the old ones: space freed, it resumes
        assert "--resume" in r.stderr
        os.remove(mnt / "filler")
        assert _cli(*args, "--resume").returncode == 0
        assert tree_bytes(store) == tree_bytes(clean)
        return
    assert tree_bytes(store) == before, "the store is as it was"
    assert sorted(p.name for p in mnt.iterdir()) == ["x.zv"], "nothing of the job is left on the disk"
    assert _free(mnt) == free, "the space the job took is given back"


def test_a_full_disk_under_an_icechunk_repository_leaves_the_branch_as_it_was(small_disk):
    import icechunk

    mnt, store, big, _ = small_disk
    repo = mnt / "repo"
    assert _cli("ingest", big.parent / "small.npy", repo, "--icechunk", *SMALL).returncode == 0
    storage = icechunk.local_filesystem_storage(str(repo))
    before = icechunk_state(storage)
    with open(mnt / "filler", "wb") as fh:  # another program takes all but 64 KiB
        fh.write(b"\0" * (_free(mnt) - (64 << 10)))
    r = _cli("ingest", big, repo, "--icechunk", *SMALL, "--overwrite")
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr
    assert "no space left on the device holding" in r.stderr, r.stderr
    keys, history, branches = icechunk_state(storage)
    assert (keys, history) == before[:2], "main: the same keys, bytes and history"
    # Its job branch may stay (deleting a branch is a write too, on a full disk), and the chunks the job
    # wrote stay as objects no snapshot refers to, until icechunk's garbage collection (README).
    assert set(branches) <= {"main", "zv-dask-job/main"}
