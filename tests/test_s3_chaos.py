"""Jobs on S3 through a hostile network, and with the S3 server gone for good.

* A loopback proxy (:mod:`chaosproxy`) in front of the S3 server answers ``503 SlowDown`` to 30 % of
  the requests and resets 5 % of the connections (half before the request reaches the server, half
  after it took effect, the answer lost). An ingest with its pyramid, to a plain store and to an
  icechunk repository, completes through it with the default retries, and what it stored is what a
  clean run stores: the same objects with the same bytes (plain); the same arrays and attributes in
  one commit (icechunk, also when every conditional update of its ``repo`` object lands unanswered).
* The S3 server killed for good once the first chunk objects of a job have landed: the job ends within
  seconds with a clear error (the CLI: exit 1, one line); with the server back, the icechunk branch is
  as it was, and the plain location holds an unfinished job that ``--resume`` completes into a clean
  run's bytes (or nothing).
* A conditional PUT or a delete whose answer is lost (zv_dask.store.retry sends it again).
* Retries exhausted (every chunk PUT answered 503): the error names the object and the status.

Real parts only: SeaweedFS on 127.0.0.1, the proxy on 127.0.0.1, the 2-process LocalCluster, the CLI
in a subprocess. Every case runs under a timeout that fails it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import icechunk
import numpy as np
import obstore
import pytest
import zarr
from chaosproxy import ChaosProxy, header, is_conditional_put
from faults import _wait_readable
from helpers import store_contents

import zv_dask
from zv_dask import IngestError, StoreError
from zv_dask.errors import ZVError

pytestmark = [pytest.mark.s3]

N = 30_000
BOUNDS = ([0.0] * 3, [100.0] * 3)
JOB = dict(chunk_shape=(50.0, 50.0, 50.0), base_bin_shape=(6.25, 6.25, 6.25), bounds=BOUNDS, partition_rows=6000,
           group_points=2500, pyramid={"levels": 3, "links": "explicit"})
CLI_JOB = ["--chunk-shape", "50", "--bin-shape", "6.25", "--bounds", "0,0,0,100,100,100", "--partition-rows", "6000",
           "--group-points", "2500", "--levels", "3", "--links", "explicit"]
# small retry limits, through storage_options: a dead server is reported in seconds, not minutes
FRAGILE = {"max_retries": 1, "timeout": 2, "connect_timeout": 1}
ZV = str(Path(sys.executable).with_name("zv-dask"))


@pytest.fixture(scope="module")
def cloud():
    rng = np.random.default_rng(1919)
    pts = rng.uniform(0, 100, (N, 3)).astype("f4")
    return pts, {"intensity": rng.integers(0, 65535, N).astype("u2")}


def _objects(srv, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix/`` (key relative to it -> bytes), read straight from the server."""
    raw = srv.obstore()
    prefix = prefix.rstrip("/")
    keys = sorted(m["path"] for m in obstore.list(raw, prefix=prefix + "/").collect())
    return {k[len(prefix) + 1:]: bytes(obstore.get(raw, k).bytes()) for k in keys}


def _faults_happened(counts: dict, *, landed_puts: bool = True) -> None:
    assert counts.get("slowdown", 0) >= 20, counts
    assert counts.get("reset_before", 0) >= 1 and counts.get("reset_after", 0) >= 1, counts
    if landed_puts:  # (~12 expected in (a); icechunk's few PUTs have their own deterministic test)
        assert counts.get("reset_after PUT", 0) >= 1, ("no PUT landed with its answer lost", counts)


