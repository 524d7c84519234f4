"""Changing a store's bounds (``set_bounds``), and re-gridding its levels for them.

The chunk grid's origin and shape derive from the bounds, so new bounds may
move every cell. Each level is read, filtered to the new bounds when they
shrink, and written again with the same layout rules, level by level.
"""

from __future__ import annotations

import numpy as np

from zv_dask.errors import MetadataError
from zv_dask.store.api import ZVStore, list_resolution_levels, read_level_metadata, write_root_metadata
from zv_dask.store.levels import read_level, write_level_points
from zv_dask.types import BoxLike

__all__ = ["set_bounds", "regrid_store"]


def set_bounds(store: ZVStore, bounds: BoxLike, *, force: bool = False) -> ZVStore:
    """Change the store bounds.

    Growing is always allowed; cells are moved when the grid origin moves.
    Shrinking needs ``force=True`` and prunes the vertices (with their
    attributes) that fall outside; object manifests keep their now-empty fragments.
    """
    store._require_writable()
    meta = store.metadata
    lo = tuple(float(v) for v in bounds[0])
    hi = tuple(float(v) for v in bounds[1])
    if len(lo) != meta.ndim or len(hi) != meta.ndim:
        raise MetadataError(f"bounds need {meta.ndim} values per corner, got {[list(lo), list(hi)]}")
    if any(a > b for a, b in zip(lo, hi)):
        raise MetadataError(f"bounds are inverted: min {list(lo)} exceeds max {list(hi)} on some axis")
    shrinks = any(n > o for n, o in zip(lo, meta.bounds[0])) or any(n < o for n, o in zip(hi, meta.bounds[1]))
    if shrinks and not force:
        raise MetadataError(f"new bounds {[list(lo), list(hi)]} do not contain the current "
                            f"{[list(meta.bounds[0]), list(meta.bounds[1])]}; pass force=True to shrink and prune")
    regrid_store(store, lo, hi, prune=shrinks)
    return store


def regrid_store(store, lo, hi, *, prune: bool) -> None:
    """Rewrite every level on the grid of new bounds ``lo``/``hi`` (``prune`` drops points outside)."""
    meta = store.metadata
    old_grids = {k: store.grid(k) for k in list_resolution_levels(store)}
    contents = {}
    for k in old_grids:
        lm = read_level_metadata(store, k)
        if "vertices" not in store.root[str(k)]:
            continue
        has_obj = "object_index" in store.root[str(k)]
        data = read_level(store.store, k, ndim=meta.ndim, with_object_ids=has_obj)
        contents[k] = (data, lm, has_obj)
    meta.bounds = (tuple(lo), tuple(hi))
    write_root_metadata(store, meta)
    for k, (data, lm, has_obj) in contents.items():
        g = store.grid(k)
        if g.origin == old_grids[k].origin and g.shape == old_grids[k].shape and not prune:
            continue
        pos = data["positions"]
        attrs = data["attributes"]
        oids = data.get("object_ids") if has_obj else None
        keep = g.in_bounds(pos) if len(pos) else np.zeros(0, bool)
        if not keep.all():
            pos = pos[keep]
            attrs = {n: v[keep] for n, v in attrs.items()}
            oids = None if oids is None else oids[keep]
        lm.bin_shape = lm.bin_ratio = None
        write_level_points(store, k, pos, attrs, oids, lm)
