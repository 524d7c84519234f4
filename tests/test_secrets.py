"""No credential in a log, report, exception, task key, graph, file, object or dashboard page.

Everything here is real: a SeaweedFS S3 server on 127.0.0.1 started with keys of its own (a
random secret that nothing else on the machine holds, so finding it anywhere is a leak), a
``LocalCluster`` of worker processes with the dashboard on 127.0.0.1, the ``zv-dask`` command
line as a subprocess, and a cluster of ``dask scheduler`` / ``dask worker`` processes with an
environment of their own. Each job's outputs, the bucket (every object listed and read), the
files a job writes (its journal, scratch, the workers' local directories), the scheduler's and
workers' logs, the task keys, the graph (keys and reprs) and the dashboard's pages are searched
for the secret.

What travels is pinned too: a scheduler plugin pickles every task the scheduler receives, as it
is sent to a worker. With explicit keys in the storage options the keys are in those payloads
(obstore's store pickles its configuration; icechunk's fork its storage's credentials; the
storage options ride along for the scratch space and the journal): the workers need them. With
no keys (each process reads its own ``AWS_*``) or with :class:`zv_dask.ClientCredentials` /
``-S worker_credentials=env`` (the client's keys stay in the client) no payload holds them and
the workers sign with their own environment.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from distributed.diagnostics.plugin import SchedulerPlugin

import zv_dask
from zv_dask.store.credentials import ClientCredentials, icechunk_credentials, prepare_credentials, redact

pytestmark = pytest.mark.s3

# Keys of this module's own server: distinctive, random, in nothing but what the test gives them to.
SECRET = "zvS3cr3t" + uuid.uuid4().hex
KEY = "zvKEY" + uuid.uuid4().hex[:12].upper()
# The workers' own environment: the same keys, and no way to ask anything but 127.0.0.1 for others.
NO_METADATA = {"AWS_EC2_METADATA_DISABLED": "true", "AWS_METADATA_ENDPOINT": "http://127.0.0.1:9",
               "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:9"}
WORKER_ENV = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, **NO_METADATA}
JOB = dict(chunk_shape=(50.0, 50.0, 50.0), base_bin_shape=(12.5, 12.5, 12.5), partition_rows=2000,
           group_points=1000)
N = 12_000
PYTHON = sys.executable


# -- the places searched ---------------------------------------------------------------------------
def _as_bytes(v) -> bytes:
    return v if isinstance(v, (bytes, bytearray, memoryview)) and not isinstance(v, str) else str(v).encode()


def leaks(places: dict, secret: str = SECRET) -> list[str]:
    """The names of the places (name -> text or bytes) that hold ``secret``."""
    s = secret.encode()
    return sorted(name for name, v in places.items() if s in bytes(_as_bytes(v)))


def files_under(*roots) -> dict:
    out = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            continue
        for p in [root] if root.is_file() else root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    out[f"file {p}"] = p.read_bytes()
                except OSError:
                    pass
    return out


def bucket_objects(srv, prefix: str) -> dict:
    """Every object under ``prefix`` of the test bucket, read whole (metadata, chunks, journal, scratch)."""
    import obstore

    store = srv.obstore()
    out = {}
    for batch in obstore.list(store, prefix=prefix):
        for meta in batch:
            out[f"s3 {meta['path']}"] = bytes(obstore.get(store, meta["path"]).bytes())
    return out


def logs_of(client) -> dict:
    out = {"scheduler log": "\n".join(f"{lvl} {msg}" for lvl, msg in client.get_scheduler_logs(n=10_000))}
    for w, lines in client.get_worker_logs(n=10_000).items():
        out[f"worker log {w}"] = "\n".join(f"{lvl} {msg}" for lvl, msg in lines)
    for w, lines in client.get_worker_logs(n=10_000, nanny=True).items():
        out[f"nanny log {w}"] = "\n".join(f"{lvl} {msg}" for lvl, msg in lines)
    return out


def dashboard_pages(cluster, keys=()) -> dict:
    """The dashboard's server-rendered pages (loopback): status, workers, logs, exceptions, each worker, tasks."""
    base = cluster.dashboard_link.rsplit("/status", 1)[0]
    assert urllib.parse.urlparse(base).hostname == "127.0.0.1", base
    paths = ["/status", "/info/main/workers.html", "/info/main/logs.html", "/info/main/exceptions.html",
             "/json/index.html", "/json/identity.json", "/json/counts.json"]
    for w in cluster.scheduler.workers:
        q = urllib.parse.quote(w, safe="")
        paths += [f"/info/worker/{q}.html", f"/info/logs/{q}.html", f"/info/call-stacks/{q}.html"]
    paths += [f"/info/task/{urllib.parse.quote(str(k), safe='')}.html" for k in keys]
    out = {}
    for path in paths:
        try:
            with urllib.request.urlopen(base + path, timeout=20) as r:
                out[f"dashboard {path}"] = r.read()
        except urllib.error.HTTPError as e:  # (identity.json fails on tuple keys in distributed): its page too
            out[f"dashboard {path} ({e.code})"] = e.read()
    assert sum(not k.endswith(")") for k in out) >= len(paths) - 2, sorted(out)
    # what the Bokeh pages show (task stream, progress, graph, workers) comes over a websocket: pull it
    from bokeh.client import pull_session

    for app in ("/status", "/graph", "/tasks", "/workers"):
        with pull_session(url=base + app) as session:
            out[f"dashboard document {app}"] = repr(session.document.to_json())
    return out