# -- (a) plain S3 through the proxy: the same bytes as a clean run ---------------------------------------
@pytest.mark.timeout(120)
def test_plain_s3_job_through_throttling_and_resets_stores_a_clean_runs_bytes(s3_server, s3_prefix, s3_options,
                                                                             dask_client, cloud):
    pts, attrs = cloud
    # The same store name in both places: the root's OME "name" is the store's name, the only thing in a
    # store that depends on where it is. Nothing else differs between two runs: no job id, lease or time is
    # kept in the store (the job's journal, .zv-job/, which holds them, is removed when the job ends).
    clean, chaos = f"{s3_prefix}/clean/x.zv", f"{s3_prefix}/chaos/x.zv"
    zv_dask.ingest(pts, f"s3://test/{clean}", attributes=attrs, storage_options=s3_options, client=dask_client, **JOB)
    # Every request may be answered 503 or reset, conditional PUTs and deletes included (obstore does not
    # retry those when their connection drops; zv_dask.store.retry does).
    with ChaosProxy(s3_server.endpoint, seed=19) as proxy:
        t0 = time.monotonic()
        rep = zv_dask.ingest(pts, f"s3://test/{chaos}", attributes=attrs, client=dask_client,
                             storage_options=s3_server.storage_options(endpoint=proxy.endpoint), **JOB)
        seconds = time.monotonic() - t0
    counts = proxy.snapshot()
    print(f"chaos run {seconds:.1f}s: {counts}")
    assert rep.points_written == N and len(rep.levels) == 4
    _faults_happened(counts)

    want, got = _objects(s3_server, clean), _objects(s3_server, chaos)
    assert not [k for k in want if k.startswith((".zv-job", ".zv-scratch"))], "no journal or scratch left"
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    assert [k for k in want if got[k] != want[k]] == [], "every object byte-identical to the clean run's"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["PUT /x.zv/zarr.json", "PUT /.zv-job/locks/", "POST ?delete"])
def test_a_dropped_conditional_put_or_delete_is_retried(s3_server, s3_prefix, s3_options, dask_client, cloud, which):
    """The first conditional PUT of ``which`` (or the first delete) takes effect, and its answer is lost."""
    pts, attrs = cloud
    method, part = which.split(" ")
    hit = []

    def first(m, target, headers):
        if not hit and m == method and part in target and (m == "POST" or is_conditional_put(m, target, headers)):
            hit.append(target)
            return True
        return False

    url = f"s3://test/{s3_prefix}/x.zv"
    with ChaosProxy(s3_server.endpoint, slowdown=0, reset=1.0, after_share=1.0, only=first) as proxy:
        try:
            zv_dask.ingest(pts, url, attributes=attrs, client=dask_client,
                           storage_options=s3_server.storage_options(endpoint=proxy.endpoint), **JOB)
        finally:
            print(hit, proxy.snapshot())
    assert hit and proxy.snapshot().get("reset_after") == 1
    assert len(zv_dask.read_points(url, storage_options=s3_options)) == N


# -- (b) icechunk on S3 through the proxy: one commit, a clean run's arrays ---------------------------------
def _tree(store) -> dict:
    """Every node of a zarr hierarchy: its attributes, and for an array its dtype, shape and values."""
    root = zarr.open_group(store, mode="r")
    out = {"": ("group", dict(root.attrs))}
    for path, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array):
            out[path] = ("array", dict(node.attrs), str(node.dtype), node.shape, node[...])
        else:
            out[path] = ("group", dict(node.attrs))
    return out


def _assert_same_tree(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want), set(got) ^ set(want)
    for path, w in want.items():
        g = got[path]
        assert g[:4] == w[:4], path
        if w[0] == "array":  # (vlen-bytes arrays: object arrays of bytes, compared element by element)
            assert g[4].shape == w[4].shape and all(a == b for a, b in zip(g[4].ravel(), w[4].ravel())), path


def _one_commit_of(srv, key: str, rep, clean_key: str) -> None:
    repo = icechunk.Repository.open(srv.icechunk_storage(key))
    history = list(repo.ancestry(branch="main"))
    assert len(history) == 2 and history[0].id == rep.snapshot_id and history[0].message == "the job", \
        "ONE commit for the whole job"
    assert set(repo.list_branches()) == {"main"}, "no job branch left"
    assert _objects(srv, key + ".zv-job") == {}, "no journal left beside the repository"
    want = _tree(icechunk.Repository.open(srv.icechunk_storage(clean_key)).readonly_session(branch="main").store)
    _assert_same_tree(_tree(repo.readonly_session(branch="main").store), want)


