"""What the tasks of an ingest job do on a worker: scan, split (or stage), write a group.

Top-level functions, so that they pickle by reference. The coordinator side is
:mod:`zv_dask.ingest.graph`.
"""

from __future__ import annotations

import numpy as np

from zv_dask.errors import IngestError, TaskStage
from zv_dask.faults import fail_point
from zv_dask.format.grid import Grid
from zv_dask.format.layout import plan_chunks
from zv_dask.ingest.shuffle import merge_pieces, scan_partition, split_partition
from zv_dask.ingest.staging import PieceLayout, Scratch, load_group, stage_partition
from zv_dask.pyramid.stack import LevelPoints, encode_level
from zv_dask.pyramid.tasks import BatchResult, build_levels
from zv_dask.store.cellio import cell_keys
from zv_dask.store.journal import Journal
from zv_dask.store.levels import ChunkSummary, read_chunks, write_chunk_payloads
from zv_dask.store.objects import chunks_in, row_object_ids
from zv_dask.store.preimage import restore_cells, save_cells
from zv_dask.transaction import returned_fork, worker_store

__all__ = ["scan_task", "split_task", "stage_task", "write_group", "write_staged_group", "append_group"]


def scan_task(batch, grid, bounds, drop_outside, offset, sample=True):
    """Pass 1 on one partition (:func:`~zv_dask.ingest.shuffle.scan_partition`)."""
    return scan_partition(batch, grid, bounds, drop_outside, offset, sample)


def split_task(batch, grid, starts, drop_outside, units, layout: PieceLayout, skip=None):
    """Pass 2, in-memory shuffle: the partition's piece of every write group (none of the ``skip`` ones)."""
    return tuple(split_partition(layout.conform(batch), grid, starts, drop_outside, units, skip))


def stage_task(batch, grid, starts, drop_outside, units, layout: PieceLayout, scratch: Scratch, index: int,
               skip=None):
    """Pass 2, staged shuffle: the partition's pieces put on scratch; returns where they are."""
    return stage_partition(layout.conform(batch), grid, starts, drop_outside, units, layout, scratch, index, skip)


def _recorded(result, journal: Journal | None, group_index: int):
    """Mark the group finished in the job's journal (after its cells), and hand the result on."""
    if journal is not None:
        summary, coarse, _ = result
        try:
            journal.record("level0", f"{group_index:07d}", (summary, coarse))
        except Exception as e:
            raise IngestError(f"writing group {group_index}: recording it in the job's journal failed: {e}",
                              stage="write") from e
    return result


def write_staged_group(refs, scratch: Scratch, layout: PieceLayout, grid: Grid, level: int, target, attributes,
                       group_index: int, geoms=(), journal: Journal | None = None):
    """:func:`write_group` of a group whose pieces are on scratch (``refs``: where, in input order)."""
    with TaskStage("write", f"reading the staged pieces of group {group_index} from {scratch.where()}", raw=True):
        batch = load_group(scratch, layout, refs)
    return _recorded(_write_batch(batch, grid, level, target, attributes, group_index, geoms), journal,
                     group_index)


def write_group(pieces, grid: Grid, level: int, target, attributes, group_index: int, geoms=(),
                journal: Journal | None = None):
    """Write one group's chunks, and the coarse levels ``geoms`` describe (whole regions).

    ``attributes`` are the level's :class:`~zv_dask.store.levels.AttributeSpec`,
    as its arrays declare them: the cells are encoded against them, so values of
    another dtype fail the task with a :class:`~zv_dask.errors.FormatError`.
    Returns ``(ChunkSummary, BatchResult or None, fork or None)``; with a
    ``journal``, records the group finished once its cells are written.
    """
    return _recorded(_write_batch(merge_pieces(list(pieces)), grid, level, target, attributes, group_index, geoms),
                     journal, group_index)


def _lay_out(positions, attributes: dict, oids, grid: Grid, cells=None, fragments=None):
    """``(ChunkPlan, LevelPoints)``: points laid out in storage order (chunks, fragments), ready to encode."""
    plan = plan_chunks(positions, grid, oids, cells, fragments)
    o = plan.order
    level0 = LevelPoints.from_plan(np.take(positions, o, axis=0),
                                   {k: np.take(np.asarray(v), o, axis=0) for k, v in attributes.items()},
                                   None if oids is None else oids[o], plan, grid.bins_per_chunk, (1,) * grid.ndim)
    return plan, level0


