"""zv-dask's own cell I/O (``store/cellio.py``): every backend it takes, its keys, its guards and its failures."""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zarr.storage import LocalStore, MemoryStore

from zv_dask.errors import StoreError
from zv_dask.format.grid import Grid
from zv_dask.store.backends import concurrency_option
from zv_dask.store.cellio import cell_keys, delete_cells, get_cells, put_cells
from zv_dask.store.levels import read_payloads, write_cells
from zv_dask.store.nodes import create_vlen_array
from zv_dask.store.retry import RetryingObjectStore

# a cell value: bytes, or a tuple of buffers stored one after the other (never empty: a cell is a frame)
VALUES = st.one_of(st.binary(min_size=1, max_size=300),
                   st.tuples(st.binary(min_size=1, max_size=80), st.lists(st.binary(max_size=80), max_size=3))
                   .map(lambda t: (t[0], *t[1])))
KEYS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(0, 3)), min_size=1, max_size=80,
                unique=True)


def _joined(v) -> bytes:
    return b"".join(v) if isinstance(v, tuple) else bytes(v)


def _icechunk_store():
    import icechunk

    repo = icechunk.Repository.create(icechunk.in_memory_storage())
    return repo.writable_session("main").store


def _obstore_memory():
    from obstore.store import MemoryStore as ObsMemory

    return RetryingObjectStore(ObsMemory())


BACKENDS = {
    "local": lambda tmp: LocalStore(str(tmp / "s")),
    "obstore": lambda tmp: _obstore_memory(),
    "icechunk": lambda tmp: _icechunk_store(),
    "zarr-memory": lambda tmp: MemoryStore(),
}


@pytest.mark.parametrize("kind", sorted(BACKENDS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=KEYS, values=st.data())
def test_put_get_delete_round_trip(tmp_path_factory, kind, cells, values):
    """What is put is what is got, byte for byte, on every backend; deleted keys read as missing."""
    store = BACKENDS[kind](tmp_path_factory.mktemp(kind))
    grid = Grid((0.0, 0.0, 0.0), (4.0, 41.0, 4.0), (1.0,) * 3, (1.0,) * 3, "float32")
    create_vlen_array(zarr.open_group(store, mode="a", zarr_format=3).require_group("0"), "vertices", grid, {})
    keys = cell_keys("0/vertices", np.asarray(cells))
    vals = [values.draw(VALUES) for _ in keys]
    put_cells(store, list(zip(keys, vals)))
    assert get_cells(store, keys) == [_joined(v) for v in vals]
    gone = keys[::2]
    delete_cells(store, gone + ["0/vertices/c/99/99/99"])  # a missing key is no error
    got = get_cells(store, keys)
    assert got == [None if k in gone else _joined(v) for k, v in zip(keys, vals)]


def test_keys_are_zarrs_own(tmp_path):
    """cell_keys gives the keys zarr writes for the array's own chunk key encoding (default and v2-style)."""
    grid = Grid((0.0, 0.0), (4.0, 4.0), (1.0, 1.0), (1.0, 1.0), "float32")
    g = zarr.open_group(str(tmp_path / "s"), mode="w", zarr_format=3)
    for name, enc in (("default", None), ("dotted", {"name": "default", "separator": "."})):
        arr = g.create_array(name, shape=grid.shape, chunks=(1, 1), dtype="bytes", fill_value=b"",
                             **({"chunk_key_encoding": enc} if enc else {}))
        arr.set_coordinate_selection(([2], [3]), np.array([b"x"], dtype=object))
        written = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "s")
                         for d, _, fs in os.walk(tmp_path / "s" / name) for f in fs if f != "zarr.json")
        assert cell_keys(name, [[2, 3]], arr.metadata.chunk_key_encoding) == written
    assert cell_keys("a/b/", [[0, 1, 2]]) == ["a/b/c/0/1/2"]
    assert cell_keys("", [[5]]) == ["c/5"]
    assert cell_keys("x", np.zeros((0, 3), np.int64)) == []


def test_a_read_only_store_is_refused_before_any_write(tmp_path):
    path = tmp_path / "s"
    LocalStore(str(path))  # (makes nothing)
    ro = LocalStore(str(path), read_only=True)
    with pytest.raises(StoreError, match="open read-only"):
        put_cells(ro, [("0/vertices/c/0/0/0", b"abc")])
    with pytest.raises(StoreError, match="open read-only"):
        delete_cells(ro, ["0/vertices/c/0/0/0"])
    assert not path.exists() or not any(path.rglob("*"))
    obs = _obstore_memory().with_read_only(True)
    with pytest.raises(StoreError, match="open read-only"):
        put_cells(obs, [("k", b"v")])


