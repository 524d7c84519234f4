"""``ingest(mode="append")``: new points into a store that holds points, only the touched chunks rewritten.

1. the new points are checked against the store (attributes, object ids,
   dtype) and scanned under the store's bounds and the ``out_of_bounds``
   policy; ``expand`` may grow the bounds, but never move the chunk grid;
2. on a plain store a journal is written first, with a copy of every metadata
   document (:mod:`zv_dask.store.preimage`), so that a failed append is rolled
   back and a killed one can be; on icechunk the append is one commit;
3. the points are shuffled to write groups as an ingest's are; each group
   task rewrites its chunks from their old rows followed by the new ones
   (keeping the old cells' bytes in the journal first);
4. level 0's metadata is merged, the coarse levels are rebuilt in the regions
   whose children changed (:mod:`zv_dask.pyramid.update`), the root last.

The store ends byte-identical to an ingest of the old and new points together.
"""

from __future__ import annotations

import time

import numpy as np
from dask import delayed

from zv_dask.errors import InputError, StoreError, ZVError
from zv_dask.faults import kill_point
from zv_dask.format.crs import crs_label
from zv_dask.format.grid import Grid, parse_chunk_key
from zv_dask.format.metadata import LevelMetadata
from zv_dask.ingest.fused import pyramid_builder, pyramid_options
from zv_dask.ingest.level0 import plan_level0, scratch_for
from zv_dask.ingest.recovery import stage_error
from zv_dask.ingest.report import IngestReport
from zv_dask.ingest.scan import scan_pass, scan_warnings
from zv_dask.ingest.shuffle import plan_groups, unit_ids
from zv_dask.ingest.staging import group_refs
from zv_dask.ingest.tasks import append_group, split_task, stage_task
from zv_dask.pyramid.builder import LevelSource, specs_of
from zv_dask.pyramid.options import PyramidOptions
from zv_dask.pyramid.update import update_pyramid
from zv_dask.scheduling import describe_scheduler, run_tasks
from zv_dask.store.api import ZVStore, list_resolution_levels, open_store, write_root_metadata
from zv_dask.store.cellio import put_cells
from zv_dask.store.journal import job_document, journal_for, unfinished_message
from zv_dask.store.levels import AttributeSpec, ChunkSummary, finalize_level, level_chunk_keys, level_grid
from zv_dask.store.nodes import attr_dict, group_at
from zv_dask.store.objects import chunks_in, object_entries
from zv_dask.store.preimage import metadata_docs, roll_back, snapshot_metadata
from zv_dask.transaction import WriteJob
from zv_dask.types import StoreLike

__all__ = ["append_points", "check_compatible", "recorded_pyramid", "roll_back_append"]



def _level0_specs(zs: ZVStore) -> list[AttributeSpec]:
    return specs_of(zs.root["0"])


def check_compatible(src, zs: ZVStore) -> list[AttributeSpec]:
    """Raise :class:`InputError` naming every way the new points differ from the store's; its attribute specs."""
    doc = zs.unfinished_job_document if zs.session is None else None  # (icechunk: the branch read is whole)
    if doc is not None and doc.get("kind") != "append":  # (an unfinished append: append_points says what to do)
        raise StoreError(f"cannot append to {zs.url or 'the store'}: it holds an {zs.unfinished_job}")
    specs = _level0_specs(zs)
    have = {s.name: (s.dtype, s.channels) for s in specs}
    new = {n: (np.dtype(d).name, c) for n, (d, c) in src.attributes.items()}
    problems = []
    missing = sorted(set(have) - set(new))
    extra = sorted(set(new) - set(have))
    if missing:
        problems.append(f"the new points lack the store's attributes {missing}")
    if extra:
        problems.append(f"the new points have attributes {extra} that the store does not")
    for n in sorted(set(have) & set(new)):
        (d0, c0), (d1, c1) = have[n], new[n]
        if d0 != d1:
            problems.append(f"attribute {n!r} is {d1} here but {d0} in the store")
        if (c0 or None) != (c1 or None):
            problems.append(f"attribute {n!r} has {c1 or 1} channel(s) here but {c0 or 1} in the store")
    stored_ids = "object_index" in group_at(zs.root, "0")
    if stored_ids and not src.has_object_ids:
        problems.append("the store's points carry object ids and the new points do not (object_ids=...)")
    if src.has_object_ids and not stored_ids:
        problems.append("the new points carry object ids and the store's points do not")
    if src.crs is not None and zs.metadata.crs is not None and src.crs != zs.metadata.crs:
        problems.append(f"the new points are in {crs_label(src.crs)} and the store in {crs_label(zs.metadata.crs)}")
    if problems:
        raise InputError("cannot append: " + "; ".join(problems))
    shards = getattr(zs.root["0/vertices"], "shards", None)
    if shards is not None:
        raise InputError("cannot append to a sharded store yet (its cells are shards that hold many chunks); "
                         "ingest the old and new points together instead")
    return specs


