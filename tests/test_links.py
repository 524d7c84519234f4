"""Cross-level links (ZV format section 9): pure encoders, and pyramids read back by the reference.

The oracle for a written pyramid is the reference reader itself: its
``read_link_arrays`` decodes every ``links/<+1|-1>`` cell (resolving each
offsets segment through the levels' chunk scales), and its chunk decoder gives
the positions the rows refer to. A link map is right when every fine vertex
has exactly one parent, parent and child share the coarse bin, a centroid is
the mean of its children, and the ``-1`` family mirrors the ``+1`` family.
"""

from __future__ import annotations

import itertools
import os

import dask
import numpy as np
import pytest
from helpers import reference_links, reference_rows, reference_validate
from hypothesis import given, settings
from hypothesis import strategies as st

import zv_dask
from zv_dask.errors import FormatError, InputError
from zv_dask.format.links import (
    anchor,
    decode_link_rows,
    encode_link_rows,
    offset_segment,
    parse_offset_segment,
    plan_link_cells,
    possible_offsets,
)
from zv_dask.local import write_points
from zv_dask.store.api import open_store

pytest.importorskip("zarr_vectors")
SYNC = {"scheduler": "synchronous"}


# -- pure functions ----------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-2**62, 2**62), st.integers(-2**62, 2**62)), max_size=50))
def test_link_rows_round_trip(rows):
    arr = np.array(rows, np.int64).reshape(-1, 2)
    payload = encode_link_rows(arr)
    assert payload[:16] == np.array([1, 0], "<i8").tobytes()
    assert len(payload) == 16 + 16 * len(arr)
    np.testing.assert_array_equal(decode_link_rows(payload), arr)


def test_link_rows_match_appendix_b_bytes():
    payload = encode_link_rows(np.array([[0, 0], [1, 0], [2, 0]]))
    assert payload == np.array([1, 0, 0, 0, 1, 0, 2, 0], "<i8").tobytes()


@pytest.mark.parametrize("payload", [b"\x01" * 7, np.array([3, 0], "<i8").tobytes(),
                                     np.array([1, 0, 5], "<i8").tobytes(), np.array([2, 0, -1, 1, 1], "<i8").tobytes()])
def test_link_rows_reject_malformed(payload):
    with pytest.raises(FormatError):
        decode_link_rows(payload)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-40, 40), min_size=1, max_size=4))
def test_offset_segments_round_trip(offset):
    seg = offset_segment(offset)
    assert all(p == "0" or p[0] in "+-" for p in seg.split("."))
    assert parse_offset_segment(seg) == tuple(offset)


@pytest.mark.parametrize("bad", ["1.0.0", "+0.0.0", "0..0", "a.0.0", "+01.0.0", ""])
def test_offset_segment_parse_rejects(bad):
    with pytest.raises(FormatError):
        parse_offset_segment(bad)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_plan_link_cells_matches_naive_grouping(n_src, s_src, s_trg, n_rec, seed):
    rng = np.random.default_rng(seed)
    ndim = 2
    src_chunks = np.unique(rng.integers(-5, 5, (n_src, ndim)), axis=0)  # chunk tables hold distinct chunks
    n_src = len(src_chunks)
    dst_chunks = rng.integers(-5, 5, (n_src + 1, ndim))
    si = rng.integers(0, n_src, n_rec)
    di = rng.integers(0, n_src + 1, n_rec)
    svi, dvi = rng.integers(0, 100, n_rec), rng.integers(0, 100, n_rec)
    cells = plan_link_cells(src_chunks, si, svi, dst_chunks, di, dvi, (s_src,) * ndim, (s_trg,) * ndim)
    want: dict = {}
    for r in range(n_rec):
        src = tuple(src_chunks[si[r]])
        off = tuple(np.asarray(dst_chunks[di[r]]) - anchor(np.array([src]), (s_src,) * ndim, (s_trg,) * ndim)[0])
        want.setdefault((off, src), []).append((svi[r], dvi[r]))
    got = {}
    for i in range(len(cells)):
        key = (tuple(cells.offsets[i]), tuple(cells.chunks[i]))
        assert key not in got, "one cell per (offsets, source chunk)"
        got[key] = [tuple(r) for r in decode_link_rows(cells.payload(i)).tolist()]
    assert got == {k: [tuple(map(int, r)) for r in v] for k, v in want.items()}
    assert cells.n_records == n_rec