def error_texts(e: BaseException) -> dict:
    return {"str(error)": str(e), "repr(error)": repr(e),
            "traceback": "".join(traceback.format_exception(type(e), e, e.__traceback__))}


class PayloadAudit(SchedulerPlugin):
    """On the scheduler: each task's key, repr, and whether its pickle (what a worker receives) holds a secret."""

    name = "zv-dask-secret-audit"

    def __init__(self, secrets):
        self.secrets = [s.encode() for s in secrets]
        self.clear()

    def clear(self):
        self.keys: list[str] = []
        self.reprs: list[str] = []
        self.carrying: list[str] = []  # keys of tasks whose payload holds a secret
        self.errors: list[str] = []

    def update_graph(self, scheduler, *, keys, tasks=None, **kwargs):
        from distributed.protocol.pickle import dumps

        for k in tasks or keys:
            ts = scheduler.tasks.get(k)
            if ts is None:
                continue
            self.keys.append(f"{k!s} {k!r}")
            self.reprs.append(f"{ts.run_spec!r} {ts.run_spec!s}")
            try:
                b = dumps(ts.run_spec)
            except Exception as e:  # noqa: BLE001 - say it, the test fails on it
                self.errors.append(f"{k}: {type(e).__name__}: {e}")
                continue
            if any(s in b for s in self.secrets):
                self.carrying.append(str(k))

    def places(self) -> dict:
        return {"task keys (scheduler)": "\n".join(self.keys), "task reprs (scheduler)": "\n".join(self.reprs)}


# -- fixtures: a server with its own keys, a cluster whose workers have them in their environment ----
@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from s3server import SeaweedS3

    s = SeaweedS3.start(tmp_path_factory.mktemp("seaweedfs-secrets"), access_key=KEY, secret_key=SECRET)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = tmp_path_factory.mktemp("dask-secrets")
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", memory_limit="2GiB", local_directory=str(local),
                      env=dict(WORKER_ENV)) as c:
        c.local_dir = local
        audit = PayloadAudit([SECRET])
        c.scheduler.add_plugin(audit)
        c.audit = audit
        yield c


@pytest.fixture
def client(cluster):
    with Client(cluster) as cl:
        cluster.audit.clear()
        yield cl


@pytest.fixture
def points():
    rng = np.random.default_rng(7)
    return rng.uniform(0, 100, (N, 3)).astype("f4"), {"intensity": rng.integers(0, 65535, N).astype("u2")}


@pytest.fixture
def prefix():
    return f"sec-{uuid.uuid4().hex[:10]}"


