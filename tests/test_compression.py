"""``compression=``: zarr's own codecs after vlen-bytes on every array, read and validated by the reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr
import zarr_vectors
from helpers import canon, reference_validate

import zv_dask
from zv_dask.errors import InputError
from zv_dask.format.codecs import COMPRESSIONS, check_compression, compressors_for
from zv_dask.local import read_points
from zv_dask.store.levels import write_cells

N = 20_000


@pytest.fixture(autouse=True)
def _sync():
    with dask.config.set(scheduler="sync"):
        yield


def _points(n=N, seed=0):
    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, 100, (n, 3)).round(2).astype(np.float32)  # centimetre grid: compressible like real data
    attrs = {"intensity": rng.integers(0, 200, n).astype(np.uint16)}
    return pts, attrs, rng.integers(0, 40, n)


def _ingest(path, compression, **kw):
    pts, attrs, oid = _points()
    zv_dask.ingest(pts, str(path), attributes=attrs, object_ids=oid, chunk_shape=(50, 50, 50),
                   compression=compression, pyramid={"levels": 2, "links": "explicit"}, **kw)
    return pts, attrs, oid


def _array_docs(path: Path) -> dict[str, dict]:
    out = {}
    for zj in path.rglob("zarr.json"):
        doc = json.loads(zj.read_text())
        if doc.get("node_type") == "array":
            out[str(zj.parent.relative_to(path))] = doc
    return out


def _cell_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and "/c/" in f.as_posix())


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("plain") / "none.zv"
    with dask.config.set(scheduler="sync"):
        _ingest(path, "none")
    return path


@pytest.mark.parametrize("compression", ["zstd", "blosc"])
def test_compressed_store_is_valid_and_reads_the_same(tmp_path, compression, plain_store):
    path = tmp_path / f"{compression}.zv"
    pts, attrs, _ = _ingest(path, compression)
    reference_validate(path)
    ds = zarr_vectors.open(str(path))
    assert ds.levels == (0, 1, 2)
    for k in ds.levels:
        res = ds.level(k).read()
        mine = read_points(str(path), level=k)
        theirs = read_points(str(plain_store), level=k)
        want = canon(mine["positions"], mine["attributes"]["intensity"])
        assert np.array_equal(canon(res.positions, res.attributes["intensity"]), want)
        assert np.array_equal(canon(theirs["positions"], theirs["attributes"]["intensity"]), want)
    assert np.array_equal(canon(read_points(str(path))["positions"]), canon(pts))
    # every array has the codec: cells, links, object index
    docs = _array_docs(path)
    assert any("/links/" in p for p in docs) and any("object_index" in p for p in docs)
    for p, doc in docs.items():
        names = [c["name"] for c in doc["codecs"]]
        assert names[-1] == compression, (p, names)
    assert _cell_bytes(path) < 0.75 * _cell_bytes(plain_store)
    info = zv_dask.store_info(str(path))
    assert {lv["compression"]["name"] for lv in info["levels"]} == {compression}
    assert zv_dask.store_info(str(plain_store))["levels"][0]["compression"] == {"name": "none", "level": None}


def test_none_is_plain_vlen_bytes(plain_store):
    for p, doc in _array_docs(plain_store).items():
        if "object_index" not in p:
            assert doc["codecs"] == [{"name": "vlen-bytes", "configuration": {}}], p


def test_default_is_zstd_level_3(tmp_path):
    """No compression asked: zstd 3 on every array the job makes, and the reference validates the store."""
    path = tmp_path / "default.zv"
    with dask.config.set(scheduler="sync"):
        _ingest(path, None)
    docs = _array_docs(path)
    assert any("/links/" in p for p in docs) and any("object_index" in p for p in docs)
    for p, doc in docs.items():
        assert doc["codecs"][-1] == {"name": "zstd", "configuration": {"level": 3, "checksum": False}}, p
    assert reference_validate(path) == []


def test_direct_zstd_cells_are_zarrs_bytes(tmp_path):
    """The direct path's cell objects are byte for byte what zarr's own pipeline writes."""
    root = zarr.open_group(str(tmp_path / "s"), mode="w", zarr_format=3)
    payloads = [bytes(range(256)) * 40, b"\x01\x02\x03" * 1000, b"x"]
    for level in (0, 3, 9):
        for name in ("direct", "zarr"):
            root.create_array(f"{name}{level}", shape=(2, 2), chunks=(1, 1), dtype="bytes", fill_value=b"",
                              compressors=compressors_for("zstd", level))
        cells = np.array([[0, 0], [0, 1], [1, 1]])
        write_cells(root.store, [(f"direct{level}", cells, payloads)])
        arr = root[f"zarr{level}"]
        sel = np.empty(3, dtype=object)
        sel[:] = payloads
        arr.set_coordinate_selection(tuple(cells.T), sel)
        for c in ("0/0", "0/1", "1/1"):
            a = (tmp_path / "s" / f"direct{level}" / "c" / c).read_bytes()
            b = (tmp_path / "s" / f"zarr{level}" / "c" / c).read_bytes()
            assert a == b
        assert list(root[f"direct{level}"].get_coordinate_selection(tuple(cells.T))) == payloads


def test_append_into_compressed_store(tmp_path):
    pts, attrs, oid = _points(8000, seed=1)
    half = len(pts) // 2
    a = tmp_path / "append.zv"
    b = tmp_path / "whole.zv"
    kw = dict(chunk_shape=(50, 50, 50), bounds=([0, 0, 0], [100, 100, 100]), compression="zstd",
              pyramid={"levels": 1})
    zv_dask.ingest(pts[:half], str(a), attributes={k: v[:half] for k, v in attrs.items()}, object_ids=oid[:half],
                   **kw)
    zv_dask.ingest(pts[half:], str(a), attributes={k: v[half:] for k, v in attrs.items()}, object_ids=oid[half:],
                   mode="append")
    zv_dask.ingest(pts, str(b), attributes=attrs, object_ids=oid, **kw)
    reference_validate(a)
    for k in (0, 1):
        got, want = read_points(str(a), level=k), read_points(str(b), level=k)
        assert np.array_equal(canon(got["positions"]), canon(want["positions"]))
    assert np.array_equal(canon(read_points(str(a))["positions"]), canon(pts))
    for p, doc in _array_docs(a).items():
        assert doc["codecs"][-1]["name"] == "zstd", p
    with pytest.raises(InputError, match="compression is the store's"):
        zv_dask.ingest(pts[:10], str(a), mode="append", compression="zstd", attributes={k: v[:10] for k, v in
                                                                                         attrs.items()},
                       object_ids=oid[:10])


def test_build_pyramid_follows_level0_or_the_option(tmp_path):
    pts, attrs, oid = _points(6000, seed=2)
    path = tmp_path / "w.zv"
    zv_dask.local.write_points(str(path), pts, attributes=attrs, object_ids=oid, chunk_shape=(50, 50, 50),
                               compression="blosc", compression_level=3)
    zv_dask.build_pyramid(str(path), levels=2, links="explicit")
    docs = _array_docs(path)
    assert any(p.startswith("2/") for p in docs)
    for p, doc in docs.items():
        assert doc["codecs"][-1] == {"name": "blosc", "configuration": {
            "typesize": 1, "cname": "zstd", "clevel": 3, "shuffle": "noshuffle", "blocksize": 0}}, p
    reference_validate(path)
    # an explicit choice wins over level 0's for the new arrays
    zv_dask.build_pyramid(str(path), levels=1, compression="zstd", compression_level=5)
    assert _array_docs(path)["1/vertices"]["codecs"][-1] == {"name": "zstd",
                                                             "configuration": {"level": 5, "checksum": False}}
    assert _array_docs(path)["0/vertices"]["codecs"][-1]["name"] == "blosc"
    reference_validate(path)
    for k in (0, 1):
        assert len(zarr_vectors.open(str(path)).level(k).read().positions) == len(read_points(str(path),
                                                                                             level=k)["positions"])


@pytest.mark.parametrize("bad, match", [
    (dict(compression="lz4"), "compression 'lz4' is not one of none, zstd, blosc"),
    (dict(compression="zstd", compression_level=99), "must be an integer from -7 to 22"),
    (dict(compression="blosc", compression_level=10), "from 0 to 9"),
    (dict(compression="none", compression_level=3), "needs a compression"),
])
def test_bad_compression_is_a_clear_error(tmp_path, bad, match):
    with pytest.raises(InputError, match=match):
        zv_dask.ingest(np.zeros((10, 3)), str(tmp_path / "x.zv"), **bad)
    assert not (tmp_path / "x.zv").exists()
    with pytest.raises(InputError, match=match):
        zv_dask.build_pyramid(str(tmp_path / "x.zv"), **bad)


def test_option_definition():
    assert COMPRESSIONS == ("none", "zstd", "blosc")
    assert check_compression(None) == ("zstd", 3) and check_compression("none") == ("none", None)
    assert compressors_for("none") is None and [c.to_dict()["name"] for c in compressors_for(None)] == ["zstd"]
    assert check_compression("ZSTD") == ("zstd", 3)
    assert check_compression("blosc") == ("blosc", 5)


def test_cli_compression(tmp_path, capfd):
    from zv_dask.cli import main

    pts, _, _ = _points(3000, seed=3)
    src = tmp_path / "p.npy"
    np.save(src, pts)
    store = tmp_path / "cli.zv"
    assert main(["ingest", str(src), str(store), "--chunk-shape", "50", "--compression", "zstd",
                 "--compression-level", "7", "--levels", "1", "-q"]) == 0
    assert _array_docs(store)["1/vertices"]["codecs"][-1] == {"name": "zstd",
                                                              "configuration": {"level": 7, "checksum": False}}
    reference_validate(store)
    capfd.readouterr()
    assert main(["info", str(store)]) == 0
    assert "compression  zstd level 7" in capfd.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["ingest", str(src), str(tmp_path / "bad.zv"), "--compression", "lz4"])
    assert e.value.code == 2
    assert "invalid choice: 'lz4'" in capfd.readouterr().err
    assert main(["ingest", str(src), str(tmp_path / "bad.zv"), "--compression", "zstd",
                 "--compression-level", "40", "-q"]) == 2
    assert "must be an integer from -7 to 22" in capfd.readouterr().err
    assert not os.path.exists(tmp_path / "bad.zv")
