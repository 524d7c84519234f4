"""xr.open_dataset(store, engine="zv"): the values of read_points, lazily, with the store's metadata as attributes."""

from __future__ import annotations

import warnings

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.storage import LocalStore, WrapperStore

import zv_dask
from zv_dask.errors import StoreError, ZVError
from zv_dask.local import write_points
from zv_dask.xarray_backend import ZVBackendEntrypoint

SYNC = {"scheduler": "synchronous"}
AXES = [{"name": n, "unit": "meter"} for n in "xyz"]
CRS = {"type": "name", "properties": {"name": "EPSG:32633"}}


class CountingStore(WrapperStore):
    """Records every key read."""

    def __init__(self, store):
        super().__init__(store)
        self.keys = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    def cells(self, part):
        return [k for k in self.keys if f"/{part}/c/" in k]


def _store(path, rng, **create):
    n = 1500
    pts = rng.uniform(0, 100, (n, 3))
    zv_dask.create_store(str(path), bounds=([0] * 3, [100] * 3), chunk_shape=(50,) * 3, base_bin_shape=(10,) * 3,
                         **create)
    write_points(str(path), pts, attributes={"intensity": rng.random(n).astype("float32"),
                                             "rgb": rng.integers(0, 255, (n, 3)).astype("uint8")})
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(str(path), levels=1)
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Units on every axis, a CRS and an attribute unit (as a store made with a schema declares it)."""
    path = _store(tmp_path_factory.mktemp("xr") / "cloud.zv", np.random.default_rng(5), axes=AXES, crs=CRS)
    zarr.open_group(path, mode="r+")["0/vertex_attributes/intensity"].attrs["unit"] = "watt"
    return path


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """No units, no CRS, and a name without the .zv suffix."""
    return _store(tmp_path_factory.mktemp("xr") / "plain", np.random.default_rng(6))


def _same_as_read_points(ds, path, **kw):
    with dask.config.set(SYNC):
        want = zv_dask.read_points(path, **kw).compute()
        got = ds.load()
    assert sorted(got.variables) == sorted(want.columns)
    assert got.sizes["points"] == len(want) > 0
    for c in want.columns:  # row for row: both read the partitions in ascending chunk order
        assert got[c].dtype == want[c].dtype, c
        np.testing.assert_array_equal(got[c].values, want[c].to_numpy(), err_msg=c)


def test_level_matches_read_points(store):
    ds = xr.open_dataset(store, engine="zv", level=1)
    assert set(ds.coords) == {"x", "y", "z"} and set(ds.data_vars) == {"intensity", "rgb_0", "rgb_1", "rgb_2"}
    assert ds.attrs["level"] == 1
    _same_as_read_points(ds, store, level=1)


def test_units_crs_and_level_geometry_as_attributes(store, plain):
    info = zv_dask.store_info(store)["levels"][1]
    ds = xr.open_dataset(store, engine="zv", level=1)
    assert all(ds[a].attrs["units"] == "meter" for a in "xyz")
    assert ds.attrs["crs"] == CRS and ds.attrs["axes"] == ["x", "y", "z"] and ds.attrs["zv_version"] == "0.9.2"
    assert ds.attrs["bin_shape"] == info["bin_shape"] == [20.0] * 3
    assert ds.attrs["chunk_shape"] == info["chunk_shape"]
    assert xr.open_dataset(store, engine="zv").intensity.attrs["units"] == "watt"
    bare = xr.open_dataset(plain, engine="zv")
    assert "crs" not in bare.attrs and not any("units" in bare[v].attrs for v in bare.variables)


def test_lazy_until_loaded_and_reads_only_what_is_indexed(store):
    cs = CountingStore(LocalStore(store, read_only=True))
    ds = xr.open_dataset(cs, engine="zv", chunks_per_partition=1)
    assert not cs.cells("vertices") and not cs.cells("intensity")  # sizing reads fragment indexes only
    with dask.config.set(SYNC):
        head = ds.isel(points=slice(0, 5)).x.values
    assert len(head) == 5 and len(cs.cells("vertices")) == 1  # the first partition, one chunk, only
    with dask.config.set(SYNC):
        ds.x.load()
    assert len(set(cs.cells("vertices"))) == len(zarr.open_group(store)["0/vertices"].attrs["nonempty_chunks"])


@pytest.mark.parametrize("chunks", [{}, "auto", {"points": 100}])
def test_chunks_give_dask_arrays(store, chunks):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # {"points": 100} splits partitions; xarray says so
        ds = xr.open_dataset(store, engine="zv", level=1, chunks=chunks)
    assert all(dask.is_dask_collection(v) for v in ds.variables.values())
    if chunks == {}:  # one dask chunk per read partition
        parts = zv_dask.open_level(store, 1).x.chunks
        assert ds.x.chunks == parts and ds.rgb_1.chunks == parts
    with dask.config.set(scheduler="threads"):
        if chunks == {}:
            _same_as_read_points(ds, store, level=1)
        else:
            want = zv_dask.read_points(store, level=1, attributes=["rgb"]).compute()
            np.testing.assert_array_equal(ds.rgb_1.values, want["rgb_1"].to_numpy())
            np.testing.assert_array_equal(ds.x.values, want["x"].to_numpy())


def test_bbox(store):
    lo, hi = [10.0, 0.0, 25.0], [60.0, 75.0, 90.0]
    ds = xr.open_dataset(store, engine="zv", bbox=(lo, hi))
    _same_as_read_points(ds, store, bbox=(lo, hi))
    pos = np.column_stack([ds[a].values for a in "xyz"])
    assert ((pos >= lo) & (pos <= hi)).all()


def test_drop_variables(store):
    ds = xr.open_dataset(store, engine="zv", level=1, drop_variables=["z", "rgb_1", "nope"])
    assert set(ds.coords) == {"x", "y"} and set(ds.data_vars) == {"intensity", "rgb_0", "rgb_2"}
    with dask.config.set(SYNC):
        want = zv_dask.read_points(store, level=1).compute()
    np.testing.assert_array_equal(ds.rgb_2.values, want["rgb_2"].to_numpy())
    cs = CountingStore(LocalStore(store, read_only=True))
    ds = xr.open_dataset(cs, engine="zv", drop_variables=["rgb"])  # a whole attribute: never read
    assert set(ds.data_vars) == {"intensity"}
    with dask.config.set(SYNC):
        ds.load()
    assert cs.cells("intensity") and not cs.cells("rgb")
    assert set(xr.open_dataset(store, engine="zv", drop_variables="intensity").data_vars) == {"rgb_0", "rgb_1", "rgb_2"}


def test_relative_path(store, monkeypatch):
    import os

    monkeypatch.chdir(os.path.dirname(store))
    ds = xr.open_dataset("cloud.zv", engine="zv", level=1)
    assert ds.encoding["source"] == store
    with dask.config.set(SYNC):
        want = zv_dask.read_points(store, level=1, attributes=[]).compute()
    np.testing.assert_array_equal(ds.z.values, want["z"].to_numpy())


def test_not_a_store_is_a_clear_error(tmp_path, store):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("hello")
    zarr.open_group(str(tmp_path / "group.zarr"), mode="w").attrs["title"] = "plain zarr"
    for path, msg in [(tmp_path / "junk", "not a ZV store"), (tmp_path / "group.zarr", "no 'zarr_vectors'"),
                      (tmp_path / "missing.zv", "does not exist")]:
        with pytest.raises(StoreError, match=msg):
            xr.open_dataset(path, engine="zv")
    with pytest.raises(ZVError, match="level 7 not found"):
        xr.open_dataset(store, engine="zv", level=7)


def test_guess_can_open(tmp_path, store, plain):
    guess = ZVBackendEntrypoint().guess_can_open
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "flat.zv").write_text("a file, not a store")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "zarr.json").write_text("{not json")
    zarr.open_group(str(tmp_path / "g"), mode="w")
    for yes in [store, store + "/", plain, f"file://{plain}", zv_dask.open_store(plain), "s3://bucket/a/cloud.zv",
                tmp_path / "not-yet.zv"]:
        assert guess(yes), yes
    for no in [tmp_path / "dir", tmp_path / "file.txt", tmp_path / "flat.zv", tmp_path / "bad", tmp_path / "g",
               "s3://bucket/plain", b"bytes", 42, None, object()]:
        assert not guess(no), no


def test_engine_is_guessed(store, plain):
    assert xr.backends.plugins.guess_engine(store) == "zv" == xr.backends.plugins.guess_engine(plain)
    ds = xr.open_dataset(plain, level=1)
    assert ds.attrs["level"] == 1 and set(ds.coords) == {"x", "y", "z"}