def test_anchor_floors_negative_chunks():
    np.testing.assert_array_equal(anchor(np.array([[-3, 3, -1]]), (1, 1, 1), (2, 2, 2)), [[-2, 1, -1]])
    np.testing.assert_array_equal(anchor(np.array([[-3, 3]]), (2, 2), (1, 1)), [[-6, 6]])


@pytest.mark.parametrize("fine,coarse,bin_", [(4, 4, 2), (4, 4, 8), (3, 3, 2), (3, 6, 2), (5, 10, 4), (4, 8, 16)])
def test_possible_offsets_cover_brute_force(fine, coarse, bin_):
    """Every (fine vertex chunk, metavertex chunk) pair two points of one coarse bin can give."""
    for delta in (1, -1):
        allowed = {o[0] for o in possible_offsets((fine,), (coarse,), (bin_,), delta)}
        seen = set()
        for b in range(-3 * bin_ * coarse, 3 * bin_ * coarse):  # base bins of the two endpoints, same coarse bin
            lo = (b // bin_) * bin_
            for b2 in range(lo, lo + bin_):
                fc, cc = b // fine, b2 // coarse  # fine vertex at b, metavertex at b2
                if delta == 1:
                    seen.add(cc - (fc * fine) // coarse)
                else:
                    seen.add(fc - (cc * coarse) // fine)
        assert seen <= allowed, (seen, allowed)


# -- pyramids read back by the reference -------------------------------------------------------
def _bins(pos, base, ratio):
    return np.floor(np.asarray(pos, np.float32).astype(np.float64) / np.asarray(base)).astype(np.int64) // ratio


def check_links(path, level, base, ratio, method="centroid", storage="explicit"):
    """The reference's view of the links between ``level - 1`` and ``level`` is a correct parent map."""
    fine, _ = reference_rows(path, level - 1)
    coarse, _ = reference_rows(path, level)
    up = reference_links(path, level - 1, 1)
    assert up is not None, f"no +1 links at level {level - 1}"
    src, dst = up
    np.testing.assert_array_equal(np.sort(src), np.arange(len(fine)), "every fine vertex exactly once")
    assert dst.min() >= 0 and dst.max() < len(coarse)
    np.testing.assert_array_equal(np.bincount(dst, minlength=len(coarse)) > 0, True, "every metavertex has children")
    np.testing.assert_array_equal(_bins(fine[src], base, ratio), _bins(coarse[dst], base, ratio),
                                  "a child and its metavertex share the coarse bin")
    if method == "centroid":
        sums = np.zeros_like(coarse, dtype=np.float64)
        np.add.at(sums, dst, fine[src].astype(np.float64))
        mean = sums / np.bincount(dst, minlength=len(coarse))[:, None]
        np.testing.assert_allclose(coarse, mean, rtol=1e-5, atol=1e-4)
    else:  # point-keeping: a metavertex is one of its children
        hit = np.zeros(len(coarse), bool)
        same = (fine[src] == coarse[dst]).all(axis=1)
        hit[dst[same]] = True
        assert hit.all()
    down = reference_links(path, level, -1)
    if storage == "explicit":
        assert down is not None, f"no -1 links at level {level}"
        pairs_up = set(zip(src.tolist(), dst.tolist()))
        pairs_down = set(zip(down[1].tolist(), down[0].tolist()))
        assert pairs_up == pairs_down and len(down[0]) == len(src), "-1 mirrors +1"
    else:
        assert down is None
    return src, dst


def _meta(path, level):
    import json

    with open(os.path.join(path, str(level), "zarr.json")) as fh:
        return json.load(fh)["attributes"]["zarr_vectors_level"]


def _family(path, level, delta):
    import json

    with open(os.path.join(path, str(level), "links", f"{delta:+d}", "zarr.json")) as fh:
        return json.load(fh)["attributes"]


@pytest.mark.parametrize("case", [
    dict(chunk=50, bin=12.5, ratio=2, scale=1, levels=3),  # level 3's bins (100) span 2 chunks
    dict(chunk=30, bin=10, ratio=2, scale=1, levels=2),  # 3 bins per chunk: coarse bins straddle chunks
    dict(chunk=30, bin=15, ratio=[(2, 2, 1), 2], scale=[1, (2, 1, 2)], levels=2),  # level chunk_shape override
    dict(chunk=40, bin=10, ratio=(2, 1, 2), scale=1, levels=2, ndim=2),
])
def test_links_form_the_parent_map(tmp_path, case):
    rng = np.random.default_rng(3)
    ndim = case.get("ndim", 3)
    pts = rng.uniform(-40, 55, (3000, ndim))
    if ndim == 2:
        case = {**case, "ratio": case["ratio"][:2]}
    path = str(tmp_path / "s.zv")
    write_points(path, pts, attributes={"v": rng.random(len(pts)).astype("f4")}, chunk_shape=(case["chunk"],) * ndim,
                 base_bin_shape=(case["bin"],) * ndim)
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(path, levels=case["levels"], bin_ratio=case["ratio"], chunk_scale=case["scale"],
                                    links="explicit", points_per_task=700)
    assert reference_validate(path) == []
    zs = open_store(path)
    assert zs.metadata.cross_level_depth == 1 and zs.metadata.cross_level_storage == "explicit"
    assert "multiscale_links" in zs.metadata.format_capabilities
    total = (1,) * ndim
    steps = case["ratio"] if isinstance(case["ratio"], list) else [case["ratio"]] * case["levels"]
    for k in range(1, case["levels"] + 1):
        total = tuple(a * b for a, b in zip(total, np.broadcast_to(steps[k - 1], (ndim,))))
        check_links(path, k, (case["bin"],) * ndim, np.array(total))
        assert _family(path, k - 1, 1)["num_links"] == rep.vertex_counts[k - 1] == rep.link_counts[f"{k - 1}/+1"]
        assert _family(path, k, -1)["num_physical_records"] == rep.vertex_counts[k - 1]
        assert "links" in _meta(path, k - 1)["arrays_present"]
    assert not os.path.exists(os.path.join(path, str(case["levels"]), "links", "+1"))


def test_links_with_object_ids_follow_objects(tmp_path):
    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 120, (2500, 3))
    oids = rng.integers(-7, 30, len(pts)) * 1000
    path = str(tmp_path / "o.zv")
    write_points(path, pts, object_ids=oids, chunk_shape=(40,) * 3)
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(path, levels=2, bin_ratio=2, links="explicit", points_per_task=500)
    assert reference_validate(path) == []
    from zv_dask.store.levels import read_level

    zs = open_store(path)
    for k in (1, 2):
        src, dst = check_links(path, k, (40,) * 3, 2 ** k)
        fine = read_level(zs.store, k - 1, with_object_ids=True)
        coarse = read_level(zs.store, k, with_object_ids=True)
        np.testing.assert_array_equal(fine["object_ids"][src], coarse["object_ids"][dst], "links stay in the object")


@pytest.mark.parametrize("method", ["first", "random", "sample"])
def test_links_of_point_keeping_methods(tmp_path, method):
    rng = np.random.default_rng(8)
    path = str(tmp_path / "m.zv")
    write_points(path, rng.uniform(0, 99, (2000, 3)), chunk_shape=(50,) * 3, base_bin_shape=(10,) * 3)
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(path, levels=2, method=method, sample_size=3, links=True)
    assert reference_validate(path) == []
    for k in (1, 2):
        check_links(path, k, (10,) * 3, 2 ** k, method=method)


def test_implicit_writes_only_up_links(tmp_path):
    rng = np.random.default_rng(2)
    path = str(tmp_path / "i.zv")
    write_points(path, rng.uniform(0, 99, (1500, 3)), chunk_shape=(50,) * 3, base_bin_shape=(25,) * 3)
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(path, levels=2, links="implicit")
    assert reference_validate(path) == []
    for k in (1, 2):
        check_links(path, k, (25,) * 3, 2 ** k, storage="implicit")
    assert open_store(path).metadata.cross_level_storage == "implicit"
    assert set(rep.link_counts) == {"0/+1", "1/+1"}


def test_store_declaration_decides_by_default(tmp_path):
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 99, (800, 3))
    plain, declared = str(tmp_path / "plain.zv"), str(tmp_path / "declared.zv")
    write_points(plain, pts, chunk_shape=(50,) * 3)
    zv_dask.create_store(declared, bounds=([0] * 3, [99] * 3), chunk_shape=(50,) * 3, cross_level_depth=1,
                         cross_level_storage="explicit")
    write_points(declared, pts)
    with dask.config.set(SYNC):
        a = zv_dask.build_pyramid(plain, levels=1)
        b = zv_dask.build_pyramid(declared, levels=1)
    assert a.links == "none" and not os.path.exists(os.path.join(plain, "0", "links"))
    assert b.links == "explicit" and b.link_counts == {"0/+1": 800, "1/-1": 800}
    assert reference_validate(declared) == []


def test_bad_links_value(tmp_path):
    path = str(tmp_path / "b.zv")
    write_points(path, np.random.default_rng(0).uniform(0, 9, (50, 3)), chunk_shape=(5,) * 3)
    with pytest.raises(InputError, match="links must be one of"):
        zv_dask.build_pyramid(path, levels=1, links="both")
    assert open_store(path).levels == [0]


def test_links_are_the_same_for_any_partitioning(tmp_path, dask_client):
    rng = np.random.default_rng(11)
    pts = rng.uniform(-40, 40, (5000, 3))
    out = []
    for i, (client, ppt, lpt) in enumerate([(None, 10**9, None), (dask_client, 300, None), (None, 200, 1)]):
        p = tmp_path / f"s{i}.zv"
        write_points(str(p), pts, chunk_shape=(20,) * 3, base_bin_shape=(5,) * 3)
        with dask.config.set(SYNC):
            rep = zv_dask.build_pyramid(str(p), levels=3, client=client, points_per_task=ppt, levels_per_task=lpt,
                                        links="explicit")
        files = {}
        for d, _, names in os.walk(p):
            for f in names:
                rel = os.path.relpath(os.path.join(d, f), p)
                if "/links/" in rel:
                    with open(os.path.join(d, f), "rb") as fh:
                        files[rel] = fh.read()
        out.append((rep.batches, files))
    assert out[0][0] == [[1, 2, 3]] and out[2][0] == [[1], [2], [3]]
    assert out[0][1] and all(o[1] == out[0][1] for o in out[1:])


def test_links_on_icechunk_in_one_commit(tmp_path, dask_client):
    import icechunk
    import zarr_vectors as zvr

    rng = np.random.default_rng(6)
    path = tmp_path / "ice"
    zs = write_points(str(path), rng.uniform(-50, 50, (3000, 3)), chunk_shape=(25,) * 3,
                      base_bin_shape=(12.5,) * 3, backend="icechunk")
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
    before = len(list(repo.ancestry(branch="main")))
    rep = zv_dask.build_pyramid(zs, levels=2, client=dask_client, links="explicit")
    assert len(list(repo.ancestry(branch="main"))) == before + 1
    ds = zvr.open(str(path), storage=zvr.StorageOptions(backend="icechunk"))
    assert ds.validate(level=5).ok and "multiscale_links" in ds.capabilities
    assert rep.link_counts == {"0/+1": 3000, "1/-1": 3000, "1/+1": rep.vertex_counts[1], "2/-1": rep.vertex_counts[1]}


def test_every_offset_array_written_is_declared_and_non_empty(tmp_path):
    rng = np.random.default_rng(9)
    path = str(tmp_path / "o.zv")
    write_points(path, rng.uniform(0, 90, (3000, 3)), chunk_shape=(30,) * 3, base_bin_shape=(10,) * 3)
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(path, levels=2, links=True)
    import json

    for k, delta in itertools.product((0, 1, 2), (1, -1)):
        fam = os.path.join(path, str(k), "links", f"{delta:+d}")
        if not os.path.isdir(fam):
            continue
        for seg in sorted(os.listdir(fam)):
            if seg == "zarr.json":
                continue
            with open(os.path.join(fam, seg, "zarr.json")) as fh:
                attrs = json.load(fh)["attributes"]
            assert attrs["nonempty_chunks"], f"{k}/{delta:+d}/{seg} is empty"
            assert attrs["offsets"] == [list(parse_offset_segment(seg))] and attrs["level_delta"] == delta
            cells = sum(len(f) for _, _, f in os.walk(os.path.join(fam, seg, "c")))
            assert cells == len(attrs["nonempty_chunks"])


# -- reading links back --------------------------------------------------------------------------
def test_read_links_matches_the_reference_reader(tmp_path):
    from zarr_vectors.core.arrays import read_link_arrays
    from zarr_vectors.core.store import get_resolution_level
    from zarr_vectors.core.store import open_store as ref_open

    rng = np.random.default_rng(13)
    path = str(tmp_path / "r.zv")
    write_points(path, rng.uniform(-40, 55, (2500, 3)), chunk_shape=(30,) * 3, base_bin_shape=(10,) * 3)
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(path, levels=2, links="explicit", chunk_scale=[1, 2])
    for level, delta in [(0, 1), (1, -1), (1, 1), (2, -1)]:
        mine = zv_dask.read_links(path, level, delta)
        chunks, vi = read_link_arrays(get_resolution_level(ref_open(path), level), delta=delta)
        got = sorted(zip(map(tuple, mine["src_chunk"].tolist()), mine["src_vi"].tolist(),
                         map(tuple, mine["dst_chunk"].tolist()), mine["dst_vi"].tolist()))
        want = sorted(zip(map(tuple, chunks[:, 0].tolist()), vi[:, 0].tolist(),
                          map(tuple, chunks[:, 1].tolist()), vi[:, 1].tolist()))
        assert got == want and len(got) > 0, (level, delta)
    with pytest.raises(zv_dask.MetadataError, match="no links/-1"):
        zv_dask.read_links(path, 0, -1)


def test_parent_rows_index_read_points(tmp_path):
    rng = np.random.default_rng(14)
    path = str(tmp_path / "p.zv")
    pts = rng.uniform(0, 99, (4000, 3))
    zv_dask.ingest(pts, path, chunk_shape=25, base_bin_shape=5, pyramid={"levels": 2, "links": True},
                   client=None)
    for level in (0, 1):
        fine = zv_dask.read_points(path, level=level).compute()
        coarse = zv_dask.read_points(path, level=level + 1).compute()
        parents = zv_dask.parent_rows(path, level)
        assert len(parents) == len(fine) and parents.min() >= 0 and parents.max() < len(coarse)
        xyz = ["x", "y", "z"]
        sums = np.zeros((len(coarse), 3))
        np.add.at(sums, parents, fine[xyz].to_numpy(np.float64))
        mean = sums / np.bincount(parents, minlength=len(coarse))[:, None]
        np.testing.assert_allclose(coarse[xyz].to_numpy(), mean, rtol=1e-5, atol=1e-4)


def _link_records(zs, level, delta):
    """A family's records as one sorted set of ``(src chunk, src vi, dst chunk, dst vi)`` tuples."""
    r = zv_dask.read_links(zs, level, delta)
    return sorted(map(tuple, np.column_stack([r["src_chunk"], r["src_vi"], r["dst_chunk"], r["dst_vi"]]).tolist()))


def test_links_when_coarse_bins_span_many_chunks(tmp_path, dask_client):
    """Coarse bins 4 chunks wide: hundreds of possible offsets arrays per family, only the used ones made.

    On icechunk (arrays must exist before cells are written) the tasks hand such
    families' cells back and the coordinator writes them; on a plain store the
    arrays are made around the cells. Both give the same records, and the
    reference validates and reads them.
    """
    import icechunk
    import zarr_vectors as zvr

    from zv_dask.format.links import offset_axes, offsets_count
    from zv_dask.pyramid.builder import EAGER_LINK_ARRAYS

    rng = np.random.default_rng(12)
    centres = rng.uniform(0, 320, (30, 3))  # sparse tight clusters: a metavertex often far from its children
    pts = np.clip(np.repeat(centres, 50, axis=0) + rng.normal(0, 1.0, (1500, 3)), 0, 319.9)
    kw = dict(chunk_shape=(20,) * 3, base_bin_shape=(2.5,) * 3, bounds=([0] * 3, [320] * 3))
    assert offsets_count(offset_axes((8,) * 3, (8,) * 3, (32,) * 3, 1)) == 343 > EAGER_LINK_ARRAYS  # level 5
    plain = str(tmp_path / "plain.zv")
    write_points(plain, pts, **kw)
    with dask.config.set(SYNC):
        rep_p = zv_dask.build_pyramid(plain, levels=5, links="explicit")
    ice = tmp_path / "ice"
    zs = write_points(str(ice), pts, backend="icechunk", **kw)
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(ice)))
    before = len(list(repo.ancestry(branch="main")))
    rep_i = zv_dask.build_pyramid(zs, levels=5, client=dask_client, links="explicit")
    assert len(list(repo.ancestry(branch="main"))) == before + 1
    assert rep_i.link_counts == rep_p.link_counts and rep_i.vertex_counts == rep_p.vertex_counts

    assert reference_validate(plain) == []
    for k in range(1, 6):
        check_links(plain, k, (2.5,) * 3, np.array((2 ** k,) * 3))
    ds = zvr.open(str(ice), storage=zvr.StorageOptions(backend="icechunk"))
    assert ds.validate(level=5).ok and "multiscale_links" in ds.capabilities
    # the same job as one ingest: the first levels are built inside the level-0 write tasks
    fused = tmp_path / "fused"
    rep_f = zv_dask.ingest(pts, str(fused), backend="icechunk", client=dask_client,
                           pyramid={"levels": 5, "links": "explicit"}, **kw)
    assert rep_f.levels_in_write_tasks and rep_f.link_counts == rep_p.link_counts
    far = set()
    for store in (zv_dask.open_store(str(ice), backend="icechunk"), zv_dask.open_store(str(fused), backend="icechunk")):
        for k in range(6):
            for delta in (1, -1):
                if (k, delta) in ((0, -1), (5, 1)):
                    continue
                segs_p = sorted(open_store(plain).root[f"{k}/links/{delta:+d}"].array_keys())
                segs_i = sorted(store.root[f"{k}/links/{delta:+d}"].array_keys())
                assert segs_i == segs_p, f"{k}/{delta:+d}: the same offsets arrays, only those with records"
                far |= {s for s in segs_i if max(abs(o) for o in parse_offset_segment(s)) > 1}
                assert _link_records(store, k, delta) == _link_records(plain, k, delta)
    assert far, "some metavertex landed more than one chunk away from its children (the wide-bin case)"


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(-5, 5)), max_size=30, unique=True),
       st.lists(st.tuples(st.integers(-6, 6), st.integers(-6, 6)), max_size=30))
def test_locate_chunks_matches_a_dict(table, query):
    from zv_dask.read_links import locate_chunks

    where = {c: i for i, c in enumerate(table)}
    got = locate_chunks(np.array(table, np.int64).reshape(-1, 2), np.array(query, np.int64).reshape(-1, 2))
    assert got.tolist() == [where.get(c, -1) for c in query]
