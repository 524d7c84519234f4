"""Where each point goes inside a level: chunk, fragment and row order.

Two layouts exist (ZV format section 6):

* **bins** (plain points): fragment = base bin inside the chunk, every chunk
  holding a point gets ``prod(bins_per_chunk)`` range fragments, rows ordered
  by fragment and stable inside a fragment;
* **objects** (points with object ids): fragment = object, objects in a chunk
  ascending by id, rows grouped by object and stable inside an object.

Everything here is numpy on arrays already in memory. Sorting uses numpy's
radix sort on 16-bit keys (two stable passes for 32-bit keys), the fastest
stable sort numpy has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zv_dask.errors import FormatError
from zv_dask.format.cells import check_attribute, encode_attribute, encode_fragments, encode_vertices
from zv_dask.format.grid import Grid, chunk_keys

__all__ = ["stable_order", "ChunkPlan", "plan_chunks", "ChunkPayload", "declared_attributes", "encode_plan"]


def stable_order(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of non-negative integer keys, by 16-bit radix passes."""
    keys = np.asarray(keys)
    if keys.size == 0:
        return np.zeros(0, np.int64)
    top = int(keys.max())
    if top < 1 << 16:
        return np.argsort(keys.astype(np.uint16, copy=False), kind="stable")
    if top < 1 << 32:
        k = keys.astype(np.uint32, copy=False)
        o = np.argsort((k & 0xFFFF).astype(np.uint16), kind="stable")
        o2 = np.argsort((k[o] >> 16).astype(np.uint16), kind="stable")
        return o[o2]
    return np.argsort(keys, kind="stable")


