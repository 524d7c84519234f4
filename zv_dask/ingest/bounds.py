"""Per-partition statistics, their reduction, and the out-of-bounds policies.

Statistics are computed on positions cast to the store dtype, the values that
will be stored and binned, so the bounds settled here are the bounds every
later step agrees with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zv_dask.errors import InputError, OutOfBoundsError

__all__ = ["PartitionStats", "partition_stats", "combine_stats", "settle_bounds", "POLICIES"]

POLICIES = ("raise", "ignore", "expand")


@dataclass
class PartitionStats:
    """Count, extent, non-finite rows and rows outside the requested bounds."""

    count: int
    lo: np.ndarray
    hi: np.ndarray
    nonfinite: int
    first_nonfinite: int
    outside: int
    nan_values: dict  # float attribute -> NaN values in it (kept; the pyramid's reductions skip them)
    too_large: int = 0  # of the non-finite rows, those finite in the input but beyond the stored dtype's range

    @staticmethod
    def empty(ndim: int) -> PartitionStats:
        return PartitionStats(0, np.full(ndim, np.inf), np.full(ndim, -np.inf), 0, -1, 0, {})


def partition_stats(positions: np.ndarray, dtype: str, bounds=None, offset: int = 0,
                    original: np.ndarray | None = None) -> PartitionStats:
    """Statistics of one partition; ``offset`` is its first row in the whole input.

    ``original`` are the positions before a cast to ``dtype`` (default: ``positions``):
    rows finite there but not after it are counted as too large for the dtype.

    Column by column over strided views (no ``(N, D)`` temporaries): NaN and
    inf show in a column's min/max, so the row scan for them runs only when one
    is there.
    """
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf: counted (too_large) below
        p = np.asarray(positions).astype(dtype, copy=False)
    if p.ndim != 2:
        raise InputError(f"points must be a 2-D (N, D) array, got shape {p.shape}")
    d = p.shape[1]
    lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
    if not len(p):
        return PartitionStats(0, lo, hi, 0, -1, 0, {})
    for k in range(d):
        col = p[:, k]
        lo[k], hi[k] = float(col.min()), float(col.max())
    n_bad, first, good, too_large = 0, -1, p, 0
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        finite = np.isfinite(p).all(axis=1)
        n_bad = int(len(p) - finite.sum())
        if n_bad:
            first = int(np.argmin(finite)) + offset
            src = np.asarray(positions if original is None else original)
            too_large = int(np.isfinite(src[~finite]).all(axis=1).sum())
            good = p[finite]
            lo, hi = np.full(d, np.inf), np.full(d, -np.inf)
            for k in range(d):
                if len(good):
                    lo[k], hi[k] = float(good[:, k].min()), float(good[:, k].max())
    outside = 0
    if bounds is not None and len(good):
        blo = np.asarray(bounds[0]).astype(dtype)
        bhi = np.asarray(bounds[1]).astype(dtype)
        out_mask = None
        for k in range(d):
            if lo[k] < blo[k] or hi[k] > bhi[k]:
                col = good[:, k]
                m = (col < blo[k]) | (col > bhi[k])
                out_mask = m if out_mask is None else (out_mask | m)
        outside = int(out_mask.sum()) if out_mask is not None else 0
    return PartitionStats(len(p), lo, hi, n_bad, first, outside, {}, too_large)


def combine_stats(a: PartitionStats, b: PartitionStats) -> PartitionStats:
    firsts = [f for f in (a.first_nonfinite, b.first_nonfinite) if f >= 0]
    return PartitionStats(a.count + b.count, np.minimum(a.lo, b.lo), np.maximum(a.hi, b.hi),
                          a.nonfinite + b.nonfinite, min(firsts) if firsts else -1, a.outside + b.outside,
                          {k: a.nan_values.get(k, 0) + b.nan_values.get(k, 0)
                           for k in sorted(set(a.nan_values) | set(b.nan_values))},
                          a.too_large + b.too_large)


def settle_bounds(stats: PartitionStats, bounds, policy: str, describe_row=None):
    """Final bounds for a job, or an error that names the problem.

    ``bounds`` are the store's (or the user's) bounds, ``None`` meaning "fit the
    data exactly". Returns ``(final_bounds, n_dropped)``. ``describe_row(row)``
    says where a row of the input is (``row 12 of 'a.parquet'``); default ``row 12``.
    """
    if policy not in POLICIES:
        raise InputError(f"out_of_bounds={policy!r} is not one of {POLICIES}")
    where = None
    if stats.nonfinite:
        where = f"row {stats.first_nonfinite}"
        if describe_row is not None:
            try:
                where = describe_row(stats.first_nonfinite)
            except Exception:  # noqa: BLE001 - only a better message
                pass
    if stats.nonfinite and stats.too_large == stats.nonfinite:
        raise InputError(f"{stats.nonfinite} point(s) have coordinates too large for the stored position dtype "
                         f"(float32 holds up to 3.4e38), the first at {where}; pass "
                         "dtype='float64' or fix them")
    if stats.nonfinite:
        raise InputError(f"{stats.nonfinite} point(s) have non-finite coordinates (NaN or inf"
                         + (f"; {stats.too_large} of them too large for the stored dtype" if stats.too_large else "")
                         + f"), the first at {where}; drop or fix them before ingesting")
    if stats.count == 0:
        raise InputError("the input holds no points")
    data = (stats.lo, stats.hi)
    if bounds is None:
        return ([float(v) for v in data[0]], [float(v) for v in data[1]]), 0
    lo = [float(v) for v in bounds[0]]
    hi = [float(v) for v in bounds[1]]
    if stats.outside == 0:
        return (lo, hi), 0
    if policy == "raise":
        raise OutOfBoundsError(
            f"{stats.outside} of {stats.count} points lie outside the bounds {[lo, hi]} "
            f"(data extent {[list(map(float, data[0])), list(map(float, data[1]))]}); "
            "pass out_of_bounds='ignore' to drop them or 'expand' to grow the bounds")
    if policy == "ignore":
        if stats.outside == stats.count:
            raise OutOfBoundsError(f"all {stats.count} points lie outside the bounds {[lo, hi]}; nothing to write")
        return (lo, hi), stats.outside
    return ([min(a, float(b)) for a, b in zip(lo, data[0])], [max(a, float(b)) for a, b in zip(hi, data[1])]), 0
