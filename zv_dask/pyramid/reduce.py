"""Group reductions for coarsening: pure numpy, no loop over points or groups.

Rows arrive sorted by group (a :class:`Groups`), in a canonical order inside
each group, so every reduction is a function of the group's rows alone and
gives the same bits however the level was split into tasks.

Reductions (``attribute_reduction`` values):

* ``mean``: float64 accumulation; floats keep their dtype, integers round half
  to even (``numpy.rint``), bools become ``mean >= 0.5``;
* ``min`` / ``max``: per channel;
* ``sum``: floats in float64; integers exactly in 64 bits, then saturated to
  the attribute dtype; bools become "any";
* NaN float values are skipped by ``mean``, ``sum``, ``min`` and ``max`` (a
  group of NaN only gives NaN; ``sum`` then 0), as in ``numpy.nanmean``;
* ``first``: the group's first row (canonical order: chunk, then row);
* ``mode``: the most frequent *row* (all channels together), ties to the
  smallest row, so RGB triplets are never mixed;
* ``count``: see :mod:`zv_dask.pyramid.coarsen` (number of level-0 points).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zv_dask.errors import InputError
from zv_dask.format.layout import order_by, stable_order

__all__ = ["REDUCTIONS", "Groups", "group_rows", "group_runs", "reduce_rows", "default_reduction", "min_max_ufunc",
           "nan_mean"]

REDUCTIONS = ("mean", "min", "max", "sum", "first", "mode", "count")


def default_reduction(dtype) -> str:
    """``mean`` for floats, ``mode`` for integers and bools."""
    return "mean" if np.dtype(dtype).kind == "f" else "mode"


@dataclass
class Groups:
    """Rows sorted by group: ``order`` sorts the input, group ``g`` is ``starts[g]:starts[g]+counts[g]``."""

    order: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    gid: np.ndarray  # group of every sorted row

    @property
    def n(self) -> int:
        return len(self.starts)


def group_rows(keys: np.ndarray, major: np.ndarray | None = None) -> Groups:
    """Stable grouping of rows by a non-negative integer key (and an optional major key)."""
    keys = np.asarray(keys)
    order = stable_order(keys) if major is None else order_by(np.asarray(major), keys)
    sk = keys[order]
    if len(sk) == 0:
        z = np.zeros(0, np.int64)
        return Groups(order, z, z, z)
    change = sk[1:] != sk[:-1]
    if major is not None:
        sm = np.asarray(major)[order]
        change |= sm[1:] != sm[:-1]
    starts = np.flatnonzero(np.r_[True, change]).astype(np.int64)
    counts = np.diff(np.r_[starts, len(sk)]).astype(np.int64)
    gid = np.repeat(np.arange(len(starts), dtype=np.int64), counts)
    return Groups(order, starts, counts, gid)


def group_runs(run_keys: np.ndarray, run_splits: np.ndarray) -> tuple[Groups, np.ndarray]:
    """The :class:`Groups` of :func:`group_rows`, when rows come in runs that share a key.

    ``run_splits`` (R+1) cuts the rows into runs (in row order, none empty);
    ``run_keys`` (R) are non-negative integer keys. Sorting R runs instead of N
    rows gives exactly ``group_rows(keys)`` for the per-row keys (rows of a
    group in row order). Also returns each group's key.
    """
    run_keys = np.asarray(run_keys)
    run_splits = np.asarray(run_splits, np.int64)
    lens = np.diff(run_splits)
    if not len(lens):
        z = np.zeros(0, np.int64)
        return Groups(z, z, z, z), z
    ro = stable_order(run_keys)
    sk = run_keys[ro]
    lens = lens[ro]
    before = np.cumsum(lens) - lens  # where each (sorted) run starts among the sorted rows
    n = int(before[-1] + lens[-1])
    order = np.repeat(run_splits[:-1][ro] - before, lens) + np.arange(n, dtype=np.int64)
    first = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    starts = before[first].astype(np.int64)
    counts = np.diff(np.r_[starts, n]).astype(np.int64)
    gid = np.repeat(np.arange(len(starts), dtype=np.int64), counts)
    return Groups(order, starts, counts, gid), ro[first]


def _cast_float(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float64 results -> the attribute dtype (rounding and saturating integers)."""
    if dtype.kind == "f":
        return values.astype(dtype)
    if dtype.kind == "b":
        return values >= 0.5
    info = np.iinfo(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)


def _sums64(rows: np.ndarray, g: Groups) -> np.ndarray:
    """Per-group float64 sums accumulated in row order (bincount adds sequentially)."""
    flat = rows.reshape(len(rows), -1).astype(np.float64, copy=False)
    out = np.empty((g.n, flat.shape[1]), np.float64)
    for c in range(flat.shape[1]):
        out[:, c] = np.bincount(g.gid, weights=flat[:, c], minlength=g.n)
    return out.reshape((g.n,) + rows.shape[1:])


_BINCOUNT_CELLS = 1 << 24  # groups x value range up to which one bincount finds every group's mode