@pytest.fixture
def clean_repo(s3_server, s3_prefix, s3_options, dask_client, cloud):
    """The repository key of a clean run's job (no proxy)."""
    pts, attrs = cloud
    key = f"{s3_prefix}/clean/repo"
    zv_dask.ingest(pts, f"s3://test/{key}", attributes=attrs, backend="icechunk", storage_options=s3_options,
                   client=dask_client, message="the job", **JOB)
    return key


@pytest.mark.timeout(120)
def test_icechunk_job_through_throttling_and_resets_is_one_commit_of_a_clean_runs_data(s3_server, s3_prefix,
                                                                                      clean_repo, dask_client, cloud):
    pts, attrs = cloud
    chaos = f"{s3_prefix}/chaos/repo"

    # Every request may be throttled or reset: icechunk's own, and zv-dask's journal beside the repository.
    with ChaosProxy(s3_server.endpoint, seed=23) as proxy:
        t0 = time.monotonic()
        rep = zv_dask.ingest(pts, f"s3://test/{chaos}", attributes=attrs, backend="icechunk", client=dask_client,
                             storage_options=s3_server.storage_options(endpoint=proxy.endpoint), message="the job",
                             **JOB)
        seconds = time.monotonic() - t0
    counts = proxy.snapshot()
    print(f"chaos run {seconds:.1f}s: {counts}")
    assert rep.points_written == N
    _faults_happened(counts, landed_puts=False)
    _one_commit_of(s3_server, chaos, rep, clean_repo)


@pytest.mark.timeout(90)
def test_icechunk_updates_that_land_unanswered_are_recovered(s3_server, s3_prefix, clean_repo, dask_client, cloud):
    """Every conditional PUT of icechunk's ``repo`` object (create, then ``If-Match`` updates) lands on the
    server and its answer is lost: the retry gets 412, and icechunk finds its own write there."""
    pts, attrs = cloud
    chaos = f"{s3_prefix}/chaos/repo"
    done = set()

    def each_repo_update_once(method, target, headers):
        k = (target, header(headers, "if-match"), header(headers, "if-none-match"))
        if is_conditional_put(method, target, headers) and target.startswith(f"/test/{chaos}/repo?") and k not in done:
            done.add(k)
            return True
        return False

    with ChaosProxy(s3_server.endpoint, slowdown=0, reset=1.0, after_share=1.0, only=each_repo_update_once) as proxy:
        rep = zv_dask.ingest(pts, f"s3://test/{chaos}", attributes=attrs, backend="icechunk", client=dask_client,
                             storage_options=s3_server.storage_options(endpoint=proxy.endpoint), message="the job",
                             **JOB)
    counts = proxy.snapshot()
    print(counts)
    assert counts.get("reset_after conditional", 0) >= 3 and counts.get("status 412", 0) >= 3, counts
    _one_commit_of(s3_server, chaos, rep, clean_repo)


# -- (c) the S3 server stopped for good mid-job ----------------------------------------------------------
def _stop_server_once_chunks_land(srv, prefix: str, running, *, pattern: str, timeout: float = 60) -> str:
    """Poll ``prefix/`` until a new object matching ``pattern`` appears, then kill the server (from this, the
    starting, thread: it dies with the thread that started it). Returns that object's key."""
    raw = srv.obstore(client_options={"timeout": "2s"}, retry_config={"max_retries": 0})
    rx = re.compile(pattern)
    old = {m["path"] for m in obstore.list(raw, prefix=f"{prefix}/").collect()}
    deadline = time.monotonic() + timeout
    while running() and time.monotonic() < deadline:
        new = [m["path"] for m in obstore.list(raw, prefix=f"{prefix}/").collect()
               if m["path"] not in old and rx.search(m["path"])]
        if new:
            srv.stop()
            return new[0]
        time.sleep(0.01)
    raise AssertionError("the job ended (or the wait timed out) before its first chunk objects landed")


