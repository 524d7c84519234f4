"""Shared fixtures: a real LocalCluster with worker processes, store paths, and reference helpers."""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings

import numpy as np
import pytest
from helpers import canon  # noqa: F401 - re-exported for tests that import it from conftest

warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")


SHM, SHM_MIN_FREE = "/dev/shm", 8 * 2**30


def pytest_configure(config):
    # obstore merges AWS_* variables into explicit credentials; tests never use the host's.
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[k]
    # A store is thousands of small files, and on a rate-limited virtual disk writing them costs more than
    # the work: a 3e4-point ingest with a 3-level pyramid and links took 9-12 s with its store on this
    # machine's disk, 1.6-1.9 s on tmpfs (16,331 files). So the tests' temporary directories are on
    # /dev/shm when it has room (xdist's workers get theirs below it), and removed at the end of the run;
    # --basetemp DIR, or ZV_TEST_TMP=disk, keeps them where pytest would.
    if (config.option.basetemp is None and not hasattr(config, "workerinput")
            and os.environ.get("ZV_TEST_TMP") != "disk" and os.path.isdir(SHM)
            and shutil.disk_usage(SHM).free > SHM_MIN_FREE):
        config.option.basetemp = config._zv_basetemp = tempfile.mkdtemp(prefix="zv-pytest-", dir=SHM)


def pytest_unconfigure(config):
    path = getattr(config, "_zv_basetemp", None)
    if path is not None:  # (the tests that mount a tmpfs in it unmount it themselves)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def dask_client(tmp_path_factory):
    """A real distributed cluster: 2 worker processes, 1 thread each, loopback only."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=":0",
                      scheduler_kwargs={"dashboard": False},
                      host="127.0.0.1", memory_limit="3GiB",
                      local_directory=str(tmp_path_factory.mktemp("dask"))) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture
def rng():
    return np.random.default_rng(12345)



# -- a real S3 server on loopback (SeaweedFS), see tests/s3server.py ------------------------
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS ``weed mini`` on random 127.0.0.1 ports, bucket ``test``, keys zvtestkey/zvtestsecret.

    One server per session. Fails (never skips) when ``weed`` is missing: the set-up installs it.
    Fault-injection tests may ``stop()``/``restart()`` it in place (same dir, ports and data).
    """
    from s3server import SeaweedS3

    srv = SeaweedS3.start(tmp_path_factory.mktemp("seaweedfs"))
    yield srv
    srv.stop()


@pytest.fixture
def s3_prefix(s3_server):
    """A fresh key prefix per test (isolation on the one shared server and bucket)."""
    import uuid

    if not s3_server.running:  # a previous test stopped it and did not bring it back
        s3_server.restart()
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_options(s3_server):
    """zv-dask ``storage_options`` for the test server (a new dict per test)."""
    return s3_server.storage_options()


@pytest.fixture(params=["local", "s3"])
def repo_target(request, tmp_path):
    """(url, storage_options, icechunk Storage) of a location with no icechunk repository yet."""
    import icechunk

    if request.param == "local":
        path = tmp_path / "repo"
        return str(path), None, icechunk.local_filesystem_storage(str(path))
    srv = request.getfixturevalue("s3_server")
    prefix = request.getfixturevalue("s3_prefix")
    return srv.url(prefix, "repo"), srv.storage_options(), srv.icechunk_storage(f"{prefix}/repo")
