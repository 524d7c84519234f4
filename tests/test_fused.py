"""An ingest with a pyramid builds its first coarse levels inside the level-0 write tasks.

Whatever builds a level (the write tasks of ``ingest``, or rounds of
``build_pyramid`` over a written level 0), the bytes must be the same: the
tests compare every cell and every array/level document of the two routes, for
plain points and object ids, nested and straddling bins, links and sharding.
"""

from __future__ import annotations

import json
import os

import dask
import numpy as np
import pytest
from helpers import cell_bytes, reference_validate, tree_bytes

import zv_dask
from zv_dask.format.grid import Grid
from zv_dask.ingest.shuffle import UnitGrid

SYNC = {"scheduler": "synchronous"}


def level_docs(path) -> dict[str, bytes]:
    """Every ``zarr.json`` below the root (the root's ``ome`` names the store)."""
    return {k: v for k, v in tree_bytes(path).items() if k.endswith("zarr.json") and k != "zarr.json"}


def root_doc(path) -> dict:
    with open(os.path.join(path, "zarr.json")) as fh:
        attrs = json.load(fh)["attributes"]
    attrs["ome"].pop("name")
    return attrs


CASES = [
    dict(chunk_shape=25, base_bin_shape=6.25),  # bins nest in chunks up to level 2
    dict(chunk_shape=30, base_bin_shape=10),  # 3 bins per chunk: regions of 2 chunks from level 1
    dict(chunk_shape=(30, 20, 25), base_bin_shape=(10, 5, 25)),  # per-axis geometry
]


@pytest.mark.parametrize("objects", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_write_tasks_build_the_same_levels_as_build_pyramid(tmp_path, case, objects):
    rng = np.random.default_rng(1)
    n = 8000
    pts = rng.uniform(-40, 50, (n, 3)).astype("f4")
    attrs = {"v": rng.random(n).astype("f4"), "c": rng.integers(0, 5, n).astype("i2")}
    geo = dict(case)
    if objects:  # object stores keep one bin per chunk (ZV format 14.2)
        geo.pop("base_bin_shape")
    kw = dict(attributes=attrs, object_ids=rng.integers(0, 40, n) if objects else None, partition_rows=5000,
              group_points=4000, **geo)
    pyr = dict(levels=3, links="explicit", attribute_reduction={"n": "count"})
    a, b = str(tmp_path / "fused.zv"), str(tmp_path / "rounds.zv")
    with dask.config.set(SYNC):
        fused = zv_dask.ingest(pts, a, pyramid=pyr, **kw)
        zv_dask.ingest(pts, b, **kw)
        rounds = zv_dask.build_pyramid(b, **pyr)
    assert fused.levels_in_write_tasks, "the write tasks built at least level 1"
    assert [lv["vertex_count"] for lv in fused.levels[1:]] == [rounds.vertex_counts[k] for k in (1, 2, 3)]
    assert cell_bytes(a) == cell_bytes(b)
    assert level_docs(a) == level_docs(b)
    assert root_doc(a) == root_doc(b)
    assert fused.link_counts == rounds.link_counts and fused.links == "explicit"
    assert reference_validate(a) == []


def test_fused_levels_on_a_cluster_match_one_process(tmp_path, dask_client):
    rng = np.random.default_rng(4)
    pts = rng.normal(0, 30, (30_000, 3))
    runs = []
    for i, client in enumerate([None, dask_client]):
        p = str(tmp_path / f"s{i}.zv")
        with dask.config.set(SYNC):
            rep = zv_dask.ingest(pts, p, chunk_shape=20, base_bin_shape=5, client=client, partition_rows=7000,
                                 group_points=6000, pyramid={"levels": 4, "links": True})
        runs.append((rep.levels_in_write_tasks, cell_bytes(p), level_docs(p)))
    assert runs[0][0] and runs[0][1:] == runs[1][1:]


def test_sharded_store_with_fused_levels(tmp_path):
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 100, (8000, 3))
    a, b = str(tmp_path / "a.zv"), str(tmp_path / "b.zv")
    kw = dict(chunk_shape=20, base_bin_shape=5, shard_shape=(2, 2, 2), group_points=1500)
    with dask.config.set(SYNC):
        rep = zv_dask.ingest(pts, a, pyramid={"levels": 2}, **kw)
        zv_dask.ingest(pts, b, **kw)
        zv_dask.build_pyramid(b, levels=2)
    assert rep.levels_in_write_tasks
    assert cell_bytes(a) == cell_bytes(b)
    assert reference_validate(a) == []


def test_levels_none_prunes_what_the_write_tasks_built_past_the_stop(tmp_path):
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 160, (6000, 3))
    a, b = str(tmp_path / "a.zv"), str(tmp_path / "b.zv")
    kw = dict(chunk_shape=40, base_bin_shape=5)
    with dask.config.set(SYNC):
        rep = zv_dask.ingest(pts, a, pyramid={"min_points": 50, "links": True}, **kw)
        zv_dask.ingest(pts, b, **kw)
        ref = zv_dask.build_pyramid(b, min_points=50, links=True)
    assert [lv["level"] for lv in rep.levels[1:]] == ref.levels
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    assert cell_bytes(a) == cell_bytes(b) and level_docs(a) == level_docs(b)
    last = ref.levels[-1]
    assert not os.path.exists(os.path.join(a, str(last), "links", "+1"))
    assert reference_validate(a) == []


@pytest.mark.parametrize("origin,shard,block,ok", [
    (-3, 2, 2, False), (-4, 2, 2, True), (-3, 3, 2, True), (0, 4, 6, True), (5, 1, 4, True), (-7, 1, 1, True),
])
def test_unit_grid_holds_whole_shards_and_whole_blocks(origin, shard, block, ok):
    cs = 10.0
    grid = Grid((origin * cs,) * 1, ((origin + 37) * cs - 1,), (cs,), (cs,))
    units = UnitGrid.of(grid, (shard,), (block,))
    assert (units is not None) == ok
    if units is None:
        return
    chunks = np.arange(grid.origin[0], grid.origin[0] + grid.shape[0])[:, None]
    ids = units.ids(chunks)
    shards = (chunks[:, 0] - grid.origin[0]) // shard
    blocks = chunks[:, 0] // block
    for key in (shards, blocks):  # a shard or a block never spans two units
        for k in np.unique(key):
            assert len(np.unique(ids[key == k])) == 1
    assert ids.min() >= 0 and ids.max() < units.shape[0]


def test_dry_run_reports_the_fused_levels(tmp_path):
    rng = np.random.default_rng(5)
    plan = zv_dask.plan_ingest(rng.uniform(0, 100, (5000, 3)), str(tmp_path / "p.zv"), chunk_shape=25,
                               base_bin_shape=5, pyramid={"levels": 2})
    assert plan.levels_in_write_tasks == [1, 2] and "built by the write tasks" in repr(plan)
    assert not os.path.exists(tmp_path / "p.zv")