def _write_batch(batch, grid: Grid, level: int, target, attributes, group_index: int, geoms=()):
    if batch is None:
        empty = ChunkSummary(np.zeros((0, grid.ndim), np.int64), np.zeros(0, np.int64))
        return empty, (BatchResult() if geoms else None), returned_fork(target)
    zstore = worker_store(target)
    with TaskStage("write", f"writing group {group_index}", where=zstore) as st:
        fail_point(f"group:{group_index}")
        oids = None if batch.object_ids is None else np.asarray(batch.object_ids).astype(np.int64)
        plan, level0 = _lay_out(batch.positions, batch.attributes, oids, grid, batch.cells, batch.fragments)
        st.chunk = ".".join(map(str, plan.chunks[0])) if plan.n_chunks else None
        del batch
        specs = list(attributes)
        nbytes = write_chunk_payloads(zstore, level, grid, list(encode_level(level0, plan, grid.dtype, specs,
                                                                             level=level)), specs)
    summary = ChunkSummary.from_plan(plan, nbytes)
    coarse = build_levels(zstore, level0, tuple(geoms)) if geoms else None
    return summary, coarse, returned_fork(target)


def append_group(pieces, grid: Grid, target, attributes, group_index: int, old_chunks: np.ndarray, old_objects,
                 journal: Journal | None = None, scratch: Scratch | None = None, layout: PieceLayout | None = None):
    """Append one group's new points to the level-0 chunks they fall in.

    ``old_chunks`` are the group's chunks that hold points already, and
    ``old_objects`` their ``(oid, chunk, fragment)`` entries (stores with object
    ids); ``attributes`` the store's level-0 :class:`~zv_dask.store.levels.AttributeSpec`.
    Each touched chunk is laid out again from its old rows followed by the
    new ones in input order, which is the cell an ingest of both would write.
    With a ``journal`` (plain stores) the touched cells' old bytes are kept
    first; a retried task puts them back before it starts. ``pieces`` are the
    group's pieces, or with ``scratch`` where they were staged.
    Returns ``(ChunkSummary, fork or None)``; the summary's ``extra["old_rows"]``
    counts the rows the touched chunks held before.
    """
    ndim = grid.ndim
    specs = list(attributes)
    attr_names = [s.name for s in specs]
    zstore = worker_store(target)
    with TaskStage("write", f"appending group {group_index}", where=zstore) as st:
        if scratch is not None:
            assert layout is not None, "staged pieces come with their layout"
            batch = load_group(scratch, layout, pieces)
        else:
            batch = merge_pieces(list(pieces))
        if batch is None:
            empty = ChunkSummary(np.zeros((0, ndim), np.int64), np.zeros(0, np.int64), extra={"old_rows": 0})
            return empty, returned_fork(target)
        fail_point(f"group:{group_index}")
        cells = np.unique(np.asarray(batch.cells, np.int64))
        touched = grid.chunks_of_cell_ids(cells).reshape(-1, ndim)
        first = st.chunk = ".".join(map(str, touched[0]))
        if journal is not None:
            arrays = ["0/vertices", "0/vertex_fragments"] + [f"0/vertex_attributes/{n}" for n in attr_names]
            keys = [k for a in arrays for k in cell_keys(a, grid.cells(touched))]
            unit = f"level0-{group_index:07d}"
            if not restore_cells(zstore, journal, unit):  # (a retried task: the cells are as they were again)
                save_cells(zstore, journal, unit, keys)
        old_chunks = np.asarray(old_chunks, np.int64).reshape(-1, ndim)
        old_chunks = old_chunks[chunks_in(old_chunks, touched)]  # (the group's range holds untouched ones too)
        data = read_chunks(zstore, 0, old_chunks, list(attr_names), ndim=ndim) if len(old_chunks) else []
        n_old = int(sum(len(d.positions) for d in data))
        new_oids = None if batch.object_ids is None else np.asarray(batch.object_ids).astype(np.int64)
        positions = np.concatenate([d.positions for d in data] + [np.asarray(batch.positions)]) if data \
            else np.asarray(batch.positions)
        attrs = {n: np.concatenate([d.attributes[n] for d in data] + [np.asarray(batch.attributes[n])]) if data
                 else np.asarray(batch.attributes[n]) for n in attr_names}
        oids = new_oids
        if new_oids is not None and data:
            old_ids, named = row_object_ids(data, *old_objects)
            if not named.all():
                raise IngestError(f"level-0 chunk {first}: {int((~named).sum())} stored rows belong to no object "
                                  "in the object index; the store is inconsistent (validate it)", stage="write",
                                  chunk=first)
            oids = np.concatenate([old_ids, new_oids])
        plan, level0 = _lay_out(positions, attrs, oids, grid)
        nbytes = write_chunk_payloads(zstore, 0, grid, list(encode_level(level0, plan, grid.dtype, specs, level=0)),
                                      specs)
    summary = ChunkSummary.from_plan(plan, nbytes)
    summary.extra["old_rows"] = n_old
    return summary, returned_fork(target)
