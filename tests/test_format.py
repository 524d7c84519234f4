"""Round trips of every cell encoder/decoder and of the level-0 layout, cross-checked
against the reference decoders (zarr-vectors 0.9.2) and the Appendix B hexdumps."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from zv_dask.errors import FormatError, InputError
from zv_dask.format.cells import (
    EMPTY_MANIFEST,
    decode_attribute,
    decode_fragments,
    decode_manifest,
    decode_vertices,
    encode_attribute,
    encode_fragments,
    encode_manifest,
    encode_manifests,
    encode_vertices,
)
from zv_dask.format.grid import Grid
from zv_dask.format.layout import encode_plan, plan_chunks

ref_frag = pytest.importorskip("zarr_vectors.encoding.fragments")

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numeric_dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values, dtype kind and shape (NaN equal to NaN)."""
    if a.shape != b.shape or a.dtype.newbyteorder("=") != b.dtype.newbyteorder("="):
        return False
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


# -- vertices ----------------------------------------------------------------------------
@FAST
@given(
    dtype=st.sampled_from(["float32", "float64"]),
    data=st.data(),
)
def test_vertices_round_trip(dtype, data):
    ndim = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(0, 30))
    pos = data.draw(hnp.arrays(np.dtype(dtype), (n, ndim), elements=st.floats(allow_nan=False, width=int(dtype[-2:]))))
    payload = encode_vertices(pos, dtype)
    assert len(payload) == n * ndim * np.dtype(dtype).itemsize
    # raw little-endian, row-major, no header
    assert payload == np.ascontiguousarray(pos, dtype="<" + np.dtype(dtype).str[1:]).tobytes()
    back = decode_vertices(payload, ndim, dtype)
    assert back.shape == (n, ndim) and back.dtype == np.dtype(dtype)
    assert np.array_equal(back, pos)


def test_vertices_rejects_ragged_payload():
    with pytest.raises(FormatError, match="not a whole number"):
        decode_vertices(b"\0" * 10, 3, "float32")
    with pytest.raises(FormatError, match="2-D"):
        encode_vertices(np.zeros(3), "float32")


def test_vertices_cast_from_big_endian_and_ints():
    pos = np.arange(12, dtype=">f8").reshape(4, 3)
    assert encode_vertices(pos, "float32") == np.arange(12, dtype="<f4").tobytes()
    assert encode_vertices(pos.astype(np.int32), "float64") == np.arange(12, dtype="<f8").tobytes()


# -- attributes --------------------------------------------------------------------------
@FAST
@given(dtype=numeric_dtypes, data=st.data())
def test_attribute_round_trip(dtype, data):
    n = data.draw(st.integers(0, 20))
    channels = data.draw(st.one_of(st.none(), st.integers(1, 5)))
    shape = (n,) if channels is None else (n, channels)
    values = data.draw(hnp.arrays(dtype, shape))
    payload = encode_attribute(values, dtype, channels)
    assert len(payload) == values.size * dtype.itemsize
    le = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
    assert payload == np.ascontiguousarray(values, dtype=le).tobytes()
    back = decode_attribute(payload, dtype, n, channels)
    assert back.dtype.isnative and _same(back, values.astype(dtype.newbyteorder("=")))


def test_attribute_errors():
    with pytest.raises(FormatError, match="not numeric"):
        encode_attribute(np.array(["a", "b"]), "U1")
    with pytest.raises(FormatError, match="declared int32 but its values are str32"):
        encode_attribute(np.array(["a", "b"]), "int32")
    with pytest.raises(FormatError, match="expected 2 rows x 3 channels"):
        decode_attribute(np.zeros(5, "<i4").tobytes(), "int32", 2, 3)
    with pytest.raises(FormatError, match="whole number"):
        decode_attribute(b"\0" * 5, "int32", 1)


# -- fragment index v1 -------------------------------------------------------------------
def _ranges(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, np.int64)
    return np.stack([np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts, counts], axis=1)


