"""Bad input gets a typed zv_dask error that names the problem, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

import zv_dask as Z
from zv_dask.errors import InputError, MetadataError, OutOfBoundsError, StoreError, ZVError
from zv_dask.local import write_points

PTS = np.random.default_rng(5).uniform(0, 100, (40, 3))


def snapshot(path: Path):
    """Every file under ``path`` with its bytes (``None`` when the path does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(path.rglob("*"))}


def assert_refused(target: Path, call, error, match):
    """``call`` raises ``error`` whose message matches, and ``target`` is unchanged byte for byte."""
    before = snapshot(target)
    with pytest.raises(error, match=match) as info:
        call()
    assert isinstance(info.value, ZVError)
    assert snapshot(target) == before, f"{target} changed"
    return info.value


# -- write_points: nothing is created for bad input --------------------------------------------
BAD_WRITES = {
    "bounds_ndim": (dict(chunk_shape=[50] * 3, bounds=([0, 0], [100, 100])), InputError, r"3 values each.*\[0, 0\]"),
    "chunk_ndim": (dict(chunk_shape=[50, 50]), InputError, r"chunk_shape has 2 values \(\[50, 50\]\).*3 coordinates"),
    "bins_ndim": (dict(chunk_shape=[50] * 3, base_bin_shape=[25, 25]), InputError, r"base_bin_shape has 2 values"),
    "axes_ndim": (dict(chunk_shape=[50] * 3, axes=["x", "y"]), InputError, r"axes has 2 entries.*'x', 'y'"),
    "inverted": (dict(chunk_shape=[50] * 3, bounds=([0, 0, 100], [100, 100, 0])), InputError,
                 r"inverted: min \[0.0, 0.0, 100.0\] exceeds max \[100.0, 100.0, 0.0\]"),
    "nonfinite_bounds": (dict(chunk_shape=[50] * 3, bounds=([0, 0, np.nan], [100] * 3)), InputError, "finite"),
    "not_multiple": (dict(chunk_shape=[50] * 3, base_bin_shape=[30] * 3), MetadataError,
                     r"chunk_shape \[50.0, 50.0, 50.0\].*whole multiple of base_bin_shape \[30.0, 30.0, 30.0\]"),
    "zero_chunk": (dict(chunk_shape=[0, 50, 50]), MetadataError, r"chunk_shape must be finite and > 0.*0.0"),
    "no_chunk_shape": (dict(), InputError, "chunk_shape is required"),
    "int_dtype": (dict(chunk_shape=[50] * 3, dtype="int32"), InputError, r"float32 or float64.*'int32'"),
    "bogus_dtype": (dict(chunk_shape=[50] * 3, dtype="bogus"), InputError, r"'bogus' is not a numpy dtype"),
    "out_of_bounds": (dict(chunk_shape=[50] * 3, bounds=([0] * 3, [50] * 3)), OutOfBoundsError,
                      r"points lie outside the bounds \[\[0.0, 0.0, 0.0\], \[50.0, 50.0, 50.0\]\].*'ignore'.*'expand'"),
    "policy": (dict(chunk_shape=[50] * 3, out_of_bounds="clip"), InputError, r"'clip' is not one of"),
    "attr_len": (dict(chunk_shape=[50] * 3, attributes={"w": np.zeros(39)}), InputError,
                 r"attribute 'w' has 39 rows but there are 40 points"),
    "attr_dtype": (dict(chunk_shape=[50] * 3, attributes={"s": np.array(["a"] * 40)}), InputError,
                   r"attribute 's' has dtype <U1; only bool, integer and float"),
    "attr_shape": (dict(chunk_shape=[50] * 3, attributes={"m": np.zeros((40, 2, 2))}), InputError,
                   r"attribute 'm' must be \(N,\) or \(N, C\), got shape \(40, 2, 2\)"),
    "attr_name": (dict(chunk_shape=[50] * 3, attributes={"a/b": np.zeros(40)}), InputError, r"'a/b'.*without '/'"),
    "oid_len": (dict(chunk_shape=[50] * 3, object_ids=np.zeros(41, int)), InputError,
                r"object_ids has 41 rows but there are 40 points"),
    "oid_float": (dict(chunk_shape=[50] * 3, object_ids=np.zeros(40)), InputError, r"integers, got dtype float64"),
    "oid_uint64": (dict(chunk_shape=[50] * 3, object_ids=np.zeros(40, np.uint64)), InputError, "uint64"),
    "backend": (dict(chunk_shape=[50] * 3, backend="nope"), StoreError, r"unknown backend 'nope'; use one of local"),
}