def test_a_failed_local_write_leaves_nothing_behind(tmp_path):
    """A write that cannot land (here: a directory where the cell's file must go) raises and leaves no
    temporary file; the cells written before it stay whole."""
    root = tmp_path / "s"
    (root / "0" / "vertices" / "c" / "0" / "0" / "1").mkdir(parents=True)  # in the way of cell 0/0/1
    items = [(f"0/vertices/c/0/0/{i}", (b"head", b"-%d" % i)) for i in range(3)]
    with pytest.raises(OSError):
        put_cells(LocalStore(str(root)), items)
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == ["0/vertices/c/0/0/0"], left
    assert (root / "0/vertices/c/0/0/0").read_bytes() == b"head-0"


class _CountingStore(MemoryStore):
    """A zarr memory store that counts its requests in flight (the limit under test is cellio's, not this)."""

    def __init__(self, concurrency=None):
        super().__init__()
        self.concurrency = concurrency
        self.in_flight = self.peak = 0

    async def set(self, key, value, byte_range=None):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.002)
        await super().set(key, value)
        self.in_flight -= 1


@pytest.mark.parametrize("limit", [None, 3])
def test_the_concurrency_option_bounds_requests_in_flight(limit):
    store = _CountingStore(limit)
    put_cells(store, [(f"a/c/{i}", b"x") for i in range(200)])
    assert store.peak == (limit or 64)


def test_the_concurrency_option_reaches_the_object_store():
    """``storage_options={"concurrency": n}`` travels with the store (it pickles to workers) and is checked."""
    import pickle

    from zv_dask.store.backends import resolve_backend

    be = resolve_backend("memory://x", mode="w", storage_options={"concurrency": "5"}, create=True)
    assert be.store.concurrency == 5
    assert be.store.with_read_only(True).concurrency == 5
    from obstore.store import LocalStore as ObsLocal

    assert pickle.loads(pickle.dumps(RetryingObjectStore(ObsLocal("/tmp"), concurrency=7))).concurrency == 7
    assert concurrency_option({}) is None
    for bad in (0, -2, "many", 2.5, True):
        with pytest.raises(StoreError, match="concurrency must be a whole number"):
            concurrency_option({"concurrency": bad})


def test_chunks_of_more_than_one_cell_go_through_zarr(tmp_path):
    """An array whose chunks hold several cells cannot take the one-frame-per-object path: zarr writes it,
    and what zarr reads back is what was written."""
    grid = Grid((0.0, 0.0, 0.0), (4.0, 4.0, 4.0), (1.0,) * 3, (1.0,) * 3, "float32")
    g = zarr.open_group(str(tmp_path / "s"), mode="w", zarr_format=3)
    one = create_vlen_array(g, "one", grid, {})
    many = g.create_array("many", shape=grid.shape, chunks=(2, 2, 2), dtype="bytes", fill_value=b"")
    cells = np.array([[0, 0, 0], [0, 0, 1], [3, 3, 3]])
    payloads = [b"alpha", b"beta", b"gamma"]
    write_cells(g.store, [("one", cells, payloads), ("many", cells, payloads)])
    assert [bytes(v) for v in many.get_coordinate_selection(tuple(cells.T))] == payloads
    assert [bytes(v) for v in one.get_coordinate_selection(tuple(cells.T))] == payloads
    assert read_payloads(g.store, many, cells) == payloads
    frames = get_cells(g.store, cell_keys("many", [[0, 0, 0], [1, 1, 1]]))
    assert frames[0] is not None and frames[1] is not None  # chunk (1,1,1) holds cell (3,3,3)


def test_the_write_path_read_from_zarr_json_is_zarrs_and_follows_the_document(tmp_path):
    """write_cells decides how to write a local array from its zarr.json bytes, without opening it: the same
    decision as from the opened array for plain, zstd, blosc and sharded arrays, and an array made again at the
    same path with other codecs is written by its new document (zarr reads back what was written each time)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    from zv_dask.store.levels import _direct, _how_to_write

    grid = Grid((0.0, 0.0, 0.0), (4.0, 4.0, 4.0), (1.0,) * 3, (1.0,) * 3, "float32")
    g = zarr.open_group(str(tmp_path / "s"), mode="w", zarr_format=3)
    cells = np.array([[0, 0, 0], [1, 2, 3], [3, 3, 3]])
    kinds = [("plain", {}), ("zstd", {"compressors": [ZstdCodec(level=3)]}),
             ("blosc", {"compressors": [BloscCodec()]}), ("sharded", {"shards": (2, 2, 2)})]
    for round_ in range(2):
        for i, (name, kw) in enumerate(kinds):
            # round 1 makes every array again with the next kind's codecs: same path, other document
            made, kw = kinds[(i + round_) % len(kinds)]
            arr = create_vlen_array(g, name, grid, {}, **kw)
            how, _, opened = _how_to_write(g.store, name, get_cells(g.store, [f"{name}/zarr.json"])[0])
            assert how == _direct(arr), (name, made)
            assert (opened is None) == (how is not None), (name, made)
            payloads = [f"{name}-{made}-{k}".encode() for k in range(len(cells))]
            write_cells(g.store, [(name, cells, payloads)])
            back = zarr.open_array(g.store, path=name, mode="r")
            assert [bytes(v) for v in back.get_coordinate_selection(tuple(cells.T))] == payloads, (name, made)
