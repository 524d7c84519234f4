"""One job, one commit.

A :class:`WriteJob` hands workers something picklable to write through and
collects what they return:

* on icechunk, a ``ForkSession`` of the job's writable session, made once per
  stage and sent to every task of that stage; tasks return their forks, which
  are merged back into the session; the job commits once at the end, or
  discards everything on failure, leaving the branch exactly as it was;
* on any other store, the zarr store itself. Chunks are written first and
  metadata last, so an interrupted job leaves metadata that claims nothing
  it does not have.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WriteJob", "worker_store", "returned_fork"]


def worker_store(target):
    """The zarr store a task writes through, given the job's ``target``."""
    store = getattr(target, "store", None)
    if store is not None and type(target).__name__ == "ForkSession":
        return store
    return target


def returned_fork(target):
    """What a task hands back for merging (its fork), or ``None`` on plain stores."""
    return target if type(target).__name__ == "ForkSession" else None


class WriteJob:
    """The write context of one ingest / pyramid job on a :class:`~zv_dask.ZVStore`."""

    def __init__(self, store, message: str | None = None):
        self.store = store
        self.message = message or "zv-dask job"
        self._fork = None

    @property
    def transactional(self) -> bool:
        return self.store.session is not None

    def target(self) -> Any:
        """What to send to tasks: a fork made once for the current stage, or the zarr store."""
        if not self.transactional:
            return self.store.store
        if self._fork is None:
            self._fork = self.store.session.fork()
        return self._fork

    def absorb(self, forks) -> None:
        """Merge the forks tasks returned; the next :meth:`target` forks anew."""
        forks = [f for f in forks if f is not None]
        if self.transactional and forks:
            self.store.session.merge(*forks)
        self._fork = None

    def commit(self, message: str | None = None) -> str | None:
        """Commit the whole job (icechunk) and return the snapshot id."""
        from zv_dask.store.api import commit

        return commit(self.store, message or self.message)

    def abort(self) -> None:
        """Drop everything the job wrote to an icechunk session."""
        from zv_dask.store.api import discard_changes

        self._fork = None
        if self.transactional:
            discard_changes(self.store)