def _back(srv, probe: str) -> None:
    """Start the server again and wait until ``probe`` reads (GETs answer 500 while the volumes come back)."""
    srv.restart()
    _wait_readable(srv.obstore(client_options={"timeout": "2s"}, retry_config={"max_retries": 0}), probe,
                   time.monotonic() + 30)


def _option_args(opts: dict) -> list[str]:
    return [a for k, v in opts.items() for a in ("-S", f"{k}={v}")]


@pytest.mark.timeout(150)
def test_plain_s3_server_gone_for_good_cli(s3_server, s3_prefix, s3_options, dask_client, cloud, tmp_path):
    pts, _ = cloud
    src = tmp_path / "points.npy"
    np.save(src, pts)
    store = f"{s3_prefix}/x.zv"
    args = [ZV, "ingest", str(src), f"s3://test/{store}", *CLI_JOB, "-q"]
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([*args, *_option_args({**s3_options, **FRAGILE})], stdout=fo, stderr=fe, cwd=tmp_path)
    try:
        probe = _stop_server_once_chunks_land(s3_server, store, lambda: proc.poll() is None, pattern=r"/c/")
        t_stop = time.monotonic()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the CLI did not end within 60 s of the server's death") from None
        took = time.monotonic() - t_stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not s3_server.running:
            s3_server.restart()
    stderr = err.read_text()
    print(f"rc={rc}, {took:.1f}s after the stop: {stderr}")
    _back(s3_server, probe)

    assert rc == 1, (rc, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    # the stage, the request and the object: "failed: IngestError: pyramid level 1: task over 1 level-0
    # chunks (first chunk 0.0.0) failed: GenericError: ... Error performing GET http://127.0.0.1:PORT/test/<store>/1/
    # vertices/zarr.json in 52ms, after 1 retries ... - HTTP error: error sending request; the finished work
    # is kept: run the same job again with --resume to continue, ..."
    assert re.search(rf"failed: (IngestError|StoreError): .* http://127\.0\.0\.1:\d+/test/{store}/", stderr), stderr
    assert "--resume" in stderr, stderr
    assert s3_options["secret_access_key"] not in stderr + out.read_text()
    assert took < 30, "an error in seconds with max_retries=1"

    left = _objects(s3_server, store)
    print(f"left behind: {len(left)} objects, {sorted(left)[:4]}...")
    if left:  # the clean-up could not reach the dead server: an unfinished job, which --resume completes
        assert ".zv-job/job.json" in left, "what is left is a job's leftover, with its journal"
        info = subprocess.run([ZV, "info", f"s3://test/{store}", *_option_args(s3_options)], capture_output=True,
                              text=True, timeout=60)
        assert "unfinished ingest job" in info.stdout and "--resume" in info.stdout, (info.stdout, info.stderr)
        try:
            again = subprocess.run([*args, "--resume", *_option_args(s3_options)], capture_output=True, text=True,
                                   timeout=90, cwd=tmp_path)
        except subprocess.TimeoutExpired:
            raise AssertionError("zv-dask ingest --resume did not end within 90 s") from None
        assert again.returncode == 0, again.stderr
        zv_dask.ingest(pts, f"s3://test/{s3_prefix}/clean/x.zv", storage_options=s3_options, client=dask_client,
                       **JOB)
        assert _objects(s3_server, store) == _objects(s3_server, f"{s3_prefix}/clean/x.zv"), \
            "the resumed store is byte-identical to a clean run's"


def _repo_state(storage) -> tuple:
    """(tip, history, every key -> bytes) of ``main`` as a reader sees it."""
    repo = icechunk.Repository.open(storage)
    return (repo.lookup_branch("main"), [s.id for s in repo.ancestry(branch="main")],
            store_contents(repo.readonly_session(branch="main").store))


def _repo_with_a_commit(srv, key: str, opts: dict, client, pts) -> tuple:
    zv_dask.ingest(pts[:3000], f"s3://test/{key}", backend="icechunk", storage_options=opts, client=client,
                   message="before", **{**JOB, "pyramid": False})
    storage = srv.icechunk_storage(key)
    return storage, _repo_state(storage)


@pytest.mark.timeout(120)
def test_icechunk_s3_server_gone_for_good_leaves_the_branch_as_it_was(s3_server, s3_prefix, s3_options, dask_client,
                                                                     cloud):
    pts, attrs = cloud
    key = f"{s3_prefix}/repo"
    storage, before = _repo_with_a_commit(s3_server, key, s3_options, dask_client, pts)
    seen: dict = {}

    def job():
        try:
            seen["result"] = zv_dask.ingest(pts, f"s3://test/{key}", attributes=attrs, backend="icechunk",
                                            overwrite=True, storage_options={**s3_options, **FRAGILE},
                                            client=dask_client, **JOB)
        except BaseException as e:  # noqa: BLE001 - judged below
            seen["error"] = e

    worker = threading.Thread(target=job, daemon=True)
    worker.start()
    try:
        probe = _stop_server_once_chunks_land(s3_server, key, worker.is_alive, pattern=r"/chunks/")
        t_stop = time.monotonic()
        worker.join(60)
        assert not worker.is_alive(), "the job did not end within 60 s of the server's death"
        took = time.monotonic() - t_stop
    finally:
        if not s3_server.running:
            s3_server.restart()
    _back(s3_server, probe)
    err = seen.get("error")
    print(f"{took:.1f}s after the stop: {err!r}")
    assert "result" not in seen and isinstance(err, (IngestError, StoreError)), repr(err)
    assert re.search(r"connection refused|connection reset|error sending request|dispatch failure", str(err), re.I), err
    assert s3_options["secret_access_key"] not in str(err)
    assert took < 30, "an error in seconds with max_retries=1"
    assert _repo_state(storage) == before, "same tip, same history, same bytes"


# -- (d) retries exhausted: the error names the object and the status -------------------------------------------
def _chunk_puts(method, target, headers) -> bool:
    return method == "PUT" and ("/c/" in target or "/chunks/" in target)


def _everything(method, target, headers) -> bool:
    return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend, where", [("obstore", "chunks"), ("obstore", "everything"),
                                            ("icechunk", "chunks"), ("icechunk", "chunks, new repository")])