def _setenv(name: str, value: str | None) -> None:
    """(run on the workers) set or remove one of their environment variables."""
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def _keys_out_of_the_process(monkeypatch):
    """This (client) process has no AWS_* keys: what it signs with comes from the storage options."""
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    for k, v in NO_METADATA.items():
        monkeypatch.setenv(k, v)


def _graph_places(job) -> dict:
    dsk = dict(job.__dask_graph__())
    import dask.base

    expr = dask.base.collections_to_expr([job])
    return {"lazy graph": "\n".join(f"{k!s} {k!r}: {v!s} {v!r}" for k, v in dsk.items()),
            "lazy expr": f"{expr!r} {expr!s}", "lazy job repr": f"{job!r} {job!s}"}


def _api_job(client, srv, url, opts, pts, attrs, tmp_path, *, backend=None):
    """ingest (staged shuffle) + build_pyramid + read_points + store_info + store_stats + validate + export."""
    places = {}
    with get_task_stream(client=client) as ts:
        rep = zv_dask.ingest(pts, url, attributes=attrs, storage_options=opts, client=client, backend=backend,
                             memory_budget="256KiB", **JOB)
        zs = zv_dask.open_store(url, "r+", storage_options=opts, backend=backend)
        pyr = zv_dask.build_pyramid(zs, levels=2, client=client)
        got = zv_dask.read_points(url, level=1, storage_options=opts, backend=backend)
        info = zv_dask.store_info(url, storage_options=opts, backend=backend)
        stats = zv_dask.store_stats(url, storage_options=opts, backend=backend)
        check = zv_dask.validate_store(url, storage_options=opts, backend=backend)
        exp = zv_dask.export(url, tmp_path / "out.parquet", storage_options=opts, backend=backend, client=client)
    assert rep.points_written == N and rep.shuffle == "staged", rep
    assert check.ok, check.errors
    assert len(got) > 0
    assert exp["points"] == N
    places.update({"ingest report repr": repr(rep), "ingest report json": json.dumps(rep.to_dict(), default=str),
                   "pyramid report": f"{pyr!r} {pyr!s}", "store repr": f"{zs!r} {zs!s} {zs.backend!r}",
                   "info": json.dumps(info, default=str), "stats": repr(stats), "validation": check.to_json(),
                   "export summary": json.dumps(exp, default=str), "read frame": got.to_string()[:100_000],
                   "task stream keys": "\n".join(f"{t['key']!s} {t['key']!r}" for t in ts.data),
                   "task prefixes": "\n".join(map(str, client.cluster.scheduler.task_prefixes))})
    return rep, places


# -- 1. a whole job with explicit keys, from Python --------------------------------------------------------
def test_a_whole_job_with_keys_shows_them_nowhere(srv, cluster, client, points, prefix, tmp_path, capfd,
                                                    monkeypatch):
    _keys_out_of_the_process(monkeypatch)
    pts, attrs = points
    opts = srv.storage_options()
    url = srv.url(prefix, "a.zv")
    rep, places = _api_job(client, srv, url, opts, pts, attrs, tmp_path)

    lazy = zv_dask.ingest(pts[:3000], srv.url(prefix, "lazy.zv"), attributes={k: v[:3000] for k, v in attrs.items()},
                          storage_options=opts, compute=False, **JOB)
    places.update(_graph_places(lazy))
    fut = client.compute(lazy)  # held while the dashboard is read: its task page is there
    lrep = fut.result()
    places["lazy report"] = repr(lrep) + json.dumps(lrep.to_dict(), default=str)
    places.update(dashboard_pages(cluster, keys=[fut.key]))
    del fut

    places.update(cluster.audit.places())
    places.update(logs_of(client))
    places.update(bucket_objects(srv, prefix))
    places.update(files_under(tmp_path, cluster.local_dir, Path(tempfile.gettempdir()) / "zv-dask-scratch"))
    out, err = capfd.readouterr()
    places.update({"stdout": out, "stderr": err})
    # the places are not empty: the bucket holds the store, the dashboard's task stream shows the job's tasks
    assert len(places) > 100 and sum(k.startswith("s3 ") for k in places) > 50
    assert "stage_task" in places["dashboard document /status"] and "write" in places["task stream keys"]
    assert leaks(places) == []
    # What travels: the write tasks carry the keys (the store's pickled configuration), and so does the lazy
    # job's one task (its storage options): the workers have nothing else to sign with.
    assert not cluster.audit.errors
    assert any(k.startswith("write") for k in cluster.audit.carrying), cluster.audit.carrying[:5]
    assert any(k.startswith("zv-dask-ingest") for k in cluster.audit.carrying)


