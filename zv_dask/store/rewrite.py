"""Re-gridding a store after its bounds change (``set_bounds``).

The chunk grid's origin and shape derive from the bounds, so new bounds may
move every cell. Each level is read, filtered to the new bounds when they
shrink, and written again with the same layout rules, level by level.
"""

from __future__ import annotations

import numpy as np

from zv_dask.store.levels import read_level

__all__ = ["regrid_store"]


def regrid_store(store, lo, hi, *, prune: bool) -> None:
    """Rewrite every level on the grid of new bounds ``lo``/``hi`` (``prune`` drops points outside)."""
    from zv_dask.local import write_level_points
    from zv_dask.store.api import list_resolution_levels, read_level_metadata, write_root_metadata

    meta = store.metadata
    old_grids = {k: store.grid(k) for k in list_resolution_levels(store)}
    contents = {}
    for k, g in old_grids.items():
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
