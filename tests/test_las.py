"""LAS/LAZ fidelity: every dimension of every point format, the header record and the CRS, on real files."""

from __future__ import annotations

from pathlib import Path

import dask
import laspy
import numpy as np
import pytest
from helpers import WKT, fill_las_dimensions, reference_validate
from laspy.vlrs.known import GeoKeyDirectoryVlr, WktCoordinateSystemVlr

import zv_dask
from zv_dask.errors import InputError

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _in_process():
    with dask.config.set(scheduler="sync"):
        yield


def write_las(path, fmt, rng, n=1500, wkt=WKT, extra=True, version=None):
    """A file of point format ``fmt`` with every dimension set to varied values (and two extra-bytes dims)."""
    h = laspy.LasHeader(point_format=fmt, version=version or ("1.4" if fmt >= 6 else "1.2"))
    h.scales = [0.001, 0.001, 0.001]
    h.offsets = [500000.0, 4000000.0, 0.0]
    if extra:
        h.add_extra_dims([laspy.ExtraBytesParams("height", "f4"), laspy.ExtraBytesParams("triple", "3u2")])
    if wkt:
        h.vlrs.append(WktCoordinateSystemVlr(wkt))
    las = laspy.LasData(h)
    las.x = 500000 + rng.uniform(0, 900, n)
    las.y = 4000000 + rng.uniform(0, 900, n)
    las.z = rng.uniform(-5, 95, n)
    fill_las_dimensions(las, rng, n)
    las.write(str(path))
    return path


def expected_columns(path) -> dict[str, np.ndarray]:
    """What read_points should return for a LAS file: positions and every dimension, by read_points' names."""
    las = laspy.read(str(path))
    cols = {"x": np.asarray(las.x, np.float64), "y": np.asarray(las.y, np.float64), "z": np.asarray(las.z, np.float64)}
    names = list(las.point_format.dimension_names)
    for d in las.point_format.dimensions:
        if d.name in ("X", "Y", "Z"):
            continue
        if d.name in ("red", "green", "blue") and {"red", "green", "blue"} <= set(names):
            cols[f"rgb_{('red', 'green', 'blue').index(d.name)}"] = np.asarray(las[d.name])
            continue
        v = np.asarray(las[d.name])
        if v.ndim == 2:
            for i in range(v.shape[1]):
                cols[f"{d.name}_{i}"] = v[:, i]
        else:
            cols[d.name] = v
    return cols


def assert_same_points(store, files):
    df = zv_dask.read_points(store).compute()
    want: dict[str, list] = {}
    for f in files:
        for k, v in expected_columns(f).items():
            want.setdefault(k, []).append(v)
    want = {k: np.concatenate(v) for k, v in want.items()}
    assert sorted(df.columns) == sorted(want), (sorted(df.columns), sorted(want))
    keys = sorted(want)
    got_order = np.lexsort([df[k].to_numpy() for k in keys])
    want_order = np.lexsort([want[k] for k in keys])
    for k in keys:
        got = df[k].to_numpy()[got_order]
        assert got.dtype == want[k].dtype or (want[k].dtype.kind == "b" and got.dtype == np.uint8), (k, got.dtype)
        np.testing.assert_array_equal(got, want[k][want_order].astype(got.dtype), err_msg=k)


@pytest.mark.parametrize("fmt", [0, 1, 2, 3, 6, 7, 8])
def test_every_dimension_of_every_point_format_round_trips(tmp_path, rng, fmt):
    f = write_las(tmp_path / f"f{fmt}.las", fmt, rng)
    rep = zv_dask.ingest(str(f), tmp_path / "s.zv", chunk_shape=300)
    assert rep.dtype == "float64"
    assert_same_points(tmp_path / "s.zv", [f])
    info = zv_dask.store_info(tmp_path / "s.zv")
    las = info["las"]
    header = laspy.open(str(f)).header
    assert (las["point_format"], las["version"]) == (fmt, f"{header.version.major}.{header.version.minor}")
    assert las["scales"] == list(header.scales) and las["offsets"] == list(header.offsets)
    assert las["extra_bytes"] == [{"name": "height", "dtype": "float32", "channels": None, "description": ""},
                                  {"name": "triple", "dtype": "uint16", "channels": 3, "description": ""}]
    assert info["crs"] == {"wkt": WKT}
    # the stored positions give back the file's integers exactly
    df = zv_dask.read_points(tmp_path / "s.zv", attributes=[]).compute()
    xi = np.sort(np.round((df["x"].to_numpy() - las["offsets"][0]) / las["scales"][0]).astype(np.int64))
    np.testing.assert_array_equal(xi, np.sort(np.asarray(laspy.read(str(f)).X, np.int64)))
    assert reference_validate(tmp_path / "s.zv") == []


