"""build_pyramid: numpy oracle, reference conformance, determinism, transactions, parameters."""

from __future__ import annotations

import os
import warnings
from collections import Counter

import dask
import numpy as np
import pytest
from helpers import tree_bytes

import zv_dask
from zv_dask.errors import IngestError, InputError
from zv_dask.local import write_points
from zv_dask.store.api import open_store, read_level_metadata
from zv_dask.transaction import WriteJob

zvr = pytest.importorskip("zarr_vectors")
from zarr_vectors.types.points import read_points as ref_read  # noqa: E402
from zarr_vectors.validate import validate as ref_validate  # noqa: E402

SYNC = {"scheduler": "synchronous"}


# -- helpers ---------------------------------------------------------------------------------
def cells(path) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            full = os.path.join(d, f)
            rel = os.path.relpath(full, path)
            if "/c/" in rel or (rel.endswith("zarr.json") and rel != "zarr.json"):  # root: ome name = path
                with open(full, "rb") as fh:
                    out[rel] = fh.read()
    return out


def assert_valid(path):
    r = ref_validate(str(path), level=5)
    assert r.ok, r.summary()
    others = [w for w in r.warnings if "links array exists" not in str(w)]
    assert not others, others


def ref_level(path, level, names=(), objects=False):
    kw = {"attribute_names": list(names)} if names else {}
    if objects:
        ids = [int(i) for i in zvr.open(str(path)).level(level).objects.ids()]
        kw["object_ids"] = ids
    return ref_read(str(path), level=level, **kw)


def make_points(kind, rng, n=4000):
    if kind == "uniform":
        return rng.uniform(-95, 130, (n, 3))
    if kind == "clustered":
        centres = rng.uniform(-80, 80, (6, 3))
        return (centres[rng.integers(0, 6, n)] + rng.normal(0, 6, (n, 3))).clip(-99, 99)
    if kind == "2d":
        return rng.uniform(-33, 71, (n, 2))
    raise ValueError(kind)


def attrs_for(rng, n):
    return {"intensity": rng.random(n).astype("float32"),
            "rgb": rng.integers(0, 3, (n, 3)).astype("uint8"),
            "label": rng.integers(0, 4, n).astype("int32")}


# -- the oracle ------------------------------------------------------------------------------
def row_mode(rows):
    c = Counter(map(tuple, np.asarray(rows).reshape(len(rows), -1).tolist()))
    best = max(c.values())
    out = np.array(min(k for k, v in c.items() if v == best))
    return out if np.asarray(rows).ndim == 2 else out[0]


def oracle(parent_pos, parent_attrs, base_bin, ratio, parent_oids=None):
    """Straightforward coarsening: group by (object, floor(p/base_bin)//ratio), loop over groups."""
    bb = np.floor(parent_pos.astype(np.float32).astype(np.float64) / np.asarray(base_bin)).astype(np.int64)
    cb = bb // np.asarray(ratio)
    key = cb if parent_oids is None else np.column_stack([parent_oids, cb])
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    out = {"key": uniq, "pos": [], "attrs": {n: [] for n in parent_attrs}, "count": []}
    order = np.argsort(inv, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inv))[:-1])
    for rows in groups:
        p = parent_pos[rows]
        m = p.astype(np.float64).mean(axis=0).astype(np.float32)
        out["pos"].append(np.clip(m, p.min(axis=0), p.max(axis=0)))
        for n, v in parent_attrs.items():
            v = np.asarray(v)[rows]
            if n == "n":
                out["attrs"][n].append(v.astype(np.int64).sum())
            elif v.dtype.kind == "f":
                out["attrs"][n].append(v.astype(np.float64).mean(axis=0))
            else:
                out["attrs"][n].append(row_mode(v))
        out["count"].append(len(rows))
    out["pos"] = np.array(out["pos"])
    out["attrs"] = {n: np.array(v) for n, v in out["attrs"].items()}
    out["count"] = np.array(out["count"])
    return out


