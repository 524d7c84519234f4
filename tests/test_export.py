"""zv_dask.export: a level (or a box of it) back out to LAS/LAZ and Parquet, checked with laspy and pyarrow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import dask
import laspy
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from helpers import WKT, fill_las_dimensions
from laspy.vlrs.known import GeoKeyDirectoryVlr, WktCoordinateSystemVlr

import zv_dask
from zv_dask.errors import InputError, StoreError
from zv_dask.format.las_layout import choose_point_format, las_record, to_integers

BIN = Path(sys.executable).parent / "zv-dask"
N = 5000


@pytest.fixture(autouse=True)
def _in_process():
    with dask.config.set(scheduler="sync"):
        yield


def run(*args, cwd=None, timeout=120):
    """Run the CLI; returns the CompletedProcess (text mode)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([str(BIN)] + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


# -- inputs ------------------------------------------------------------------------------------
def write_las(path, fmt, seed=0, n=N):
    """Point format ``fmt`` with every dimension varied, extra bytes (f4, 3 x u2) and a WKT CRS VLR."""
    rng = np.random.default_rng(seed + fmt)
    h = laspy.LasHeader(point_format=fmt, version="1.4" if fmt >= 6 else "1.2")
    h.scales = [0.01, 0.01, 0.001]
    h.offsets = [500000.0, 4000000.0, -10.0]
    h.add_extra_dims([laspy.ExtraBytesParams("height", "f4", description="above ground"),
                      laspy.ExtraBytesParams("triple", "3u2")])
    h.vlrs.append(WktCoordinateSystemVlr(WKT))
    if fmt >= 6:
        h.global_encoding.wkt = True
    # header identity an export must give back: adjusted standard GPS time, synthetic returns, ids
    h.global_encoding.gps_time_type = laspy.header.GpsTimeType.STANDARD
    h.global_encoding.synthetic_return_numbers = fmt % 2 == 1
    h.file_source_id = 100 + fmt
    h.system_identifier = "zv-dask tests"
    h.uuid = uuid.UUID(int=0x1234_5678_9ABC_DEF0 + fmt)
    las = laspy.LasData(h)
    las.X = rng.integers(0, 400_000, n, dtype=np.int32)
    las.Y = rng.integers(-50_000, 350_000, n, dtype=np.int32)
    las.Z = rng.integers(0, 90_000, n, dtype=np.int32)
    fill_las_dimensions(las, rng, n)
    las.write(str(path))
    return path


def contract_store(las_path, store, **kw):
    """A store as LAS ingest leaves it (the contract), made from arrays with the root attributes set by hand."""
    las = laspy.read(str(las_path))
    pf = las.point_format
    attrs, dims, extra = {}, [], []
    for d in pf.dimensions:
        if d.name in ("X", "Y", "Z"):
            continue
        if d.name in ("red", "green", "blue"):
            if "rgb" not in attrs:
                attrs["rgb"] = np.stack([np.asarray(las[c]) for c in ("red", "green", "blue")], axis=1)
                dims.append("rgb")
            continue
        attrs[d.name] = np.asarray(las[d.name])
        dims.append(d.name)
        if not d.is_standard:
            sub = attrs[d.name].dtype
            extra.append({"name": d.name, "dtype": sub.name, "channels": None if attrs[d.name].ndim == 1
                          else attrs[d.name].shape[1], "description": d.description})
    pos = np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], axis=1)
    zv_dask.ingest(pos, store, attributes=attrs, dtype="float64", overwrite=True, **kw)
    h = las.header
    record = {"version": str(h.version), "point_format": pf.id, "scales": h.scales.tolist(),
              "offsets": h.offsets.tolist(), "dimensions": dims, "extra_bytes": extra, "uniform": True,
              "global_encoding": h.global_encoding.value, "file_source_id": h.file_source_id,
              "system_identifier": h.system_identifier, "project_id": str(h.uuid),
              "files": [{"name": Path(las_path).name, "points": len(las.points), "version": str(h.version),
                         "point_format": pf.id, "scales": h.scales.tolist(), "offsets": h.offsets.tolist()}]}
    set_root(store, crs={"wkt": WKT}, las=record)
    return store


def set_root(store, crs=None, las=None):
    zs = zv_dask.open_store(str(store), "r+")
    a = zs.root.attrs.asdict()
    zv = dict(a["zarr_vectors"])
    zv["crs"] = crs
    upd = {"zarr_vectors": zv}
    if las is not None:
        upd["zv_dask"] = {**a.get("zv_dask", {}), "las": las}
    zs.root.attrs.update(upd)