@pytest.mark.parametrize("name", list(BAD_WRITES))
def test_bad_write_creates_nothing(tmp_path, name):
    kw, error, match = BAD_WRITES[name]
    target = tmp_path / "new.zarr"
    assert_refused(target, lambda: write_points(str(target), PTS, **kw), error, match)
    assert not target.exists()


@pytest.mark.parametrize("bad, match", [
    (np.where(np.arange(120).reshape(40, 3) == 16, np.nan, PTS), r"1 point\(s\) have non-finite.*row 5"),
    (np.where(np.arange(120).reshape(40, 3) == 61, np.inf, PTS), r"non-finite.*row 20"),
])
def test_nonfinite_coordinates(tmp_path, bad, match):
    target = tmp_path / "nf.zarr"
    assert_refused(target, lambda: write_points(str(target), bad, chunk_shape=[50] * 3), InputError, match)
    # also with explicit bounds, and into an existing empty store
    assert_refused(target, lambda: write_points(str(target), bad, chunk_shape=[50] * 3, bounds=([0] * 3, [100] * 3)),
                   InputError, match)
    warm = tmp_path / "warm.zarr"
    Z.create_store(str(warm), bounds=([0] * 3, [100] * 3), chunk_shape=[50] * 3)
    assert_refused(warm, lambda: write_points(str(warm), bad), InputError, match)


@pytest.mark.parametrize("points, match", [
    (PTS[:, 0], r"2-D \(N, D\) array, got shape \(40,\)"),
    (PTS[:0], "holds no points"),
    (PTS.astype(str), "integer or float coordinates"),
    ([[1, 2, 3]], r"\(N, D\) array, got list"),
])
def test_bad_points(tmp_path, points, match):
    target = tmp_path / "bp.zarr"
    assert_refused(target, lambda: write_points(str(target), points, chunk_shape=[50] * 3), InputError, match)


# -- create_store ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, error, match", [
    (dict(bounds=([0, 0, 0], [1, 1, 1]), chunk_shape=[1, 1]), MetadataError,
     "inconsistent number of axes: chunk_shape has 2, bounds"),
    (dict(bounds=([0, 0, 0], [1, 1, 1]), axes=["x", "y"]), MetadataError, "axes has 2"),
    (dict(ndim=2, chunk_shape=[1, 1, 1]), MetadataError, "ndim has 2, chunk_shape has 3"),
    (dict(bounds=([0, 0, 5], [1, 1, 1]), chunk_shape=[1] * 3), MetadataError, r"inverted: min \[0.0, 0.0, 5.0\]"),
    (dict(bounds=([0, 0, 0], [1, np.inf, 1]), chunk_shape=[1] * 3), MetadataError, "finite"),
    (dict(chunk_shape=[50] * 3, base_bin_shape=[30] * 3), MetadataError,
     r"base_bin_shape \[30.0, 30.0, 30.0\] must divide chunk_shape \[50.0, 50.0, 50.0\]"),
    (dict(chunk_shape=[50] * 3, axes=["x", "x", "z"]), MetadataError, r"unique.*\['x', 'x', 'z'\]"),
    (dict(ndim=3, vertex_dtype="int16"), MetadataError, r"float type.*'int16'"),
    (dict(ndim=3, backend="nope"), StoreError, "unknown backend 'nope'"),
])
def test_bad_create_store(tmp_path, kw, error, match):
    target = tmp_path / "c.zarr"
    assert_refused(target, lambda: Z.create_store(str(target), **kw), error, match)


def test_creating_over_an_existing_store(tmp_path):
    target = tmp_path / "s.zarr"
    write_points(str(target), PTS, chunk_shape=[50] * 3)
    assert_refused(target, lambda: Z.create_store(str(target), ndim=3), StoreError,
                   r"a store already exists at .*s.zarr'; pass overwrite=True")
    assert_refused(target, lambda: write_points(str(target), PTS, chunk_shape=[50] * 3), StoreError,
                   "already holds points; pass overwrite=True")
    assert_refused(target, lambda: write_points(Z.open_store(str(target), "r+"), PTS), StoreError,
                   "already holds points")
    # the same through icechunk: an existing repository is not re-created
    repo = tmp_path / "repo"
    Z.commit(Z.create_store(str(repo), ndim=3, backend="icechunk"), "init")
    assert_refused(repo, lambda: Z.create_store(str(repo), ndim=3, backend="icechunk"), StoreError,
                   "a store already exists")
    # an icechunk repository cannot be created inside a non-empty directory
    assert_refused(target, lambda: Z.create_store(str(target), ndim=3, backend="icechunk"), StoreError,
                   "cannot create an icechunk repository .*needs an empty location")


