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

import functools
import os
import time
from typing import Any

from zv_dask.errors import StoreError
from zv_dask.store.api import commit, discard_changes
from zv_dask.store.journal import job_branch_name

__all__ = ["WriteJob", "worker_store", "returned_fork", "gather_or_stop", "CHECKPOINT_SECONDS"]

REBASE_TRIES = 10
# How often a durable icechunk job commits its progress to its job branch (an amend: one snapshot, kept
# short-lived); ZV_DASK_CHECKPOINT_SECONDS overrides it (the tests checkpoint at every group).
CHECKPOINT_SECONDS = float(os.environ.get("ZV_DASK_CHECKPOINT_SECONDS", "30"))




def worker_store(target):
    """The zarr store a task writes through, given the job's ``target``.

    A fork's store is handed out as a :func:`_task_store`, so that zarr never stringifies it (issue 19).
    """
    store = getattr(target, "store", None)
    if store is not None and _is_fork(target):
        return _task_store(store)
    return target


def _task_store(store):
    """``store`` (an ``IcechunkStore``) as one whose ``str`` and ``repr`` do not call into icechunk.

    zarr names its store in every array and group it builds (``AsyncArray.__init__`` calls
    ``str(store_path)``, on zarr's event-loop thread). ``IcechunkStore.__str__`` waits for the
    session's lock in Rust while holding the GIL (icechunk 2.3: ``PyStore`` ``fields()``, a
    ``blocking_read`` without releasing it), and a ``set`` in flight on the same session holds
    that lock while it waits for the GIL to release the Python buffer it was given. With dask's
    threaded scheduler the tasks of a stage share one fork, so one task opening an array while
    another PUTs cells deadlocked the job (issue 19: 14 of 37 runs without a client). The store
    is otherwise the same one (the same Rust store and session, an ``IcechunkStore``); it
    pickles as a plain ``IcechunkStore``. See benchmarks/results/icechunk_str_deadlock.md.
    """
    return _task_store_class()(store._store, read_only=store.read_only)


@functools.cache
def _task_store_class():
    from icechunk import IcechunkStore

    class TaskIcechunkStore(IcechunkStore):
        def __str__(self) -> str:
            return "<icechunk.IcechunkStore of a zv-dask task's fork>"

        __repr__ = __str__

        def _repr_html_(self) -> str:
            return str(self)

        def with_read_only(self, read_only: bool = False):
            # zarr's mode="r" opens of a writable store go through this: keep the quiet str.
            new = type(self)(self._store, read_only=read_only)
            new._is_open = False
            return new

        def __reduce_ex__(self, protocol):
            plain = IcechunkStore(self._store, read_only=self.read_only)
            plain._is_open = self._is_open
            return _unpickled, (plain,)

    return TaskIcechunkStore


def _unpickled(store):
    return store


def returned_fork(target):
    """What a task hands back for merging (its fork), or ``None`` on plain stores."""
    return target if _is_fork(target) else None


def _is_fork(target) -> bool:
    """Whether ``target`` is an icechunk ``ForkSession`` (icechunk, 0.8 s to import, only loaded if it may be)."""
    if not type(target).__module__.startswith("icechunk"):
        return False
    import icechunk

    return isinstance(target, icechunk.ForkSession)


