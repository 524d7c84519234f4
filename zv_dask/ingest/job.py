"""The level-0 job in two steps: :func:`prepare` (scan, store, plan, graph) and :meth:`PreparedIngest.run`.

:func:`prepare` runs the scan pass, settles the bounds, makes (or adopts) the
store, plans the fused pyramid levels and the write groups, records the job in
its journal and builds the level-0 tasks; nothing but the store's skeleton is
written. :meth:`PreparedIngest.run` then runs the job's stages in order:
``write`` (the shuffle and the write tasks), ``finalize`` (level 0's
metadata), ``pyramid`` (the rest of the pyramid) and ``commit``. A failure
names the stage it happened in; work that finished stays for a resumed job,
and a job that finished nothing is undone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from dask import delayed

from zv_dask.errors import ZVError
from zv_dask.faults import kill_point
from zv_dask.format.grid import Grid
from zv_dask.format.metadata import LevelMetadata, attribute_spec
from zv_dask.ingest.fused import level0_source, plan_fused_levels
from zv_dask.ingest.level0 import plan_level0, scratch_for
from zv_dask.ingest.options import IngestOptions
from zv_dask.ingest.plan import grid_warnings
from zv_dask.ingest.recovery import put_back, stage_error, write_task_names
from zv_dask.ingest.replace import swap_in
from zv_dask.ingest.report import IngestReport
from zv_dask.ingest.resume import JobRecorder, scan_fingerprint
from zv_dask.ingest.scan import scan_pass, scan_warnings
from zv_dask.ingest.shuffle import GroupPlan, UnitGrid, plan_groups
from zv_dask.ingest.staging import group_refs, remove_stale_scratch
from zv_dask.ingest.target import materialize_target, still_empty
from zv_dask.ingest.tasks import split_task, stage_task, write_group, write_staged_group
from zv_dask.pyramid.options import PyramidOptions
from zv_dask.scheduling import describe_scheduler, run_tasks
from zv_dask.store.cellio import sweep_partials
from zv_dask.store.journal import journal_for, with_resume_hint
from zv_dask.store.levels import AttributeSpec, ChunkSummary, finalize_level, prepare_level
from zv_dask.store.preimage import metadata_docs
from zv_dask.transaction import WriteJob

__all__ = ["PreparedIngest", "prepare"]

STAGES = ("write", "finalize", "pyramid", "commit")

log = logging.getLogger(__name__)


class PreparedIngest:
    """An ingest job prepared but not run (:func:`zv_dask.prepare_ingest`): the store exists with its final
    bounds and the write graph is built; :meth:`run` runs it and returns the :class:`IngestReport`.

    ``dask_objects`` are the level-0 tasks, for inspection (``dask.visualize``).
    """

    report: IngestReport
    dask_objects: list
    # what prepare() settled: the plan, the store and job, the groups and the tasks
    plan: Any
    rec: JobRecorder
    client: Any
    progress: bool
    seconds: dict[str, float]
    stage: str
    staging: Any  # the scratch space of a staged shuffle, or None
    specs: list[AttributeSpec]
    old_metadata: Any
    zs: Any
    job: WriteJob
    created_here: bool
    builder: Any  # the PyramidBuilder of a job with a pyramid, or None
    fused: Any  # the batch of levels the write tasks build, or None
    grid: Grid
    groups: GroupPlan
    todo: list[int]
    splits: list
    writes: list | None  # None: made once a staged shuffle's pieces have landed
    task_journal: Any
    target: Any
    geoms: tuple
    layout: Any
    level_label: str
    # what run() makes
    results: list
    summary: ChunkSummary
    meta: LevelMetadata

    def __repr__(self):
        return f"<PreparedIngest {self.report.store}: {len(self.dask_objects)} write tasks; call .run()>"

    # -- running ----------------------------------------------------------------------------
    def run(self) -> IngestReport:
        """Run the stages in order (:data:`STAGES`); a failure names its stage."""
        self._t_run = time.perf_counter()
        where = self.report.store
        try:
            for stage in STAGES:
                self.stage = stage
                t = time.perf_counter()
                getattr(self, f"_{stage}")()
                log.info("ingest %s: %s done in %.2f s", where, stage, time.perf_counter() - t)
        except BaseException as e:
            named, kept = self._failed(e)
            log.info("ingest %s: failed in stage %s (%s); %s", where, self.stage, type(e).__name__,
                     "its finished work is kept" if kept else "undone")
            if named is e:
                raise
            raise named from e
        self.report.seconds = self.seconds
        return self.report

    def _write(self) -> None:
        """The shuffle and the write tasks of the groups not written yet; every group's result kept."""
        self.results = self._write_level0()
        if self.staging is not None:
            self.staging.remove()  # the pieces are written: free the scratch space before the pyramid
        job = self.job
        job.absorb([fork for _, _, fork in self.results] if not job.durable else [])  # (durable: merged as they came)
        self.rec.checkpoint()
        self.summary = ChunkSummary.concat([s for s, _, _ in self.results], self.grid.ndim)
        self.seconds["write"] = time.perf_counter() - self._t_run - self.seconds.get("stage", 0.0)

    def _write_level0(self) -> list:
        todo, rec = self.todo, self.rec
        if not todo:
            new = []
        elif self.staging is None:
            new = run_tasks(self.writes, self.client, self.progress, self.level_label, on_result=rec.on_group)
        else:
            t = time.perf_counter()
            staged = run_tasks(self.splits, self.client, self.progress, "shuffle: stage the pieces on scratch")
            self.seconds["stage"] = time.perf_counter() - t
            self.report.bytes_staged = int(sum(p.nbytes for p in staged))
            refs = group_refs(staged, self.groups.n_groups)
            self.writes = [delayed(write_staged_group)(refs[g], self.staging, self.layout, self.grid, 0, self.target,
                                                       self.specs, g, self.geoms, self.task_journal) for g in todo]
            new = run_tasks(self.writes, self.client, self.progress, self.level_label, on_result=rec.on_group)
        results: list = [None] * self.groups.n_groups
        for g, r in zip(todo, new):
            results[g] = r
        if rec.done:
            journal = rec.journal
            assert journal is not None, "finished groups are known from the job's journal"
            for g in sorted(rec.done):
                summary, coarse = journal.load("level0", f"{g:07d}")
                results[g] = (summary, coarse, None)
        return results

    def _finalize(self) -> None:
        """Level 0's metadata, from the tasks' summaries."""
        t = time.perf_counter()
        summary, report = self.summary, self.report
        self.meta = finalize_level(self.zs.root, 0, self.grid, summary, LevelMetadata(level=0, fragments_tile=True),
                                   self.specs)
        self.seconds["finalize"] = time.perf_counter() - t
        kill_point("level0")
        report.points_written = self.meta.vertex_count
        report.chunks_written = int((summary.rows > 0).sum())
        report.bytes_written = int(summary.bytes_written)
        report.levels = [{"level": 0, "vertex_count": self.meta.vertex_count, "chunks": report.chunks_written}]

    def _pyramid(self) -> None:
        """The coarse levels: the write tasks' batch handed back, then the remaining rounds."""
        builder, fused, report, results = self.builder, self.fused, self.report, self.results
        if builder is None:
            return
        t = time.perf_counter()
        vertex_count = self.meta.vertex_count
        builder.report.vertex_counts[0] = vertex_count
        builder.report.chunk_counts[0] = report.chunks_written
        src_k = level0_source(self.zs, self.grid, self.summary, vertex_count, self.specs)
        reason = builder.first_reason(vertex_count, report.chunks_written)
        if fused is not None:
            replayed = builder.replay_round(fused.numbers[0])
            if replayed is None:
                src_k, reason = builder.finish_batch(fused, [(r, None) for _, r, _ in results], src_k, self._t_run,
                                                     len(results))
                builder.record_round(fused, src_k, reason)
            else:
                src_k, reason = replayed
            builder.building = None
            report.levels_in_write_tasks = [k for k in fused.numbers if k in builder.report.vertex_counts]
            report.bytes_written += int(sum(r.bytes_written for _, r, _ in results))
        src_k = builder.run(src_k, reason)
        builder.finish_root(src_k.objects is not None)
        pr = builder.report
        self.seconds["pyramid"] = time.perf_counter() - t
        for lv in pr.levels:
            report.levels.append({"level": lv, "vertex_count": pr.vertex_counts[lv], "chunks": pr.chunk_counts[lv]})
        report.pyramid_tasks_resumed = builder.tasks_reused
        report.links = pr.links if any(pr.link_counts.values()) else "none"
        report.link_counts = dict(pr.link_counts)
        report.warnings += [w for w in pr.warnings if w not in report.warnings]

    def _commit(self) -> None:
        kill_point("commit")
        self.report.snapshot_id = self.job.commit()
        self.rec.finish()
        plan = self.plan
        if plan.build_at is not None:  # an overwrite: the finished store takes the old one's place
            left = swap_in(Path(plan.build_at), Path(plan.replaces))
            if left:
                self.report.warnings.append(left)

    def _failed(self, e: BaseException) -> tuple[BaseException, bool]:
        """Keep what finished (a resumable job) or undo the job; the error to raise, named by its stage, and
        whether the job's work was kept."""
        job, rec = self.job, self.rec
        if self.staging is not None:
            self.staging.remove()
        if getattr(e, "conflict", False):  # lost to a concurrent commit: the job is over
            job.abort()
            rec.discard()
            return e, False
        kept = rec.progress()  # finished work stays: the job resumes from it
        if kept:
            job.abort()
            rec.release()
        else:
            put_back(job, self.zs, self.created_here, self.old_metadata)
            job.drop_job_branch()
            rec.abandon()
        if isinstance(e, Exception) and not isinstance(e, ZVError):
            err = stage_error(self._stage_name(), e, self._task_names())
            return (with_resume_hint(err) if kept else err), kept
        if kept and isinstance(e, ZVError):
            return with_resume_hint(e), kept  # e itself, with the hint: its own cause stands
        return e, kept

    def _stage_name(self) -> str:
        if self.stage == "pyramid" and self.builder is not None and self.builder.building:
            return f"pyramid level {self.builder.building[0]}"
        return self.stage

    def _task_names(self):
        if self.stage != "write":
            return None
        return write_task_names(self.writes, self.splits, self.groups, self.grid, staged=self.staging is not None)


