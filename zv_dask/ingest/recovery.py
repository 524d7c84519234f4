"""When an ingest job fails: naming the stage and task, and putting the target back as it was.

A store the job created is removed (looking again for cells a failed task
still had in flight); a plain store that existed gets its metadata documents
back byte for byte and loses every node the job added; icechunk needs none of
this (the job's session is discarded).
"""

from __future__ import annotations

import time

import numpy as np

from zv_dask.errors import IngestError
from zv_dask.format.grid import chunk_key
from zv_dask.store.preimage import restore_metadata

__all__ = ["stage_error", "write_task_names", "remove_new_store", "put_back"]


def stage_error(stage: str, e: Exception, tasks: dict | None = None) -> IngestError:
    """A failure that is not a zv-dask error, as an :class:`IngestError` naming the stage.

    ``tasks`` maps task keys to ``(what, chunk)``: a ``KilledWorker`` names the
    task whose workers died, which says the partition, or the group and chunk.
    """
    what, chunk = tasks.get(getattr(e, "task", None), (None, None)) if tasks else (None, None)
    where = f" ({what})" if what else ""
    first = (str(e).strip().splitlines() or [""])[0]
    return IngestError(f"ingest failed in the {stage} stage{where}: {type(e).__name__}: {first}",
                       stage=stage, chunk=chunk)


def write_task_names(writes, splits, groups, grid, staged: bool = False) -> dict:
    """Task key -> (what, first chunk) for the write stage's tasks, to name a dead one."""
    verb = "staging" if staged else "splitting"
    out: dict[str, tuple[str, str | None]] = {s.key: (f"{verb} input partition {p}", None)
                                              for p, s in enumerate(splits)}
    for g, w in enumerate(writes or []):
        start = int(groups.starts[g])
        if groups.units is None:
            first = grid.chunks_of_cell_ids(np.array([start]))[0]
        else:
            first = np.maximum(groups.units.first_chunk(start), np.asarray(grid.origin))
        out[w.key] = (f"writing group {g} (first chunk {chunk_key(first)})", chunk_key(first))
        for p, s in enumerate(splits if not staged else ()):  # the piece of partition p that group g gathers
            out[s[g].key] = (f"group {g} (first chunk {chunk_key(first)}) gathering input partition {p}",
                             chunk_key(first))
    return out


def remove_new_store(zs, settle: float = 0.6) -> None:
    """A store this job created and failed to fill is removed, so a retry starts clean.

    The task that failed may have had other puts in flight in its zarr I/O loop,
    which land just after it raised: the removal looks again for ``settle`` seconds.
    """
    from zarr.core.sync import sync

    async def anything_left() -> bool:
        async for _ in zs.store.list():
            return True
        return False

    try:
        sync(zs.store.delete_dir(""))
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if sync(anything_left()):
                sync(zs.store.delete_dir(""))
    except Exception:  # noqa: BLE001 - best effort; the original error matters more
        pass


def put_back(job, zs, created_here: bool, old_metadata: dict | None, settle: float = 0.6) -> None:
    """Undo a failed job: its icechunk changes, the plain store it created, or its metadata changes.

    ``old_metadata`` are the documents of the plain store the job found (:func:`metadata_docs`).
    """
    job.abort()
    if created_here and not job.transactional:
        remove_new_store(zs, settle=settle)
    elif old_metadata is not None:
        try:
            restore_metadata(zs, old_metadata)
        except Exception:  # noqa: BLE001 - best effort (the storage may be what failed); the job's error matters more
            pass
