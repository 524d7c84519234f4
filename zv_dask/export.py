"""Export a level (or a box of it) to LAS/LAZ or Parquet: the way back out to PDAL, QGIS and CloudCompare.

The points come from :func:`~zv_dask.read_points` (a lazy box read, one
partition per chunk group), read in parallel on the current scheduler or
client. Outputs, chosen by the name of ``out``:

* ``*.las`` / ``*.laz``: one file, written partition by partition in chunk
  order by laspy (a few partitions computed ahead, so memory stays bounded).
  The header comes from the store's LAS record (``zv_dask.las``, left by LAS
  ingest), else from :mod:`zv_dask.format.las_layout`'s choice; see there.
* ``*.parquet`` / ``*.pq``: one Parquet file (one row group per partition,
  written in order), what PDAL, GDAL/QGIS, DuckDB and pandas open directly.
* a path ending in ``/``: a directory of Parquet part files (``part.0.parquet``
  ...), each written by the worker that read it, as ``dask.dataframe.to_parquet``
  does: the parallel form, for dask/Spark-style readers.

Parquet columns are :func:`~zv_dask.read_points`' (positions as stored, ``rgb``
as ``rgb_0``..``rgb_2``, ``object_id`` when present; the ``point`` index is not
written). The file's key-value metadata holds ``zv_dask`` (JSON: store, level,
box, axes, attributes, CRS and LAS record) and ``crs`` (the WKT, PROJJSON, or
``EPSG:<code>``). GeoParquet's ``geo`` key is not written: it needs a geometry
column.

Outputs are local paths. An existing output is refused unless
``overwrite=True``; the output is written to a hidden sibling and renamed into
place at the end, so a failed export leaves nothing behind. A box holding no
points gives an empty file (a header-only LAS, a schema-only Parquet), as
PDAL's writers do.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from zv_dask.errors import InputError, StoreError
from zv_dask.format.las_layout import LasLayout, las_record, plan_las
from zv_dask.progress import say
from zv_dask.read import _schema, parse_box, read_points, require_finished
from zv_dask.scheduling import resolve_client, run_tasks, task_slots
from zv_dask.store.api import as_store, get_resolution_level
from zv_dask.types import BoxLike, ClientLike, PathLike, StoreLike

__all__ = ["export", "output_format"]

FORMATS = {".las": "las", ".laz": "laz", ".parquet": "parquet", ".pq": "parquet"}
MAX_AHEAD = 16  # partitions computed ahead of the writer, at most


def output_format(out, format: str | None = None) -> tuple[str, bool]:
    """``(format, directory)`` of an output: from ``format`` or the suffix; a trailing ``/`` asks for part files."""
    text = os.fspath(out)
    directory = text.endswith(("/", os.sep))
    if format is not None:
        fmt = str(format).lower().lstrip(".")
        if fmt not in FORMATS.values():
            raise InputError(f"format={format!r} is not one of {sorted(set(FORMATS.values()))}")
    else:
        guessed = "parquet" if directory else FORMATS.get(Path(text.rstrip("/" + os.sep)).suffix.lower())
        if guessed is None:
            raise InputError(f"cannot tell the format of {text!r} from its name: use a .las, .laz, .parquet or .pq "
                             "file, or a path ending in / for a directory of Parquet part files (or pass format=)")
        fmt = guessed
    if directory and fmt != "parquet":
        raise InputError(f"{text!r} ends in '/', a directory of part files, which only the Parquet export writes")
    return fmt, directory


def _target(out, overwrite: bool) -> Path:
    text = os.fspath(out)
    if "://" in text and not text.startswith("file://"):
        raise InputError(f"export writes local files; got {text!r} (write locally, then upload)")
    path = Path(text[7:] if text.startswith("file://") else text).expanduser().absolute()
    if not path.parent.is_dir():
        raise StoreError(f"the folder of {text!r} does not exist: {str(path.parent)!r}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise StoreError(f"{text!r} already exists; pass overwrite=True to replace it")
    return path


def _replace(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``path`` (an existing one only with ``overwrite``)."""
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise StoreError(f"{str(path)!r} appeared while exporting; pass overwrite=True to replace it")
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
            return
        if tmp.is_dir():
            path.unlink()
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# -- computing partitions in order -----------------------------------------------------------
def _in_order(parts: list, client, ahead: int):
    """Computed partitions in order, at most ``ahead`` of them in flight or waiting for the writer."""
    if client is not None:
        pending: deque = deque()
        try:
            for p in parts:
                pending.append(client.compute(p))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
        return
    import dask

    for i in range(0, len(parts), ahead):
        yield from dask.compute(*parts[i:i + ahead])