@FAST
@given(counts=st.one_of(
    st.just([]),
    st.lists(st.integers(0, 5), min_size=1, max_size=1),
    st.lists(st.integers(0, 1000), min_size=2, max_size=70),
    st.lists(st.just(0), min_size=1, max_size=17),
))
def test_fragments_round_trip_and_reference(counts):
    counts = np.asarray(counts, np.int64)
    f = len(counts)
    n = int(counts.sum())
    payload = encode_fragments(counts)
    expected_size = 16 if f == 0 else 16 + -(-((f + 7) // 8) // 8) * 8 + 16 * f + 4
    assert len(payload) == expected_size
    ours = decode_fragments(payload)
    assert ours.num_fragments == f
    assert np.array_equal(ours.counts, counts)
    assert np.array_equal(np.stack([ours.starts, ours.counts], axis=1).reshape(-1, 2), _ranges(counts).reshape(-1, 2))
    assert ours.tiles(n) == (f > 0) and not ours.explicit and ours.vertex_extent == n
    # the reference decoder reads the same ranges, and its encoder writes the same bytes
    ref = ref_frag.decode_fragments(payload)
    assert len(ref) == f
    assert np.array_equal(np.asarray(ref.ranges()).reshape(-1, 2), _ranges(counts).reshape(-1, 2))
    assert ref.tiles(n) == (f > 0)
    assert ref_frag.encode_fragments([(int(s), int(c)) for s, c in _ranges(counts)]) == payload


def test_fragment_known_sizes():
    # ZV_FORMAT 5.3: F=8 -> 156 bytes, F=1 -> 44, F=0 -> header only
    assert len(encode_fragments([1] * 8)) == 156
    assert len(encode_fragments([3])) == 44
    assert encode_fragments([]) == struct.pack("<IHHII", 0x5A564647, 1, 0, 0, 0)


def test_fragments_decode_reference_explicit():
    """CSR (explicit) fragments written by the reference decode with ours."""
    raw = ref_frag.encode_fragments([np.array([0, 2]), (1, 1), np.array([], np.int64), (3, 0)])
    fi = decode_fragments(raw)
    assert fi.num_fragments == 4
    assert list(fi.explicit) == [0, 2]
    assert fi.explicit[0].tolist() == [0, 2] and fi.explicit[2].tolist() == []
    assert (fi.starts[1], fi.counts[1]) == (1, 1) and (fi.starts[3], fi.counts[3]) == (3, 0)
    assert not fi.tiles(3)


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + struct.pack("<H", 2) + b[6:], "version"),
    (lambda b: b[:6] + struct.pack("<H", 1) + b[8:], "flags"),
    (lambda b: b[:12] + struct.pack("<I", 9) + b[16:], "ranges"),
    (lambda b: b[:10], "shorter than"),
    (lambda b: b[:-5], "truncated"),
    (lambda b: b + b"\0", "bytes"),
    (lambda b: b[:16] + b"\x05" + b[17:], "bitmap"),
])
def test_fragments_reject_malformed(mutate, message):
    good = encode_fragments([2, 0, 1])
    with pytest.raises(FormatError, match=message):
        decode_fragments(mutate(good))


def test_fragments_reject_negative_counts():
    with pytest.raises(FormatError):
        encode_fragments([1, -1])


# -- object manifests ----------------------------------------------------------------------
def _block(chunk, mode: int, body: bytes) -> bytes:
    return np.asarray(chunk, "<i8").tobytes() + bytes([mode]) + body


def _manifest(blocks: list[bytes]) -> bytes:
    return struct.pack("<I", len(blocks)) + b"".join(blocks)


chunk_coord = st.integers(-(2 ** 40), 2 ** 40)


@FAST
@given(data=st.data())
def test_manifest_mode0_round_trip_and_reference(data):
    ndim = data.draw(st.integers(1, 4))
    b = data.draw(st.integers(0, 12))
    chunks = np.array(data.draw(st.lists(st.lists(chunk_coord, min_size=ndim, max_size=ndim), min_size=b, max_size=b)),
                      np.int64).reshape(b, ndim)
    frags = np.array(data.draw(st.lists(st.integers(0, 2 ** 40), min_size=b, max_size=b)), np.int64)
    blob = encode_manifest(chunks, frags)
    assert len(blob) == 4 + b * (8 * ndim + 9)
    if b == 0:
        assert blob == EMPTY_MANIFEST
    c2, f2 = decode_manifest(blob, ndim)
    assert np.array_equal(c2, chunks) and np.array_equal(f2, frags)
    ref = ref_frag.decode_object_manifest_blocks(blob, ndim)
    assert [(tuple(c), int(f)) for c, f in zip(chunks.tolist(), frags.tolist())] == [(tuple(c), f) for c, f in ref]
    # built by hand: u32 B, then per block i64 chunk[D], u8 mode 0, i64 fragment
    assert blob == _manifest([_block(c, 0, struct.pack("<q", f)) for c, f in zip(chunks.tolist(), frags.tolist())])