def keyed(pos, base_bin, ratio, oids=None):
    bb = np.floor(pos.astype(np.float64) / np.asarray(base_bin)).astype(np.int64)
    key = bb // np.asarray(ratio)
    if oids is not None:
        key = np.column_stack([oids, key])
    return np.lexsort(key.T[::-1]), key


@pytest.mark.parametrize("kind,objects,bin_ratio", [
    ("uniform", False, 2),
    ("clustered", False, [3, (2, 2, 1)]),
    ("2d", False, (2, 3)),
    ("uniform", True, 2),
])
def test_centroid_matches_numpy_oracle(tmp_path, kind, objects, bin_ratio):
    rng = np.random.default_rng(7)
    pts = make_points(kind, rng)
    n, d = pts.shape
    attrs = attrs_for(rng, n)
    oids = rng.integers(-3, 40, n) * 1000 if objects else None
    path = tmp_path / "s.zarr"
    cs = (60.0,) * d if objects else (80.0,) * d
    base = cs if objects else (20.0,) * d
    write_points(str(path), pts, attributes=attrs, object_ids=oids, chunk_shape=cs, base_bin_shape=base)
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(str(path), levels=2, bin_ratio=bin_ratio, attribute_reduction={"n": "count"},
                                    points_per_task=500)
    assert rep.levels == [1, 2]
    assert_valid(path)
    names = ["intensity", "label", "rgb"]
    steps = bin_ratio if isinstance(bin_ratio, list) else [bin_ratio, bin_ratio]
    total = np.ones(d, np.int64)
    for k, step in zip((1, 2), steps):
        total = total * np.broadcast_to(np.asarray(step), (d,))
        par = ref_level(path, k - 1, names + (["n"] if k > 1 else []), objects)
        par_attrs = dict(par["vertex_attributes"])
        want = oracle(par["positions"], par_attrs, base, total, par.get("object_ids") if objects else None)
        got = ref_level(path, k, names + ["n"], objects)
        assert got["vertex_count"] == len(want["pos"]) == rep.vertex_counts[k]
        o, key = keyed(got["positions"], base, total, got.get("object_ids") if objects else None)
        np.testing.assert_array_equal(key[o], want["key"])
        np.testing.assert_allclose(got["positions"][o], want["pos"], rtol=2e-7, atol=1e-5)
        ga = got["vertex_attributes"]
        np.testing.assert_allclose(ga["intensity"][o], want["attrs"]["intensity"], rtol=1e-5)
        np.testing.assert_array_equal(ga["label"][o], want["attrs"]["label"])
        np.testing.assert_array_equal(ga["rgb"][o], want["attrs"]["rgb"])
        want_n = want["count"] if k == 1 else want["attrs"]["n"]
        np.testing.assert_array_equal(ga["n"][o], want_n)
        assert ga["n"].sum() == n
        lm = read_level_metadata(open_store(str(path)), k)
        assert lm.parent_level == k - 1 and lm.coarsening_method == "per_object"
        np.testing.assert_allclose(lm.bin_shape, np.asarray(base) * total)
        assert lm.vertex_count == len(want["pos"])
        assert bool(lm.preserves_object_ids) == objects


