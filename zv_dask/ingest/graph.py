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
   rounds, and commits once on icechunk. Any failure discards the job's changes
   (:mod:`zv_dask.ingest.recovery`).
"""

from __future__ import annotations

import time
from functools import reduce

import numpy as np
from dask import delayed

from zv_dask.errors import IngestError, InputError, ZVError
from zv_dask.format.grid import Grid
from zv_dask.format.layout import plan_chunks
from zv_dask.format.metadata import LevelMetadata, attribute_spec
from zv_dask.ingest.bounds import POLICIES, combine_stats, settle_bounds
from zv_dask.ingest.report import IngestReport
from zv_dask.ingest.shuffle import (
    UnitGrid,
    combine_occupancy,
    merge_pieces,
    plan_groups,
    scan_partition,
    split_partition,
)
from zv_dask.ingest.sources import DEFAULT_PARTITION_ROWS
from zv_dask.ingest.target import materialize_target
from zv_dask.store.levels import AttributeSpec, ChunkSummary, finalize_level, prepare_level, write_chunk_payloads
from zv_dask.ingest.fused import DEFAULT_GROUP_POINTS, level0_source, plan_fused_levels, pyramid_options
from zv_dask.ingest.recovery import metadata_docs, put_back, stage_error, write_task_names
from zv_dask.scheduling import resolve_client, run_tasks, task_slots
from zv_dask.transaction import WriteJob, returned_fork, worker_store

__all__ = ["ingest", "PendingIngest"]

MIN_AUTO_ROWS = 1 << 17  # below this, per-task overhead outweighs balance


def scan_pass(src, plan, out_of_bounds: str, client, progress: bool = False, sample: bool = True,
              local: list | None = None):
    """Pass 1: statistics and per-chunk counts of every partition, reduced on the client.

    ``local`` (in-memory input) are the partitions as they sit in this process:
    they are scanned here, while the same data travel to the workers.
    Returns ``(stats, final_bounds, n_dropped, occupancy, rows_per_partition)``; raises before
    anything is written when the policy rejects the input.
    """
    probe_bounds = plan.bounds if plan.bounds is not None else ([0.0] * src.ndim, [0.0] * src.ndim)
    probe = Grid(tuple(map(float, probe_bounds[0])), tuple(map(float, probe_bounds[1])), plan.chunk_shape,
                 plan.base_bin_shape or plan.chunk_shape, plan.dtype)
    drop = out_of_bounds == "ignore" and plan.bounds is not None
    scans = [delayed(_scan_task)(p, probe, plan.bounds, drop, 0, sample) for p in (local or src.partitions)]
    try:
        if local is not None:
            import dask

            scanned = list(dask.compute(*scans, scheduler="sync"))
        else:
            scanned = run_tasks(scans, client, progress, "scan: statistics and chunk counts")
    except Exception as e:
        if isinstance(e, ZVError):
            raise
        raise stage_error("scan", e, {s.key: (f"input partition {p}", None) for p, s in enumerate(scans)}) from e
    offsets = np.r_[0, np.cumsum([s.stats.count for s in scanned])[:-1]].astype(np.int64)
    for s, off in zip(scanned, offsets):
        if s.stats.first_nonfinite >= 0:
            s.stats.first_nonfinite += int(off)
    stats = reduce(combine_stats, [s.stats for s in scanned])
    final_bounds, dropped = settle_bounds(stats, plan.bounds, out_of_bounds)
    counts = [int(s.stats.count) for s in scanned]
    return stats, final_bounds, dropped, combine_occupancy([s.occupancy for s in scanned], src.ndim), counts


def precision_warnings(dtype: str, stats, src) -> list[str]:
    """A warning when float32 storage would round double-precision input coarser than 1e-6 of its extent."""
    if dtype != "float32" or src.position_dtype != np.float64:
        return []
    mag = float(np.max(np.abs(np.r_[stats.lo, stats.hi])))
    extent = float(np.max(stats.hi - stats.lo)) or 1.0
    step = float(np.spacing(np.float32(mag)))
    if step > 1e-6 * extent:
        return [f"float32 positions round to {step:.3g} at coordinate magnitude {mag:.3g}; "
                "pass dtype='float64' to keep the source's precision"]
    return []


def auto_partition_rows(points, partition_rows: int | None, slots: int) -> int | None:
    """Rows per partition: as given, else for an in-memory array ~4 partitions per worker thread."""
    if partition_rows is None and hasattr(points, "shape") and not hasattr(points, "dask") and len(points.shape) == 2:
        return int(min(DEFAULT_PARTITION_ROWS, max(MIN_AUTO_ROWS, -(-points.shape[0] // (4 * slots)))))
    return partition_rows


def auto_group_points(group_points: int | None, n_points: int, slots: int) -> int:
    """Points per write group: as given, else at most DEFAULT_GROUP_POINTS and ~4 groups per worker thread."""
    if group_points is not None:
        return int(group_points)
    return min(DEFAULT_GROUP_POINTS, max(MIN_AUTO_ROWS, -(-n_points // (4 * slots))))


# -- task bodies (top level: workers import them) ----------------------------------------
def _scan_task(batch, grid, bounds, drop_outside, offset, sample=True):
    return scan_partition(batch, grid, bounds, drop_outside, offset, sample)


def _split_task(batch, grid, starts, drop_outside, units):
    return tuple(split_partition(batch, grid, starts, drop_outside, units))


def write_group(pieces, grid: Grid, level: int, target, attr_names, group_index: int, geoms=()):
    """Write one group's chunks, and the coarse levels ``geoms`` describe (whole regions).

    Returns ``(ChunkSummary, BatchResult or None, fork or None)``.
    """
    from zv_dask.pyramid.stack import LevelPoints, encode_level
    from zv_dask.pyramid.tasks import BatchResult, build_levels

    batch = merge_pieces(list(pieces))
    if batch is None:
        empty = ChunkSummary(np.zeros((0, grid.ndim), np.int64), np.zeros(0, np.int64))
        return empty, (BatchResult() if geoms else None), returned_fork(target)
    first = None
    zstore = worker_store(target)
    try:
        oids = None if batch.object_ids is None else np.asarray(batch.object_ids).astype(np.int64)
        plan = plan_chunks(batch.positions, grid, oids, batch.cells, batch.fragments)
        first = ".".join(map(str, plan.chunks[0])) if plan.n_chunks else None
        o = plan.order
        level0 = LevelPoints.from_plan(np.take(batch.positions, o, axis=0),
                                       {k: np.take(np.asarray(v), o, axis=0) for k, v in batch.attributes.items()},
                                       None if oids is None else oids[o], plan, grid.bins_per_chunk,
                                       (1,) * grid.ndim)
        del batch
        nbytes = write_chunk_payloads(zstore, level, grid, list(encode_level(level0, plan, grid.dtype)),
                                      list(attr_names))
    except ZVError:
        raise
    except Exception as e:  # noqa: BLE001 - name the stage and chunk, keep the cause
        raise IngestError(f"writing group {group_index} (first chunk {first}) failed: {type(e).__name__}: {e}",
                          stage="write", chunk=first) from e
    summary = ChunkSummary.from_plan(plan, nbytes)
    coarse = build_levels(zstore, level0, tuple(geoms)) if geoms else None
    return summary, coarse, returned_fork(target)


def _choose_dtype(dtype, src) -> tuple[str, str]:
    if dtype is not None:
        dt = np.dtype(dtype)
        if dt.kind != "f":
            raise InputError(f"dtype must be float32 or float64 for stored positions, got {dtype!r}")
        return dt.name, "as requested"
    if src.kind == "las":
        return "float64", "LAS coordinates are georeferenced; float32 would lose centimetres"
    return "float32", "default; pass dtype='float64' to keep double precision"


class PendingIngest:
    """A prepared ingest job: the store exists with its final bounds, the write graph is built.

    ``compute()`` runs it and returns the :class:`IngestReport`; ``dask_objects``
    are the write tasks for inspection (``dask.visualize``).
    """

    def __init__(self, run, dask_objects, report):
        self._run = run
        self.dask_objects = dask_objects
        self.report = report

    def compute(self) -> IngestReport:
        return self._run()

    def __repr__(self):
        return f"<PendingIngest {self.report.store}: {len(self.dask_objects)} write tasks; call .compute()>"


def ingest(points, store, *, attributes=None, object_ids=None, columns=None, chunk_shape=None, bounds=None,
           base_bin_shape=None, out_of_bounds: str = "raise", dtype=None, shard_shape=None, pyramid=None,
           backend=None, storage_options=None, client=None, compute: bool = True, overwrite: bool = False,
           axes=None, message: str | None = None, progress: bool = False, partition_rows: int | None = None,
           group_points: int | None = None, branch: str = "main"):
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
        ``False`` returns a :class:`PendingIngest` (bounds settled, store created, graph built).

    Returns
    -------
    IngestReport
    """
    if out_of_bounds not in POLICIES:
        raise InputError(f"out_of_bounds={out_of_bounds!r} is not one of {POLICIES}")
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    cl = resolve_client(client)
    slots = task_slots(cl)
    partition_rows = auto_partition_rows(points, partition_rows, slots)
    from zv_dask.ingest.plan import preflight  # the same checks a dry run makes

    src, plan, dt, dt_reason = preflight(points, store, attributes=attributes, object_ids=object_ids,
                                         columns=columns, chunk_shape=chunk_shape, bounds=bounds,
                                         base_bin_shape=base_bin_shape, out_of_bounds=out_of_bounds, dtype=dtype,
                                         shard_shape=shard_shape, backend=backend, storage_options=storage_options,
                                         overwrite=overwrite, axes=axes, partition_rows=partition_rows,
                                         branch=branch)
    dt = plan.dtype
    drop = out_of_bounds == "ignore" and plan.bounds is not None
    pyramid_opts = pyramid_options(pyramid, src.ndim)  # checked before anything is read or written
    local = None
    if cl is not None and src.in_memory:
        # numpy / pandas input: on its way to the workers (once) while this process scans it
        local = src.partitions
        src.partitions = cl.persist(src.partitions)
    stats, final_bounds, dropped, occ, _ = scan_pass(src, plan, out_of_bounds, cl, progress, local=local)
    seconds["scan"] = time.perf_counter() - t0

    warnings = precision_warnings(dt, stats, src)

    # coordinator: the store, the grid, the groups ------------------------------------------
    t1 = time.perf_counter()
    specs = [AttributeSpec(name, dtype_, ch) for name, (dtype_, ch) in src.attributes.items()]
    attr_specs = {"vertex": {s.name: attribute_spec(s.dtype, s.channels) for s in specs}} if specs else None
    # a plain store that exists gets its metadata back byte for byte if the job fails
    old_metadata = (metadata_docs(plan.existing) if plan.existing is not None and not plan.overwrite
                    and plan.existing.session is None else None)
    zs = materialize_target(plan, final_bounds, attr_specs)
    job = WriteJob(zs, message or "zv-dask ingest")
    created_here = plan.existing is None
    builder = fused = None
    try:
        grid = zs.grid(0)
        n_points = int(occ.counts.sum())
        target_points = auto_group_points(group_points, n_points, slots)
        prepare_level(zs.root, 0, grid, specs, shards=shard_shape)
        units = UnitGrid.of(grid, shard_shape) if shard_shape is not None else None
        if pyramid_opts is not None:
            builder, fused, units = plan_fused_levels(zs, job, cl, progress, pyramid_opts, grid, specs, occ,
                                                       src.has_object_ids, shard_shape, target_points, units, slots,
                                                       group_points)
        groups = plan_groups(grid, occ, target_points, units)
        target = job.target()
        splits = [delayed(_split_task, nout=groups.n_groups)(p, grid, groups.starts, drop, units)
                  for p in src.partitions]
        names = [s.name for s in specs]
        geoms = fused.geoms if fused is not None else ()
        writes = [delayed(write_group)([splits[p][g] for p in range(len(splits))], grid, 0, target, names, g, geoms)
                  for g in range(groups.n_groups)]
    except BaseException:
        put_back(job, zs, created_here, old_metadata, settle=0)  # no task has run yet
        raise
    seconds["prepare"] = time.perf_counter() - t1
    report = IngestReport(store=str(zs.url or zs.backend.kind), points_read=int(stats.count),
                          points_dropped=int(dropped), bounds=[list(map(float, b)) for b in final_bounds],
                          dtype=dt, dtype_reason=dt_reason, chunk_shape=list(plan.chunk_shape),
                          base_bin_shape=list(plan.base_bin_shape) if plan.base_bin_shape else None,
                          partitions=len(src.partitions), groups=groups.n_groups, warnings=warnings)

    def run() -> IngestReport:
        t2 = time.perf_counter()
        stage = "write"
        try:
            results = run_tasks(writes, cl, progress, "shuffle and write level 0" +
                                (f" and levels 1-{fused.numbers[-1]}" if fused is not None and len(fused.levels) > 1
                                 else " and level 1" if fused is not None else ""))
            job.absorb([fork for _, _, fork in results])
            summary = ChunkSummary.concat([s for s, _, _ in results], grid.ndim)
            t3 = time.perf_counter()
            seconds["write"] = t3 - t2
            stage = "finalize"
            meta = finalize_level(zs.root, 0, grid, summary, LevelMetadata(level=0, fragments_tile=True), specs)
            seconds["finalize"] = time.perf_counter() - t3
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
                    src_k, reason = builder.finish_batch(fused, [(r, None) for _, r, _ in results], src0, t2,
                                                         len(results))
                    builder.building = None
                    report.levels_in_write_tasks = [k for k in fused.numbers if k in pr.vertex_counts]
                    report.bytes_written += int(sum(r.bytes_written for _, r, _ in results))
                else:
                    src_k = src0
                src_k = builder.run(src_k, reason)
                builder.finish_root(src_k.objects is not None)
                seconds["pyramid"] = time.perf_counter() - t4
                for lv in pr.levels:
                    report.levels.append({"level": lv, "vertex_count": pr.vertex_counts[lv],
                                          "chunks": pr.chunk_counts[lv]})
                report.links = pr.links if any(pr.link_counts.values()) else "none"
                report.link_counts = dict(pr.link_counts)
                report.warnings += pr.warnings
            stage = "commit"
            report.snapshot_id = job.commit()
        except BaseException as e:
            put_back(job, zs, created_here, old_metadata)
            if isinstance(e, Exception) and not isinstance(e, ZVError):
                tasks = write_task_names(writes, splits, groups, grid) if stage == "write" else None
                if stage == "pyramid" and builder is not None and builder.building:
                    stage = f"pyramid level {builder.building[0]}"
                raise stage_error(stage, e, tasks) from e
            raise
        report.seconds = seconds
        return report

    if not compute:
        return PendingIngest(run, writes, report)
    return run()
