"""zv-dask on real object storage: SeaweedFS on 127.0.0.1 through obstore (no mocks).

Every test gets its own key prefix on the one session server (``s3_prefix``).
"""

from __future__ import annotations

import socket
import time

import numpy as np
import obstore
import pytest
import zarr
from conftest import canon

import zv_dask
from zv_dask import StoreError
from zv_dask.local import read_points, write_points

pytestmark = pytest.mark.s3

BOUNDS = ([0.0, 0.0, 0.0], [100.0, 100.0, 100.0])
CHUNK = (25.0, 25.0, 25.0)


def _points(rng, n=2000):
    pts = rng.uniform(0, 100, (n, 3)).astype("f4")
    attrs = {"intensity": rng.integers(0, 65535, n).astype("u2"), "rgb": rng.integers(0, 255, (n, 3)).astype("u1")}
    return pts, attrs


def _keys(srv, prefix):
    return sorted(m["path"] for m in obstore.list(srv.obstore(), prefix=f"{prefix}/").collect())


def _snapshot(srv, prefix) -> dict[str, bytes]:
    raw = srv.obstore()
    return {k: bytes(obstore.get(raw, k).bytes()) for k in _keys(srv, prefix)}


def _reference(srv, key_prefix):
    """The reference reader (zarr-vectors 0.9.2) on a zarr ObjectStore it did not build."""
    import zarr_vectors
    from zarr_vectors.core.store import open_store as zv_open_group
    from zarr_vectors.validate import validate

    store = zarr.storage.ObjectStore(srv.obstore(prefix=key_prefix), read_only=True)
    ds = zarr_vectors.open(store)
    result = validate(zv_open_group(store), level=5)
    return ds, result


def _closed_port() -> int:
    with socket.socket() as s:  # bound then released: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_write_points_round_trip_on_s3(s3_server, s3_prefix, s3_options, rng):
    pts, attrs = _points(rng)
    url = s3_server.url(s3_prefix, "store.zv")
    zs = write_points(url, pts, attributes=attrs, chunk_shape=CHUNK, bounds=BOUNDS, storage_options=s3_options)
    assert zs.backend.kind == "obstore" and zs.url == url

    keys = _keys(s3_server, s3_prefix)
    assert f"{s3_prefix}/store.zv/zarr.json" in keys
    assert f"{s3_prefix}/store.zv/0/vertices/zarr.json" in keys
    assert all(k.startswith(f"{s3_prefix}/store.zv/") for k in keys)

    # our reader, through a fresh handle
    back = read_points(zv_dask.open_store(url, storage_options=s3_options))
    np.testing.assert_array_equal(canon(back["positions"], back["attributes"]["intensity"], back["attributes"]["rgb"]),
                                  canon(pts, attrs["intensity"], attrs["rgb"]))

    # the reference reader and validator, on a zarr ObjectStore over obstore's S3Store
    ds, result = _reference(s3_server, f"{s3_prefix}/store.zv")
    assert result.ok, result.errors
    ref = ds.read()
    np.testing.assert_array_equal(canon(ref.positions, ref.attributes["intensity"], ref.attributes["rgb"]),
                                  canon(pts, attrs["intensity"], attrs["rgb"]))


def test_obstore_store_objects_are_accepted(s3_server, s3_prefix, s3_options, rng):
    """A pre-built obstore S3Store (and a zarr ObjectStore over it) work like the URL."""
    pts, _ = _points(rng, 300)
    url = s3_server.url(s3_prefix, "store.zv")
    write_points(url, pts, chunk_shape=CHUNK, bounds=BOUNDS, storage_options=s3_options)
    raw = s3_server.obstore(prefix=f"{s3_prefix}/store.zv")
    for target in (raw, zarr.storage.ObjectStore(raw, read_only=False)):
        zs = zv_dask.open_store(target, "r")
        assert zs.store.read_only
        np.testing.assert_array_equal(canon(read_points(zs)["positions"]), canon(pts))


def test_create_and_open_store_on_s3_mode_r_is_read_only(s3_server, s3_prefix, s3_options):
    url = s3_server.url(s3_prefix, "warm.zv")
    zs = zv_dask.create_store(url, bounds=BOUNDS, chunk_shape=CHUNK, storage_options=s3_options)
    assert zs.levels == [0]
    with pytest.raises(StoreError, match="already exists"):
        zv_dask.create_store(url, bounds=BOUNDS, chunk_shape=CHUNK, storage_options=s3_options)

    before = _snapshot(s3_server, s3_prefix)
    ro = zv_dask.open_store(url, "r", storage_options=s3_options)
    assert ro.read_only and ro.store.read_only
    assert ro.metadata.bounds == (tuple(BOUNDS[0]), tuple(BOUNDS[1]))
    with pytest.raises(StoreError, match="read-only"):
        zv_dask.add_resolution_level(ro, 1, 2)
    with pytest.raises(StoreError, match="read-only"):
        zv_dask.write_parametric_types(ro, [{"name": "x"}])
    with pytest.raises(ValueError):  # below the API, the zarr store itself refuses
        ro.root.attrs.update({"sneaky": 1})
    with pytest.raises(ValueError):
        ro.root.create_group("sneaky")
    assert _snapshot(s3_server, s3_prefix) == before

    rw = zv_dask.open_store(url, "r+", storage_options=s3_options)
    zv_dask.add_resolution_level(rw, 1, 2)
    assert zv_dask.open_store(url, storage_options=s3_options).levels == [0, 1]