@pytest.mark.parametrize("method,k", [("first", 1), ("random", 1), ("sample", 3)])
def test_point_keeping_methods_pick_real_points(tmp_path, method, k):
    rng = np.random.default_rng(3)
    pts = make_points("clustered", rng, 3000)
    attrs = attrs_for(rng, len(pts))
    path = tmp_path / "s.zarr"
    write_points(str(path), pts, attributes=attrs, chunk_shape=(40,) * 3, base_bin_shape=(10,) * 3)
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(str(path), levels=2, method=method, sample_size=k, seed=11,
                              attribute_reduction={"n": "count"})
    assert_valid(path)
    names = ["intensity", "label", "rgb"]
    for lev in (1, 2):
        par = ref_level(path, lev - 1, names)
        got = ref_level(path, lev, names + ["n"])
        table = lambda r: np.column_stack([r["positions"]] + [np.asarray(r["vertex_attributes"][n], np.float64)
                                                              .reshape(len(r["positions"]), -1) for n in names])
        parent_rows = {tuple(r) for r in table(par).tolist()}
        assert all(tuple(r) in parent_rows for r in table(got).tolist())  # real points, own attributes
        ratio = 2 ** lev
        pb = np.floor(par["positions"].astype(np.float64) / 10).astype(np.int64) // ratio
        gb = np.floor(got["positions"].astype(np.float64) / 10).astype(np.int64) // ratio
        _, pc = np.unique(pb, axis=0, return_counts=True)
        gu, gc = np.unique(gb, axis=0, return_counts=True)
        np.testing.assert_array_equal(gu, np.unique(pb, axis=0))
        np.testing.assert_array_equal(gc, np.minimum(pc, k))
        assert got["vertex_attributes"]["n"].sum() == len(pts)  # counts conserve level-0 points


def test_random_is_reproducible_and_seeded(tmp_path):
    rng = np.random.default_rng(5)
    pts = make_points("uniform", rng, 3000)
    out = []
    for i, (seed, ppt) in enumerate([(1, 10**9), (1, 300), (2, 10**9)]):
        p = tmp_path / f"s{i}.zarr"
        write_points(str(p), pts, chunk_shape=(40,) * 3, base_bin_shape=(10,) * 3)
        with dask.config.set(SYNC):
            zv_dask.build_pyramid(str(p), levels=1, method="random", seed=seed, points_per_task=ppt)
        out.append({k: v for k, v in cells(p).items() if k.startswith("1/")})
    assert out[0] == out[1]
    assert out[0] != out[2]


# -- conformance with the reference ----------------------------------------------------------
def test_reference_reads_every_level_and_bbox(tmp_path):
    rng = np.random.default_rng(1)
    pts = make_points("uniform", rng, 5000)
    attrs = attrs_for(rng, len(pts))
    path = tmp_path / "s.zarr"
    write_points(str(path), pts, attributes=attrs, chunk_shape=(50,) * 3, base_bin_shape=(12.5,) * 3)
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(str(path), levels=None, min_points=50)
    assert rep.levels == [1, 2, 3] and rep.vertex_counts[3] <= 512
    assert_valid(path)
    ds = zvr.open(str(path))
    assert ds.levels == (0, 1, 2, 3)
    root = ds.capabilities
    assert "multiscale_links" not in root
    ours = zv_dask.local.read_points
    for k in ds.levels:
        res = ds.level(k).read()
        mine = ours(str(path), level=k)
        assert sorted(res.attributes) == ["intensity", "label", "rgb"]
        np.testing.assert_array_equal(np.sort(res.positions, axis=0), np.sort(mine["positions"], axis=0))
        np.testing.assert_allclose(ds.level(k).resolution, np.asarray([12.5] * 3) * 2 ** k)
        assert ds.level(k).vertex_count == len(res.positions)
        pos = res.positions.astype(np.float64)
        for _ in range(15):
            lo = rng.uniform(-100, 100, 3)
            hi = lo + rng.uniform(5, 80, 3)
            got = ref_read(str(path), level=k, bbox=(lo.tolist(), hi.tolist()))["positions"]
            want = pos[((pos >= lo) & (pos <= hi)).all(axis=1)]
            assert len(got) == len(want)
            np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(want, axis=0))


