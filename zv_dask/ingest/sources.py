"""Every supported input, as a list of lazy partitions of points.

A partition computes to a :class:`Batch`: ``positions`` ``(n, D)``, a dict of
per-point ``attributes`` ``(n,)`` / ``(n, C)`` and optional ``object_ids``
``(n,)``. Partition order is input order: row ``r`` of partition ``p`` comes
after every row of partitions ``< p``, which is what makes the output
independent of how the input was partitioned.

Inputs: numpy / dask arrays, pandas / dask DataFrames, xarray Datasets, and
paths or globs of Parquet, CSV, NPY, zarr arrays and LAS/LAZ files (read in
chunks of points, never whole).
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zv_dask.errors import InputError
from zv_dask.format.crs import normalize_crs
from zv_dask.ingest.batch import Batch
from zv_dask.ingest.files import Part, csv_parts, csv_sample, describe_row, first_text_value, parquet_parts, read_part
from zv_dask.ingest.inputs import check_attributes, check_object_ids, check_positions
from zv_dask.ingest.las import choose_attributes, choose_crs, las_record, las_slice, read_las_files
from zv_dask.ingest.reproject import check_reproject, reproject_source

__all__ = ["Source", "as_source", "DEFAULT_PARTITION_ROWS"]

DEFAULT_PARTITION_ROWS = 1 << 21  # ~2 M points: big enough to amortise, small enough for 2 GiB workers
DEFAULT_AXES = ("x", "y", "z", "w")


@dataclass
class Source:
    """Lazy partitions plus what is known about them before reading."""

    partitions: list  # dask Delayed objects, each computing a Batch
    ndim: int
    position_dtype: np.dtype
    attributes: dict  # name -> (dtype str, channels or None)
    has_object_ids: bool
    axes: list[str] | None = None
    kind: str = "array"
    n_rows: int | None = None
    description: str = ""
    in_memory: bool = False  # the data sit in this process (numpy, pandas): ship them to workers once
    crs: dict | None = None  # the root ``crs`` the input declares (LAS headers) or the user gave
    las: dict | None = None  # the LAS header record (``zv_dask`` -> ``las`` in the root attributes)
    reprojected_from: list | None = None  # labels of the CRSs the positions were transformed from
    where: list | None = None  # per partition, the file and place it reads (files.Part), to name a row
    scan_parts: list | None = None  # the partitions as the scan needs them (positions, float attributes), if cheaper

    @property
    def scan_partitions(self) -> list:
        """What pass 1 reads: :attr:`scan_parts` when the source has them, else :attr:`partitions`."""
        return self.partitions if self.scan_parts is None else self.scan_parts

    def describe_row(self, row: int, counts: list[int]) -> str:
        """``row N`` of the whole input, or where it is in a file (``counts``: rows per partition)."""
        if self.where is None or len(self.where) != len(counts):
            return f"row {row}"

        ends = np.cumsum(counts)
        p = int(np.searchsorted(ends, row, side="right"))
        if p >= len(self.where):
            return f"row {row}"
        return describe_row(self.where[p], row - (int(ends[p - 1]) if p else 0))


# -- helpers that run on workers (top level so they pickle by reference) ---------------
def _batch_from_arrays(pos, attrs, oids) -> Batch:
    pos = np.asarray(pos)
    attrs = {k: np.asarray(v) for k, v in (attrs or {}).items()}
    return Batch(pos, attrs, None if oids is None else np.asarray(oids))


def _batch_from_frame(frame, columns, attr_names, oid_column) -> Batch:
    if len(frame):
        pos = np.column_stack([frame[c].to_numpy() for c in columns])
    else:
        pos = np.zeros((0, len(columns)), np.result_type(*[frame[c].dtype for c in columns]))
    attrs = {a: frame[a].to_numpy() for a in attr_names}
    oids = frame[oid_column].to_numpy() if oid_column is not None else None
    return Batch(pos, attrs, oids)


def _npy_slice(path, start, stop, columns) -> Batch:
    arr = np.load(path, mmap_mode="r")
    block = np.asarray(arr[start:stop])
    if block.dtype.names:  # structured array: named columns
        pos = np.column_stack([block[c] for c in columns])
        attrs = {n: np.asarray(block[n]) for n in block.dtype.names if n not in columns}
        return Batch(pos, attrs, None)
    return Batch(block, {}, None)


def _las_batch(path, start, count, specs) -> Batch:
    pos, attrs = las_slice(path, start, count, specs)
    return Batch(pos, attrs, None)


# -- arrays ----------------------------------------------------------------------------
def _from_arrays(points, attributes, object_ids, partition_rows, kind="array") -> Source:
    from dask import delayed

    n, d = check_positions(points)
    if not _is_dask(points) and not any(_is_dask(v) for v in list((attributes or {}).values()) + [object_ids]):
        return _from_numpy(np.asarray(points), attributes, object_ids, partition_rows, kind)
    import dask.array as da

    is_dask = isinstance(points, da.Array)
    if is_dask:
        pts = points.rechunk({1: -1}) if len(points.chunks[1]) > 1 else points
    else:
        pts = da.from_array(np.asarray(points), chunks=(max(1, min(partition_rows, n)), d), name=False)
    row_chunks = pts.chunks[0]
    attributes = check_attributes(attributes, n, row_chunks if is_dask else None)
    object_ids = check_object_ids(object_ids, n, row_chunks if is_dask else None)
    if n == 0:
        raise InputError("the input holds no points")

    def to_dask(name, v):
        if isinstance(v, da.Array):
            if v.chunks[0] != row_chunks:
                raise InputError(f"{name} is chunked {v.chunks[0]} along rows but points are chunked {row_chunks}; "
                                 "rechunk them alike")
            return v.rechunk({1: -1}) if v.ndim == 2 and len(v.chunks[1]) > 1 else v
        return da.from_array(np.asarray(v), chunks=(row_chunks,) + tuple((s,) for s in np.shape(v)[1:]), name=False)

    attr_d = {k: to_dask(f"attribute {k!r}", v) for k, v in attributes.items()}
    oid_d = to_dask("object_ids", object_ids) if object_ids is not None else None
    pblocks = pts.to_delayed().reshape(-1)
    ablocks = {k: v.to_delayed().reshape(-1) for k, v in attr_d.items()}
    oblocks = oid_d.to_delayed().reshape(-1) if oid_d is not None else [None] * len(pblocks)
    parts = [delayed(_batch_from_arrays, pure=True)(pblocks[i], {k: b[i] for k, b in ablocks.items()}, oblocks[i])
             for i in range(len(pblocks))]
    return _array_source(parts, n, d, points.dtype, attr_d, oid_d is not None, kind, in_memory=not is_dask)


def _is_dask(x) -> bool:
    return type(x).__module__.split(".")[0] == "dask"


def _from_numpy(points: np.ndarray, attributes, object_ids, partition_rows, kind) -> Source:
    """In-memory arrays: partitions are row slices (views), with no dask.array graph in between."""
    from dask import delayed

    n, d = points.shape
    attributes = check_attributes(attributes, n, None)
    object_ids = check_object_ids(object_ids, n, None)
    if n == 0:
        raise InputError("the input holds no points")
    attrs = {k: np.asarray(v) for k, v in attributes.items()}
    oids = None if object_ids is None else np.asarray(object_ids)
    parts = []
    for s in range(0, n, partition_rows):
        e = min(n, s + partition_rows)
        parts.append(delayed(_batch_from_arrays, pure=False)(points[s:e], {k: v[s:e] for k, v in attrs.items()},
                                                             None if oids is None else oids[s:e]))
    return _array_source(parts, n, d, points.dtype, attrs, oids is not None, kind, in_memory=True)


def _array_source(parts, n: int, d: int, dtype, attributes: dict, has_ids: bool, kind: str,
                  in_memory: bool) -> Source:
    """The :class:`Source` of array partitions (``attributes``: name -> array, numpy or dask)."""
    specs = {k: (np.dtype(v.dtype).name, int(v.shape[1]) if v.ndim == 2 else None) for k, v in attributes.items()}
    return Source(parts, d, np.dtype(dtype), specs, has_ids, kind=kind, n_rows=n,
                  description=f"{kind} of {n} points in {len(parts)} partitions", in_memory=in_memory)


# -- data frames -------------------------------------------------------------------------
def _kind(dtype) -> str:
    """numpy kind of a (possibly pandas extension) dtype; "O" when it has no numpy equivalent."""
    try:
        return np.dtype(dtype).kind
    except TypeError:
        return "O"


def _from_frame(df, columns, attributes, object_ids, partition_rows, kind="dataframe", description="") -> Source:
    import dask.dataframe as dd
    import pandas as pd
    from dask import delayed

    in_memory = isinstance(df, pd.DataFrame)
    if in_memory:
        nparts = max(1, -(-len(df) // partition_rows))
        df = dd.from_pandas(df, npartitions=nparts, sort=False)
    columns, attr_names, oid_col, pos_dtype, specs = _frame_schema(dict(df.dtypes), columns, attributes, object_ids)
    parts = [delayed(_batch_from_frame, pure=True)(p, columns, attr_names, oid_col) for p in df.to_delayed()]
    return Source(parts, len(columns), np.dtype(pos_dtype), specs, oid_col is not None, axes=columns, kind=kind,
                  description=description or f"{kind} with {df.npartitions} partitions", in_memory=in_memory)


def _frame_schema(dtypes: dict, columns, attributes, object_ids, where: str = "the table", check=None):
    """The coordinate, attribute and object id columns of a table of columns ``dtypes``, checked.

    Returns ``(columns, attribute names, object id column or None, position dtype, attribute specs)``.
    ``check(column, role)`` may raise a better error for a column that is not numeric (a CSV says where).
    """
    names = list(dtypes)
    columns = list(columns) if columns is not None else [c for c in DEFAULT_AXES[:3] if c in names]
    missing = [c for c in columns if c not in names]
    if missing or not columns:
        raise InputError(f"coordinate columns {missing or columns} are not in {where}; it has {names}. "
                         "Name them with columns=(...)")
    oid_col = None
    if object_ids is not None:
        if not isinstance(object_ids, str):
            raise InputError("with a DataFrame, object_ids must name a column, e.g. object_ids='cell_id'")
        if object_ids not in names:
            raise InputError(f"object id column {object_ids!r} is not in {where}; it has {names}")
        oid_col = object_ids
    numeric = [c for c in names if _kind(dtypes[c]) in "biuf"]
    for c in columns:
        if _kind(dtypes[c]) not in "iuf":
            if check is not None:
                check(c, "coordinate")
            raise InputError(f"coordinate column {c!r} has dtype {dtypes[c]}; coordinates must be numbers")
    if attributes is None:
        attr_names = [c for c in numeric if c not in columns and c != oid_col]
    else:
        attr_names = list(attributes)
        bad = [a for a in attr_names if a not in names]
        if bad:
            raise InputError(f"attribute columns {bad} are not in {where}; it has {names}")
        nonnum = [a for a in attr_names if a not in numeric]
        if nonnum:
            if check is not None:
                for a in nonnum:
                    check(a, "attribute")
            raise InputError(f"attribute columns {nonnum} are not numeric; encode them as integer codes first")
    if oid_col is not None and _kind(dtypes[oid_col]) not in "iu":
        if check is not None and _kind(dtypes[oid_col]) not in "biuf":
            check(oid_col, "object id")
        raise InputError(f"object id column {oid_col!r} has dtype {dtypes[oid_col]}; ids must be integers")
    pos_dtype = np.result_type(*[np.dtype(dtypes[c]) for c in columns])
    specs = {a: (np.dtype(dtypes[a]).name, None) for a in attr_names}
    return columns, attr_names, oid_col, pos_dtype, specs


def _file_source(parts, columns, attr_names, oid_col, pos_dtype, specs, dtypes, kind, desc) -> Source:
    """The Source of CSV or Parquet partitions read by :func:`zv_dask.ingest.files.read_part`."""
    from dask import delayed


    kept = {c: np.dtype(dtypes[c]).name for c in [*columns, *attr_names] + ([oid_col] if oid_col else [])}
    tasks = [delayed(read_part, pure=True)(p, columns, attr_names, oid_col, kept) for p in parts]
    return Source(tasks, len(columns), np.dtype(pos_dtype), specs, oid_col is not None, axes=columns, kind=kind,
                  description=desc, where=list(parts))


# -- xarray ------------------------------------------------------------------------------
def _from_xarray(ds, columns, attributes, object_ids, partition_rows) -> Source:
    import xarray as xr

    if isinstance(ds, xr.DataArray):
        return _from_arrays(ds.data, None, None, partition_rows, kind="xarray")
    pos_var = None
    if columns is None:
        for name in ("positions", "points", "coords", "coordinates", "xyz"):
            if name in ds.variables and ds[name].ndim == 2:
                pos_var = name
                break
        if pos_var is None:
            columns = [c for c in DEFAULT_AXES if c in ds.variables and ds[c].ndim == 1]
            if not columns:
                raise InputError("cannot find coordinates in the Dataset: name them with columns=(...) or give a "
                                 "(points, D) variable called 'positions'")
    if pos_var is not None:
        dim = ds[pos_var].dims[0]
        points = ds[pos_var].data
        used = {pos_var}
        axes = None
        if ds[pos_var].dims[1] in ds.coords:
            axes = [str(v) for v in ds[ds[pos_var].dims[1]].values]
    else:
        columns = list(columns)
        bad = [c for c in columns if c not in ds.variables]
        if bad:
            raise InputError(f"coordinate variables {bad} are not in the Dataset; it has {list(ds.variables)}")
        dim = ds[columns[0]].dims[0]
        import dask.array as da
        cols = [ds[c].data for c in columns]
        points = da.stack(cols, axis=1) if any(isinstance(c, da.Array) for c in cols) else np.stack(cols, axis=1)
        used = set(columns)
        axes = columns
    oid = None
    if object_ids is not None:
        if isinstance(object_ids, str):
            if object_ids not in ds.variables:
                raise InputError(f"object id variable {object_ids!r} is not in the Dataset")
            oid = ds[object_ids].data
            used.add(object_ids)
        else:
            oid = object_ids
    if attributes is None:
        names = [v for v in ds.data_vars if v not in used and ds[v].dims[:1] == (dim,) and ds[v].ndim in (1, 2)
                 and np.dtype(ds[v].dtype).kind in "biuf"]
    elif isinstance(attributes, dict):
        names = None
    else:
        names = list(attributes)
    attrs = attributes if names is None else {n: ds[n].data for n in names}
    src = _from_arrays(points, attrs, oid, partition_rows, kind="xarray")
    src.axes = axes
    return src


# -- files -------------------------------------------------------------------------------
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".txt": "csv", ".xyz": "csv",
            ".npy": "npy", ".zarr": "zarr", ".las": "las", ".laz": "las"}


def input_files(paths) -> list[str]:
    """The files a path, glob or list of them names, as absolute paths (relative to this process)."""
    return _expand(paths)


def _expand(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        hits = sorted(_glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
        if not hits:
            raise InputError(f"no file matches {p!r}")
        out.extend(hits)
    for p in out:
        if "://" not in p and not os.path.exists(p):
            raise InputError(f"input file {p!r} does not exist")
    # relative to this process (the client), never to a worker's directory
    return [p if "://" in p else os.path.abspath(p) for p in out]


def _kind_of(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if (p / "zarr.json").exists() or (p / ".zarray").exists():
            return "zarr"
        if any(p.glob("*.parquet")) or any(p.glob("**/*.parquet")):
            return "parquet"
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise InputError(f"cannot tell the format of {path!r} from its suffix; use one of "
                         f"{sorted(set(SUFFIXES))} (or pass an array / DataFrame)")
    return kind


def _from_files(paths, columns, attributes, object_ids, partition_rows, crs=None, target=None) -> Source:
    files = _expand(paths)
    kinds = {_kind_of(f) for f in files}
    if len(kinds) > 1:
        raise InputError(f"inputs mix formats {sorted(kinds)}; ingest one format per job")
    kind = kinds.pop()
    desc = f"{len(files)} {kind} file(s)"
    if kind == "parquet":
        import dask.dataframe as dd
        import pyarrow.parquet as pq
        footers = {}
        for f in files:
            if os.path.isfile(f):
                try:
                    with pq.ParquetFile(f) as pf:  # (closed: thousands of files need no descriptor each)
                        footers[f] = (pf.metadata, pf.schema_arrow)
                except Exception as e:  # noqa: BLE001
                    raise InputError(f"{f!r} is not a valid Parquet file: {e}") from None
        if len(footers) != len(files):  # a directory (a dataset): dask reads it
            df = dd.read_parquet(files if len(files) > 1 else files[0])
            return _from_frame(df, columns, attributes, object_ids, partition_rows, kind="parquet", description=desc)
        # files: read here, partition by partition, so that a corrupt one is named
        dtypes: dict[str, np.dtype] = {}
        for f, (_, schema) in footers.items():
            try:
                here = dict(schema.empty_table().to_pandas().dtypes)
            except Exception as e:  # noqa: BLE001
                raise InputError(f"{f!r} has a schema pandas cannot read: {type(e).__name__}: {e}") from None
            for c, dt in here.items():
                dtypes.setdefault(c, dt)
        where = repr(files[0]) if len(files) == 1 else "the Parquet files"
        cols, attr_names, oid_col, pos_dtype, specs = _frame_schema(dtypes, columns, attributes, object_ids, where)

        parts = parquet_parts(files, partition_rows, {f: md for f, (md, _) in footers.items()})
        src = _file_source(parts, cols, attr_names, oid_col, pos_dtype, specs, dtypes, "parquet", desc)
        src.n_rows = sum(md.num_rows for md, _ in footers.values())  # from the footers read above
        return src
    if kind == "csv":

        path, sample = csv_sample(files)

        def check(column, role):  # a column of text in the sample: say where the first text is
            line, value = first_text_value(path, column)
            if line:
                raise InputError(f"{path!r}: {role} column {column!r} holds text where numbers belong at line "
                                 f"{line} ({value!r})")

        dtypes = dict(sample.dtypes)
        if attributes is None:  # a column of numbers but for a few bits of text is a number column gone wrong
            import pandas as pd

            for c, dt in dtypes.items():
                if _kind(dt) == "O" and c not in (columns or DEFAULT_AXES[:3]) and c != object_ids:
                    values = sample[c].dropna()
                    if len(values) and pd.to_numeric(values, errors="coerce").notna().mean() >= 0.9:
                        check(c, "attribute")
        cols, attr_names, oid_col, pos_dtype, specs = _frame_schema(dtypes, columns, attributes, object_ids,
                                                                    repr(path), check)
        return _file_source(csv_parts(files), cols, attr_names, oid_col, pos_dtype, specs, dtypes, "csv", desc)
    if kind == "npy":
        return _from_npy(files, columns, partition_rows, desc)
    if kind == "zarr":
        import dask.array as da
        import zarr
        if len(files) != 1:
            raise InputError("ingest one zarr array at a time")
        try:
            arr = zarr.open_array(files[0], mode="r")
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{files[0]!r} is not a zarr array: {e}") from None
        src = _from_arrays(da.from_zarr(arr), attributes if isinstance(attributes, dict) else None,
                           object_ids, partition_rows, kind="zarr")
        src.description = desc
        return src
    return _from_las(files, attributes, partition_rows, desc, crs, target)


def _from_npy(files, columns, partition_rows, desc) -> Source:
    from dask import delayed


    parts, ndim, dtype, specs, total, where = [], None, None, {}, 0, []
    for f in files:
        try:
            arr = np.load(f, mmap_mode="r")
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{f!r} is not a valid .npy file: {e}") from None
        if arr.dtype.names:
            cols = list(columns) if columns is not None else [c for c in DEFAULT_AXES[:3] if c in arr.dtype.names]
            if not cols or any(c not in arr.dtype.names for c in cols):
                raise InputError(f"{f!r} has fields {arr.dtype.names}; name the coordinate fields with columns=")
            d = len(cols)
            dt = np.result_type(*[arr.dtype[c] for c in cols])
            specs = {n: (arr.dtype[n].name, None) for n in arr.dtype.names if n not in cols}
        else:
            if arr.ndim != 2:
                raise InputError(f"{f!r} holds an array of shape {arr.shape}; expected (N, D) points")
            cols, d, dt = None, arr.shape[1], arr.dtype
        if ndim is not None and d != ndim:
            raise InputError(f"{f!r} has {d} coordinates per point, earlier files have {ndim}")
        ndim, dtype = d, dt
        n = arr.shape[0]
        total += n
        for start in range(0, n, partition_rows):
            parts.append(delayed(_npy_slice, pure=True)(f, start, min(n, start + partition_rows), cols))
            where.append(Part(f, "npy", first_row=start))
    if not total or ndim is None:
        raise InputError(f"the input files {files} hold no points")
    return Source(parts, ndim, np.dtype(dtype), specs, False, axes=cols, kind="npy", n_rows=total, description=desc,
                  where=where)


def _from_las(files, attributes, partition_rows, desc, crs=None, target=None) -> Source:
    from dask import delayed

    headers = read_las_files(files)
    specs = choose_attributes(headers, attributes)
    # reprojected, each file may have its own CRS (the one given overrides them all)
    job_crs = choose_crs(headers, crs) if target is None else normalize_crs(crs)
    total = sum(h.points for h in headers)
    if not total:
        raise InputError(f"the LAS/LAZ input {files} holds no points")
    spans = [(h, start) for h in headers for start in range(0, h.points, partition_rows)]

    def reading(dims: dict) -> list:
        return [delayed(_las_batch, pure=True)(h.path, start, min(partition_rows, h.points - start), dims)
                for h, start in spans]

    parts = reading(specs)
    # The scan needs the positions and the float attributes (their NaN are counted): not decoding the
    # other dimensions took the scan of a 1e7-point file from 1.18 s to 0.57-0.78 s here (threads).
    scan_parts = reading({k: v for k, v in specs.items() if np.dtype(v[0]).kind == "f"})

    src = Source(parts, 3, np.dtype("float64"), dict(specs), False, axes=["x", "y", "z"], kind="las",
                 n_rows=total, description=desc, crs=job_crs, las=las_record(headers, specs),
                 where=[Part(h.path, "las", first_row=start) for h, start in spans], scan_parts=scan_parts)
    if target is not None:
        src = reproject_source(src, target, [job_crs or h.crs for h, _ in spans],
                               [os.path.basename(h.path) for h, _ in spans], [h.scales[0] for h, _ in spans])
    return src


def as_source(points, *, attributes=None, object_ids=None, columns=None,
              partition_rows: int | None = None, crs=None, reproject=None) -> Source:
    """Recognise the input kind and describe it as lazy partitions.

    ``crs`` is the input's coordinate system: LAS/LAZ headers declare theirs
    (and a ``crs`` given overrides them); other inputs have the one given.
    ``reproject``: a CRS to transform the positions to (pyproj), from ``crs``
    or each LAS file's own; see :mod:`zv_dask.ingest.reproject`.
    """
    target = check_reproject(reproject) if reproject is not None else None
    src = _as_source(points, attributes, object_ids, columns, partition_rows, crs, target)
    if src.kind != "las":
        src.crs = normalize_crs(crs)
        if target is not None:
            src = reproject_source(src, target)
    return src


def _as_source(points, attributes, object_ids, columns, partition_rows, crs, target=None) -> Source:
    partition_rows = int(partition_rows or DEFAULT_PARTITION_ROWS)
    if partition_rows < 1:
        raise InputError(f"partition_rows must be >= 1, got {partition_rows}")
    normalize_crs(crs)  # a CRS that means nothing fails before the input is read
    mod = type(points).__module__.split(".")[0]
    if isinstance(points, (str, os.PathLike)) or (isinstance(points, (list, tuple)) and points
                                                   and all(isinstance(p, (str, os.PathLike)) for p in points)):
        return _from_files(points, columns, attributes, object_ids, partition_rows, crs, target)
    if mod == "xarray":
        return _from_xarray(points, columns, attributes, object_ids, partition_rows)
    if mod in ("pandas", "dask") and hasattr(points, "columns"):
        return _from_frame(points, columns, attributes, object_ids, partition_rows)
    if hasattr(points, "shape") and hasattr(points, "dtype"):
        if attributes is not None and not isinstance(attributes, dict):
            raise InputError("with an array of points, attributes must be a dict of name -> (N,) or (N, C) array")
        return _from_arrays(points, attributes, object_ids, partition_rows)
    if isinstance(points, (list, tuple)):
        return _from_arrays(np.asarray(points), attributes, object_ids, partition_rows)
    raise InputError(f"cannot ingest {type(points).__name__}: pass an (N, D) numpy/dask array, a pandas/dask "
                     "DataFrame, an xarray Dataset, or paths of Parquet/CSV/NPY/zarr/LAS/LAZ files")