# -- opening things that are not ZV stores --------------------------------------------------------
def _make_not_stores(base: Path) -> dict[str, Path]:
    out = {}
    out["empty_dir"] = base / "empty"
    out["empty_dir"].mkdir()
    out["plain_group"] = base / "plain.zarr"
    zarr.open_group(str(out["plain_group"]), mode="w").attrs["something"] = 1
    out["zarr_array"] = base / "array.zarr"
    zarr.create_array(str(out["zarr_array"]), shape=(3,), dtype="i4")
    out["zarr_v2_group"] = base / "v2.zarr"
    zarr.open_group(str(out["zarr_v2_group"]), mode="w", zarr_format=2)
    out["random_file"] = base / "random.bin"
    out["random_file"].write_bytes(np.random.default_rng(0).bytes(100))
    out["bad_json"] = base / "badjson"
    out["bad_json"].mkdir()
    (out["bad_json"] / "zarr.json").write_text("{not json")
    out["other_files"] = base / "other"
    out["other_files"].mkdir()
    (out["other_files"] / "notes.txt").write_text("hello")
    return out


NOT_STORES = ["empty_dir", "plain_group", "zarr_array", "zarr_v2_group", "random_file", "bad_json", "other_files"]


@pytest.mark.parametrize("kind", NOT_STORES)
@pytest.mark.parametrize("mode", ["r", "r+"])
def test_open_not_a_store(tmp_path, kind, mode):
    target = _make_not_stores(tmp_path)[kind]
    assert_refused(target, lambda: Z.open_store(str(target), mode), StoreError, r"not a ZV store at '.*'")


@pytest.mark.parametrize("kind", [k for k in NOT_STORES if k != "empty_dir"])
def test_write_into_not_a_store(tmp_path, kind):
    target = _make_not_stores(tmp_path)[kind]
    assert_refused(target, lambda: write_points(str(target), PTS, chunk_shape=[50] * 3), StoreError,
                   "exists and is not a ZV store; refusing to write into it")


def test_open_missing_and_malformed(tmp_path):
    missing = tmp_path / "missing.zarr"
    for mode in ("r", "r+"):
        assert_refused(missing, lambda mode=mode: Z.open_store(str(missing), mode), StoreError,
                       "the path does not exist")
    assert_refused(missing, lambda: Z.open_store(str(missing), "r", backend="icechunk"), StoreError,
                   "no icechunk repository")
    assert not missing.exists()
    partial = tmp_path / "partial.zarr"
    zarr.open_group(str(partial), mode="w").attrs["zarr_vectors"] = {"zv_version": "0.9.2"}
    assert_refused(partial, lambda: Z.open_store(str(partial)), MetadataError,
                   r"lacks required keys \['chunk_shape', 'bounds', 'geometry_types'\]")
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w")
    assert_refused(plain, lambda: Z.open_store(str(plain), "r+", backend="icechunk"), StoreError,
                   "no icechunk repository")


# -- URLs and backends ----------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: Z.open_store("foo://bucket/x"),
    lambda: Z.create_store("foo://bucket/x", ndim=3),
    lambda: write_points("foo://bucket/x", PTS, chunk_shape=[50] * 3),
])
def test_unknown_url_scheme(call):
    with pytest.raises(StoreError, match=r"unknown URL scheme 'foo' in 'foo://bucket/x'.*s3://"):
        call()


def test_unknown_backend(tmp_path):
    store = tmp_path / "s.zarr"
    write_points(str(store), PTS, chunk_shape=[50] * 3)
    assert_refused(store, lambda: Z.open_store(str(store), backend="nope"), StoreError,
                   r"unknown backend 'nope'; use one of local, obstore, fsspec, icechunk")
    with pytest.raises(StoreError, match="cannot make a store from int"):
        Z.open_store(42)