@FAST
@given(data=st.data())
def test_manifest_modes_1_and_2_by_hand(data):
    ndim = data.draw(st.integers(1, 4))
    blocks, exp_chunks, exp_frags = [], [], []
    for _ in range(data.draw(st.integers(0, 6))):
        chunk = data.draw(st.lists(chunk_coord, min_size=ndim, max_size=ndim))
        mode = data.draw(st.sampled_from([0, 1, 2]))
        if mode == 0:
            f = [data.draw(st.integers(0, 1000))]
            blocks.append(_block(chunk, 0, struct.pack("<q", f[0])))
        elif mode == 1:
            start, count = data.draw(st.integers(0, 1000)), data.draw(st.integers(0, 6))
            f = list(range(start, start + count))
            blocks.append(_block(chunk, 1, struct.pack("<qq", start, count)))
        else:
            f = data.draw(st.lists(st.integers(0, 1000), max_size=6))
            blocks.append(_block(chunk, 2, struct.pack("<I", len(f)) + np.asarray(f, "<i8").tobytes()))
        exp_chunks += [chunk] * len(f)
        exp_frags += f
    blob = _manifest(blocks)
    chunks, frags = decode_manifest(blob, ndim)
    assert chunks.shape == (len(exp_frags), ndim)
    assert chunks.tolist() == exp_chunks and frags.tolist() == exp_frags
    # the reference reads the same blob to the same expansion
    ref_chunks, ref_frags = [], []
    for c, f in ref_frag.decode_object_manifest_blocks(blob, ndim):
        fl = [f] if isinstance(f, (int, np.integer)) else (list(range(f[0], f[0] + f[1])) if isinstance(f, tuple)
                                                           else np.asarray(f).tolist())
        ref_chunks += [list(c)] * len(fl)
        ref_frags += fl
    assert ref_chunks == exp_chunks and ref_frags == exp_frags


def test_encode_manifests_many():
    rows = np.array([0, 0, 2])
    chunks = np.array([[0, 0, 0], [1, 0, 0], [-1, 2, 3]])
    frags = np.array([0, 3, 1])
    blobs = encode_manifests(rows, chunks, frags, 4)
    assert blobs[1] == blobs[3] == EMPTY_MANIFEST
    assert blobs[0] == encode_manifest(chunks[:2], frags[:2])
    assert blobs[2] == encode_manifest(chunks[2:], frags[2:])


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x00", "shorter than"),
    (_manifest([_block([0, 0, 0], 0, struct.pack("<q", 1))])[:-3], "truncated"),
    (_manifest([_block([0, 0, 0], 1, struct.pack("<qq", 1, 2))])[:-1], "truncated"),
    (_manifest([_block([0, 0, 0], 2, struct.pack("<I", 5) + b"\0" * 16)]), "truncated"),
    (_manifest([_block([0, 0, 0], 2, b"\0\0")]), "truncated"),
    (_manifest([_block([0, 0, 0], 3, b"")]), "mode 3"),
    (_manifest([_block([0, 0, 0], 1, struct.pack("<qq", 1, -2))]), "negative"),
    (struct.pack("<I", 2) + _block([0, 0, 0], 0, struct.pack("<q", 1)), "truncated"),
    (_manifest([_block([0, 0, 0], 0, struct.pack("<q", 1))]) + b"\0", "trailing"),
])
def test_manifest_rejects_malformed(blob, message):
    with pytest.raises(FormatError, match=message):
        decode_manifest(blob, 3)


# -- layout: plan_chunks -------------------------------------------------------------------
BIN_CHOICES = [0.25, 0.5, 1.0, 2.5, 25.0]