def prepare(src, plan, opts: IngestOptions, pyramid_opts: PyramidOptions | None,
            rec: JobRecorder, client, slots: int, budget, t0: float, dt: str, dt_reason: str) -> PreparedIngest:
    """Scan, settle the bounds, make the store and build the level-0 graph of an ingest job (see the module)."""
    p = PreparedIngest()
    p.plan, p.rec, p.client, p.progress = plan, rec, client, opts.progress
    p.seconds = seconds = {}
    p.stage = "prepare"
    drop = opts.out_of_bounds == "ignore" and plan.bounds is not None
    state = plan.resume_state
    local = None
    recorded = rec.recorded_scan()
    if recorded is not None:  # a resumed job over files that did not change: its scan stands
        stats, final_bounds, dropped, occ, counts = recorded
    else:
        if client is not None and src.in_memory:
            # numpy / pandas input: on its way to the workers (once) while this process scans it
            local = src.partitions
            src.partitions = client.persist(src.partitions)
        stats, final_bounds, dropped, occ, counts = scan_pass(src, plan, opts.out_of_bounds, client, opts.progress,
                                                              local=local)
    if state is not None:
        final_bounds = [list(b) for b in state.doc["scan"]["bounds"]]
        dropped = int(state.doc["scan"]["dropped"])
    scanned = scan_fingerprint(stats, final_bounds, dropped)
    seconds["scan"] = time.perf_counter() - t0
    log.info("ingest %s: scanned %d points in %d partitions in %.2f s%s", _where(plan),
             int(stats.count), len(src.partitions), seconds["scan"], " (resumed)" if state is not None else "")
    kill_point("scan")

    # the shuffle's plan, and its scratch space, before anything is written ------------------
    shard_shape = opts.shard_shape
    grid0 = Grid(tuple(map(float, final_bounds[0])), tuple(map(float, final_bounds[1])), plan.chunk_shape,
                 plan.base_bin_shape or plan.chunk_shape, dt)
    l0 = plan_level0(src, grid0, occ, counts, budget, group_points=opts.group_points, slots=slots,
                     shard_shape=shard_shape, shipped=local is not None)
    p.staging = staging = scratch_for(plan, client, opts.scratch, l0) if l0.staged else None
    warnings = (scan_warnings(dt, stats, src) + l0.warnings + list(plan.notes or [])
                + grid_warnings(grid0, len(occ.counts), int(stats.count) - int(dropped)))

    # coordinator: the store, the grid, the groups ------------------------------------------
    t1 = time.perf_counter()
    p.specs = specs = [AttributeSpec(name, dtype_, ch) for name, (dtype_, ch) in src.attributes.items()]
    attr_specs = {"vertex": {s.name: attribute_spec(s.dtype, s.channels) for s in specs}} if specs else None
    # a plain store that exists gets its metadata back byte for byte if the job fails
    p.old_metadata = (metadata_docs(plan.existing) if plan.existing is not None and not plan.overwrite
                      and plan.existing.session is None and state is None else None)
    if state is None and plan.existing is not None and not plan.overwrite:  # an empty store made before the job
        if rec.take(plan.existing.backend):  # another job may have adopted (or filled) it since the plan: ask again
            still_empty(plan)
    p.zs = zs = plan.existing if state is not None else materialize_target(plan, final_bounds, attr_specs,
                                                                           crs=src.crs, extra=_root_extra(src))
    if state is None and plan.existing is None:
        rec.take(zs.backend)  # the store this job made; a job that took it first keeps it (not removed)
    if state is not None:
        sweep_partials(zs.store)  # cells the killed job's tasks were writing
        remove_stale_scratch(zs.url, icechunk=zs.session is not None, options=zs.backend.options)
    p.job = job = WriteJob(zs, opts.message or "zv-dask ingest")
    p.created_here = plan.existing is None or (plan.build_at is not None and state is None)
    p.builder = p.fused = None
    p.writes, p.splits = None, []
    durable = rec.enabled and zs.session is not None and journal_for(zs.backend) is not None  # icechunk, located
    if state is not None and durable:
        job.on_job_branch(resume_from=state.doc["plan"]["base"])
    try:
        _build_graph(p, src, plan, opts, pyramid_opts, rec, l0, occ, state, durable, drop, scanned,
                     (stats, final_bounds, dropped, occ, counts), slots)
    except BaseException:
        if rec.progress():
            raise
        put_back(job, zs, p.created_here, p.old_metadata, settle=0)  # no task has run yet
        job.drop_job_branch()
        rec.abandon()
        if staging is not None:
            staging.remove()
        raise
    seconds["prepare"] = time.perf_counter() - t1
    p.report = IngestReport(store=plan.replaces or str(zs.url or zs.backend.kind), points_read=int(stats.count),
                            points_dropped=int(dropped), bounds=[list(map(float, b)) for b in final_bounds],
                            dtype=dt, dtype_reason=dt_reason, chunk_shape=list(plan.chunk_shape),
                            base_bin_shape=list(plan.base_bin_shape) if plan.base_bin_shape else None,
                            partitions=len(src.partitions), groups=p.groups.n_groups, warnings=warnings,
                            memory_budget=budget.per_worker, shuffle=l0.shuffle.mode,
                            scratch=staging.url if staging is not None else None,
                            resumed=state is not None, groups_resumed=len(rec.done),
                            scheduler=describe_scheduler(client), crs=src.crs)
    fused = p.fused
    p.level_label = ("shuffle and write level 0" if staging is None else "write level 0") + (
        f" and levels 1-{fused.numbers[-1]}" if fused is not None and len(fused.levels) > 1
        else " and level 1" if fused is not None else "")
    p.dask_objects = p.writes if p.writes is not None else p.splits
    return p