def test_pyramid_on_reference_written_store(tmp_path):
    from zarr_vectors.types.points import write_points as ref_write

    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 99, (2000, 3)).astype("float32")
    attrs = {"intensity": rng.random(2000).astype("float32"), "rgb": rng.integers(0, 9, (2000, 3)).astype("uint8")}
    plain = tmp_path / "plain.zarr"
    ref_write(str(plain), pts, chunk_shape=(50.0,) * 3, bin_shape=(25.0,) * 3, vertex_attributes=attrs)
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(str(plain), levels=2)
    assert rep.vertex_counts[1] <= 64 and rep.vertex_counts[2] <= 8
    assert_valid(plain)
    r1 = ref_read(str(plain), level=1, attribute_names=["intensity", "rgb"])
    assert len(r1["positions"]) == rep.vertex_counts[1]
    assert r1["vertex_attributes"]["rgb"].shape == (len(r1["positions"]), 3)
    objs = tmp_path / "objs.zarr"
    oids = rng.integers(0, 7, 2000)
    ref_write(str(objs), pts, chunk_shape=(25.0,) * 3, object_ids=oids)  # base bin = chunk
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(str(objs), levels=2)
    assert_valid(objs)
    ds = zvr.open(str(objs))
    assert "preserved_object_ids" in ds.capabilities
    for k in (1, 2):
        assert sorted(int(i) for i in ds.level(k).objects.ids()) == sorted(set(oids.tolist()))
        one = ref_read(str(objs), level=k, object_ids=[3])
        keys = np.floor(one["positions"].astype(np.float64) / (25.0 * 2 ** k)).astype(np.int64)
        src = pts[oids == 3].astype(np.float64)
        want = np.unique(np.floor(src / (25.0 * 2 ** k)).astype(np.int64), axis=0)
        assert len(want) > 1 or k == 2
        np.testing.assert_array_equal(np.unique(keys, axis=0), want)
        assert len(keys) == len(want)  # one metavertex per object per bin


def test_reference_pyramid_is_replaced(tmp_path):
    """A reference pyramid (with its links) is replaced; the store's declaration ("explicit") is followed."""
    from zarr_vectors.multiresolution.coarsen import build_pyramid as ref_pyramid

    rng = np.random.default_rng(4)
    path = tmp_path / "s.zarr"
    write_points(str(path), rng.uniform(0, 99, (1500, 3)), chunk_shape=(50,) * 3, base_bin_shape=(25,) * 3)
    ref_pyramid(str(path), factors=[(2.0, 1.0), (2.0, 1.0), (2.0, 1.0)])
    assert os.path.isdir(path / "0" / "links") and os.path.isdir(path / "3")
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(str(path), levels=1)
    assert rep.links == "explicit" and not os.path.exists(path / "2")
    assert not os.path.exists(path / "1" / "links" / "+1")
    assert sorted(os.listdir(path / "0" / "links")) == ["+1", "zarr.json"]
    assert_valid(path)
    zs = open_store(str(path))
    assert zs.levels == [0, 1]
    assert zs.metadata.cross_level_depth == 1 and zs.metadata.cross_level_storage == "explicit"
    assert "multiscale_links" in zs.metadata.format_capabilities
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(str(path), levels=1, links=False)
    assert not os.path.exists(path / "0" / "links") and not os.path.exists(path / "1" / "links")
    assert_valid(path)
    zs = open_store(str(path))
    assert zs.metadata.cross_level_depth == 0 and zs.metadata.cross_level_storage == "none"
    assert "multiscale_links" not in zs.metadata.format_capabilities


# -- determinism -----------------------------------------------------------------------------
def test_same_bytes_for_one_and_two_workers_and_any_partitioning(tmp_path, dask_client):
    rng = np.random.default_rng(9)
    pts = make_points("clustered", rng, 6000)
    attrs = attrs_for(rng, len(pts))
    oids = rng.integers(0, 25, len(pts))
    runs = []
    for i, (objects, client, ppt) in enumerate([(False, None, 10**9), (False, dask_client, 400),
                                                (False, None, 1), (True, None, 10**9), (True, dask_client, 300)]):
        p = tmp_path / f"s{i}.zarr"
        write_points(str(p), pts, attributes=attrs, object_ids=oids if objects else None, chunk_shape=(40,) * 3,
                     base_bin_shape=(40,) * 3 if objects else (10,) * 3)
        with dask.config.set(SYNC):
            rep = zv_dask.build_pyramid(str(p), levels=3, client=client, points_per_task=ppt, method="centroid",
                                        attribute_reduction={"n": "count"})
        runs.append((objects, rep.tasks, cells(p)))
    plain = [r for r in runs if not r[0]]
    assert plain[0][1][1] == 1 and plain[2][1][1] > 10  # genuinely different partitionings
    for other in plain[1:]:
        assert other[2] == plain[0][2]
    objs = [r for r in runs if r[0]]
    assert objs[1][2] == objs[0][2]


