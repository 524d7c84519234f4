"""A pyramid rebuild on a local store keeps the old levels until the new ones are complete.

Real SIGKILLs of the CLI (``ZV_DASK_KILL_AT``) and real task failures (``ZV_DASK_FAIL_AT``): after
each, the store is byte for byte what it was (its journal aside), still valid, and ``--resume``
makes it what an uninterrupted rebuild makes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import reference_validate, tree_bytes

import zv_dask
from zv_dask.store.journal import JOURNAL_DIR

BIN = Path(sys.executable).parent / "zv-dask"
OLD = ["--levels", "3", "--links", "explicit"]
NEW = ["--levels", "2", "--levels-per-task", "1", "--points-per-task", "4000", "--links", "implicit"]
RUN = ["--scheduler", "synchronous", "-q"]


def _cli(*args, env=None):
    e = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=300, env=e)


def _store_bytes(store: Path) -> dict:
    """Every file of the store but its job journal."""
    return {k: v for k, v in tree_bytes(store).items() if not k.startswith(JOURNAL_DIR)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """A store with a 3-level pyramid and explicit links, and what rebuilding it with NEW makes."""
    d = tmp_path_factory.mktemp("rebuild")
    pts = np.random.default_rng(3).uniform(0, 1000, (60_000, 3)).astype(np.float32)
    np.save(d / "p.npy", pts)
    old = d / "old.zv"
    assert _cli("ingest", d / "p.npy", old, "--chunk-shape", "250", "--bin-shape", "25", *OLD, *RUN).returncode == 0
    want = d / "want.zv"
    shutil.copytree(old, want)
    p = _cli("pyramid", want, *NEW, *RUN)
    assert p.returncode == 0, p.stderr
    assert [lv["level"] for lv in zv_dask.store_info(str(want))["levels"]] == [0, 1, 2]
    return old, want


@pytest.mark.parametrize("how", ["kill:pyramid:1", "kill:commit", "fail:level:2"])
def test_an_interrupted_rebuild_leaves_the_old_levels(stores, tmp_path, how):
    old, want = stores
    store = tmp_path / "s.zv"
    shutil.copytree(old, store)
    before = _store_bytes(store)
    kind, point = how.split(":", 1)
    env = {"ZV_DASK_KILL_AT": point} if kind == "kill" else {"ZV_DASK_FAIL_AT": point}
    p = _cli("pyramid", store, *NEW, *RUN, env=env)
    assert p.returncode == (-signal.SIGKILL if kind == "kill" else 1), p.stderr
    assert _store_bytes(store) == before  # the old pyramid, byte for byte: levels 1-3 and level 0's links
    assert reference_validate(store) == []
    assert len(zv_dask.read_points(str(store), level=3).compute()) > 0
    if kind == "fail":
        assert "--resume" in p.stderr
    p = _cli("pyramid", store, *NEW, "--resume", *RUN)
    assert p.returncode == 0, p.stderr
    assert _store_bytes(store) == _store_bytes(want) and not (store / JOURNAL_DIR).exists()


def test_a_rebuild_killed_during_the_swap_is_finished_by_resume(stores, tmp_path):
    old, want = stores
    store = tmp_path / "s.zv"
    shutil.copytree(old, store)
    assert _cli("pyramid", store, *NEW, *RUN, env={"ZV_DASK_KILL_AT": "swap"}).returncode == -signal.SIGKILL
    assert not (store / "1").exists()  # halfway: the old levels aside, the new ones not yet in
    p = _cli("pyramid", store, *NEW, "--resume", *RUN)
    assert p.returncode == 0, p.stderr
    assert _store_bytes(store) == _store_bytes(want) and reference_validate(store) == []


def test_a_rebuild_leaves_level_0_as_it_was(stores, tmp_path):
    """Only the coarse levels, level 0's links and the two documents change; level 0's cells are the same files."""
    old, want = stores
    a, b = _store_bytes(old), _store_bytes(want)
    changed = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
    assert all(k.split("/")[0] != "0" or k.startswith("0/links/") or k == "0/zarr.json" for k in changed)
    assert any(k.startswith("0/vertices/c/") for k in a) and all(a[k] == b[k] for k in a if k.startswith("0/vert"))