# -- 2. icechunk on S3: the fork carries its credentials; nothing shows them -------------------------------
def test_icechunk_job_with_keys_shows_them_nowhere(srv, cluster, client, points, prefix, tmp_path, capfd,
                                                   monkeypatch):
    import icechunk

    _keys_out_of_the_process(monkeypatch)
    pts, attrs = points
    opts = srv.storage_options()
    url = srv.url(prefix, "repo")
    rep, places = _api_job(client, srv, url, opts, pts, attrs, tmp_path, backend="icechunk")
    assert rep.snapshot_id
    zs = zv_dask.open_store(url, "r+", storage_options=opts, backend="icechunk")
    fork = zs.session.fork()
    places.update({"fork repr": f"{fork!r} {fork!s}", "session repr": f"{zs.session!r}",
                   "repository repr": f"{zs.backend.repository!r}",
                   "storage repr": f"{zs.backend.repository.storage!r}"})
    assert SECRET.encode() in pickle.dumps(fork), "icechunk's fork carries its static credentials"
    places.update(dashboard_pages(cluster))
    places.update(cluster.audit.places())
    places.update(logs_of(client))
    places.update(bucket_objects(srv, prefix))
    places.update(files_under(tmp_path, cluster.local_dir))
    out, err = capfd.readouterr()
    places.update({"stdout": out, "stderr": err})
    assert leaks(places) == []
    assert any(k.startswith("write") for k in cluster.audit.carrying)  # forks, as sent to the workers
    assert isinstance(fork, icechunk.ForkSession)


# -- 3. failed jobs: the errors, their tracebacks and what they leave -------------------------------------------
def test_failed_jobs_name_no_secret(srv, cluster, client, points, prefix, tmp_path, capfd, monkeypatch):
    _keys_out_of_the_process(monkeypatch)
    pts, attrs = points
    wrong = "zvWR0NG" + uuid.uuid4().hex
    cases = {
        "wrong secret": ({**srv.storage_options(), "secret_access_key": wrong, "max_retries": 0}, None),
        "unreachable endpoint": ({**srv.storage_options(), "endpoint": "http://127.0.0.1:9", "max_retries": 0,
                                  "connect_timeout": "1s", "timeout": "2s"}, None),
        "wrong secret, icechunk": ({**srv.storage_options(), "secret_access_key": wrong, "max_retries": 0},
                                   "icechunk"),
    }
    places = {}
    for name, (opts, backend) in cases.items():
        with pytest.raises(Exception) as e:
            zv_dask.ingest(pts, srv.url(prefix, name.replace(" ", "-").replace(",", "")), attributes=attrs,
                           storage_options=opts, backend=backend, client=client, **JOB)
        places.update({f"{name}: {k}": v for k, v in error_texts(e.value).items()})
    # a task that fails on a worker, mid-write on S3 (the job's journal stays for --resume: searched too)
    client.run(_setenv, "ZV_DASK_FAIL_AT", "group:0")
    try:
        with pytest.raises(Exception) as e:
            zv_dask.ingest(pts, srv.url(prefix, "task.zv"), attributes=attrs, storage_options=srv.storage_options(),
                           client=client, **JOB)
    finally:
        client.run(_setenv, "ZV_DASK_FAIL_AT", None)
    assert "injected failure" in str(e.value)
    places.update({f"task failure: {k}": v for k, v in error_texts(e.value).items()})
    places.update(dashboard_pages(cluster))  # exceptions.html shows the failed task's exception and traceback
    places.update(logs_of(client))
    places.update(bucket_objects(srv, prefix))
    assert any("/.zv-job" in k or "zv-job" in k for k in places if k.startswith("s3 ")), sorted(places)[:20]
    out, err = capfd.readouterr()
    places.update({"stdout": out, "stderr": err})
    assert leaks(places) == [] and leaks(places, wrong) == []
    assert "SignatureDoesNotMatch" in str(places["wrong secret: str(error)"]) or "ermission" in str(
        places["wrong secret: str(error)"]) or "403" in str(places["wrong secret: str(error)"])


