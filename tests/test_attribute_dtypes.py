"""An attribute's cells hold exactly the dtype its array declares, or nothing is written.

A reader sizes every ``vertex_attributes/<name>`` cell by the array's declared
dtype alone, so a cell of another width makes the store unreadable (the issue:
``point_source_id`` declared float64, cells of uint16). The encoder takes the
declaration and refuses any other dtype (no cast: a cast could lose data);
the write targets re-check every cell's byte count, whatever made the payload;
the shuffle casts a partition to its declared dtype only when no value changes.
"""

from __future__ import annotations

import importlib

import dask
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import zv_dask
from zv_dask.errors import FormatError, InputError
from zv_dask.format.cells import decode_attribute, encode_attribute
from zv_dask.format.grid import Grid
from zv_dask.format.layout import ChunkPayload, encode_plan, plan_chunks
from zv_dask.ingest.staging import PieceLayout, lossless_cast
from zv_dask.store.levels import AttributeSpec, payload_targets
from zv_dask.validate import attribute_size_problem, validate_store

DTYPES = ["uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float32", "float64", "bool"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _sync():
    with dask.config.set(scheduler="sync"):
        yield


# -- the encoder -----------------------------------------------------------------------------
@FAST
@given(dtype=st.sampled_from(DTYPES), other=st.sampled_from(DTYPES), channels=st.sampled_from([None, 1, 3]),
       data=st.data())
def test_encode_takes_the_declared_dtype(dtype, other, channels, data):
    n = data.draw(st.integers(0, 12))
    values = data.draw(hnp.arrays(np.dtype(dtype), (n,) if channels is None else (n, channels)))
    payload = encode_attribute(values, dtype, channels, name="a")
    assert len(payload) == values.size * np.dtype(dtype).itemsize
    back = decode_attribute(payload, dtype, n, channels)
    assert back.dtype == np.dtype(dtype) and back.shape == values.shape
    assert back.tobytes() == values.tobytes()  # exact, NaN payloads included
    assert bytes(encode_attribute(values, dtype, channels, name="a", view=True)) == payload
    if other != dtype:
        with pytest.raises(FormatError, match=f"attribute 'a' is declared {other} but its values are {dtype}"):
            encode_attribute(values, other, channels, name="a")
    wrong = {None: 3, 1: 3, 3: 1}[channels]
    with pytest.raises(FormatError, match="attribute 'a' is declared with"):
        encode_attribute(values, dtype, wrong, name="a")


def test_encode_accepts_another_byte_order_only():
    big = np.arange(5, dtype=">u2")
    assert encode_attribute(big, "uint16") == np.arange(5, dtype="<u2").tobytes()  # byte order is not a cast
    with pytest.raises(FormatError, match="declared int16 but its values are uint16"):
        encode_attribute(big, "int16")
    with pytest.raises(FormatError, match="not numeric"):
        encode_attribute(np.zeros(2, "U1"), "U1")


def test_encode_plan_names_level_attribute_and_dtypes():
    grid = Grid((0.0,) * 3, (100.0,) * 3, (50.0,) * 3, (25.0,) * 3)
    pos = np.random.default_rng(0).uniform(0, 100, (50, 3)).astype(np.float32)
    plan = plan_chunks(pos, grid)
    psid = np.arange(50, dtype=np.uint16)
    good = list(encode_plan(plan, pos, {"psid": psid}, "float32", [AttributeSpec("psid", "uint16")], level=0))
    assert sum(len(p.attributes["psid"]) for p in good) == 100
    with pytest.raises(FormatError, match="level 0: attribute 'psid' is declared float64 but its values are uint16"):
        list(encode_plan(plan, pos, {"psid": psid}, "float32", [AttributeSpec("psid", "float64")], level=0))
    with pytest.raises(FormatError, match=r"attribute arrays are \['psid'\] but the values to write are \[\]"):
        list(encode_plan(plan, pos, {}, "float32", [AttributeSpec("psid", "uint16")]))


def test_write_targets_check_every_cell_size():
    """The backstop at the one place every attribute cell becomes a write: a payload of another width is refused."""
    grid = Grid((0.0,) * 3, (100.0,) * 3, (50.0,) * 3, (50.0,) * 3)
    ok = ChunkPayload((0, 0, 0), 3, b"", b"", {"psid": np.zeros(3, "<u2").tobytes()})
    targets = payload_targets(0, grid, [ok], [AttributeSpec("psid", "uint16")])
    assert [t[0] for t in targets] == ["0/vertices", "0/vertex_fragments", "0/vertex_attributes/psid"]
    with pytest.raises(FormatError, match=r"level 0 chunk 0\.0\.0: attribute 'psid' is declared float64 x 1 "
                                          r"\(8 bytes a row\) but its cell holds 6 bytes for 3 rows"):
        payload_targets(0, grid, [ok], [AttributeSpec("psid", "float64")])
    with pytest.raises(FormatError, match="no cell for attribute 'rgb'"):
        payload_targets(0, grid, [ok], [AttributeSpec("psid", "uint16"), AttributeSpec("rgb", "uint8", 3)])


def test_size_problem_says_what_the_bytes_suggest():
    assert attribute_size_problem(4250, 2125, "float64", None) == \
        "4250 bytes for 2125 rows is 2 bytes a value (uint16/int16/float16?), not float64 (8 bytes a value)"
    assert attribute_size_problem(4250, 2125, "uint16", None) is None
    assert attribute_size_problem(30, 10, "uint8", None) == \
        "30 bytes for 10 rows is 3 uint8 values a row, not 1 (uint8)"
    assert "is not a whole number of values a row" in attribute_size_problem(31, 10, "uint8", 3)
    assert attribute_size_problem(0, 0, "float64", 3) is None
    assert attribute_size_problem(8, 0, "float64", None) == "8 bytes for 0 rows, expected none (float64)"


# -- the shuffle's cast to the declared dtype ------------------------------------------------------
def test_lossless_cast_keeps_values_or_refuses():
    assert lossless_cast("a", np.arange(3, dtype=np.uint16), "float64").dtype == np.float64  # widening
    assert lossless_cast("a", np.array([1.0, 2.0]), "int32").tolist() == [1, 2]  # every value survives
    for values, dtype in [(np.array([1.5]), "uint16"), (np.array([np.nan]), "int64"), (np.array([70000]), "uint16"),
                          (np.array([0.1]), "float32"), (np.array([2**53 + 1]), "float64")]:
        with pytest.raises(InputError, match=f"attribute 'a' is declared {dtype} but a partition holds"):
            lossless_cast("a", values, dtype)


# -- through the writers: ingest, append, build_pyramid ------------------------------------------------
def _points(n=2125, seed=3):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 100, (n, 3)), rng.integers(0, 60000, n).astype(np.uint16)


