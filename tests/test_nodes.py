"""store.nodes: a store's nodes by kind, and JSON object attributes, with errors that name the node."""

from __future__ import annotations

import pytest
import zarr

from zv_dask.errors import MetadataError, StoreError
from zv_dask.local import read_points, write_points
from zv_dask.store.nodes import array_at, attr_dict, attrs_of, group_at, v3_metadata


@pytest.fixture
def root():
    g = zarr.open_group(zarr.storage.MemoryStore(), mode="w", zarr_format=3)
    lvl = g.create_group("0", attributes={"zarr_vectors_level": {"vertex_count": 3}, "dtype": "float32"})
    lvl.create_array("vertices", shape=(2,), dtype="int8", attributes={"nonempty_chunks": ["0"]})
    lvl.create_group("links")
    return g


def test_nodes_of_the_kind_asked(root):
    assert isinstance(array_at(root, "0/vertices"), zarr.Array)
    assert array_at(group_at(root, "0"), "vertices").path == "0/vertices"
    assert group_at(root, "0/links").path == "0/links"
    assert attrs_of(array_at(root, "0/vertices")) == {"nonempty_chunks": ["0"]}
    assert v3_metadata(array_at(root, "0/vertices")).zarr_format == 3


def test_a_node_of_the_other_kind_is_a_store_error_naming_it(root):
    with pytest.raises(StoreError, match="a group at 0/links where an array belongs"):
        array_at(root, "0/links")
    with pytest.raises(StoreError, match="an array at 0/vertices where a group belongs"):
        group_at(group_at(root, "0"), "vertices")
    with pytest.raises(KeyError):  # nothing there: zarr's KeyError, as before
        array_at(root, "0/nothing")


def test_a_zarr_v2_array_is_named(tmp_path):
    v2 = zarr.open_group(str(tmp_path / "v2"), mode="w", zarr_format=2)
    arr = v2.create_array("a", shape=(2,), dtype="int8")
    with pytest.raises(StoreError, match="the array a is a zarr v2 array"):
        v3_metadata(arr)


def test_attr_dict(root):
    level = group_at(root, "0")
    assert attr_dict(level, "zarr_vectors_level") == {"vertex_count": 3}
    assert attr_dict(level, "absent", {}) == {}
    with pytest.raises(KeyError):
        attr_dict(level, "absent")
    with pytest.raises(MetadataError, match="the attribute 'dtype' of 0 is str 'float32'; expected a JSON object"):
        attr_dict(level, "dtype")


def test_a_store_with_a_group_where_an_array_belongs(tmp_path, rng):
    path = tmp_path / "s.zv"
    write_points(str(path), rng.uniform(0, 1, (50, 3)), chunk_shape=0.5)
    g = zarr.open_group(str(path), mode="r+", zarr_format=3)
    del g["0/vertices"]
    g.create_group("0/vertices")
    with pytest.raises(StoreError, match="a group at 0/vertices where an array belongs"):
        read_points(str(path))
