"""zv-dask's own validator: clean stores pass; each kind of damage is named."""

from __future__ import annotations

import shutil

import dask
import numpy as np
import pytest
import zarr

import zv_dask
from zv_dask.errors import StoreError
from zv_dask.format.cells import encode_fragments
from zv_dask.local import write_points
from zv_dask.validate import validate_store

N = 6000


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store with 3 levels, two attributes (one multi-channel) and object ids."""
    rng = np.random.default_rng(7)
    path = tmp_path_factory.mktemp("validate") / "t.zv"
    pts = rng.uniform(0, 200, (N, 3))
    write_points(path, pts, attributes={"intensity": rng.random(N).astype(np.float32),
                                        "rgb": rng.integers(0, 255, (N, 3)).astype(np.uint8)},
                 object_ids=rng.integers(0, 40, N), chunk_shape=(50.0,) * 3, base_bin_shape=(10.0,) * 3)
    with dask.config.set(scheduler="sync"):
        zv_dask.build_pyramid(str(path), levels=2)
    return path


@pytest.fixture
def store(template, tmp_path):
    path = tmp_path / "s.zv"
    shutil.copytree(template, path)
    return path


def first_cell(path, level=0):
    root = zarr.open_group(str(path), mode="r")
    key = root[f"{level}/vertices"].attrs["nonempty_chunks"][0]
    return key, tuple(int(v) for v in key.split("."))


def set_cell(path, array, cell, payload: bytes):
    arr = zarr.open_array(str(path / array), mode="r+")
    value = np.empty(1, dtype=object)
    value[0] = payload
    arr.set_coordinate_selection(tuple([c] for c in cell), value)


def get_cell(path, array, cell) -> bytes:
    arr = zarr.open_array(str(path / array), mode="r")
    return bytes(arr.get_coordinate_selection(tuple([c] for c in cell))[0])


def level_attrs(path, level):
    return zarr.open_group(str(path / str(level)), mode="r+").attrs


def has_error(report, text):
    return any(text in e for e in report.errors), report.errors


def test_clean_store_passes(store):
    r = validate_store(store)
    assert r.ok and r.errors == [] and r.warnings == [], repr(r)
    assert [lv["level"] for lv in r.levels] == [0, 1, 2]
    assert r.levels[0]["vertex_count"] == N and r.levels[0]["objects"] == 40
    assert r.chunks_checked == sum(lv["chunks"] for lv in r.levels)
    d = r.to_dict()
    assert d["ok"] is True and "valid" in repr(r)


@pytest.mark.parametrize("case", ["bins", "objects", "sharded"])
def test_reference_written_stores_pass(tmp_path, case):
    from zarr_vectors.types.points import write_points as ref_write_points

    rng = np.random.default_rng(3)
    kw = {"bins": dict(chunk_shape=(50.0,) * 3, bin_shape=(25.0,) * 3),
          "objects": dict(chunk_shape=(50.0,) * 3, object_ids=rng.integers(0, 9, 300)),
          "sharded": dict(chunk_shape=(50.0,) * 3, bin_shape=(25.0,) * 3, shard_shape=(2, 2, 2))}[case]
    path = str(tmp_path / "ref.zarr")
    ref_write_points(path, rng.uniform(-90, 80, (300, 3)),
                     vertex_attributes={"a": rng.random(300).astype(np.float32)}, **kw)
    r = validate_store(path)
    assert r.ok, repr(r)


def test_vertex_count_mismatch(store):
    a = level_attrs(store, 0)
    lv = dict(a["zarr_vectors_level"])
    lv["vertex_count"] = N + 1
    a["zarr_vectors_level"] = lv
    r = validate_store(store)
    assert not r.ok
    assert has_error(r, "level 0: row counts")
    assert has_error(r, f"the chunks hold {N:,} rows but vertex_count is {N + 1:,}")


def test_vertex_counts_must_not_grow(store):
    a = level_attrs(store, 2)
    lv = dict(a["zarr_vectors_level"])
    lv["vertex_count"] = N * 2
    a["zarr_vectors_level"] = lv
    assert has_error(validate_store(store), "vertex counts grow with the level")


def test_levels_must_be_contiguous(store):
    shutil.rmtree(store / "1")
    r = validate_store(store)
    assert has_error(r, "levels are not contiguous from 0: [0, 2]")
    assert has_error(r, "'multiscales' datasets list levels [0, 1, 2] but the store has level groups [0, 2]")


def test_truncated_vertices_cell(store):
    key, cell = first_cell(store)
    set_cell(store, "0/vertices", cell, get_cell(store, "0/vertices", cell)[:-3])
    r = validate_store(store)
    assert has_error(r, "level 0: vertices cells that do not decode")
    assert has_error(r, key)


def test_missing_cell_listed_as_nonempty(store):
    key, cell = first_cell(store)
    set_cell(store, "0/vertex_fragments", cell, b"")
    assert has_error(validate_store(store), "level 0: vertex_fragments cells that do not decode")


def test_attribute_rows_must_match(store):
    key, cell = first_cell(store)
    payload = get_cell(store, "0/vertex_attributes/rgb", cell)
    set_cell(store, "0/vertex_attributes/rgb", cell, payload[:-3])
    r = validate_store(store)
    assert has_error(r, "level 0: attribute cells that do not match their chunk's rows")
    assert has_error(r, f"rgb in chunk {key}")


@pytest.fixture
def psid_store(tmp_path):
    """The issue's store: one chunk of 2125 rows whose uint16 ``psid`` cells are declared float64."""
    rng = np.random.default_rng(5)
    path = tmp_path / "psid.zv"
    with dask.config.set(scheduler="sync"):
        zv_dask.ingest(rng.uniform(0, 100, (2125, 3)), str(path), chunk_shape=1000,
                       attributes={"psid": rng.integers(0, 60000, 2125).astype(np.uint16)})
    assert validate_store(path).ok
    return path


