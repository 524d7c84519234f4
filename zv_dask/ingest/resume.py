"""What makes two ingest jobs the same job: their options and a fingerprint of their input.

A resumed job must be the job that was interrupted, or its finished groups
would be mixed with cells of another input. :func:`job_document` records, before
the first cell is written, the options that decide what is written, the input's
fingerprint (files: path, size and modification time; in-memory data: shape and
dtype; every input: the point count and extent the scan found) and the plan of
write groups; :func:`differences` names what a resuming job changed.
"""

from __future__ import annotations

import os

import numpy as np

from zv_dask.errors import InputError
from zv_dask.faults import kill_point
from zv_dask.ingest.sources import _expand
from zv_dask.store.journal import Journal, differences, job_document, job_options, journal_for

__all__ = ["input_fingerprint", "scan_fingerprint", "check_resume", "ResumeState", "JobRecorder", "job_options"]


def input_fingerprint(points, src) -> dict:
    """What identifies the input before it is read: its files (size, mtime) or its shape and dtype."""
    fp: dict = {"kind": src.kind, "ndim": int(src.ndim), "position_dtype": np.dtype(src.position_dtype).name,
                "attributes": {k: [str(d), c] for k, (d, c) in sorted(src.attributes.items())},
                "object_ids": bool(src.has_object_ids), "rows": src.n_rows}
    if isinstance(points, (str, os.PathLike)) or (isinstance(points, (list, tuple)) and points
                                                  and all(isinstance(p, (str, os.PathLike)) for p in points)):
        files = []
        for f in _expand(points):
            for path in _walk(f):
                st = os.stat(path)
                files.append({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        fp["files"] = files
    return fp


def _walk(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.join(root, n) for n in names]
    return sorted(out)


def scan_fingerprint(stats, final_bounds, dropped) -> dict:
    """What the scan found: points, their extent, the settled bounds (a resumed job must find the same)."""
    return {"points": int(stats.count), "lo": [float(v) for v in stats.lo], "hi": [float(v) for v in stats.hi],
            "bounds": [[float(v) for v in b] for b in final_bounds], "dropped": int(dropped)}


class ResumeState:
    """The unfinished job a resuming ingest continues: its document and what it has finished."""

    def __init__(self, journal: Journal, doc: dict):
        self.journal, self.doc = journal, doc

    @property
    def starts(self) -> np.ndarray:
        return np.asarray(self.doc["plan"]["starts"], np.int64)

    def finished_groups(self) -> set[int]:
        return {int(n) for n in self.journal.finished("level0") if n.isdigit()}


def check_resume(state: ResumeState, options: dict, fingerprint: dict, scanned: dict | None = None) -> None:
    """Refuse (:class:`InputError`) to resume a job with other options or another input, naming what differs."""
    doc = state.doc
    if doc.get("kind") != "ingest":
        raise InputError(f"the unfinished job at {state.journal.where()} is a {doc.get('kind')} job, not an ingest; "
                         "resume it with the command that started it")
    diffs = differences(doc.get("options", {}), options, "option ")
    diffs += differences(doc.get("input", {}), fingerprint, "input ")
    if scanned is not None:
        diffs += differences(doc.get("scan", {}), scanned, "scanned ")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise InputError(f"cannot resume the unfinished ingest (started {doc.get('started')}): it was started with "
                         f"other options or input: {shown}. Resume with the same input and options, or pass "
                         "overwrite=True (--overwrite) to discard it and start again")


class JobRecorder:
    """The durable side of one ingest job: its journal, lease and finished groups.

    ``journal`` is ``None`` for a store with no location (an object passed in):
    such a job runs as before, without durable progress.
    """

    def __init__(self, state: ResumeState | None, options: dict, fingerprint: dict, enabled: bool = True):
        """``state``: the unfinished job to resume, whose options and input ``preflight`` has compared with
        these (:func:`check_resume`); ``enabled=False``: no journal (``durable=False``, never with a resume)."""
        self.enabled = enabled
        self.state = state
        self.options, self.fingerprint = options, fingerprint
        self.journal: Journal | None = state.journal if state is not None else None
        self.lock = state.journal.acquire("zv-dask ingest (resuming)") if state is not None else None
        self.done: set[int] = state.finished_groups() if state is not None else set()
        self.written = 0  # groups finished by this run
        self.job = None  # the WriteJob: on icechunk, groups are recorded here after a checkpoint
        self._pending: list = []  # (group, summary, coarse) merged but not yet checkpointed
        self.todo: list[int] = []  # the groups this run writes, in task order

    @property
    def resuming(self) -> bool:
        return self.state is not None

    def recorded_scan(self):
        """The scan an interrupted job recorded, when its input are files that did not change (else ``None``)."""
        if self.state is None or not self.fingerprint.get("files") or self.journal is None:
            return None
        return self.journal.load("plan", "scan")

    def take(self, backend) -> bool:
        """The store's lease for this job now, before it touches the store; ``False`` when it keeps no journal.

        Raises :class:`~zv_dask.errors.StoreError` naming the job that holds it.
        """
        if self.state is not None or self.lock is not None:
            return self.lock is not None
        self.journal = journal_for(backend) if self.enabled else None
        if self.journal is None:
            return False
        self.lock = self.journal.acquire("zv-dask ingest")
        return True

    def start(self, backend, scanned: dict, plan: dict, scan) -> None:
        """Before the first cell: the lease, and the job document (a new job) or the scan's check (a resumed one)."""
        if self.state is not None:
            check_resume(self.state, self.options, self.fingerprint, scanned)
            return
        if not self.take(backend):
            return
        journal = self.journal
        assert journal is not None, "take() keeps the journal it leased"
        journal.forget("level0")  # leftovers of a job discarded with overwrite
        journal.record("plan", "scan", scan)
        journal.write_json("job.json", job_document("ingest", self.options, self.fingerprint, scanned, plan))

    def on_group(self, i: int, result) -> None:
        """A write group finished (its record is in the journal already)."""
        self.written += 1
        job = self.job
        if job is not None and job.durable:
            summary, coarse, fork = result
            job.absorb([fork])
            self._pending.append((self.todo[i], summary, coarse))
            self.checkpoint(force=False)
        kill_point(f"write:{self.written}")

    def checkpoint(self, force: bool = True) -> None:
        """Icechunk: commit what was merged to the job branch, then record the groups it made durable."""
        job = self.job
        if job is None or not job.durable or not job.checkpoint(force=force):
            return
        for g, summary, coarse in self._pending:
            self.journal.record("level0", f"{g:07d}", (summary, coarse))
        self._pending = []

    def progress(self) -> bool:
        """True when finished work would be lost by undoing the job."""
        if self.journal is None:
            return False
        if self.resuming or self.written > 0:
            return True
        try:
            return bool(self.journal.finished("level0"))
        except Exception:  # noqa: BLE001 - storage unreachable (what failed, maybe): keep rather than guess
            return True

    def finish(self) -> None:
        """The job is committed: its journal goes."""
        if self.lock is not None:
            self.lock.check()
        if self.journal is not None:
            self.journal.remove()
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def discard(self) -> None:
        """The job is over without a result (its commit lost a conflict): no journal stays, resumed or not."""
        self.release()
        if self.journal is not None:
            try:
                self.journal.remove()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def abandon(self) -> None:
        """A job undone before it finished anything: no journal stays."""
        self.release()
        if self.journal is not None and not self.resuming:
            try:
                self.journal.remove()
            except Exception:  # noqa: BLE001 - best effort; the job's error matters more
                pass
