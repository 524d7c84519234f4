"""Coarse levels and their cross-level links from the points of whole regions: pure numpy, no I/O.

A task of the pyramid (or an ingest write task, which already holds its level-0
points) owns whole *regions* of a level step: every fine chunk, coarse chunk
and coarse bin of a region lies inside it (:func:`~zv_dask.pyramid.plan.region_shape`).
Regions of one step nest in the regions of the next, so a task that owns the
regions of level ``b`` can build levels ``a..b`` one after the other without
looking outside its points. This module does that:

* :class:`LevelPoints` is a level's points in *storage order* (rows grouped by
  chunk, in the order the cells hold them), so a row's chunk and its row index
  inside the chunk (``vi``) are what links refer to;
* :func:`coarsen_level` makes the next level (its points in storage order and
  its cell layout) and, per fine row, the storage row of its metavertex;
* :func:`level_links` turns that parent map into the ``+1`` cells of the fine
  level and the mirrored ``-1`` cells of the coarse level (ZV format section 9);
* :func:`encode_level` gives the cell payloads of a level.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zv_dask.format.cells import encode_attribute, encode_fragments, raw_view
from zv_dask.format.grid import Grid
from zv_dask.format.layout import ChunkPayload, ChunkPlan, declared_attributes
from zv_dask.format.links import LinkCells, plan_link_cells, plan_link_runs
from zv_dask.pyramid.coarsen import CoarsenParams, coarsen_points, coarsen_runs, plan_coarse

__all__ = ["LevelPoints", "StepGeometry", "bin_runs", "stored_runs", "coarsen_level", "level_links", "encode_level"]


@dataclass
class LevelPoints:
    """Points of (part of) a level in storage order: chunk ``m`` holds rows ``row_splits[m]:row_splits[m+1]``.

    ``vi`` is each row's index inside its chunk's vertex buffer; it differs from
    the running position only when rows were left out (see :meth:`take`). Both
    per-row maps are made on first use (the bin-run paths never need them).
    """

    positions: np.ndarray
    attributes: dict
    object_ids: np.ndarray | None
    chunks: np.ndarray  # (m, D) absolute chunk coordinates
    row_splits: np.ndarray | None  # (m+1,) when the rows are exactly the chunks' rows
    runs: tuple | None = None  # (splits, first base bin (R, D), width (D,)): rows of a run share a bin
    _chunk_index: np.ndarray | None = None  # (n,) row -> index into chunks
    _vi: np.ndarray | None = None  # (n,) row inside its chunk's cells

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def chunk_index(self) -> np.ndarray:
        if self._chunk_index is None:
            counts = np.diff(self._splits())
            self._chunk_index = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        return self._chunk_index

    @property
    def vi(self) -> np.ndarray:
        if self._vi is None:
            self._vi = np.arange(len(self), dtype=np.int64) - self._splits()[:-1][self.chunk_index]
        return self._vi

    def _splits(self) -> np.ndarray:
        assert self.row_splits is not None, "a level without row splits (a take) is made with its per-row maps"
        return self.row_splits

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(chunk index, vi)`` of some rows, without the per-row maps when the rows are whole chunks."""
        rows = np.asarray(rows, np.int64)
        if self._chunk_index is None and self.row_splits is not None:
            idx = np.searchsorted(self.row_splits, rows, side="right") - 1
            return idx, rows - self.row_splits[idx]
        return self.chunk_index[rows], self.vi[rows]

    @classmethod
    def from_layout(cls, positions, attributes, object_ids, chunks, row_splits, runs=None) -> LevelPoints:
        """Points already in storage order, ``row_splits`` (m+1) cutting them into ``chunks``."""
        row_splits = np.asarray(row_splits, np.int64)
        return cls(positions, attributes, object_ids,
                   np.asarray(chunks, np.int64).reshape(len(row_splits) - 1, -1), row_splits, runs)

    @classmethod
    def from_plan(cls, positions, attributes, object_ids, plan: ChunkPlan, bins_per_chunk, scale) -> LevelPoints:
        """Points in the storage order of ``plan`` (a bins layout also gives the rows' bin runs)."""
        return cls.from_layout(positions, attributes, object_ids, plan.chunks, plan.row_splits,
                               bin_runs(plan, bins_per_chunk, scale) if plan.fragment_objects is None else None)

    @classmethod
    def from_chunk_data(cls, data: list, chunks: np.ndarray, ndim: int, dtype: str, names, grid: Grid | None = None,
                        bins_per_chunk=None, scale=None) -> LevelPoints:
        """Decoded chunks (:func:`~zv_dask.store.levels.read_chunks`, in the order of ``chunks``) as one block.

        With ``grid``, ``bins_per_chunk`` and the level's chunk ``scale``, a bins
        layout also gives its (checked) bin runs.
        """
        counts = np.array([len(d.positions) for d in data], np.int64)
        splits = np.r_[0, np.cumsum(counts)].astype(np.int64)
        pos = np.concatenate([d.positions for d in data]) if data else np.zeros((0, ndim), dtype)
        attrs = {n: np.concatenate([d.attributes[n] for d in data]) for n in names} if data else {}
        chunks = np.asarray(chunks, np.int64).reshape(-1, ndim)
        runs = None
        if grid is not None and bins_per_chunk is not None:
            runs = stored_runs(data, chunks, pos, grid, bins_per_chunk, scale)
        return cls.from_layout(pos, attrs, None, chunks, splits, runs)

    def take(self, rows: np.ndarray) -> LevelPoints:
        """A subset of rows (their ``vi`` stay those of the cells they came from; runs are dropped)."""
        return LevelPoints(self.positions[rows], {k: v[rows] for k, v in self.attributes.items()},
                           None if self.object_ids is None else self.object_ids[rows], self.chunks, None, None,
                           self.chunk_index[rows], self.vi[rows])


