"""A level's object index, as arrays: its entries, and the object of each stored row."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import zarr

from zv_dask.format.cells import decode_manifest
from zv_dask.store.nodes import array_at, group_at

if TYPE_CHECKING:
    from zv_dask.store.levels import ChunkData

__all__ = ["object_entries", "row_object_ids", "chunks_in"]


def object_entries(level_group: zarr.Group, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Decode a level's object index: ``(all_ids, oid, chunk, fragment)``, one entry per block.

    Manifests made only of mode-0 blocks (what zv-dask and the reference write
    for points) are parsed in one vectorised pass; anything else block by block.
    """
    oi = group_at(level_group, "object_index")
    ids = np.asarray(array_at(oi, "object_ids")[:], np.int64) if "object_ids" in oi else None
    blobs = [bytes(b) for b in np.asarray(array_at(oi, "manifests")[:])]
    if ids is None:  # layout vlen_manifests_v1: row = id
        ids = np.arange(len(blobs), dtype=np.int64)
    block = 8 * ndim + 9
    n_blocks = np.array([int.from_bytes(b[:4], "little") if len(b) >= 4 else -1 for b in blobs], np.int64)
    sizes = np.array([len(b) for b in blobs], np.int64)
    rec = np.dtype([("chunk", "<i8", (ndim,)), ("mode", "u1"), ("fragment", "<i8")])
    if len(blobs) and (sizes == 4 + n_blocks * block).all():
        raw = np.frombuffer(b"".join(b[4:] for b in blobs), rec)
        if (raw["mode"] == 0).all():
            return ids, np.repeat(ids, n_blocks), raw["chunk"].astype(np.int64).reshape(-1, ndim), \
                raw["fragment"].astype(np.int64)
    oid, chunks, frags = [], [], []
    for i, b in zip(ids, blobs):
        c, f = decode_manifest(b, ndim)
        oid.append(np.full(len(f), i, np.int64))
        chunks.append(c)
        frags.append(f)
    if not oid:
        return ids, np.zeros(0, np.int64), np.zeros((0, ndim), np.int64), np.zeros(0, np.int64)
    return ids, np.concatenate(oid), np.concatenate(chunks).reshape(-1, ndim), np.concatenate(frags)


def chunks_in(chunks: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Boolean mask: which rows of ``chunks`` (M, D) appear in ``wanted`` (K, D)."""
    chunks = np.asarray(chunks, np.int64)
    wanted = np.asarray(wanted, np.int64).reshape(-1, chunks.shape[1])
    if not len(chunks) or not len(wanted):
        return np.zeros(len(chunks), bool)
    both = np.unique(np.concatenate([chunks, wanted]), axis=0, return_inverse=True)[1].reshape(-1)
    return np.isin(both[:len(chunks)], both[len(chunks):])


def row_object_ids(data: list[ChunkData], oid: np.ndarray, chunks: np.ndarray,
                   frags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of the concatenated chunks: object id and whether any fragment names the row.

    ``(oid, chunks, frags)`` are object-index entries covering (at least) these chunks.
    """
    out_ids, out_ok = [], []
    chunks = np.asarray(chunks, np.int64)
    for d in data:
        n = len(d.positions)
        ids = np.zeros(n, np.int64)
        ok = np.zeros(n, bool)
        here = (chunks == np.asarray(d.chunk, np.int64)).all(axis=1) if len(chunks) else np.zeros(0, bool)
        f = frags[here]
        valid = (f >= 0) & (f < len(d.fragment_counts))
        f, o = f[valid], oid[here][valid]
        counts = d.fragment_counts[f]
        keep = counts > 0
        f, o, counts = f[keep], o[keep], counts[keep]
        if len(f):
            starts = d.fragment_starts[f]
            before = np.cumsum(counts) - counts
            rows = np.repeat(starts - before, counts) + np.arange(int(counts.sum()))
            ids[rows] = np.repeat(o, counts)
            ok[rows] = True
        out_ids.append(ids)
        out_ok.append(ok)
    if not out_ids:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(out_ids), np.concatenate(out_ok)