# -- 4. the command line: keys on it are printed nowhere ---------------------------------------------------------
def _cli(args, env, cwd, timeout=240):
    return subprocess.run([PYTHON, "-m", "zv_dask", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def _cli_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(NO_METADATA)
    env["DASK_TEMPORARY_DIRECTORY"] = str(tmp_path / "dask-tmp")  # the CLI cluster's worker directories
    env["TMPDIR"] = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(extra)
    return env


def test_cli_job_with_keys_prints_them_nowhere(srv, points, prefix, tmp_path):
    pts, _ = points
    np.save(tmp_path / "pts.npy", pts)
    s = [f"-S{kv}" for kv in (f"endpoint={srv.endpoint}", "region=us-east-1", f"access_key_id={KEY}",
                              f"secret_access_key={SECRET}", "allow_http=true")]
    env = _cli_env(tmp_path)
    run = _cli(["ingest", "pts.npy", srv.url(prefix, "cli.zv"), "--chunk-shape", "50", "--bin-shape", "12.5",
                "--levels", "2", "--workers", "2", "--dashboard", "--json", "--debug", *s], env, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout)["points_written"] == N and "Dask dashboard at http://127.0.0.1:" in run.stderr
    places = {"ingest stdout": run.stdout, "ingest stderr": run.stderr}
    for cmd in (["info", "--stats"], ["validate"], ["export", "--level", "1", "--overwrite"]):
        extra = ["out.parquet"] if cmd[0] == "export" else []
        r = _cli([cmd[0], srv.url(prefix, "cli.zv"), *extra, *cmd[1:], "--json", "--debug", *s], env, tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        places.update({f"{cmd[0]} stdout": r.stdout, f"{cmd[0]} stderr": r.stderr})
    # failures with --debug print a traceback: the secret given is in none of them
    wrong = [a.replace(SECRET, SECRET[::-1]) for a in s]
    for name, args in {"wrong secret": ["info", srv.url(prefix, "cli.zv"), "--json", "--debug", *wrong],
                       "unreachable": ["info", srv.url(prefix, "cli.zv"), "--debug", *s, "-Sendpoint=http://127.0.0.1:9",
                                       "-Smax_retries=0", "-Sconnect_timeout=1s"],
                       "malformed option": ["info", srv.url(prefix, "cli.zv"), f"-Ssecret_access_key:{SECRET}"],
                       "bad option value": ["info", srv.url(prefix, "cli.zv"), "--debug", *s,
                                            f"-Sskip_signature={SECRET}"],
                       "failed task": ["ingest", "pts.npy", srv.url(prefix, "fail.zv"), "--chunk-shape", "50",
                                       "--no-pyramid", "--scheduler", "threads", "--debug", *s]}.items():
        r = _cli(args, {**env, "ZV_DASK_FAIL_AT": "group:0"} if name == "failed task" else env, tmp_path)
        assert r.returncode in (1, 2), (name, r.returncode, r.stderr[-2000:])
        places.update({f"{name} stdout": r.stdout, f"{name} stderr": r.stderr})
    assert "Traceback" in places["wrong secret stderr"] and "Traceback" in places["failed task stderr"]
    places.update(bucket_objects(srv, prefix))
    places.update(files_under(tmp_path))
    assert leaks(places) == [] and leaks(places, SECRET[::-1]) == []


# -- 5. secrets that need not travel: the workers' own environment ----------------------------------------------
def _small_job(client, url, opts, pts, attrs, backend=None, **kw):
    rep = zv_dask.ingest(pts, url, attributes=attrs, storage_options=opts, client=client, backend=backend,
                         pyramid={"levels": 1}, **{**JOB, **kw})
    assert rep.points_written == len(pts)
    check = zv_dask.validate_store(url, storage_options=opts, backend=backend)
    assert check.ok, check.errors
    return rep


def test_without_keys_each_process_uses_its_own_environment(srv, cluster, client, points, prefix, monkeypatch):
    """Today's behaviour, pinned: no keys in the storage options -> nothing secret in any task."""
    pts, attrs = points
    _keys_out_of_the_process(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)  # the client's own environment, as the workers have theirs
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    opts = {k: v for k, v in srv.storage_options().items() if k not in ("access_key_id", "secret_access_key")}
    rep = _small_job(client, srv.url(prefix, "env.zv"), opts, pts, attrs, memory_budget="256KiB")
    assert rep.shuffle == "staged"
    _small_job(client, srv.url(prefix, "env-repo"), opts, pts, attrs, backend="icechunk")
    assert cluster.audit.keys and not cluster.audit.errors
    assert cluster.audit.carrying == []


def test_client_credentials_stay_in_the_client(srv, cluster, client, points, prefix, tmp_path, monkeypatch,
                                               capfd):
    """The client signs with its keys, the workers with theirs: no task, graph or pickle holds the client's."""
    pts, attrs = points
    _keys_out_of_the_process(monkeypatch)
    creds = ClientCredentials(KEY, SECRET)
    opts = {k: v for k, v in srv.storage_options().items() if k not in ("access_key_id", "secret_access_key")}
    opts["credential_provider"] = creds
    assert SECRET not in repr(creds) and SECRET.encode() not in pickle.dumps(opts)
    assert pickle.loads(pickle.dumps(creds)) is not None  # in this process it is itself...
    other = subprocess.run([PYTHON, "-c", "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read()))"],
                           input=pickle.dumps(creds), capture_output=True)
    assert other.stdout.strip() == b"None", other.stderr  # ...anywhere else, nothing

    rep = _small_job(client, srv.url(prefix, "cc.zv"), opts, pts, attrs, memory_budget="256KiB")
    assert rep.shuffle == "staged"
    rep = _small_job(client, srv.url(prefix, "cc-repo"), opts, pts, attrs, backend="icechunk")
    assert rep.snapshot_id
    zs = zv_dask.open_store(srv.url(prefix, "cc-repo"), "r+", storage_options=opts, backend="icechunk")
    assert SECRET.encode() not in pickle.dumps(zs.session.fork())
    lazy = zv_dask.ingest(pts, srv.url(prefix, "cc-lazy.zv"), attributes=attrs, storage_options=opts,
                          compute=False, **JOB)
    assert client.compute(lazy).result().points_written == N  # its driver runs on a worker, on the worker's keys
    assert cluster.audit.keys and not cluster.audit.errors
    assert cluster.audit.carrying == []
    out, err = capfd.readouterr()
    assert leaks({"stdout": out, "stderr": err, **cluster.audit.places(), **logs_of(client)}) == []

    # the workers really sign with their own environment: with a wrong secret there, the tasks fail
    wrong = "zvW0RKERenv" + uuid.uuid4().hex
    client.run(_setenv, "AWS_SECRET_ACCESS_KEY", wrong)
    try:
        with pytest.raises(Exception) as e:
            zv_dask.ingest(pts, srv.url(prefix, "cc-bad.zv"), attributes=attrs, storage_options={
                **opts, "max_retries": 0}, client=client, **JOB)
    finally:
        client.run(_setenv, "AWS_SECRET_ACCESS_KEY", SECRET)
    text = error_texts(e.value)
    assert "403" in text["str(error)"] or "ermission" in text["str(error)"] or "Signature" in text["str(error)"], text
    assert leaks(text) == [] and leaks(text, wrong) == []


def _dask_cli(*args) -> list[str]:
    return [str(Path(PYTHON).parent / "dask"), *args]


def test_a_real_cluster_with_keys_in_its_workers_environment(srv, points, prefix, tmp_path):
    """``dask scheduler`` and ``dask worker`` processes with an environment and directories of their own; the
    command line gives its keys with ``-S worker_credentials=env``: the job runs, and only the client had them."""
    pts, _ = points
    np.save(tmp_path / "pts.npy", pts)
    for d in ("sched", "work", "client"):
        (tmp_path / d).mkdir()
    sched_file = tmp_path / "sched" / "scheduler.json"
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    base.update(NO_METADATA, DASK_DISTRIBUTED__WORKER__DAEMON="False")
    procs = []
    try:
        procs.append(subprocess.Popen(_dask_cli("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                                "--scheduler-file", str(sched_file)), cwd=tmp_path / "sched", env=base,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "sched" / "log", "wb")))
        deadline = time.monotonic() + 60
        while not sched_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.append(subprocess.Popen(_dask_cli("worker", "--scheduler-file", str(sched_file), "--nworkers", "2",
                                                "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                                                "--memory-limit", "2GiB", "--local-directory", str(tmp_path / "work")),
                                      cwd=tmp_path / "work", env={**base, **WORKER_ENV}, stdout=subprocess.DEVNULL,
                                      stderr=open(tmp_path / "work" / "log", "wb")))
        with Client(scheduler_file=str(sched_file), timeout="60s") as cl:
            cl.wait_for_workers(2, timeout=60)
            s = [f"-S{kv}" for kv in (f"endpoint={srv.endpoint}", "region=us-east-1", "allow_http=true",
                                      "worker_credentials=env", f"access_key_id={KEY}", f"secret_access_key={SECRET}")]
            env = _cli_env(tmp_path / "client")
            run = _cli(["ingest", str(tmp_path / "pts.npy"), srv.url(prefix, "real.zv"), "--chunk-shape", "50",
                        "--bin-shape", "12.5", "--levels", "1", "--scheduler-file", str(sched_file), "--json",
                        "--debug", *s], env, tmp_path / "client")
            assert run.returncode == 0, run.stderr[-3000:]
            assert json.loads(run.stdout)["points_written"] == N
            info = _cli(["info", srv.url(prefix, "real.zv"), "--json", *s], env, tmp_path / "client")
            assert info.returncode == 0, info.stderr[-2000:]
            places = {"ingest stdout": run.stdout, "ingest stderr": run.stderr, "info": info.stdout + info.stderr,
                      **logs_of(cl)}
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        places.update(files_under(tmp_path / "client", tmp_path / "sched"))
        assert leaks(places) == []
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_worker_credentials_option():
    import icechunk

    """``worker_credentials=env`` (the command line's spelling) -> a ClientCredentials; checked, idempotent."""
    opts = prepare_credentials({"endpoint": "http://127.0.0.1:9", "access_key_id": KEY, "secret_access_key": SECRET,
                                "session_token": "", "worker_credentials": "env"})
    cc = opts["credential_provider"]
    assert isinstance(cc, ClientCredentials) and cc() == {"access_key_id": KEY, "secret_access_key": SECRET,
                                                          "token": None, "expires_at": None}
    assert set(opts) == {"endpoint", "credential_provider"} and prepare_credentials(opts) is opts
    assert prepare_credentials({"worker_credentials": "env"}) == {}
    for bad in ({"worker_credentials": "client"}, {"worker_credentials": "env", "access_key_id": KEY}):
        with pytest.raises(zv_dask.StoreError) as e:
            prepare_credentials({**bad, "secret_access_key_typo": SECRET})
        assert SECRET not in str(e.value)
    ice = icechunk_credentials({"bucket": "b", "credential_provider": cc})
    assert set(ice) == {"bucket", "get_credentials"} and SECRET.encode() not in pickle.dumps(ice)
    assert isinstance(ice["get_credentials"](), icechunk.S3StaticCredentials)  # this process: the client's keys
    assert icechunk_credentials({"bucket": "b", "credential_provider": None}) == {"bucket": "b"}
    assert redact(f"x {SECRET} y", {"credential_provider": cc}) == "x *** y"
    assert redact(f"x {SECRET} y", {"secret_access_key": SECRET}) == "x *** y"
