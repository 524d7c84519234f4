"""The staged shuffle: write-group pieces on scratch storage instead of in worker memory.

When a job's split pieces would not fit in its memory budget
(:mod:`zv_dask.ingest.budget`), each split task writes its partition's pieces
as one object on scratch storage, group after group, and returns only where
each group's piece starts (:class:`StagedPartition`). Each write task then
reads its group's byte range from every partition's object, in partition
order: it gets the very pieces the in-memory shuffle would hand it, so it
writes the same bytes. Worker memory is the running tasks alone, whatever the
number of points, and the input is read once.

Scratch is a local directory or an object-store prefix (obstore) that every
worker reaches: by default a ``.zv-scratch`` prefix inside a plain store (which
every worker writes anyway) or beside an icechunk repository. A job's pieces
live under a prefix of their own there, removed when the job ends.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import dataclass, field

import numpy as np

from zv_dask.errors import InputError, StoreError, out_of_space
from zv_dask.ingest.batch import Batch
from zv_dask.ingest.shuffle import key_dtypes, sort_by_group
from zv_dask.store.backends import local_path, prefix_store, url_scheme
from zv_dask.store.retry import delete_prefix

__all__ = ["PieceLayout", "Scratch", "StagedPartition", "stage_partition", "load_group", "group_refs",
           "default_scratch", "remove_stale_scratch", "lossless_cast", "SCRATCH_DIR"]

SCRATCH_DIR = ".zv-scratch"
CONCURRENCY = 32  # range reads in flight per write task


def _pad8(n):
    return (np.asarray(n, np.int64) + 7) // 8 * 8


def lossless_cast(name: str, values, dtype) -> np.ndarray:
    """An attribute's values in its declared ``dtype`` when the cast changes no value; else :class:`InputError`.

    A partition may hold another dtype than its source declared (a table column
    inferred differently in one file, a reader that keeps a file's native type).
    Widening (uint16 into float64) and casts every value survives (int64 values
    that fit int32) are made; a cast that would change a value (a fraction or
    NaN into an integer, float64 into float32, an integer out of range) is
    refused, naming the attribute, rather than writing other numbers than the
    input's. Values are compared only when the dtypes cannot always cast safely.
    """
    a = np.asarray(values)
    dt = np.dtype(dtype)
    if a.dtype == dt:
        return a
    wide_ints = a.dtype.kind in "iu" and dt.kind == "f" and a.dtype.itemsize >= dt.itemsize  # int64 -> float64
    if np.can_cast(a.dtype, dt, "safe") and not wide_ints:
        return a.astype(dt)
    bad = None
    try:
        with np.errstate(all="ignore"):
            cast = a.astype(dt)
            same = np.asarray(cast.astype(a.dtype) == a, dtype=bool)
            if a.dtype.kind == "f" and dt.kind == "f":
                same |= np.isnan(a) & np.isnan(cast)
        if same.all():
            return cast
        bad = a.reshape(-1)[int(np.argmin(same.reshape(-1)))]
    except (TypeError, ValueError, OverflowError):
        pass
    example = f" (e.g. {bad})" if bad is not None else ""
    fix = f"declare it as {a.dtype.name} or cast the input" if a.dtype.kind in "biuf" else "cast the input"
    raise InputError(f"attribute {name!r} is declared {dt.name} but a partition holds {a.dtype.name} values that "
                     f"{dt.name} cannot hold exactly{example}; {fix}")


@dataclass(frozen=True)
class PieceLayout:
    """The columns of a staged piece, in the order they are stored, with their dtypes.

    A piece is every column of its rows back to back, each column padded to 8
    bytes: positions, cell ids, fragments, then each attribute and the object ids.
    """

    ndim: int
    position_dtype: str
    cell_dtype: str
    fragment_dtype: str
    attributes: tuple[tuple[str, str, int | None], ...] = ()  # (name, dtype, channels or None)
    object_ids: bool = False

    @classmethod
    def of(cls, grid, attributes: dict, object_ids: bool) -> PieceLayout:
        """The layout for a grid and a source's ``{name: (dtype, channels)}`` attributes."""
        cell, frag = key_dtypes(grid)
        attrs = tuple((name, np.dtype(dt).name, ch) for name, (dt, ch) in attributes.items())
        return cls(grid.ndim, np.dtype(grid.dtype).name, np.dtype(cell).name, np.dtype(frag).name, attrs,
                   bool(object_ids))

    def _columns(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        cols = [("positions", np.dtype(self.position_dtype), (self.ndim,)),
                ("cells", np.dtype(self.cell_dtype), ()), ("fragments", np.dtype(self.fragment_dtype), ())]
        cols += [(f"attr:{n}", np.dtype(dt), () if ch is None else (ch,)) for n, dt, ch in self.attributes]
        if self.object_ids:
            cols.append(("object_ids", np.dtype(np.int64), ()))
        return cols

    @property
    def row_bytes(self) -> int:
        """Bytes of one point in a piece (before padding)."""
        return int(sum(dt.itemsize * int(np.prod(shape)) for _, dt, shape in self._columns()))

    def conform(self, b: Batch) -> Batch:
        """``b`` with every attribute in its declared dtype: what the store declares is what its cells hold.

        Only casts that keep every value are made (:func:`lossless_cast`); any
        other is an :class:`InputError` naming the attribute.
        """
        attrs = dict(b.attributes)
        for name, dt, _ in self.attributes:
            a = attrs.get(name)
            if a is not None and np.asarray(a).dtype != np.dtype(dt):
                attrs[name] = lossless_cast(name, a, dt)
        if all(attrs[k] is b.attributes[k] for k in attrs):
            return b
        return Batch(b.positions, attrs, b.object_ids, b.cells, b.fragments)

    def _arrays(self, b: Batch) -> list[np.ndarray]:
        out = []
        for name, dt, _ in self._columns():
            a: np.ndarray | None
            if name == "positions":
                a = b.positions
            elif name == "cells":
                a = b.cells
            elif name == "fragments":
                a = b.fragments
            elif name == "object_ids":
                a = b.object_ids
            else:
                a = b.attributes[name[5:]]
            assert a is not None, f"a batch is staged once binned and with its object ids; it has no {name}"
            out.append(np.asarray(a).astype(dt, copy=False))
        return out

    def encode(self, b: Batch, order: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every group's piece of a sorted partition in one buffer; returns ``(buffer, byte offsets)``.

        Group ``g``'s piece is ``buffer[offsets[g]:offsets[g + 1]]``, holding the
        rows ``order[bounds[g]:bounds[g + 1]]`` (one gather per column and group,
        straight into the buffer).
        """
        rows = np.diff(bounds).astype(np.int64)
        cols = self._columns()
        widths = np.array([dt.itemsize * int(np.prod(shape)) for _, dt, shape in cols], np.int64)
        sizes = _pad8(rows[None, :] * widths[:, None])  # (columns, groups)
        offsets = np.r_[0, np.cumsum(sizes.sum(axis=0))].astype(np.int64)
        buf = np.empty(int(offsets[-1]), np.uint8)
        arrays = self._arrays(b)
        for g in np.flatnonzero(rows).tolist():
            idx = order[bounds[g]:bounds[g + 1]]
            pos = int(offsets[g])
            for c, ((_, dt, shape), arr) in enumerate(zip(cols, arrays)):
                n = int(rows[g] * widths[c])
                np.take(arr, idx, axis=0, out=buf[pos:pos + n].view(dt).reshape((int(rows[g]),) + shape))
                pos += int(sizes[c, g])
        return buf, offsets

    def decode(self, pieces: list, rows: list[int]) -> Batch | None:
        """The concatenation of pieces (buffers, in input order) as one :class:`Batch`."""
        kept = [(p, int(n)) for p, n in zip(pieces, rows) if n]
        if not kept:
            return None
        cols = {}
        starts = [0] * len(kept)
        for name, dt, shape in self._columns():
            width = dt.itemsize * int(np.prod(shape))
            parts = []
            for i, (p, n) in enumerate(kept):
                parts.append(np.frombuffer(p, dt, count=n * int(np.prod(shape)), offset=starts[i])
                             .reshape((n,) + shape))
                starts[i] += int(_pad8(n * width))
            cols[name] = parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
        attrs = {n: cols[f"attr:{n}"] for n, _, _ in self.attributes}
        return Batch(cols["positions"], attrs, cols.get("object_ids"), cols["cells"], cols["fragments"])


# -- scratch storage --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scratch:
    """A job's scratch space: a local directory (absolute) or an object-store URL, and its prefix."""

    url: str
    prefix: str
    options: dict = field(default_factory=dict, repr=False, compare=False, hash=False)
    own_root: bool = False  # the directory is zv-dask's own (removed with the last job's pieces)

    @property
    def local(self) -> bool:
        return url_scheme(self.url) in ("", "file")

    def _store(self):
        return prefix_store(self.url, self.options)

    def where(self, name: str = "") -> str:
        """The URL (or path) of an object of this job, for messages."""
        return f"{self.url.rstrip('/')}/{self.prefix}/{name}".rstrip("/")

    def put(self, name: str, buffer) -> None:
        """Store one object of the job (a buffer; written whole or not at all)."""
        import obstore

        try:
            obstore.put(self._store(), f"{self.prefix}/{name}", memoryview(buffer))
        except OSError as e:
            raise _space_error(self, e) from None
        except Exception as e:
            if out_of_space(e):
                raise _space_error(self, e) from None
            raise StoreError(f"cannot write scratch object {self.where(name)}: {type(e).__name__}: "
                             f"{_first_line(e)}") from e

    def get_ranges(self, refs: list[tuple[str, int, int]]) -> list:
        """The bytes ``[start, end)`` of each ``(name, start, end)``, concurrently, in order."""
        import obstore
        from zarr.core.sync import sync

        store = self._store()

        async def run():
            sem = asyncio.Semaphore(CONCURRENCY)

            async def one(name, start, end):
                async with sem:
                    return await obstore.get_range_async(store, f"{self.prefix}/{name}", start=start, end=end)

            return await asyncio.gather(*(one(*r) for r in refs))

        try:
            return list(sync(run()))
        except FileNotFoundError as e:
            raise StoreError(f"a staged piece of this job is missing from {self.where()}: {_first_line(e)} "
                             "(was the scratch space removed while the job ran?)") from None

    def free_bytes(self) -> int | None:
        """Free space where a local scratch lives (``None`` on object storage)."""
        if not self.local:
            return None
        path = _local(self.url)
        while path and not os.path.exists(path):
            path = os.path.dirname(path)
        try:
            return shutil.disk_usage(path or "/").free
        except OSError:
            return None

    def remove(self) -> None:
        """Remove every object of the job (best effort: a failed job's error matters more)."""
        try:
            if self.local:
                root = _local(self.url)
                shutil.rmtree(os.path.join(root, self.prefix), ignore_errors=True)
                if self.own_root:  # zv-dask's own directory goes with the last job using it
                    try:
                        os.rmdir(root)
                    except OSError:
                        pass
                return
            delete_prefix(self._store(), self.prefix)
        except Exception:  # noqa: BLE001 - best effort
            pass


def _local(url: str) -> str:
    return str(local_path(url))


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _space_error(scratch: Scratch, e: BaseException) -> Exception:
    if out_of_space(e):
        return StoreError(f"scratch space at {scratch.url} ran out: {_first_line(e)}; free space there or "
                          "pass another scratch location (scratch=..., --scratch)")
    return StoreError(f"cannot write scratch objects under {scratch.where()}: {_first_line(e)}")


def _this_host(hosts) -> bool:
    local = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    try:
        from distributed.utils import get_ip

        local.add(get_ip())
    except Exception:  # noqa: BLE001 - no network: loopback names only
        pass
    return all(h in local for h in hosts)


def default_scratch(url: str | None, *, icechunk: bool = False, options: dict | None = None, client=None,
                    scratch=None, scratch_options: dict | None = None) -> Scratch:
    """Where a job stages its pieces: ``scratch`` if given, else next to the store at ``url``.

    A plain store keeps them in a ``.zv-scratch`` prefix of its own (every
    worker writes the store, so every worker reaches it), an icechunk repository
    beside it (``<repository>.zv-scratch``), a store with no location (an object
    passed in) in this machine's temporary directory when every worker runs
    here. A relative path is taken relative to this process's directory.
    """
    job = uuid.uuid4().hex[:16]
    if scratch is not None:
        where = os.fspath(scratch)
        if url_scheme(where) in ("", "file"):
            where = os.path.abspath(_local(where))
        return Scratch(where, job, dict(scratch_options if scratch_options is not None else options or {}))
    if url is not None and url_scheme(url) != "memory":
        if url_scheme(url) in ("", "file"):
            url = os.path.abspath(_local(url))
        where = url.rstrip("/") + SCRATCH_DIR if icechunk else f"{url.rstrip('/')}/{SCRATCH_DIR}"
        return Scratch(where, job, dict(options or {}), own_root=True)
    hosts = [] if client is None else [w.get("host") for w in client.scheduler_info()["workers"].values()]
    if _this_host(hosts):
        return Scratch(os.path.join(tempfile.gettempdir(), "zv-dask-scratch"), job, {}, own_root=True)
    raise InputError("the store has no location the workers can reach for staging the shuffle; pass a scratch "
                     "location every worker reaches (scratch='s3://bucket/tmp' or a shared path; CLI --scratch)")


def remove_stale_scratch(url: str | None, *, icechunk: bool = False, options: dict | None = None) -> None:
    """Remove the default scratch space of a store (pieces an interrupted job left behind): resumed jobs stage anew."""
    if url is None or url_scheme(url) == "memory":
        return
    s = default_scratch(url, icechunk=icechunk, options=options)
    Scratch(s.url, "", s.options, own_root=True).remove()


# -- the tasks' side ----------------------------------------------------------------------------
@dataclass
class StagedPartition:
    """Where one partition's pieces are: object ``name``, group ``g`` at ``offsets[g]:offsets[g + 1]``."""

    name: str
    offsets: np.ndarray
    rows: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])


def stage_partition(batch: Batch, grid, starts: np.ndarray, drop_outside: bool, units, layout: PieceLayout,
                    scratch: Scratch, index: int, skip: np.ndarray | None = None) -> StagedPartition:
    """Split a partition by write group and put its pieces on scratch (one object, group after group)."""
    n_groups = len(starts)
    name = f"p{index:07d}"
    sorted_ = sort_by_group(batch, grid, starts, drop_outside, units, skip)
    if sorted_ is None:
        return StagedPartition(name, np.zeros(n_groups + 1, np.int64), np.zeros(n_groups, np.int64))
    b, order, bounds = sorted_
    del batch
    buf, offsets = layout.encode(b, order, bounds)
    del b, order
    scratch.put(name, buf)
    return StagedPartition(name, offsets, np.diff(bounds).astype(np.int64))


def group_refs(staged: list[StagedPartition], n_groups: int) -> list[list[tuple[str, int, int, int]]]:
    """Per write group, ``(object, start, end, rows)`` of its pieces in partition (= input) order."""
    out: list[list] = [[] for _ in range(n_groups)]
    for part in staged:
        for g in np.flatnonzero(part.rows).tolist():
            out[g].append((part.name, int(part.offsets[g]), int(part.offsets[g + 1]), int(part.rows[g])))
    return out


def load_group(scratch: Scratch, layout: PieceLayout, refs: list[tuple[str, int, int, int]]) -> Batch | None:
    """A write group's points, read back from its pieces."""
    if not refs:
        return None
    buffers = scratch.get_ranges([(name, a, b) for name, a, b, _ in refs])
    return layout.decode([memoryview(b) for b in buffers], [r for *_, r in refs])