GEOMETRY = dict(chunk_shape=1000.0, base_bin_shape=100.0)


@pytest.fixture(scope="module")
def las_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("las-in")
    return {fmt: write_las(d / f"f{fmt}.las", fmt) for fmt in (1, 3, 7, 8)}


@pytest.fixture(scope="module")
def las_stores(las_files, tmp_path_factory):
    """Each file through real LAS ingest (with a pyramid for format 3)."""
    d = tmp_path_factory.mktemp("las-stores")
    out = {}
    with dask.config.set(scheduler="sync"):
        for fmt, path in las_files.items():
            store = d / f"f{fmt}.zv"
            zv_dask.ingest(str(path), store, pyramid=True if fmt == 3 else None, **GEOMETRY)
            out[fmt] = store
    return out


@pytest.fixture(scope="module")
def contract(las_files, tmp_path_factory):
    """A format-7 store made by hand to the contract, with a pyramid: ``(store, the LAS file)``."""
    with dask.config.set(scheduler="sync"):
        store = contract_store(las_files[7], tmp_path_factory.mktemp("contract") / "c.zv", pyramid=True, **GEOMETRY)
    return store, las_files[7]


@pytest.fixture
def las_store(las_files, las_stores, contract):
    """Format 3 through LAS ingest."""
    assert has_las_record(las_stores[3])
    return las_stores[3], las_files[3]


def has_las_record(store) -> bool:
    return las_record(zv_dask.open_store(str(store)).root.attrs.asdict()) is not None


def sort_key(las):
    return np.lexsort([np.asarray(las.gps_time), np.asarray(las.Z), np.asarray(las.Y), np.asarray(las.X)])


def wkt_of(las):
    found = [v.string.strip("\0") for v in las.header.vlrs if isinstance(v, WktCoordinateSystemVlr)]
    return found[0] if found else None


def assert_same_las(got_path, want_path):
    got, want = laspy.read(str(got_path)), laspy.read(str(want_path))
    assert got.header.point_count == want.header.point_count == N
    assert got.header.point_format.id == want.header.point_format.id
    assert str(got.header.version) == str(want.header.version)
    assert got.header.scales.tolist() == want.header.scales.tolist()
    assert got.header.offsets.tolist() == want.header.offsets.tolist()
    assert list(got.point_format.dimension_names) == list(want.point_format.dimension_names)
    assert [(d.name, d.dtype) for d in got.point_format.extra_dimensions] == \
        [(d.name, d.dtype) for d in want.point_format.extra_dimensions]
    assert wkt_of(got) == wkt_of(want) == WKT
    if want.header.version.minor >= 4:
        assert got.header.global_encoding.wkt
    assert got.header.global_encoding.value == want.header.global_encoding.value
    assert (got.header.file_source_id, got.header.system_identifier, got.header.uuid) == \
        (want.header.file_source_id, want.header.system_identifier, want.header.uuid)
    assert got.header.mins.tolist() == want.header.mins.tolist()
    assert got.header.maxs.tolist() == want.header.maxs.tolist()
    assert got.header.number_of_points_by_return.tolist() == want.header.number_of_points_by_return.tolist()
    g, w = sort_key(got), sort_key(want)
    for name in want.point_format.dimension_names:
        assert np.array_equal(np.asarray(got[name])[g], np.asarray(want[name])[w]), name


# -- the integer grid ----------------------------------------------------------------------------
@pytest.mark.parametrize("scale,offset", [(0.01, 0.0), (0.001, 500000.0), (0.0001, 4e6), (1e-7, -180.0)])
def test_integers_come_back_exactly(scale, offset):
    ints = np.random.default_rng(1).integers(-(2 ** 31), 2 ** 31, 200_000).astype(np.float64)
    ints[:2] = [-(2 ** 31), 2 ** 31 - 1]
    x = ints * scale + offset  # what laspy (and so LAS ingest) computes
    r, off = to_integers(x, scale, offset)
    assert np.array_equal(r, ints) and not off.any()


def test_point_format_choice():
    assert choose_point_format(set()) == 0
    assert choose_point_format({"gps_time"}) == 1
    assert choose_point_format({"red", "green", "blue"}) == 2
    assert choose_point_format({"red", "green", "blue", "gps_time"}) == 3
    assert choose_point_format({"nir"}) == 8
    assert choose_point_format({"scan_angle", "red", "green", "blue"}) == 7
    assert choose_point_format({"gps_time"}, preferred=3) == 3


