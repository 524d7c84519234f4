"""read_points / open_level: lazy, correct, and opening only the chunks a box touches."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest
import zarr
from zarr.storage import LocalStore, WrapperStore

import zv_dask
from zv_dask.errors import InputError
from zv_dask.local import read_points as np_read
from zv_dask.local import write_points

SYNC = {"scheduler": "synchronous"}


class CountingStore(WrapperStore):
    """Records every key read (tests run the synchronous scheduler, so one object sees all reads)."""

    def __init__(self, store):
        super().__init__(store)
        self.keys = []

    async def get(self, key, prototype, byte_range=None):
        self.keys.append(key)
        return await self._store.get(key, prototype, byte_range)

    def opened(self, level, array="vertices"):
        """Absolute keys of the cells read (cell index + the grid origin)."""
        origin = np.asarray(zv_dask.open_store(self._store).grid(level).origin)
        prefix = f"{level}/{array}/c/"
        cells = {tuple(int(v) for v in k[len(prefix):].split("/")) for k in self.keys if k.startswith(prefix)}
        return sorted(".".join(map(str, np.asarray(c) + origin)) for c in cells)


def rows(df, cols):
    t = df[cols].to_numpy(np.float64)
    return t[np.lexsort(t.T[::-1])]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    rng = np.random.default_rng(21)
    n = 3000
    pts = rng.uniform(-20, 100, (n, 3))
    attrs = {"intensity": rng.random(n).astype("float32"), "rgb": rng.integers(0, 255, (n, 3)).astype("uint8")}
    path = tmp_path_factory.mktemp("read") / "s.zarr"
    write_points(str(path), pts, attributes=attrs, chunk_shape=(30,) * 3, base_bin_shape=(15,) * 3,
                 axes=["x", "y", "z"])
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(str(path), levels=1)
    return str(path)


def test_whole_level_matches_numpy_reader(store_path):
    df = zv_dask.read_points(store_path)
    assert list(df.columns) == ["x", "y", "z", "intensity", "rgb_0", "rgb_1", "rgb_2"]
    assert df.npartitions == len(zarr.open_group(store_path)["0/vertices"].attrs["nonempty_chunks"])
    assert df.dtypes["x"] == np.float32 and df.dtypes["rgb_0"] == np.uint8
    with dask.config.set(SYNC):
        got = df.compute()
    want = np_read(store_path)
    w = pd.DataFrame(np.column_stack([want["positions"], want["attributes"]["intensity"],
                                      want["attributes"]["rgb"]]), columns=list(df.columns))
    np.testing.assert_array_equal(rows(got, list(df.columns)), rows(w, list(df.columns)))


def test_bbox_opens_only_touched_chunks(store_path):
    grid = zv_dask.open_store(store_path).grid(0)
    nonempty = set(zarr.open_group(store_path)["0/vertices"].attrs["nonempty_chunks"])
    allpos = np_read(store_path)["positions"].astype(np.float64)
    rng = np.random.default_rng(3)
    for _ in range(6):
        lo = rng.uniform(-30, 90, 3)
        hi = lo + rng.uniform(1, 40, 3)
        cs = CountingStore(LocalStore(store_path, read_only=True))
        df = zv_dask.read_points(cs, bbox=(lo, hi), attributes=["intensity"])
        touched = {".".join(map(str, c)) for c in grid.chunks_touching(lo, hi).tolist()}
        planned = {".".join(map(str, c)) for g in zv_dask.read.read_plan(cs, bbox=(lo, hi)) for c in g.tolist()}
        assert planned == touched & nonempty
        with dask.config.set(SYNC):
            got = df.compute()
        assert cs.opened(0) == sorted(planned)
        assert cs.opened(0, "vertex_attributes/rgb") == []  # unrequested attributes are never opened
        want = allpos[((allpos >= lo) & (allpos <= hi)).all(axis=1)]
        np.testing.assert_array_equal(rows(got, ["x", "y", "z"]), want[np.lexsort(want.T[::-1])])
        assert list(got.columns) == ["x", "y", "z", "intensity"]


def test_empty_box_and_bad_inputs(store_path):
    df = zv_dask.read_points(store_path, bbox=([500, 500, 500], [600, 600, 600]))
    got = df.compute(scheduler="sync")
    assert len(got) == 0 and list(got.columns) == ["x", "y", "z", "intensity", "rgb_0", "rgb_1", "rgb_2"]
    with pytest.raises(InputError, match="not in level"):
        zv_dask.read_points(store_path, attributes=["nope"])
    with pytest.raises(InputError, match="inverted"):
        zv_dask.read_points(store_path, bbox=([1, 1, 1], [0, 0, 0]))


def test_open_level_matches_read_points(store_path):
    lo, hi = np.array([0.0, 10.0, -5.0]), np.array([59.0, 44.0, 70.0])
    for level, bbox in [(0, None), (1, None), (0, (lo, hi)), (1, (lo, hi))]:
        ds = zv_dask.open_level(store_path, level, bbox=bbox)
        assert ds.sizes["points"] > 0 and all(v.chunks is not None for v in ds.data_vars.values())
        with dask.config.set(SYNC):
            a = ds.compute().to_dataframe()
            b = zv_dask.read_points(store_path, level=level, bbox=bbox).compute()
        assert list(a.columns) == list(b.columns)
        np.testing.assert_array_equal(rows(a, list(b.columns)), rows(b, list(b.columns)))


def test_object_ids_and_distributed(tmp_path, dask_client):
    rng = np.random.default_rng(4)
    n = 2000
    pts = rng.uniform(0, 99, (n, 3))
    oids = rng.integers(-5, 30, n) * 7
    path = tmp_path / "o.zarr"
    write_points(str(path), pts, object_ids=oids, attributes={"v": rng.random(n)}, chunk_shape=(25,) * 3)
    zv_dask.build_pyramid(str(path), levels=1, client=dask_client)
    df = zv_dask.read_points(str(path))
    assert "object_id" in df.columns
    got = dask_client.compute(df).result()
    want = np_read(str(path), object_ids=True)
    np.testing.assert_array_equal(
        rows(got, ["x", "y", "z", "object_id"]),
        rows(pd.DataFrame(np.column_stack([want["positions"], want["object_ids"]]),
                          columns=["x", "y", "z", "object_id"]), ["x", "y", "z", "object_id"]))
    lvl1 = dask_client.compute(zv_dask.read_points(str(path), level=1)).result()
    assert set(lvl1["object_id"]) == set(oids.tolist())
    ds = zv_dask.open_level(str(path), 1, bbox=([0, 0, 0], [60, 60, 60]))
    with dask.config.set(SYNC):
        sub = ds.compute()
    inside = lvl1[(lvl1[["x", "y", "z"]].to_numpy() <= 60).all(axis=1)]
    assert sub.sizes["points"] == len(inside)
    assert sorted(sub["object_id"].values.tolist()) == sorted(inside["object_id"].tolist())