# -- transactions ------------------------------------------------------------------------------
def _icechunk_store(tmp_path, rng, n=3000):
    path = tmp_path / "ice"
    zs = write_points(str(path), rng.uniform(-50, 50, (n, 3)), attributes={"v": rng.random(n)},
                      chunk_shape=(25,) * 3, base_bin_shape=(12.5,) * 3, backend="icechunk")
    return path, zs


def test_icechunk_one_commit_and_reference_reads(tmp_path, dask_client):
    import icechunk

    rng = np.random.default_rng(6)
    path, zs = _icechunk_store(tmp_path, rng)
    repo = icechunk.Repository.open(icechunk.local_filesystem_storage(str(path)))
    before = len(list(repo.ancestry(branch="main")))
    rep = zv_dask.build_pyramid(zs, levels=2, client=dask_client)
    after = list(repo.ancestry(branch="main"))
    assert len(after) == before + 1 and rep.snapshot_id == after[0].id
    ds = zvr.open(str(path), storage=zvr.StorageOptions(backend="icechunk"))
    assert ds.levels == (0, 1, 2)
    assert ds.validate(level=5).ok
    for k in (1, 2):
        assert len(ds.level(k).read().positions) == rep.vertex_counts[k]


def test_icechunk_failure_discards_everything(tmp_path, monkeypatch):
    import zv_dask.pyramid.stack as stack

    rng = np.random.default_rng(6)
    path, zs = _icechunk_store(tmp_path, rng)
    real = stack.coarsen_level

    def flaky(fine, step):
        if step.level == 2:
            raise RuntimeError("boom")
        return real(fine, step)

    monkeypatch.setattr(stack, "coarsen_level", flaky)
    with dask.config.set(SYNC), pytest.raises(IngestError, match="pyramid level 2"):
        zv_dask.build_pyramid(zs, levels=2, links=True)
    assert not zs.session.has_uncommitted_changes
    assert open_store(str(path), backend="icechunk").levels == [0]


@pytest.mark.parametrize("levels_per_task,finished", [(1, [0, 1]), (None, [0])])
def test_plain_failure_keeps_finished_levels_and_resumes(tmp_path, monkeypatch, levels_per_task, finished):
    """A failure keeps what the build finished, says so, and ``resume=True`` completes it as an uninterrupted build."""
    import shutil

    import zv_dask.pyramid.stack as stack

    rng = np.random.default_rng(6)
    path, ref = tmp_path / "a" / "s.zarr", tmp_path / "b" / "s.zarr"
    write_points(str(path), rng.uniform(0, 99, (2000, 3)), chunk_shape=(50,) * 3, base_bin_shape=(25,) * 3)
    shutil.copytree(path, ref)
    opts = dict(levels=3, links="explicit", levels_per_task=levels_per_task)
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(str(ref), **opts)
    real = stack.coarsen_level
    monkeypatch.setattr(stack, "coarsen_level",
                        lambda fine, step: (_ for _ in ()).throw(RuntimeError("x")) if step.level == 2
                        else real(fine, step))
    with dask.config.set(SYNC), pytest.raises(IngestError, match="pyramid level 2.*resume=True"):
        zv_dask.build_pyramid(str(path), **opts)
    with pytest.warns(zv_dask.UnfinishedJobWarning, match="unfinished pyramid job"):
        zs = open_store(str(path))
    # the finished rounds wait beside the store (a local store's rebuild): it shows the levels it had
    assert [lv["level"] for lv in zv_dask.store_info(zs)["levels"]] == [0]
    assert (path / ".zv-job" / "rebuild" / "1").is_dir()
    monkeypatch.setattr(stack, "coarsen_level", real)
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(str(path), resume=True, **opts)
    assert rep.resumed and rep.rounds_resumed == len(finished) - 1
    assert tree_bytes(path) == tree_bytes(ref), "byte-identical to the uninterrupted build"
    assert_valid(path)