@dataclass(frozen=True)
class StepGeometry:
    """What a task needs to make level ``level`` from its parent (all picklable, small)."""

    level: int
    fine_grid: Grid
    grid: Grid
    bins_per_chunk: tuple[int, ...]
    fine_scale: tuple[int, ...]  # S_{k-1}: parent chunk in root chunks
    scale: tuple[int, ...]  # S_k
    params: CoarsenParams
    links: str  # "none", "implicit" (+1 only) or "explicit" (+1 and -1)
    write_specs: tuple = ()  # the level's AttributeSpecs, in the order its arrays were created: what cells hold
    plain: bool = False  # every array of the level (and its links) is plain vlen-bytes: PUT cells directly
    returned_links: tuple[int, ...] = ()  # link families (deltas) whose cells go back to the coordinator

    @property
    def write_names(self) -> tuple[str, ...]:
        """The names of the level's attributes (of :attr:`write_specs`)."""
        return tuple(s.name for s in self.write_specs)


@dataclass
class CoarseLevel:
    """A coarse level made by :func:`coarsen_level`."""

    points: LevelPoints
    plan: ChunkPlan
    parent_rows: np.ndarray | None  # per fine row, the storage row of its metavertex
    run_parent_rows: np.ndarray | None = None  # or, when made from runs, per fine run


def bin_runs(plan: ChunkPlan, bins_per_chunk, scale) -> tuple:
    """The runs of rows sharing a bin in a bins layout: ``(splits, first base bin, width)``.

    Fragment ``f`` of a chunk is the ``scale``-wide bin at ``local = unravel(f)``
    (base bins for ``scale`` 1); its rows are consecutive in storage order.
    """
    return _runs_of(plan.chunks, plan.fragment_counts, bins_per_chunk, scale)


