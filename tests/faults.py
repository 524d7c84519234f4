"""Real fault injection for the job tests; importable by the cluster's worker processes.

* :class:`FaultyStore` is a real zarr store over another one (local or S3). Its
  chunk writes (keys matching ``match``) go through until ``after`` of them have
  landed, then the next one raises, or kills the worker process that makes it.
* :func:`faulty_cloud` is a dask array of points whose block ``fail_block``
  loads normally the first time (the scan pass) and fails, or kills its worker,
  the second time (the shuffle/write pass).
* :func:`bounce_during` stops the S3 server once the first chunk objects of a
  job appear under a key prefix, and starts it again after a delay.

No client is patched: the faults happen in the stores, tasks and processes the
job really uses.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
from zarr.storage import WrapperStore


def _on_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def fault(action: str, what: str) -> None:
    """Raise, or SIGKILL the current process when it is a Dask worker (never the test process)."""
    if action == "kill":
        if not _on_worker():
            raise RuntimeError(f"refusing to kill a non-worker process ({what})")
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(10)  # pragma: no cover - the signal arrives first
    raise OSError(f"injected fault: {what}")


class FaultyStore(WrapperStore):
    """A zarr store whose chunk writes fail (``action="raise"``) or kill the writing worker (``"kill"``).

    The count is per unpickled copy, i.e. per task on the cluster: a task fails on
    its ``after + 1``-th chunk write, in the middle of its writes. Metadata
    (``zarr.json``) always goes through.
    """

    def __init__(self, store, *, match: str = r"/c/", after: int = 0, action: str = "raise"):
        super().__init__(store)
        self.match = match
        self.after = after
        self.action = action
        self.seen = 0

    def _with_store(self, store):
        return type(self)(store, match=self.match, after=self.after, action=self.action)

    def __repr__(self) -> str:
        return f"FaultyStore({self._store!r}, match={self.match!r}, after={self.after}, action={self.action!r})"

    async def set(self, key, value) -> None:
        if re.search(self.match, key):
            self.seen += 1
            if self.seen > self.after:
                fault(self.action, f"chunk write {self.seen} ({key})")
        await self._store.set(key, value)

    async def set_if_not_exists(self, key, value) -> None:
        if re.search(self.match, key):
            self.seen += 1
            if self.seen > self.after:
                fault(self.action, f"chunk write {self.seen} ({key})")
        await self._store.set_if_not_exists(key, value)


# -- a failing input partition -------------------------------------------------------------
def cloud_block(n: int, seed: int, block: int, ndim: int = 3) -> np.ndarray:
    return np.random.default_rng([seed, block]).uniform(0, 100, (n, ndim)).astype("f4")


def _faulty_block(block_info=None, *, seed, fail_block, action, marker_dir):
    info = block_info[None]
    (lo, hi), _ = info["array-location"]
    b = info["chunk-location"][0]
    if b == fail_block:
        flag = Path(marker_dir) / f"block-{b}-loaded"
        if flag.exists():  # loaded once already (by the scan): this is the shuffle/write pass
            fault(action, f"loading input block {b} for the second time")
        flag.touch()
    return cloud_block(hi - lo, seed, b)


def faulty_cloud(n: int, rows: int, marker_dir, *, seed: int = 0, fail_block: int = 1, action: str = "raise"):
    """``(n, 3)`` float32 points in ``[0, 100)`` as a dask array of ``rows``-row blocks (see module doc)."""
    import dask.array as da

    chunks = (tuple(min(rows, n - i) for i in range(0, n, rows)), (3,))
    return da.map_blocks(_faulty_block, chunks=chunks, dtype="f4", meta=np.empty((0, 3), "f4"), seed=seed,
                         fail_block=fail_block, action=action, marker_dir=str(marker_dir))


def cloud(n: int, rows: int, seed: int = 0) -> np.ndarray:
    """The points :func:`faulty_cloud` stands for, as one numpy array."""
    return np.concatenate([cloud_block(min(rows, n - i), seed, b) for b, i in enumerate(range(0, n, rows))])


# -- an S3 server going away mid-job -----------------------------------------------------------
class Bounce:
    """What :func:`bounce_during` saw: the job's result or error, and when the server went down."""

    result = None
    error: BaseException | None = None
    stopped_at: float | None = None
    ended: float | None = None


def bounce_during(srv, prefix: str, job, *, pattern: str = r"/c/|/chunks/", down: float = 1.0,
                  timeout: float = 60.0) -> Bounce:
    """Run ``job()`` in a thread; once a new chunk object appears under ``prefix``, stop ``srv``, wait ``down``
    seconds and start it again (same ports and data), while the job goes on.

    The server is stopped and restarted from the calling thread: it dies with the thread that started it
    (``PR_SET_PDEATHSIG``), so a helper thread must not restart it.
    """
    import obstore

    out = Bounce()

    def run():
        try:
            out.result = job()
        except BaseException as e:  # noqa: BLE001 - judged by the caller
            out.error = e
        finally:
            out.ended = time.monotonic()

    worker = threading.Thread(target=run, daemon=True)
    raw = srv.obstore(client_options={"timeout": "2s"}, retry_config={"max_retries": 0})
    rx = re.compile(pattern)
    old = {m["path"] for m in obstore.list(raw, prefix=f"{prefix}/").collect()}
    probe = None
    worker.start()
    deadline = time.monotonic() + timeout
    try:
        while worker.is_alive() and time.monotonic() < deadline:
            keys = [m["path"] for m in obstore.list(raw, prefix=f"{prefix}/").collect()]
            new = [k for k in keys if k not in old and rx.search(k)]
            if new:
                srv.stop()
                out.stopped_at = time.monotonic()
                probe = new[0]
                time.sleep(down)
                break
            time.sleep(0.01)
    finally:
        if not srv.running:
            srv.restart()
            if probe is not None:
                _wait_readable(raw, probe, deadline)
    worker.join(timeout)
    assert not worker.is_alive(), f"the job did not end within {timeout}s"
    return out


def _wait_readable(raw, key: str, deadline: float) -> None:
    """After a restart LIST works at once, but GETs answer 500 for a few seconds (volumes re-register)."""
    import obstore

    while True:
        try:
            obstore.get(raw, key).bytes()
            return
        except FileNotFoundError:  # the server answers: the job's clean-up has removed the object already
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