def _appended_las_record(zs: ZVStore, src) -> dict | None:
    """The store's LAS header record with the new files added (``None``: nothing to record)."""
    block = zs.root.attrs.get("zv_dask")
    old = block.get("las") if isinstance(block, dict) else None
    if src.las is None or not isinstance(old, dict):
        return None
    files = list(old.get("files") or []) + list(src.las["files"])
    keys = ("version", "point_format", "scales", "offsets")
    uniform = bool(old.get("uniform", True)) and all(f.get(k) == old.get(k) for f in files for k in keys)
    return {**old, "files": files, "uniform": uniform}


def recorded_pyramid(zs: ZVStore) -> tuple[bool, PyramidOptions | None]:
    """Whether the store has a pyramid, and the options zv-dask recorded building it (``None``: unknown)."""
    block = zs.root.attrs.get("zv_dask")
    rec = block.get("pyramid") if isinstance(block, dict) else None
    if rec is not None:
        return True, PyramidOptions.from_record(rec)
    return any(k > 0 for k in list_resolution_levels(zs)), None


def _pyramid_builder(zs, job, client, progress, slots, budget, pyramid):
    """The builder that rebuilds the store's pyramid as it was built (``pyramid``, if given, must agree)."""
    has_pyramid, recorded = recorded_pyramid(zs)
    if not has_pyramid and not pyramid:
        return None
    if recorded is None and not pyramid:
        raise InputError("the store has coarse levels but no record of the options they were built with (not "
                         "built by zv-dask); pass pyramid={...} (--pyramid-* options) as they were built")
    asked = pyramid_options(pyramid, zs.metadata.ndim) if pyramid else None
    if asked is not None and recorded is not None:
        given = pyramid_builder(zs, job, client, progress, asked, slots).record
        mine = pyramid_builder(zs, job, client, progress, recorded, slots).record
        diff = sorted(k for k in given if given[k] != mine.get(k))
        if diff:
            raise InputError(f"pyramid options {diff} differ from those the store's pyramid was built with "
                             f"({ {k: mine[k] for k in diff} }); an append rebuilds it the same way (leave "
                             "pyramid out)")
    base = recorded if recorded is not None else asked
    assert base is not None  # one of the two, checked above
    return pyramid_builder(zs, job, client, progress, base.replace(
        points_per_task=asked.points_per_task if asked is not None else None, levels_per_task=1,
        memory_budget=budget), slots)


def _grid_change(zs: ZVStore, new_bounds) -> tuple[bool, list[str]]:
    """Whether the bounds grow the grids (``True``: arrays to resize), and what would move a grid's origin."""
    moved, grows = [], False
    lo, hi = (tuple(map(float, b)) for b in new_bounds)
    for k in list_resolution_levels(zs):
        old = level_grid(zs.root, k)
        new = Grid(lo, hi, old.chunk_shape, old.base_bin_shape, old.dtype)
        if tuple(new.origin) != tuple(old.origin):
            axes = [zs.metadata.axis_names[i] for i in range(len(lo)) if new.origin[i] != old.origin[i]]
            moved.append(f"level {k} (axes {', '.join(axes)}: chunk origin {list(old.origin)} -> {list(new.origin)})")
        grows = grows or tuple(new.shape) != tuple(old.shape)
    return grows, moved


