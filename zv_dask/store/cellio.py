"""Many small cell objects in, many out: the I/O of chunk cells.

A level is thousands of small objects (one per array per chunk), so the
per-object overhead decides the write speed. zarr's generic store path costs
about 0.3 ms per object here; this module goes one layer down when it can:

* a zarr ``LocalStore``: plain files, written to a temporary name and renamed
  (atomic, like zarr's own put), about 0.05 ms per file;
* a zarr ``ObjectStore``: the wrapped obstore store, with concurrent requests;
* anything else (icechunk, fsspec): the zarr store's own async ``set``/``get``.

Keys are zarr's (``cell_keys`` uses zarr's ``encode_chunk_key``); which arrays
may take this path at all is :func:`zv_dask.store.levels.write_cells`' call.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from zv_dask.errors import StoreError

__all__ = ["put_cells", "get_cells", "delete_cells", "sweep_partials", "cell_keys", "CONCURRENCY"]

CONCURRENCY = 64  # requests in flight per call on object storage: the ``concurrency`` storage option


def cell_keys(path: str, cells, encoding=None) -> list[str]:
    """The store keys of an array's cells: ``path`` + zarr's chunk key of each row of ``cells`` (grid indices).

    ``encoding`` is the array's ``ChunkKeyEncoding`` (``arr.metadata.chunk_key_encoding``); by default the one
    zv-dask creates arrays with (zarr's ``default``, separator ``/``: ``"<path>/c/i/j/k"``).
    """
    if encoding is None:
        encoding = _default_encoding()
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    return [prefix + encoding.encode_chunk_key(tuple(c)) for c in _rows(cells)]


def _rows(cells) -> list:
    import numpy as np

    a = np.asarray(cells, np.int64)
    return a.reshape(len(a), -1).tolist() if a.size else []


def _default_encoding():
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    return DefaultChunkKeyEncoding(separator="/")


def _writable(zstore) -> None:
    """``StoreError`` for a store opened read-only (before any request)."""
    if getattr(zstore, "read_only", False):
        where = getattr(zstore, "root", None)
        raise StoreError(f"cannot write cells: the store{f' at {str(where)!r}' if where else ''} is open read-only")


def _limited(zstore, fn, args: Sequence) -> list:
    """``[await fn(*a) for a in args]`` on zarr's event loop, as many at a time as the store's ``concurrency``
    storage option says (:data:`CONCURRENCY` by default)."""
    from zarr.core.sync import sync

    async def run():
        sem = asyncio.Semaphore(getattr(zstore, "concurrency", None) or CONCURRENCY)

        async def one(a):
            async with sem:
                return await fn(*a)

        return await asyncio.gather(*(one(a) for a in args))

    return list(sync(run()))


def _local_root(zstore):
    from zarr.storage import LocalStore

    return str(zstore.root) if isinstance(zstore, LocalStore) else None


def _obstore_of(zstore):
    from zarr.storage import ObjectStore

    return zstore.store if isinstance(zstore, ObjectStore) else None


_TMP = itertools.count()


def _parts(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _joined(value) -> bytes:
    parts = _parts(value)
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def _write_all(fd: int, parts: tuple) -> None:
    """``writev`` until every byte of ``parts`` is written (one call in practice)."""
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done == total:
        return
    rest = b"".join(bytes(p) for p in parts)[done:]  # a short write: rare; finish from a joined copy
    while rest:
        rest = rest[os.write(fd, rest):]


def _write_files(root: str, items: Sequence, atomic: bool = True) -> None:
    """Write files under ``root`` straight from their buffers: atomically (temporary name, then rename), or in place.

    Directories are made when a write finds them missing. A failed write (a
    full disk) removes its temporary file.
    """
    tag = f".{os.getpid()}.{threading.get_ident()}."
    for key, value in items:
        path = f"{root}/{key}"
        tmp = f"{path}{tag}{next(_TMP)}.partial" if atomic else path
        try:
            fd = os.open(tmp, _FLAGS, 0o644)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(tmp, _FLAGS, 0o644)
        closed = False
        try:
            if type(value) is tuple:
                _write_all(fd, value)
            else:
                view = memoryview(value)
                while view.nbytes:
                    view = view[os.write(fd, view):]
            os.close(fd)
            closed = True
            if atomic:
                os.replace(tmp, path)
        except BaseException:
            if not closed:
                os.close(fd)
            if atomic:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
            raise


def sweep_partials(zstore) -> int:
    """Remove the temporary files of writes a killed process left half-done under a local store; returns how many.

    Only names :func:`_write_files` makes (``<cell>.<pid>.<thread>.<n>.partial``)
    are touched. A resumed job calls this before it writes again.
    """
    root = _local_root(zstore)
    if root is None:
        return 0
    import re

    pattern = re.compile(r"\.\d+\.\d+\.\d+\.partial$")
    n = 0
    for d, _, files in os.walk(root):
        for f in files:
            if pattern.search(f):
                try:
                    os.remove(os.path.join(d, f))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


def _read_file(path: str):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _threads(fn, args, n_items, n_threads: int = 2):
    """``[fn(*a) for a in args]`` on a few threads, each taking one contiguous slice (file I/O releases the GIL)."""
    if n_items < 64:
        return [fn(*a) for a in args]
    step = -(-n_items // n_threads)
    slices = [args[i:i + step] for i in range(0, n_items, step)]
    with ThreadPoolExecutor(len(slices)) as ex:
        parts = list(ex.map(lambda part: [fn(*a) for a in part], slices))
    return [r for part in parts for r in part]


def put_cells(zstore, items: Sequence[tuple[str, bytes | tuple]], *, atomic: bool = True) -> None:
    """Store every ``(key, value)``; keys are store-relative (``"0/vertices/c/1/2/3"``).

    A value is bytes or a tuple of buffers (bytes, memoryviews) stored one after
    the other: local files take them with one ``writev``, other stores joined.
    ``atomic=False`` overwrites local files in place (no temporary copy): only for
    writes whose bytes are kept elsewhere until they land (a roll-back from the
    journal), where a full disk has no room for the copy.
    """
    if not items:
        return
    _writable(zstore)
    root = _local_root(zstore)
    if root is not None:
        root = root.rstrip("/")
        if len(items) < 64:
            _write_files(root, items, atomic)
            return
        half = (len(items) + 1) // 2  # two threads: file I/O releases the GIL
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(lambda part: _write_files(root, part, atomic), [items[:half], items[half:]]))
        return
    obs = _obstore_of(zstore)
    if obs is not None:
        import obstore

        _limited(zstore, lambda k, v: obstore.put_async(obs, k, _joined(v)), items)
        return
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    _limited(zstore, lambda k, v: zstore.set(k, proto.buffer.from_bytes(_joined(v))), items)


def get_cells(zstore, keys: list[str]) -> list:
    """Bytes of every key (``None`` where the object does not exist)."""
    if not keys:
        return []
    root = _local_root(zstore)
    if root is not None:
        return _threads(_read_file, [(os.path.join(root, k),) for k in keys], len(keys))
    obs = _obstore_of(zstore)
    if obs is not None:
        import obstore

        async def one(k):
            try:
                r = await obstore.get_async(obs, k)
            except FileNotFoundError:
                return None
            return bytes(await r.bytes_async())

        return _limited(zstore, one, [(k,) for k in keys])
    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()

    async def one_zarr(k):
        b = await zstore.get(k, proto)
        return None if b is None else b.to_bytes()

    return _limited(zstore, one_zarr, [(k,) for k in keys])


def delete_cells(zstore, keys: list[str]) -> None:
    """Delete every key (a missing one is no error), through the zarr store's own ``delete``."""
    if not keys:
        return
    _writable(zstore)
    root = _local_root(zstore)
    if root is not None:
        for k in keys:
            try:
                os.remove(os.path.join(root, k))
            except FileNotFoundError:
                pass
        return
    _limited(zstore, zstore.delete, [(k,) for k in keys])
