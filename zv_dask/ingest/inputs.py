"""Validation of in-memory inputs: positions, attributes, object ids."""

from __future__ import annotations

import numpy as np

from zv_dask.errors import InputError

__all__ = ["check_positions", "check_attributes", "check_object_ids"]


def check_positions(points) -> tuple[int, int]:
    """``(N, D)`` of a numeric 2-D array-like (numpy or dask); raises :class:`InputError`."""
    shape = getattr(points, "shape", None)
    dtype = getattr(points, "dtype", None)
    if shape is None or dtype is None:
        raise InputError(f"points must be an (N, D) array, got {type(points).__name__}")
    if len(shape) != 2:
        raise InputError(f"points must be a 2-D (N, D) array, got shape {tuple(shape)}")
    if np.dtype(dtype).kind not in "iuf":
        raise InputError(f"points must be integer or float coordinates, got dtype {dtype}")
    n, d = shape
    if not 1 <= d <= 8:
        raise InputError(f"points have {d} coordinates per row; zv-dask supports 1 to 8 axes")
    return int(n) if n == n else -1, int(d)


def check_attributes(attributes, n: int, chunks=None) -> dict:
    """Attributes as ``{name: (N,) or (N, C) array}``; checks lengths, dtypes and chunking."""
    if attributes is None:
        return {}
    if not isinstance(attributes, dict):
        raise InputError(f"attributes must be a dict of name -> array, got {type(attributes).__name__}")
    out = {}
    for name, v in attributes.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise InputError(f"attribute name {name!r} must be a non-empty string without '/'")
        if not hasattr(v, "shape"):
            v = np.asarray(v)
        if np.dtype(v.dtype).kind not in "biuf":
            raise InputError(f"attribute {name!r} has dtype {v.dtype}; only bool, integer and float are supported "
                             "(encode categories as integer codes)")
        if len(v.shape) not in (1, 2):
            raise InputError(f"attribute {name!r} must be (N,) or (N, C), got shape {tuple(v.shape)}")
        if n >= 0 and v.shape[0] == v.shape[0] and v.shape[0] != n:
            raise InputError(f"attribute {name!r} has {v.shape[0]} rows but there are {n} points")
        if chunks is not None and hasattr(v, "chunks") and v.chunks[0] != chunks:
            raise InputError(f"attribute {name!r} is chunked {v.chunks[0]} along rows but points are chunked {chunks}; "
                             "rechunk them alike")
        out[name] = v
    return out


def check_object_ids(object_ids, n: int, chunks=None):
    """Validate per-point object ids (``None``, or ``n`` integers); returns them, or raises :class:`InputError`."""
    if object_ids is None:
        return None
    if not hasattr(object_ids, "shape"):
        object_ids = np.asarray(object_ids)
    if len(object_ids.shape) != 1:
        raise InputError(f"object_ids must be a 1-D (N,) array, got shape {tuple(object_ids.shape)}")
    if np.dtype(object_ids.dtype).kind not in "iu":
        raise InputError(f"object_ids must be integers, got dtype {object_ids.dtype}")
    if np.dtype(object_ids.dtype) == np.uint64:
        raise InputError("object_ids of dtype uint64 are not supported (ids are stored as int64); cast them")
    if n >= 0 and object_ids.shape[0] == object_ids.shape[0] and object_ids.shape[0] != n:
        raise InputError(f"object_ids has {object_ids.shape[0]} rows but there are {n} points")
    if chunks is not None and hasattr(object_ids, "chunks") and object_ids.chunks[0] != chunks:
        raise InputError(f"object_ids are chunked {object_ids.chunks[0]} but points are chunked {chunks}")
    return object_ids