def _resize_arrays(zs: ZVStore, new_bounds) -> None:
    """Grow every per-chunk array's shape to the grid of the new bounds (origins unchanged: no cell moves)."""
    import json

    lo, hi = (tuple(map(float, b)) for b in new_bounds)
    grids = {}
    items = []
    for key, raw in metadata_docs(zs).items():
        doc = json.loads(raw)
        if doc.get("node_type") != "array" or "nonempty_chunks" not in doc.get("attributes", {}):
            continue
        k = int(key.split("/")[0])
        if k not in grids:
            old = level_grid(zs.root, k)
            grids[k] = Grid(lo, hi, old.chunk_shape, old.base_bin_shape, old.dtype)
        shape = list(grids[k].shape)
        if doc["shape"] != shape:
            doc["shape"] = shape
            items.append((key, json.dumps(doc, indent=2, allow_nan=False).encode()))
    put_cells(zs.store, items)


def _by_group(chunks: np.ndarray, grid: Grid, starts: np.ndarray, units) -> list[np.ndarray]:
    """Indices of ``chunks`` per write group (the groups are ranges of cell or unit ids)."""
    if not len(chunks):
        return [np.zeros(0, np.int64) for _ in starts]
    ids = unit_ids(grid, chunks, units)
    g = np.searchsorted(starts, ids, side="right") - 1
    order = np.argsort(g, kind="stable")
    bounds = np.searchsorted(g[order], np.arange(len(starts) + 1))
    return [order[bounds[i]:bounds[i + 1]] for i in range(len(starts))]


def roll_back_append(store: StoreLike, *, storage_options: dict | None = None) -> bool:
    """Undo the unfinished (killed) append of a plain store: it is then byte for byte what it was before.

    ``store`` is a path, URL or :class:`~zv_dask.ZVStore`. Returns ``False`` if
    the store has no unfinished append. (An icechunk append needs no undo: it
    is one commit.)
    """
    zs = store if isinstance(store, ZVStore) else open_store(store, "r+", storage_options=storage_options)

    journal = journal_for(zs.backend)
    doc = journal.job() if journal is not None else None
    if journal is None or doc is None or doc.get("kind") != "append":
        return False
    lock = journal.acquire("roll back an append")
    try:
        roll_back(zs, journal)
    finally:
        lock.release()
    return True


