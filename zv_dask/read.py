"""Lazy readers: a level (or a box of it) as a dask DataFrame or an xarray Dataset.

Columns: one per axis, named after the root ``multiscales`` axes (``x``, ``y``,
``z`` by default); one per attribute, a multi-channel attribute ``rgb`` of C
channels becoming ``rgb_0`` ... ``rgb_{C-1}``; and ``object_id`` (int64) when
the level has an object index. Rows come chunk by chunk (chunks in ascending
coordinate order), in each chunk's storage order.

Index: ``point`` (int64), a stable id per point, ``chunk_number * 2**32 + row``:
``chunk_number`` is the C-order number of the chunk's cell in the level's chunk
grid (absolute chunk minus ``vertices.chunk_grid_origin``, in the ``vertices``
array's shape) and ``row`` the point's row in that chunk's stored order. Ids do
not depend on the box or the object filter, so a box read and a full read give
a point the same id; an append that grows the grid renumbers. Rows are in
ascending id order, so the divisions are known from the plan alone: partition
``i`` starts at the id of its first chunk's row 0, and the last ends at its last
chunk's row ``2**32 - 1`` (loose bounds, nothing read). A grid of more than
``2**31`` cells (or a chunk outside the array's grid) numbers chunks by their
rank in the level's sorted ``nonempty_chunks`` instead, which is still unique
and ordered but changes when chunks are added.

Only chunks that are listed in ``vertices.nonempty_chunks`` *and* touch the box
are read: :func:`read_plan` returns them, one group of chunks per partition.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import zarr

from zv_dask.errors import FormatError, InputError, MetadataError, UnfinishedJobError
from zv_dask.format.cells import decode_fragments
from zv_dask.format.grid import Grid, parse_chunk_key
from zv_dask.store.api import as_store, get_resolution_level
from zv_dask.store.levels import LevelCells, level_cells, level_chunk_keys, level_grid, read_chunks
from zv_dask.store.nodes import array_at, attrs_of, group_at
from zv_dask.store.objects import chunks_in, object_entries, row_object_ids
from zv_dask.types import BoxLike, StoreLike

if TYPE_CHECKING:
    from collections.abc import Sequence

    import dask.dataframe as dd
    import pandas as pd
    import xarray as xr

__all__ = ["read_points", "open_level", "read_plan", "parse_box", "require_finished"]

MAX_PARTITIONS = 2048
ROW_BITS = 32  # point id = chunk_number << ROW_BITS | row


# -- planning ----------------------------------------------------------------------------
def parse_box(bbox, ndim: int):
    """``bbox=(min_corner, max_corner)`` as two float64 arrays (``None`` stays ``None``), checked."""
    if bbox is None:
        return None
    try:
        lo, hi = (np.asarray(b, np.float64).reshape(-1) for b in bbox)
    except (TypeError, ValueError):
        raise InputError(f"bbox must be (min_corner, max_corner), got {bbox!r}") from None
    if len(lo) != ndim or len(hi) != ndim:
        raise InputError(f"bbox corners need {ndim} values each, got {bbox!r}")
    if (lo > hi).any():
        raise InputError(f"bbox is inverted: min {lo.tolist()} exceeds max {hi.tolist()} on some axis")
    return lo, hi


def _touched(root: zarr.Group, level: int, ndim: int, box) -> tuple[Grid, np.ndarray]:
    g = group_at(root, str(level))
    grid = level_grid(root, level)
    keys = level_chunk_keys(g)
    chunks = np.array([parse_chunk_key(k) for k in keys], np.int64).reshape(-1, ndim)
    if box is not None and len(chunks):
        chunks = chunks[chunks_in(chunks, grid.chunks_touching(*box))]
    if len(chunks):
        chunks = chunks[np.lexsort(chunks.T[::-1])]
    return grid, chunks


def read_plan(store, *, level: int = 0, bbox=None, chunks_per_partition: int | None = None) -> list[np.ndarray]:
    """The chunks a read opens, as one ``(m, D)`` array per partition (ascending chunk order)."""
    zs = as_store(store)
    ndim = zs.metadata.ndim
    get_resolution_level(zs, level)
    _, chunks = _touched(zs.root, level, ndim, parse_box(bbox, ndim))
    return _partition(chunks, chunks_per_partition)


def _partition(chunks: np.ndarray, chunks_per_partition: int | None) -> list[np.ndarray]:
    if not len(chunks):
        return []
    per = chunks_per_partition or max(1, math.ceil(len(chunks) / MAX_PARTITIONS))
    if per < 1:
        raise InputError(f"chunks_per_partition must be >= 1, got {chunks_per_partition}")
    return [chunks[i:i + per] for i in range(0, len(chunks), per)]


# -- point ids ---------------------------------------------------------------------------
def _grid_numbers(chunks: np.ndarray, origin, shape) -> np.ndarray | None:
    """C-order cell number of each absolute chunk in the grid ``shape`` at ``origin``.

    ``None`` when ids ``number << ROW_BITS | row`` might not fit in int64 (more than
    ``2**31`` cells) or a chunk lies outside the grid. Lexicographic order of the
    chunks is the order of their numbers, since every cell is inside the shape.
    """
    shape = tuple(int(n) for n in shape)
    chunks = np.asarray(chunks, np.int64).reshape(-1, len(shape))
    rel = chunks - np.asarray(origin, np.int64).reshape(-1)
    if math.prod(shape) > 1 << (63 - ROW_BITS) or not ((rel >= 0) & (rel < np.asarray(shape, np.int64))).all():
        return None
    if not len(rel):
        return np.zeros(0, np.int64)
    return np.ravel_multi_index(tuple(rel.T), shape).astype(np.int64)


def _rank_numbers(chunks: np.ndarray, every: np.ndarray) -> np.ndarray:
    """Rank of each chunk among the (lexicographically sorted, distinct) chunks of ``every`` and ``chunks``."""
    chunks = np.asarray(chunks, np.int64).reshape(len(chunks), -1)
    every = np.asarray(every, np.int64).reshape(-1, chunks.shape[1])
    both = np.unique(np.concatenate([every, chunks]), axis=0, return_inverse=True)[1].reshape(-1)
    if len(both) and int(both.max()) >= 1 << (63 - ROW_BITS):
        raise MetadataError(f"{int(both.max()) + 1} chunks are too many for 64-bit point ids")
    return both[len(every):].astype(np.int64)


def _chunk_numbers(level_group: zarr.Group, groups: list[np.ndarray], ndim: int) -> list[np.ndarray]:
    """Per partition, the chunk part of its point ids (see the module docstring)."""
    vert = array_at(level_group, "vertices")
    chunks = np.concatenate(groups)
    numbers = _grid_numbers(chunks, attrs_of(vert).get("chunk_grid_origin", [0] * ndim), vert.shape)
    if numbers is None:
        every = np.array([parse_chunk_key(k) for k in level_chunk_keys(level_group)], np.int64).reshape(-1, ndim)
        numbers = _rank_numbers(chunks, every)
    return np.split(numbers, np.cumsum([len(c) for c in groups])[:-1])


def _divisions(numbers: list[np.ndarray]) -> tuple[int, ...] | None:
    """Loose divisions of partitions holding these chunks; ``None`` unless chunk numbers strictly ascend."""
    flat = np.concatenate(numbers)
    if (np.diff(flat) <= 0).any():  # a chunk listed twice (a malformed level): no order to promise
        return None
    return tuple(int(n[0]) << ROW_BITS for n in numbers) + (((int(flat[-1]) + 1) << ROW_BITS) - 1,)


def _point_ids(numbers: np.ndarray, counts: np.ndarray | list[int]) -> np.ndarray:
    """Ids of the rows of consecutive chunks: ``number << ROW_BITS | row within the chunk``."""
    counts = np.asarray(counts, np.int64)
    if len(counts) and int(counts.max()) >= 1 << ROW_BITS:
        raise FormatError(f"a chunk holds {int(counts.max())} points; point ids allow fewer than 2**{ROW_BITS}")
    start = (np.asarray(numbers, np.int64) << ROW_BITS) - (np.cumsum(counts) - counts)
    return np.repeat(start, counts) + np.arange(int(counts.sum()), dtype=np.int64)


# -- what may be read --------------------------------------------------------------------
def require_finished(zs, level) -> int:
    """``level`` as an int, or :class:`UnfinishedJobError` when an unfinished job has not finished it.

    A killed ingest leaves level 0 empty or part written, a killed append a mix
    of old and new chunks: read as they are, they would be a wrong answer that
    looks right (0 rows, or some of them). So the read is refused, with what the
    job is and how to resume or undo it. Levels the job did finish (level 0
    under an unfinished pyramid build, any level on icechunk, whose job works
    on a branch of its own) read as usual; opening the store warns.
    """
    if isinstance(level, str) and level.strip().isdigit():
        level = int(level)
    if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or level < 0:
        raise InputError(f"level must be a level number (0, 1, ...), got {level!r}")
    level = int(level)
    why = zs.unfinished_level(level)
    if why:
        raise UnfinishedJobError(f"cannot read level {level} of {zs.url or 'the store'}: {why}; the store holds an "
                                 f"{zs.unfinished_job}")
    return level


# -- schema ------------------------------------------------------------------------------
def _schema(zs, level: int, attributes) -> tuple[list[str], dict, bool, str]:
    """Axis names, ``{attribute: (dtype, channels)}``, whether object ids exist, vertex dtype."""
    g = get_resolution_level(zs, level)
    axes = zs.metadata.axis_names
    arrays = dict(group_at(g, "vertex_attributes").arrays()) if "vertex_attributes" in g else {}
    names = sorted(arrays) if attributes is None else list(attributes)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise InputError(f"attributes {missing} are not in level {level}; it has {sorted(arrays)}")
    attrs = {}
    for n in names:
        a = attrs_of(arrays[n])
        chans = a.get("channel_names")
        rs = a.get("row_shape") or []
        attrs[n] = (np.dtype(a["dtype"]), len(chans) if chans else (rs[0] if rs else None))
    columns = list(axes) + [c for n, (_, ch) in attrs.items() for c in _attr_columns(n, ch)]
    has_obj = "object_index" in g
    if has_obj:
        columns.append("object_id")
    dup = sorted({c for c in columns if columns.count(c) > 1})
    if dup:
        raise MetadataError(f"column names {dup} clash (axis vs attribute names); pass attributes= to leave some out")
    return list(axes), attrs, has_obj, attrs_of(array_at(g, "vertices")).get("dtype", "float32")


def _attr_columns(name: str, channels: int | None) -> list[str]:
    return [name] if channels is None else [f"{name}_{i}" for i in range(channels)]


def _meta(axes, attrs, has_obj, vdtype) -> pd.DataFrame:
    cols = {a: np.zeros(0, vdtype) for a in axes}
    for n, (dt, ch) in attrs.items():
        for c in _attr_columns(n, ch):
            cols[c] = np.zeros(0, dt)
    if has_obj:
        cols["object_id"] = np.zeros(0, np.int64)
    import pandas as pd  # here, not at import: pandas is half of the CLI's start-up, and most jobs never need it

    return pd.DataFrame(cols, index=pd.Index(np.zeros(0, np.int64), name="point"))


# -- partitions --------------------------------------------------------------------------
def _read_partition(chunks, zstore, level, ndim, axes, attrs, obj, box, vdtype, numbers=None,
                    cells: LevelCells | None = None) -> pd.DataFrame:
    """The rows of ``chunks``; indexed by point id given the chunks' ``numbers``, else by a fresh RangeIndex."""
    import pandas as pd

    data = read_chunks(zstore, level, chunks, list(attrs), ndim=ndim, cells=cells)
    pos = np.concatenate([d.positions for d in data]) if data else np.zeros((0, ndim), vdtype)
    cols = {a: pos[:, i] for i, a in enumerate(axes)}
    for n, (dt, ch) in attrs.items():
        v = np.concatenate([d.attributes[n] for d in data]) if data else np.zeros((0,) + ((ch,) if ch else ()), dt)
        if ch is None:
            cols[n] = v.reshape(-1)
        else:
            for i, c in enumerate(_attr_columns(n, ch)):
                cols[c] = v.reshape(-1, ch)[:, i]
    keep = np.ones(len(pos), bool)
    if obj is not None:
        ids, ok = row_object_ids(data, *obj)
        cols["object_id"] = ids
        keep &= ok
    if box is not None:
        p = pos.astype(np.float64)
        keep &= ((p >= box[0]) & (p <= box[1])).all(axis=1)
    if numbers is None:
        df = pd.DataFrame(cols)
        return df if keep.all() else df[keep].reset_index(drop=True)
    index = pd.Index(_point_ids(numbers, [len(d.positions) for d in data]), name="point")
    df = pd.DataFrame(cols, index=index)
    return df if keep.all() else df[keep]