def declare(path, name, dtype, *, array=True, root=True):
    """Rewrite the declared dtype of level 0's attribute ``name``: its array's ZV attributes and/or the root's."""
    if array:
        zarr.open_array(str(path / "0" / "vertex_attributes" / name), mode="r+").attrs["dtype"] = dtype
    if root:
        g = zarr.open_group(str(path), mode="r+")
        zv = g.attrs["zarr_vectors"]
        zv["attribute_specs"]["vertex"][name]["dtype"] = dtype
        g.attrs["zarr_vectors"] = zv


def test_attribute_cells_of_another_dtype_than_declared(psid_store, capfd):
    declare(psid_store, "psid", "float64")
    r = validate_store(psid_store)
    assert not r.ok
    assert has_error(r, "level 0: attribute cells that do not match their chunk's rows and declared dtype: psid in "
                        "chunk 0.0.0: 4250 bytes for 2125 rows is 2 bytes a value (uint16/int16/float16?), not "
                        "float64 (8 bytes a value)")
    assert not has_error(r, "root attribute_specs")[0]  # both declarations agree (on the wrong dtype)
    from zv_dask.cli import main

    capfd.readouterr()
    assert main(["validate", str(psid_store)]) == 1  # zv-dask validate STORE, in this process
    out = capfd.readouterr()
    assert "psid in chunk 0.0.0: 4250 bytes for 2125 rows is 2 bytes a value" in out.out + out.err


def test_root_attribute_specs_must_agree_with_the_arrays(psid_store):
    declare(psid_store, "psid", "float64", array=False)
    r = validate_store(psid_store)
    assert has_error(r, "root attribute_specs: 'psid' is declared float64 x 1 at the root but level 0's array says "
                        "uint16 x 1")
    assert not has_error(r, "attribute cells")[0]  # the cells match their array


def test_attribute_declared_with_a_non_numeric_dtype(psid_store):
    declare(psid_store, "psid", "str", root=False)
    r = validate_store(psid_store)
    assert has_error(r, "level 0: attribute 'psid' is declared str")


def test_fragments_must_tile(store):
    key, cell = first_cell(store)
    n = len(get_cell(store, "0/vertices", cell)) // 12
    bad = np.zeros(125, np.int64)
    bad[0] = n - 1  # one row in no fragment
    set_cell(store, "0/vertex_fragments", cell, encode_fragments(bad))
    assert has_error(validate_store(store), "fragments do not tile the rows")
    too_far = np.zeros(125, np.int64)
    too_far[0] = n + 5
    set_cell(store, "0/vertex_fragments", cell, encode_fragments(too_far))
    assert has_error(validate_store(store), "fragments reaching outside their chunk's rows")


def test_points_in_the_wrong_chunk(store):
    root = zarr.open_group(str(store), mode="r")
    keys = root["0/vertices"].attrs["nonempty_chunks"]
    a, b = (tuple(int(v) for v in k.split(".")) for k in keys[:2])
    va, vb = get_cell(store, "0/vertices", a), get_cell(store, "0/vertices", b)
    set_cell(store, "0/vertices", a, vb)
    set_cell(store, "0/vertices", b, va)
    assert has_error(validate_store(store), "level 0: points stored in a chunk that does not contain them")


def test_nonempty_chunk_outside_the_grid(store):
    a = zarr.open_array(str(store / "0/vertices"), mode="r+").attrs
    a["nonempty_chunks"] = list(a["nonempty_chunks"]) + ["99.0.0"]
    r = validate_store(store)
    assert has_error(r, "level 0: chunks outside the array grid: 99.0.0")
    assert has_error(r, "vertex_fragments lists other chunks than vertices")


def test_manifest_pointing_at_a_missing_chunk(store):
    from zv_dask.format.cells import encode_manifest

    set_cell(store, "0/object_index/manifests", (0,), encode_manifest(np.array([[3, 3, 3]]), np.array([0])))
    set_cell(store, "0/object_index/manifests", (1,), encode_manifest(np.array([[0, 0, 0]]), np.array([999])))
    r = validate_store(store)
    assert has_error(r, "manifests naming chunks that are not in nonempty_chunks")
    assert has_error(r, "manifests naming fragments a chunk does not have")
    assert any("rows in no object" in w for w in r.warnings), r.warnings


