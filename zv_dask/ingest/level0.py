"""The plan of a job's level-0 shuffle, made after the scan and before anything is written.

From the memory budget (:mod:`zv_dask.ingest.budget`) and what the scan
measured: the points per write group, whether the pieces wait in memory or on
scratch (:mod:`zv_dask.ingest.staging`), and the check that one write unit (a
chunk, or a shard) fits in a task at all. :func:`~zv_dask.ingest` and
:func:`~zv_dask.plan_ingest` (the dry run) both plan with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from zv_dask.budget import (
    MemoryBudget,
    ShufflePlan,
    plan_shuffle,
    rows_within,
    smallest_budget,
    split_bytes_per_point,
    write_bytes_per_point,
)
from zv_dask.budget import fmt_bytes as _fmt_bytes
from zv_dask.errors import InputError, StoreError
from zv_dask.format.grid import Grid
from zv_dask.ingest.fused import DEFAULT_GROUP_POINTS
from zv_dask.ingest.shuffle import Occupancy, UnitGrid, unit_ids
from zv_dask.ingest.sources import DEFAULT_PARTITION_ROWS, Source
from zv_dask.ingest.staging import PieceLayout, default_scratch

__all__ = ["Level0Plan", "plan_level0", "auto_group_points", "auto_partition_rows", "row_bytes", "MIN_AUTO_ROWS"]

MIN_AUTO_ROWS = 1 << 17  # below this, per-task overhead outweighs balance


def row_bytes(src: Source, dtype: str) -> tuple[int, int]:
    """Bytes per point ``(as read, as stored)``: positions, attributes and object ids."""
    attrs = sum(np.dtype(d).itemsize * (c or 1) for d, c in src.attributes.values())
    oids = 8 if src.has_object_ids else 0
    return (src.ndim * np.dtype(src.position_dtype).itemsize + attrs + oids,
            src.ndim * np.dtype(dtype).itemsize + attrs + oids)


def auto_partition_rows(points, partition_rows: int | None, slots: int, cap: int | None = None) -> int | None:
    """Rows per partition: as given, else for an in-memory array ~4 partitions per worker thread, and at
    most ``cap`` (what the memory budget allows) for every input that is read in row ranges."""
    if partition_rows is not None:
        return partition_rows
    rows = cap
    if hasattr(points, "shape") and not hasattr(points, "dask") and len(points.shape) == 2:
        rows = int(min(DEFAULT_PARTITION_ROWS, max(MIN_AUTO_ROWS, -(-points.shape[0] // (4 * slots)))))
        if cap is not None:
            rows = min(rows, cap)
    return rows


def auto_group_points(group_points: int | None, n_points: int, slots: int, cap: int = DEFAULT_GROUP_POINTS) -> int:
    """Points per write group: as given, else at most ``cap`` and ~4 groups per worker thread."""
    if group_points is not None:
        return int(group_points)
    return max(1, min(cap, DEFAULT_GROUP_POINTS, max(MIN_AUTO_ROWS, -(-n_points // (4 * slots)))))


def partition_cap(budget: MemoryBudget, src: Source, dtype: str) -> int:
    """The most rows per input partition the budget allows for this source."""
    in_row, _ = row_bytes(src, dtype)
    piece = PieceLayout.of(Grid((0.0,) * src.ndim, (0.0,) * src.ndim, (1.0,) * src.ndim, (1.0,) * src.ndim, dtype),
                           src.attributes, src.has_object_ids).row_bytes
    return rows_within(budget.per_task, split_bytes_per_point(in_row, piece), DEFAULT_PARTITION_ROWS,
                       MIN_AUTO_ROWS // 8)


@dataclass
class Level0Plan:
    """Group size, shuffle mode and piece layout of one job's level 0."""

    budget: MemoryBudget
    layout: PieceLayout
    target_points: int
    fused_points: int  # the most points a write group may take to build the first coarse levels
    shuffle: ShufflePlan
    warnings: list = field(default_factory=list)

    @property
    def staged(self) -> bool:
        return self.shuffle.mode == "staged"


def _largest_unit(grid: Grid, occ: Occupancy, shard_shape) -> tuple[int, str]:
    """Points in the fullest write unit (a chunk, or a shard) and what it is, for messages."""
    if not len(occ.counts):
        return 0, "chunk"
    if shard_shape is None:
        i = int(np.argmax(occ.counts))
        return int(occ.counts[i]), "chunk " + ".".join(map(str, occ.chunks[i]))
    units = UnitGrid.of(grid, shard_shape)
    ids = unit_ids(grid, occ.chunks, units)
    uniq, inv = np.unique(ids, return_inverse=True)
    per = np.bincount(inv.reshape(-1), weights=occ.counts)
    return int(per.max()), "shard"