@st.composite
def layouts(draw, with_objects: bool = False):
    ndim = draw(st.integers(1, 4))
    bin_shape = tuple(draw(st.sampled_from(BIN_CHOICES)) for _ in range(ndim))
    bpc = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    chunk_shape = tuple(b * k for b, k in zip(bin_shape, bpc))
    n = draw(st.integers(0, 60))
    # bin-lattice points (exactly on bin and chunk edges) mixed with arbitrary ones
    lattice = draw(hnp.arrays(np.int64, (n, ndim), elements=st.integers(-12, 12))) * np.asarray(bin_shape)
    free = draw(hnp.arrays(np.float64, (n, ndim), elements=st.floats(-30, 30, allow_nan=False)))
    pick = draw(hnp.arrays(np.bool_, (n, 1)))
    pos = np.where(pick, lattice, free).astype(np.float32)
    ids = None
    if with_objects:
        ids = draw(hnp.arrays(np.int64, n, elements=st.sampled_from([-(2 ** 62), -3, 0, 7, 2 ** 40, 2 ** 62])))
    return pos, bin_shape, chunk_shape, ids


def _grid_for(pos, bin_shape, chunk_shape, dtype="float32"):
    ndim = len(bin_shape)
    if len(pos):
        lo, hi = pos.min(axis=0).astype(np.float64), pos.max(axis=0).astype(np.float64)
    else:
        lo = hi = np.zeros(ndim)
    return Grid(tuple(lo), tuple(hi), chunk_shape, bin_shape, dtype)


def _check_common(plan, pos, grid):
    n = len(pos)
    # every point in exactly one chunk
    assert sorted(plan.order.tolist()) == list(range(n))
    assert plan.row_splits[0] == 0 and plan.row_splits[-1] == n
    rows_per_chunk = np.diff(plan.row_splits)
    assert (rows_per_chunk > 0).all(), "no empty chunk is ever planned"
    assert len(plan.chunks) == len(rows_per_chunk) == len(plan.frag_splits) - 1
    # fragment counts cover each chunk's rows
    per_chunk = np.add.reduceat(plan.fragment_counts, plan.frag_splits[:-1]) if len(plan.chunks) else np.zeros(0)
    assert np.array_equal(per_chunk, rows_per_chunk)
    # chunk of a point == floor(floor(p / bin) / bpc), from the float32 position promoted to float64
    bins = np.floor(pos.astype(np.float32).astype(np.float64) / np.asarray(grid.base_bin_shape)).astype(np.int64)
    expect_chunk = np.floor_divide(bins, np.asarray(grid.bins_per_chunk))
    chunk_of_row = np.repeat(plan.chunks, rows_per_chunk, axis=0).reshape(-1, grid.ndim)
    assert np.array_equal(chunk_of_row, expect_chunk[plan.order].reshape(-1, grid.ndim))
    # chunks are distinct and every one lies inside the grid (the grid covers every point)
    assert len({tuple(c) for c in plan.chunks.tolist()}) == len(plan.chunks)
    cells = grid.cells(plan.chunks)
    assert (cells >= 0).all() and (cells < np.asarray(grid.shape)).all()
    return bins, rows_per_chunk


def _fragment_of_rows(plan):
    """Fragment index (local to its chunk) of every row in storage order."""
    frag_chunk = np.repeat(np.arange(plan.n_chunks), np.diff(plan.frag_splits))
    local = np.arange(len(plan.fragment_counts)) - plan.frag_splits[frag_chunk]
    return np.repeat(local, plan.fragment_counts), np.repeat(np.arange(len(plan.fragment_counts)), plan.fragment_counts)


@settings(max_examples=60, deadline=None)
@given(layouts())
def test_plan_chunks_bins_layout(case):
    pos, bin_shape, chunk_shape, _ = case
    grid = _grid_for(pos, bin_shape, chunk_shape)
    plan = plan_chunks(pos, grid)
    bins, rows_per_chunk = _check_common(plan, pos, grid)
    f = grid.fragments_per_chunk
    # every non-empty chunk has exactly prod(bpc) fragments (empty bins included)
    assert (np.diff(plan.frag_splits) == f).all()
    local_frag, global_frag = _fragment_of_rows(plan)
    # fragment = row-major index of the bin inside its chunk, axis 0 slowest
    bpc = np.asarray(grid.bins_per_chunk)
    local_bin = bins - np.floor_divide(bins, bpc) * bpc
    expect = np.ravel_multi_index(tuple(local_bin.T), tuple(bpc)) if len(pos) else np.zeros(0, np.int64)
    assert np.array_equal(local_frag, expect[plan.order])
    # rows inside a fragment keep input order
    for g in np.unique(global_frag):
        assert (np.diff(plan.order[global_frag == g]) > 0).all()
    # the encoded fragment index tiles each chunk, as fragments_tile promises
    payloads = list(encode_plan(plan, pos, {}, "float32", []))
    for p, n_rows in zip(payloads, rows_per_chunk):
        fi = decode_fragments(p.fragments)
        assert fi.num_fragments == f and fi.tiles(int(n_rows))
        assert ref_frag.decode_fragments(p.fragments).tiles(int(n_rows))