def _with_progress(frames, total: int, label: str, show: bool):
    if not show:
        yield from frames
        return
    t = time.perf_counter()
    if not sys.stderr.isatty():  # a log: a line when it starts and one when it ends
        say(f"{label}: {total} partitions")
        yield from frames
        say(f"{label}: done in {time.perf_counter() - t:.1f} s")
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=label, unit="part", file=sys.stderr, leave=True) as bar:
        for f in frames:
            yield f
            bar.update(1)


# -- writers -----------------------------------------------------------------------------------
def _write_las(frames, tmp: Path, layout: LasLayout, compress: bool) -> tuple[int, int]:
    """Stream frames into one LAS/LAZ file; ``(points, points moved to the integer grid)``."""
    import laspy

    points = moved = 0
    with open(tmp, "wb") as fh, laspy.LasWriter(fh, header=layout.header, do_compress=compress,
                                                closefd=False) as writer:
        for df in frames:
            if len(df):
                record, off_grid = layout.points(df)
                writer.write_points(record)
                points += len(df)
                moved += off_grid
    return points, moved


def _file_metadata(meta: dict) -> dict[bytes, bytes]:
    out = {b"zv_dask": json.dumps(meta, default=_plain).encode()}
    crs = meta.get("crs") or {}
    if crs.get("wkt"):
        out[b"crs"] = str(crs["wkt"]).encode()
    elif crs.get("projjson"):
        out[b"crs"] = json.dumps(crs["projjson"]).encode()
    elif crs.get("epsg") is not None:
        out[b"crs"] = f"EPSG:{crs['epsg']}".encode()
    return out


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v.tolist() if isinstance(v, np.ndarray) else str(v)


def _write_parquet_file(frames, tmp: Path, meta_frame, kv: dict) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.Schema.from_pandas(meta_frame, preserve_index=False)
    schema = schema.with_metadata({**(schema.metadata or {}), **kv})
    points = 0
    with pq.ParquetWriter(tmp, schema) as writer:
        for df in frames:
            if len(df):
                writer.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False))
                points += len(df)
    return points


def _write_parquet_parts(ddf, tmp: Path, kv: dict, client, progress: bool) -> int:
    job = ddf.to_parquet(str(tmp), write_index=False, custom_metadata=kv, write_metadata_file=False, compute=False)
    run_tasks([job], client, progress=progress, label="zv-dask export")
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(tmp.glob("*.parquet")))


# -- the export --------------------------------------------------------------------------------
def _bbox_list(bbox, ndim: int):
    """The box as two lists (checked as :func:`~zv_dask.read_points` checks it), or ``None``."""
    box = parse_box(bbox, ndim)
    return None if box is None else [box[0].tolist(), box[1].tolist()]


