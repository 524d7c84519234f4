"""Where a job's tasks run: the given ``distributed`` client, the current one, or Dask's local scheduler."""

from __future__ import annotations

from zv_dask.errors import InputError
from zv_dask.progress import compute_with_progress, task_bar
from zv_dask.transaction import gather_or_stop

__all__ = ["resolve_client", "run_tasks", "task_slots", "local_cluster", "local_scheduler", "describe_scheduler",
           "IN_PROCESS_SCHEDULERS"]


def resolve_client(client):
    """``client`` if given, else the current ``distributed`` client, else ``None`` (local scheduler).

    A local scheduler set with ``dask.config.set(scheduler="sync")`` (or
    ``"threads"`` / ``"processes"``) wins over a current client, as in Dask.
    """
    if client is not None:
        return client
    import sys

    import dask

    if _local_name(dask.config.get("scheduler", None)) is not None:
        return None
    if "distributed" not in sys.modules:  # nothing made a client: no need to import it to ask
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


_LOCAL_NAMES = {"sync": "synchronous", "synchronous": "synchronous", "single-threaded": "synchronous",
                "threads": "threads", "threading": "threads", "processes": "processes",
                "multiprocessing": "processes"}
#: Names of Dask's schedulers that run a job's tasks in this process (for :func:`local_scheduler`).
IN_PROCESS_SCHEDULERS = tuple(k for k, v in _LOCAL_NAMES.items() if v != "processes")


def _local_name(scheduler) -> str | None:
    """``"threads"``, ``"synchronous"`` or ``"processes"`` for one of Dask's local schedulers (a name or its
    ``get``), else ``None``."""
    if isinstance(scheduler, str):
        return _LOCAL_NAMES.get(scheduler.lower())
    if callable(scheduler):
        import dask.local
        import dask.threaded

        if scheduler is dask.threaded.get:
            return "threads"
        if scheduler is dask.local.get_sync:
            return "synchronous"
    return None


def local_scheduler(name: str):
    """``dask.config.set`` of Dask's threaded or synchronous scheduler (one of :data:`IN_PROCESS_SCHEDULERS`)
    as its function.

    Dask imports ``distributed`` (about 0.15 s) to look for a client whenever the scheduler is
    set by name; given the function, a job in this process never imports it.
    """
    import dask
    import dask.local
    import dask.threaded

    kind = _local_name(name)
    if kind not in ("threads", "synchronous"):
        raise InputError(f"{name!r} is not a scheduler in this process; choose one of {IN_PROCESS_SCHEDULERS}")
    return dask.config.set(scheduler=dask.threaded.get if kind == "threads" else dask.local.get_sync)


def describe_scheduler(client) -> str:
    """Where a job's tasks run, in words: a cluster's address and workers, or this process's scheduler."""
    if client is None:
        import dask

        current = dask.config.get("scheduler", None)
        name = _local_name(current) or (current if isinstance(current, str) else "threads")
        return f"{name} in this process" + (f" ({task_slots(None)} threads)" if name == "threads" else "")
    try:
        info = client.scheduler_info()
        workers = info.get("workers", {})
        threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        return (f"{info.get('address', 'distributed')}: {len(workers)} worker{'s' if len(workers) != 1 else ''}, "
                f"{threads} thread{'s' if threads != 1 else ''}")
    except Exception:  # noqa: BLE001 - a client that cannot say: name it anyway
        return type(client).__name__


def task_slots(client) -> int:
    """Worker threads that will run the tasks (this machine's cores for local schedulers)."""
    import os

    if client is None:
        return os.cpu_count() or 1
    try:
        return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
    except Exception:  # noqa: BLE001 - an unusual client: fall back to the defaults
        return 1


def run_tasks(objs, client, progress: bool = False, label: str = "", on_result=None) -> list:
    """Compute dask objects and return their results in order, with a progress bar if asked.

    On a client a failure stops the stage's other tasks before the error propagates.
    Without one, inside a task on a distributed worker (a lazy job computed there)
    the objects run on that worker's cluster; elsewhere on dask's current scheduler.
    ``on_result(i, result)`` is called in this process as each task finishes (on a
    client) or after them all (elsewhere): how a job checkpoints its progress.
    """
    objs = list(objs)
    if not objs:
        return []
    if client is not None:
        futures = client.compute(objs)
        if not progress:
            return gather_or_stop(client, futures, on_result=on_result)
        with task_bar(futures, label) as tick:
            def each(i, result):
                tick()
                if on_result is not None:
                    on_result(i, result)

            return gather_or_stop(client, futures, on_result=each)
    on_worker = _worker_client()
    if on_worker is not None:
        with on_worker as c:
            results = c.gather(c.compute(objs))
        for i, r in enumerate(results):
            if on_result is not None:
                on_result(i, r)
        return results
    if on_result is None:
        return _run_local(objs, progress, label)
    from dask.callbacks import Callback

    index = {getattr(o, "key", None): i for i, o in enumerate(objs)}
    index.pop(None, None)
    handed: set[int] = set()

    def posttask(key, result, dsk, state, worker_id):  # in this thread, as each task ends: checkpoints
        i = index.get(key)
        if i is not None and i not in handed:
            handed.add(i)
            on_result(i, result)

    with Callback(posttask=posttask):
        results = _run_local(objs, progress, label)
    for i, r in enumerate(results):  # an object whose key the scheduler did not report (not a Delayed)
        if i not in handed:
            on_result(i, r)
    return results


def _worker_client():
    """A ``worker_client()`` context when this runs inside a task on a distributed worker, else ``None``.

    ``distributed`` is only looked at when something imported it: a job in this process never needs it.
    """
    import sys

    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker, worker_client

    try:
        get_worker()
    except ValueError:
        return None
    return worker_client()


def _run_local(objs, progress: bool, label: str) -> list:
    import dask

    if progress:
        return compute_with_progress(objs, label)
    return list(dask.compute(*objs))


def local_cluster(n_workers: int | None = None, *, threads_per_worker: int = 1, memory_limit="auto",
                  dashboard: bool = False, **kwargs):
    """A ``distributed.LocalCluster`` of worker processes on 127.0.0.1, set up for zv-dask's work.

    One thread per worker (the numpy work holds the GIL in places) and glibc's
    own malloc tuning: Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` in its workers
    by default, which turns every large numpy temporary into a fresh ``mmap``
    and made ingest about a third slower here. No dashboard unless ``dashboard``
    (then on a free port: ``cluster.dashboard_link``; it needs bokeh, the
    ``dashboard`` extra). ``kwargs`` go to ``LocalCluster``.
    """
    import os

    import dask
    from distributed import LocalCluster

    n = n_workers or max(1, os.cpu_count() or 1)
    opts = dict(n_workers=n, threads_per_worker=threads_per_worker, processes=True, host="127.0.0.1",
                dashboard_address=":0", memory_limit=memory_limit)
    if dashboard:
        try:
            import bokeh  # noqa: F401
        except ImportError:
            raise InputError("the Dask dashboard needs bokeh: pip install 'zv-dask[dashboard]' "
                             "(or bokeh>=3.1)") from None
    else:
        opts["scheduler_kwargs"] = {"dashboard": False}
    opts.update(kwargs)
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return LocalCluster(**opts)
