"""reproject= / --reproject: positions transformed with pyproj before the scan, on real LAS files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dask
import laspy
import numpy as np
import pyproj
import pytest
from helpers import reference_validate
from laspy.vlrs.known import WktCoordinateSystemVlr

import zv_dask
from zv_dask.errors import InputError

DATA = Path(__file__).parent / "data"
BIN = Path(sys.executable).parent / "zv-dask"


@pytest.fixture(autouse=True)
def _in_process():
    with dask.config.set(scheduler="sync"):
        yield


def transformed(path, to, src=None):
    """laspy's coordinates of ``path`` through pyproj, independently of zv-dask: ``(n, 3)`` float64."""
    las = laspy.read(str(path))
    crs = src or las.header.parse_crs()
    t = pyproj.Transformer.from_crs(crs, to, always_xy=True)
    return np.column_stack(t.transform(np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)))


def positions(store) -> np.ndarray:
    df = zv_dask.read_points(store, attributes=[]).compute()
    return df[["x", "y", "z"]].to_numpy()


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def lonlat_file(path, rng, n=800):
    """A LAS file in EPSG:4326 (degrees, 1e-7 scale) around Portland, Oregon."""
    h = laspy.LasHeader(point_format=1, version="1.2")
    h.scales, h.offsets = [1e-7, 1e-7, 0.01], [-123.0, 45.0, 0.0]
    h.vlrs.append(WktCoordinateSystemVlr(pyproj.CRS("EPSG:4326").to_wkt("WKT1_GDAL")))
    las = laspy.LasData(h)
    las.x = -122.7 + rng.uniform(0, 0.01, n)
    las.y = 45.5 + rng.uniform(0, 0.01, n)
    las.z = rng.uniform(0, 50, n)
    las.gps_time = rng.uniform(0, 1e5, n)
    las.write(str(path))
    return path


UTM10 = pyproj.CRS("EPSG:32610").to_wkt("WKT1_GDAL")


def utm_file(path, rng, n=600, wkt=UTM10):
    h = laspy.LasHeader(point_format=1, version="1.2")
    h.scales, h.offsets = [0.01, 0.01, 0.01], [520000.0, 5030000.0, 0.0]
    if wkt:
        h.vlrs.append(WktCoordinateSystemVlr(wkt))
    las = laspy.LasData(h)
    las.x = 525000 + rng.uniform(0, 800, n)
    las.y = 5038000 + rng.uniform(0, 800, n)
    las.z = rng.uniform(0, 50, n)
    las.gps_time = rng.uniform(0, 1e5, n)
    las.write(str(path))
    return path


def test_autzen_reprojected_to_utm_is_pyprojs_transform(tmp_path):
    """Oregon Lambert (international feet, a WKT VLR) -> UTM 10N: the stored positions are pyproj's, bit for bit."""
    f = DATA / "autzen_trim.laz"
    rep = zv_dask.ingest(str(f), tmp_path / "u.zv", chunk_shape=500, reproject="EPSG:32610")
    assert rep.crs == {"epsg": 32610} and rep.dtype == "float64"
    assert zv_dask.store_info(tmp_path / "u.zv")["crs"] == {"epsg": 32610}
    np.testing.assert_array_equal(sorted_rows(positions(tmp_path / "u.zv")), sorted_rows(transformed(f, "EPSG:32610")))
    las = zv_dask.store_info(tmp_path / "u.zv")["las"]
    # 0.01 ft carried to metres is 0.003 m: rounded down to 0.001; no offsets (the files' integers are gone)
    assert las["scales"][:2] == [0.001, 0.001] and las["offsets"] is None
    assert las["reprojected"]["to"] == "EPSG:32610" and "Lambert" in las["reprojected"]["from"][0]
    assert reference_validate(tmp_path / "u.zv") == []
    # an export writes the new CRS and LAS integers at the carried-over scale, every dimension kept
    s = zv_dask.export(tmp_path / "u.zv", tmp_path / "u.las")
    out = laspy.read(str(tmp_path / "u.las"))
    assert out.header.parse_crs().to_epsg() == 32610 and s["crs_written"].startswith("GeoKeyDirectory VLR")
    assert out.header.scales.tolist()[:2] == [0.001, 0.001] and any("reprojected" in n for n in s["notes"])
    # the integers are pyproj's positions rounded to the new grid
    want = np.round((transformed(f, "EPSG:32610") - out.header.offsets) / out.header.scales).astype(np.int64)
    got = np.column_stack([np.asarray(out.X), np.asarray(out.Y), np.asarray(out.Z)]).astype(np.int64)
    np.testing.assert_array_equal(sorted_rows(got), sorted_rows(want))
    src = laspy.read(str(f))
    for d in ("intensity", "classification", "gps_time", "red", "point_source_id"):
        np.testing.assert_array_equal(np.sort(np.asarray(out[d])), np.sort(np.asarray(src[d])), err_msg=d)


