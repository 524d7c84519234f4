"""Type aliases of the public API: what a store, an input and a box may be (annotations only).

The aliases are ``type`` statements, evaluated only when asked for: the names
they use are imported for the type checker alone, so annotating a function
costs no import of icechunk, pandas or xarray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import dask.array
    import dask.dataframe
    import icechunk
    import numpy as np
    import pandas as pd
    import xarray as xr
    import zarr.abc.store
    from distributed import Client

    from zv_dask.store.api import ZVStore

__all__ = ["PathLike", "StoreLike", "PointsLike", "ClientLike", "BoxLike"]

type PathLike = str | os.PathLike[str]
"""A local path or an object-store URL (``s3://``, ``gs://``, ``az://``, ``file://``)."""

type StoreLike = (str | os.PathLike[str] | ZVStore | zarr.abc.store.Store | icechunk.Repository
                  | icechunk.Session)
"""A store: a path or URL, an open :class:`~zv_dask.ZVStore`, a zarr store, or an icechunk repository or session."""

type PointsLike = (np.ndarray | dask.array.Array | pd.DataFrame | dask.dataframe.DataFrame | xr.Dataset
                   | str | os.PathLike[str] | Sequence[str | os.PathLike[str]])
"""An input: an ``(N, D)`` array, a table, a Dataset, or file paths / globs (Parquet, CSV, NPY, zarr, LAS/LAZ)."""

type ClientLike = Client | None
"""A ``distributed.Client``; ``None`` is the current one, else Dask's local scheduler."""

type BoxLike = Sequence[Sequence[float]] | np.ndarray
"""A closed box ``[[min per axis], [max per axis]]`` in world units."""