def _obj_subset(entries, chunks):
    if entries is None:
        return None
    oid, och, ofr = entries
    m = chunks_in(och, chunks)
    return oid[m], och[m], ofr[m]


def read_points(store: StoreLike, *, level: int = 0, bbox: BoxLike | None = None,
                attributes: Sequence[str] | None = None, chunks_per_partition: int | None = None,
                storage_options: dict | None = None, backend: str | None = None,
                branch: str = "main") -> dd.DataFrame:
    """A level as a lazy dask DataFrame: one partition per chunk (or small group of chunks) read.

    The index ``point`` (int64) is a unique id per point, ``chunk_number *
    2**32 + row within the chunk``, the same in a box read as in a full read
    (module docstring); rows ascend by it and the divisions are known, so
    ``df.loc[a:b]`` reads only the partitions that may hold those ids.
    ``divmod(point, 2**32)`` gives the chunk's number in the level's chunk grid
    (C order of the ``vertices`` cells) and the row in its stored order.

    ``bbox=(lo, hi)`` keeps points with ``lo <= p <= hi`` (closed box) and opens
    only the non-empty chunks the box touches. ``attributes`` picks attributes
    (default all). Object ids are resolved from the object index when the
    level has one (decoded once, here, while building the graph).
    ``storage_options``, ``backend`` and ``branch`` open a store given by path
    or URL as :func:`~zv_dask.open_store` does.
    """
    import dask.dataframe as dd

    zs = as_store(store, storage_options=storage_options, backend=backend, branch=branch)
    level = require_finished(zs, level)
    ndim = zs.metadata.ndim
    axes, attrs, has_obj, vdtype = _schema(zs, level, attributes)
    box = parse_box(bbox, ndim)
    groups = read_plan(zs, level=level, bbox=bbox, chunks_per_partition=chunks_per_partition)
    meta = _meta(axes, attrs, has_obj, vdtype)
    if not groups:  # one empty partition; (0, 0) are divisions any frame may have, so they stay known
        return dd.from_map(_same, [meta], meta=meta, divisions=(0, 0), enforce_metadata=False,
                           label=f"zv-read-level-{level}")
    entries = None
    if has_obj:
        _, oid, och, ofr = object_entries(group_at(zs.root, str(level)), ndim)
        entries = (oid, och, ofr)
    numbers = _chunk_numbers(group_at(zs.root, str(level)), groups, ndim)
    parts = [(c, _obj_subset(entries, c), n) for c, n in zip(groups, numbers)]
    cells = level_cells(zs.store, level, list(attrs))  # the level's metadata, opened here once for every task
    return dd.from_map(_PartitionReader(zs.store, level, ndim, axes, attrs, box, vdtype, cells), parts, meta=meta,
                       divisions=_divisions(numbers), enforce_metadata=False, label=f"zv-read-level-{level}")


