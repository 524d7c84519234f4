"""The seed store API on ZVStore: create/open, metadata, levels, parametric types,
bounds, transactions (icechunk) and pre-built stores."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import zarr

import zv_dask as Z
from tests.conftest import canon
from zv_dask.errors import MetadataError, StoreError
from zv_dask.format.metadata import LevelMetadata
from zv_dask.local import read_points, write_points

warnings.filterwarnings("ignore", message=".*LocalFileSystem storage is not safe.*")

ALLOWED_WARNING = "Point cloud but links array exists"


def _validate(path, **kw):
    from zarr_vectors.validate import validate

    r = validate(str(path), level=5, **kw)
    assert r.ok, r.summary()
    return [w for w in r.warnings if w != ALLOWED_WARNING and "no chunk data" not in w]


def _root_attrs(path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]


@pytest.fixture
def cloud(rng):
    pts = rng.uniform(0, 100, (200, 3))
    attrs = {"rgb": rng.integers(0, 256, (200, 3)).astype(np.uint8), "w": rng.random(200)}
    return pts, attrs


# -- create / open ---------------------------------------------------------------------------
def test_create_and_open_modes(tmp_path):
    path = tmp_path / "s.zarr"
    zs = Z.create_store(str(path), bounds=([-10, 0, 0], [90, 100, 100]), chunk_shape=[50] * 3,
                        base_bin_shape=[25] * 3, axes=["x", {"name": "y", "unit": "micrometer"}, "z"])
    assert zs.mode == "r+" and not zs.read_only
    assert _validate(path) == []
    root = _root_attrs(path)
    assert root["zarr_vectors"]["bounds"] == [[-10.0, 0.0, 0.0], [90.0, 100.0, 100.0]]
    assert root["multiscales"][0]["axes"][1] == {"type": "space", "name": "y", "unit": "micrometer"}
    assert root["ome"]["attributes"]["scene"]["coordinateSystems"][0]["axes"][1]["unit"] == "micrometer"
    assert root["ome"]["name"] == "s" and root["ome"]["nodes"] == [{"type": "zv:level", "name": "0"}]
    vert = json.loads((path / "0/vertices/zarr.json").read_text())
    assert vert["attributes"]["chunk_grid_origin"] == [-1, 0, 0] and vert["shape"] == [3, 3, 3]

    ro = Z.open_store(str(path), "r")
    assert ro.read_only and ro.store.read_only
    rw = Z.open_store(str(path), "r+")
    assert not rw.read_only
    assert Z.open_store(rw) is rw
    with pytest.raises(StoreError, match="mode"):
        Z.open_store(str(path), "w")
    # the reference opens the warm store too
    import zarr_vectors as zv

    ds = zv.open(str(path))
    assert ds.levels == (0,) and ds.level(0).vertex_count == 0


def test_create_defaults(tmp_path):
    zs = Z.create_store(str(tmp_path / "d.zarr"), ndim=2)
    meta = Z.read_root_metadata(zs)
    assert meta.bounds == ((0.0, 0.0), (128.0, 128.0))
    assert meta.chunk_shape == (128.0, 128.0) and meta.base_bin_shape is None
    assert meta.axis_names == ["x", "y"]


def test_read_only_is_honoured(tmp_path, cloud):
    pts, attrs = cloud
    path = tmp_path / "ro.zarr"
    write_points(str(path), pts, attributes=attrs, chunk_shape=[50] * 3)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    ro = Z.open_store(str(path), "r")
    for call in (lambda: Z.add_resolution_level(ro, 1, (2, 2, 2)),
                 lambda: Z.create_resolution_level(ro, 1, LevelMetadata(level=1)),
                 lambda: Z.remove_resolution_level(ro, 1),
                 lambda: Z.set_bounds(ro, ([0] * 3, [200] * 3)),
                 lambda: Z.write_parametric_types(ro, [{"name": "t"}])):
        with pytest.raises(StoreError, match="read-only"):
            call()
    with pytest.raises(ValueError, match="read-only"):  # the zarr store itself refuses writes too
        ro.root.attrs.update({"x": 1})
    with pytest.raises(StoreError):  # writing points into a read-only store
        write_points(ro, pts, chunk_shape=[50] * 3, overwrite=True)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert len(read_points(ro)["positions"]) == len(pts)


# -- metadata ----------------------------------------------------------------------------------
def test_store_info_and_metadata(tmp_path, cloud):
    pts, attrs = cloud
    path = tmp_path / "m.zarr"
    zs = write_points(str(path), pts, attributes=attrs, object_ids=np.arange(200) % 7, chunk_shape=[50] * 3)
    info = Z.store_info(zs)
    assert info["zv_version"] == Z.ZV_VERSION == "0.9.2"
    assert info["ndim"] == 3 and info["axes"] == ["x", "y", "z"] and info["geometry_types"] == ["point_cloud"]
    assert info["bins_per_chunk"] == [1, 1, 1] and info["backend"] == "local"
    (lvl,) = info["levels"]
    assert lvl["vertex_count"] == 200 and lvl["num_objects"] == 7
    assert lvl["attributes"] == {"rgb": {"dtype": "uint8", "channels": 3}, "w": {"dtype": "float64", "channels": 1}}
    assert lvl["nonempty_chunks"] == len(zs.root["0/vertices"].attrs["nonempty_chunks"])
    json.dumps(info)  # JSON-ready
    root = Z.read_root_metadata(str(path))
    assert root.chunk_shape == (50.0,) * 3 and root.effective_bin_shape == (50.0,) * 3
    lm = Z.read_level_metadata(zs, 0)
    assert lm.vertex_count == 200 and lm.bin_shape == (50.0,) * 3 and lm.bin_ratio == (1.0,) * 3
    assert "object_index" in lm.arrays_present and lm.fragments_tile is True
    with pytest.raises(StoreError, match="level 3 not found"):
        Z.read_level_metadata(zs, 3)


# -- levels ----------------------------------------------------------------------------------
def test_levels_add_get_list_remove(tmp_path):
    path = tmp_path / "lv.zarr"
    zs = Z.create_store(str(path), bounds=([0] * 3, [100] * 3), chunk_shape=[50] * 3, base_bin_shape=[25] * 3)
    assert Z.list_resolution_levels(zs) == [0]
    g1 = Z.add_resolution_level(zs, 1, (2, 2, 2))
    assert isinstance(g1, zarr.Group) and "vertices" in g1 and "vertex_fragments" in g1
    Z.add_resolution_level(zs, 2, 4, object_sparsity=0.5)
    assert Z.list_resolution_levels(zs) == [0, 1, 2]
    assert Z.get_resolution_level(zs, 2).attrs["zarr_vectors_level"]["object_sparsity"] == 0.5
    assert Z.list_available_ratios(zs) == [(1.0,) * 3, (2.0,) * 3, (4.0,) * 3]
    lm2 = Z.read_level_metadata(zs, 2)
    assert lm2.bin_shape == (100.0,) * 3 and lm2.bin_ratio == (4.0,) * 3 and lm2.parent_level == 1
    assert lm2.coarsening_method == "manual"
    root = _root_attrs(path)
    ds = root["multiscales"][0]["datasets"]
    assert [d["path"] for d in ds] == ["0", "1", "2"]
    assert ds[2]["coordinateTransformations"] == [{"type": "scale", "scale": [4.0] * 3},
                                                  {"type": "translation", "translation": [50.0] * 3}]
    assert [n["name"] for n in root["ome"]["nodes"]] == ["0", "1", "2"]
    assert _validate(path) == []
    import zarr_vectors as zv

    assert zv.open(str(path)).level(2).resolution == (100.0,) * 3

    with pytest.raises(StoreError, match="already exists"):
        Z.add_resolution_level(zs, 1, (2, 2, 2))
    with pytest.raises(MetadataError, match="bin_ratio"):
        Z.add_resolution_level(zs, 3, (0.5, 1, 1))
    with pytest.raises(StoreError, match="level 0"):
        Z.remove_resolution_level(zs, 0)
    Z.remove_resolution_level(zs, 2)
    assert Z.list_resolution_levels(zs) == [0, 1]
    root = _root_attrs(path)
    assert [d["path"] for d in root["multiscales"][0]["datasets"]] == ["0", "1"]
    assert [n["name"] for n in root["ome"]["nodes"]] == ["0", "1"]
    with pytest.raises(StoreError, match="not found"):
        Z.remove_resolution_level(zs, 2)
    with pytest.raises(StoreError, match="not found"):
        Z.get_resolution_level(zs, 2)
    # a non-integer child is not a level
    zs.root.create_group("extra")
    assert Z.list_resolution_levels(zs) == [0, 1]


def test_create_resolution_level(tmp_path):
    path = tmp_path / "cl.zarr"
    zs = Z.create_store(str(path), bounds=([0] * 2, [100] * 2), chunk_shape=[40, 40], base_bin_shape=[10, 20])
    lm = LevelMetadata(level=1, vertex_count=0, coarsening_method="per_object", parent_level=0, bin_shape=(30.0, 40.0))
    g = Z.create_resolution_level(zs, 1, lm)
    assert "bin_shape" not in g.attrs["zarr_vectors_level"]  # geometry lives in NGFF only
    back = Z.read_level_metadata(zs, 1)
    assert back.bin_shape == (30.0, 40.0) and back.bin_ratio == (3.0, 2.0)
    assert back.coarsening_method == "per_object" and back.parent_level == 0
    assert Z.list_available_ratios(zs) == [(1.0, 1.0), (3.0, 2.0)]
    with pytest.raises(MetadataError, match="coarsening_method"):
        Z.create_resolution_level(zs, 2, LevelMetadata(level=2, coarsening_method="bogus"))


def test_parametric_types(tmp_path):
    path = tmp_path / "p.zarr"
    zs = Z.create_store(str(path), ndim=3)
    assert Z.read_parametric_types(zs) == []
    types = [{"name": "sphere", "params": ["radius"]}, {"name": "box", "params": ["w", "h", "d"]}]
    Z.write_parametric_types(zs, types)
    assert Z.read_parametric_types(Z.open_store(str(path), "r")) == types
    assert Z.store_info(zs)["parametric_types"] == types
    assert Z.list_resolution_levels(zs) == [0]  # /parametric is no level
    assert _validate(path) == []


# -- bounds ----------------------------------------------------------------------------------
@pytest.mark.parametrize("with_objects", [False, True])
def test_set_bounds_expand_and_shrink(tmp_path, cloud, with_objects):
    pts, attrs = cloud
    oids = (np.arange(len(pts)) % 5) * 1000 - 2000 if with_objects else None
    path = tmp_path / "b.zarr"
    zs = write_points(str(path), pts, attributes=attrs, object_ids=oids, chunk_shape=[50] * 3,
                      base_bin_shape=None if with_objects else [25] * 3, bounds=([0] * 3, [100] * 3))
    p32 = pts.astype(np.float32)
    names = sorted(attrs)

    def check(mask):
        out = read_points(zs, attributes=names, object_ids=with_objects)
        extra = [out["object_ids"]] if with_objects else []
        exp_extra = [oids[mask]] if with_objects else []
        assert np.array_equal(canon(out["positions"], *[out["attributes"][k] for k in names], *extra),
                              canon(p32[mask], *[attrs[k][mask] for k in names], *exp_extra))
        from zarr_vectors.types.points import read_points as ref_read

        ref = ref_read(str(path), level=0, attribute_names=names)
        assert np.array_equal(canon(ref["positions"], *[ref["vertex_attributes"][k] for k in names]),
                              canon(p32[mask], *[attrs[k][mask] for k in names]))
        assert _validate(path) == []
        assert Z.read_level_metadata(zs, 0).vertex_count == int(mask.sum())

    everything = np.ones(len(pts), bool)
    # grow without moving the origin
    Z.set_bounds(zs, ([0] * 3, [180, 100, 100]))
    assert zs.metadata.bounds == ((0.0,) * 3, (180.0, 100.0, 100.0))
    check(everything)
    # grow below zero: the grid origin moves and every cell moves with it
    Z.set_bounds(zs, ([-130, -10, 0], [180, 100, 100]))
    vert = zs.root["0/vertices"]
    assert vert.attrs["chunk_grid_origin"] == [-3, -1, 0] and vert.shape == (7, 4, 3)
    check(everything)
    # shrinking needs force=True and writes nothing without it
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(MetadataError, match="force=True"):
        Z.set_bounds(zs, ([0] * 3, [50] * 3))
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    with pytest.raises(MetadataError, match="inverted"):
        Z.set_bounds(zs, ([10] * 3, [0] * 3))
    with pytest.raises(MetadataError, match="3 values"):
        Z.set_bounds(zs, ([0] * 2, [10] * 2))
    Z.set_bounds(zs, ([0] * 3, [50] * 3), force=True)
    check((p32 <= 50).all(axis=1))
    assert all(int(k.split(".")[0]) <= 1 for k in zs.root["0/vertices"].attrs["nonempty_chunks"])


# -- transactions: icechunk ------------------------------------------------------------------
def test_icechunk_session_commit_discard(tmp_path, cloud):
    import icechunk

    pts, attrs = cloud
    repo_path = str(tmp_path / "repo")
    zs = Z.create_store(repo_path, bounds=([0] * 3, [100] * 3), chunk_shape=[50] * 3, backend="icechunk")
    session = Z.session_for(zs)
    assert isinstance(session, icechunk.Session) and not session.read_only
    snap1 = Z.commit(zs, "create")
    assert isinstance(snap1, str)
    assert Z.commit(zs, "nothing to do") == snap1  # no changes, no new snapshot

    Z.add_resolution_level(zs, 1, (2, 2, 2))
    assert Z.list_resolution_levels(zs) == [0, 1]
    # uncommitted work is invisible to a fresh reader
    assert Z.list_resolution_levels(Z.open_store(repo_path, "r", backend="icechunk")) == [0]
    Z.discard_changes(zs)
    assert Z.list_resolution_levels(zs) == [0]

    Z.add_resolution_level(zs, 1, (2, 2, 2))
    snap2 = Z.commit(zs, "level 1")
    assert snap2 != snap1
    assert Z.list_resolution_levels(Z.open_store(repo_path, "r", backend="icechunk")) == [0, 1]
    # the store stays writable after a commit
    Z.write_parametric_types(zs, [{"name": "t"}])
    Z.commit(zs, "types")

    ro = Z.open_store(repo_path, "r", backend="icechunk")
    assert ro.read_only and Z.session_for(ro) is None
    with pytest.raises(StoreError, match="read-only"):
        Z.add_resolution_level(ro, 2, (4, 4, 4))
    assert Z.read_parametric_types(ro) == [{"name": "t"}]
    with pytest.raises(StoreError, match="no icechunk repository"):
        Z.open_store(str(tmp_path / "nothing"), "r", backend="icechunk")

    # write_points through icechunk commits, and the reference reads the committed store
    pts_repo = str(tmp_path / "points_repo")
    write_points(pts_repo, pts, attributes=attrs, chunk_shape=[50] * 3, backend="icechunk")
    import zarr_vectors as zv

    res = zv.open(pts_repo, storage=zv.StorageOptions(backend="icechunk")).level(0).read()
    assert np.array_equal(canon(res.positions, res.attributes["rgb"]), canon(pts.astype(np.float32), attrs["rgb"]))
    got = read_points(Z.open_store(pts_repo, "r", backend="icechunk"), attributes=["rgb"])
    assert np.array_equal(canon(got["positions"], got["attributes"]["rgb"]),
                          canon(pts.astype(np.float32), attrs["rgb"]))


def test_icechunk_repository_object_and_rebind(tmp_path, cloud):
    import icechunk

    pts, _ = cloud
    repo = icechunk.Repository.create(icechunk.local_filesystem_storage(str(tmp_path / "r2")))
    write_points(repo, pts, chunk_shape=[50] * 3)
    ro = Z.open_store(repo, "r")
    assert ro.read_only and len(read_points(ro)["positions"]) == len(pts)
    rw = Z.open_store(repo, "r+")
    Z.add_resolution_level(rw, 1, (2, 2, 2))
    Z.commit(rw, "level 1")
    assert Z.list_resolution_levels(Z.open_store(repo, "r")) == [0, 1]
    # a writable icechunk Session is accepted as is
    session = repo.writable_session("main")
    zs = Z.open_store(session, "r+")
    assert Z.session_for(zs) is session
    Z.remove_resolution_level(zs, 1)
    assert Z.list_resolution_levels(zs) == [0]
    Z.discard_changes(zs)
    # rebind an icechunk store opened by path to the same repository
    repo_path = str(tmp_path / "r3")
    write_points(repo_path, pts, chunk_shape=[50] * 3, backend="icechunk")
    a = Z.open_store(repo_path, "r+", backend="icechunk")
    b = Z.rebind(a, "icechunk")
    assert b.backend.kind == "icechunk" and Z.session_for(b) is not None
    assert len(read_points(b)["positions"]) == len(pts)


def test_commit_and_discard_are_noops_on_plain_stores(tmp_path):
    zs = Z.create_store(str(tmp_path / "plain.zarr"), ndim=3)
    assert Z.session_for(zs) is None
    assert Z.commit(zs, "x") is None
    Z.discard_changes(zs)
    assert Z.list_resolution_levels(zs) == [0]


# -- pre-built stores and rebind -------------------------------------------------------------
def test_prebuilt_zarr_and_obstore_stores(tmp_path, cloud):
    from obstore.store import LocalStore as ObsLocalStore
    from zarr.storage import LocalStore

    pts, attrs = cloud
    expect = canon(pts.astype(np.float32), attrs["rgb"])

    p1 = tmp_path / "zarrstore.zarr"
    write_points(LocalStore(str(p1)), pts, attributes=attrs, chunk_shape=[50] * 3)
    assert _validate(p1) == []
    zs = Z.open_store(LocalStore(str(p1)), "r")
    assert zs.read_only and zs.store.read_only
    out = read_points(zs, attributes=["rgb"])
    assert np.array_equal(canon(out["positions"], out["attributes"]["rgb"]), expect)
    with pytest.raises(StoreError, match="read-only"):
        Z.add_resolution_level(zs, 1, (2, 2, 2))

    p2 = tmp_path / "obstore.zarr"
    p2.mkdir()
    warm = Z.create_store(ObsLocalStore(prefix=str(p2)), bounds=([0] * 3, [100] * 3), chunk_shape=[50] * 3)
    assert warm.backend.kind == "obstore"
    write_points(Z.open_store(ObsLocalStore(prefix=str(p2)), "r+"), pts, attributes=attrs)
    assert _validate(p2) == []
    zo = Z.open_store(ObsLocalStore(prefix=str(p2)), "r")
    assert zo.read_only and zo.store.read_only
    out = read_points(zo, attributes=["rgb"])
    assert np.array_equal(canon(out["positions"], out["attributes"]["rgb"]), expect)
    with pytest.raises(StoreError, match="read-only"):
        Z.write_parametric_types(zo, [])

    # rebind the local path store to obstore, then to a pre-built zarr store
    local = Z.open_store(str(p1), "r+")
    via_obstore = Z.rebind(local, "obstore")
    assert via_obstore.backend.kind == "obstore" and via_obstore.mode == "r+"
    assert len(read_points(via_obstore)["positions"]) == len(pts)
    via_store = Z.rebind(local, LocalStore(str(p1)))
    Z.add_resolution_level(via_store, 1, (2, 2, 2))
    assert Z.list_resolution_levels(local) == [0, 1]
    Z.rebind(Z.open_store(str(p1), "r"), "obstore")  # read-only carries over
    assert Z.rebind(Z.open_store(str(p1), "r"), "obstore").store.read_only


def test_zv_dask_keeps_zarrs_warnings_to_itself_and_the_users_filters_alone(tmp_path):
    """No global warning filter at import; a whole job (vlen arrays, an object index, a pyramid, a journal's
    directory in the store) shows none of zarr's warnings about what zv-dask does on purpose."""
    import subprocess
    import sys
    import warnings

    probe = ("import warnings, zarr, numpy, pandas, dask; before = list(warnings.filters); "
             "import zv_dask, zv_dask.cli; print([f for f in warnings.filters if f not in before])")
    added = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "[]", added.stdout

    import dask

    import zv_dask

    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 100, (3000, 3)).astype("f4")
    path = tmp_path / "s.zv"
    with warnings.catch_warnings(record=True) as seen, dask.config.set(scheduler="sync"):
        warnings.simplefilter("always")
        zv_dask.ingest(pts, str(path), chunk_shape=25, bounds=([0] * 3, [100] * 3),
                       attributes={"i": rng.integers(0, 9, 3000).astype("u2")},
                       object_ids=rng.integers(0, 50, 3000), pyramid=True)
        (path / ".zv-job" / "done").mkdir(parents=True)  # what a running job keeps in the store
        zs = zv_dask.open_store(str(path))
        assert zs.levels[:2] == [0, 1]
        assert zv_dask.validate_store(str(path)).ok
    from zarr.errors import UnstableSpecificationWarning

    noisy = [str(w.message)[:120] for w in seen
             if issubclass(w.category, UnstableSpecificationWarning) or "is not recognized" in str(w.message)]
    assert not noisy, noisy