def test_caller_job_is_not_committed(tmp_path):
    rng = np.random.default_rng(8)
    path, zs = _icechunk_store(tmp_path, rng)
    job = WriteJob(zs, "ingest + pyramid")
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(zs, levels=1, job=job)
    assert rep.snapshot_id is None and zs.session.has_uncommitted_changes
    job.commit()
    assert open_store(str(path), backend="icechunk").levels == [0, 1]


def test_lazy_build(tmp_path):
    rng = np.random.default_rng(8)
    path = tmp_path / "s.zarr"
    write_points(str(path), rng.uniform(0, 99, (1000, 3)), chunk_shape=(50,) * 3, base_bin_shape=(25,) * 3)
    lazy = zv_dask.build_pyramid(str(path), levels=2, compute=False)
    assert isinstance(lazy, zv_dask.PendingPyramid) and dask.is_dask_collection(lazy)
    assert open_store(str(path)).levels == [0]
    rep = lazy.compute(scheduler="sync")
    assert rep.levels == [1, 2] and open_store(str(path)).levels == [0, 1, 2]


# -- parameters --------------------------------------------------------------------------------
def test_chunk_scale_writes_level_chunk_shape(tmp_path):
    rng = np.random.default_rng(10)
    pts = rng.uniform(-60, 60, (3000, 3))
    path = tmp_path / "s.zarr"
    write_points(str(path), pts, chunk_shape=(30,) * 3, base_bin_shape=(15,) * 3)
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(str(path), levels=2, bin_ratio=[(2, 2, 1), 2], chunk_scale=[1, (2, 1, 2)],
                                    points_per_task=1000)
    assert_valid(path)
    zs = open_store(str(path))
    assert read_level_metadata(zs, 1).chunk_shape is None
    assert tuple(read_level_metadata(zs, 2).chunk_shape) == (60.0, 30.0, 60.0)
    np.testing.assert_allclose(zs.level_bin_shape(2), (60.0, 60.0, 30.0))
    for k in (1, 2):
        ref = ref_read(str(path), level=k)["positions"]
        mine = zv_dask.local.read_points(str(path), level=k)["positions"]
        assert len(ref) == len(mine) == rep.vertex_counts[k]
        np.testing.assert_array_equal(np.sort(ref, axis=0), np.sort(mine, axis=0))
    # level 2 bins: (4, 4, 2) base bins
    lvl1 = zv_dask.local.read_points(str(path), level=1)["positions"].astype(np.float64)
    want = np.unique(np.floor(lvl1 / 15).astype(np.int64) // (4, 4, 2), axis=0)
    assert rep.vertex_counts[2] == len(want)


def test_levels_none_stops(tmp_path):
    rng = np.random.default_rng(12)
    path = tmp_path / "s.zarr"
    write_points(str(path), rng.uniform(0, 160, (4000, 3)), chunk_shape=(40,) * 3, base_bin_shape=(5,) * 3)
    with dask.config.set(SYNC):
        rep = zv_dask.build_pyramid(str(path), min_points=10)
    last = rep.levels[-1]
    assert rep.chunk_counts[last] == 1 or rep.vertex_counts[last] <= 10
    assert all(rep.vertex_counts[k] > 10 and rep.chunk_counts[k] > 1 for k in rep.levels[:-1])
    with dask.config.set(SYNC):
        small = zv_dask.build_pyramid(str(path), min_points=10**6)
    assert small.levels == [] and open_store(str(path)).levels == [0]


@pytest.mark.parametrize("kw,match", [
    ({"bin_ratio": 1}, "every axis"),
    ({"bin_ratio": 1.5}, "integers"),
    ({"bin_ratio": (2, 2)}, "one per axis"),
    ({"levels": 3, "bin_ratio": [2, 2]}, "only 2 levels"),
    ({"method": "median"}, "method"),
    ({"attribute_reduction": {"v": "median"}}, "choose one of"),
    ({"attribute_reduction": {"nope": "mean"}}, "does not have"),
])
def test_bad_parameters(tmp_path, kw, match):
    path = tmp_path / "s.zarr"
    write_points(str(path), np.random.default_rng(0).uniform(0, 9, (50, 3)), attributes={"v": np.ones(50)},
                 chunk_shape=(5,) * 3)
    with dask.config.set(SYNC):
        zv_dask.build_pyramid(str(path), levels=1)
    kw = {"levels": 1, **kw}
    with pytest.raises(InputError, match=match):
        zv_dask.build_pyramid(str(path), **kw)
    assert open_store(str(path)).levels == [0, 1]  # checked before anything changed


# -- pure functions ----------------------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from zv_dask.pyramid.coarsen import CoarsenParams, coarsen_points  # noqa: E402
from zv_dask.pyramid.reduce import group_rows, reduce_rows  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.integers(1, 3), st.sampled_from(["int16", "uint8", "float32", "bool"]),
       st.integers(0, 2**31))