def _same(frame: pd.DataFrame) -> pd.DataFrame:
    return frame


class _PartitionReader:
    """Picklable callable reading one partition (chunks plus their object-index entries)."""

    def __init__(self, zstore, level, ndim, axes, attrs, box, vdtype, cells=None):
        self.args = (zstore, level, ndim, axes, attrs, box, vdtype)
        self.cells = cells

    def __call__(self, part) -> pd.DataFrame:
        chunks, obj, numbers = part
        zstore, level, ndim, axes, attrs, box, vdtype = self.args
        return _read_partition(chunks, zstore, level, ndim, axes, attrs, obj, box, vdtype, numbers, self.cells)


# -- xarray ------------------------------------------------------------------------------
def _inside(grid: Grid, chunks: np.ndarray, box) -> np.ndarray:
    """Chunks whose every point surely lies in the closed box (with a float margin)."""
    cs = np.asarray(grid.chunk_shape, np.float64)
    lo = chunks * cs
    hi = (chunks + 1) * cs
    eps = 1e-9 * (np.abs(lo) + np.abs(hi) + cs)
    return ((lo - eps >= box[0]) & (hi + eps <= box[1])).all(axis=1)


def _partition_lengths(zs, level, ndim, groups, box, grid, entries) -> list[int]:
    """Rows per partition: from fragment indexes for whole chunks, from positions where the box cuts."""
    g = zs.root[str(level)]
    axes, _, _, vdtype = _schema(zs, level, [])
    origin = np.asarray(g["vertices"].attrs.get("chunk_grid_origin", [0] * ndim), np.int64)
    out = []
    for chunks in groups:
        cut = np.zeros(len(chunks), bool) if box is None else ~_inside(grid, chunks, box)
        n = 0
        if cut.any():
            which = chunks[cut]
            n += len(_read_partition(which, zs.store, level, ndim, axes, {}, _obj_subset(entries, which),
                                     box, vdtype))
        whole = chunks[~cut]
        if len(whole):
            cells = g["vertex_fragments"].get_coordinate_selection(tuple((whole - origin).T))
            for c, blob in zip(whole, cells):
                fi = decode_fragments(bytes(blob))
                if entries is None:
                    n += fi.vertex_extent
                    continue
                f = np.unique(entries[2][(entries[1] == c).all(axis=1)])
                f = f[(f >= 0) & (f < fi.num_fragments)]
                n += int(np.maximum(fi.counts[f], 0).sum())
        out.append(n)
    return out


