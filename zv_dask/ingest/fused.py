"""The coarse levels an ingest job builds inside its level-0 write tasks.

A write task holds whole chunks of level 0 in memory, sorted into storage
order. When its write group also holds whole pyramid *regions* of the first
coarse levels (:func:`~zv_dask.pyramid.plan.region_shape`), the task builds
those levels (and their cross-level links) on the spot instead of a later
round of tasks reading level 0 back. :func:`fused_steps` picks how many levels
fit (a group holds whole regions of the top one, within the group budget) and
the write units that makes; the rest of the pyramid runs in rounds as usual.
"""

from __future__ import annotations

import numpy as np

from zv_dask.ingest.shuffle import UnitGrid
from zv_dask.pyramid.builder import LevelSource, PyramidBuilder, drop_coarse_levels
from zv_dask.pyramid.options import PyramidOptions
from zv_dask.pyramid.plan import level_steps, region_loads, region_shape
from zv_dask.store.levels import ChunkSummary

__all__ = ["pyramid_options", "pyramid_builder", "fused_steps", "plan_fused_levels", "level0_source"]

DEFAULT_GROUP_POINTS = 1 << 21

def pyramid_options(pyramid, ndim: int, budget=None) -> PyramidOptions | None:
    """``ingest(pyramid=...)`` as :class:`~zv_dask.pyramid.options.PyramidOptions`, checked up front.

    The pyramid's tasks plan within the job's memory ``budget``.
    """
    opts = PyramidOptions.of_ingest(pyramid)
    if opts is None:
        return None
    level_steps(ndim, opts.levels, opts.bin_ratio, opts.chunk_scale)
    return opts.replace(memory_budget=budget) if budget is not None else opts


def pyramid_builder(zs, job, client, progress, opts: PyramidOptions, slots, meta=None):
    """A :class:`~zv_dask.pyramid.builder.PyramidBuilder` for ``ingest(pyramid=opts)`` (``zs=None``: plan only)."""
    return PyramidBuilder(zs, job, opts, client=client, progress=progress, slots=slots, meta=meta)


def fused_steps(builder, grid, occ, shard_shape, fused_points: int = DEFAULT_GROUP_POINTS):
    """The coarse levels the write tasks can build, and the write units that makes (``([], None)``: none).

    The first levels are built in the write tasks when a write group can hold
    whole regions of them (units of whole regions, and whole shards when
    sharded) within ``fused_points`` (what the memory budget allows a write
    task, or the ``group_points`` asked for); the others in rounds of their own.
    """
    n_points = int(occ.counts.sum())
    if builder.first_reason(n_points, len(occ.counts)):
        return [], None
    steps = builder.choose_steps(occ.chunks, occ.counts, (1,) * grid.ndim, budget=fused_points)
    if steps:  # a batch takes its first step whatever its regions hold; regions wider than a chunk must fit a task
        region = region_shape(steps[0], builder.bpc)
        if any(r != b for r, b in zip(region, builder.bpc)):
            _, biggest = region_loads(occ.chunks, occ.counts, builder.bpc, region)
            if biggest > fused_points:
                return [], None
    while steps:
        units = _units_for(builder, grid, shard_shape, steps)
        if units is not None:
            return steps, units
        steps = steps[:-1]
    return [], None


def _units_for(builder, grid, shard_shape, steps):
    """The write units holding whole regions of the last of ``steps`` (``None``: shards and regions do not nest)."""
    block = tuple(r // b for r, b in zip(region_shape(steps[-1], builder.bpc), builder.bpc))
    return UnitGrid.of(grid, shard_shape, block)


def plan_fused_levels(zs, job, client, progress, opts, grid, specs, occ, has_objects, shard_shape, units, slots,
                      fused_points: int, fused_levels: int | None = None):
    """The pyramid builder of an ingest job and the batch its write tasks build (``None``: none); arrays created.

    ``fused_levels`` (a resumed job) is how many levels the interrupted job's
    write tasks were building: the same batch, its arrays already made.
    """
    builder = pyramid_builder(zs, job, client, progress, opts, slots)
    builder.check_attributes(specs, grid.dtype)
    if fused_levels is None:
        drop_coarse_levels(zs)
        steps, fused_units = fused_steps(builder, grid, occ, shard_shape, fused_points)
    else:
        steps = [builder._peek(i) for i in range(fused_levels)]
        fused_units = _units_for(builder, grid, shard_shape, steps) if steps else None
    if not steps:
        return builder, None, units
    src = LevelSource(0, grid, (1,) * grid.ndim, occ.chunks, occ.counts, int(occ.counts.sum()), specs,
                      (np.zeros(0, np.int64),) * 3 if has_objects else None, None)
    batch = builder.plan_batch(src, steps)
    builder.building = batch.numbers
    if fused_levels is None:
        builder.prepare(batch)
    return builder, batch, fused_units


def level0_source(zs, grid, summary: ChunkSummary, vertex_count: int, specs):
    """The :class:`~zv_dask.pyramid.builder.LevelSource` of the level 0 just written."""
    nonempty = summary.rows > 0
    objects = summary.objects
    all_ids = np.unique(objects[0]) if objects is not None else None
    return LevelSource(0, grid, (1,) * grid.ndim, summary.chunks[nonempty], summary.rows[nonempty], vertex_count,
                       specs, objects, all_ids)