def _declare(monkeypatch, name, dtype):
    """A test double of the *input*: its source declares ``name`` as ``dtype`` whatever its partitions hold."""
    plan = importlib.import_module("zv_dask.ingest.plan")
    real = plan.as_source

    def lying(*args, **kwargs):
        src = real(*args, **kwargs)
        src.attributes = {**src.attributes, name: (dtype, src.attributes[name][1])}
        return src

    monkeypatch.setattr(plan, "as_source", lying)


def _skip_conform(monkeypatch):
    """The shuffle hands partitions on as they are, as a path that forgot to conform them would."""
    monkeypatch.setattr(PieceLayout, "conform", lambda self, batch: batch)


def test_ingest_of_a_source_declaring_wider_writes_what_it_declares(tmp_path, monkeypatch):
    """The issue's shape (declared float64, uint16 values): the cells hold float64 now, and the store reads."""
    pts, psid = _points()
    _declare(monkeypatch, "psid", "float64")
    path = tmp_path / "psid.zv"
    zv_dask.ingest(pts, str(path), attributes={"psid": psid}, chunk_shape=1000)
    assert validate_store(path).ok
    got = zv_dask.read_points(str(path), attributes=["psid"]).compute()
    assert got["psid"].dtype == np.float64 and sorted(got["psid"]) == sorted(psid.astype(np.float64))


def test_ingest_refuses_values_the_declared_dtype_cannot_hold(tmp_path, monkeypatch):
    pts, _ = _points()
    _declare(monkeypatch, "psid", "uint16")
    path = tmp_path / "psid.zv"
    with pytest.raises(InputError, match="attribute 'psid' is declared uint16 but a partition holds float64"):
        zv_dask.ingest(pts, str(path), attributes={"psid": pts[:, 0] * 1.5}, chunk_shape=1000)
    assert not (path / "zarr.json").exists()  # the store the job created is gone


def test_ingest_write_task_refuses_a_mismatch_that_reaches_it(tmp_path, monkeypatch):
    """The guard in the level-0 write task, as the user sees it from zv_dask.ingest."""
    pts, psid = _points()
    _declare(monkeypatch, "psid", "float64")
    _skip_conform(monkeypatch)
    path = tmp_path / "psid.zv"
    with pytest.raises(FormatError, match="level 0: attribute 'psid' is declared float64 but its values are uint16"):
        zv_dask.ingest(pts, str(path), attributes={"psid": psid}, chunk_shape=1000)
    assert not (path / "zarr.json").exists()


def test_append_write_task_refuses_a_mismatch(tmp_path, monkeypatch):
    pts, psid = _points(800)
    path = tmp_path / "a.zv"
    zv_dask.ingest(pts, str(path), attributes={"psid": psid}, chunk_shape=50)
    more, _ = _points(300, seed=4)
    _declare(monkeypatch, "psid", "uint16")
    _skip_conform(monkeypatch)
    with pytest.raises(FormatError, match="level 0: attribute 'psid' is declared uint16 but its values are float64"):
        zv_dask.ingest(more, str(path), attributes={"psid": more[:, 0]}, mode="append")
    assert validate_store(path).ok  # rolled back: the store is as it was


def test_pyramid_reductions_keep_the_declared_dtype(tmp_path):
    """A mean of integers is rounded back to the integer dtype on purpose (pyramid/reduce.py): cells match."""
    pts, psid = _points(3000)
    path = tmp_path / "p.zv"
    zv_dask.ingest(pts, str(path), attributes={"psid": psid}, chunk_shape=50)
    zv_dask.build_pyramid(str(path), levels=1, attribute_reduction={"psid": "mean"})
    zs = zv_dask.open_store(str(path))
    assert zs.root["1/vertex_attributes/psid"].attrs["dtype"] == "uint16"
    assert validate_store(path).ok


def test_pyramid_write_refuses_a_reduction_of_another_dtype(tmp_path, monkeypatch):
    pts, psid = _points(3000)
    path = tmp_path / "p.zv"
    zv_dask.ingest(pts, str(path), attributes={"psid": psid}, chunk_shape=50)
    stack = importlib.import_module("zv_dask.pyramid.stack")

    def widened(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            out.attributes = {k: v.astype(np.float64) for k, v in out.attributes.items()}
            return out
        return run

    monkeypatch.setattr(stack, "coarsen_runs", widened(stack.coarsen_runs))
    monkeypatch.setattr(stack, "coarsen_points", widened(stack.coarsen_points))
    with pytest.raises(FormatError, match="level 1: attribute 'psid' is declared uint16 but its values are float64"):
        zv_dask.build_pyramid(str(path), levels=1, attribute_reduction={"psid": "mean"})