def _column(df: pd.DataFrame, name: str) -> np.ndarray:
    return df[name].to_numpy()


def open_level(store: StoreLike, level: int = 0, *, bbox: BoxLike | None = None,
               attributes: Sequence[str] | None = None, chunks_per_partition: int | None = None,
               storage_options: dict | None = None, backend: str | None = None,
               branch: str = "main") -> xr.Dataset:
    """A level as a lazy xarray Dataset along dimension ``points``, variables named as in :func:`read_points`.

    xarray needs the length of ``points``, so building the Dataset reads the
    fragment index of every chunk involved (and the positions of chunks the box
    cuts, or of every chunk of an object level); the data variables stay lazy.
    """
    import xarray as xr

    zs = as_store(store, storage_options=storage_options, backend=backend, branch=branch)
    level = require_finished(zs, level)
    ndim = zs.metadata.ndim
    ddf = read_points(zs, level=level, bbox=bbox, attributes=attributes, chunks_per_partition=chunks_per_partition)
    groups = read_plan(zs, level=level, bbox=bbox, chunks_per_partition=chunks_per_partition)
    _, attrs, has_obj, _ = _schema(zs, level, attributes)
    entries = None
    if has_obj and groups:
        _, oid, och, ofr = object_entries(group_at(zs.root, str(level)), ndim)
        entries = (oid, och, ofr)
    lengths = _partition_lengths(zs, level, ndim, groups, parse_box(bbox, ndim), level_grid(zs.root, level),
                                 entries) if groups else [0]
    import dask
    import dask.array as da

    parts = ddf.to_delayed()  # one key per partition, shared by every variable: each chunk is read once
    column = dask.delayed(_column, pure=True)
    data = {}
    for c in ddf.columns:
        dt = ddf.dtypes[c]
        pieces = [da.from_delayed(column(p, c), shape=(n,), dtype=dt) for p, n in zip(parts, lengths)]
        data[c] = ("points", da.concatenate(pieces) if len(pieces) > 1 else pieces[0])
    return xr.Dataset(data, attrs={"level": int(level), "axes": list(zs.metadata.axis_names),
                                   "chunks": [".".join(map(str, c)) for g in groups for c in g.tolist()]})
