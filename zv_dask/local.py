"""A single-process writer and reader on the format and store layers.

Used by the tests as the plain reference of what a job must produce, by
:func:`zv_dask.set_bounds` to rewrite a level, and for small in-memory data
where a cluster is overkill. The Dask engine produces byte-identical cells.
"""

from __future__ import annotations

import numpy as np

from zv_dask.format.codecs import compressors_for
from zv_dask.format.metadata import LevelMetadata, attribute_spec
from zv_dask.ingest.bounds import partition_stats, settle_bounds
from zv_dask.ingest.inputs import check_attributes, check_object_ids, check_positions
from zv_dask.ingest.target import materialize_target, plan_target
from zv_dask.store.api import ZVStore, as_store, commit
from zv_dask.store.levels import read_level, write_level_points

__all__ = ["write_points", "read_points"]


def write_points(store, points, *, attributes=None, object_ids=None, chunk_shape=None, bounds=None,
                 base_bin_shape=None, out_of_bounds: str = "raise", dtype: str = "float32", axes=None,
                 shard_shape=None, backend=None, storage_options=None, overwrite: bool = False,
                 commit_message: str | None = "zv-dask write_points", compression=None,
                 compression_level=None) -> ZVStore:
    """Write an in-memory point set as level 0 of a new (or empty) store, in this process.

    ``compression`` / ``compression_level`` as in :func:`zv_dask.ingest`.
    """
    compressors = compressors_for(compression, compression_level)
    n, d = check_positions(points)
    attributes = {k: np.asarray(v) for k, v in check_attributes(attributes, n).items()}
    object_ids = check_object_ids(object_ids, n)
    points = np.asarray(points)
    plan = plan_target(store, ndim=d, chunk_shape=chunk_shape, bounds=bounds, base_bin_shape=base_bin_shape,
                       dtype=dtype, axes=axes, backend=backend, storage_options=storage_options, overwrite=overwrite)
    stats = partition_stats(points, plan.dtype, plan.bounds)
    final_bounds, _ = settle_bounds(stats, plan.bounds, out_of_bounds)
    specs = {"vertex": {k: attribute_spec(v.dtype, v.shape[1] if v.ndim == 2 else None) for k, v in attributes.items()}}
    zs = materialize_target(plan, final_bounds, specs if attributes else None)
    grid = zs.grid(0)
    keep = grid.in_bounds(points)
    if not keep.all():
        points = points[keep]
        attributes = {k: v[keep] for k, v in attributes.items()}
        object_ids = None if object_ids is None else np.asarray(object_ids)[keep]
    if object_ids is not None:
        object_ids = np.asarray(object_ids).astype(np.int64)
    write_level_points(zs, 0, grid.cast(points), attributes, object_ids, LevelMetadata(level=0),
                       shards=shard_shape, compressors=compressors)
    if zs.session is not None and commit_message:
        commit(zs, commit_message)
    return zs


def read_points(store, *, level: int = 0, bbox=None, attributes=None, object_ids: bool = False) -> dict:
    """Read a level (or a box of it) into numpy: ``positions``, ``attributes`` and, if asked, ``object_ids``."""
    zs = as_store(store)
    return read_level(zs.store, level, bbox=bbox, attributes=attributes, ndim=zs.metadata.ndim,
                      with_object_ids=object_ids)
