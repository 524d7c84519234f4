"""Test hooks: kill this process with SIGKILL, or fail a task, at a named point of a job.

``ZV_DASK_KILL_AT=<point>`` makes the job's own process die there exactly as
``kill -9`` would (no cleanup, no ``finally``), so that the tests can prove a
killed job resumes. Points: ``scan`` (the scan done, nothing written),
``write:<n>`` (``n`` level-0 groups finished), ``append:<n>`` (``n`` groups
of an append finished), ``level0`` (level 0's metadata
written), ``pyramid:<n>`` (``n`` pyramid tasks finished), ``commit`` (all
written, before the commit), ``swap`` (a rebuild beside a local store's
levels, halfway through putting the new levels in their place). ``ZV_DASK_FAIL_AT=<point>`` makes a task raise
there instead (``group:<g>``: level-0 write group ``g``; ``level:<k>``: a task
building level ``k``), on the workers whose environment has it, after
``ZV_DASK_FAIL_DELAY`` seconds (default 0). Unset, each
hook costs one dict lookup. ``ZV_DASK_PAUSE_AT=<point>`` makes the job wait
there for ``ZV_DASK_PAUSE_SECONDS`` (default 5): a job caught while it holds
the store.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["kill_point", "fail_point", "KILL_AT", "FAIL_AT"]

KILL_AT = "ZV_DASK_KILL_AT"
FAIL_AT = "ZV_DASK_FAIL_AT"


def kill_point(name: str) -> None:
    """Die here (SIGKILL) if ``ZV_DASK_KILL_AT`` names this point (or wait, for ``ZV_DASK_PAUSE_AT``)."""
    at = os.environ.get(KILL_AT)
    if at and at == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("ZV_DASK_PAUSE_AT") == name:
        time.sleep(float(os.environ.get("ZV_DASK_PAUSE_SECONDS", "5")))


def fail_point(name: str) -> None:
    """Raise :class:`OSError` here if ``ZV_DASK_FAIL_AT`` names this point (after ``ZV_DASK_FAIL_DELAY`` s)."""
    at = os.environ.get(FAIL_AT)
    if at and at == name:
        time.sleep(float(os.environ.get("ZV_DASK_FAIL_DELAY", "0")))  # a test's "other tasks finish first"
        raise OSError(f"injected failure at {name} ({FAIL_AT})")