def test_warm_store_mismatch(tmp_path):
    warm = tmp_path / "warm.zarr"
    Z.create_store(str(warm), bounds=([0] * 3, [100] * 3), chunk_shape=[50] * 3)
    assert_refused(warm, lambda: write_points(str(warm), PTS[:, :2]), InputError,
                   "the points have 2 coordinates but the store has 3 axes")
    assert_refused(warm, lambda: write_points(str(warm), PTS, chunk_shape=[10] * 3), InputError,
                   r"chunk_shape \[10\.0, 10\.0, 10\.0\] differs from the store's \[50.0, 50.0, 50.0\]")
    assert_refused(warm, lambda: write_points(str(warm), PTS + 80), OutOfBoundsError, "outside the bounds")
    assert json.loads((warm / "0/vertices/zarr.json").read_text())["attributes"]["nonempty_chunks"] == []


def test_hostile_inputs_get_errors_that_name_them(tmp_path):
    """Each once silently accepted, or a raw numpy/zarr error; now one clear zv-dask error and nothing written."""
    pts = np.random.default_rng(0).random((500, 3)) * 100
    (tmp_path / "h.csv").write_text("x,y,z\n")
    with dask.config.set(scheduler="sync"):
        with pytest.raises(InputError, match=r"attribute name\(s\) \['x'\] are taken.*axis \['x', 'y', 'z'\]"):
            Z.ingest(pts, tmp_path / "a.zv", chunk_shape=25, attributes={"x": np.zeros(500)})
        with pytest.raises(InputError, match=r"\['object_id'\] are taken"):
            Z.ingest(pts, tmp_path / "a.zv", chunk_shape=25, attributes={"object_id": np.zeros(500)})
        with pytest.raises(InputError, match=r"too large for the stored position dtype.*row 500.*dtype='float64'"):
            Z.ingest(np.vstack([pts, [[1e300, 0, 0]]]), tmp_path / "a.zv", chunk_shape=25)
        with pytest.raises(InputError, match=r"2 point\(s\) have non-finite.*1 of them too large"):
            Z.ingest(np.vstack([pts, [[np.nan, 0, 0], [1e300, 0, 0]]]), tmp_path / "a.zv", chunk_shape=25)
        with pytest.raises(MetadataError, match=r"makes a grid of about .* chunks.*larger chunk_shape"):
            Z.ingest(pts, tmp_path / "a.zv", chunk_shape=1e-6)
        with pytest.raises(InputError, match=r"dtype 'bogus' is not a numpy dtype"):
            Z.ingest(pts, tmp_path / "a.zv", chunk_shape=25, dtype="bogus")
        with pytest.raises(InputError, match=r"holds no rows \(a header only\)"):
            Z.ingest(str(tmp_path / "h.csv"), tmp_path / "a.zv", chunk_shape=25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.csv"]
    zs = Z.create_store(tmp_path / "s.zv", chunk_shape=25, bounds=([0] * 3, [100] * 3))  # a scalar: every axis
    assert zs.metadata.chunk_shape == (25.0, 25.0, 25.0)


def test_task_stage_names_the_stage_the_chunk_and_the_cause():
    """TaskStage: a ZVError passes untouched; anything else becomes an IngestError with stage, chunk and cause,
    which survives pickling (a worker's error on its way to the client)."""
    import pickle

    from zv_dask.errors import IngestError, InputError, TaskStage

    with pytest.raises(InputError, match="^as it was$"):
        with TaskStage("write", "writing group 3"):
            raise InputError("as it was")
    with pytest.raises(IngestError) as info:
        with TaskStage("write", "writing group 3") as st:
            st.chunk = "1.2.3"
            raise OSError(28, "No space left on device")
    err = info.value
    assert str(err).startswith("writing group 3 (first chunk 1.2.3) failed: ") and "no space left" in str(err).lower()
    assert (err.stage, err.chunk) == ("write", "1.2.3") and isinstance(err.__cause__, OSError)
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.stage, back.chunk) == (str(err), "write", "1.2.3")
    with pytest.raises(IngestError, match=r"^pyramid level 2: reading 4 chunks failed: KeyError: 'x'$"):
        with TaskStage("pyramid level 2", "pyramid level 2: reading 4 chunks", raw=True):
            raise KeyError("x")
    with pytest.raises(KeyboardInterrupt):  # not an Exception: passes
        with TaskStage("write", "w"):
            raise KeyboardInterrupt