def _runs_of(chunks, fragment_counts, bins_per_chunk, scale) -> tuple:
    bpc = np.asarray(bins_per_chunk, np.int64)
    sc = np.asarray(scale, np.int64)
    f = int(np.prod(bpc))
    counts = np.asarray(fragment_counts, np.int64)
    nz = np.flatnonzero(counts)
    splits = np.r_[0, np.cumsum(counts[nz])].astype(np.int64)
    local = np.stack(np.unravel_index(nz % f, tuple(int(b) for b in bpc)), axis=1).astype(np.int64)
    first = (np.asarray(chunks, np.int64).reshape(-1, len(bpc))[nz // f] * bpc + local) * sc
    return splits, first.reshape(-1, len(bpc)), sc


def stored_runs(data: list, chunks: np.ndarray, positions: np.ndarray, grid: Grid, bins_per_chunk,
                scale) -> tuple | None:
    """The bin runs of decoded chunks whose fragments are the layout's bins, checked against the positions.

    ``None`` when the fragments are not ``prod(bins_per_chunk)`` tiling ranges
    (object levels, the reference's coarse levels) or when a row lies outside
    the bin its fragment claims.
    """
    f = int(np.prod(np.asarray(bins_per_chunk, np.int64)))
    for d in data:
        c = d.fragment_counts
        if len(c) != f or (c < 0).any() or d.fragment_starts[0] != 0 or \
                (d.fragment_starts[1:] != np.cumsum(c)[:-1]).any():
            return None
    if not data:
        return None
    runs = _runs_of(chunks, np.concatenate([d.fragment_counts for d in data]), bins_per_chunk, scale)
    splits, first, width = runs
    if int(splits[-1]) != len(positions):
        return None
    claimed = np.repeat(np.floor_divide(first, width), np.diff(splits), axis=0)
    if not np.array_equal(np.floor_divide(grid.base_bins(positions), width), claimed):
        return None
    return runs


def _coarse_runs(fine: LevelPoints, ratio) -> tuple[np.ndarray, np.ndarray] | None:
    """``(splits, coarse bins)`` of the fine runs when each run lies in one coarse bin."""
    if fine.runs is None or fine.object_ids is not None:
        return None
    splits, first, width = fine.runs
    ratio = np.asarray(ratio, np.int64)
    if (ratio % width).any():
        return None
    return splits, np.floor_divide(first, ratio)


def coarsen_level(fine: LevelPoints, step: StepGeometry) -> CoarseLevel:
    """Coarsen ``fine`` (whole regions, storage order) into the next level, laid out in storage order."""
    runs = _coarse_runs(fine, step.params.ratio)
    ratio = np.asarray(step.params.ratio, np.int64)
    if runs is not None and step.params.method == "centroid":
        coarse = coarsen_runs(fine.positions, fine.attributes, step.params, *runs,
                              bins_of=lambda p: np.floor_divide(step.fine_grid.base_bins(p), ratio))
    else:
        bins = None if runs is not None else step.fine_grid.base_bins(fine.positions)
        coarse = coarsen_points(fine.positions, bins, fine.attributes, step.params, fine.object_ids, runs=runs)
    plan = plan_coarse(step.grid.base_bins(coarse.positions), step.bins_per_chunk, step.scale, coarse.object_ids)
    o = plan.order
    points = LevelPoints.from_plan(np.take(coarse.positions, o, axis=0),
                                   {k: np.take(v, o, axis=0) for k, v in coarse.attributes.items()},
                                   None if coarse.object_ids is None else coarse.object_ids[o], plan,
                                   step.bins_per_chunk, step.scale)
    where = np.empty(len(o), np.int64)
    where[o] = np.arange(len(o), dtype=np.int64)
    if coarse.run_parents is not None:
        return CoarseLevel(points, plan, None, where[coarse.run_parents] if len(o) else np.zeros(0, np.int64))
    return CoarseLevel(points, plan, where[coarse.parents] if len(o) else np.zeros(0, np.int64))


def level_links(fine: LevelPoints, coarse: CoarseLevel,
                step: StepGeometry) -> tuple[LinkCells | None, LinkCells | None]:
    """The ``+1`` cells of the fine level and (``explicit``) the ``-1`` cells of the coarse level."""
    if step.links == "none":
        return None, None
    c = coarse.points
    if coarse.run_parent_rows is not None:  # one run of records per fine bin
        assert fine.runs is not None, "a coarse level made from runs has a fine level with runs"
        splits = fine.runs[0]
        first = splits[:-1]
        lens = np.diff(splits)
        s = coarse.run_parent_rows
        f_idx, f_vi = fine.locate(first)
        c_idx, c_vi = c.locate(s)
        up = plan_link_runs(fine.chunks, f_idx, f_vi, 1, c.chunks, c_idx, c_vi, 0, lens, step.fine_scale, step.scale)
        if step.links != "explicit":
            return up, None
        down = plan_link_runs(c.chunks, c_idx, c_vi, 0, fine.chunks, f_idx, f_vi, 1, lens, step.scale,
                              step.fine_scale)
        return up, down
    assert coarse.parent_rows is not None, "a coarse level has parent rows where it has no run parent rows"
    c_idx, c_vi = c.locate(coarse.parent_rows)
    up = plan_link_cells(fine.chunks, fine.chunk_index, fine.vi, c.chunks, c_idx, c_vi, step.fine_scale, step.scale)
    if step.links != "explicit":
        return up, None
    down = plan_link_cells(c.chunks, c_idx, c_vi, fine.chunks, fine.chunk_index, fine.vi, step.scale,
                           step.fine_scale)
    return up, down


def encode_level(points: LevelPoints, plan: ChunkPlan, dtype: str, specs, *, level: int | None = None):
    """Yield a :class:`~zv_dask.format.layout.ChunkPayload` per chunk of a level in storage order.

    Payloads are views of ``points`` where the layout allows (no copy until the
    write). ``specs`` declare the level's attribute arrays: each attribute cell is
    encoded against its declaration (:func:`~zv_dask.format.cells.encode_attribute`),
    so values of another dtype are a :class:`~zv_dask.errors.FormatError` naming
    ``level``, the attribute and both dtypes, not a cell of the wrong width.
    """
    pos = points.positions
    rs = plan.row_splits
    where = f"level {level}" if level is not None else ""
    columns = declared_attributes(points.attributes, specs, where)
    for m in range(plan.n_chunks):
        a, b = int(rs[m]), int(rs[m + 1])
        counts = plan.fragment_counts[plan.frag_splits[m]:plan.frag_splits[m + 1]]
        chunk = tuple(int(x) for x in plan.chunks[m])
        at = f"{where + ' ' if where else ''}chunk {'.'.join(map(str, chunk))}"
        yield ChunkPayload(
            chunk=chunk,
            n_rows=b - a,
            vertices=raw_view(pos[a:b], dtype),
            fragments=encode_fragments(counts),
            attributes={s.name: encode_attribute(v[a:b], s.dtype, s.channels, name=s.name, where=at, view=True)
                        for s, v in columns},
        )
