"""Statistics of a store's levels, the way ``pdal info --stats`` gives them for a file.

Per level: the point count; per axis and per attribute column (named as in
:func:`~zv_dask.read_points`, ``rgb`` -> ``rgb_0`` ...) the count, NaN count
(floats), min, max, mean and dtype; value counts of integer attributes with few
distinct values (always of ``classification``); distinct object ids; bytes on
disk. Per store: the CRS, the total bytes and the LAS header record when the
store was ingested from LAS/LAZ.

One pass over the data: every partition of every level is read once, by a dask
task that reduces it to a small summary; the summaries of a level combine in a
tree, and all levels are computed together. Bytes on disk come from the store's
listing (a directory walk, an object listing, or the sizes an icechunk snapshot
records), not from the data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from zv_dask.budget import fmt_bytes as fb
from zv_dask.errors import InputError
from zv_dask.format.crs import crs_label
from zv_dask.read import read_points
from zv_dask.scheduling import resolve_client, run_tasks
from zv_dask.store.api import as_store, list_resolution_levels
from zv_dask.store.backends import local_path
from zv_dask.types import ClientLike, StoreLike

__all__ = ["store_stats", "format_stats", "level_bytes", "MAX_VALUES", "COUNTED"]

MAX_VALUES = 256  # value counts are kept for integer attributes with at most this many distinct values
COUNTED = ("classification",)  # attributes whose value counts are always kept
FAN_IN = 16  # summaries combined per task of the tree
SHOWN_VALUES = 16  # format_stats lists the counts of other integer attributes up to this many values


# -- per-partition summaries ------------------------------------------------------------
def _value_counts(v: np.ndarray, lo, hi, limit: int | None):
    """``(values, counts)`` of an integer array, or ``None`` when it has more than ``limit`` distinct values."""
    if not len(v):
        return np.zeros(0, v.dtype), np.zeros(0, np.int64)
    if int(hi) <= np.iinfo(np.int64).max and int(hi) - int(lo) < 1 << 16:  # a short range: count in one sweep
        counts = np.bincount((v.astype(np.int64) - int(lo)).astype(np.intp))
        values = np.flatnonzero(counts)
        out = (values + int(lo)).astype(v.dtype), counts[values].astype(np.int64)
    else:
        if limit is not None and len(np.unique(v[:4 * limit])) > limit:  # many values already: no sort
            return None
        values, counts = np.unique(v, return_counts=True)
        out = values, counts.astype(np.int64)
    return None if limit is not None and len(out[0]) > limit else out


def _column(v: np.ndarray, counted: bool, limit: int | None) -> dict:
    """One column of one partition: ``n`` (non-NaN), ``nan``, ``min``, ``max``, ``mean``, ``values``."""
    if v.dtype.kind == "b":
        v = v.astype(np.uint8)
    nan = 0
    if v.dtype.kind == "f":
        bad = np.isnan(v)
        nan = int(bad.sum())
        if nan:
            v = v[~bad]
    s: dict[str, Any] = {"n": len(v), "nan": nan, "min": None, "max": None, "mean": None, "values": None}
    if len(v):
        s["min"], s["max"] = v.min(), v.max()
        s["mean"] = float(v.mean(dtype=np.float64))
    if counted:
        s["values"] = _value_counts(v, s["min"], s["max"], limit)
        s["counted"] = True
    return s


def _partial(df, columns: dict) -> dict:
    """A partition reduced to its summary; ``columns`` maps a column to ``(counted, limit)``."""
    out = {"rows": len(df), "columns": {c: _column(df[c].to_numpy(), *spec) for c, spec in columns.items()}}
    if "object_id" in df.columns:
        out["objects"] = np.unique(df["object_id"].to_numpy())
    return out


def _merge_values(a, b, limit: int | None):
    if a is None or b is None:
        return None
    values, inverse = np.unique(np.concatenate([a[0], b[0]]), return_inverse=True)
    counts = np.bincount(inverse.reshape(-1), weights=np.concatenate([a[1], b[1]]), minlength=len(values))
    return None if limit is not None and len(values) > limit else (values, counts.astype(np.int64))


def _merge_column(a: dict, b: dict, limit: int | None) -> dict:
    n = a["n"] + b["n"]
    out = {"n": n, "nan": a["nan"] + b["nan"], "min": a["min"], "max": a["max"], "mean": a["mean"],
           "values": None}
    if b["n"]:
        if a["n"]:
            out["min"], out["max"] = min(a["min"], b["min"]), max(a["max"], b["max"])
            out["mean"] = a["mean"] + (b["mean"] - a["mean"]) * (b["n"] / n)  # weighted, no large sums
        else:
            out["min"], out["max"], out["mean"] = b["min"], b["max"], b["mean"]
    if a.get("counted"):
        out["counted"] = True
        out["values"] = _merge_values(a["values"], b["values"], limit)
    return out


def _combine(parts: list[dict], columns: dict) -> dict:
    """Summaries of several partitions as one."""
    acc = parts[0]
    objects = [p["objects"] for p in parts if "objects" in p]
    for p in parts[1:]:
        acc = {"rows": acc["rows"] + p["rows"],
               "columns": {c: _merge_column(acc["columns"][c], p["columns"][c], columns[c][1]) for c in columns}}
    if objects:
        acc["objects"] = np.unique(np.concatenate(objects))
    return acc


def _level_graph(zs, level: int):
    """One delayed summary of a level: a task per partition, combined ``FAN_IN`` at a time."""
    import dask

    ddf = read_points(zs, level=level)
    axes = list(zs.metadata.axis_names)
    names = _attribute_names(zs, level)
    columns = {}
    for c in ddf.columns:
        if c == "object_id":
            continue
        name = c if c in names else c.rsplit("_", 1)[0]  # rgb_0 -> rgb
        counted = c not in axes and np.dtype(ddf.dtypes[c]).kind in "iub"
        columns[c] = (counted, None if name in COUNTED else MAX_VALUES)
    partial = dask.delayed(_partial, pure=True)
    combine = dask.delayed(_combine, pure=True)
    layer = [partial(p, columns) for p in ddf.to_delayed()]
    while len(layer) > 1:
        layer = [combine(layer[i:i + FAN_IN], columns) for i in range(0, len(layer), FAN_IN)]
    return layer[0], {c: str(ddf.dtypes[c]) for c in columns}, axes


def _attribute_names(zs, level: int) -> set[str]:
    g = zs.root[str(level)]
    return set(g["vertex_attributes"].array_keys()) if "vertex_attributes" in g else set()


# -- the summary as JSON ----------------------------------------------------------------
def _scalar(v):
    if v is None:
        return None
    return v.item() if isinstance(v, np.generic) else v


def _column_entry(s: dict, dtype: str) -> dict[str, Any]:
    e: dict[str, Any] = {"count": int(s["n"])}
    if np.dtype(dtype).kind == "f":
        e["nan"] = int(s["nan"])
    e.update(min=_scalar(s["min"]), max=_scalar(s["max"]), mean=s["mean"], dtype=dtype)
    if s.get("counted"):
        vc = s["values"]
        e["values"] = None if vc is None else {str(int(v)): int(n) for v, n in zip(*vc)}
    return e


def _level_entry(level: int, summary: dict, dtypes: dict, axes: list, nbytes) -> dict[str, Any]:
    cols = summary["columns"]
    return {
        "level": level,
        "points": int(summary["rows"]),
        "positions": {a: _column_entry(cols[a], dtypes[a]) for a in axes if a in cols},
        "attributes": {c: _column_entry(cols[c], dtypes[c]) for c in cols if c not in axes},
        "objects": int(len(summary["objects"])) if "objects" in summary else None,
        "bytes_on_disk": nbytes,
    }


# -- bytes on disk ----------------------------------------------------------------------
def _dir_bytes(path) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:  # removed while walking
                pass
    return total


def level_bytes(zs, prefixes: list[str]) -> tuple[dict[str, int | None], str, str | None]:
    """Bytes stored under each prefix (``""`` is the whole store), how they were measured, and a note.

    A local store is walked on disk; an object store (zarr ``ObjectStore`` over
    obstore) is listed with sizes and a zarr ``MemoryStore`` sums its values; an
    icechunk snapshot sums the sizes its manifests record (chunks shared with
    other snapshots count in each; the repository's own manifests and snapshots
    are not counted). Other stores report ``None``, and say so in the note.
    """
    from zarr.core.sync import sync
    from zarr.storage import LocalStore, MemoryStore, ObjectStore

    store = zs.store
    kind = zs.backend.kind
    if isinstance(store, LocalStore):
        root = local_path(str(store.root))
        return {p: _dir_bytes(root / p if p else root) for p in prefixes}, "files", None
    if isinstance(store, (ObjectStore, MemoryStore)) or kind == "icechunk":
        try:
            sizes: dict[str, int | None] = {p: int(sync(store.getsize_prefix(p))) for p in prefixes}
        except Exception as e:  # noqa: BLE001 - sizes are a courtesy; the statistics stand without them
            why = (str(e).strip().splitlines() or [""])[0]
            return dict.fromkeys(prefixes), "none", f"sizes not available: {type(e).__name__}: {why}"
        if kind == "icechunk":
            return sizes, "icechunk", ("icechunk: bytes of the chunks and metadata this snapshot references; "
                                       "chunks shared with other snapshots count in each, and the repository's "
                                       "manifests, snapshots and older versions are not counted")
        return sizes, "listing", None
    return dict.fromkeys(prefixes), "none", f"sizes are not measured for a {type(store).__name__}"


# -- entry point ------------------------------------------------------------------------
def _levels(zs, levels) -> list[int]:
    present = list_resolution_levels(zs)
    if zs.unfinished_job:  # as store_info: a level the unfinished job has not finished is not one yet
        present = [k for k in present if zs.unfinished_level(k) is None]
    if levels is None:
        return present
    wanted = [levels] if isinstance(levels, int) else list(levels)
    missing = [k for k in wanted if k not in present]
    if missing:
        raise InputError(f"levels {missing} are not in the store; it has levels {present}")
    return sorted(set(int(k) for k in wanted))


def store_stats(store: StoreLike, *, levels: Sequence[int] | None = None, storage_options: dict | None = None,
                backend: str | None = None, branch: str = "main", client: ClientLike = None,
                progress: bool = False) -> dict[str, Any]:
    """Per-level statistics of a store's points, JSON-ready, in one pass over the data.

    ``levels`` (an int or a list; default all) picks levels. Each level entry
    has ``points``; ``positions`` and ``attributes``, per column ``count``,
    ``nan`` (float columns), ``min``, ``max``, ``mean`` and ``dtype``, plus
    ``values`` (``{value: count}``, keys as strings; ``None`` past
    :data:`MAX_VALUES` distinct values) for integer attributes; ``objects``
    (distinct object ids, ``None`` without an object index); ``bytes_on_disk``.
    The store entry adds ``crs``, ``las`` (the LAS header record, if any),
    ``bytes_on_disk`` (total), ``bytes_source`` and a ``note`` when sizes are
    partial or missing. The tasks run on ``client`` (default: the current one,
    else dask's current scheduler).
    """
    zs = as_store(store, storage_options=storage_options, backend=backend, branch=branch)
    wanted = _levels(zs, levels)
    graphs = [_level_graph(zs, k) for k in wanted]
    sizes, source, note = level_bytes(zs, [""] + [str(k) for k in wanted])
    summaries = run_tasks([g[0] for g in graphs], resolve_client(client), progress=progress,
                          label=f"stats of {len(wanted)} level{'s' if len(wanted) != 1 else ''}")
    zv_attrs = zs.root.attrs.get("zv_dask") or {}
    return {
        "crs": zs.metadata.crs,
        "las": zv_attrs.get("las") if isinstance(zv_attrs, dict) else None,
        "bytes_on_disk": sizes[""],
        "bytes_source": source,
        "note": note,
        "levels": [_level_entry(k, s, dtypes, axes, sizes[str(k)])
                   for k, s, (_, dtypes, axes) in zip(wanted, summaries, graphs)],
    }


# -- for people -------------------------------------------------------------------------
def _num(v, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, int, np.integer)):
        return str(int(v))
    return f"{float(v):.{digits}g}"


def _counts(name: str, e: dict, out: list[str]) -> None:
    values = e.get("values")
    if not values:
        return
    classes = name == "classification"
    if not classes and len(values) > SHOWN_VALUES:  # the JSON has them
        return
    total = sum(values.values()) or 1
    out.append(f"    {name} counts:")
    for v, n in values.items():
        out.append(f"      {'class' if classes else 'value'} {v}: {n:,} ({100 * n / total:.1f}%)")


def format_stats(stats: dict, fmt_bytes=None) -> str:
    """The human summary of :func:`store_stats`: per level a line per column, counts, bytes on disk."""
    if fmt_bytes is None:
        def fmt_bytes(n):
            return "-" if n is None else fb(int(n))
    levels = ", ".join(str(lv["level"]) for lv in stats["levels"]) or "none"
    lines = [f"statistics (level{'s' if len(stats['levels']) != 1 else ''} {levels})",
             f"  crs          {crs_label(stats.get('crs'))}"]
    las = stats.get("las")
    if las:
        files = las.get("files") or []
        lines.append(f"  las          version {las.get('version')}, point format {las.get('point_format')}"
                     + (f", {len(files)} file{'s' if len(files) != 1 else ''}" if files else ""))
    for lv in stats["levels"]:
        objects = f", {lv['objects']:,} objects" if lv.get("objects") is not None else ""
        lines.append(f"  level {lv['level']}: {lv['points']:,} points{objects}, "
                     f"{fmt_bytes(lv.get('bytes_on_disk'))} on disk")
        cols = {**lv["positions"], **lv["attributes"]}
        width = max([9] + [len(c) for c in cols])
        lines.append(f"    {'dimension':<{width}} {'count':>13} {'min':>17} {'max':>17} {'mean':>17}  dtype")
        for c, e in cols.items():
            nan = f"  {e['nan']:,} NaN" if e.get("nan") else ""
            d = 7 if np.dtype(e["dtype"]).itemsize <= 4 else 10  # about what the dtype holds
            lines.append(f"    {c:<{width}} {e['count']:>13,} {_num(e['min'], d):>17} {_num(e['max'], d):>17} "
                         f"{_num(e['mean'], d):>17}  {e['dtype']}{nan}")
        for c, e in lv["attributes"].items():
            _counts(c, e, lines)
    per = ", ".join(f"level {lv['level']} {fmt_bytes(lv.get('bytes_on_disk'))}" for lv in stats["levels"])
    lines.append(f"  on disk      {per}; total {fmt_bytes(stats.get('bytes_on_disk'))}"
                 + (f" ({stats['note']})" if stats.get("note") else ""))
    return "\n".join(lines)
