"""``plan_ingest``: what an :func:`~zv_dask.ingest` job would do, without writing anything.

The plan runs the same first steps as the job itself: it recognises the input
(:func:`~zv_dask.ingest.sources.as_source`), checks the target and the geometry
(:func:`~zv_dask.ingest.target.plan_target`, which never creates a store), and
runs the scan pass (per partition statistics and per chunk counts, on the
cluster when there is one) to settle the bounds and cut the write groups. It
then estimates how many bytes the level-0 cells will take and how much memory
the largest task will need. The CLI's ``zv-dask ingest --dry-run`` prints it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from zv_dask.budget import (
    MemoryBudget,
    fmt_bytes,
    resolve_budget,
    split_bytes_per_point,
    write_bytes_per_point,
)
from zv_dask.errors import InputError
from zv_dask.format.grid import Grid, parse_chunk_key
from zv_dask.format.metadata import DEFAULT_AXES as DEFAULT_AXIS_NAMES
from zv_dask.format.metadata import RootMetadata
from zv_dask.ingest.append import _pyramid_builder, check_compatible
from zv_dask.ingest.fused import fused_steps, pyramid_builder, pyramid_options
from zv_dask.ingest.level0 import (
    auto_partition_rows,
    partition_cap,
    plan_level0,
    row_bytes,
    scratch_for,
)
from zv_dask.ingest.options import IngestOptions
from zv_dask.ingest.resume import check_resume, input_fingerprint
from zv_dask.ingest.scan import choose_dtype, scan_pass, scan_warnings
from zv_dask.ingest.shuffle import UnitGrid, plan_groups
from zv_dask.ingest.sources import DEFAULT_PARTITION_ROWS, as_source
from zv_dask.ingest.target import plan_target
from zv_dask.options import takes_options
from zv_dask.pyramid.options import PyramidOptions
from zv_dask.pyramid.update import predict_rewrites
from zv_dask.scheduling import resolve_client, task_slots
from zv_dask.store.levels import level_chunk_keys
from zv_dask.store.objects import chunks_in
from zv_dask.types import ClientLike, PointsLike, StoreLike

__all__ = ["IngestPlan", "plan_ingest", "preflight", "grid_warnings"]
_FRAGMENT_HEADER = 16 + 4  # fragment index v1 header and the empty CSR offsets


@dataclass
class IngestPlan:
    """What :func:`zv_dask.ingest` would do with the same arguments (nothing is written).

    Sizes are estimates of the *uncompressed* cell payloads (zarr compresses
    them further); memory is the peak of the largest single task.
    """

    source: str
    store: str
    store_action: str  # "create", "fill" (an empty existing store) or "overwrite"
    input_kind: str
    partitions: int
    points: int
    points_dropped: int
    largest_partition_points: int
    data_bounds: list
    bounds: list
    dtype: str
    dtype_reason: str
    chunk_shape: list
    base_bin_shape: list | None
    bins_per_chunk: list
    grid_shape: list
    grid_cells: int
    chunks: int
    fragments_per_chunk: int
    write_groups: int
    largest_group_points: int
    attributes: dict
    object_ids: bool
    bytes_per_point: int
    estimated_bytes: int
    estimated_partition_memory: int
    estimated_group_memory: int
    estimated_task_memory: int
    memory_budget: int = 0
    memory_budget_origin: str = ""
    workers: int = 1
    threads_per_worker: int = 1
    shuffle: str = "memory"
    shuffle_reason: str = ""
    rewrites: list | None = None  # an append: per level {"level", "chunks", "regions"} it would rewrite
    estimated_peak_worker_memory: int = 0
    estimated_scratch_bytes: int = 0
    scratch: str | None = None
    pyramid: dict | None = None
    levels_in_write_tasks: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def to_json(self, **kw) -> str:
        """The plan as a JSON string."""
        return json.dumps(self.to_dict(), **kw)

    def __repr__(self) -> str:
        def pts(n):
            return f"{n:,}"

        attrs = ", ".join(f"{k} ({d}{'' if c is None else f' x{c}'})" for k, (d, c) in self.attributes.items())
        lines = [
            f"IngestPlan: {self.source} -> {self.store} ({self.store_action}; nothing written)",
            f"  input       {self.input_kind}, {self.partitions} partitions "
            f"(largest {pts(self.largest_partition_points)} points)",
            f"  points      {pts(self.points)} to write" + (f", {pts(self.points_dropped)} dropped outside the bounds"
                                                           if self.points_dropped else ""),
            f"  attributes  {attrs or 'none'}" + ("; object ids" if self.object_ids else ""),
            f"  positions   {self.dtype} ({self.dtype_reason})",
            f"  bounds      {self.bounds}" + ("" if self.bounds == self.data_bounds else f" (data {self.data_bounds})"),
            f"  chunks      {pts(self.chunks)} occupied of a {' x '.join(map(str, self.grid_shape))} grid "
            f"({pts(self.grid_cells)} cells), chunk_shape {self.chunk_shape}",
            f"  bins        {self.bins_per_chunk} per chunk ({self.fragments_per_chunk} fragments), "
            f"base_bin_shape {self.base_bin_shape or self.chunk_shape}",
            f"  tasks       {self.partitions} scan + {self.partitions} split tasks -> {self.write_groups} write groups "
            f"(largest {pts(self.largest_group_points)} points)",
            f"  bytes       ~{fmt_bytes(self.estimated_bytes)} of level-0 cells before compression "
            f"({self.bytes_per_point} B per point)",
            f"  memory      ~{fmt_bytes(self.estimated_task_memory)} per task at peak (largest partition "
            f"{fmt_bytes(self.estimated_partition_memory)}, largest group {fmt_bytes(self.estimated_group_memory)})",
            f"  budget      {fmt_bytes(self.memory_budget)} per worker ({self.memory_budget_origin}); "
            f"{self.workers} worker(s) x {self.threads_per_worker} thread(s)",
            f"  shuffle     {self.shuffle}: {self.shuffle_reason}; ~{fmt_bytes(self.estimated_peak_worker_memory)} "
            "per worker at peak" + (f"; ~{fmt_bytes(self.estimated_scratch_bytes)} staged on {self.scratch}"
                                    if self.shuffle == "staged" else ""),
        ]
        for r in self.rewrites or []:
            lines.append(f"  append      level {r['level']}: " + (
                f"{pts(r['chunks'])} chunks touched ({pts(r['existing'])} hold points now, rewritten)"
                if r["level"] == 0 else f"{pts(r['regions'])} regions rebuilt ({pts(r['chunks'])} chunks there now)"))
        if self.pyramid is not None:
            opts = ", ".join(f"{k}={v}" for k, v in self.pyramid.items()) or "defaults"
            lines.append(f"  pyramid     yes ({opts})" + (
                f"; levels {self.levels_in_write_tasks} built by the write tasks" if self.levels_in_write_tasks
                else ""))
        for w in self.warnings:
            lines.append(f"  warning     {w}")
        return "\n".join(lines)


def grid_warnings(grid: Grid, n_chunks: int, n_points: int) -> list[str]:
    """What the chunk grid of a job says about its chunk shape (the dry run and the job say the same)."""
    out = []
    if grid.n_cells > 50 * max(n_chunks, 1) and grid.n_cells > 1_000_000:
        out.append(f"the grid has {grid.n_cells:,} cells for {n_chunks:,} occupied chunks: the data is sparse "
                   "in its bounds; a larger chunk_shape would give fewer, fuller chunks")
    if n_chunks and n_points / n_chunks < 1000:
        out.append(f"about {n_points // max(n_chunks, 1):,} points per chunk: small chunks mean many small "
                   "objects; consider a larger chunk_shape")
    return out


def _describe_target(store) -> str:
    if isinstance(store, str):
        return store
    url = getattr(store, "url", None)
    if url:
        return str(url)
    import os
    if isinstance(store, os.PathLike):
        return os.fspath(store)
    return type(store).__name__


def _check_attribute_names(src, plan) -> None:
    """Attribute names must not be a column name of their own: an axis, ``object_id`` (read_points' columns)."""
    axes = list(plan.axes) if plan.axes else list(DEFAULT_AXIS_NAMES[:src.ndim])
    axes = [a["name"] if isinstance(a, dict) else str(a) for a in axes]
    clash = sorted(set(src.attributes) & (set(axes) | {"object_id"}))
    if clash:
        raise InputError(f"attribute name(s) {clash} are taken: readers make one column of each axis {axes} and of "
                         "object_id; rename the attribute(s)")


def preflight(points, store, opts: IngestOptions, *, budget: MemoryBudget | None = None, slots: int = 1):
    """The checks an ingest job makes before reading any point: input, target store and geometry.

    Cheap (file headers and store metadata only) and writes nothing. Raises the
    errors :func:`zv_dask.ingest` would raise at this stage; returns
    ``(source, target_plan, dtype, dtype_reason)``. Unless ``partition_rows`` is
    given, partitions hold at most what the memory ``budget`` lets a task hold.
    """
    o = opts
    append, dtype, partition_rows, shard_shape = o.appends, o.dtype, o.partition_rows, o.shard_shape
    kw = dict(attributes=o.attributes, object_ids=o.object_ids, columns=o.columns, crs=o.crs, reproject=o.reproject)
    rows = auto_partition_rows(points, partition_rows, slots)
    src = as_source(points, partition_rows=rows, **kw)
    dt, dt_reason = choose_dtype(dtype, src)
    if partition_rows is None and budget is not None:
        cap = partition_cap(budget, src, dt)
        if cap < (rows or DEFAULT_PARTITION_ROWS):
            src = as_source(points, partition_rows=cap, **kw)
    plan = plan_target(store, ndim=src.ndim, chunk_shape=o.chunk_shape, bounds=o.bounds,
                       base_bin_shape=o.base_bin_shape, dtype=dt, axes=o.axes if o.axes is not None else src.axes,
                       backend=o.backend, storage_options=o.storage_options, overwrite=o.overwrite, branch=o.branch,
                       resume=o.resume and not append, append=append)
    _check_attribute_names(src, plan)
    if plan.resume_state is not None:  # another job's options or input: refused before a cluster is started for it
        check_resume(plan.resume_state, o.record(src), input_fingerprint(points, src))
    if append and dtype is not None and np.dtype(dt).name != plan.dtype:
        raise InputError(f"dtype {np.dtype(dt).name} differs from the store's position dtype {plan.dtype}: an append "
                         "keeps the store's (leave dtype out)")
    if not append and plan.existing is not None and not plan.overwrite and dtype is not None \
            and np.dtype(dt).name != plan.dtype:
        raise InputError(f"dtype {np.dtype(dt).name} differs from the store's position dtype {plan.dtype}: an empty "
                         "store keeps the dtype it was made with (leave dtype out, or pass overwrite=True to remake "
                         "the store)")
    if plan.existing is not None and not plan.overwrite and dtype is None:
        dt_reason = "the store's dtype"
    if shard_shape is not None:
        ss = np.asarray(shard_shape).reshape(-1)
        if len(ss) != src.ndim or (ss < 1).any():
            raise InputError(f"shard_shape needs {src.ndim} integers >= 1 (chunks per shard), got {shard_shape!r}")
    return src, plan, plan.dtype, dt_reason


@takes_options(IngestOptions)
def plan_ingest(points: PointsLike, store: StoreLike, *, client: ClientLike = None, **options) -> IngestPlan:
    """Plan an ingest job without writing: the scan pass runs, the store is only inspected.

    Takes the arguments of :func:`zv_dask.ingest` and raises the same errors it would raise before writing: bad
    input, a store that already holds points, points outside the bounds under
    ``out_of_bounds="raise"``, a memory budget too small for one chunk.

    Returns
    -------
    IngestPlan
        Partitions, the settled bounds and dtype, the chunk grid and occupied
        chunks, write groups, estimated bytes and per-task memory, the memory
        budget and how the shuffle holds its pieces within it.
    """
    cl = resolve_client(client)
    slots = task_slots(cl)
    opts = IngestOptions.of(options).replace(resume=False)  # the plan of the job as it would start
    budget = resolve_budget(opts.memory_budget, cl)
    t0 = time.perf_counter()
    src, plan, dt, dt_reason = preflight(points, store, opts, budget=budget, slots=slots)
    mode, pyramid, out_of_bounds, progress = opts.mode, opts.pyramid, opts.out_of_bounds, opts.progress
    group_points, shard_shape, scratch = opts.group_points, opts.shard_shape, opts.scratch
    append_builder = None
    if mode == "append":
        check_compatible(src, plan.existing)
        append_builder = _pyramid_builder(plan.existing, None, cl, False, slots, budget, pyramid)
        pyramid = None  # the store's, shown as the rewrites below
    stats, final_bounds, dropped, occ, counts = scan_pass(src, plan, out_of_bounds, cl, progress, sample=False)
    grid = Grid(tuple(map(float, final_bounds[0])), tuple(map(float, final_bounds[1])), plan.chunk_shape,
                plan.base_bin_shape or plan.chunk_shape, dt)
    l0 = plan_level0(src, grid, occ, counts, budget, group_points=group_points, slots=slots, shard_shape=shard_shape,
                     shipped=cl is not None and src.in_memory)
    staging = scratch_for(plan, cl, scratch, l0) if l0.staged else None
    units = UnitGrid.of(grid, shard_shape) if shard_shape is not None else None
    fused = []
    pyramid_opts = pyramid_options(pyramid, src.ndim, budget)
    if pyramid_opts is not None:
        meta = plan.existing.metadata if plan.existing is not None and not plan.overwrite else RootMetadata(
            chunk_shape=tuple(plan.chunk_shape), bounds=(tuple(final_bounds[0]), tuple(final_bounds[1])),
            base_bin_shape=tuple(plan.base_bin_shape) if plan.base_bin_shape else None)
        builder = pyramid_builder(None, None, cl, False, pyramid_opts, slots, meta=meta)
        steps, fused_units = fused_steps(builder, grid, occ, shard_shape, l0.fused_points)
        if steps:
            fused, units = [st.level for st in steps], fused_units
    groups = plan_groups(grid, occ, l0.target_points, units)

    n_points = int(stats.count) - int(dropped)
    in_row, per_point = row_bytes(src, dt)
    per_point -= 8 if src.has_object_ids else 0  # ids are stored in the object index, not in the cells
    f = grid.fragments_per_chunk
    n_chunks = int(len(occ.counts))
    frag_bytes = n_chunks * (_FRAGMENT_HEADER + -(-((f + 7) // 8) // 8) * 8 + 16 * f)
    manifest_bytes = 0
    if src.has_object_ids:  # at least one (chunk, fragment) block per point's fragment; bounded by points
        manifest_bytes = min(n_points, n_chunks * f) * (8 * src.ndim + 9)
    est_bytes = n_points * per_point + frag_bytes + manifest_bytes
    largest_part = max(counts) if counts else 0
    largest_group = int(groups.points.max()) if groups.n_groups else 0
    piece_row = l0.layout.row_bytes
    part_mem = largest_part * split_bytes_per_point(in_row, piece_row)
    group_mem = largest_group * write_bytes_per_point(piece_row, per_point)
    warnings = scan_warnings(dt, stats, src) + l0.warnings + grid_warnings(grid, n_chunks, n_points)
    action = "create" if plan.existing is None else ("overwrite" if plan.overwrite else "fill")
    rewrites = None
    if mode == "append":
        action = "append"
        old0 = np.array([parse_chunk_key(k) for k in level_chunk_keys(plan.existing.root["0"])],
                        np.int64).reshape(-1, src.ndim)
        rewrites = [{"level": 0, "chunks": n_chunks, "existing": int(chunks_in(occ.chunks, old0).sum()), "regions": 0}]
        if append_builder is not None:
            rewrites += [{"level": u.level, "chunks": u.chunks, "regions": u.regions, "existing": u.chunks}
                         for u in predict_rewrites(append_builder, occ.chunks)]
    asked = PyramidOptions.of_ingest(pyramid)
    pyr = {k: v for k, v in asked.changed().items() if k != "memory_budget"} if asked is not None else None
    return IngestPlan(
        source=src.description or src.kind, store=_describe_target(store), store_action=action, rewrites=rewrites,
        input_kind=src.kind, partitions=len(src.partitions), points=n_points, points_dropped=int(dropped),
        largest_partition_points=int(largest_part),
        data_bounds=[list(map(float, stats.lo)), list(map(float, stats.hi))],
        bounds=[list(map(float, b)) for b in final_bounds], dtype=dt, dtype_reason=dt_reason,
        chunk_shape=list(map(float, plan.chunk_shape)),
        base_bin_shape=list(map(float, plan.base_bin_shape)) if plan.base_bin_shape else None,
        bins_per_chunk=list(grid.bins_per_chunk), grid_shape=list(grid.shape), grid_cells=int(grid.n_cells),
        chunks=n_chunks, fragments_per_chunk=int(f), write_groups=int(groups.n_groups),
        largest_group_points=largest_group,
        attributes={k: [d, c] for k, (d, c) in src.attributes.items()}, object_ids=bool(src.has_object_ids),
        bytes_per_point=int(per_point), estimated_bytes=int(est_bytes), estimated_partition_memory=int(part_mem),
        estimated_group_memory=int(group_mem), estimated_task_memory=int(max(part_mem, group_mem)),
        memory_budget=budget.per_worker, memory_budget_origin=budget.origin, workers=budget.workers,
        threads_per_worker=budget.threads_per_worker, shuffle=l0.shuffle.mode, shuffle_reason=l0.shuffle.reason,
        estimated_peak_worker_memory=l0.shuffle.peak_per_worker,
        estimated_scratch_bytes=l0.shuffle.staged_bytes if staging is not None else 0,
        scratch=staging.url if staging is not None else None,
        pyramid=pyr, levels_in_write_tasks=fused, warnings=warnings, seconds=time.perf_counter() - t0)