def test_reductions_match_naive(n, channels, dtype, seed):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 5, n)
    vals = rng.integers(0, 4, (n, channels)).astype(dtype)
    g = group_rows(keys)
    sv = vals[g.order]
    for how in ("mean", "min", "max", "sum", "first", "mode"):
        got = reduce_rows(sv, g, how)
        assert got.dtype == vals.dtype
        for i, key in enumerate(np.unique(keys)):
            rows = vals[keys == key]
            if how == "mean":
                m = rows.astype(np.float64).mean(axis=0)
                want = m.astype(dtype) if dtype == "float32" else (m >= 0.5 if dtype == "bool" else np.rint(m))
            elif how == "sum":
                want = rows.sum(axis=0, dtype=np.float64)
                want = want >= 1 if dtype == "bool" else want
            elif how == "first":
                want = rows[0]
            elif how == "mode":
                want = row_mode(rows)
            else:
                want = getattr(rows, how)(axis=0)
            np.testing.assert_allclose(np.asarray(got[i], np.float64), np.asarray(want, np.float64), rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.sampled_from(["centroid", "first", "random", "sample"]), st.booleans(),
       st.integers(0, 2**31))
def test_coarsen_is_a_function_of_each_bin_alone(n, method, objects, seed):
    """Coarsening two halves split along bin boundaries gives the rows of coarsening the whole."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(-40, 40, (n, 3)).astype("float32")
    bins = np.floor(pos.astype(np.float64) / 5).astype(np.int64)
    attrs = {"a": rng.random(n).astype("float32"), "b": rng.integers(0, 3, (n, 2)).astype("int8")}
    oids = rng.integers(0, 4, n) if objects else None
    params = CoarsenParams((2, 2, 2), method, {"a": "mean", "b": "mode", "n": "count"}, frozenset({"n"}),
                           sample_size=2, seed=3)
    whole = coarsen_points(pos, bins, attrs, params, oids)
    left = (bins[:, 0] // 2) < 0
    parts = [coarsen_points(pos[m], bins[m], {k: v[m] for k, v in attrs.items()}, params,
                            None if oids is None else oids[m]) for m in (left, ~left)]

    def table(c):
        cols = [c.positions, c.attributes["a"][:, None], c.attributes["b"], c.attributes["n"][:, None]]
        if c.object_ids is not None:
            cols.append(c.object_ids[:, None])
        t = np.column_stack([np.asarray(x, np.float64) for x in cols])
        return t[np.lexsort(t.T[::-1])]

    np.testing.assert_array_equal(table(whole), np.concatenate([table(p) for p in parts])[
        np.lexsort(np.concatenate([table(p) for p in parts]).T[::-1])])
    assert whole.attributes["n"].sum() == n
    cb = np.floor(whole.positions.astype(np.float64) / 5).astype(np.int64) // 2
    src = bins // 2
    assert {tuple(r) for r in cb.tolist()} == {tuple(r) for r in src.tolist()}  # metavertices stay in their bins


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 80), st.integers(1, 2), st.floats(0, 1), st.integers(0, 2**31))
def test_float_reductions_skip_nan_as_numpy_does(n, channels, nan_share, seed):
    """mean / sum / min / max of float rows with NaN: numpy's nanmean / nansum / nanmin / nanmax per group."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 5, n)
    vals = rng.uniform(-10, 10, (n, channels)).astype(np.float32)
    vals[rng.random((n, channels)) < nan_share] = np.nan
    g = group_rows(keys)
    sv = vals[g.order]
    for how, fn in (("mean", np.nanmean), ("sum", np.nansum), ("min", np.nanmin), ("max", np.nanmax)):
        got = reduce_rows(sv, g, how)
        for i, key in enumerate(np.unique(keys)):
            rows = vals[keys == key].astype(np.float64)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups: numpy warns, and gives NaN
                want = fn(rows, axis=0)
            np.testing.assert_allclose(np.asarray(got[i], np.float64), want, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{how} of {rows.tolist()}")


def test_one_nan_attribute_does_not_spread_up_the_pyramid(tmp_path):
    """A NaN value at level 0: kept there, skipped by the coarse levels' means, and named in the report."""
    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 100, (4000, 3))
    v = rng.uniform(0, 1, 4000)
    v[[3, 10]] = np.nan
    with dask.config.set(scheduler="sync"):
        rep = zv_dask.ingest(pts, tmp_path / "n.zv", attributes={"v": v}, chunk_shape=25, pyramid={"levels": 2})
    assert any("'v' holds 2 NaN value(s) (of 4,000)" in w for w in rep.warnings), rep.warnings
    level0 = zv_dask.read_points(tmp_path / "n.zv", level=0).compute()
    assert int(level0["v"].isna().sum()) == 2
    one = zv_dask.read_points(tmp_path / "n.zv", level=1).compute()
    assert not one["v"].isna().any()
    # each level-1 bin (50 units: 2 x 2 x 2 chunks of 25) holds the nanmean of its level-0 points
    bins = np.floor(pts / 50).astype(int)
    want = {}
    for b in {tuple(r) for r in bins.tolist()}:
        want[b] = np.nanmean(v[(bins == b).all(axis=1)])
    got = {tuple(np.floor(r[:3] / 50).astype(int).tolist()): r[3] for r in one[["x", "y", "z", "v"]].to_numpy()}
    assert set(got) == set(want)
    for b, m in want.items():
        assert abs(got[b] - m) < 1e-5, b


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(1, 40), st.sampled_from(["uint8", "int16", "uint16", "int64", "bool"]),
       st.sampled_from([2, 5, 300, 70_000]), st.integers(0, 2**31))
def test_mode_of_single_values_is_the_row_mode(n, groups, dtype, spread, seed):
    """The packed-key mode (bincount or one sort) gives the generic row mode's rows, ties to the smallest."""
    from zv_dask.pyramid import reduce as r

    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if dtype != "bool" else None
    lo = 0 if info is None else max(info.min, -spread // 2)
    hi = 1 if info is None else min(info.max, lo + spread)
    g = group_rows(rng.integers(0, groups, n))
    for shape in ((n,), (n, 3)):  # a single value, and RGB-like rows of 3 channels
        sv = rng.integers(lo, hi + 1, shape).astype(dtype)[g.order]
        want = r._row_mode_sorted(sv, g)
        np.testing.assert_array_equal(r._value_mode(sv, g), want)
        old = r._BINCOUNT_CELLS
        try:
            r._BINCOUNT_CELLS = 0  # the sort path too
            np.testing.assert_array_equal(r._value_mode(sv, g), want)
        finally:
            r._BINCOUNT_CELLS = old
