"""Conformance with the reference reader/validator, zarr-vectors 0.9.2, in both directions.

Stores written by ``zv_dask.local.write_points`` are opened, read and validated by
``zarr_vectors``; stores written by ``zarr_vectors`` are read by ``zv_dask``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.conftest import canon as _canon
from zv_dask import open_store, read_level_metadata, read_root_metadata, store_info
from zv_dask.local import read_points, write_points

zv = pytest.importorskip("zarr_vectors")
from zarr_vectors.types.points import read_points as ref_read_points  # noqa: E402
from zarr_vectors.types.points import write_points as ref_write_points  # noqa: E402
from zarr_vectors.validate import validate  # noqa: E402

ALLOWED_WARNING = "Point cloud but links array exists"


def canon(positions, *columns):
    """``tests.conftest.canon``, also for empty selections."""
    if len(positions) == 0:
        return np.zeros((0, np.asarray(positions).shape[1] + sum(
            int(np.prod(np.asarray(c).shape[1:])) for c in columns)))
    return _canon(positions, *columns)


@dataclass
class Case:
    name: str
    points: np.ndarray
    chunk_shape: tuple
    base_bin_shape: tuple | None = None
    attributes: dict = field(default_factory=dict)
    object_ids: np.ndarray | None = None
    dtype: str = "float32"
    bounds: tuple | None = None
    shard_shape: tuple | None = None


def _attrs(rng, n: int) -> dict:
    return {
        "intensity": rng.random(n).astype(np.float32),
        "rgb": rng.integers(0, 256, (n, 3)).astype(np.uint8),
        "label": rng.integers(-(2 ** 31), 2 ** 31 - 1, n).astype(np.int32),
        "normal": rng.normal(size=(n, 2)),
        "code": rng.integers(-300, 300, n).astype(np.int16),
    }


def _cases() -> list[Case]:
    rng = np.random.default_rng(20240917)
    n = 150
    cases = []
    for d in (2, 3, 4):
        pts = rng.uniform(-110, 95, (n, d))
        cs = 50.0 if d < 4 else 100.0
        cases.append(Case(f"d{d}", pts, (cs,) * d, (cs / 2,) * d, _attrs(rng, n)))
    pts = rng.uniform(-70, 130, (n, 3))
    cases.append(Case("d3_float64", pts * 1.000000001, (50.0,) * 3, (25.0,) * 3, _attrs(rng, n), dtype="float64"))
    cases.append(Case("d3_no_bins", pts, (40.0, 30.0, 60.0), None, {"rgb": _attrs(rng, n)["rgb"]}))
    cases.append(Case("d3_aniso_bins", pts, (40.0, 30.0, 60.0), (10.0, 30.0, 20.0), {"code": _attrs(rng, n)["code"]}))
    cases.append(Case("d3_objects", pts, (50.0,) * 3, None, _attrs(rng, n), rng.integers(0, 6, n)))
    sparse = np.array([-(2 ** 62), -17, 0, 3, 2 ** 33, 2 ** 62 + 5], np.int64)
    cases.append(Case("d3_objects_sparse", pts, (50.0,) * 3, None, {"label": _attrs(rng, n)["label"]},
                      rng.choice(sparse, n)))
    cases.append(Case("d2_objects", rng.uniform(-60, 60, (n, 2)), (25.0, 25.0), None, {}, rng.integers(100, 104, n)))
    cases.append(Case("d3_sharded", pts, (50.0,) * 3, (25.0,) * 3, _attrs(rng, n), shard_shape=(2, 2, 2)))
    cases.append(Case("d4_sharded_objects", rng.uniform(-40, 40, (n, 4)), (40.0,) * 4, None,
                      {"rgb": _attrs(rng, n)["rgb"]}, rng.integers(0, 4, n), shard_shape=(2, 2, 2, 2)))
    # points exactly on chunk edges, on the lower bound and on the upper bound
    edge = np.array(np.meshgrid(*[np.arange(-50.0, 100.1, 25.0)] * 3, indexing="ij")).reshape(3, -1).T
    cases.append(Case("d3_edges", edge, (50.0,) * 3, (25.0,) * 3, {"i": np.arange(len(edge), dtype=np.int32)},
                      bounds=([-50.0] * 3, [100.0] * 3)))
    return cases


CASES = _cases()
IDS = [c.name for c in CASES]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    base = tmp_path_factory.mktemp("conformance")
    out = {}
    for c in CASES:
        path = base / f"{c.name}.zarr"
        write_points(str(path), c.points, attributes=c.attributes or None, object_ids=c.object_ids,
                     chunk_shape=c.chunk_shape, base_bin_shape=c.base_bin_shape, dtype=c.dtype, bounds=c.bounds,
                     shard_shape=c.shard_shape)
        out[c.name] = str(path)
    return out


def _expected(c: Case, mask=None):
    pos = c.points.astype(c.dtype)
    cols = [c.attributes[k] for k in sorted(c.attributes)]
    if mask is not None:
        pos, cols = pos[mask], [v[mask] for v in cols]
    return canon(pos, *cols)


def _expected_chunks(c: Case) -> list[str]:
    bin_shape = np.asarray(c.base_bin_shape or c.chunk_shape, np.float64)
    bpc = np.rint(np.asarray(c.chunk_shape) / bin_shape).astype(np.int64)
    bins = np.floor(c.points.astype(c.dtype).astype(np.float64) / bin_shape).astype(np.int64)
    chunks = np.unique(np.floor_divide(bins, bpc), axis=0)
    return sorted(".".join(map(str, row)) for row in chunks.tolist())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_validates(case, written):
    r = validate(written[case.name], level=5)
    assert r.ok, r.summary()
    assert list(r.warnings) == [ALLOWED_WARNING], r.summary()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_reads_everything(case, written):
    path = written[case.name]
    names = sorted(case.attributes)
    out = ref_read_points(path, level=0, attribute_names=names or None)
    assert out["vertex_count"] == len(case.points)
    assert out["positions"].dtype == np.dtype(case.dtype)
    assert np.array_equal(canon(out["positions"], *[out["vertex_attributes"][k] for k in names]), _expected(case))
    for k in names:
        assert out["vertex_attributes"][k].dtype == case.attributes[k].dtype
        assert out["vertex_attributes"][k].shape == case.attributes[k].shape
    res = zv.open(path).level(0).read()
    assert sorted(res.attributes) == names
    assert np.array_equal(canon(res.positions, *[res.attributes[k] for k in names]), _expected(case))
    # and our own reader agrees
    mine = read_points(path, attributes=names)
    assert np.array_equal(canon(mine["positions"], *[mine["attributes"][k] for k in names]), _expected(case))


@pytest.mark.parametrize("case", [c for c in CASES if c.object_ids is not None],
                         ids=[c.name for c in CASES if c.object_ids is not None])
def test_reference_reads_objects(case, written):
    path = written[case.name]
    ds = zv.open(path)
    ids = np.unique(case.object_ids)
    assert [int(i) for i in ds.level(0).objects.ids()] == ids.tolist()
    names = sorted(case.attributes)
    for oid in ids.tolist():
        mask = case.object_ids == oid
        res = ds.read(level=0, objects=[oid])
        assert np.array_equal(canon(res.positions, *[res.attributes[k] for k in names]), _expected(case, mask))
        out = ref_read_points(path, level=0, object_ids=[oid], attribute_names=names or None)
        assert np.array_equal(canon(out["positions"], *[out["vertex_attributes"][k] for k in names]),
                              _expected(case, mask))
    # ours reports the object of every row
    mine = read_points(path, object_ids=True)
    assert np.array_equal(canon(mine["positions"], mine["object_ids"]),
                          canon(case.points.astype(case.dtype), case.object_ids))


@pytest.mark.parametrize("case", [c for c in CASES if c.object_ids is None],
                         ids=[c.name for c in CASES if c.object_ids is None])
def test_reference_bbox_reads(case, written):
    path = written[case.name]
    rng = np.random.default_rng(7)
    pos = case.points.astype(case.dtype)
    names = sorted(case.attributes)
    d = pos.shape[1]
    lo_all, hi_all = pos.min(axis=0).astype(np.float64), pos.max(axis=0).astype(np.float64)
    boxes = []
    for _ in range(6):
        a, b = rng.uniform(lo_all - 10, hi_all + 10, (2, d))
        boxes.append((np.minimum(a, b), np.maximum(a, b)))
    # boxes whose faces sit exactly on chunk edges (points there must be included: boxes are closed)
    boxes.append((np.zeros(d), np.full(d, 50.0)))
    boxes.append((lo_all, hi_all))
    for lo, hi in boxes:
        mask = ((pos >= lo) & (pos <= hi)).all(axis=1)
        out = ref_read_points(path, level=0, bbox=(lo, hi), attribute_names=names or None)
        assert np.array_equal(canon(out["positions"], *[out["vertex_attributes"][k] for k in names]),
                              _expected(case, mask)), (lo, hi)
        mine = read_points(path, bbox=(lo, hi), attributes=names)
        assert np.array_equal(canon(mine["positions"], *[mine["attributes"][k] for k in names]),
                              _expected(case, mask)), (lo, hi)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_metadata_values(case, written, tmp_path):
    path = written[case.name]
    d = case.points.shape[1]
    root = json.loads(open(f"{path}/zarr.json").read())["attributes"]
    zvb = root["zarr_vectors"]
    assert zvb["zv_version"] == "0.9.2" and zvb["geometry_types"] == ["point_cloud"]
    assert zvb["chunk_shape"] == list(case.chunk_shape)
    assert zvb["cross_level_depth"] == 0 and zvb["cross_level_storage"] == "none"
    if case.base_bin_shape is None:
        assert "base_bin_shape" not in zvb
    else:
        assert zvb["base_bin_shape"] == list(case.base_bin_shape)
    pos = case.points.astype(case.dtype)
    if case.bounds is None:  # fitted exactly to the (cast) data
        assert zvb["bounds"] == [pos.min(axis=0).astype(float).tolist(), pos.max(axis=0).astype(float).tolist()]
    else:
        assert zvb["bounds"] == [list(case.bounds[0]), list(case.bounds[1])]
    # attribute_specs declare every attribute with its dtype and channel count
    specs = zvb.get("attribute_specs", {}).get("vertex", {})
    assert sorted(specs) == sorted(case.attributes)
    for k, v in case.attributes.items():
        expected = {"dtype": v.dtype.name}
        if v.ndim == 2:
            expected["channels"] = v.shape[1]
        assert specs[k] == expected
    # ome: name from the path, one node per level, axes copied
    assert root["ome"]["name"] == case.name
    assert root["ome"]["nodes"] == [{"type": "zv:level", "name": "0"}]
    assert root["ome"]["attributes"]["scene"]["coordinateSystems"][0]["axes"] == root["multiscales"][0]["axes"]
    assert len(root["multiscales"][0]["axes"]) == d
    # level metadata
    lvl = json.loads(open(f"{path}/0/zarr.json").read())["attributes"]["zarr_vectors_level"]
    assert lvl["vertex_count"] == len(case.points) and lvl["level"] == 0 and lvl["fragments_tile"] is True
    assert ("object_index" in lvl["arrays_present"]) == (case.object_ids is not None)
    assert ("vertex_attributes" in lvl["arrays_present"]) == bool(case.attributes)
    # per-array attributes: presence and grid origin
    expected_keys = _expected_chunks(case)
    bmin = np.asarray(zvb["bounds"][0], np.float64)
    origin = np.floor(bmin / np.asarray(case.chunk_shape)).astype(int).tolist()
    arrays = ["vertices", "vertex_fragments"] + [f"vertex_attributes/{k}" for k in case.attributes]
    for a in arrays:
        attrs = json.loads(open(f"{path}/0/{a}/zarr.json").read())["attributes"]
        assert attrs["nonempty_chunks"] == expected_keys, a
        assert attrs.get("chunk_grid_origin", [0] * d) == origin, a
    vert = json.loads(open(f"{path}/0/vertices/zarr.json").read())
    assert vert["attributes"]["dtype"] == case.dtype
    shape = np.maximum(1, np.floor(np.asarray(zvb["bounds"][1]) / np.asarray(case.chunk_shape)).astype(int)
                       - origin + 1)
    assert vert["shape"] == shape.tolist()
    if case.shard_shape is not None:
        assert vert["codecs"][0]["name"] == "sharding_indexed"
        assert vert["chunk_grid"]["configuration"]["chunk_shape"] == list(case.shard_shape)
    # the reference's view of the same metadata
    ds = zv.open(path)
    assert ds.format_version == (0, 9, 2) and ds.kinds == ("point_cloud",) and ds.levels == (0,)
    assert ds.level(0).vertex_count == len(case.points)
    assert sorted(ds.level(0).attribute_names()) == sorted(case.attributes)
    # presence rebuilt by the reference from the cells on disk equals ours
    if case.shard_shape is None:
        from zarr_vectors.building import rebuild_presence
        from zarr_vectors.core.store import open_store as ref_open_store

        copy = tmp_path / "copy.zarr"
        shutil.copytree(path, copy)
        ref_root = ref_open_store(str(copy), mode="r+")
        rebuild_presence(ref_root["0"])
        for a in arrays:
            rebuilt = json.loads((copy / "0" / a / "zarr.json").read_text())["attributes"]["nonempty_chunks"]
            assert rebuilt == expected_keys, a
    # object index
    if case.object_ids is not None:
        oi = json.loads(open(f"{path}/0/object_index/zarr.json").read())["attributes"]
        ids = np.unique(case.object_ids)
        assert oi == {"zv_array": "object_index", "num_objects": len(ids), "num_present": len(ids), "sid_ndim": d,
                      "layout": "vlen_manifests_v2", "object_ids_sorted": True}
    # our API reads back the same facts
    info = store_info(path)
    assert info["levels"][0]["vertex_count"] == len(case.points)
    assert info["levels"][0]["nonempty_chunks"] == len(expected_keys)
    assert read_level_metadata(path, 0).vertex_count == len(case.points)
    assert read_root_metadata(path).chunk_shape == tuple(case.chunk_shape)


# -- the other direction: stores written by zarr-vectors, read by zv-dask ----------------------
REF_CASES = {
    "bins": dict(chunk_shape=(50.0,) * 3, bin_shape=(25.0,) * 3),
    "no_bins": dict(chunk_shape=(40.0, 30.0, 60.0)),
    "float64": dict(chunk_shape=(50.0,) * 3, bin_shape=(25.0,) * 3, dtype="float64"),
    "objects": dict(chunk_shape=(50.0,) * 3, objects=True),
    "sharded": dict(chunk_shape=(50.0,) * 3, bin_shape=(25.0,) * 3, shard_shape=(2, 2, 2)),
    "zstd": dict(chunk_shape=(50.0,) * 3, compressor="zstd", objects=True),
    "d2": dict(chunk_shape=(20.0, 20.0), bin_shape=(10.0, 5.0), ndim=2),
    "d4_objects": dict(chunk_shape=(60.0,) * 4, ndim=4, objects=True),
}


@pytest.mark.parametrize("name", list(REF_CASES))
def test_zv_dask_reads_reference_stores(name, tmp_path):
    kw = dict(REF_CASES[name])
    rng = np.random.default_rng(99)
    d = kw.pop("ndim", 3)
    n = 150
    pts = rng.uniform(-90, 80, (n, d))
    attrs = _attrs(rng, n)
    oids = None
    if kw.pop("objects", False):
        oids = rng.choice(np.array([-(2 ** 40), -1, 0, 5, 2 ** 50]), n)
    path = str(tmp_path / f"ref_{name}.zarr")
    ref_write_points(path, pts, vertex_attributes=attrs, object_ids=oids, **kw)
    dtype = kw.get("dtype", "float32")
    names = sorted(attrs)
    got = read_points(path, attributes=names, object_ids=oids is not None)
    assert got["positions"].dtype == np.dtype(dtype)
    for k in names:
        assert got["attributes"][k].dtype == attrs[k].dtype and got["attributes"][k].shape == attrs[k].shape
    extra_got = [got["object_ids"]] if oids is not None else []
    extra_exp = [oids] if oids is not None else []
    assert np.array_equal(canon(got["positions"], *[got["attributes"][k] for k in names], *extra_got),
                          canon(pts.astype(dtype), *[attrs[k] for k in names], *extra_exp))
    # a bbox read through our reader
    lo, hi = np.full(d, -20.0), np.full(d, 45.0)
    mask = ((pts.astype(dtype) >= lo) & (pts.astype(dtype) <= hi)).all(axis=1)
    box = read_points(path, bbox=(lo, hi), attributes=["rgb"])
    assert np.array_equal(canon(box["positions"], box["attributes"]["rgb"]),
                          canon(pts.astype(dtype)[mask], attrs["rgb"][mask]))
    # and our metadata API understands the store
    zs = open_store(path)
    meta = zs.metadata
    assert meta.ndim == d and meta.chunk_shape == tuple(kw["chunk_shape"])
    info = store_info(zs)
    assert info["levels"][0]["vertex_count"] == n
    assert info["levels"][0]["attributes"]["rgb"] == {"dtype": "uint8", "channels": 3}
    if oids is not None:
        assert info["levels"][0]["num_objects"] == len(np.unique(oids))
