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


def reference_rows(path, level):
    """A level decoded by the reference chunk by chunk: ``(positions (N, D), {chunk: first row})``.

    Chunks in ascending coordinate order, rows in each chunk's buffer order (so a
    link endpoint ``(chunk, vi)`` is row ``first[chunk] + vi``).
    """
    import zarr
    from zarr_vectors.core.arrays import read_chunk_vertices
    from zarr_vectors.core.store import get_resolution_level, open_store

    lg = get_resolution_level(open_store(str(path)), level)
    plain = zarr.open_group(str(path), mode="r")
    ndim = len(plain.attrs["zarr_vectors"]["chunk_shape"])
    vert = plain[f"{level}/vertices"]
    dtype = vert.attrs.get("dtype", "float32")
    keys = vert.attrs.get("nonempty_chunks", [])
    chunks = sorted(tuple(int(c) for c in k.split(".")) for k in keys)
    parts, first, n = [], {}, 0
    for c in chunks:
        frags = read_chunk_vertices(lg, c, dtype=dtype, ndim=ndim)
        block = np.concatenate(frags) if frags else np.zeros((0, ndim))
        first[c] = n
        n += len(block)
        parts.append(block)
    return (np.concatenate(parts) if parts else np.zeros((0, ndim))), first


def reference_links(path, level, delta):
    """The ``links/<delta>`` records of a level as the reference reads them: ``(src rows, dst rows)``.

    Rows are global rows of :func:`reference_rows` of the owning level (src) and of
    level ``level + delta`` (dst); ``None`` when the family is absent.
    """
    from zarr_vectors.core.arrays import read_link_arrays
    from zarr_vectors.core.store import get_resolution_level, open_store

    lg = get_resolution_level(open_store(str(path)), level)
    chunks, vi = read_link_arrays(lg, delta=delta)
    if chunks.size == 0:
        return None
    _, first_src = reference_rows(path, level)
    _, first_dst = reference_rows(path, level + delta)
    src = np.array([first_src[tuple(c)] for c in chunks[:, 0].tolist()], np.int64) + vi[:, 0]
    dst = np.array([first_dst[tuple(c)] for c in chunks[:, 1].tolist()], np.int64) + vi[:, 1]
    return src, dst


def fill_las_dimensions(las, rng, n: int) -> None:
    """Every dimension of a LAS file's point format but X/Y/Z set to varied values (bit fields, ints, floats,
    and the 3-element extra-bytes ``triple``)."""
    import numpy as np

    for d in las.header.point_format.dimensions:
        if d.name in ("X", "Y", "Z"):
            continue
        if d.name == "triple":
            las.triple = rng.integers(0, 65535, (n, 3), dtype=np.uint16)
        elif d.dtype is None:  # a bit field
            las[d.name] = rng.integers(0, 2 ** d.num_bits, n).astype(np.uint8)
        elif np.dtype(d.dtype).kind == "f":
            las[d.name] = rng.uniform(0, 1e6, n).astype(d.dtype)
        else:
            info = np.iinfo(d.dtype)
            las[d.name] = rng.integers(info.min, info.max, n, endpoint=True).astype(d.dtype)


# a projected CRS as a LAS WKT VLR holds it (EPSG:32610)
WKT = ('PROJCS["WGS 84 / UTM zone 10N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
       'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],UNIT["metre",1],'
       'AUTHORITY["EPSG","32610"]]')


def icechunk_state(storage) -> tuple[dict, list, list]:
    """(every key -> bytes at ``main``'s tip, ``main``'s commit messages, branches) of an icechunk repository."""
    import asyncio

    import icechunk
    from zarr.core.buffer import default_buffer_prototype

    repo = icechunk.Repository.open(storage)
    st = repo.readonly_session(branch="main").store

    async def read():
        return {k: (await st.get(k, default_buffer_prototype())).to_bytes() async for k in st.list()}

    return asyncio.run(read()), [a.message for a in repo.ancestry(branch="main")], sorted(repo.list_branches())
