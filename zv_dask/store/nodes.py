"""zarr nodes the way zv-dask makes them: vlen cell arrays over a grid, and attributes of many nodes at once;
and the nodes of a store by kind (an array where an array belongs, a group where a group does)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.metadata import ArrayV3Metadata

from zv_dask.errors import MetadataError, StoreError
from zv_dask.format.grid import Grid
from zv_dask.store.cellio import get_cells, put_cells

__all__ = [
    "node_at",
    "array_at",
    "group_at",
    "v3_metadata",
    "attrs_of",
    "attr_dict",
    "create_vlen_array",
    "create_vlen_arrays",
    "update_node_attrs",
    "vlen_bytes",
]

_MISSING: Any = object()


def _node_path(group: zarr.Group, path: str) -> str:
    return "/".join(p for p in (group.path.strip("/"), path.strip("/")) if p) or "/"


def node_at[N: (zarr.Array, zarr.Group)](group: zarr.Group, path: str, kind: type[N]) -> N:
    """The ``kind`` node at ``path`` under ``group`` (a ``KeyError`` when there is nothing); a
    :class:`StoreError` naming the path when the other kind is there instead."""
    node = group[path]
    if not isinstance(node, kind):
        found, wanted = ("a group", "an array") if kind is zarr.Array else ("an array", "a group")
        raise StoreError(f"the store has {found} at {_node_path(group, path)} where {wanted} belongs")
    return node


def array_at(group: zarr.Group, path: str) -> zarr.Array:
    """The array at ``path`` under ``group`` (see :func:`node_at`)."""
    return node_at(group, path, zarr.Array)


def group_at(group: zarr.Group, path: str) -> zarr.Group:
    """The group at ``path`` under ``group`` (see :func:`node_at`)."""
    return node_at(group, path, zarr.Group)


def v3_metadata(arr: zarr.Array) -> ArrayV3Metadata:
    """An array's zarr v3 metadata; a :class:`StoreError` naming it when the array is zarr v2 (ZV is zarr v3)."""
    md = arr.metadata
    if not isinstance(md, ArrayV3Metadata):
        raise StoreError(f"the array {arr.path or '/'} is a zarr v2 array; a ZV store's arrays are zarr v3")
    return md


def attrs_of(node: zarr.Array | zarr.Group) -> dict[str, Any]:
    """A node's attributes as a plain dict of JSON values (a shallow copy, as ``node.attrs.asdict()``)."""
    return node.attrs.asdict()


def attr_dict(node: zarr.Array | zarr.Group, name: str, default: dict[str, Any] = _MISSING) -> dict[str, Any]:
    """The JSON object attribute ``name`` of a node: ``default`` when it is absent (a ``KeyError`` without one),
    a :class:`MetadataError` naming the node and attribute when it is not an object."""
    attrs = node.attrs.asdict()
    if name not in attrs:
        if default is _MISSING:
            raise KeyError(name)
        return default
    value = attrs[name]
    if not isinstance(value, Mapping):
        raise MetadataError(f"the attribute {name!r} of {node.path or '/'} is {type(value).__name__} "
                            f"{value!r:.80}; expected a JSON object")
    return value if isinstance(value, dict) else dict(value)


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
