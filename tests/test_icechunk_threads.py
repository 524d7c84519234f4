"""Issue 19's hang: ``ingest(points, repo, chunk_shape=125, backend="icechunk")`` without a client.

With dask's threaded scheduler the write tasks of a stage share one icechunk fork. zarr names its
store in every array it opens (``str(store_path)``, on zarr's event-loop thread), and
``IcechunkStore.__str__`` waits for the session lock while holding the GIL, while a ``set`` of
another task holds that lock and waits for the GIL: a deadlock (benchmarks/results/
icechunk_str_deadlock.md). The fix hands tasks a store whose ``str`` does not call into icechunk
(:func:`zv_dask.transaction.worker_store`).

The case runs ``ZV_SOAK_RUNS`` times (default 20) in one subprocess under a watchdog
(``faulthandler.dump_traceback_later``,
which prints every thread's stack and exits 1), so that a hang fails the test instead of blocking
it. Several write tasks must be in flight at once for the hang to be possible: 2e4 points are one
task by zv-dask's defaults, so ``group_points`` splits them into 16, on 4 threads. Without the fix
this loop hung in 9 of 9 tries (after 4 to 45 ingests), and this test against the unfixed code after
1, 1 and 11 (benchmarks/results/icechunk_str_deadlock.md): 20 runs in CI, more by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

RUNS = int(os.environ.get("ZV_SOAK_RUNS", "20"))
POINTS = 20_000
GROUPS = 16
PER_RUN_TIMEOUT = 60  # s; a normal run takes 0.3-0.6 s here

CHILD = textwrap.dedent("""
    import faulthandler, shutil, sys
    import dask
    import numpy as np
    import zv_dask

    runs, points, groups, timeout = (int(a) for a in sys.argv[1:5])
    with dask.config.set(scheduler="threads", num_workers=4):
        for i in range(runs):
            faulthandler.dump_traceback_later(timeout, exit=True)
            pts = np.random.default_rng(i).uniform(0, 1000, size=(points, 3))
            rep = zv_dask.ingest(pts, f"repo{i}", chunk_shape=125, backend="icechunk",
                                 group_points=-(-points // groups))
            faulthandler.cancel_dump_traceback_later()
            assert rep.points_written == points and rep.groups >= groups // 2, (rep.points_written, rep.groups)
            assert rep.scheduler.startswith("threads"), rep.scheduler
            shutil.rmtree(f"repo{i}")
            print(f"run {i} ok", flush=True)
    print("all runs ok", flush=True)
""")


def test_threaded_icechunk_ingest_does_not_hang(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "RUST_LOG": "error"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(RUNS), str(POINTS), str(GROUPS), str(PER_RUN_TIMEOUT)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=RUNS * PER_RUN_TIMEOUT)
    done = proc.stdout.count(" ok\n") - ("all runs ok" in proc.stdout)
    assert proc.returncode == 0 and "all runs ok" in proc.stdout, (
        f"exit {proc.returncode} after {done} of {RUNS} ingests"
        + (" (hung: the watchdog fired)" if "Timeout (" in proc.stderr else "")
        + f"\n--- stderr (tail) ---\n{proc.stderr[-6000:]}")
