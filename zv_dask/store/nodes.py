"""zarr nodes the way zv-dask makes them: vlen cell arrays over a grid, and attributes of many nodes at once."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import zarr
from zarr.core.buffer import default_buffer_prototype

from zv_dask.errors import StoreError
from zv_dask.format.grid import Grid
from zv_dask.store.cellio import get_cells, put_cells

__all__ = ["create_vlen_array", "create_vlen_arrays", "update_node_attrs", "vlen_bytes"]


@contextmanager
def vlen_bytes() -> Iterator[None]:
    """Around the creation of a ``bytes`` array: zarr's warning that vlen-bytes has no v3 spec yet, not shown.

    Every ZV cell array is vlen-bytes (the format says so), so the warning says
    nothing to a zv-dask user. Scoped, so that the user's own filters stay as they were.
    """
    from zarr.errors import UnstableSpecificationWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnstableSpecificationWarning)
        yield


def create_vlen_array(group: zarr.Group, name: str, grid: Grid, attrs: dict, *, shards=None,
                      compressors=None, overwrite: bool = True) -> zarr.Array:
    """A vlen-bytes array over ``grid`` with one cell per chunk (optionally sharded)."""
    with vlen_bytes():
        return group.create_array(
            name, shape=grid.shape, chunks=(1,) * grid.ndim, shards=tuple(shards) if shards else None,
            dtype="bytes", fill_value=b"", compressors=compressors, attributes=attrs, overwrite=overwrite,
        )


def create_vlen_arrays(group: zarr.Group, grid: Grid, arrays: list[tuple[str, dict]], *, shards=None,
                       compressors=None) -> None:
    """Many :func:`create_vlen_array` at once: same grid and codecs, each with its own attributes.

    zarr makes the first (its metadata document is the template); the others'
    documents differ only in their attributes and are written in one concurrent
    batch, which for tens of arrays is much faster than one zarr call each.
    Nothing may exist at the new paths.
    """
    if not arrays:
        return
    first = create_vlen_array(group, arrays[0][0], grid, arrays[0][1], shards=shards, compressors=compressors,
                              overwrite=False)
    with vlen_bytes():
        doc = json.loads(first.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())
    prefix = f"{group.path}/" if group.path else ""
    items = []
    for name, attrs in arrays[1:]:
        doc["attributes"] = attrs
        items.append((f"{prefix}{name}/zarr.json", json.dumps(doc, indent=2, allow_nan=False).encode()))
    put_cells(group.store, items)


def update_node_attrs(zstore, updates: dict[str, dict]) -> None:
    """Merge attributes into many existing nodes (arrays or groups) at once: ``{node path: attributes}``.

    The same as ``node.attrs.update(attributes)`` for each, in two concurrent
    batches (read every ``zarr.json``, write every ``zarr.json``).
    """
    if not updates:
        return
    keys = [f"{p}/zarr.json" if p else "zarr.json" for p in updates]
    docs = get_cells(zstore, keys)
    items = []
    for key, raw, attrs in zip(keys, docs, updates.values()):
        if raw is None:
            raise StoreError(f"cannot update the attributes of {key[:-len('/zarr.json')] or '/'}: no such node")
        doc = json.loads(raw)
        doc["attributes"] = {**doc.get("attributes", {}), **attrs}
        items.append((key, json.dumps(doc, indent=2, allow_nan=False).encode()))
    put_cells(zstore, items)
