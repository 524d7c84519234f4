"""The Dask ingestion engine: every input kind, the policies, determinism and bad input."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from helpers import canon, cell_bytes, reference_points, reference_validate, tree_bytes

import zv_dask
from zv_dask.errors import InputError, OutOfBoundsError, StoreError, UnfinishedJobWarning
from zv_dask.ingest.graph import PreparedIngest
from zv_dask.local import write_points

N = 20_000
CS = (125.0, 125.0, 125.0)
BIN = (25.0, 25.0, 25.0)


@pytest.fixture
def cloud(rng):
    pts = rng.uniform(0, 999, (N, 3)).astype(np.float32)
    pts[:50] = np.floor(pts[:50] / 125) * 125  # points exactly on chunk edges
    return pts, {"intensity": rng.random(N).astype(np.float32),
                 "rgb": rng.integers(0, 256, (N, 3)).astype(np.uint8),
                 "label": rng.integers(-5, 5, N).astype(np.int32)}


def assert_reads_back(path, pts, attrs, names=None):
    names = list(attrs) if names is None else names
    assert reference_validate(path) == []
    out = reference_points(path, attribute_names=names)
    got = canon(out["positions"], *[out["vertex_attributes"][n] for n in names])
    want = canon(np.asarray(pts, np.float32), *[np.asarray(attrs[n]) for n in names])
    np.testing.assert_array_equal(got, want)


def test_numpy_matches_local_writer_bytes(tmp_path, cloud):
    pts, attrs = cloud
    with dask.config.set(scheduler="sync"):
        rep = zv_dask.ingest(pts, tmp_path / "a.zv", attributes=attrs, chunk_shape=CS, base_bin_shape=BIN,
                             partition_rows=3001, group_points=4000)
    write_points(tmp_path / "b.zv", pts, attributes=attrs, chunk_shape=CS, base_bin_shape=BIN)
    assert rep.points_written == N and rep.points_dropped == 0 and rep.groups > 1
    assert cell_bytes(tmp_path / "a.zv") == cell_bytes(tmp_path / "b.zv")
    assert_reads_back(tmp_path / "a.zv", pts, attrs)
    assert "IngestReport" in repr(rep) and rep.to_dict()["points_written"] == N


@pytest.mark.parametrize("nparts", [1, 3, 17])
def test_deterministic_across_partitionings(tmp_path, cloud, nparts, dask_client):
    pts, attrs = cloud
    rows = -(-N // nparts)
    zv_dask.ingest(da.from_array(pts, chunks=(rows, 3)), tmp_path / "d.zv",
                   attributes={k: da.from_array(v, chunks=(rows,) + v.shape[1:]) for k, v in attrs.items()},
                   chunk_shape=CS, base_bin_shape=BIN, client=dask_client, group_points=7000)
    write_points(tmp_path / "ref.zv", pts, attributes=attrs, chunk_shape=CS, base_bin_shape=BIN)
    assert cell_bytes(tmp_path / "d.zv") == cell_bytes(tmp_path / "ref.zv")


def test_one_vs_two_workers_same_bytes(tmp_path, cloud, dask_client):
    pts, attrs = cloud
    zv_dask.ingest(pts, tmp_path / "two.zv", attributes=attrs, chunk_shape=CS, client=dask_client,
                   partition_rows=5000, group_points=3000)
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address=":0",
                      scheduler_kwargs={"dashboard": False},
                      host="127.0.0.1") as cluster, Client(cluster, set_as_default=False) as one:
        zv_dask.ingest(pts, tmp_path / "one.zv", attributes=attrs, chunk_shape=CS, client=one,
                       partition_rows=7000, group_points=100_000)
    assert cell_bytes(tmp_path / "one.zv") == cell_bytes(tmp_path / "two.zv")
    assert_reads_back(tmp_path / "two.zv", pts, attrs)


def test_dataframes(tmp_path, cloud):
    pts, attrs = cloud
    df = pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], "intensity": attrs["intensity"],
                       "label": attrs["label"], "name": ["p"] * N})
    with dask.config.set(scheduler="sync"):
        rep = zv_dask.ingest(df, tmp_path / "pd.zv", chunk_shape=CS, partition_rows=6000)
        import dask.dataframe as dd
        zv_dask.ingest(dd.from_pandas(df, npartitions=5), tmp_path / "dd.zv", chunk_shape=CS,
                       attributes=["intensity"])
    assert rep.points_written == N
    assert_reads_back(tmp_path / "pd.zv", pts, attrs, ["intensity", "label"])
    assert_reads_back(tmp_path / "dd.zv", pts, attrs, ["intensity"])
    info = zv_dask.store_info(tmp_path / "pd.zv")
    assert set(info["levels"][0]["attributes"]) == {"intensity", "label"}  # the string column is not numeric


def test_xarray_dataset(tmp_path, cloud):
    xr = pytest.importorskip("xarray")
    pts, attrs = cloud
    ds = xr.Dataset({"positions": (("points", "axis"), pts), "intensity": ("points", attrs["intensity"]),
                     "rgb": (("points", "channel"), attrs["rgb"])}, coords={"axis": ["x", "y", "z"]})
    ds2 = xr.Dataset({"x": ("points", pts[:, 0]), "y": ("points", pts[:, 1]), "z": ("points", pts[:, 2]),
                      "intensity": ("points", attrs["intensity"])}).chunk({"points": 7000})
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(ds, tmp_path / "a.zv", chunk_shape=CS)
        zv_dask.ingest(ds2, tmp_path / "b.zv", chunk_shape=CS)
    assert_reads_back(tmp_path / "a.zv", pts, attrs, ["intensity", "rgb"])
    assert_reads_back(tmp_path / "b.zv", pts, attrs, ["intensity"])


def test_files(tmp_path, cloud):
    pts, attrs = cloud
    df = pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], "intensity": attrs["intensity"]})
    df.iloc[: N // 2].to_parquet(tmp_path / "p1.parquet")
    df.iloc[N // 2:].to_parquet(tmp_path / "p2.parquet")
    df.to_csv(tmp_path / "pts.csv", index=False)
    np.save(tmp_path / "pts.npy", pts)
    rec = np.zeros(N, [("x", "f4"), ("y", "f4"), ("z", "f4"), ("intensity", "f4")])
    for c in "xyz":
        rec[c] = df[c]
    rec["intensity"] = attrs["intensity"]
    np.save(tmp_path / "rec.npy", rec)
    import zarr
    zarr.save_array(str(tmp_path / "pts.zarr"), pts, zarr_format=3)
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(str(tmp_path / "p*.parquet"), tmp_path / "pq.zv", chunk_shape=CS)
        zv_dask.ingest(tmp_path / "pts.csv", tmp_path / "csv.zv", chunk_shape=CS)
        zv_dask.ingest(tmp_path / "pts.npy", tmp_path / "npy.zv", chunk_shape=CS, partition_rows=6000)
        zv_dask.ingest(tmp_path / "rec.npy", tmp_path / "rec.zv", chunk_shape=CS)
        zv_dask.ingest(tmp_path / "pts.zarr", tmp_path / "zarr.zv", chunk_shape=CS)
    for name in ("pq", "rec"):
        assert_reads_back(tmp_path / f"{name}.zv", pts, attrs, ["intensity"])
    # CSV keeps the printed digits: float32 text read back as float64, equal once cast back
    out = reference_points(tmp_path / "csv.zv", attribute_names=["intensity"])
    got = canon(out["positions"], out["vertex_attributes"]["intensity"].astype(np.float32))
    np.testing.assert_array_equal(got, canon(pts, attrs["intensity"]))
    for name in ("npy", "zarr"):
        assert_reads_back(tmp_path / f"{name}.zv", pts, {}, [])


def _write_las(path, xyz, intensity, compressed):
    import laspy
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales = [0.01, 0.01, 0.01]
    header.offsets = np.floor(xyz.min(axis=0))
    las = laspy.LasData(header)
    las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    las.intensity = intensity
    las.classification = (intensity % 7).astype(np.uint8)
    las.red, las.green, las.blue = intensity, intensity // 2, intensity // 3
    las.write(str(path), do_compress=compressed) if compressed else las.write(str(path))


@pytest.mark.parametrize("suffix", ["las", "laz"])
def test_las_keeps_georeferenced_precision(tmp_path, rng, suffix):
    n = 5000
    xyz = np.round(rng.uniform(0, 500, (n, 3)) + [4.5e5, 5.2e6, 100.0], 2)  # UTM metres, centimetre quantum
    inten = rng.integers(0, 60000, n).astype(np.uint16)
    _write_las(tmp_path / f"tile.{suffix}", xyz, inten, suffix == "laz")
    with dask.config.set(scheduler="sync"):
        rep = zv_dask.ingest(tmp_path / f"tile.{suffix}", tmp_path / "las.zv", chunk_shape=(100.0, 100.0, 100.0),
                             partition_rows=1200)
    assert rep.dtype == "float64"
    out = reference_points(tmp_path / "las.zv", attribute_names=["intensity", "rgb"])
    assert out["positions"].dtype == np.float64
    got = canon(out["positions"], out["vertex_attributes"]["intensity"])
    np.testing.assert_allclose(got, canon(xyz, inten), atol=1e-6)  # centimetres intact
    assert out["vertex_attributes"]["rgb"].shape == (n, 3)


def test_object_ids(tmp_path, rng, dask_client):
    pts = rng.uniform(-300, 300, (N, 3)).astype(np.float32)
    oids = rng.choice(np.array([-7, 3, 10**12, 42, 99]), N)
    zv_dask.ingest(da.from_array(pts, chunks=(4000, 3)), tmp_path / "o.zv",
                   object_ids=da.from_array(oids, chunks=4000), chunk_shape=CS, client=dask_client)
    write_points(tmp_path / "ref.zv", pts, object_ids=oids, chunk_shape=CS)
    assert tree_bytes(tmp_path / "o.zv").keys() == tree_bytes(tmp_path / "ref.zv").keys()
    assert cell_bytes(tmp_path / "o.zv") == cell_bytes(tmp_path / "ref.zv")
    import zarr_vectors as zv
    ds = zv.open(str(tmp_path / "o.zv"))
    assert sorted(ds.level(0).objects.ids()) == [-7, 3, 42, 99, 10**12]
    assert len(ds.read(level=0, objects=[42]).positions) == int((oids == 42).sum())
    assert reference_validate(tmp_path / "o.zv") == []


def test_sharded(tmp_path, cloud):
    pts, attrs = cloud
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(pts, tmp_path / "sh.zv", attributes=attrs, chunk_shape=CS, shard_shape=(2, 2, 2),
                       group_points=3000, partition_rows=4000)
    assert_reads_back(tmp_path / "sh.zv", pts, attrs)


# -- policies ----------------------------------------------------------------------------
def test_raise_writes_nothing(tmp_path, cloud):
    pts, _ = cloud
    with pytest.raises(OutOfBoundsError, match=r"points lie outside the bounds"):
        zv_dask.ingest(pts, tmp_path / "r.zv", chunk_shape=CS, bounds=([0, 0, 0], [500, 500, 500]))
    assert not (tmp_path / "r.zv").exists()
    warm = zv_dask.create_store(tmp_path / "warm.zv", bounds=([0, 0, 0], [500, 500, 500]), chunk_shape=CS)
    before = tree_bytes(tmp_path / "warm.zv")
    with pytest.raises(OutOfBoundsError):
        zv_dask.ingest(pts, warm, chunk_shape=CS)
    assert tree_bytes(tmp_path / "warm.zv") == before


def test_ignore_drops_and_counts(tmp_path, cloud):
    pts, attrs = cloud
    box = ([0, 0, 0], [500, 600, 700])
    with dask.config.set(scheduler="sync"):
        rep = zv_dask.ingest(pts, tmp_path / "i.zv", attributes=attrs, chunk_shape=CS, bounds=box,
                             out_of_bounds="ignore", partition_rows=3000)
    inside = ((pts >= 0) & (pts <= [500, 600, 700])).all(axis=1)
    assert rep.points_dropped == int((~inside).sum()) > 0
    assert rep.points_written == int(inside.sum())
    assert_reads_back(tmp_path / "i.zv", pts[inside], {k: v[inside] for k, v in attrs.items()})


def test_expand_with_negative_coordinates(tmp_path, rng):
    pts = rng.uniform(-260, 90, (N, 3)).astype(np.float32)
    zs = zv_dask.create_store(tmp_path / "e.zv", bounds=([0, 0, 0], [128, 128, 128]), chunk_shape=(50, 50, 50))
    with dask.config.set(scheduler="sync"):
        rep = zv_dask.ingest(pts, zs, out_of_bounds="expand", partition_rows=5000)
    lo, hi = rep.bounds
    assert lo == pytest.approx(pts.min(axis=0).astype(np.float64).tolist())
    assert hi == [128.0, 128.0, 128.0]
    meta = zv_dask.open_store(tmp_path / "e.zv").metadata
    assert meta.bounds[0] == tuple(lo)
    import json
    origin = json.loads((tmp_path / "e.zv/0/vertices/zarr.json").read_text())["attributes"]["chunk_grid_origin"]
    assert origin == [-6, -6, -6]
    assert_reads_back(tmp_path / "e.zv", pts, {}, [])


# -- bad input ---------------------------------------------------------------------------
def test_bad_input_is_named_and_leaves_store_untouched(tmp_path, cloud):
    pts, attrs = cloud
    zv_dask.create_store(tmp_path / "keep.zv", bounds=([0, 0, 0], [999, 999, 999]), chunk_shape=CS)
    before = tree_bytes(tmp_path / "keep.zv")
    bad = pts.copy()
    bad[123, 1] = np.nan
    cases = [
        (dict(points=bad), InputError, r"non-finite.*row 123"),
        (dict(points=pts[:, :2]), InputError, r"2 coordinates but the store has 3 axes"),
        (dict(points=pts, attributes={"a": np.zeros(N - 1)}), InputError, r"attribute 'a' has 19999 rows"),
        (dict(points=da.from_array(pts, chunks=(5000, 3)),
              attributes={"a": da.zeros(N, chunks=3000)}), InputError, r"chunked"),
        (dict(points=da.from_array(pts, chunks=(5000, 3)), object_ids=da.zeros(N, chunks=3000, dtype=int)),
         InputError, r"chunked"),
        (dict(points=pts, attributes={"s": np.array(["a"] * N)}), InputError, r"dtype"),
        (dict(points=pts.astype(np.complex64)), InputError, r"dtype"),
        (dict(points=pts, object_ids=np.zeros(N, np.float32)), InputError, r"integers"),
        (dict(points=np.zeros((0, 3), np.float32)), InputError, r"no points"),
        (dict(points=pts, out_of_bounds="clip"), InputError, r"out_of_bounds"),
    ]
    for kw, exc, msg in cases:
        p = kw.pop("points")
        with dask.config.set(scheduler="sync"), pytest.raises(exc, match=msg):
            zv_dask.ingest(p, tmp_path / "keep.zv", **kw)
        assert tree_bytes(tmp_path / "keep.zv") == before, kw
    (tmp_path / "fake.parquet").write_bytes(b"definitely not parquet")
    (tmp_path / "fake.las").write_bytes(b"LASF but not really")
    (tmp_path / "fake.npy").write_bytes(b"nope")
    for f in ("fake.parquet", "fake.las", "fake.npy"):
        with pytest.raises(InputError, match="not a valid"):
            zv_dask.ingest(tmp_path / f, tmp_path / "keep.zv")
        assert tree_bytes(tmp_path / "keep.zv") == before
    (tmp_path / "fake.bin").write_bytes(b"")
    with pytest.raises(InputError, match="suffix"):
        zv_dask.ingest(tmp_path / "fake.bin", tmp_path / "x.zv", chunk_shape=CS)
    assert not (tmp_path / "x.zv").exists()


def test_refuses_store_with_points(tmp_path, cloud):
    pts, _ = cloud
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(pts, tmp_path / "full.zv", chunk_shape=CS)
        before = tree_bytes(tmp_path / "full.zv")
        with pytest.raises(StoreError, match="already holds points"):
            zv_dask.ingest(pts[:10], tmp_path / "full.zv", chunk_shape=CS)
        assert tree_bytes(tmp_path / "full.zv") == before
        rep = zv_dask.ingest(pts[:10], tmp_path / "full.zv", chunk_shape=CS, overwrite=True)
    assert rep.points_written == 10
    assert zv_dask.store_info(tmp_path / "full.zv")["levels"][0]["vertex_count"] == 10


def test_a_failed_overwrite_leaves_the_old_store_as_it_was(tmp_path, cloud, monkeypatch):
    pts, attrs = cloud
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(pts, tmp_path / "s.zv", attributes=attrs, chunk_shape=CS)
        before = tree_bytes(tmp_path / "s.zv")
        monkeypatch.setenv("ZV_DASK_FAIL_AT", "group:0")  # the first write task fails
        with pytest.raises(Exception, match="injected failure"):
            zv_dask.ingest(pts[:100], tmp_path / "s.zv", chunk_shape=CS, overwrite=True, durable=False)
        monkeypatch.delenv("ZV_DASK_FAIL_AT")
        assert tree_bytes(tmp_path / "s.zv") == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zv"], "the new store built beside it is gone"
        rep = zv_dask.ingest(pts[:100], tmp_path / "s.zv", chunk_shape=CS, overwrite=True)
    assert rep.store == str(tmp_path / "s.zv") and rep.points_written == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zv"]
    assert zv_dask.store_info(tmp_path / "s.zv")["levels"][0]["vertex_count"] == 100
    assert reference_validate(tmp_path / "s.zv") == []


def test_prepare_ingest_makes_the_store_and_run_writes_it(tmp_path, cloud):
    pts, attrs = cloud
    with dask.config.set(scheduler="sync"):
        prepared = zv_dask.prepare_ingest(pts, tmp_path / "lazy.zv", attributes=attrs, chunk_shape=CS)
        assert isinstance(prepared, PreparedIngest) and prepared.dask_objects
        with pytest.warns(UnfinishedJobWarning, match="unfinished ingest job"):  # prepared, not run yet
            assert zv_dask.store_info(tmp_path / "lazy.zv")["levels"][0]["vertex_count"] == 0
        rep = prepared.run()
    assert rep.points_written == N
    assert_reads_back(tmp_path / "lazy.zv", pts, attrs)


def test_an_empty_store_keeps_its_geometry_and_dtype_or_says_so(tmp_path):
    """create_store then ingest: arguments that disagree with the empty store are refused, not silently dropped."""
    store = tmp_path / "empty.zv"
    zv_dask.create_store(str(store), bounds=([0, 0, 0], [100, 100, 100]), chunk_shape=25)
    pts = np.random.default_rng(2).uniform(0, 100, (1000, 3))
    with dask.config.set(scheduler="sync"):
        for kw, what in ((dict(dtype="float64"), r"dtype float64 differs from the store's position dtype float32"),
                         (dict(base_bin_shape=5), r"base_bin_shape \[5\.0\] differs from the store's \[25\.0"),
                         (dict(chunk_shape=10), r"chunk_shape \[10\.0\] differs from the store's \[25\.0")):
            with pytest.raises(InputError, match=what + ".*overwrite=True"):
                zv_dask.ingest(pts, store, **{"chunk_shape": 25, **kw})
        assert zv_dask.store_info(str(store))["levels"][0]["vertex_count"] == 0
        rep = zv_dask.ingest(pts, store, dtype="float32")  # what it has: fine
        assert rep.dtype == "float32" and rep.points_written == 1000
        rep = zv_dask.ingest(pts, store, dtype="float64", chunk_shape=10, overwrite=True)  # remade
        assert rep.dtype == "float64" and zv_dask.store_info(str(store))["chunk_shape"] == [10.0] * 3