def export(store: StoreLike, out: PathLike, *, level: int = 0, bbox: BoxLike | None = None,
           attributes: Sequence[str] | None = None, format: str | None = None, storage_options: dict | None = None,
           backend: str | None = None, branch: str = "main", client: ClientLike = None, overwrite: bool = False,
           progress: bool = False) -> dict:
    """Write a level of a store (or the points of a closed box of it) to a LAS/LAZ or Parquet file.

    ``out``'s suffix picks the format (``.las``, ``.laz``, ``.parquet``/``.pq``;
    a trailing ``/`` writes a directory of Parquet part files), or ``format=``
    does. ``bbox=(lo, hi)`` keeps the points with ``lo <= p <= hi``;
    ``attributes`` picks attributes (default all). ``storage_options``,
    ``backend`` and ``branch`` open a store given by path or URL as
    :func:`~zv_dask.open_store` does; ``client`` is a ``distributed.Client``
    (default: the current one, else Dask's local scheduler).

    A LAS export of a store made from LAS files gives back the same points,
    dimensions, scales, offsets, point format, version and CRS; a coarse level's
    positions (centroids) are rounded to the integer grid. Returns a JSON-ready
    summary: ``file``, ``format``, ``points``, ``bytes``, ``level``, ``bbox``,
    ``columns``, ``crs`` (the store's) and ``crs_written`` (how), ``las`` (the
    header: version, point format, scales, offsets, extra bytes, where it came
    from), ``notes`` and ``seconds``.
    """
    t0 = time.perf_counter()
    fmt, directory = output_format(out, format)
    path = _target(out, overwrite)
    zs = as_store(store, storage_options=storage_options, backend=backend, branch=branch)
    level = require_finished(zs, level)  # not a level an unfinished job is writing
    get_resolution_level(zs, level)  # StoreError naming the levels there are
    meta = zs.metadata
    box = _bbox_list(bbox, meta.ndim)
    axes, attrs, has_obj, vdtype = _schema(zs, level, attributes)
    ddf = read_points(zs, level=level, bbox=box, attributes=list(attrs))
    client = resolve_client(client)
    record = las_record(zs.root.attrs.asdict())
    summary = {"file": str(path), "format": fmt, "layout": "directory" if directory else "file",
               "store": zs.url or zs.backend.kind, "level": int(level), "bbox": box, "points": 0, "bytes": 0,
               "columns": list(ddf.columns), "crs": meta.crs, "crs_written": None, "notes": []}
    layout = None
    if fmt in ("las", "laz"):
        layout = plan_las(axes, attrs, has_obj, record, meta.crs, bounds=meta.bounds, bbox=box, level=level,
                          vertex_dtype=vdtype)
        summary["crs_written"] = layout.crs_written
        summary["notes"] += layout.notes
    else:
        kv = _file_metadata({"store": summary["store"], "level": int(level), "bbox": box, "axes": axes,
                             "position_dtype": str(vdtype),
                             "attributes": {n: {"dtype": str(dt), "channels": ch} for n, (dt, ch) in attrs.items()},
                             "crs": meta.crs, "las": record})
        summary["crs_written"] = "Parquet metadata 'crs'" if b"crs" in kv else None
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.zv-export")
    try:
        if directory:
            summary["points"] = _write_parquet_parts(ddf, tmp, kv, client, progress)
        else:
            parts = ddf.to_delayed()
            ahead = min(max(4, 2 * task_slots(client)), MAX_AHEAD)
            frames = _with_progress(_in_order(parts, client, ahead), len(parts), "zv-dask export", progress)
            if layout is not None:
                summary["points"], moved = _write_las(frames, tmp, layout, compress=fmt == "laz")
                if moved:
                    summary["notes"].append(f"{moved:,} positions were not on the LAS integer grid (scales "
                                            f"{layout.scales}) and were rounded to it")
            else:
                import pandas as pd  # (not at import: see zv_dask.read)

                empty = pd.DataFrame({c: np.zeros(0, dt) for c, dt in ddf.dtypes.items()})
                summary["points"] = _write_parquet_file(frames, tmp, empty, kv)
        _replace(tmp, path, overwrite)
    except BaseException:
        _remove(tmp)
        raise
    if layout is not None:
        summary["las"] = layout.describe()
    if not summary["points"]:
        summary["notes"].append("no points to export" + (" in the box" if box else "")
                                + ": the output is empty (as PDAL writes it)")
    summary["bytes"] = _size(path)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