def test_retries_exhausted_name_the_object_and_the_status(s3_server, s3_prefix, s3_options, dask_client, cloud,
                                                         backend, where):
    pts, attrs = cloud
    key = f"{s3_prefix}/{'x.zv' if backend == 'obstore' else 'repo'}"
    state = None
    if backend == "icechunk" and "new" not in where:
        storage, state = _repo_with_a_commit(s3_server, key, s3_options, dask_client, pts)
    with ChaosProxy(s3_server.endpoint, slowdown=1.0, reset=0, only=_chunk_puts if "chunks" in where else _everything
                    ) as proxy:
        opts = s3_server.storage_options(endpoint=proxy.endpoint, max_retries=2)
        t0 = time.monotonic()
        with pytest.raises(Exception) as info:
            zv_dask.ingest(pts, f"s3://test/{key}", attributes=attrs, client=dask_client, storage_options=opts,
                           backend=None if backend == "obstore" else "icechunk", overwrite=state is not None, **JOB)
        took = time.monotonic() - t0
    err, counts = info.value, proxy.snapshot()
    msg = str(err).splitlines()[0]
    print(f"{took:.1f}s {counts}\n{err!r}"[:3000])
    assert took < 30
    if state is not None:
        assert _repo_state(storage) == state, "the branch as it was"
    assert counts.get("slowdown", 0) >= 3, counts  # the first attempt and 2 retries of one request at least
    assert not isinstance(err, zarr.errors.GroupNotFoundError), repr(err)
    assert "503" in msg, msg
    # the object: its S3 key (obstore), or its key in the repository (icechunk keeps chunks by id)
    named = rf"{re.escape(key)}/\S*(/c/|/chunks/|zarr\.json)" if backend == "obstore" else r"object 0/[\w/]+/c/[\d/]+"
    assert re.search(named, msg), msg
    assert isinstance(err, ZVError), repr(err)
