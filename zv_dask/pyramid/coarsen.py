"""Coarsening one region of a level: pure numpy, no I/O.

A point's coarse bin is ``base_bin // R_k`` (integer base-bin index space), so
no float comparison decides a coarse boundary. Points are grouped per coarse
bin, or per ``(object, coarse bin)`` when the level has object ids, and each
group becomes metavertices by ``method``:

* ``centroid``: one metavertex at the mean (float64 accumulation, stored in
  the vertex dtype), clipped per axis to the group's ``[min, max]`` so rounding
  never moves it out of its bin;
* ``first``: the group's first point (canonical order: fine chunk, then row);
* ``random``: one point drawn by a hash of ``(seed, level, object, bin)``:
  reproducible whatever the partitioning;
* ``sample``: up to ``sample_size`` points per group, drawn by a hash of
  ``(seed, level, object, bin, rank)``, kept in canonical order.

Attributes: ``centroid`` reduces each attribute with its reduction (default
``mean`` for floats, ``mode`` for integers and bools). The point-keeping
methods carry the kept points' own values unless a reduction was asked for
explicitly. A ``count`` attribute holds the number of level-0 points a
metavertex stands for: the group size, or the sum of the parent's counts when
the parent has the attribute; ``sample`` splits a group's total over its kept
points (the remainder going to the first ones) so the level's total is kept.

:func:`plan_coarse` lays the result out: chunk = ``base_bin // (bpc * S_k)``;
plain points get ``prod(bpc)`` range fragments per chunk, fragment = the
``S_k``-wide bin holding the metavertex (with ``S_k = 1``, the root base bin,
which keeps the reference reader's bbox reads right); object levels get one
fragment per object present in the chunk, ascending id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from zv_dask.errors import InputError
from zv_dask.format.layout import ChunkPlan, order_by, stable_order
from zv_dask.pyramid.reduce import Groups, _cast_float, group_rows, group_runs, min_max_ufunc, nan_mean, reduce_rows

__all__ = ["METHODS", "CoarsenParams", "Coarse", "coarsen_points", "coarsen_runs", "plan_coarse", "bin_keys",
           "hash64"]

METHODS = ("centroid", "first", "random", "sample")


@dataclass(frozen=True)
class CoarsenParams:
    """How one level is made from its parent.

    ``reductions`` maps every attribute of the coarse level to its reduction
    (``"count"`` for the count attribute); ``explicit`` names those the user
    asked for (point-keeping methods reduce only these).
    """

    ratio: tuple[int, ...]
    method: str = "centroid"
    reductions: dict = field(default_factory=dict)
    explicit: frozenset = frozenset()
    sample_size: int = 8
    seed: int = 0
    level: int = 1


@dataclass
class Coarse:
    """Metavertices of a region in canonical order (group order, then rank)."""

    positions: np.ndarray
    attributes: dict
    object_ids: np.ndarray | None = None
    parents: np.ndarray | None = None  # per input row, the index of its metavertex (cross-level links)
    run_parents: np.ndarray | None = None  # per input run (coarsen_runs), the index of its metavertex


# -- hashing -------------------------------------------------------------------------
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = x + _M1
    x = (x ^ (x >> np.uint64(30))) * _M2
    x = (x ^ (x >> np.uint64(27))) * _M3
    return x ^ (x >> np.uint64(31))


def hash64(seed: int, columns: list[np.ndarray], n: int) -> np.ndarray:
    """splitmix64 chain over ``seed`` and integer columns: a per-row uint64 hash."""
    h = _mix(np.full(n, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), np.uint64))
    for c in columns:
        h = _mix(h ^ np.asarray(c, np.int64).view(np.uint64))
    return h


# -- keys ------------------------------------------------------------------------------
def bin_keys(bins: np.ndarray) -> np.ndarray:
    """Non-negative int64 keys ordering integer rows lexicographically.

    Column by column (strided reductions on an ``(N, D)`` array are fast, axis-0
    reductions are not).
    """
    bins = np.asarray(bins, np.int64)
    if len(bins) == 0:
        return np.zeros(0, np.int64)
    cols = [bins[:, d] for d in range(bins.shape[1])]
    lo = [int(c.min()) for c in cols]
    ext = [int(c.max()) - low + 1 for c, low in zip(cols, lo)]
    if float(np.prod(np.asarray(ext, np.float64))) >= 2.0 ** 62:
        return np.unique(bins, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    key = cols[0] - lo[0]
    for c, low, e in zip(cols[1:], lo[1:], ext[1:]):
        key *= e
        key += c
        key -= low
    return key


# -- coarsening ------------------------------------------------------------------------
def _count_totals(attributes: dict, params: CoarsenParams, g: Groups, sorted_rows) -> dict[str, np.ndarray]:
    out = {}
    for name, how in params.reductions.items():
        if how != "count":
            continue
        if name in attributes:
            out[name] = np.add.reduceat(sorted_rows(name).astype(np.int64), g.starts, axis=0)
        else:
            out[name] = g.counts.astype(np.int64)
    return out


def coarsen_points(positions: np.ndarray, base_bins: np.ndarray | None, attributes: dict, params: CoarsenParams,
                   object_ids: np.ndarray | None = None, runs: tuple[np.ndarray, np.ndarray] | None = None) -> Coarse:
    """Coarsen points (rows in canonical order) into metavertices of the next level.

    ``runs`` (plain points only) is ``(run_splits, run_coarse_bins)``: the rows
    come in runs whose points share a coarse bin (a level's bin fragments), so
    grouping sorts the runs, not the rows, and ``base_bins`` is not needed. The
    groups, and so the result, are exactly those of the per-row path.
    """
    if params.method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {params.method!r}")
    pos = np.asarray(positions)
    if runs is not None and object_ids is None:
        run_splits, run_cb = runs
        run_cb = np.asarray(run_cb, np.int64)
        g, first_run = group_runs(bin_keys(run_cb), run_splits)
        group_cb = run_cb[first_run]
        obj_u = obj_rank = None
    else:
        cb = np.floor_divide(np.asarray(base_bins, np.int64), np.asarray(params.ratio, np.int64))
        keys = bin_keys(cb)
        if object_ids is not None:
            obj_u, obj_rank = np.unique(np.asarray(object_ids, np.int64), return_inverse=True)
            g = group_rows(keys, obj_rank.reshape(-1))
        else:
            obj_u = obj_rank = None
            g = group_rows(keys)
        group_cb = cb[g.order[g.starts]] if g.n else cb[:0]
    cache: dict[str, np.ndarray] = {}

    def sorted_rows(name):
        if name not in cache:
            cache[name] = np.asarray(attributes[name])[g.order]
        return cache[name]

    totals = _count_totals(attributes, params, g, sorted_rows)
    hash_cols = [np.full(g.n, params.level, np.int64)]
    if obj_u is not None and obj_rank is not None:
        hash_cols.append(obj_u[obj_rank[g.order[g.starts]]] if g.n else np.zeros(0, np.int64))
    hash_cols += [group_cb[:, d] for d in range(group_cb.shape[1])]
    group_oids = hash_cols[1] if obj_u is not None else None

    if params.method == "centroid":
        sp = pos[g.order]
        means = np.empty((g.n, sp.shape[1]), np.float64)
        for d in range(sp.shape[1]):
            means[:, d] = np.bincount(g.gid, weights=sp[:, d].astype(np.float64), minlength=g.n) / g.counts
        out_pos = means.astype(pos.dtype)
        if g.n:
            out_pos = np.clip(out_pos, np.minimum.reduceat(sp, g.starts, axis=0),
                              np.maximum.reduceat(sp, g.starts, axis=0))
        attrs = {}
        for name, how in params.reductions.items():
            attrs[name] = totals[name] if how == "count" else reduce_rows(sorted_rows(name), g, how)
        return Coarse(out_pos, attrs, group_oids, _row_parents(g, g.gid))

    # point-keeping methods: pick rows (indices into the group-sorted order)
    if params.method == "first":
        picked = g.starts
    elif params.method == "random":
        h = hash64(params.seed, hash_cols, g.n)
        picked = g.starts + (h % np.maximum(g.counts, 1).astype(np.uint64)).astype(np.int64)
    else:
        if params.sample_size < 1:
            raise InputError(f"sample_size must be >= 1, got {params.sample_size}")
        rank = np.arange(len(g.gid), dtype=np.int64) - g.starts[g.gid]
        cols = [c[g.gid] for c in hash_cols] + [rank]
        h = hash64(params.seed, cols, len(g.gid))
        o = np.lexsort((h, g.gid))
        within = np.arange(len(o), dtype=np.int64) - g.starts[g.gid[o]]
        picked = np.sort(o[within < params.sample_size])
    pgid = g.gid[picked] if len(picked) else np.zeros(0, np.int64)
    rows = g.order[picked]
    attrs = {}
    for name, how in params.reductions.items():
        if how == "count":
            tot = totals[name][pgid]
            k = np.bincount(pgid, minlength=g.n)[pgid]
            first_pick = np.searchsorted(pgid, pgid)  # pgid is sorted: index of the group's first pick
            r = np.arange(len(pgid)) - first_pick
            attrs[name] = tot // k + (r < tot % k)
        elif name in params.explicit:
            attrs[name] = reduce_rows(sorted_rows(name), g, how)[pgid]
        else:
            attrs[name] = np.asarray(attributes[name])[rows]
    # parents: a kept point links to its own copy, every other point to its group's first kept point
    mv = np.searchsorted(pgid, g.gid) if len(picked) else np.zeros(0, np.int64)
    mv[picked] = np.arange(len(picked), dtype=np.int64)
    return Coarse(pos[rows], attrs, None if group_oids is None else group_oids[pgid], _row_parents(g, mv))


def _row_parents(g: Groups, mv_of_sorted: np.ndarray) -> np.ndarray:
    """Scatter per-sorted-position metavertex indices back to input row order."""
    out = np.empty(len(g.order), np.int64)
    out[g.order] = mv_of_sorted
    return out


def coarsen_runs(positions: np.ndarray, attributes: dict, params: CoarsenParams, run_splits: np.ndarray,
                 run_cb: np.ndarray, bins_of=None) -> Coarse:
    """``centroid`` coarsening of plain points that come in runs sharing a coarse bin.

    The bins layout keeps a level's points in runs (one per occupied bin), so
    sums go run by run over the rows as they lie (no gather) and then over the
    runs of each coarse bin, float64 throughout. A mean that float rounding
    puts outside its bin (``bins_of`` maps positions to coarse bins) is clipped
    to the group's ``[min, max]``. Returns per-run parents, not per-row ones.
    """
    if params.method != "centroid":
        raise InputError(f"coarsen_runs makes centroids only, not {params.method!r}")
    pos = np.asarray(positions)
    run_splits = np.asarray(run_splits, np.int64)
    run_cb = np.asarray(run_cb, np.int64)
    starts = run_splits[:-1]
    lens = np.diff(run_splits)
    n_runs = len(lens)
    if n_runs == 0:
        attrs = {n: np.zeros((0,) + np.asarray(attributes[n]).shape[1:], np.asarray(attributes[n]).dtype)
                 if how != "count" else np.zeros(0, np.int64)
                 for n, how in params.reductions.items() if how == "count" or n in attributes}
        return Coarse(pos[:0], attrs, None, None, np.zeros(0, np.int64))
    keys = bin_keys(run_cb)
    ro = stable_order(keys)
    sk = keys[ro]
    gfirst = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])  # in ro: each group's first run
    n_groups = len(gfirst)
    run_group = np.empty(n_runs, np.int64)
    run_group[ro] = np.repeat(np.arange(n_groups, dtype=np.int64), np.diff(np.r_[gfirst, n_runs]))

    def two_stage(values: np.ndarray, ufunc, dtype=None) -> np.ndarray:
        per_run = (ufunc.reduceat(values, starts, axis=0, dtype=dtype) if dtype
                   else ufunc.reduceat(values, starts, axis=0))
        return ufunc.reduceat(per_run[ro], gfirst, axis=0)

    counts = np.add.reduceat(lens[ro], gfirst)
    sums = two_stage(pos, np.add, np.float64)
    out = (sums / counts[:, None]).astype(pos.dtype)
    group_cb = run_cb[ro[gfirst]]
    if bins_of is not None:
        bad = np.flatnonzero((bins_of(out) != group_cb).any(axis=1))
        for g in bad.tolist():  # rare: float rounding at a bin edge
            runs = ro[gfirst[g]:(gfirst[g + 1] if g + 1 < n_groups else n_runs)]
            rows = pos[np.concatenate([np.arange(starts[j], starts[j] + lens[j]) for j in runs])]
            out[g] = np.clip(out[g], rows.min(axis=0), rows.max(axis=0))
    attrs = {}
    groups = None
    for name, how in params.reductions.items():
        if how == "count":
            attrs[name] = (two_stage(np.asarray(attributes[name]).astype(np.int64), np.add) if name in attributes
                           else counts.astype(np.int64))
            continue
        v = np.asarray(attributes[name])
        dt = v.dtype
        ok = ~np.isnan(v) if dt.kind == "f" and how in ("mean", "sum") and np.isnan(v).any() else None
        if ok is not None:  # NaN values skipped, as numpy.nanmean / nansum
            v0 = np.where(ok, v, 0)
            attrs[name] = (nan_mean(two_stage(v0, np.add, np.float64), two_stage(ok, np.add, np.float64), dt)
                           if how == "mean" else two_stage(v0, np.add, np.float64).astype(dt))
        elif how == "mean":
            c = counts.reshape((-1,) + (1,) * (v.ndim - 1))
            attrs[name] = _cast_float(two_stage(v, np.add, np.float64) / c, dt)
        elif how == "sum" and dt.kind == "f":
            attrs[name] = two_stage(v, np.add, np.float64).astype(dt)
        elif how == "sum" and dt.kind == "b":
            attrs[name] = two_stage(v, np.maximum)
        elif how == "sum":
            wide = np.uint64 if dt.kind == "u" else np.int64
            info = np.iinfo(dt)
            attrs[name] = np.clip(two_stage(v.astype(wide), np.add), info.min, info.max).astype(dt)
        elif how in ("min", "max"):
            attrs[name] = two_stage(v, min_max_ufunc(how, dt))
        elif how == "first":
            attrs[name] = v[starts[ro[gfirst]]]
        else:  # mode: needs the rows of each group
            if groups is None:
                groups, _ = group_runs(keys, run_splits)
            attrs[name] = reduce_rows(v[groups.order], groups, how)
    return Coarse(out, attrs, None, None, run_group)


# -- layout ----------------------------------------------------------------------------
def _split(sorted_ids: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.zeros(1, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    return np.r_[starts, len(sorted_ids)].astype(np.int64)


def plan_coarse(base_bins: np.ndarray, bins_per_chunk: tuple[int, ...], scale: tuple[int, ...],
                object_ids: np.ndarray | None = None) -> ChunkPlan:
    """Chunks and fragments of metavertices given their base bins (rows in canonical order)."""
    bb = np.asarray(base_bins, np.int64)
    bpc = np.asarray(bins_per_chunk, np.int64)
    sc = np.asarray(scale, np.int64)
    ndim = len(bpc)
    if len(bb) == 0:
        z = np.zeros(0, np.int64)
        return ChunkPlan(z, np.zeros((0, ndim), np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), z,
                         None if object_ids is None else z)
    chunks = np.floor_divide(bb, bpc * sc)
    _, first, chunk_rank = np.unique(bin_keys(chunks), return_index=True, return_inverse=True)
    chunk_u = chunks[first]
    chunk_rank = chunk_rank.reshape(-1).astype(np.int64)
    n_chunks = len(chunk_u)
    if object_ids is None:
        local = np.floor_divide(bb, sc) - chunks * bpc
        frag = np.ravel_multi_index(tuple(local.T), tuple(int(b) for b in bpc)).astype(np.int64)
        order = order_by(chunk_rank, frag)
        f = int(np.prod(bpc))
        counts = np.bincount(chunk_rank * f + frag, minlength=n_chunks * f).astype(np.int64)
        return ChunkPlan(order, chunk_u, _split(chunk_rank[order]), np.arange(n_chunks + 1, dtype=np.int64) * f,
                         counts)
    obj_u, obj_rank = np.unique(np.asarray(object_ids, np.int64), return_inverse=True)
    obj_rank = obj_rank.reshape(-1).astype(np.int64)
    order = order_by(chunk_rank, obj_rank)
    pair = chunk_rank[order] * len(obj_u) + obj_rank[order]
    pair_splits = _split(pair)
    pair_u = pair[pair_splits[:-1]]
    frag_splits = np.searchsorted(pair_u // len(obj_u), np.arange(n_chunks + 1)).astype(np.int64)
    return ChunkPlan(order, chunk_u, _split(chunk_rank[order]), frag_splits, np.diff(pair_splits),
                     fragment_objects=obj_u[pair_u % len(obj_u)])