# -- (b) LAS ingest -> export: the same file contents -------------------------------------------------
@pytest.mark.parametrize("fmt,suffix", [(1, ".las"), (3, ".laz"), (7, ".las"), (8, ".laz")])
def test_las_round_trip_through_ingest(las_files, las_stores, fmt, suffix, tmp_path):
    store = las_stores[fmt]
    assert has_las_record(store), "LAS ingest leaves the zv_dask.las record"
    out = tmp_path / f"out{suffix}"
    s = zv_dask.export(store, out)
    assert s["points"] == N and s["format"] == suffix[1:] and s["bytes"] == out.stat().st_size
    assert s["las"]["header_from"] == "the store's LAS record" and s["crs_written"] == "WKT VLR"
    assert s["las"]["extra_bytes"] == ["height", "triple"] and s["notes"] == []
    assert_same_las(out, las_files[fmt])


def test_las_round_trip_of_the_contract(contract, tmp_path):
    """The same with a store made by hand to the contract (independent of LAS ingest's code)."""
    store, original = contract
    s = zv_dask.export(store, tmp_path / "c.laz")
    assert s["points"] == N and s["notes"] == []
    assert_same_las(tmp_path / "c.laz", original)


# -- (a) Parquet ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def array_store(tmp_path_factory):
    """From arrays: float32 positions, amplitude f4, label u1, rgb 3 x u1; an EPSG CRS, no LAS record."""
    rng = np.random.default_rng(3)
    pos = rng.uniform(0, 100, (N, 3))
    attrs = {"amplitude": rng.random(N).astype(np.float32), "label": rng.integers(0, 9, N).astype(np.uint8),
             "rgb": rng.integers(0, 255, (N, 3)).astype(np.uint8)}
    store = tmp_path_factory.mktemp("arrays") / "a.zv"
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(pos, store, attributes=attrs, chunk_shape=25.0)
    set_root(store, crs={"epsg": 32610})
    frame = pd.DataFrame(pos.astype(np.float32), columns=["x", "y", "z"])
    frame["amplitude"], frame["label"] = attrs["amplitude"], attrs["label"]
    for i in range(3):
        frame[f"rgb_{i}"] = attrs["rgb"][:, i]
    return store, frame


def _sorted(df):
    return df.sort_values(list(df.columns)).reset_index(drop=True)


@pytest.mark.parametrize("out", ["pts.parquet", "parts/"])
def test_parquet_same_rows_and_dtypes(array_store, tmp_path, out):
    store, frame = array_store
    s = zv_dask.export(store, str(tmp_path / out) + ("/" if out.endswith("/") else ""))
    path = tmp_path / out.rstrip("/")
    assert s["points"] == N and s["layout"] == ("directory" if out.endswith("/") else "file")
    assert path.is_dir() == out.endswith("/")
    got = pd.read_parquet(path)
    want = frame[list(got.columns)]
    assert list(got.columns) == ["x", "y", "z", "amplitude", "label", "rgb_0", "rgb_1", "rgb_2"]
    assert got.dtypes.to_dict() == want.dtypes.to_dict()
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want))
    first = path if path.is_file() else sorted(path.glob("*.parquet"))[0]
    kv = pq.read_schema(first).metadata
    assert kv[b"crs"] == b"EPSG:32610"
    meta = json.loads(kv[b"zv_dask"])
    assert meta["level"] == 0 and meta["attributes"]["rgb"] == {"dtype": "uint8", "channels": 3}
    assert meta["crs"] == {"epsg": 32610} and meta["las"] is None


def test_parquet_of_las_input_keeps_record_and_wkt(contract, tmp_path):
    store, original = contract
    zv_dask.export(store, tmp_path / "c.parquet")
    kv = pq.read_schema(tmp_path / "c.parquet").metadata
    assert kv[b"crs"].decode() == WKT and json.loads(kv[b"zv_dask"])["las"]["point_format"] == 7
    got = pd.read_parquet(tmp_path / "c.parquet")
    want = laspy.read(str(original))
    assert np.array_equal(np.sort(got["x"].to_numpy()), np.sort(np.asarray(want.x)))
    assert got["rgb_1"].dtype == np.uint16 and got["gps_time"].dtype == np.float64


