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

A job that fails stops its tasks before the caller cleans up
(:func:`gather_or_stop`), and a commit that finds the branch moved by another
writer rebases onto it when the changes touch different nodes, or says which
nodes conflict (:meth:`WriteJob.commit`): nothing is lost either way.
"""

from __future__ import annotations

from typing import Any

from zv_dask.errors import StoreError

__all__ = ["WriteJob", "worker_store", "returned_fork", "gather_or_stop"]

REBASE_TRIES = 10


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
        """Commit the whole job (icechunk) and return the snapshot id.

        If another writer committed to the branch meanwhile, the job is rebased
        onto that commit when the two touch different nodes (icechunk's
        ``ConflictDetector``) and committed on top of it; if they touch the same
        nodes a :class:`StoreError` names them and the job's changes stay in the
        session (the caller aborts). Plain stores have nothing to commit.
        """
        from zv_dask.store.api import commit

        message = message or self.message
        if not self.transactional:
            return commit(self.store, message)
        import icechunk

        for _ in range(REBASE_TRIES):
            try:
                return commit(self.store, message)
            except icechunk.ConflictError:
                try:
                    self.store.session.rebase(icechunk.ConflictDetector())
                except icechunk.RebaseFailedError as r:
                    raise StoreError(_conflict_message(self.store.backend.branch, message, r)) from r
        raise StoreError(f"commit {message!r}: the branch {self.store.backend.branch!r} kept moving; gave up after "
                         f"{REBASE_TRIES} rebases (nothing of this job was committed)")

    def abort(self) -> None:
        """Drop everything the job wrote to an icechunk session."""
        from zv_dask.store.api import discard_changes

        self._fork = None
        if self.transactional:
            discard_changes(self.store)


def _conflict_message(branch: str, message: str, err) -> str:
    conflicts = getattr(err, "conflicts", None) or []
    shown = ", ".join(f"{c.path} ({str(c.conflict_type).split('.')[-1]})" for c in conflicts[:8])
    if len(conflicts) > 8:
        shown += f" and {len(conflicts) - 8} more"
    return (f"commit {message!r} conflicts with a concurrent commit on branch {branch!r} "
            f"(snapshot {getattr(err, 'snapshot', None) or getattr(err, 'actual_parent', '?')}): both changed "
            f"{shown or 'the same nodes'}; nothing of this job was committed, the other writer's commit stands")


# -- stopping a failed stage ---------------------------------------------------------------
def gather_or_stop(client, futures, grace: float = 60.0, on_result=None) -> list:
    """``client.gather(futures)``; on the first failure, stop the stage before raising.

    Tasks that have not started are cancelled; tasks already running are waited
    for (up to ``grace`` seconds), then released, so that the caller can discard
    or remove what the stage wrote. Only the scheduler is asked (workers may be
    dead or dying). Two things can still land a moment later: puts the failed
    task itself had in flight in its zarr I/O loop, and a task that started
    between the scheduler's answer and the cancel. ``on_result(i, result)`` is
    called as each task finishes.
    """
    try:
        if on_result is None:
            return client.gather(futures)
        from distributed import as_completed

        index = {f.key: i for i, f in enumerate(futures)}
        results: list = [None] * len(futures)
        for fut, res in as_completed(futures, with_results=True):
            i = index[fut.key]
            results[i] = res
            on_result(i, res)
        return results
    except BaseException:
        try:
            from distributed import wait

            busy = {k for keys in client.processing().values() for k in keys}
            running = [f for f in futures if f.key in busy]
            client.cancel([f for f in futures if f.key not in busy])
            if running:
                wait(running, timeout=grace)
            client.cancel(running)
        except Exception:  # noqa: BLE001 - a cluster going down: the original error matters more
            pass
        raise