def append_points(src, plan, cl, slots, budget, t0, *, out_of_bounds, group_points, scratch, pyramid, message,
                  progress, resume, dtype_reason, options) -> IngestReport:
    """Run an append (see the module docstring); ``plan`` is the target's, ``src`` the new points."""
    zs: ZVStore = plan.existing
    seconds: dict[str, float] = {}
    specs = check_compatible(src, zs)
    icechunk = zs.session is not None
    journal = None if icechunk else journal_for(zs.backend)
    if not icechunk and journal is None:
        raise StoreError("an append needs a store with a location (a path or URL) or an icechunk repository: "
                         "a failed append into an in-memory store could not be undone")
    if journal is not None:
        doc = journal.job()
        if doc is not None and doc.get("kind") == "append" and resume:
            roll_back_append(zs)  # an append resumes by undoing what it did and running again
        elif doc is not None:
            raise StoreError(f"{zs.url} has an {unfinished_message(doc, journal)}")
    job = WriteJob(zs, message or "zv-dask append")
    builder = _pyramid_builder(zs, job, cl, progress, slots, budget, pyramid)
    if builder is not None:
        builder.check_attributes(specs, zs.grid(0).dtype)

    stats, final_bounds, dropped, occ, counts = scan_pass(src, plan, out_of_bounds, cl, progress)
    seconds["scan"] = time.perf_counter() - t0
    grows, moved = _grid_change(zs, final_bounds)
    if moved:
        n = len(level_chunk_keys(group_at(zs.root, "0")))
        raise StoreError("the new points extend the bounds below the store's chunk grid on " + "; ".join(moved)
                         + f": every cell of every level would move ({n:,} level-0 chunks), which an append does "
                         "not do; ingest the old and new points together (or create the store with bounds that "
                         "cover both)")
    grid = Grid(tuple(map(float, final_bounds[0])), tuple(map(float, final_bounds[1])), plan.chunk_shape,
                plan.base_bin_shape or plan.chunk_shape, plan.dtype)
    l0 = plan_level0(src, grid, occ, counts, budget, group_points=group_points, slots=slots, shipped=False)
    staging = scratch_for(plan, cl, scratch, l0) if l0.staged else None
    groups = plan_groups(grid, occ, l0.target_points)
    report = IngestReport(store=str(zs.url or zs.backend.kind), points_read=int(stats.count),
                          points_dropped=int(dropped), bounds=[list(map(float, b)) for b in final_bounds],
                          dtype=plan.dtype, dtype_reason=dtype_reason, chunk_shape=list(plan.chunk_shape),
                          base_bin_shape=list(plan.base_bin_shape) if plan.base_bin_shape else None,
                          partitions=len(src.partitions), groups=groups.n_groups,
                          warnings=scan_warnings(plan.dtype, stats, src) + l0.warnings,
                          memory_budget=budget.per_worker, shuffle=l0.shuffle.mode,
                          scratch=staging.url if staging is not None else None, mode="append",
                          scheduler=describe_scheduler(cl))
    lock = None
    if journal is not None:
        if not journal.write_json("job.json", job_document("append", options, {}, {}, {}), create=True):
            raise StoreError(f"another job is writing {zs.url} (its journal appeared meanwhile)")
        lock = journal.acquire("append")
        snapshot_metadata(zs, journal)
    ndim = grid.ndim
    root = zs.root
    try:
        t1 = time.perf_counter()
        level0 = group_at(root, "0")
        old_count = int(attr_dict(level0, "zarr_vectors_level", {}).get("vertex_count", 0))
        old0 = np.array([parse_chunk_key(k) for k in level_chunk_keys(level0)], np.int64).reshape(-1, ndim)
        objects = None
        if src.has_object_ids:
            all_ids, oid, och, ofr = object_entries(level0, ndim)
            objects = (all_ids, oid, och, ofr)
        las = _appended_las_record(zs, src)
        if (tuple(map(tuple, final_bounds)) != tuple(map(tuple, zs.metadata.bounds))) or las is not None:
            meta = zs.metadata
            meta.bounds = (tuple(map(float, final_bounds[0])), tuple(map(float, final_bounds[1])))
            if grows:
                _resize_arrays(zs, final_bounds)
            write_root_metadata(zs, meta, extra={"zv_dask": {"las": las}} if las is not None else None)
            job.absorb([])
        per_group = _by_group(old0, grid, groups.starts, None)
        per_entry = _by_group(objects[2], grid, groups.starts, None) if objects is not None else None
        target = job.target()
        layout = l0.layout
        drop = out_of_bounds == "ignore"
        seconds["prepare"] = time.perf_counter() - t1

        def group_args(g):
            obj = None if objects is None or per_entry is None else tuple(a[per_entry[g]] for a in objects[1:])
            return old0[per_group[g]], obj

        t2 = time.perf_counter()
        if staging is None:
            splits = [delayed(split_task, nout=groups.n_groups)(p, grid, groups.starts, drop, None, layout)
                      for p in src.partitions]
            writes = [delayed(append_group)([splits[p][g] for p in range(len(splits))], grid, target, specs, g,
                                            *group_args(g), journal) for g in range(groups.n_groups)]
        else:
            stages = [delayed(stage_task)(p, grid, groups.starts, drop, None, layout, staging, i)
                      for i, p in enumerate(src.partitions)]
            staged = run_tasks(stages, cl, progress, "shuffle: stage the new points on scratch")
            report.bytes_staged = int(sum(p.nbytes for p in staged))
            refs = group_refs(staged, groups.n_groups)
            writes = [delayed(append_group)(refs[g], grid, target, specs, g, *group_args(g), journal, staging, layout)
                      for g in range(groups.n_groups)]
        finished = iter(range(1, len(writes) + 1))
        results = run_tasks(writes, cl, progress, "append to level 0",
                            on_result=lambda i, r: kill_point(f"append:{next(finished)}"))
        if staging is not None:
            staging.remove()
        job.absorb([f for _, f in results])
        summary = ChunkSummary.concat([s for s, _ in results], ndim)
        touched = summary.chunks[summary.rows > 0].reshape(-1, ndim)
        count0 = old_count - int(sum(s.extra.get("old_rows", 0) for s, _ in results)) + int(summary.rows.sum())
        present = np.concatenate([old0[~chunks_in(old0, touched)], touched]).reshape(-1, ndim)
        merged = ChunkSummary(present, np.ones(len(present), np.int64))
        entries = None
        if objects is not None:
            new = summary.objects
            assert new is not None, "the write tasks of points with object ids return object entries"
            keep = ~chunks_in(objects[2], touched)
            entries = (np.concatenate([objects[1][keep], new[0]]),
                       np.concatenate([objects[2][keep], new[1].reshape(-1, ndim)]),
                       np.concatenate([objects[3][keep], new[2]]))
            merged.object_ids, merged.object_chunks, merged.object_fragments = entries
        seconds["write"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        meta0 = finalize_level(root, 0, grid, merged, LevelMetadata(level=0, fragments_tile=True), specs,
                               vertex_count=count0)
        report.points_written = int(summary.rows.sum()) - int(sum(s.extra.get("old_rows", 0) for s, _ in results))
        report.chunks_written = len(touched)
        report.bytes_written = int(summary.bytes_written)
        report.levels = [{"level": 0, "vertex_count": meta0.vertex_count, "chunks": len(present),
                          "rewritten": len(touched)}]
        seconds["finalize"] = time.perf_counter() - t3
        if builder is not None:
            t4 = time.perf_counter()
            ids = None if objects is None or entries is None else np.unique(np.concatenate([objects[0], entries[0]]))
            src0 = LevelSource(0, grid, (1,) * ndim, present, None, count0, specs,
                               entries, ids)
            pr, updates = update_pyramid(builder, src0, touched, journal=journal)
            builder.finish_root(objects is not None)
            per = {u.level: u for u in updates}
            for k in pr.levels:
                u = per.get(k)
                report.levels.append({"level": k, "vertex_count": pr.vertex_counts[k], "chunks": pr.chunk_counts[k],
                                      "rewritten": u.chunks if u else 0, "regions": u.regions if u else 0})
            report.links = pr.links if any(pr.link_counts.values()) else "none"
            report.link_counts = dict(pr.link_counts)
            report.warnings += [w for w in pr.warnings if w not in report.warnings]
            seconds["pyramid"] = time.perf_counter() - t4
        kill_point("commit")
        report.snapshot_id = job.commit()
        if journal is not None:
            journal.remove()
    except BaseException as e:
        if staging is not None:
            staging.remove()
        job.abort()
        if journal is not None:
            try:
                roll_back(zs, journal)
            except Exception as undo:  # noqa: BLE001 - the journal stays: the append can still be undone
                raise StoreError(f"the append failed ({type(e).__name__}: {e}) and rolling it back failed too "
                                 f"({type(undo).__name__}: {undo}); the store is marked unfinished: run "
                                 f"`zv-dask rollback {zs.url}` (or ingest --append --resume)") from e
        if isinstance(e, Exception) and not isinstance(e, ZVError):
            raise stage_error("append", e) from e
        raise
    finally:
        if lock is not None:
            lock.release()
    report.seconds = seconds
    return report
