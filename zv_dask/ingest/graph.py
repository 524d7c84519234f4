"""``ingest``: the level-0 job (and its pyramid), wired as two Dask passes and a coordinator.

1. *scan*: per partition, statistics and (sampled) per-chunk counts, reduced on
   the client, which settles the bounds (the out-of-bounds policy) before
   anything is written; in-memory input is scanned in the client while it
   travels to the workers;
2. the coordinator creates (or resets) the store with the final bounds, plans
   which coarse levels the write tasks can build (:mod:`zv_dask.ingest.fused`),
   creates their arrays, and cuts the occupied write units into groups;
3. *shuffle + write*: each partition is binned and split by group with a radix
   sort; each group task concatenates its pieces in input order, lays them out,
   writes its level-0 cells and builds the fused coarse levels and their links
   (no two tasks share a chunk, a shard or a pyramid region);
4. the coordinator writes the metadata last, builds the remaining levels in
   rounds, and commits once on icechunk.

Each finished write group, pyramid task and round is recorded in the job's
journal (:mod:`zv_dask.store.journal`, :mod:`zv_dask.ingest.resume`), so a
killed or failed job keeps its finished work and ``resume=True`` continues it;
a job that fails before finishing anything is undone
(:mod:`zv_dask.ingest.recovery`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from dask import delayed

from zv_dask.budget import resolve_budget
from zv_dask.errors import InputError, ZVError
from zv_dask.faults import kill_point
from zv_dask.format.codecs import check_compression, compressors_for
from zv_dask.format.grid import Grid
from zv_dask.format.metadata import LevelMetadata, attribute_spec
from zv_dask.ingest.append import append_points
from zv_dask.ingest.bounds import POLICIES
from zv_dask.ingest.fused import level0_source, plan_fused_levels, pyramid_options
from zv_dask.ingest.level0 import plan_level0, scratch_for
from zv_dask.ingest.plan import grid_warnings, preflight
from zv_dask.ingest.recovery import put_back, stage_error, write_task_names
from zv_dask.ingest.replace import swap_in
from zv_dask.ingest.report import IngestReport
from zv_dask.ingest.resume import JobRecorder, input_fingerprint, job_options, scan_fingerprint
from zv_dask.ingest.scan import scan_pass, scan_warnings
from zv_dask.ingest.shuffle import GroupPlan, UnitGrid, plan_groups
from zv_dask.ingest.staging import group_refs, remove_stale_scratch
from zv_dask.ingest.target import materialize_target, still_empty
from zv_dask.ingest.tasks import (
    split_task,
    stage_task,
    write_group,
    write_staged_group,
)
from zv_dask.lazy import PendingIngest, absolute, make_job
from zv_dask.scheduling import describe_scheduler, resolve_client, run_tasks, task_slots
from zv_dask.store.cellio import sweep_partials
from zv_dask.store.journal import journal_for, with_resume_hint
from zv_dask.store.levels import (
    AttributeSpec,
    ChunkSummary,
    finalize_level,
    prepare_level,
)
from zv_dask.store.preimage import metadata_docs
from zv_dask.transaction import WriteJob

__all__ = ["ingest", "prepare_ingest", "PreparedIngest", "MODES"]

MODES = ("write", "append")

class PreparedIngest:
    """An ingest job prepared but not run (:func:`prepare_ingest`): the store exists with its final
    bounds and the write graph is built; ``run()`` runs it and returns the :class:`IngestReport`.

    ``dask_objects`` are the level-0 tasks, for inspection (``dask.visualize``).
    """

    def __init__(self, run, dask_objects, report):
        self._run = run
        self.dask_objects = dask_objects
        self.report = report

    def run(self) -> IngestReport:
        return self._run()

    def __repr__(self):
        return f"<PreparedIngest {self.report.store}: {len(self.dask_objects)} write tasks; call .run()>"


_PREPARE = object()  # ingest(compute=_PREPARE): what prepare_ingest asks for


def ingest(points, store, *, attributes=None, object_ids=None, columns=None, chunk_shape=None, bounds=None,
           base_bin_shape=None, out_of_bounds: str = "raise", dtype=None, shard_shape=None, pyramid=None,
           backend=None, storage_options=None, client=None, compute: bool = True, overwrite: bool = False,
           axes=None, message: str | None = None, progress: bool = False, partition_rows: int | None = None,
           group_points: int | None = None, branch: str = "main", memory_budget=None, scratch=None,
           resume: bool = False, durable: bool = True, mode: str = "write", crs=None, reproject=None,
           compression=None, compression_level=None):
    """Ingest a point cloud into level 0 of a ZV store, in parallel, and optionally build its pyramid.

    Parameters
    ----------
    points
        ``(N, D)`` numpy or dask array; pandas or dask DataFrame (``columns`` name
        the coordinates, other numeric columns become attributes unless
        ``attributes=[...]`` picks); xarray Dataset; or path(s)/glob of Parquet,
        CSV, NPY, zarr or LAS/LAZ files.
    store
        Path, URL (``s3://``, ``gs://``, ``az://``...), zarr Store, or icechunk
        Repository/Session (``backend="icechunk"`` for a repository path/URL).
    attributes, object_ids
        Per-point attributes ``{name: (N,) or (N, C)}`` and integer object ids
        (arrays for array inputs; column/variable names for tables and Datasets).
    chunk_shape, bounds, base_bin_shape
        Store geometry in world units (taken from an existing empty store).
        ``bounds=None`` fits the data exactly.
    out_of_bounds
        ``"raise"`` (default), ``"ignore"`` (drop and count) or ``"expand"``.
    dtype
        Stored position dtype; default float32, float64 for LAS/LAZ.
    shard_shape
        Chunks per shard (zarr sharding); one task writes each shard.
    pyramid
        ``True`` or a dict of :func:`zv_dask.build_pyramid` options to build
        the levels in the same job (and the same icechunk commit).
    client
        A ``distributed.Client``; by default the current one, else Dask's local scheduler.
    compute
        ``False`` returns a :class:`~zv_dask.lazy.PendingIngest`, a Dask collection
        that runs the job when computed (``dask.compute``, ``.compute()``,
        ``client.compute`` / ``persist``, watched with ``distributed.progress``) and
        returns this report. Making it checks the input and the options and makes
        paths absolute; nothing is written until it is computed. It runs on the
        cluster that computes it (``client`` is not kept), and the store must be
        a path, URL or icechunk Repository (a writable Session cannot travel).
    memory_budget
        Bytes (or a size like ``"2GiB"``) of data the job may hold per worker, on
        top of the worker process itself; by default half the workers' memory
        limit. It caps the points per task, and when the shuffle's pieces would
        not fit beside the running tasks they wait on ``scratch`` storage instead
        of in memory (the same bytes are written either way).
    scratch
        Where a staged shuffle keeps its pieces: a path or an object-store URL
        every worker reaches (``storage_options`` apply). By default a
        ``.zv-scratch`` prefix inside the store (beside an icechunk repository);
        removed when the job ends.
    resume
        Continue the unfinished job in ``store`` (killed, or failed after it
        wrote something): the same input and options, checked against the job's
        journal; the groups and pyramid tasks it finished are not redone, and the
        store ends byte-identical to an uninterrupted run's. Without an
        unfinished job the whole job runs.
    mode
        ``"write"`` (default): a new store, or an empty one made by
        :func:`~zv_dask.create_store`. ``"append"``: add the points to a store
        that holds points; its geometry applies, the points must carry the same
        attributes (and object ids if it has them), only the level-0 chunks they
        touch and the pyramid regions above them are rewritten, and the store
        ends byte-identical to an ingest of all the points. A failed append
        leaves the store as it was (on a plain store it is rolled back from a
        journal; a killed one is undone with ``resume=True`` or
        :func:`~zv_dask.roll_back`).
    crs
        The points' coordinate reference system, written to the root ``crs``:
        ``"EPSG:32610"``, an EPSG number, WKT, PROJJSON or a dict. LAS/LAZ
        files bring theirs (WKT VLR or GeoTIFF keys; files with different CRS
        are refused); a ``crs`` given overrides them.
    reproject
        A CRS to transform the positions to before anything else (as ``crs``;
        needs pyproj, the ``crs`` extra), from ``crs`` or each LAS file's own,
        so files in different CRSs can be one job. The root ``crs`` is this one;
        see :mod:`zv_dask.ingest.reproject`.
    compression, compression_level
        Codecs after ``vlen-bytes`` on every array the job makes (level 0,
        coarse levels, links, object indexes): ``"zstd"`` (default, as
        ``None``), ``"blosc"`` or ``"none"``, with a level (default zstd 3,
        blosc 5); see :mod:`zv_dask.format.codecs`. An append keeps the store's.
    durable
        Keep the job's journal (and on icechunk, its checkpoints on a job
        branch) while it runs, so that a killed job can resume (default). With
        ``False`` a failed job is undone as a whole and cannot resume.

    Returns
    -------
    IngestReport
    """
    if compute is False:
        options = {k: v for k, v in locals().items() if k not in ("points", "store", "compute")}
        return _pending(points, store, options)
    if out_of_bounds not in POLICIES:
        raise InputError(f"out_of_bounds={out_of_bounds!r} is not one of {POLICIES}")
    if mode not in MODES:
        raise InputError(f"mode={mode!r} is not one of {MODES}")
    if resume and not durable:
        raise InputError("resume needs the job's journal: resume=True and durable=False contradict each other")
    compressors = compressors_for(compression, compression_level)  # checked before anything is read
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    cl = resolve_client(client)
    slots = task_slots(cl)
    budget = resolve_budget(memory_budget, cl)
    src, plan, dt, dt_reason = preflight(points, store, attributes=attributes, object_ids=object_ids,
                                         columns=columns, chunk_shape=chunk_shape, bounds=bounds,
                                         base_bin_shape=base_bin_shape, out_of_bounds=out_of_bounds, dtype=dtype,
                                         shard_shape=shard_shape, backend=backend, storage_options=storage_options,
                                         overwrite=overwrite, axes=axes, partition_rows=partition_rows,
                                         branch=branch, budget=budget, slots=slots,
                                         resume=resume and mode != "append", append=mode == "append", crs=crs,
                                         reproject=reproject)
    if mode == "append":
        if shard_shape is not None:
            raise InputError("shard_shape is the store's in an append (leave it out)")
        if compression is not None or compression_level is not None:
            raise InputError("compression is the store's in an append (leave it out)")
        return append_points(src, plan, cl, slots, budget, t0, out_of_bounds=out_of_bounds,
                             group_points=group_points, scratch=scratch, pyramid=pyramid, message=message,
                             progress=progress, resume=resume, dtype_reason=dt_reason,
                             options=job_options(attributes=sorted(src.attributes), object_ids=src.has_object_ids,
                                                 out_of_bounds=out_of_bounds,
                                                 **({"reproject": reproject} if reproject is not None else {})))
    dt = plan.dtype
    pyramid_opts = pyramid_options(pyramid, src.ndim, budget)  # checked before anything is read or written
    rec = JobRecorder(plan.resume_state, job_options(
        attributes=sorted(src.attributes), object_ids=src.has_object_ids, columns=columns, chunk_shape=chunk_shape,
        bounds=bounds, base_bin_shape=base_bin_shape, out_of_bounds=out_of_bounds, dtype=dtype,
        shard_shape=shard_shape, axes=axes, pyramid=_pyramid_identity(pyramid),
        **({"reproject": reproject} if reproject is not None else {}),
        **({"compression": list(check_compression(compression, compression_level))} if compressors else {})),
        input_fingerprint(points, src), enabled=durable)
    try:
        return _ingest(src, plan, rec, pyramid_opts, cl, slots, budget, t0, seconds, dt, dt_reason,
                       out_of_bounds=out_of_bounds, shard_shape=shard_shape, group_points=group_points,
                       scratch=scratch, message=message, progress=progress, compute=compute,
                       compressors=compressors)
    except BaseException:
        rec.release()
        raise


def prepare_ingest(points, store, **options) -> PreparedIngest:
    """:func:`ingest` up to its first task: the input scanned, the bounds settled, the store made
    and the write graph built; :meth:`PreparedIngest.run` runs the rest.

    For acting between the two (a concurrent writer in a test, a look at the graph); a job
    prepared and never run leaves its store as an unfinished job (``resume`` or ``overwrite``).
    """
    if options.get("mode", "write") == "append":
        raise InputError("an append cannot be prepared apart from its run; run it, or make it lazy with "
                         "compute=False")
    return ingest(points, store, compute=_PREPARE, **options)


def _pending(points, store, options: dict) -> PendingIngest:
    """``ingest(compute=False)``: check what can be checked without writing, then a job that runs the rest."""
    if options["out_of_bounds"] not in POLICIES:
        raise InputError(f"out_of_bounds={options['out_of_bounds']!r} is not one of {POLICIES}")
    if options["mode"] not in MODES:
        raise InputError(f"mode={options['mode']!r} is not one of {MODES}")
    compressors_for(options["compression"], options["compression_level"])
    points = [absolute(p) for p in points] if isinstance(points, (list, tuple)) and points and all(
        isinstance(p, (str, os.PathLike)) for p in points) else absolute(points)
    store = absolute(store)
    cl = resolve_client(options.pop("client"))
    keys = ("attributes", "object_ids", "columns", "chunk_shape", "bounds", "base_bin_shape", "out_of_bounds",
            "dtype", "shard_shape", "backend", "storage_options", "overwrite", "axes", "partition_rows", "branch",
            "crs", "reproject")
    src, _, _, _ = preflight(points, store, **{k: options[k] for k in keys}, budget=resolve_budget(
        options["memory_budget"], cl), slots=task_slots(cl), resume=options["resume"] and options["mode"] != "append",
        append=options["mode"] == "append")
    if options["mode"] != "append":
        pyramid_options(options["pyramid"], src.ndim)
    if options["scratch"] is not None:
        options["scratch"] = absolute(options["scratch"])
    return make_job(PendingIngest, ingest, (points, store), options, store)


def _root_extra(src) -> dict | None:
    """zv-dask's own root attributes from the input: the LAS header record."""
    return {"zv_dask": {"las": src.las}} if src.las is not None else None