def plan_level0(src: Source, grid: Grid, occ: Occupancy, partition_counts: list[int], budget: MemoryBudget, *,
                group_points: int | None, slots: int, shard_shape=None, shipped: bool = False) -> Level0Plan:
    """Plan the shuffle within ``budget``; raises :class:`InputError` when one write unit cannot fit.

    ``shipped``: the input is in this process's memory and the job copies it to
    the workers (a distributed client), where it counts against the budget.
    """
    in_row, stored_row = row_bytes(src, grid.dtype)
    layout = PieceLayout.of(grid, src.attributes, src.has_object_ids)
    piece_row = layout.row_bytes
    n_points = int(occ.counts.sum())
    cap = rows_within(budget.per_task, write_bytes_per_point(piece_row, stored_row), DEFAULT_GROUP_POINTS, 1)
    unit_points, unit = _largest_unit(grid, occ, shard_shape)
    need = smallest_budget(budget, unit_points, piece_row, stored_row)
    if unit_points > cap and group_points is None:
        raise InputError(f"memory budget {_fmt_bytes(budget.per_worker)} per worker is too small: {unit} holds "
                         f"~{unit_points:,} points, which one task must hold at once; the smallest budget that "
                         f"works is ~{_fmt_bytes(need)} (memory_budget=..., --memory-budget), or use a smaller "
                         "chunk shape" + (" or shard shape" if shard_shape is not None else ""))
    target = auto_group_points(group_points, n_points, slots, cap)
    fused = int(group_points) if group_points is not None else max(target, cap)
    largest_partition = max(partition_counts, default=0)
    shuffle = plan_shuffle(budget, n_points=n_points, largest_partition=largest_partition,
                           largest_group=max(target, unit_points), in_row=in_row, piece_row=piece_row,
                           stored_row=stored_row, resident_row=in_row if shipped else 0)
    warnings = []
    if shuffle.peak_per_worker > budget.per_worker:
        warnings.append(f"even with the shuffle staged the job needs ~{_fmt_bytes(shuffle.peak_per_worker)} per "
                        f"worker, over the memory budget of {_fmt_bytes(budget.per_worker)}"
                        + (" (the in-memory input is copied to the workers: pass files or a dask collection)"
                           if shipped else " (fewer threads per worker, or smaller partitions, would fit)"))
    part_peak = largest_partition * split_bytes_per_point(in_row, piece_row)
    if part_peak > budget.per_task:
        warnings.append(f"the largest input partition holds {largest_partition:,} points (~{_fmt_bytes(part_peak)} "
                        f"in one task), over the task budget of {_fmt_bytes(budget.per_task)}: split the input "
                        "more finely (smaller files or row groups, or partition_rows)")
    return Level0Plan(budget, layout, target, fused, shuffle, warnings)


def _location(plan) -> tuple[str | None, bool, dict]:
    """``(url, icechunk?, storage options)`` of a job's target, before it is created."""
    import os

    existing = plan.existing if plan.existing is not None else (
        plan.target if hasattr(plan.target, "backend") else None)
    if existing is not None:
        be = existing.backend
        return be.url, be.kind == "icechunk", dict(be.options or {})
    if isinstance(plan.target, (str, os.PathLike)):
        return os.fspath(plan.target), plan.backend == "icechunk", dict(plan.storage_options or {})
    return None, False, {}


def scratch_for(plan, client, scratch, l0: Level0Plan):
    """The scratch space of a staged job (:func:`~zv_dask.ingest.staging.default_scratch`), with room checked.

    On a local file system the free space must hold every piece of the job, or
    :class:`~zv_dask.errors.StoreError` says how much is missing before anything is written.
    """
    url, icechunk, options = _location(plan)
    sc = default_scratch(url, icechunk=icechunk, options=options, client=client, scratch=scratch)
    free = sc.free_bytes()
    need = int(l0.shuffle.staged_bytes * 1.05) + (1 << 20)  # pieces are padded to 8 bytes per column
    if free is not None and free < need:
        raise StoreError(f"the staged shuffle needs ~{_fmt_bytes(need)} of scratch space at {sc.url} but only "
                         f"{_fmt_bytes(free)} is free; free space there, pass another scratch location "
                         "(scratch=..., --scratch) or a larger memory budget")
    return sc
