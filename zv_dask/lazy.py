"""Lazy jobs: what ``ingest(..., compute=False)`` and ``build_pyramid(..., compute=False)`` return.

A job is a Dask collection of one task, the job's driver. Computing it (``dask.compute``,
``.compute()``, ``client.compute``, ``persist``) runs the whole job where Dask runs that task:
on a distributed worker the driver gives its thread back to the worker (``worker_client``)
and runs the job's stages as tasks of the same cluster; on a local scheduler it runs them on
that scheduler. The result is the job's report.

Until then nothing is written: the input and the options were checked when the job was made
(bad input fails there), paths were made absolute (relative to the process that made the job,
never to a worker's directory), and nothing else happened. A job that is never computed
leaves nothing behind.

Why one driver task and not the job's own tasks in the collection: a job decides its tasks
as it goes (the bounds settle the grid, the grid the write groups, each pyramid level the
next), and it rolls itself back or commits once at the end; one task keeps all of that where
it is, as a plain ``ingest`` call, wherever Dask runs it.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable
from typing import Any

from dask.base import DaskMethodsMixin
from dask.delayed import Delayed, delayed

from zv_dask.errors import InputError

__all__ = ["PendingJob", "PendingIngest", "PendingPyramid", "absolute"]


class _Call:
    """The job's function and arguments, carried by its task (its repr shows no argument: no secret in a graph)."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, label: str):
        self.fn, self.args, self.kwargs, self.label = fn, args, kwargs, label

    def __repr__(self) -> str:
        return f"<zv-dask {self.label}>"

    __str__ = __repr__


def _drive(call: _Call):
    """Run a job: on a distributed worker through the worker's client, elsewhere on the local scheduler."""
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):
        return call.fn(*call.args, **call.kwargs)
    with worker_client() as client:  # the driver's thread goes back to the worker while the job runs
        return call.fn(*call.args, **{**call.kwargs, "client": client, "progress": False})


class PendingJob(DaskMethodsMixin):
    """A zv-dask job not run yet: a Dask collection whose result is the job's report.

    ``dask.compute(job)``, ``job.compute()``, ``client.compute(job)`` (a future, for
    ``distributed.progress``) and ``dask.persist(job)`` / ``client.persist(job)`` run it.
    """

    kind = "job"

    def __init__(self, call: _Call | None = None, *, store: str = "", _delayed: Delayed | None = None):
        if _delayed is None:
            key = f"zv-dask-{self.kind}-{uuid.uuid4().hex}"
            _delayed = delayed(_drive, pure=False)(call, dask_key_name=key)
        self._delayed = _delayed
        self.store = store

    # -- the Dask collection protocol (the one task's Delayed does the work) -------------------
    def __dask_graph__(self):
        return self._delayed.__dask_graph__()

    def __dask_keys__(self):
        return self._delayed.__dask_keys__()

    def __dask_layers__(self):
        return self._delayed.__dask_layers__()

    def __dask_tokenize__(self):
        return self._delayed.key

    def __dask_postcompute__(self):
        return self._delayed.__dask_postcompute__()

    def __dask_postpersist__(self):
        return self._rebuild, ()

    def _rebuild(self, dsk, *, rename=None):
        return type(self)(store=self.store, _delayed=self._delayed._rebuild(dsk, rename=rename))

    __dask_scheduler__ = Delayed.__dict__["__dask_scheduler__"]  # the descriptors themselves, as Delayed has them
    __dask_optimize__ = Delayed.__dict__["__dask_optimize__"]

    @property
    def key(self):
        """The job's task key (as on the dashboard)."""
        return self._delayed.key

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.store}: not run yet; dask.compute(job) or job.compute() runs it>"


class PendingIngest(PendingJob):
    """An :func:`zv_dask.ingest` job not run yet; computing it returns its :class:`~zv_dask.IngestReport`."""

    kind = "ingest"


class PendingPyramid(PendingJob):
    """A :func:`zv_dask.build_pyramid` job not run yet; computing it returns its ``PyramidReport``."""

    kind = "pyramid"


def absolute(target: Any) -> Any:
    """A local path (``str`` / ``PathLike``, not a URL) made absolute here; anything else as it is."""
    if isinstance(target, os.PathLike) or (isinstance(target, str) and "://" not in target):
        return os.path.abspath(os.fspath(target))
    if isinstance(target, str) and target.startswith("file://"):
        return "file://" + os.path.abspath(target[len("file://"):])
    return target


def make_job[J: PendingJob](cls: type[J], fn: Callable, args: tuple, kwargs: dict, store: Any) -> J:
    """A pending job of ``fn(*args, **kwargs)``, refusing a store that cannot travel to the process that runs it."""
    try:
        pickle.dumps(store)
    except Exception as e:  # noqa: BLE001 - a writable icechunk Session, an open file...
        raise InputError(f"compute=False makes a job that runs where Dask runs it, and the store "
                         f"({type(store).__name__}) cannot travel there ({e.__class__.__name__}); pass its path or "
                         "URL (with backend='icechunk' for a repository) or an icechunk Repository, or run the job "
                         "with compute=True") from None
    label = f"{cls.kind} into {store}" if isinstance(store, str) else f"{cls.kind} into a {type(store).__name__}"
    return cls(_Call(fn, args, kwargs, label), store=store if isinstance(store, str) else type(store).__name__)