def _pyramid_identity(pyramid):
    """The pyramid options that decide what is written (not how the tasks are sized)."""
    if not pyramid:
        return None
    opts = dict(pyramid) if isinstance(pyramid, dict) else {}
    for k in ("points_per_task", "levels_per_task", "memory_budget", "progress"):
        opts.pop(k, None)
    return opts


def _ingest(src, plan, rec, pyramid_opts, cl, slots, budget, t0, seconds, dt, dt_reason, *, out_of_bounds,
            shard_shape, group_points, scratch, message, progress, compute, compressors=None):
    drop = out_of_bounds == "ignore" and plan.bounds is not None
    state = plan.resume_state
    local = None
    recorded = rec.recorded_scan()
    if recorded is not None:  # a resumed job over files that did not change: its scan stands
        stats, final_bounds, dropped, occ, counts = recorded
    else:
        if cl is not None and src.in_memory:
            # numpy / pandas input: on its way to the workers (once) while this process scans it
            local = src.partitions
            src.partitions = cl.persist(src.partitions)
        stats, final_bounds, dropped, occ, counts = scan_pass(src, plan, out_of_bounds, cl, progress, local=local)
    if state is not None:
        final_bounds = [list(b) for b in state.doc["scan"]["bounds"]]
        dropped = int(state.doc["scan"]["dropped"])
    scanned = scan_fingerprint(stats, final_bounds, dropped)
    seconds["scan"] = time.perf_counter() - t0
    kill_point("scan")

    # the shuffle's plan, and its scratch space, before anything is written ------------------
    grid0 = Grid(tuple(map(float, final_bounds[0])), tuple(map(float, final_bounds[1])), plan.chunk_shape,
                 plan.base_bin_shape or plan.chunk_shape, dt)
    l0 = plan_level0(src, grid0, occ, counts, budget, group_points=group_points, slots=slots,
                     shard_shape=shard_shape, shipped=local is not None)
    staging = scratch_for(plan, cl, scratch, l0) if l0.staged else None
    warnings = (scan_warnings(dt, stats, src) + l0.warnings + list(plan.notes or [])
                + grid_warnings(grid0, len(occ.counts), int(stats.count) - int(dropped)))

    # coordinator: the store, the grid, the groups ------------------------------------------
    t1 = time.perf_counter()
    specs = [AttributeSpec(name, dtype_, ch) for name, (dtype_, ch) in src.attributes.items()]
    attr_specs = {"vertex": {s.name: attribute_spec(s.dtype, s.channels) for s in specs}} if specs else None
    # a plain store that exists gets its metadata back byte for byte if the job fails
    old_metadata = (metadata_docs(plan.existing) if plan.existing is not None and not plan.overwrite
                    and plan.existing.session is None and state is None else None)
    if state is None and plan.existing is not None and not plan.overwrite:  # an empty store made before the job
        if rec.take(plan.existing.backend):  # another job may have adopted (or filled) it since the plan: ask again
            still_empty(plan)
    zs = plan.existing if state is not None else materialize_target(plan, final_bounds, attr_specs, crs=src.crs,
                                                                    extra=_root_extra(src))
    if state is None and plan.existing is None:
        rec.take(zs.backend)  # the store this job made; a job that took it first keeps it (not removed)
    if state is not None:
        sweep_partials(zs.store)  # cells the killed job's tasks were writing
        remove_stale_scratch(zs.url, icechunk=zs.session is not None, options=zs.backend.options)
    job = WriteJob(zs, message or "zv-dask ingest")
    created_here = plan.existing is None or (plan.build_at is not None and state is None)
    builder = fused = None
    durable = rec.enabled and zs.session is not None and journal_for(zs.backend) is not None  # icechunk, located
    if state is not None and durable:
        job.on_job_branch(resume_from=state.doc["plan"]["base"])
    try:
        grid = zs.grid(0)
        if state is None:
            prepare_level(zs.root, 0, grid, specs, shards=shard_shape, compressors=compressors)
        units = UnitGrid.of(grid, shard_shape) if shard_shape is not None else None
        if pyramid_opts is not None:
            builder, fused, units = plan_fused_levels(
                zs, job, cl, progress, pyramid_opts, grid, specs, occ, src.has_object_ids, shard_shape, units, slots,
                l0.fused_points, None if state is None else int(state.doc["plan"]["fused_levels"]))
        if state is not None:
            groups = GroupPlan(state.starts, np.zeros(len(state.starts), np.int64),
                               np.zeros(len(state.starts), np.int64), units)
        else:
            groups = plan_groups(grid, occ, l0.target_points, units)
        if durable and state is None:  # icechunk: progress is committed to a job branch, the user's branch
            job.on_job_branch()       # gains the whole job as one commit at the end
            job.checkpoint(force=True)
        rec.start(zs.backend, scanned, {"groups": groups.n_groups, "starts": groups.starts.tolist(),
                                        "fused_levels": len(fused.levels) if fused is not None else 0,
                                        "base": job.base}, (stats, final_bounds, dropped, occ, counts))
        rec.job = job
        if builder is not None:
            builder.journal = rec.journal
            builder.record_tasks = not job.durable
            builder.before_record = lambda: job.checkpoint(force=True)
        # tasks record their groups themselves, after their cells; on icechunk the coordinator does, after
        # the checkpoint that makes the cells durable
        journal = rec.journal if not job.durable else None
        todo = [g for g in range(groups.n_groups) if g not in rec.done]
        rec.todo = todo  # on_group(i, ...) is about group todo[i]
        skip = None
        if rec.done:
            skip = np.zeros(groups.n_groups, bool)
            skip[sorted(rec.done)] = True
        target = job.target()
        geoms = fused.geoms if fused is not None else ()
        layout = l0.layout
        splits, writes = [], []
        if todo and staging is None:
            splits = [delayed(split_task, nout=groups.n_groups)(p, grid, groups.starts, drop, units, layout, skip)
                      for p in src.partitions]
            writes = [delayed(write_group)([splits[p][g] for p in range(len(splits))], grid, 0, target, specs, g,
                                           geoms, journal) for g in todo]
        elif todo:
            splits = [delayed(stage_task)(p, grid, groups.starts, drop, units, layout, staging, i, skip)
                      for i, p in enumerate(src.partitions)]
            writes = None  # made from where the pieces landed, once they are staged
    except BaseException:
        if rec.progress():
            raise
        put_back(job, zs, created_here, old_metadata, settle=0)  # no task has run yet
        job.drop_job_branch()
        rec.abandon()
        if staging is not None:
            staging.remove()
        raise
    seconds["prepare"] = time.perf_counter() - t1
    report = IngestReport(store=plan.replaces or str(zs.url or zs.backend.kind), points_read=int(stats.count),
                          points_dropped=int(dropped), bounds=[list(map(float, b)) for b in final_bounds],
                          dtype=dt, dtype_reason=dt_reason, chunk_shape=list(plan.chunk_shape),
                          base_bin_shape=list(plan.base_bin_shape) if plan.base_bin_shape else None,
                          partitions=len(src.partitions), groups=groups.n_groups, warnings=warnings,
                          memory_budget=budget.per_worker, shuffle=l0.shuffle.mode,
                          scratch=staging.url if staging is not None else None,
                          resumed=state is not None, groups_resumed=len(rec.done),
                          scheduler=describe_scheduler(cl), crs=src.crs)
    level_label = ("shuffle and write level 0" if staging is None else "write level 0") + (
        f" and levels 1-{fused.numbers[-1]}" if fused is not None and len(fused.levels) > 1
        else " and level 1" if fused is not None else "")

    def write_level0() -> list:
        """Run the shuffle and the write tasks of the groups not written yet; returns every group's result."""
        nonlocal writes
        if not todo:
            new = []
        elif staging is None:
            new = run_tasks(writes, cl, progress, level_label, on_result=rec.on_group)
        else:
            t = time.perf_counter()
            staged = run_tasks(splits, cl, progress, "shuffle: stage the pieces on scratch")
            seconds["stage"] = time.perf_counter() - t
            report.bytes_staged = int(sum(p.nbytes for p in staged))
            refs = group_refs(staged, groups.n_groups)
            writes = [delayed(write_staged_group)(refs[g], staging, layout, grid, 0, target, specs, g, geoms, journal)
                      for g in todo]
            new = run_tasks(writes, cl, progress, level_label, on_result=rec.on_group)
        results: list = [None] * groups.n_groups
        for g, r in zip(todo, new):
            results[g] = r
        for g in sorted(rec.done):
            summary, coarse = rec.journal.load("level0", f"{g:07d}")
            results[g] = (summary, coarse, None)
        return results

    def run() -> IngestReport:
        t2 = time.perf_counter()
        stage = "write"
        try:
            results = write_level0()
            if staging is not None:
                staging.remove()  # the pieces are written: free the scratch space before the pyramid
            job.absorb([fork for _, _, fork in results] if not job.durable else [])  # (durable: merged as they came)
            rec.checkpoint()
            summary = ChunkSummary.concat([s for s, _, _ in results], grid.ndim)
            t3 = time.perf_counter()
            seconds["write"] = t3 - t2 - seconds.get("stage", 0.0)
            stage = "finalize"
            meta = finalize_level(zs.root, 0, grid, summary, LevelMetadata(level=0, fragments_tile=True), specs)
            seconds["finalize"] = time.perf_counter() - t3
            kill_point("level0")
            report.points_written = meta.vertex_count
            report.chunks_written = int((summary.rows > 0).sum())
            report.bytes_written = int(summary.bytes_written)
            report.levels = [{"level": 0, "vertex_count": meta.vertex_count, "chunks": report.chunks_written}]
            if builder is not None:
                stage = "pyramid"
                t4 = time.perf_counter()
                pr = builder.report
                pr.vertex_counts[0] = meta.vertex_count
                pr.chunk_counts[0] = report.chunks_written
                src0 = level0_source(zs, grid, summary, meta.vertex_count, specs)
                reason = builder.first_reason(meta.vertex_count, report.chunks_written)
                if fused is not None:
                    replayed = builder.replay_round(fused.numbers[0])
                    if replayed is None:
                        src_k, reason = builder.finish_batch(fused, [(r, None) for _, r, _ in results], src0, t2,
                                                             len(results))
                        builder.record_round(fused, src_k, reason)
                    else:
                        src_k, reason = replayed
                    builder.building = None
                    pr = builder.report
                    report.levels_in_write_tasks = [k for k in fused.numbers if k in pr.vertex_counts]
                    report.bytes_written += int(sum(r.bytes_written for _, r, _ in results))
                else:
                    src_k = src0
                src_k = builder.run(src_k, reason)
                pr = builder.report
                builder.finish_root(src_k.objects is not None)
                seconds["pyramid"] = time.perf_counter() - t4
                for lv in pr.levels:
                    report.levels.append({"level": lv, "vertex_count": pr.vertex_counts[lv],
                                          "chunks": pr.chunk_counts[lv]})
                report.pyramid_tasks_resumed = builder.tasks_reused
                report.links = pr.links if any(pr.link_counts.values()) else "none"
                report.link_counts = dict(pr.link_counts)
                report.warnings += [w for w in pr.warnings if w not in report.warnings]
            stage = "commit"
            kill_point("commit")
            report.snapshot_id = job.commit()
            rec.finish()
            if plan.build_at is not None:  # an overwrite: the finished store takes the old one's place
                left = swap_in(Path(plan.build_at), Path(plan.replaces))
                if left:
                    report.warnings.append(left)
        except BaseException as e:
            if staging is not None:
                staging.remove()
            if getattr(e, "conflict", False):  # lost to a concurrent commit: the job is over
                job.abort()
                rec.discard()
                raise
            if rec.progress():  # finished work stays: the job resumes from it
                job.abort()
                rec.release()
                if isinstance(e, Exception) and not isinstance(e, ZVError):
                    raise with_resume_hint(stage_error(_stage_name(stage, builder), e,
                                                       _task_names(stage, writes, splits, groups, grid,
                                                                   staging))) from e
                if isinstance(e, ZVError):
                    raise with_resume_hint(e)  # noqa: B904 - e itself, with the hint: its own cause stands
                raise
            put_back(job, zs, created_here, old_metadata)
            job.drop_job_branch()
            rec.abandon()
            if isinstance(e, Exception) and not isinstance(e, ZVError):
                raise stage_error(_stage_name(stage, builder), e,
                                  _task_names(stage, writes, splits, groups, grid, staging)) from e
            raise
        report.seconds = seconds
        return report

    if compute is _PREPARE:
        return PreparedIngest(run, writes if writes is not None else splits, report)
    return run()


def _stage_name(stage: str, builder) -> str:
    if stage == "pyramid" and builder is not None and builder.building:
        return f"pyramid level {builder.building[0]}"
    return stage


def _task_names(stage, writes, splits, groups, grid, staging):
    return write_task_names(writes, splits, groups, grid, staged=staging is not None) if stage == "write" else None