@pytest.mark.parametrize("name", ["simple.laz", "autzen_geo_proj.las", "test1_4.las", "1_4_w_evlr.laz",
                                  "extrabytes.las"])
def test_laspys_own_files_round_trip_with_their_crs(tmp_path, name):
    f = DATA / name
    zv_dask.ingest(str(f), tmp_path / "s.zv", chunk_shape=500)
    assert_same_points(tmp_path / "s.zv", [f])
    header = laspy.open(str(f)).header
    vlrs = list(header.vlrs) + list(header.evlrs or [])
    crs = zv_dask.store_info(tmp_path / "s.zv")["crs"]
    wkt = [v.string.strip("\0 \n") for v in vlrs if isinstance(v, WktCoordinateSystemVlr)]
    if wkt:
        assert crs == {"wkt": wkt[0]}
    elif any(isinstance(v, GeoKeyDirectoryVlr) for v in vlrs):
        assert crs == {"epsg": 2994}  # autzen_geo_proj.las: NAD83(HARN) / Oregon GIC Lambert (ft)
    else:
        assert crs is None
    assert reference_validate(tmp_path / "s.zv") == []


def test_the_issues_point_source_id_store_reads_back(tmp_path):
    """The store of the report: one dimension outside the old default set, in its own dtype."""
    zv_dask.ingest(str(DATA / "autzen_trim.laz"), tmp_path / "psid.zv", chunk_shape=200, base_bin_shape=25,
                   attributes=["point_source_id", "scan_angle_rank", "user_data"])
    info = zv_dask.store_info(tmp_path / "psid.zv")
    dtypes = {n: a["dtype"] for n, a in info["levels"][0]["attributes"].items()}
    assert dtypes == {"point_source_id": "uint16", "scan_angle_rank": "int8", "user_data": "uint8"}
    df = zv_dask.read_points(tmp_path / "psid.zv").compute()
    las = laspy.read(str(DATA / "autzen_trim.laz"))
    assert len(df) == len(las.points) == 110_000
    for n in dtypes:
        np.testing.assert_array_equal(np.sort(df[n].to_numpy()), np.sort(np.asarray(las[n])))
    assert zv_dask.validate_store(tmp_path / "psid.zv").ok


def test_files_of_one_job_must_agree_on_crs_and_dimensions(tmp_path, rng):
    a = write_las(tmp_path / "a.las", 3, rng)
    b = write_las(tmp_path / "b.las", 3, rng, wkt=None)
    c = write_las(tmp_path / "c.las", 7, rng)
    d = write_las(tmp_path / "d.las", 3, rng, extra=False)
    with pytest.raises(InputError, match=r"different coordinate systems \(WKT 'WGS 84 / UTM zone 10N': a.las; "
                                         r"no CRS: b.las\).*crs="):
        zv_dask.ingest([str(a), str(b)], tmp_path / "x.zv", chunk_shape=300)
    with pytest.raises(InputError, match=r"'a.las' \(point format 3\) and 'c.las' \(point format 7\).*"
                                         r"\['overlap', 'scan_angle', 'scan_angle_rank', 'scanner_channel'\]"):
        zv_dask.ingest([str(a), str(c)], tmp_path / "x.zv", chunk_shape=300)
    with pytest.raises(InputError, match=r"\['height', 'triple'\] are in one and not the other"):
        zv_dask.ingest([str(a), str(d)], tmp_path / "x.zv", chunk_shape=300)
    assert not (tmp_path / "x.zv").exists()
    # the explicit choices: a CRS that overrides the headers', the attributes both have
    rep = zv_dask.ingest([str(a), str(b)], tmp_path / "ab.zv", chunk_shape=300, crs="EPSG:32610")
    assert rep.crs == {"epsg": 32610} and zv_dask.store_info(tmp_path / "ab.zv")["crs"] == {"epsg": 32610}
    assert_same_points(tmp_path / "ab.zv", [a, b])
    zv_dask.ingest([str(a), str(d)], tmp_path / "ad.zv", chunk_shape=300, attributes=["intensity", "rgb"])
    assert sorted(zv_dask.store_info(tmp_path / "ad.zv")["levels"][0]["attributes"]) == ["intensity", "rgb"]
    with pytest.raises(InputError, match=r"has no dimension\(s\) \['red'\] \(colour is one attribute, 'rgb'\)"):
        zv_dask.ingest(str(a), tmp_path / "y.zv", chunk_shape=300, attributes=["red"])


