"""Reading cross-level links back: the records as stored, and each point's parent row.

A level's ``links/+1`` family maps every vertex to the metavertex of the next
level it was folded into; ``links/-1`` (the ``explicit`` mirror) maps the
other way. :func:`read_links` returns a family's records as arrays of chunk
coordinates and row indices (ZV format section 9); :func:`parent_rows` turns
the ``+1`` family into what most users want: for every row of a level, as
:func:`~zv_dask.read_points` orders them, the row of its parent in the next
level's :func:`~zv_dask.read_points` order.
"""

from __future__ import annotations

import numpy as np

from zv_dask.errors import MetadataError
from zv_dask.format.cells import decode_fragments
from zv_dask.format.grid import parse_chunk_key
from zv_dask.format.links import anchor, decode_link_rows, parse_offset_segment
from zv_dask.pyramid.coarsen import bin_keys
from zv_dask.store.api import as_store, get_resolution_level
from zv_dask.store.levels import _read_cells, level_chunk_keys, level_grid
from zv_dask.store.nodes import array_at, attrs_of, group_at
from zv_dask.types import StoreLike

__all__ = ["read_links", "parent_rows", "locate_chunks"]


def _scale(zs, level: int) -> np.ndarray:
    cs = np.asarray(level_grid(zs.root, level).chunk_shape, np.float64)
    return np.rint(cs / np.asarray(zs.metadata.chunk_shape, np.float64)).astype(np.int64)


def read_links(store: StoreLike, level: int, delta: int = 1, *, storage_options: dict | None = None,
               backend: str | None = None, branch: str = "main") -> dict[str, np.ndarray]:
    """The records of ``<level>/links/<delta>``: ``src_chunk (M, D)``, ``src_vi (M,)``, ``dst_chunk``, ``dst_vi``.

    ``src`` is a vertex of ``level`` (a row of its chunk's vertex buffer),
    ``dst`` one of level ``level + delta``. Records come offsets array by
    offsets array, cell by cell (ascending chunks), in stored order. Raises
    :class:`~zv_dask.errors.MetadataError` when the level has no such family.
    ``storage_options``, ``backend`` and ``branch`` open a store given by path
    or URL as :func:`~zv_dask.open_store` does.
    """
    zs = as_store(store, storage_options=storage_options, backend=backend, branch=branch)
    ndim = zs.metadata.ndim
    g = get_resolution_level(zs, level)
    name = f"{int(delta):+d}"
    if "links" not in g or name not in group_at(g, "links"):
        raise MetadataError(f"level {level} has no links/{name} family (cross-level links: "
                            f"{zs.metadata.cross_level_storage})")
    fam = group_at(g, f"links/{name}")
    s_src, s_trg = _scale(zs, level), _scale(zs, level + int(delta))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("src_chunk", "src_vi", "dst_chunk", "dst_vi")}
    for seg, arr in sorted(fam.arrays()):
        offset = np.asarray(parse_offset_segment(seg), np.int64)
        arr_attrs = attrs_of(arr)
        keys = sorted(arr_attrs.get("nonempty_chunks", []), key=lambda k: parse_chunk_key(k))
        if not keys:
            continue
        chunks = np.array([parse_chunk_key(k) for k in keys], np.int64).reshape(-1, ndim)
        origin = arr_attrs.get("chunk_grid_origin", [0] * ndim)
        for c, payload in zip(chunks, _read_cells(zs.store, arr, chunks - np.asarray(origin, np.int64))):
            rows = decode_link_rows(payload)
            dst = anchor(c[None, :], s_src, s_trg)[0] + offset
            parts["src_chunk"].append(np.repeat(c[None, :], len(rows), axis=0))
            parts["dst_chunk"].append(np.repeat(dst[None, :], len(rows), axis=0))
            parts["src_vi"].append(rows[:, 0])
            parts["dst_vi"].append(rows[:, 1])
    out = {}
    for k, v in parts.items():
        shape = (0, ndim) if k.endswith("chunk") else (0,)
        out[k] = np.concatenate(v) if v else np.zeros(shape, np.int64)
    return out


def _row_offsets(zs, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of a level in :func:`read_points` order and the first row of each in that order."""
    ndim = zs.metadata.ndim
    g = get_resolution_level(zs, level)
    chunks = np.array([parse_chunk_key(k) for k in level_chunk_keys(g)], np.int64).reshape(-1, ndim)
    if len(chunks):
        chunks = chunks[np.lexsort(chunks.T[::-1])]
    frags = array_at(g, "vertex_fragments")
    origin = attrs_of(frags).get("chunk_grid_origin", [0] * ndim)
    cells = _read_cells(zs.store, frags, chunks - np.asarray(origin, np.int64))
    counts = np.array([decode_fragments(p).vertex_extent for p in cells], np.int64)
    return chunks, np.r_[0, np.cumsum(counts)].astype(np.int64)


def locate_chunks(table: np.ndarray, chunks: np.ndarray) -> np.ndarray:
    """Position of each of ``chunks`` (N, D) in ``table`` (M, D), ``-1`` where absent; vectorised."""
    table, chunks = np.asarray(table, np.int64), np.asarray(chunks, np.int64)
    if not len(chunks) or not len(table):
        return np.full(len(chunks), -1, np.int64)
    both = bin_keys(np.concatenate([table, chunks]))
    keys, want = both[:len(table)], both[len(table):]
    order = np.argsort(keys, kind="stable")
    at = np.minimum(np.searchsorted(keys, want, sorter=order), len(keys) - 1)
    pos = order[at]
    return np.where(keys[pos] == want, pos, -1)


def _rows(chunks: np.ndarray, first: np.ndarray, which: np.ndarray, vi: np.ndarray) -> np.ndarray:
    """Global rows of ``(chunk, vi)`` endpoints given the chunks in order and their first rows."""
    pos = locate_chunks(chunks, which)
    if (pos < 0).any():
        raise MetadataError("a link names a chunk the level does not have")
    return first[pos] + vi


def parent_rows(store: StoreLike, level: int, *, storage_options: dict | None = None, backend: str | None = None,
                branch: str = "main") -> np.ndarray:
    """For every row of ``level`` (in :func:`~zv_dask.read_points` order), the row of its parent in level ``level + 1``.

    Rows are those of full-level reads (no box): ``read_points(store,
    level=level + 1).compute().iloc[parent_rows(store, level)]`` gives each
    point's coarse point. Points without a parent get ``-1``. Needs the
    ``+1`` cross-level links (``build_pyramid(links=...)``). ``storage_options``,
    ``backend`` and ``branch`` as for :func:`read_links`.
    """
    zs = as_store(store, storage_options=storage_options, backend=backend, branch=branch)
    rec = read_links(zs, level, 1)
    fine_chunks, fine_first = _row_offsets(zs, level)
    coarse_chunks, coarse_first = _row_offsets(zs, level + 1)
    out = np.full(int(fine_first[-1]), -1, np.int64)
    src = _rows(fine_chunks, fine_first, rec["src_chunk"], rec["src_vi"])
    out[src] = _rows(coarse_chunks, coarse_first, rec["dst_chunk"], rec["dst_vi"])
    return out
