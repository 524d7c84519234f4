"""Pass 1 of a job: the scan that settles the bounds, and the choice of the stored dtype.

Shared by :func:`~zv_dask.ingest` and :func:`~zv_dask.plan_ingest`.
"""

from __future__ import annotations

from functools import reduce

import numpy as np
from dask import delayed

from zv_dask.errors import InputError, ZVError
from zv_dask.format.grid import Grid
from zv_dask.ingest.bounds import combine_stats, settle_bounds
from zv_dask.ingest.recovery import stage_error
from zv_dask.ingest.shuffle import combine_occupancy
from zv_dask.ingest.tasks import scan_task
from zv_dask.scheduling import run_tasks

__all__ = ["scan_pass", "scan_warnings", "precision_warnings", "nan_warnings", "choose_dtype"]


def scan_pass(src, plan, out_of_bounds: str, client, progress: bool = False, sample: bool = True,
              local: list | None = None):
    """Pass 1: statistics and per-chunk counts of every partition, reduced on the client.

    ``local`` (in-memory input) are the partitions as they sit in this process:
    they are scanned here, while the same data travel to the workers.
    Returns ``(stats, final_bounds, n_dropped, occupancy, rows_per_partition)``; raises before
    anything is written when the policy rejects the input.
    """
    probe_bounds = plan.bounds if plan.bounds is not None else ([0.0] * src.ndim, [0.0] * src.ndim)
    probe = Grid(tuple(map(float, probe_bounds[0])), tuple(map(float, probe_bounds[1])), plan.chunk_shape,
                 plan.base_bin_shape or plan.chunk_shape, plan.dtype)
    drop = out_of_bounds == "ignore" and plan.bounds is not None
    scans = [delayed(scan_task)(p, probe, plan.bounds, drop, 0, sample) for p in (local or src.scan_partitions)]
    try:
        if local is not None:
            import dask.local

            scanned = list(dask.compute(*scans, scheduler=dask.local.get_sync))  # (by name, dask imports distributed)
        else:
            scanned = run_tasks(scans, client, progress, "scan: statistics and chunk counts")
    except Exception as e:
        if isinstance(e, ZVError):
            raise
        raise stage_error("scan", e, {s.key: (f"input partition {p}", None) for p, s in enumerate(scans)}) from e
    offsets = np.r_[0, np.cumsum([s.stats.count for s in scanned])[:-1]].astype(np.int64)
    for s, off in zip(scanned, offsets):
        if s.stats.first_nonfinite >= 0:
            s.stats.first_nonfinite += int(off)
    stats = reduce(combine_stats, [s.stats for s in scanned])
    counts = [int(s.stats.count) for s in scanned]
    final_bounds, dropped = settle_bounds(stats, plan.bounds, out_of_bounds,
                                          lambda row: src.describe_row(row, counts))
    return stats, final_bounds, dropped, combine_occupancy([s.occupancy for s in scanned], src.ndim), counts


def precision_warnings(dtype: str, stats, src) -> list[str]:
    """A warning when float32 storage would round double-precision input coarser than 1e-6 of its extent."""
    if dtype != "float32" or src.position_dtype != np.float64:
        return []
    mag = float(np.max(np.abs(np.r_[stats.lo, stats.hi])))
    extent = float(np.max(stats.hi - stats.lo)) or 1.0
    step = float(np.spacing(np.float32(mag)))
    if step > 1e-6 * extent:
        return [f"float32 positions round to {step:.3g} at coordinate magnitude {mag:.3g}; "
                "pass dtype='float64' to keep the source's precision"]
    return []


def nan_warnings(stats) -> list[str]:
    """A warning per float attribute holding NaN: kept at level 0, skipped by the coarse levels' reductions."""
    return [f"attribute {name!r} holds {n:,} NaN value(s) (of {stats.count:,}): kept as they are at level 0; the "
            "coarse levels' mean, sum, min and max skip them (a bin of NaN only stays NaN)"
            for name, n in sorted(stats.nan_values.items()) if n]


def scan_warnings(dtype: str, stats, src) -> list[str]:
    """What the scan found worth saying: float32 rounding, NaN attribute values."""
    return precision_warnings(dtype, stats, src) + nan_warnings(stats)


def choose_dtype(dtype, src) -> tuple[str, str]:
    if dtype is not None:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise InputError(f"dtype {dtype!r} is not a numpy dtype; use float32 or float64") from None
        if dt.name not in ("float32", "float64"):  # (float16 and float128 are floats no ZV reader expects)
            raise InputError(f"dtype must be float32 or float64 for stored positions, got {dtype!r}")
        return dt.name, "as requested"
    if src.kind == "las":
        return "float64", "LAS coordinates are georeferenced; float32 would lose centimetres"
    if src.reprojected_from:
        return "float64", "reprojected coordinates are georeferenced; float32 would lose centimetres"
    return "float32", "default; pass dtype='float64' to keep double precision"