def test_crs_of_other_inputs_and_append(tmp_path, rng):
    pts = rng.uniform(0, 100, (2000, 3))
    rep = zv_dask.ingest(pts, tmp_path / "n.zv", chunk_shape=50, crs="EPSG:4978")
    assert rep.crs == {"epsg": 4978} and zv_dask.open_store(tmp_path / "n.zv").metadata.crs == {"epsg": 4978}
    with pytest.raises(InputError, match="not a CRS"):
        zv_dask.ingest(pts, tmp_path / "m.zv", chunk_shape=50, crs="somewhere")
    a = write_las(tmp_path / "a.las", 1, rng, extra=False)
    b = write_las(tmp_path / "b.las", 1, rng, extra=False)
    c = write_las(tmp_path / "c.las", 1, rng, extra=False, wkt=WKT.replace("zone 10N", "zone 11N"))
    zv_dask.ingest(str(a), tmp_path / "l.zv", bounds=([500000, 4000000, -10], [501000, 4001000, 100]),
                   chunk_shape=250)
    with pytest.raises(InputError, match="cannot append: the new points are in WKT 'WGS 84 / UTM zone 11N' and the "
                                         "store in WKT 'WGS 84 / UTM zone 10N'"):
        zv_dask.ingest(str(c), tmp_path / "l.zv", mode="append")
    zv_dask.ingest(str(b), tmp_path / "l.zv", mode="append")
    assert [f["name"] for f in zv_dask.store_info(tmp_path / "l.zv")["las"]["files"]] == ["a.las", "b.las"]
    assert_same_points(tmp_path / "l.zv", [a, b])


def test_cut_files_are_input_errors_that_name_them(tmp_path, rng):
    """A LAS file cut short is refused before anything is read; a cut LAZ file when its points are: exit 2 both."""
    whole = write_las(tmp_path / "whole.las", 3, rng, n=2000).read_bytes()
    (tmp_path / "cut.las").write_bytes(whole[:-1000])
    with pytest.raises(InputError, match=r"cut\.las' is truncated: its header declares 2,000 points, the file ends "
                                         r"after 1,9\d\d of them"):
        zv_dask.ingest(str(tmp_path / "cut.las"), tmp_path / "a.zv", chunk_shape=300)
    laz = (DATA / "autzen_trim.laz").read_bytes()
    (tmp_path / "cut.laz").write_bytes(laz[: len(laz) // 2])
    with pytest.raises(InputError, match=r"cannot read points 0 to 110,000 of '.*cut\.laz' \(corrupt or truncated\?\)"):
        zv_dask.ingest(str(tmp_path / "cut.laz"), tmp_path / "b.zv", chunk_shape=500)
    assert not (tmp_path / "a.zv").exists() and not (tmp_path / "b.zv").exists()


def test_nan_in_a_float_dimension_is_counted_by_the_scan(tmp_path, rng):
    """The scan decodes only the positions and the float dimensions: a NaN in an extra-bytes float (and none in
    gps_time) is still counted and reported, and the values are stored as they are."""
    path = write_las(tmp_path / "n.las", 3, rng)
    las = laspy.read(str(path))
    height = np.asarray(las["height"]).copy()
    height[[3, 70, 700]] = np.nan
    las["height"] = height
    las.write(str(path))
    rep = zv_dask.ingest(str(path), tmp_path / "n.zv", chunk_shape=300)
    nan_lines = [w for w in rep.warnings if "NaN" in w]
    assert len(nan_lines) == 1 and "'height' holds 3 NaN" in nan_lines[0], rep.warnings
    got = zv_dask.read_points(tmp_path / "n.zv", attributes=["height"]).compute()
    assert int(got["height"].isna().sum()) == 3