def _build_graph(p: PreparedIngest, src, plan, opts: IngestOptions, pyramid_opts, rec, l0, occ, state, durable,
                 drop, scanned, scan_result, slots) -> None:
    """The level-0 arrays, the fused levels, the groups, the job's journal entry and the tasks (into ``p``)."""
    zs, job, specs, shard_shape = p.zs, p.job, p.specs, opts.shard_shape
    p.grid = grid = zs.grid(0)
    if state is None:
        prepare_level(zs.root, 0, grid, specs, shards=shard_shape, compressors=opts.compressors())
    units = UnitGrid.of(grid, shard_shape) if shard_shape is not None else None
    if pyramid_opts is not None:
        p.builder, p.fused, units = plan_fused_levels(
            zs, job, p.client, opts.progress, pyramid_opts, grid, specs, occ, src.has_object_ids, shard_shape, units,
            slots, l0.fused_points, None if state is None else int(state.doc["plan"]["fused_levels"]))
    if state is not None:
        groups = GroupPlan(state.starts, np.zeros(len(state.starts), np.int64), np.zeros(len(state.starts), np.int64),
                           units)
    else:
        groups = plan_groups(grid, occ, l0.target_points, units)
    p.groups = groups
    if durable and state is None:  # icechunk: progress is committed to a job branch, the user's branch
        job.on_job_branch()       # gains the whole job as one commit at the end
        job.checkpoint(force=True)
    rec.start(zs.backend, scanned, {"groups": groups.n_groups, "starts": groups.starts.tolist(),
                                    "fused_levels": len(p.fused.levels) if p.fused is not None else 0,
                                    "base": job.base}, scan_result)
    rec.job = job
    if p.builder is not None:
        p.builder.journal = rec.journal
        p.builder.record_tasks = not job.durable
        p.builder.before_record = lambda: job.checkpoint(force=True)
    # tasks record their groups themselves, after their cells; on icechunk the coordinator does, after
    # the checkpoint that makes the cells durable
    p.task_journal = journal = rec.journal if not job.durable else None
    p.todo = todo = [g for g in range(groups.n_groups) if g not in rec.done]
    rec.todo = todo  # on_group(i, ...) is about group todo[i]
    skip = None
    if rec.done:
        skip = np.zeros(groups.n_groups, bool)
        skip[sorted(rec.done)] = True
    p.target = target = job.target()
    p.geoms = geoms = p.fused.geoms if p.fused is not None else ()
    p.layout = layout = l0.layout
    if todo and p.staging is None:
        p.splits = splits = [delayed(split_task, nout=groups.n_groups)(part, grid, groups.starts, drop, units, layout,
                                                                       skip) for part in src.partitions]
        p.writes = [delayed(write_group)([splits[i][g] for i in range(len(splits))], grid, 0, target, specs, g, geoms,
                                         journal) for g in todo]
    elif todo:
        p.splits = [delayed(stage_task)(part, grid, groups.starts, drop, units, layout, p.staging, i, skip)
                    for i, part in enumerate(src.partitions)]
        p.writes = None  # made from where the pieces landed, once they are staged
    else:
        p.writes = []


def _where(plan) -> str:
    """The target of a plan, for a log line (a path or URL, or the kind of store object)."""
    target = plan.replaces or plan.target
    return os.fspath(target) if isinstance(target, (str, os.PathLike)) else type(target).__name__


def _root_extra(src) -> dict | None:
    """zv-dask's own root attributes from the input: the LAS header record."""
    return {"zv_dask": {"las": src.las}} if src.las is not None else None
