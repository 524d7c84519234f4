"""Small test utilities (importable by tests and by worker processes)."""

from __future__ import annotations

import os

import numpy as np


def tree_bytes(root) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes); empty if it does not exist."""
    out = {}
    root = os.fspath(root)
    for d, _, files in os.walk(root):
        for f in files:
            full = os.path.join(d, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root)] = fh.read()
    return out


def cell_bytes(root) -> dict[str, bytes]:
    """Only the chunk cells (paths containing '/c/') of a store directory."""
    return {k: v for k, v in tree_bytes(root).items() if "/c/" in k}


def reference_points(path, level=0, attribute_names=()):
    """Read a level with the reference reader (zarr-vectors 0.9.2)."""
    from zarr_vectors.types.points import read_points

    return read_points(str(path), level=level, attribute_names=list(attribute_names) or None)


def reference_validate(path):
    """Validate with the reference at level 5; return the warnings other than the always-present one."""
    from zarr_vectors.validate import validate

    r = validate(str(path), level=5)
    assert r.ok, r.summary()
    return [w for w in r.warnings if "links array exists" not in str(w)]


def canon(positions, *columns):
    parts = [np.asarray(positions, np.float64).reshape(len(positions), -1)]
    for c in columns:
        c = np.asarray(c)
        parts.append(c.reshape(len(c), -1).astype(np.float64))
    table = np.concatenate(parts, axis=1)
    return table[np.lexsort(table.T[::-1])]


def store_contents(store) -> dict[str, bytes]:
    """Every key of a zarr store and its bytes, as a reader sees them (e.g. an icechunk branch tip)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def collect():
        out = {}
        async for k in store.list():
            buf = await store.get(k, default_buffer_prototype())
            out[k] = None if buf is None else buf.to_bytes()
        return out

    return sync(collect())