class WriteJob:
    """The write context of one ingest / pyramid job on a :class:`~zv_dask.ZVStore`."""

    def __init__(self, store, message: str | None = None):
        self.store = store
        self.message = message or "zv-dask job"
        self._fork = None
        self.job_branch: str | None = None  # icechunk: the branch the job's checkpoints go to
        self.base: str | None = None  # the snapshot of the user's branch the job started from
        self._commits = 0
        self._last = time.monotonic()

    @property
    def durable(self) -> bool:
        """True when the job's progress is committed to a job branch as it goes (icechunk)."""
        return self.job_branch is not None

    # -- the job branch ---------------------------------------------------------------------
    def on_job_branch(self, resume_from: str | None = None) -> None:
        """Move the job onto a branch of its own: checkpoints land there, the user's branch moves once, at the end.

        A new job branches from the snapshot its session is based on and takes
        the changes made so far (metadata) along; ``resume_from`` (the base
        snapshot an interrupted job recorded) continues that job's branch.
        """
        be = self.store.backend
        repo = be.repository
        if not self.transactional or repo is None:
            return
        user = be.branch
        name = job_branch_name(user)
        if resume_from is not None:
            tip = repo.lookup_branch(user)
            if tip != resume_from:
                raise StoreError(f"branch {user!r} moved since the interrupted job started (from {resume_from} to "
                                 f"{tip}); its progress is on branch {name!r}. Resume on a branch at {resume_from}, "
                                 "or start again with overwrite")
            if name not in repo.list_branches():
                raise StoreError(f"the interrupted job's branch {name!r} is gone from the repository; start again "
                                 "with overwrite")
            self.base = resume_from
            self._commits = 0 if repo.lookup_branch(name) == resume_from else 1
            self._swap(repo.writable_session(name))
        else:
            main = be.session
            self.base = main.snapshot_id
            if name in repo.list_branches():
                repo.delete_branch(name)
            repo.create_branch(name, self.base)
            js = repo.writable_session(name)
            _copy_changes(main.status(), main.store, js.store)
            main.discard_changes()
            self._swap(js)
        self.job_branch = name

    def _swap(self, session) -> None:
        import zarr
        from zarr.errors import GroupNotFoundError

        be = self.store.backend
        be.session = session
        be.store = session.store
        try:
            self.store.root = zarr.open_group(session.store, mode="r+", zarr_format=3)
        except GroupNotFoundError:  # back on the branch of a repository the job created: nothing there yet
            self.store.root = None
        self._fork = None

    def checkpoint(self, force: bool = False) -> bool:
        """Commit the job's progress to its branch (at most every ``CHECKPOINT_SECONDS`` unless ``force``).

        Returns True when everything merged so far is durable.
        """
        if not self.durable:
            return False
        now = time.monotonic()
        if not force and now - self._last < CHECKPOINT_SECONDS:
            return False
        s = self.store.session
        if s.has_uncommitted_changes:
            if self._commits:
                s.amend("zv-dask job in progress")
            else:
                s.commit("zv-dask job in progress")
            self._commits += 1
            self._swap(self.store.backend.repository.writable_session(self.job_branch))
        self._last = time.monotonic()
        return True

    def _finish_branch(self, message: str) -> str:
        """The last amend of the job branch, then the user's branch moved onto it; returns the snapshot."""
        be = self.store.backend
        repo = be.repository
        s = self.store.session
        if self._commits:
            tip = s.amend(message, allow_empty=True)
        else:
            tip = s.commit(message, allow_empty=True)
        try:
            repo.reset_branch(be.branch, tip, from_snapshot_id=self.base)
        except Exception as e:  # icechunk.ConflictError: another writer moved the branch
            if repo.lookup_branch(be.branch) == self.base:
                raise
            tip = self._replay_on_user_branch(tip, message, e)
        repo.delete_branch(self.job_branch)
        self.job_branch = None
        fresh = repo.writable_session(be.branch)
        self._swap(fresh)
        return tip

    def _replay_on_user_branch(self, tip: str, message: str, err) -> str:
        """Another writer committed to the user's branch meanwhile: the job's changes on top of theirs.

        Our changes (base -> tip) and theirs (base -> their tip) must touch
        different nodes, as icechunk's ``ConflictDetector`` would require; then
        ours are copied onto a session at their tip and committed there.
        """
        be = self.store.backend
        repo = be.repository
        for _ in range(REBASE_TRIES):
            theirs_tip = repo.lookup_branch(be.branch)
            ours = repo.diff(from_snapshot_id=self.base, to_snapshot_id=tip)
            theirs = repo.diff(from_snapshot_id=self.base, to_snapshot_id=theirs_tip)
            clash = sorted(_touched(ours) & _touched(theirs))
            if clash:
                shown = ", ".join(clash[:8]) + (f" and {len(clash) - 8} more" if len(clash) > 8 else "")
                conflict = StoreError(f"commit {message!r} conflicts with a concurrent commit on branch "
                                      f"{be.branch!r} (snapshot {theirs_tip}): both changed {shown}; nothing of this "
                                      "job was committed, the other writer's commit stands")
                conflict.conflict = True  # the job is over: nothing to resume
                repo.delete_branch(self.job_branch)
                self.job_branch = None
                raise conflict from err
            session = repo.writable_session(be.branch)
            _copy_changes(ours, repo.readonly_session(snapshot_id=tip).store, session.store)
            try:
                return session.commit(message)
            except Exception as e:
                import icechunk

                if not isinstance(e, icechunk.ConflictError):
                    raise
        raise StoreError(f"commit {message!r}: the branch {be.branch!r} kept moving; gave up after {REBASE_TRIES} "
                         f"tries (the job's result is on branch {self.job_branch!r})")

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
        message = message or self.message
        if not self.transactional:
            return commit(self.store, message)
        if self.durable:
            return self._finish_branch(message)
        import icechunk

        try:
            return commit(self.store, message, rebase_tries=REBASE_TRIES)  # icechunk's own rebase loop
        except icechunk.RebaseFailedError as r:
            raise StoreError(_conflict_message(self.store.backend.branch, message, r)) from r
        except icechunk.ConflictError as e:
            raise StoreError(f"commit {message!r}: the branch {self.store.backend.branch!r} kept moving; gave up "
                             f"after {REBASE_TRIES} rebases (nothing of this job was committed)") from e

    def abort(self) -> None:
        """Drop everything the job wrote to an icechunk session."""
        self._fork = None
        if self.transactional and not getattr(self.store.session, "read_only", False):  # (spent by a commit)
            discard_changes(self.store)

    def drop_job_branch(self) -> None:
        """Forget a job branch (a job undone before it finished anything)."""
        if self.durable:
            repo = self.store.backend.repository
            self._swap(repo.writable_session(self.store.backend.branch))
            try:
                repo.delete_branch(self.job_branch)
            except Exception:  # noqa: BLE001 - best effort
                pass
            self.job_branch = None