# -- LAS from a store without a LAS record ---------------------------------------------------------
def test_las_from_arrays_chooses_a_header(array_store, tmp_path):
    store, frame = array_store
    s = zv_dask.export(store, tmp_path / "a.las")
    las = laspy.read(str(tmp_path / "a.las"))
    assert las.header.point_format.id == 2 and str(las.header.version) == "1.2"  # rgb: format 2
    assert las.header.scales.tolist() == [0.001] * 3 and las.header.offsets.tolist() == [0.0] * 3
    assert [d.name for d in las.point_format.extra_dimensions] == ["amplitude", "label"]
    assert las["amplitude"].dtype == np.float32 and las["label"].dtype == np.uint8
    assert s["las"]["header_from"].startswith("chosen") and any("extra bytes" in n for n in s["notes"])
    keys = [v for v in las.header.vlrs if isinstance(v, GeoKeyDirectoryVlr)][0].geo_keys
    assert {(k.id, k.value_offset) for k in keys} >= {(1024, 1), (3072, 32610)}
    assert s["crs_written"].startswith("GeoKeyDirectory VLR (EPSG:32610, projected")
    want = pd.DataFrame({a: np.round(frame[a].to_numpy(np.float64) / 0.001).astype(np.int64) for a in "xyz"})
    got = pd.DataFrame({a: np.asarray(las[a.upper()], np.int64) for a in "xyz"})
    for frame_col, las_dim in (("rgb_0", "red"), ("rgb_2", "blue"), ("label", "label"), ("amplitude", "amplitude")):
        want[las_dim], got[las_dim] = frame[frame_col].to_numpy(), np.asarray(las[las_dim])
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want), check_dtype=False)


def test_values_that_do_not_fit_are_refused(tmp_path):
    pos = np.random.default_rng(4).uniform(0, 10, (100, 3))
    store = tmp_path / "f.zv"
    cls = np.full(100, 2.0)
    cls[7] = 2.5
    zv_dask.ingest(pos, store, attributes={"classification": cls, "intensity": np.arange(100.0)}, chunk_shape=5.0)
    with pytest.raises(InputError, match=r"attribute 'classification' holds 2\.5, not an integer"):
        zv_dask.export(store, tmp_path / "f.las")
    assert sorted(os.listdir(tmp_path)) == ["f.zv"], "a failed export leaves nothing behind"
    s = zv_dask.export(store, tmp_path / "f.las", attributes=["intensity"])  # whole floats fit intensity
    assert s["las"]["point_format"] == 0 and s["las"]["dimensions"] == ["intensity"]
    assert np.array_equal(np.sort(laspy.read(str(tmp_path / "f.las")).intensity), np.arange(100))
    zv_dask.ingest(pos, tmp_path / "g.zv", attributes={"classification": np.full(100, 40, np.uint8)},
                   chunk_shape=5.0)
    with pytest.raises(InputError, match=r"'classification' holds 40, outside 0\.\.31.*formats 6-10"):
        zv_dask.export(tmp_path / "g.zv", tmp_path / "g.las")


# -- (c) a box; (d) a coarse level -----------------------------------------------------------------
def test_bbox_export_is_the_points_in_the_box(las_store, tmp_path):
    store, original = las_store
    want = laspy.read(str(original))
    lo, hi = [500800.0, 4000500.0, 10.0], [502500.0, 4002000.0, 60.0]
    xyz = np.stack([np.asarray(want.x), np.asarray(want.y), np.asarray(want.z)], axis=1)
    inside = ((xyz >= lo) & (xyz <= hi)).all(axis=1)
    assert 0 < inside.sum() < N
    s = zv_dask.export(store, tmp_path / "box.laz", bbox=(lo, hi))
    got = laspy.read(str(tmp_path / "box.laz"))
    assert s["points"] == got.header.point_count == inside.sum() and s["bbox"] == [lo, hi]
    assert np.array_equal(np.sort(np.asarray(got.gps_time)), np.sort(np.asarray(want.gps_time)[inside]))
    assert np.array_equal(np.sort(np.asarray(got.X)), np.sort(np.asarray(want.X)[inside]))
    df = pd.read_parquet(zv_dask.export(store, tmp_path / "box.parquet", bbox=(lo, hi))["file"])
    assert len(df) == inside.sum()
    empty = zv_dask.export(store, tmp_path / "none.las", bbox=([0, 0, 0], [1, 1, 1]))
    assert empty["points"] == 0 and any("empty" in n for n in empty["notes"])
    assert laspy.read(str(tmp_path / "none.las")).header.point_count == 0