def _value_mode(rows: np.ndarray, g: Groups) -> np.ndarray | None:
    """The mode of integer (or bool) rows per group, ties to the smallest row; ``None`` if they do not pack.

    Measured: at 1e7 LAS points the generic row mode (a lexsort of every channel
    and the groups) was 28% of an ingest. Here each row and its group become one
    int64 key (group, then channel by channel, each offset by its minimum), which
    is counted (``bincount``, when groups x values are few: bit fields,
    classifications) or sorted once; the order of keys is the order of rows, so
    ties and results are those of the generic path.
    """
    if rows.dtype.kind not in "biu" or not len(rows):
        return None
    flat = rows.reshape(len(rows), -1).astype(np.int64)
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    spans = [int(h - l_) + 1 for l_, h in zip(lo.tolist(), hi.tolist())]
    total = g.n
    for sp in spans:
        total *= sp
    if total >= 1 << 62:
        return None
    key = g.gid.astype(np.int64)
    for c, sp in enumerate(spans):
        key = key * sp + (flat[:, c] - lo[c])
    width = total // g.n  # keys per group
    if total <= _BINCOUNT_CELLS:
        best = np.argmax(np.bincount(key, minlength=total).reshape(g.n, width), axis=1)  # first = smallest
    else:
        sk = np.sort(key)
        start = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
        run_count = np.diff(np.r_[start, len(sk)])
        run_key = sk[start]
        run_gid = run_key // width
        pick = np.lexsort((run_key, -run_count, run_gid))  # per group: most frequent, then the smallest row
        first = np.r_[True, run_gid[pick][1:] != run_gid[pick][:-1]]
        best = run_key[pick[first]] % width
    out = np.empty((g.n, len(spans)), np.int64)
    for c in range(len(spans) - 1, -1, -1):
        out[:, c] = best % spans[c] + lo[c]
        best = best // spans[c]
    return out.reshape((g.n,) + rows.shape[1:]).astype(rows.dtype)


def _row_mode(rows: np.ndarray, g: Groups) -> np.ndarray:
    fast = _value_mode(rows, g)
    if fast is not None:
        return fast
    return _row_mode_sorted(rows, g)


def _row_mode_sorted(rows: np.ndarray, g: Groups) -> np.ndarray:
    """The generic row mode: a lexsort of every channel and the groups (any dtype, any range)."""
    flat = rows.reshape(len(rows), -1)
    keys = [flat[:, c] for c in range(flat.shape[1] - 1, -1, -1)] + [g.gid]
    o = np.lexsort(keys)
    sf, sg = flat[o], g.gid[o]
    change = np.r_[True, (sg[1:] != sg[:-1]) | (sf[1:] != sf[:-1]).any(axis=1)]
    run_start = np.flatnonzero(change)
    run_count = np.diff(np.r_[run_start, len(sf)])
    run_gid = sg[run_start]
    pick = np.lexsort((np.arange(len(run_start)), -run_count, run_gid))
    first = np.r_[True, run_gid[pick][1:] != run_gid[pick][:-1]]
    best = run_start[pick[first]]
    return rows[o[best]]


def min_max_ufunc(how: str, dtype) -> np.ufunc:
    """``min`` / ``max`` as a ufunc; for floats the NaN-skipping ``fmin`` / ``fmax``."""
    if np.dtype(dtype).kind == "f":
        return np.fmin if how == "min" else np.fmax
    return np.minimum if how == "min" else np.maximum


def nan_mean(sums: np.ndarray, counts: np.ndarray, dtype) -> np.ndarray:
    """Means of float values from the sums and counts of their non-NaN values (NaN where there are none)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts).astype(dtype)


def reduce_rows(rows: np.ndarray, g: Groups, how: str) -> np.ndarray:
    """Reduce group-sorted ``rows`` ((N,) or (N, C)) to one row per group, keeping the dtype."""
    dtype = rows.dtype
    if g.n == 0:
        return rows[:0]
    if how == "first":
        return rows[g.starts]
    if how in ("min", "max"):
        return min_max_ufunc(how, dtype).reduceat(rows, g.starts, axis=0)
    if how == "mode":
        return _row_mode(rows, g)
    ok = ~np.isnan(rows) if dtype.kind == "f" and np.isnan(rows).any() else None
    if how == "mean":
        if ok is not None:
            return nan_mean(_sums64(np.where(ok, rows, 0), g), _sums64(ok, g), dtype)
        counts = g.counts.reshape((-1,) + (1,) * (rows.ndim - 1))
        return _cast_float(_sums64(rows, g) / counts, dtype)
    if how == "sum":
        if dtype.kind == "f":
            return _sums64(rows if ok is None else np.where(ok, rows, 0), g).astype(dtype)
        if dtype.kind == "b":
            return np.maximum.reduceat(rows, g.starts, axis=0)
        wide = np.uint64 if dtype.kind == "u" else np.int64
        s = np.add.reduceat(rows.astype(wide), g.starts, axis=0)
        info = np.iinfo(dtype)
        return np.clip(s, info.min, info.max).astype(dtype)
    raise InputError(f"unknown reduction {how!r}; choose one of {REDUCTIONS}")
