"""What a pyramid task does on a worker: build its levels in memory and write their cells.

:func:`build_levels` takes the points of whole regions of a level (read from
the store by a pyramid task, or still in memory in an ingest write task) and,
for each level of the batch, coarsens (:mod:`zv_dask.pyramid.stack`), writes
the level's cells and the links between it and its parent, and reports what it
wrote in a :class:`BatchResult` for the coordinator's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from zv_dask.errors import TaskStage
from zv_dask.faults import fail_point
from zv_dask.format.links import LinkCells
from zv_dask.pyramid import stack
from zv_dask.pyramid.stack import LevelPoints, StepGeometry
from zv_dask.store.levels import ChunkSummary, payload_targets, read_chunks, write_cells
from zv_dask.store.objects import row_object_ids
from zv_dask.transaction import returned_fork, worker_store

__all__ = ["BatchResult", "build_levels", "link_targets", "batch_task"]


@dataclass
class BatchResult:
    """What one task wrote: per level a :class:`ChunkSummary`, per link cell group its chunks and record counts.

    ``links`` maps ``(owner level, delta, offsets segment)`` to ``(chunks (K, D), records (K,))``;
    ``link_cells`` maps ``(owner level, delta)`` to the ``write_cells`` targets of
    the families the task returns instead of writing (``StepGeometry.returned_links``).
    """

    levels: dict[int, ChunkSummary] = field(default_factory=dict)
    links: dict[tuple[int, int, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    link_cells: dict[tuple[int, int], list] = field(default_factory=dict)
    bytes_written: int = 0


def link_targets(cells: LinkCells | None, owner: int, delta: int, grid, out: BatchResult) -> list:
    """``write_cells`` targets for a :class:`LinkCells` (one per offsets array), recording them in ``out``."""
    if cells is None or not len(cells):
        return []
    segs = cells.segments()
    counts = np.diff(cells.splits)
    targets = []
    start = 0
    for i in range(1, len(segs) + 1):  # cells come grouped by offsets
        if i == len(segs) or segs[i] != segs[start]:
            idx = np.arange(start, i)
            chunks = cells.chunks[idx]
            targets.append((f"{owner}/links/{delta:+d}/{segs[start]}", grid.cells(chunks),
                            [cells.payload_parts(j) for j in range(start, i)]))
            key = (owner, delta, segs[start])
            prev = out.links.get(key)
            c = counts[idx]
            out.links[key] = (chunks, c) if prev is None else (np.concatenate([prev[0], chunks]),
                                                               np.concatenate([prev[1], c]))
            start = i
    return targets


def build_levels(zstore, fine: LevelPoints, geoms: tuple[StepGeometry, ...],
                 result: BatchResult | None = None) -> BatchResult:
    """Build and write the levels ``geoms`` describe from ``fine`` (whole regions, storage order)."""
    out = result if result is not None else BatchResult()
    for geom in geoms:
        k = geom.level
        first = ".".join(map(str, fine.chunks[0])) if len(fine.chunks) else None
        with TaskStage(f"pyramid level {k}", f"pyramid level {k}: task over {len(fine.chunks)} level-{k - 1} chunks",
                       where=zstore, chunk=first):
            fail_point(f"level:{k}")
            coarse = stack.coarsen_level(fine, geom)
            up, down = stack.level_links(fine, coarse, geom)
            payloads = list(stack.encode_level(coarse.points, coarse.plan, geom.grid.dtype, geom.write_specs, level=k))
            targets = payload_targets(k, geom.grid, payloads, list(geom.write_specs)) if payloads else []
            for delta, owner, cells_, grid in ((1, k - 1, up, geom.fine_grid), (-1, k, down, geom.grid)):
                family = link_targets(cells_, owner, delta, grid, out)
                if delta in geom.returned_links:
                    out.link_cells.setdefault((owner, delta), []).extend(family)
                else:
                    targets += family
            nbytes = write_cells(zstore, targets, plain=geom.plain or None)
        out.levels[k] = ChunkSummary.from_plan(coarse.plan, nbytes)
        out.bytes_written += nbytes
        fine = coarse.points
    return out


def batch_task(target, geoms: tuple[StepGeometry, ...], fine_level: int, read_names: tuple, ndim: int,
               chunks: np.ndarray, obj, journal=None, record: tuple[str, str] | None = None):
    """Read the fine chunks of whole regions, build the batch's levels; returns ``(results, fork)``.

    With a ``journal``, the task is recorded finished (``record``: stage and
    name) with the chunks it covered, once its cells are written.
    """
    first = ".".join(map(str, chunks[0])) if len(chunks) else None
    with TaskStage(f"pyramid level {geoms[0].level}", f"pyramid level {geoms[0].level}: reading {len(chunks)} "
                   f"level-{fine_level} chunks", chunk=first, raw=True):
        zstore = worker_store(target)
        data = read_chunks(zstore, fine_level, chunks, list(read_names), ndim=ndim)
        g0 = geoms[0]
        fine = LevelPoints.from_chunk_data(data, chunks, ndim, g0.fine_grid.dtype, read_names,
                                           None if obj is not None else g0.fine_grid, g0.bins_per_chunk,
                                           g0.fine_scale)
        if obj is not None:
            oids, ok = row_object_ids(data, *obj)
            fine.object_ids = oids
            if not ok.all():
                fine = fine.take(np.flatnonzero(ok))
    out = build_levels(zstore, fine, geoms)
    if journal is not None:
        assert record is not None, "a journalled batch task is told what to record"
        journal.record(record[0], record[1], (np.asarray(chunks), out))
    return out, returned_fork(target)