def test_open_missing_store_on_s3(s3_server, s3_prefix, s3_options):
    with pytest.raises(StoreError, match="not a ZV store"):
        zv_dask.open_store(s3_server.url(s3_prefix, "nothing.zv"), storage_options=s3_options)


def test_wrong_secret_fails_fast_and_clearly(s3_server, s3_prefix, s3_options, rng):
    url = s3_server.url(s3_prefix, "store.zv")
    zv_dask.create_store(url, bounds=BOUNDS, chunk_shape=CHUNK, storage_options=s3_options)
    bad = {**s3_options, "secret_access_key": "not-the-secret"}
    for attempt in (lambda: zv_dask.open_store(url, storage_options=bad),
                    lambda: zv_dask.create_store(s3_server.url(s3_prefix, "other.zv"), storage_options=bad),
                    lambda: write_points(s3_server.url(s3_prefix, "w.zv"), _points(rng, 10)[0], chunk_shape=CHUNK,
                                         storage_options=bad)):
        t0 = time.monotonic()
        with pytest.raises((StoreError, obstore.exceptions.BaseError)) as info:
            attempt()
        assert time.monotonic() - t0 < 10, "a 403 must not be retried until a timeout"
        msg = str(info.value)
        assert "403" in msg or "privileges" in msg.lower() or "Forbidden" in msg
        assert "not-the-secret" not in msg
    assert not any("other.zv" in k or "w.zv" in k for k in _keys(s3_server, s3_prefix))


def test_unreachable_endpoint_fails_fast_with_timeout_and_max_retries(s3_options):
    opts = {**s3_options, "endpoint": f"http://127.0.0.1:{_closed_port()}", "timeout": 2, "max_retries": 0}
    t0 = time.monotonic()
    with pytest.raises((StoreError, obstore.exceptions.BaseError)):
        zv_dask.open_store("s3://test/nowhere/store.zv", storage_options=opts)
    assert time.monotonic() - t0 < 10


def test_storage_option_vocabulary(s3_server, s3_prefix, s3_options, rng):
    """The options shared with the icechunk backend, in the spellings users bring along."""
    pts, _ = _points(rng, 200)
    url = s3_server.url(s3_prefix, "store.zv")
    write_points(url, pts, chunk_shape=CHUNK, bounds=BOUNDS, storage_options=s3_options)
    variants = [
        {"timeout": 30, "max_retries": 2, "connect_timeout": "5s"},
        {"timeout": "30s"},
        {"timeout": 12.5},
        {"endpoint_url": s3_options["endpoint"], "endpoint": None, "force_path_style": True},
        {"concurrency": 8},  # zv-dask's own (requests in flight per cell I/O call), not passed to obstore
        {"client_options": {"allow_http": True}, "retry_config": {"max_retries": 1}},
    ]
    for extra in variants:
        opts = {**s3_options, **extra}
        opts = {k: v for k, v in opts.items() if v is not None}
        zs = zv_dask.open_store(url, storage_options=opts)
        assert len(read_points(zs)["positions"]) == len(pts), extra
    with pytest.raises(StoreError, match="not_an_option"):
        zv_dask.open_store(url, storage_options={**s3_options, "not_an_option": 1})
    with pytest.raises(StoreError, match="timeout"):
        zv_dask.open_store(url, storage_options={**s3_options, "timeout": "soon"})
    with pytest.raises(StoreError, match="max_retries"):
        zv_dask.open_store(url, storage_options={**s3_options, "max_retries": -1})


def test_stray_aws_environment_does_not_override_explicit_options(s3_server, s3_prefix, s3_options, rng,
                                                                 monkeypatch):
    """obstore merges AWS_* variables into explicit keys (a stray session token gives 403)."""
    pts, _ = _points(rng, 100)
    url = s3_server.url(s3_prefix, "store.zv")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stray-token")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stray-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stray-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    write_points(url, pts, chunk_shape=CHUNK, bounds=BOUNDS, storage_options=s3_options)
    assert len(read_points(zv_dask.open_store(url, storage_options=s3_options))["positions"]) == len(pts)


def test_credentials_stay_out_of_reprs(s3_server, s3_prefix, s3_options):
    url = s3_server.url(s3_prefix, "store.zv")
    secret = s3_options["secret_access_key"]
    zs = zv_dask.create_store(url, bounds=BOUNDS, chunk_shape=CHUNK, storage_options=s3_options)
    ro = zv_dask.open_store(url, "r", storage_options=s3_options)
    for obj in (zs, ro, zs.backend, ro.backend, zs.store, ro.store, zs.store.store):
        assert secret not in repr(obj) and secret not in str(obj), type(obj).__name__
    assert zs.backend.options["secret_access_key"] == secret  # kept for rebinding, just not shown


def test_server_restart_in_place_keeps_data(s3_server, s3_prefix, s3_options, rng):
    """The fixture's server can be restarted on the same ports and data dir (for fault injection)."""
    pts, _ = _points(rng, 500)
    url = s3_server.url(s3_prefix, "store.zv")
    write_points(url, pts, chunk_shape=CHUNK, bounds=BOUNDS, storage_options=s3_options)
    endpoint, pid = s3_server.endpoint, s3_server.proc.pid
    s3_server.stop()
    assert not s3_server.running
    with pytest.raises((StoreError, obstore.exceptions.BaseError)):
        zv_dask.open_store(url, storage_options={**s3_options, "timeout": 2, "max_retries": 0})
    s3_server.restart()
    assert s3_server.running and s3_server.endpoint == endpoint and s3_server.proc.pid != pid
    np.testing.assert_array_equal(canon(read_points(zv_dask.open_store(url, storage_options=s3_options))["positions"]),
                                  canon(pts))