@settings(max_examples=50, deadline=None)
@given(layouts(with_objects=True))
def test_plan_chunks_objects_layout(case):
    pos, bin_shape, chunk_shape, ids = case
    grid = _grid_for(pos, chunk_shape, chunk_shape)  # objects: one bin per chunk
    plan = plan_chunks(pos, grid, ids)
    _check_common(plan, pos, grid)
    local_frag, global_frag = _fragment_of_rows(plan)
    # one fragment per object present, ascending ids inside each chunk
    for m in range(plan.n_chunks):
        objs = plan.fragment_objects[plan.frag_splits[m]:plan.frag_splits[m + 1]]
        rows = plan.order[plan.row_splits[m]:plan.row_splits[m + 1]]
        assert objs.tolist() == sorted(set(ids[rows].tolist()))
    assert (plan.fragment_counts > 0).all()
    # each row sits in its own object's fragment, rows of an object keep input order
    assert np.array_equal(plan.fragment_objects[global_frag], ids[plan.order])
    for g in np.unique(global_frag):
        assert (np.diff(plan.order[global_frag == g]) > 0).all()


def test_plan_chunks_empty_and_single():
    grid = Grid((0.0,) * 3, (100.0,) * 3, (50.0,) * 3, (25.0,) * 3)
    empty = plan_chunks(np.zeros((0, 3), np.float32), grid)
    assert empty.n_chunks == 0 and empty.chunks.shape == (0, 3) and empty.row_splits.tolist() == [0]
    assert list(encode_plan(empty, np.zeros((0, 3)), {}, "float32", [])) == []
    empty_obj = plan_chunks(np.zeros((0, 3), np.float32), grid, np.zeros(0, np.int64))
    assert empty_obj.n_chunks == 0 and len(empty_obj.fragment_counts) == 0
    one = plan_chunks(np.array([[60.0, 10.0, 99.0]], np.float32), grid)
    assert one.chunks.tolist() == [[1, 0, 1]]
    # bin (2, 0, 3) -> local (0, 0, 1) -> fragment 1 of 8
    assert one.fragment_counts.tolist() == [0, 1, 0, 0, 0, 0, 0, 0]


def test_points_on_chunk_and_bound_edges():
    """A point exactly on the upper bound lies in the next chunk, and the grid covers it."""
    grid = Grid((-50.0, 0.0), (100.0, 50.0), (50.0, 50.0), (25.0, 25.0))
    assert grid.origin == (-1, 0) and grid.shape == (4, 2)
    pts = np.array([[-50, 0], [0, 0], [50, 50], [100, 50], [49.999, 25], [100, 0]], np.float32)
    plan = plan_chunks(pts, grid)
    got = {tuple(c): int(n) for c, n in zip(plan.chunks.tolist(), np.diff(plan.row_splits))}
    assert got == {(-1, 0): 1, (0, 0): 2, (1, 1): 1, (2, 1): 1, (2, 0): 1}
    # the cell of (2, 1) is the last one of the grid
    assert grid.cells(np.array([[2, 1]])).tolist() == [[3, 1]]
    # a point beyond the grid is refused with a clear error, never written to a wrong cell
    with pytest.raises(InputError, match="outside the grid"):
        plan_chunks(np.array([[150.0, 0.0]], np.float32), grid)


def test_float32_rounding_decides_the_bin():
    """Positions are binned after the cast to float32, exactly as the reference does."""
    just_below = np.nextafter(50.0, 0.0)  # float64 49.999..., float32 50.0
    grid = Grid((0.0,), (just_below,), (50.0,), (25.0,))
    plan = plan_chunks(np.array([[just_below]]), grid)
    assert plan.chunks.tolist() == [[1]]
    assert grid.shape == (2,)


# -- Appendix B: the tiny reference store, byte for byte -------------------------------------
TINY_POINTS = np.array([(10, 10, 10), (30, 10, 10), (12, 14, 40), (60, 5, 5), (70, 20, 30), (90, 40, 45)], float)


