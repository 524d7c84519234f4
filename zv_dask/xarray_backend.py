"""The xarray backend: ``xr.open_dataset("cloud.zv", engine="zv", level=1)``.

A level opens as :func:`~zv_dask.open_level` opens it (dimension ``points``;
one variable per axis, attribute channel and ``object_id``), with the axes as
coordinates, and the store's metadata as attributes: ``units`` on an axis or
attribute that declares one, and on the Dataset ``level``, ``axes``,
``zv_version``, the level's ``bin_shape`` and ``chunk_shape``, and ``crs``
when the store declares one. Nothing is invented when the store is silent.

xarray wraps whatever a backend returns in its own lazy arrays, so each
variable is a :class:`ZVBackendArray` over the read partitions of
:func:`~zv_dask.open_level` (one or a few spatial chunks each). With the
default ``chunks=None`` nothing is read until a variable is indexed or
loaded, and then only the partitions the selection touches, one after
another. ``chunks={}`` gives dask arrays with one chunk per partition (their
``preferred_chunks``), read in parallel; other ``chunks`` are honoured by
xarray as usual. Every variable reads its partitions on its own:
:func:`~zv_dask.open_level` shares one read per partition among all variables
and is the faster route for whole-level work.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any, overload

import numpy as np
import xarray as xr
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from zv_dask.read import open_level
from zv_dask.store.api import ZVStore, as_store, get_resolution_level
from zv_dask.store.backends import local_path, url_scheme
from zv_dask.store.nodes import attrs_of, group_at

__all__ = ["ZVBackendEntrypoint", "ZVBackendArray"]

SUFFIX = ".zv"
_ROOT_PEEK = 1 << 22  # a root zarr.json larger than 4 MiB is not read while guessing


class ZVBackendArray(BackendArray):
    """One variable of a level, read partition by partition where it is indexed.

    Built from a dask array of :func:`~zv_dask.open_level`. Each of its blocks
    (one read partition) is kept as a graph of its own, so an index costs the
    partitions it touches and not a pass over the whole level's graph. Blocks
    run on dask's synchronous scheduler: safe inside a task of any scheduler.
    """

    def __init__(self, array: Any):
        from dask.core import flatten
        from dask.delayed import Delayed
        from dask.optimization import cull

        self.shape = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        graph = dict(array.__dask_graph__())
        self.blocks = [Delayed(k, cull(graph, [k])[0]) for k in flatten(array.__dask_keys__())]
        self.starts = np.concatenate([[0], np.cumsum(array.chunks[0])]).astype(np.int64)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._read)

    def _read(self, key: tuple) -> np.ndarray:
        import dask

        (k,) = key
        n = self.shape[0]
        if isinstance(k, slice):
            rows = range(*k.indices(n))
        else:
            i = int(k) + (n if int(k) < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {int(k)} is out of range for {n} points")
            rows = range(i, i + 1)
        if not len(rows):
            return np.zeros(0, self.dtype)
        lo, hi = min(rows[0], rows[-1]), max(rows[0], rows[-1]) + 1
        first = int(np.searchsorted(self.starts, lo, "right")) - 1
        last = int(np.searchsorted(self.starts, hi, "left"))
        parts = dask.compute(*self.blocks[first:last], scheduler="sync")
        local = np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
        local = local.astype(self.dtype, copy=False)
        base = int(self.starts[first])
        if not isinstance(k, slice):
            return np.asarray(local[rows[0] - base])
        if rows.step == 1:
            return local[lo - base:hi - base]
        return local[np.arange(rows.start, rows.stop, rows.step) - base]


class ZVBackendEntrypoint(BackendEntrypoint):
    """``engine="zv"``: a level of a ZV store as a Dataset along ``points``.

    Keywords as for :func:`~zv_dask.open_level`: ``level``, ``bbox`` (closed
    box, ``(min_corner, max_corner)``), ``attributes`` (default all),
    ``chunks_per_partition``, and ``storage_options`` / ``backend`` /
    ``branch`` as for :func:`~zv_dask.open_store`. ``drop_variables`` names
    variables (``"z"``, ``"rgb_1"``) or whole attributes (``"rgb"``); a dropped
    attribute is not read at all.
    """

    description = "Open a level of a Zarr Vectors (ZV) point-cloud store along 'points' (zv-dask)"
    url = "https://github.com/AllenInstitute/zarr_vectors"  # the format; zv-dask's docs are its README
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "level", "bbox", "attributes",
                               "storage_options", "backend", "branch", "chunks_per_partition")

    def open_dataset(self, filename_or_obj: Any, *, drop_variables: str | Iterable[str] | None = None,
                     level: int = 0, bbox=None, attributes: str | Iterable[str] | None = None,
                     storage_options: dict | None = None, backend: str | None = None, branch: str = "main",
                     chunks_per_partition: int | None = None) -> xr.Dataset:
        zs = as_store(filename_or_obj, storage_options=storage_options, backend=backend, branch=branch)
        drop = set(_names(drop_variables) or ())
        g = get_resolution_level(zs, level)
        available = sorted(group_at(g, "vertex_attributes").array_keys()) if "vertex_attributes" in g else []
        wanted = [a for a in (available if attributes is None else _names(attributes)) if a not in drop]
        ds = open_level(zs, level, bbox=bbox, attributes=wanted, chunks_per_partition=chunks_per_partition)
        ds = ds.drop_vars(sorted(drop & set(ds.variables)))
        units = _units(zs, level, wanted, [str(v) for v in ds.variables])
        variables = {name: _lazy(var, units.get(str(name))) for name, var in ds.variables.items()}
        out = xr.Dataset(variables, attrs=_dataset_attrs(zs, level, ds.attrs))
        return out.set_coords([a for a in zs.metadata.axis_names if a in out.variables])

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """True for an open ZVStore, a path or URL ending in ``.zv``, or a local directory holding a ZV root."""
        try:
            if isinstance(filename_or_obj, ZVStore):
                return True
            if not isinstance(filename_or_obj, (str, os.PathLike)):
                return False
            target = os.fspath(filename_or_obj)
            if not isinstance(target, str):
                return False
            local = url_scheme(target) in ("", "file")
            if target.rstrip("/").endswith(SUFFIX):
                return not (local and local_path(target).is_file())
            if not local:
                return False  # no network round trip while guessing
            root = local_path(target) / "zarr.json"
            if not root.is_file() or root.stat().st_size > _ROOT_PEEK:
                return False
            attrs = json.loads(root.read_bytes()).get("attributes") or {}
            return isinstance(attrs.get("zarr_vectors"), dict)
        except Exception:  # noqa: BLE001 - guessing must never raise
            return False


@overload
def _names(value: str | Iterable[str]) -> list[str]: ...


@overload
def _names(value: None) -> None: ...


def _names(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _lazy(var: xr.Variable, unit: str | None) -> xr.Variable:
    """The variable over a :class:`ZVBackendArray`, with ``units`` and its partitions as preferred chunks."""
    attrs = dict(var.attrs)
    if unit:
        attrs["units"] = unit
    if var.chunks is None:  # already in memory: nothing to defer
        return xr.Variable(var.dims, var.data, attrs)
    data = indexing.LazilyIndexedArray(ZVBackendArray(var.data))
    return xr.Variable(var.dims, data, attrs, encoding={"preferred_chunks": dict(zip(var.dims, var.chunks))})


def _units(zs: ZVStore, level: int, attributes: list[str], columns: list[str]) -> dict[str, str]:
    """``{variable: unit}`` for axes (NGFF ``multiscales`` axes) and attributes (array attrs, then root specs)."""
    meta = zs.metadata
    out = {a["name"]: a["unit"] for a in meta.axes if a.get("unit")}
    if not attributes:
        return out
    arrays = group_at(get_resolution_level(zs, level), "vertex_attributes")
    specs = (meta.attribute_specs or {}).get("vertex") or {}
    for name in attributes:
        unit = attrs_of(arrays[name]).get("unit") or (specs.get(name) or {}).get("unit")
        if not unit:
            continue
        own = [name] if name in columns else [
            c for c in columns if c.startswith(name + "_") and c[len(name) + 1:].isdigit()]
        out.update(dict.fromkeys(own, unit))
    return out


def _dataset_attrs(zs: ZVStore, level: int, level_attrs: dict) -> dict[str, Any]:
    meta = zs.metadata
    attrs: dict[str, Any] = {
        "level": int(level),
        "axes": list(meta.axis_names),
        "zv_version": meta.zv_version,
        "bin_shape": [float(b) for b in zs.level_bin_shape(level)],
        "chunk_shape": [float(c) for c in zs.level_chunk_shape(level)],
    }
    if meta.crs is not None:
        attrs["crs"] = meta.crs
    return {**attrs, **{k: v for k, v in level_attrs.items() if k not in attrs}}