def _touched(diff) -> set[str]:
    """The nodes a diff changes (groups, arrays, arrays whose chunks changed)."""
    return (set(diff.new_groups) | set(diff.new_arrays) | set(diff.deleted_groups) | set(diff.deleted_arrays)
            | set(diff.updated_groups) | set(diff.updated_arrays) | set(diff.updated_chunks))


def _copy_changes(diff, source, target) -> None:
    """Apply the changes a diff lists, reading their bytes from ``source``, onto the zarr store ``target``.

    Nodes: their ``zarr.json`` (deleted ones removed); chunks: each changed
    chunk's stored object, under the key the array's own chunk-key encoding
    gives (zarr's ``encode_chunk_key``).
    """
    import zarr.api.asynchronous
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    proto = default_buffer_prototype()

    async def run():
        for path in sorted(set(diff.deleted_groups) | set(diff.deleted_arrays), key=len, reverse=True):
            await target.delete_dir(path.strip("/"))
        nodes = sorted(set(diff.new_groups) | set(diff.new_arrays) | set(diff.updated_groups)
                       | set(diff.updated_arrays), key=len)
        for path in nodes:
            key = (path.strip("/") + "/zarr.json").lstrip("/")
            buf = await source.get(key, proto)
            if buf is not None:
                await target.set(key, buf)
        for path, coords in diff.updated_chunks.items():
            arr = await zarr.api.asynchronous.open_array(store=source, path=path.strip("/"), mode="r")
            for c in coords:
                key = f"{path.strip('/')}/{arr.metadata.encode_chunk_key(tuple(c))}"
                buf = await source.get(key, proto)
                if buf is None:
                    await target.delete(key)
                else:
                    await target.set(key, buf)

    sync(run())


def _conflict_message(branch: str, message: str, err) -> str:
    conflicts = getattr(err, "conflicts", None) or []
    shown = ", ".join(f"{c.path} ({str(c.conflict_type).split('.')[-1]})" for c in conflicts[:8])
    if len(conflicts) > 8:
        shown += f" and {len(conflicts) - 8} more"
    return (f"commit {message!r} conflicts with a concurrent commit on branch {branch!r} "
            f"(snapshot {getattr(err, 'snapshot', None) or getattr(err, 'actual_parent', '?')}): both changed "
            f"{shown or 'the same nodes'}; nothing of this job was committed, the other writer's commit stands")


# -- stopping a failed stage ---------------------------------------------------------------
_ERROR_WAIT = 30.0  # seconds to fetch a failed task's error from the scheduler


def _raise_failed(f) -> None:
    """Raise a failed future's error (KilledWorker, the task's own) or CancelledError.

    Bounded: fetching the error of a task whose worker was killed can wait for ever
    (seen once in CI on a killed S3 writer, in ``Future.result``; dask/distributed#7331
    and #6074 are the same family), and the stage must still stop and clean up.
    """
    try:
        f.result(timeout=_ERROR_WAIT)
    except TimeoutError:
        raise RuntimeError(f"task {f.key!r} failed ({f.status}) and the cluster did not hand back its error in "
                           f"{_ERROR_WAIT:.0f} s (its worker died?)") from None


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
        # Not as_completed(with_results=True): its gather of a finished future whose result died with its
        # worker can loop for ever (dask/distributed#7331, #6074: seen here with allowed-failures 0).
        # The job's client's loop: as_completed otherwise asks for a default client (none with set_as_default=False).
        done = as_completed(futures, loop=client.loop)
        for fut in done:
            batch = [fut, *done.next_batch(block=False)]
            for f in batch:
                if f.status in ("error", "cancelled"):
                    _raise_failed(f)
            for f, res in zip(batch, client.gather(batch)):
                i = index[f.key]
                results[i] = res
                on_result(i, res)
        return results
    except BaseException:
        try:
            from distributed import as_completed

            busy = {k for keys in client.processing().values() for k in keys}
            running = [f for f in futures if f.key in busy]
            client.cancel([f for f in futures if f.key not in busy])
            if running:
                try:
                    for _ in as_completed(running, loop=client.loop, timeout=grace):
                        pass
                except TimeoutError:
                    pass
            client.cancel(running)
        except Exception:  # noqa: BLE001 - a cluster going down: the original error matters more
            pass
        raise