def test_bad_root_metadata_is_reported_not_raised(store):
    g = zarr.open_group(str(store), mode="r+")
    zv = dict(g.attrs["zarr_vectors"])
    zv["chunk_shape"] = [50.0, -1.0, 50.0]
    g.attrs["zarr_vectors"] = zv
    r = validate_store(store)
    assert not r.ok and r.errors[0].startswith("root metadata does not parse")


def test_not_a_store_raises(tmp_path):
    with pytest.raises(StoreError):
        validate_store(tmp_path / "nothing-here")


def test_icechunk_store(tmp_path, template):
    rng = np.random.default_rng(1)
    path = str(tmp_path / "ice")
    write_points(path, rng.uniform(0, 10, (500, 3)), chunk_shape=(5.0,) * 3, backend="icechunk")
    r = validate_store(path, backend="icechunk")
    assert r.ok and r.levels[0]["vertex_count"] == 500, repr(r)


# -- cross-level links ---------------------------------------------------------------------------
@pytest.fixture
def linked(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "l.zv"
    write_points(path, rng.uniform(0, 100, (3000, 3)), chunk_shape=(25.0,) * 3, base_bin_shape=(12.5,) * 3)
    with dask.config.set(scheduler="sync"):
        zv_dask.build_pyramid(str(path), levels=2, links="explicit")
    return path


def test_links_of_a_clean_pyramid_validate(linked):
    rep = validate_store(linked)
    assert rep.ok and not rep.warnings, (rep.errors, rep.warnings)


def test_wrong_link_count_is_an_error(linked):
    g = zarr.open_group(str(linked / "0" / "links" / "+1"), mode="r+")
    g.attrs["num_links"] = 7
    rep = validate_store(linked)
    assert not rep.ok and any("num_links is 7" in e for e in rep.errors)


def test_link_to_a_missing_row_is_an_error(linked):
    from zv_dask.format.links import decode_link_rows, encode_link_rows

    root = zarr.open_group(str(linked), mode="r")
    fam = root["0/links/+1"]
    seg, arr = sorted(fam.arrays())[0]
    key = arr.attrs["nonempty_chunks"][0]
    cell = tuple(int(v) for v in key.split("."))
    rows = decode_link_rows(get_cell(linked, f"0/links/+1/{seg}", cell))
    rows[0, 1] = 10**6
    set_cell(linked, f"0/links/+1/{seg}", cell, encode_link_rows(rows))
    rep = validate_store(linked)
    assert not rep.ok and any("past the end of its chunk" in e for e in rep.errors), rep.errors


def test_missing_mirror_is_a_warning(linked):
    shutil.rmtree(linked / "2" / "links")
    g = zarr.open_group(str(linked / "2"), mode="r+")
    lm = g.attrs["zarr_vectors_level"]
    g.attrs["zarr_vectors_level"] = {**lm, "arrays_present": [a for a in lm["arrays_present"] if a != "links"]}
    rep = validate_store(linked)
    assert rep.ok and any("no links/-1" in w for w in rep.warnings), rep.warnings


# -- nodes of the wrong kind ---------------------------------------------------------------------
@pytest.mark.parametrize("node, kind, where", [
    ("2/vertices", "group", "level 2"),
    ("0/vertex_attributes", "array", "level 0"),
    ("0/object_index/manifests", "group", "level 0 object_index"),
    ("0/object_index/object_ids", "group", "level 0 object_index"),
])
def test_a_node_of_the_wrong_kind_is_an_error(store, node, kind, where):
    parent, name = node.rsplit("/", 1)
    shutil.rmtree(store / node)
    g = zarr.open_group(str(store / parent), mode="r+")
    if kind == "group":
        g.create_group(name)
    else:
        g.create_array(name, shape=(1,), dtype="int8")
    r = validate_store(store)
    assert has_error(r, f"{where}: nodes of the wrong kind: the store has a{'n' if kind == 'array' else ''} {kind} "
                        f"at {node} where a")


def test_links_of_the_wrong_kind_are_an_error(linked):
    shutil.rmtree(linked / "2" / "links")
    zarr.open_group(str(linked / "2"), mode="r+").create_array("links", shape=(1,), dtype="int8")
    assert has_error(validate_store(linked), "level 2: nodes of the wrong kind: the store has an array at 2/links "
                                             "where a group belongs")


# -- values no check expected: reported, never raised ------------------------------------------------
def test_counts_of_text_are_reported_not_raised(linked):
    g = zarr.open_group(str(linked / "0" / "links" / "+1"), mode="r+")
    g.attrs["num_links"] = "many"
    rep = validate_store(linked)
    assert not rep.ok and any("level 0 links +1: metadata the checks cannot read" in e for e in rep.errors), rep.errors


def test_links_into_a_level_without_vertices_are_reported_not_raised(linked):
    shutil.rmtree(linked / "1" / "vertices")
    rep = validate_store(linked)
    assert not rep.ok and any("level 1" in e for e in rep.errors), rep.errors
