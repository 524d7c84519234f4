"""run_tasks on a real cluster: results are handed on as each task finishes, bar or no bar (a job's
checkpoints: with the bar on they used to wait for the whole stage)."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from dask import delayed

from zv_dask.scheduling import run_tasks


def _wait_for(path: str, seconds: float = 60.0) -> bool:
    """Block until ``path`` exists (True) or ``seconds`` pass (False)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if os.path.exists(path):
            return True
        time.sleep(0.05)
    return False


def _quick(i):
    return i


def _waits_for_the_first_result(marker):
    return "saw the first result" if _wait_for(marker) else "timed out"


@pytest.mark.parametrize("progress", [False, True])
def test_each_result_is_handed_on_while_the_others_still_run(dask_client, tmp_path, progress, capsys):
    """The slow task waits for a file that on_result writes for the quick one: it can only see it if results
    are handed on as they come (a job's checkpoints), with the progress bar on too."""
    marker = str(tmp_path / "first-result")
    seen = []

    def on_result(i, result):
        seen.append(result)
        if result == 0:
            open(marker, "w").close()

    # Keys unique to this run: with fixed names the scheduler may still hold the other parametrisation's
    # "slow" result when this one is submitted, and hands it back at once (seen in CI: the flake this was).
    run = uuid.uuid4().hex
    objs = [delayed(_waits_for_the_first_result)(marker, dask_key_name=f"slow-{run}"),
            delayed(_quick)(0, dask_key_name=f"quick-{run}")]
    out = run_tasks(objs, dask_client, progress=progress, label="probe", on_result=on_result)
    assert out == ["saw the first result", 0]
    assert seen == [0, "saw the first result"]
    if progress:
        err = capsys.readouterr().err
        assert "probe" in err  # the bar (a terminal) or the two log lines (pytest's captured stderr)


@pytest.mark.parametrize("progress", [False, True])
def test_in_process_results_are_handed_on_as_each_task_ends(tmp_path, progress):
    """Threads in this process (no client): the same probe, so a job run without a cluster checkpoints each
    finished group and pyramid task as it ends, not after the whole stage."""
    import dask

    marker = str(tmp_path / "first-result")
    seen = []

    def on_result(i, result):
        seen.append((i, result))
        if result == 0:
            open(marker, "w").close()

    run = uuid.uuid4().hex
    objs = [delayed(_waits_for_the_first_result)(marker, dask_key_name=f"slow-{run}"),
            delayed(_quick)(0, dask_key_name=f"quick-{run}")]
    with dask.config.set(scheduler="threads", num_workers=2):
        out = run_tasks(objs, None, progress=progress, label="probe", on_result=on_result)
    assert out == ["saw the first result", 0]
    assert seen == [(1, 0), (0, "saw the first result")]


def test_a_job_in_this_process_never_imports_distributed(tmp_path):
    """Threads in this process (the CLI's default) keep ``distributed`` unimported: Dask imports it (about
    0.15 s of a small job's start-up) whenever a scheduler is set by name, so the CLI sets the function."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, zv_dask\n"
        "from zv_dask.scheduling import local_scheduler\n"
        "pts = np.random.default_rng(0).uniform(0, 100, (5000, 3))\n"
        "with local_scheduler('threads'):\n"
        f"    zv_dask.ingest(pts, {str(tmp_path / 's.zv')!r}, chunk_shape=25, pyramid=True)\n"
        f"assert zv_dask.open_store({str(tmp_path / 's.zv')!r}).levels[:2] == [0, 1]\n"
        "print('distributed' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def _blocks(path: str) -> str:
    return "released" if _wait_for(path, 120) else "timed out"


def test_a_failed_tasks_error_that_never_comes_is_waited_for_a_bounded_time(dask_client, tmp_path, monkeypatch):
    """gather_or_stop fetches a failed task's error with a bound: a future whose result never comes (as after
    a killed worker, dask/distributed#7331) raises a RuntimeError naming it instead of hanging the job."""
    from zv_dask import transaction

    monkeypatch.setattr(transaction, "_ERROR_WAIT", 1.0)
    release = str(tmp_path / "release")
    fut = dask_client.submit(_blocks, release, key=f"never-{uuid.uuid4().hex}")
    try:
        t = time.monotonic()
        with pytest.raises(RuntimeError, match="did not hand back its error in 1 s"):
            transaction._raise_failed(fut)
        assert time.monotonic() - t < 30
    finally:
        open(release, "w").close()
    assert fut.result(timeout=60) == "released"
