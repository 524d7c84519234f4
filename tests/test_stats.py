"""``store_stats`` and ``zv-dask info --stats``: every number checked against numpy on the same points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import zarr

import zv_dask
from zv_dask.errors import InputError
from zv_dask.stats import MAX_VALUES, _combine, _partial, format_stats, store_stats

BIN = Path(sys.executable).parent / "zv-dask"
N = 6000
CHUNK = (50.0, 50.0, 50.0)


def run(*commands, timeout=120):
    """Run CLI commands (each a tuple of arguments) side by side; their CompletedProcesses (text mode)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen([str(BIN)] + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for args in commands]
    out = []
    for args, p in zip(commands, procs):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(args, p.returncode, stdout, stderr))
    return out


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _cloud(n=N, seed=7):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 100, (n, 3)).astype(np.float32)
    intensity = rng.normal(100, 15, n).astype(np.float32)
    intensity[rng.choice(n, 37, replace=False)] = np.nan
    attrs = {"intensity": intensity,
             "gene": rng.choice(np.array([-4, 3, 17, 250], np.int16), n),
             "classification": rng.choice(np.array([1, 2, 6, 9], np.uint8), n, p=[0.5, 0.3, 0.15, 0.05]),
             "rgb": rng.integers(0, 256, (n, 3)).astype(np.uint8)}
    return pts, attrs, rng.integers(0, 40, n)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 3-level store (float attribute with NaN, int16, classification, rgb x3, object ids), its input and stats."""
    pts, attrs, oids = _cloud()
    path = tmp_path_factory.mktemp("stats") / "s.zv"
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(pts, path, attributes=attrs, object_ids=oids, chunk_shape=CHUNK, base_bin_shape=(5.0,) * 3,
                       pyramid={"levels": 2, "min_points": 1})
        root = zarr.open_group(str(path), mode="r+")  # a CRS, as a georeferenced ingest writes it
        root.attrs["zarr_vectors"] = {**root.attrs["zarr_vectors"], "crs": {"epsg": 32633}}
        stats = store_stats(path)
    return path, pts, attrs, oids, stats


def _columns(pts, attrs) -> dict[str, np.ndarray]:
    cols = {a: pts[:, i] for i, a in enumerate("xyz")}
    for name, v in attrs.items():
        if v.ndim == 1:
            cols[name] = v
        else:
            cols.update({f"{name}_{i}": v[:, i] for i in range(v.shape[1])})
    return cols


def _check_level(entry: dict, cols: dict[str, np.ndarray]) -> None:
    """A level's entry equals numpy's reductions of its columns."""
    assert entry["points"] == len(cols["x"])
    got = {**entry["positions"], **entry["attributes"]}
    assert sorted(got) == sorted(cols)
    assert list(entry["positions"]) == ["x", "y", "z"]
    for c, v in cols.items():
        e = got[c]
        assert e["dtype"] == str(v.dtype), c
        if v.dtype.kind == "f":
            bad = np.isnan(v)
            assert e["nan"] == int(bad.sum()), c
            v = v[~bad]
        else:
            assert "nan" not in e
        assert e["count"] == len(v), c
        assert e["min"] == v.min().item() and e["max"] == v.max().item(), c
        assert isinstance(e["mean"], float)
        assert e["mean"] == pytest.approx(float(np.mean(v, dtype=np.float64)), rel=1e-9), c
        if v.dtype.kind in "iu":
            values, counts = np.unique(v, return_counts=True)
            want = {str(int(k)): int(n) for k, n in zip(values, counts)}
            assert e["values"] == (want if len(values) <= MAX_VALUES or c == "classification" else None), c
        else:
            assert "values" not in e


def test_level0_equals_numpy_on_the_input(built):
    path, pts, attrs, oids, stats = built
    lv0 = stats["levels"][0]
    assert lv0["level"] == 0
    _check_level(lv0, _columns(pts, attrs))
    values, counts = np.unique(attrs["classification"], return_counts=True)
    assert lv0["attributes"]["classification"]["values"] == {str(v): int(n) for v, n in zip(values, counts)}
    assert lv0["attributes"]["intensity"]["nan"] == 37
    assert lv0["objects"] == len(np.unique(oids))
    assert stats["crs"] == {"epsg": 32633}
    assert stats["las"] is None


def test_coarse_levels_equal_numpy_on_read_points(built):
    path, _, _, _, stats = built
    assert [lv["level"] for lv in stats["levels"]] == [0, 1, 2]
    for lv in stats["levels"][1:]:
        df = zv_dask.read_points(path, level=lv["level"]).compute()
        _check_level(lv, {c: df[c].to_numpy() for c in df.columns if c != "object_id"})
        assert lv["objects"] == df["object_id"].nunique()
        assert lv["points"] < N


def test_bytes_on_disk_are_the_files_of_each_level(built):
    path, *_, stats = built
    assert stats["bytes_source"] == "files" and stats["note"] is None
    for lv in stats["levels"]:
        assert lv["bytes_on_disk"] == _dir_bytes(path / str(lv["level"])) > 0
    assert stats["bytes_on_disk"] == _dir_bytes(path)


def test_levels_pick_and_json(built):
    path, *_, stats = built
    one = store_stats(path, levels=[1])
    assert one["levels"] == [stats["levels"][1]]
    assert json.loads(json.dumps(stats, allow_nan=False)) == stats  # JSON-ready as it is
    with pytest.raises(InputError, match=r"levels \[7\].*\[0, 1, 2\]"):
        store_stats(path, levels=[0, 7])
    text = format_stats(stats)
    share = stats["levels"][0]["attributes"]["classification"]["values"]["2"]
    assert f"class 2: {share:,} ({100 * share / N:.1f}%)" in text
    assert "EPSG:32633" in text and "37 NaN" in text


def test_partition_summaries_combine_to_the_whole():
    """The reduction is exact across partitions: empty, all-NaN, and past the distinct-value limit."""
    rng = np.random.default_rng(3)
    n = 3000
    df = pd.DataFrame({"f": rng.normal(size=n), "wide": np.arange(n, dtype=np.int32),
                       "classification": rng.integers(0, 1000, n).astype(np.int16),
                       "b": rng.random(n) < 0.3, "object_id": rng.integers(0, 500, n),
                       "far": rng.choice(np.array([-10**12, 5, 10**12]), n), "spread": np.arange(n) * 10**6})
    df.loc[:999, "f"] = np.nan  # the first partition's floats are all NaN
    cols = {"f": (False, MAX_VALUES), "wide": (True, MAX_VALUES), "classification": (True, None),
            "b": (True, MAX_VALUES), "far": (True, MAX_VALUES), "spread": (True, MAX_VALUES)}
    parts = [df.iloc[:1000], df.iloc[1000:1000], df.iloc[1000:2000], df.iloc[2000:]]
    whole = _combine([_partial(p, cols) for p in parts], cols)
    assert whole["rows"] == n
    f = whole["columns"]["f"]
    assert (f["n"], f["nan"]) == (2000, 1000)
    assert f["min"] == df["f"].min() and f["max"] == df["f"].max()
    assert f["mean"] == pytest.approx(df["f"].mean(), rel=1e-12)
    assert whole["columns"]["wide"]["values"] is None  # 3000 distinct values: no counts
    assert whole["columns"]["wide"]["mean"] == pytest.approx((n - 1) / 2)
    v, c = whole["columns"]["classification"]["values"]  # always counted
    want = df["classification"].value_counts().sort_index()
    assert v.tolist() == want.index.tolist() and c.tolist() == want.tolist()
    v, c = whole["columns"]["b"]["values"]
    assert dict(zip(v.tolist(), c.tolist())) == {0: int((~df["b"]).sum()), 1: int(df["b"].sum())}
    v, c = whole["columns"]["far"]["values"]  # few values over a wide range
    assert dict(zip(v.tolist(), c.tolist())) == df["far"].value_counts().to_dict()
    assert whole["columns"]["spread"]["values"] is None
    assert np.array_equal(whole["objects"], np.unique(df["object_id"]))


def _write_las(path, xyz, intensity):
    import laspy

    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales = [0.01, 0.01, 0.01]
    header.offsets = np.floor(xyz.min(axis=0))
    las = laspy.LasData(header)
    las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    las.intensity = intensity
    las.classification = (intensity % 7).astype(np.uint8)
    las.red, las.green, las.blue = intensity, intensity // 2, intensity // 3
    las.write(str(path))


def test_las_classification_counts(tmp_path):
    rng = np.random.default_rng(11)
    n = 3000
    xyz = np.round(rng.uniform(0, 200, (n, 3)) + [4.5e5, 5.2e6, 100.0], 2)
    inten = rng.integers(0, 60000, n).astype(np.uint16)
    _write_las(tmp_path / "tile.las", xyz, inten)
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(tmp_path / "tile.las", tmp_path / "las.zv", chunk_shape=(100.0, 100.0, 100.0))
        stats = store_stats(tmp_path / "las.zv")
    lv0 = stats["levels"][0]
    values, counts = np.unique(inten % 7, return_counts=True)
    assert lv0["attributes"]["classification"]["values"] == {str(v): int(n) for v, n in zip(values, counts)}
    assert lv0["positions"]["x"]["min"] == pytest.approx(xyz[:, 0].min(), abs=1e-6)
    assert lv0["positions"]["z"]["max"] == pytest.approx(xyz[:, 2].max(), abs=1e-6)
    assert lv0["attributes"]["intensity"]["max"] == int(inten.max())
    las = (zv_dask.open_store(tmp_path / "las.zv").root.attrs.get("zv_dask") or {}).get("las")
    assert stats["las"] == las  # the LAS header record, passed through when the ingest wrote one


def test_cli_info_stats(built):
    path, pts, attrs, oids, stats = built
    human, as_json = run(("info", path, "--stats"), ("info", path, "--stats", "--json", "-q", "--levels", "0,2"))
    proc = ok(human)
    assert "\r" not in proc.stderr and "stats of 3 levels" in proc.stderr  # progress: lines, not bar frames
    text = proc.stdout
    assert text.startswith("ZV store ") and "statistics (levels 0, 1, 2)" in text
    for k, n in stats["levels"][0]["attributes"]["classification"]["values"].items():
        assert f"class {k}: {n:,} ({100 * n / N:.1f}%)" in text
    assert f"{N:,} points, {len(np.unique(oids))} objects" in text
    assert "37 NaN" in text and "total " in text
    proc = ok(as_json)
    assert proc.stderr == ""
    out = json.loads(proc.stdout)
    assert out["levels"][0]["vertex_count"] == N  # what info --json prints, with the stats next to it
    assert out["stats"]["levels"] == [stats["levels"][0], stats["levels"][2]]
    assert out["stats"]["crs"] == {"epsg": 32633}
    assert out["stats"]["bytes_on_disk"] == stats["bytes_on_disk"]


def test_icechunk_bytes_come_from_the_snapshot(tmp_path):
    pts, attrs, oids = _cloud(2000)
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(pts, tmp_path / "repo", attributes={"intensity": attrs["intensity"]}, chunk_shape=CHUNK,
                       backend="icechunk")
        stats = store_stats(tmp_path / "repo", backend="icechunk")
    lv0 = stats["levels"][0]
    assert lv0["points"] == 2000 and lv0["attributes"]["intensity"]["nan"] == int(np.isnan(attrs["intensity"]).sum())
    assert stats["bytes_source"] == "icechunk" and "snapshot" in stats["note"]
    assert 0 < lv0["bytes_on_disk"] <= stats["bytes_on_disk"] <= _dir_bytes(tmp_path / "repo")


@pytest.mark.s3
def test_s3_bytes_come_from_the_listing(s3_server, s3_prefix, s3_options):
    import obstore

    pts, attrs, oids = _cloud(3000)
    url = s3_server.url(s3_prefix, "s.zv")
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(pts, url, attributes={"classification": attrs["classification"]}, chunk_shape=CHUNK,
                       storage_options=s3_options, pyramid={"levels": 1, "min_points": 1})
        stats = store_stats(url, storage_options=s3_options)
    sizes = {m["path"]: m["size"] for m in obstore.list(s3_server.obstore(), prefix=f"{s3_prefix}/s.zv").collect()}
    assert stats["bytes_source"] == "listing"
    assert stats["bytes_on_disk"] == sum(sizes.values())
    for lv in stats["levels"]:
        want = sum(n for k, n in sizes.items() if k.startswith(f"{s3_prefix}/s.zv/{lv['level']}/"))
        assert lv["bytes_on_disk"] == want > 0
    values, counts = np.unique(attrs["classification"], return_counts=True)
    assert stats["levels"][0]["attributes"]["classification"]["values"] == {str(v): int(n)
                                                                            for v, n in zip(values, counts)}