def _hex(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


APPENDIX_B = {
    "0/vertices/c/0/0/0": _hex("""01000000 24000000 00002041 00002041 00002041 00004041 00006041 00002042
                                   0000f041 00002041 00002041"""),
    "0/vertex_fragments/c/0/0/0": _hex("""01000000 9c000000 4746565a 01000000 08000000 08000000 ff000000 00000000
        00000000 00000000 01000000 00000000 01000000 00000000 01000000 00000000
        02000000 00000000 00000000 00000000 02000000 00000000 00000000 00000000
        02000000 00000000 01000000 00000000 03000000 00000000 00000000 00000000
        03000000 00000000 00000000 00000000 03000000 00000000 00000000 00000000 00000000"""),
    "0/vertex_attributes/intensity/c/0/0/0": _hex("01000000 0c000000 0000003f 00002040 0000c03f"),
    "0/vertex_attributes/rgb/c/0/0/0": _hex("01000000 09000000 00010206 07080304 05"),
    "0/vertex_attributes/label/c/0/0/0": _hex("01000000 0c000000 07000000 09000000 08000000"),
}


def test_appendix_b_tiny_store_bytes(tmp_path):
    import json

    from zv_dask.local import write_points

    path = tmp_path / "tiny.zarr"
    write_points(str(path), TINY_POINTS, attributes={
        "intensity": np.arange(6, dtype=np.float32) + 0.5,
        "rgb": np.arange(18, dtype=np.uint8).reshape(6, 3),
        "label": np.arange(7, 13, dtype=np.int32),
    }, chunk_shape=[50] * 3, base_bin_shape=[25] * 3, bounds=([0, 0, 0], [99, 99, 99]), compression="none")
    for rel, expected in APPENDIX_B.items():
        assert (path / rel).read_bytes() == expected, rel
    meta = json.loads((path / "0/vertices/zarr.json").read_text())
    assert meta["shape"] == [2, 2, 2] and "chunk_grid_origin" not in meta["attributes"]
    assert meta["attributes"]["nonempty_chunks"] == ["0.0.0", "1.0.0"]
    assert meta["codecs"] == [{"name": "vlen-bytes", "configuration": {}}]
    assert meta["fill_value"] == "" and meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 1, 1]
    rgb = json.loads((path / "0/vertex_attributes/rgb/zarr.json").read_text())["attributes"]
    assert rgb["row_shape"] == [3] and rgb["channel_names"] == ["ch0", "ch1", "ch2"] and rgb["dtype"] == "uint8"
    intensity = json.loads((path / "0/vertex_attributes/intensity/zarr.json").read_text())["attributes"]
    assert intensity["row_shape"] == [] and "channel_names" not in intensity
    level = json.loads((path / "0/zarr.json").read_text())["attributes"]["zarr_vectors_level"]
    assert level["vertex_count"] == 6 and level["fragments_tile"] is True
    root = json.loads((path / "zarr.json").read_text())["attributes"]
    assert root["ome"]["name"] == "tiny"
    assert root["multiscales"][0]["datasets"][0]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 1.0, 1.0]}, {"type": "translation", "translation": [12.5, 12.5, 12.5]}]


def test_appendix_b_object_variant(tmp_path):
    import zarr

    from zv_dask.local import write_points

    path = tmp_path / "tiny_obj.zarr"
    write_points(str(path), TINY_POINTS, object_ids=np.array([4, 4, 9, 4, 9, 9]), chunk_shape=[50] * 3,
                 bounds=([0, 0, 0], [99, 99, 99]), compression="none")
    oi = zarr.open_group(str(path / "0/object_index"), mode="r")
    assert dict(oi.attrs) == {"zv_array": "object_index", "num_objects": 2, "num_present": 2, "sid_ndim": 3,
                              "layout": "vlen_manifests_v2", "object_ids_sorted": True}
    assert oi["object_ids"][:].tolist() == [4, 9]
    blob4 = oi["manifests"][:][0]
    assert len(blob4) == 70
    assert blob4 == (struct.pack("<I", 2) + _block([0, 0, 0], 0, struct.pack("<q", 0))
                     + _block([1, 0, 0], 0, struct.pack("<q", 0)))
    assert (path / "0/vertex_fragments/c/0/0/0").read_bytes()[8:] == encode_fragments([2, 1])