def order_by(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Stable order by ``(major, minor)``, both non-negative integer arrays."""
    if len(minor) == 0:
        return np.zeros(0, np.int64)
    o = stable_order(minor)
    return o[stable_order(major[o])]


def dense_rank(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(uniques, rank)`` with uniques sorted ascending.

    Integer values over a compact range use a presence table (O(n)); anything
    else falls back to ``np.unique``.
    """
    values = np.asarray(values)
    if values.size and values.dtype.kind in "iu":
        lo, hi = int(values.min()), int(values.max())
        if hi - lo < 4 * values.size + (1 << 16):
            off = (values - lo).astype(np.int64, copy=False)
            present = np.zeros(hi - lo + 1, bool)
            present[off] = True
            lut = np.cumsum(present, dtype=np.int64) - 1
            return (np.flatnonzero(present) + lo).astype(values.dtype), lut[off]
    return np.unique(values, return_inverse=True)


@dataclass
class ChunkPlan:
    """The layout of a set of points over chunks.

    ``order`` permutes the input rows into storage order; chunk ``m`` holds rows
    ``order[row_splits[m]:row_splits[m+1]]`` and has fragments
    ``fragment_counts[frag_splits[m]:frag_splits[m+1]]``. For the objects layout,
    ``fragment_objects`` gives the object id of every fragment.
    """

    order: np.ndarray
    chunks: np.ndarray
    row_splits: np.ndarray
    frag_splits: np.ndarray
    fragment_counts: np.ndarray
    fragment_objects: np.ndarray | None = None

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    @property
    def keys(self) -> list[str]:
        return chunk_keys(self.chunks)


def _split_points(sorted_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique values of a sorted array and the row splits between them."""
    if len(sorted_ids) == 0:
        return sorted_ids[:0], np.zeros(1, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    return sorted_ids[starts], np.r_[starts, len(sorted_ids)].astype(np.int64)


def plan_chunks(positions: np.ndarray, grid: Grid, object_ids: np.ndarray | None = None,
                cells: np.ndarray | None = None, fragments: np.ndarray | None = None) -> ChunkPlan:
    """Lay out points (already inside the grid) into chunks and fragments.

    ``cells`` / ``fragments`` are the points' :meth:`Grid.assign` results when
    already known (they are then not computed again).
    """
    if cells is None or fragments is None:
        cells, fragments = grid.assign(positions)
    cell_u, cell_rank = dense_rank(np.asarray(cells))
    if object_ids is None:
        f = grid.fragments_per_chunk
        frag = np.asarray(fragments, np.int64)
        key = cell_rank.astype(np.int64) * f + frag
        order = stable_order(key)
        uniq, row_splits = _split_points(cell_rank[order])
        counts = np.bincount(key, minlength=len(cell_u) * f).astype(np.int64)
        frag_splits = np.arange(len(cell_u) + 1, dtype=np.int64) * f
        return ChunkPlan(order, grid.chunks_of_cell_ids(cell_u), row_splits, frag_splits, counts)
    obj_u, obj_rank = dense_rank(np.asarray(object_ids))
    order = order_by(cell_rank, obj_rank)
    _, row_splits = _split_points(cell_rank[order])
    pair = cell_rank[order].astype(np.int64) * len(obj_u) + obj_rank[order]
    pair_u, pair_splits = _split_points(pair)
    counts = np.diff(pair_splits)
    pair_chunk = pair_u // max(len(obj_u), 1)
    frag_splits = np.searchsorted(pair_chunk, np.arange(len(cell_u) + 1)).astype(np.int64)
    return ChunkPlan(order, grid.chunks_of_cell_ids(cell_u), row_splits, frag_splits, counts,
                     fragment_objects=obj_u[pair_u % max(len(obj_u), 1)])


@dataclass
class ChunkPayload:
    """Encoded cells of one chunk: vertices, vertex_fragments and each attribute."""

    chunk: tuple[int, ...]
    n_rows: int
    vertices: bytes
    fragments: bytes
    attributes: dict[str, bytes]


def declared_attributes(attributes: dict, specs, where: str = "") -> list:
    """``[(spec, values)]`` for the attribute arrays ``specs`` declares, checked against ``attributes``.

    ``specs`` are the declarations of a level's ``vertex_attributes`` arrays
    (objects with ``name``, ``dtype`` and ``channels``, such as
    :class:`~zv_dask.store.levels.AttributeSpec`). The values must hold exactly
    those names, each with the declared dtype and channel count
    (:func:`~zv_dask.format.cells.check_attribute`); a :class:`FormatError` says
    which attribute does not. Checked once per call, before any cell is encoded.
    """
    specs = list(specs)
    declared = [s.name for s in specs]
    if sorted(declared) != sorted(attributes):
        raise FormatError(f"{where + ': ' if where else ''}the attribute arrays are {sorted(declared)} but the "
                          f"values to write are {sorted(attributes)}")
    return [(s, check_attribute(attributes[s.name], s.dtype, s.channels, name=s.name, where=where or None))
            for s in specs]


def encode_plan(plan: ChunkPlan, positions: np.ndarray, attributes: dict[str, np.ndarray], dtype: str, specs, *,
                level: int | None = None):
    """Yield a :class:`ChunkPayload` per chunk of ``plan`` (a loop over chunks, not points).

    ``specs`` declare the level's attribute arrays (see :func:`declared_attributes`);
    every attribute cell is encoded against its declaration, so a value of
    another dtype is a :class:`FormatError` (naming ``level``) and never a cell.
    """
    pos = np.asarray(positions)
    where = f"level {level}" if level is not None else ""
    columns = declared_attributes(attributes, specs, where)
    for m in range(plan.n_chunks):
        rows = plan.order[plan.row_splits[m]:plan.row_splits[m + 1]]
        counts = plan.fragment_counts[plan.frag_splits[m]:plan.frag_splits[m + 1]]
        chunk = tuple(int(c) for c in plan.chunks[m])
        at = f"{where + ' ' if where else ''}chunk {'.'.join(map(str, chunk))}"
        yield ChunkPayload(
            chunk=chunk,
            n_rows=len(rows),
            vertices=encode_vertices(np.take(pos, rows, axis=0), dtype),
            fragments=encode_fragments(counts),
            attributes={s.name: encode_attribute(np.take(v, rows, axis=0), s.dtype, s.channels, name=s.name, where=at)
                        for s, v in columns},
        )