def test_files_in_different_crs_become_one_job_when_reprojected(tmp_path, rng):
    a, b = lonlat_file(tmp_path / "a.las", rng), utm_file(tmp_path / "b.las", rng)
    with pytest.raises(InputError, match="different coordinate systems"):
        zv_dask.ingest([str(a), str(b)], tmp_path / "x.zv", chunk_shape=500)
    rep = zv_dask.ingest([str(a), str(b)], tmp_path / "ab.zv", chunk_shape=500, reproject="EPSG:32610")
    assert rep.points_written == 1400
    want = np.concatenate([transformed(a, "EPSG:32610"), transformed(b, "EPSG:32610")])
    np.testing.assert_array_equal(sorted_rows(positions(tmp_path / "ab.zv")), sorted_rows(want))
    # b is already in the target: its points are not touched at all (exact LAS values)
    lb = laspy.read(str(b))
    got = positions(tmp_path / "ab.zv")
    assert np.isin(np.asarray(lb.x), got[:, 0]).all()
    # degrees out: the finest of a's 1e-7 degrees and b's 0.01 m (9e-8 degrees, rounded down to 1e-8)
    zv_dask.ingest([str(a), str(b)], tmp_path / "deg.zv", chunk_shape=0.01, reproject="EPSG:4326")
    las = zv_dask.store_info(tmp_path / "deg.zv")["las"]
    assert las["scales"][:2] == [1e-8, 1e-8]
    assert reference_validate(tmp_path / "deg.zv") == []


def test_reprojection_needs_a_source_crs_and_pyproj_must_know_the_target(tmp_path, rng):
    a = utm_file(tmp_path / "nocrs.las", rng, wkt=None)
    with pytest.raises(InputError, match=r"reproject needs the points' own CRS.*nocrs.las.*crs=\.\.\."):
        zv_dask.ingest(str(a), tmp_path / "x.zv", chunk_shape=500, reproject="EPSG:4326")
    with pytest.raises(InputError, match=r"reproject EPSG:999999 is not a CRS pyproj knows"):
        zv_dask.ingest(str(a), tmp_path / "x.zv", chunk_shape=500, crs="EPSG:32610", reproject="EPSG:999999")
    assert not (tmp_path / "x.zv").exists()
    # crs= says what the file is in; then it transforms
    zv_dask.ingest(str(a), tmp_path / "ok.zv", chunk_shape=0.01, crs="EPSG:32610", reproject="EPSG:4326")
    np.testing.assert_array_equal(sorted_rows(positions(tmp_path / "ok.zv")),
                                  sorted_rows(transformed(a, "EPSG:4326", src="EPSG:32610")))


def test_arrays_reproject_in_float64_and_bad_points_are_named(tmp_path, rng):
    lonlat = np.column_stack([rng.uniform(-10, 10, 3000), rng.uniform(40, 60, 3000)]).astype(np.float32)
    with pytest.raises(InputError, match="reproject needs the points' own CRS, and the input declares none"):
        zv_dask.ingest(lonlat, tmp_path / "x.zv", chunk_shape=1e5, reproject="EPSG:3857")
    rep = zv_dask.ingest(lonlat, tmp_path / "m.zv", chunk_shape=1e5, crs="EPSG:4326", reproject="EPSG:3857")
    assert rep.dtype == "float64" and rep.crs == {"epsg": 3857}  # metres of web mercator would lose a metre in float32
    t = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    want = np.column_stack(t.transform(lonlat[:, 0].astype(np.float64), lonlat[:, 1].astype(np.float64)))
    df = zv_dask.read_points(tmp_path / "m.zv").compute()
    np.testing.assert_array_equal(sorted_rows(df[["x", "y"]].to_numpy()), sorted_rows(want))
    bad = lonlat.astype(np.float64).copy()
    bad[7] = [10.0, 95.0]  # latitude 95: nowhere
    with pytest.raises(InputError, match=r"1 of 3,000 points do not transform from EPSG:4326 to EPSG:3857, "
                                         r"e\.g\. \[10\.0, 95\.0\]"):
        zv_dask.ingest(bad, tmp_path / "b.zv", chunk_shape=1e5, crs="EPSG:4326", reproject="EPSG:3857")
    assert not (tmp_path / "b.zv").exists()
    with pytest.raises(InputError, match="reproject transforms 2-D or 3-D positions"):
        zv_dask.ingest(rng.uniform(0, 1, (10, 4)), tmp_path / "d.zv", crs="EPSG:4326", reproject="EPSG:3857")


def test_cli_reproject(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    f = DATA / "simple.laz"
    p = subprocess.run([str(BIN), "ingest", str(f), str(tmp_path / "s.zv"), "--chunk-shape", "100", "--no-pyramid",
                        "--reproject", "EPSG:4326"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "--crs CRS" in p.stderr and "crs=" not in p.stderr, p.stderr  # simple.laz has no CRS
    p = subprocess.run([str(BIN), "ingest", str(f), str(tmp_path / "s.zv"), "--chunk-shape", "100", "--no-pyramid",
                        "--crs", "EPSG:2994", "--reproject", "EPSG:32610"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert "EPSG:32610" in p.stdout
    info = subprocess.run([str(BIN), "info", str(tmp_path / "s.zv")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert "reprojected to EPSG:32610 (offsets chosen at export)" in info.stdout, info.stdout
    np.testing.assert_array_equal(sorted_rows(positions(tmp_path / "s.zv")),
                                  sorted_rows(transformed(f, "EPSG:32610", src="EPSG:2994")))