def test_coarse_level_positions_are_rounded(las_store, tmp_path):
    store, original = las_store
    fine = zv_dask.read_points(store, level=1).compute()
    s = zv_dask.export(store, tmp_path / "l1.las", level=1)
    got = laspy.read(str(tmp_path / "l1.las"))
    assert s["level"] == 1 and s["points"] == len(fine) == got.header.point_count > 0
    assert any("level 1 is a coarse level" in n for n in s["notes"])
    assert any("were rounded" in n for n in s["notes"])  # centroids are not on the 0.01 grid
    for ax, col in (("x", "x"), ("y", "y"), ("z", "z")):
        step = got.header.scales["xyz".index(ax)]
        assert np.abs(np.sort(np.asarray(got[ax])) - np.sort(fine[col].to_numpy())).max() <= step / 2 + 1e-9
    assert got.header.point_format.id == laspy.read(str(original)).header.point_format.id


# -- (e) outputs: existing ones, failures, names ---------------------------------------------------------
def test_existing_output_is_refused_unless_overwrite(array_store, tmp_path):
    store, _ = array_store
    out = tmp_path / "a.parquet"
    out.write_bytes(b"old")
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        zv_dask.export(store, out)
    assert out.read_bytes() == b"old"
    with pytest.raises(InputError, match="not in level 0"):  # a failed overwrite keeps the old file
        zv_dask.export(store, out, attributes=["nope"], overwrite=True)
    assert out.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.parquet"]
    zv_dask.export(store, out, overwrite=True)
    assert len(pd.read_parquet(out)) == N
    (tmp_path / "d").mkdir()
    zv_dask.export(store, str(tmp_path / "d") + "/", overwrite=True)
    assert len(pd.read_parquet(tmp_path / "d")) == N


def test_a_failure_while_writing_leaves_no_partial_file(array_store, tmp_path, monkeypatch):
    store, _ = array_store
    import zv_dask.format.las_layout as layout

    calls = []

    def boom(v, f):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk on fire")
        return v.astype(f.dtype)

    monkeypatch.setattr(layout, "_fit", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        zv_dask.export(store, tmp_path / "a.laz")
    assert os.listdir(tmp_path) == []


def test_bad_names_and_levels(array_store, tmp_path):
    store, _ = array_store
    with pytest.raises(InputError, match="cannot tell the format"):
        zv_dask.export(store, tmp_path / "a.ply")
    with pytest.raises(StoreError, match="level 7 not found"):
        zv_dask.export(store, tmp_path / "a.las", level=7)
    with pytest.raises(StoreError, match="does not exist"):
        zv_dask.export(store, tmp_path / "no" / "a.las")
    with pytest.raises(InputError, match="only the Parquet export"):
        zv_dask.export(store, str(tmp_path / "d") + "/", format="las")
    s = zv_dask.export(store, tmp_path / "a.bin", format="parquet")
    assert s["format"] == "parquet" and len(pd.read_parquet(tmp_path / "a.bin")) == N


# -- (f) the command line ----------------------------------------------------------------------------
def test_cli_round_trip(contract, tmp_path):
    store, original = contract
    out = tmp_path / "c.laz"
    rep = json.loads(ok(run("export", store, out, "--json", "-q")).stdout)
    assert rep["points"] == N and rep["file"] == str(out) and rep["las"]["point_format"] == 7
    assert_same_las(out, original)
    text = ok(run("export", store, tmp_path / "box.parquet", "--bbox", "500000,4000000,-10,501000,4001000,100",
                  "--attributes", "intensity,gps_time", "-q")).stdout
    assert text.startswith("exported ") and "Parquet file" in text
    assert list(pd.read_parquet(tmp_path / "box.parquet").columns) == ["x", "y", "z", "intensity", "gps_time"]



def test_cli_refuses_an_existing_output_in_its_own_spelling(array_store, tmp_path, capsys):
    from zv_dask.cli import main

    store, _ = array_store
    (tmp_path / "a.las").write_bytes(b"old")
    assert main(["export", str(store), str(tmp_path / "a.las"), "-q"]) == 2  # in this process
    err = capsys.readouterr().err
    assert "zv-dask export: error:" in err and "already exists; pass --overwrite to replace it" in err
    assert (tmp_path / "a.las").read_bytes() == b"old"
