"""The pyramid engine: levels 1..L built from level 0, level by level, with Dask.

For each level ``k``: the coordinator creates the level's arrays, splits the
parent level's non-empty chunks into independent regions (see
:func:`~zv_dask.pyramid.plan.region_shape`), and sends one task per group of
regions. A task reads its fine chunks, coarsens them
(:mod:`zv_dask.pyramid.coarsen`), writes its coarse chunks and returns a
:class:`~zv_dask.store.levels.ChunkSummary` (and its icechunk fork). The
coordinator then merges the forks and writes the level's metadata, last; the
next level's tasks read level ``k`` through a fresh fork.

Layout notes (ZV format section 8 and 14.2): coarse levels of plain points keep
the level-0 layout (``prod(bpc)`` range fragments per chunk, fragment = root
base bin of the metavertex), which is what keeps the reference reader's bbox
reads right at coarse levels. A ``chunk_scale`` other than 1 writes a
``chunk_shape`` on the level; the reference (0.9.2) then answers bbox reads of
that level wrongly (it uses the root bin grid at every level), although whole-
level reads and validation are fine. No cross-level links are written
(``cross_level_depth`` 0, ``cross_level_storage`` "none"). Neither the
``shared_fragments`` capability nor the level flag is stamped: every
metavertex belongs to one bin (plain) or one object (object levels), so no
fragment is shared between manifests, and no reader depends on the flag.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from zv_dask.errors import InputError, IngestError, StoreError, ZVError
from zv_dask.format.grid import Grid, parse_chunk_key
from zv_dask.format.layout import encode_plan
from zv_dask.format.metadata import LevelMetadata
from zv_dask.pyramid.coarsen import METHODS, CoarsenParams, coarsen_points, plan_coarse
from zv_dask.pyramid.plan import LevelStep, level_steps, plan_tasks, region_shape
from zv_dask.pyramid.reduce import REDUCTIONS, default_reduction
from zv_dask.read import chunks_in, object_entries, row_object_ids
from zv_dask.store.api import (
    ZVStore,
    as_store,
    create_resolution_level,
    list_resolution_levels,
    remove_resolution_level,
    write_root_metadata,
)
from zv_dask.store.levels import (
    AttributeSpec,
    ChunkSummary,
    finalize_level,
    level_chunk_keys,
    level_grid,
    prepare_level,
    read_chunks,
    write_chunk_payloads,
)
from zv_dask.transaction import WriteJob, gather_or_stop, returned_fork, worker_store

__all__ = ["build_pyramid", "PyramidReport"]

DEFAULT_POINTS_PER_TASK = 2_000_000


@dataclass
class PyramidReport:
    """What :func:`build_pyramid` wrote: per level its vertex count, chunks, bin shape and tasks."""

    levels: list[int] = field(default_factory=list)
    vertex_counts: dict[int, int] = field(default_factory=dict)
    chunk_counts: dict[int, int] = field(default_factory=dict)
    bin_shapes: dict[int, tuple[float, ...]] = field(default_factory=dict)
    tasks: dict[int, int] = field(default_factory=dict)
    level_seconds: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    stop_reason: str = ""
    snapshot_id: str | None = None


@dataclass
class _Source:
    """A written level the next one is made from."""

    level: int
    grid: Grid
    chunks: np.ndarray
    rows: np.ndarray | None
    vertex_count: int
    specs: list[AttributeSpec]
    objects: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (oid, chunk, fragment) entries
    all_ids: np.ndarray | None


@dataclass(frozen=True)
class _TaskContext:
    fine_level: int
    level: int
    ndim: int
    fine_grid: Grid
    grid: Grid
    bins_per_chunk: tuple[int, ...]
    scale: tuple[int, ...]
    read_names: tuple[str, ...]
    write_names: tuple[str, ...]
    params: CoarsenParams
    objects: bool


# -- the task ------------------------------------------------------------------------------
def _coarsen_task(target, ctx: _TaskContext, chunks: np.ndarray, obj):
    """Read fine chunks, coarsen, write coarse chunks; returns ``(ChunkSummary, fork)``."""
    try:
        zstore = worker_store(target)
        data = read_chunks(zstore, ctx.fine_level, chunks, list(ctx.read_names), ndim=ctx.ndim)
        pos = np.concatenate([d.positions for d in data]) if data else np.zeros((0, ctx.ndim), ctx.grid.dtype)
        attrs = {n: np.concatenate([d.attributes[n] for d in data]) for n in ctx.read_names} if data else {}
        oids = None
        if ctx.objects:
            oids, ok = row_object_ids(data, *obj)
            if not ok.all():
                pos, oids = pos[ok], oids[ok]
                attrs = {n: v[ok] for n, v in attrs.items()}
        coarse = coarsen_points(pos, ctx.fine_grid.base_bins(pos), attrs, ctx.params, oids)
        plan = plan_coarse(ctx.grid.base_bins(coarse.positions), ctx.bins_per_chunk, ctx.scale, coarse.object_ids)
        payloads = list(encode_plan(plan, coarse.positions, coarse.attributes, ctx.grid.dtype))
        nbytes = write_chunk_payloads(zstore, ctx.level, ctx.grid, payloads, list(ctx.write_names))
        summary = ChunkSummary.from_plan(plan, nbytes)
        return summary, returned_fork(target)
    except Exception as e:  # name the stage and the chunks
        first = ".".join(map(str, chunks[0])) if len(chunks) else "-"
        raise IngestError(f"pyramid level {ctx.level}: task over {len(chunks)} fine chunks from {first} "
                          f"failed: {type(e).__name__}: {e}", stage=f"pyramid level {ctx.level}",
                          chunk=first if len(chunks) else None) from e


# -- coordinator helpers -------------------------------------------------------------------
def _specs_of(group) -> list[AttributeSpec]:
    if "vertex_attributes" not in group:
        return []
    out = []
    for name, a in sorted(group["vertex_attributes"].arrays()):
        chans = a.attrs.get("channel_names")
        rs = a.attrs.get("row_shape") or []
        out.append(AttributeSpec(name, np.dtype(a.attrs["dtype"]).name,
                                 len(chans) if chans else (int(rs[0]) if rs else None),
                                 a.attrs.get("unit"), a.attrs.get("description")))
    return out


def _source_from_store(zs: ZVStore, level: int) -> _Source:
    g = zs.root[str(level)]
    ndim = zs.metadata.ndim
    chunks = np.array([parse_chunk_key(k) for k in level_chunk_keys(g)], np.int64).reshape(-1, ndim)
    count = int(g.attrs.get("zarr_vectors_level", {}).get("vertex_count", 0))
    objects = all_ids = None
    if "object_index" in g:
        all_ids, oid, och, ofr = object_entries(g, ndim)
        objects = (oid, och, ofr)
    return _Source(level, level_grid(zs.root, level), chunks, None, count, _specs_of(g), objects, all_ids)


def _resolve_attributes(parent: list[AttributeSpec], attribute_reduction, method: str):
    """Reductions of the coarse level's attributes, the explicit ones, and the coarse specs."""
    asked = dict(attribute_reduction or {})
    for name, how in asked.items():
        if how is not None and how not in REDUCTIONS:
            raise InputError(f"attribute_reduction[{name!r}] = {how!r}; choose one of {REDUCTIONS} (or None to drop)")
    names = {s.name for s in parent}
    unknown = [n for n, how in asked.items() if n not in names and how != "count"]
    if unknown:
        raise InputError(f"attribute_reduction names {unknown}, which level 0 does not have "
                         f"(it has {sorted(names)}); only 'count' may create a new attribute")
    reductions, explicit, specs = {}, set(), []
    for s in parent:
        how = asked.get(s.name, default_reduction(s.dtype))
        if s.name in asked and how is None:
            continue
        if s.name in asked:
            explicit.add(s.name)
        reductions[s.name] = how
        if how == "count":
            specs.append(AttributeSpec(s.name, "int64", None, s.unit, s.description))
        else:
            specs.append(s)
    for n, how in asked.items():
        if n not in names and how == "count":
            reductions[n] = "count"
            explicit.add(n)
            specs.append(AttributeSpec(n, "int64", None, None, "number of level-0 points"))
    return reductions, frozenset(explicit), specs


def _compressors(zs: ZVStore):
    try:
        comp = tuple(zs.root["0/vertices"].compressors)
    except Exception:  # noqa: BLE001 - metadata we cannot introspect: write uncompressed
        return None
    return comp or None


def _run(tasks, client, progress: bool = False, label: str = ""):
    import dask

    if not tasks:
        return []
    if client is None:
        try:
            from distributed import get_worker, worker_client

            get_worker()
        except (ImportError, ValueError):
            if progress:
                from dask.diagnostics import ProgressBar

                print(label, flush=True)
                with ProgressBar():
                    return list(dask.compute(*tasks))
            return list(dask.compute(*tasks))
        with worker_client() as c:  # a lazy build computed on a worker
            return c.gather(c.compute(tasks))
    futures = client.compute(tasks)
    if progress:
        try:
            from zv_dask.progress import show_progress
        except ImportError:  # pragma: no cover - progress display is optional
            show_progress = None
        if show_progress is not None:
            show_progress(futures, label)
    return gather_or_stop(client, futures)


def _unique(forks):
    return list({id(f): f for f in forks if f is not None}.values())


def _drop_coarse_levels(zs: ZVStore) -> None:
    for k in sorted(list_resolution_levels(zs), reverse=True):
        if k > 0:
            remove_resolution_level(zs, k)
    g0 = zs.root["0"]
    if "links" in g0:  # cross-level links to levels that no longer exist
        del g0["links"]


def _build_level(zs: ZVStore, job: WriteJob, src: _Source, step: LevelStep, opts: dict, report: PyramidReport):
    import dask

    t0 = time.perf_counter()
    meta = zs.metadata
    ndim = meta.ndim
    k = step.level
    bpc = tuple(int(round(c / b)) for c, b in zip(meta.chunk_shape, meta.effective_bin_shape))
    cs = tuple(float(c) * s for c, s in zip(meta.chunk_shape, step.total_scale))
    grid = Grid(meta.bounds[0], meta.bounds[1], cs, meta.effective_bin_shape, src.grid.dtype)
    reductions, explicit, specs = _resolve_attributes(src.specs, opts["attribute_reduction"], opts["method"])
    params = CoarsenParams(step.total_ratio, opts["method"], reductions, explicit, opts["sample_size"],
                           opts["seed"], k)
    prepare_level(zs.root, k, grid, specs, compressors=_compressors(zs))
    job.absorb([])  # the next target must see the arrays just created
    target = job.target()

    fine_bpc = tuple(b * s for b, s in zip(bpc, step.parent_scale))
    if src.rows is not None:
        weights = src.rows
    else:
        weights = np.full(len(src.chunks), src.vertex_count / max(len(src.chunks), 1))
    groups = plan_tasks(src.chunks, fine_bpc, region_shape(step, bpc), weights, opts["points_per_task"])
    ctx = _TaskContext(src.level, k, ndim, src.grid, grid, bpc, step.total_scale,
                       tuple(s.name for s in src.specs if s.name in reductions),
                       tuple(s.name for s in specs), params, src.objects is not None)
    task_fn = dask.delayed(_coarsen_task, pure=False)
    token = uuid.uuid4().hex[:12]
    tasks = []
    for i, idx in enumerate(groups):
        chunks = src.chunks[idx]
        obj = None
        if src.objects is not None:
            m = chunks_in(src.objects[1], chunks)
            obj = tuple(a[m] for a in src.objects)
        tasks.append(task_fn(target, ctx, chunks, obj, dask_key_name=f"zv-pyramid-{k}-{i}-{token}"))
    results = _run(tasks, opts["client"], opts["progress"], f"pyramid level {k}")
    job.absorb(_unique([fork for _, fork in results]))
    summary = ChunkSummary.concat([s for s, _ in results], ndim)
    if src.objects is not None and summary.object_ids is None:
        summary.object_ids = np.zeros(0, np.int64)
        summary.object_chunks = np.zeros((0, ndim), np.int64)
        summary.object_fragments = np.zeros(0, np.int64)
    bin_shape = tuple(float(b) * r for b, r in zip(meta.effective_bin_shape, step.total_ratio))
    lm = LevelMetadata(level=k, object_sparsity=1.0, coarsening_method="per_object", parent_level=k - 1,
                       chunk_shape=cs if any(s != 1 for s in step.total_scale) else None, bin_shape=bin_shape,
                       fragments_tile=True, inherited_num_objects=0 if src.all_ids is None else len(src.all_ids),
                       preserves_object_ids=True if src.objects is not None else None)
    finalize_level(zs.root, k, grid, summary, lm, specs, all_object_ids=src.all_ids)
    create_resolution_level(zs, k, lm)
    nonempty = summary.rows > 0
    report.levels.append(k)
    report.vertex_counts[k] = lm.vertex_count
    report.chunk_counts[k] = int(nonempty.sum())
    report.bin_shapes[k] = bin_shape
    report.tasks[k] = len(tasks)
    report.level_seconds[k] = time.perf_counter() - t0
    objects = None
    if src.objects is not None:
        objects = (summary.object_ids, summary.object_chunks, summary.object_fragments)
    return _Source(k, grid, summary.chunks[nonempty], summary.rows[nonempty], lm.vertex_count, specs,
                   objects, src.all_ids)


def _finish_root(zs: ZVStore, has_objects: bool) -> None:
    meta = zs.metadata
    caps = [c for c in meta.format_capabilities if c != "multiscale_links"]
    if has_objects and "preserved_object_ids" not in caps:
        caps.append("preserved_object_ids")
    meta.format_capabilities = caps
    meta.cross_level_depth = 0
    meta.cross_level_storage = "none"
    write_root_metadata(zs, meta)


def _small_enough(count: int, n_chunks: int, min_points: int) -> str:
    if count <= min_points:
        return f"level holds {count} <= min_points={min_points} points"
    if n_chunks <= 1:
        return "level fits in a single chunk"
    return ""


def _build(store, *, levels, bin_ratio, chunk_scale, method, attribute_reduction, sample_size, seed, min_points,
           client, job, points_per_task, progress) -> PyramidReport:
    t0 = time.perf_counter()
    zs = job.store if job is not None else as_store(store, "r+")
    if zs.read_only:
        raise StoreError("build_pyramid needs a writable store; open it with mode='r+'")
    own = job is None
    job = job if job is not None else WriteJob(zs, "zv-dask build_pyramid")
    report = PyramidReport()
    building = None
    try:
        steps = level_steps(zs.metadata.ndim, levels, bin_ratio, chunk_scale)
        src = _source_from_store(zs, 0)
        _resolve_attributes(src.specs, attribute_reduction, method)  # raises before anything changes
        _drop_coarse_levels(zs)
        report.vertex_counts[0] = src.vertex_count
        report.chunk_counts[0] = len(src.chunks)
        opts = dict(method=method, attribute_reduction=attribute_reduction, sample_size=sample_size, seed=seed,
                    client=client, points_per_task=points_per_task, progress=progress)
        reason = _small_enough(src.vertex_count, len(src.chunks), min_points) if levels is None else ""
        while not reason:
            step = next(steps, None)
            if step is None:
                reason = f"{levels} levels built" if levels is not None else "bin_ratio/chunk_scale lists exhausted"
                break
            building = step.level
            prev = src.vertex_count
            src = _build_level(zs, job, src, step, opts, report)
            building = None
            if levels is None:
                reason = _small_enough(src.vertex_count, len(src.chunks), min_points)
                if not reason and src.vertex_count >= prev:
                    reason = f"level {step.level} removed no point"
        report.stop_reason = reason
        _finish_root(zs, src.objects is not None)
        if own:
            report.snapshot_id = job.commit("zv-dask build_pyramid")
    except BaseException as e:
        if own:
            job.abort()
        if not job.transactional and building is not None and str(building) in zs.root:
            del zs.root[str(building)]  # a level without metadata would break readers
        if isinstance(e, Exception) and not isinstance(e, ZVError):  # e.g. KilledWorker, a storage error
            stage = "pyramid" if building is None else f"pyramid level {building}"
            first = (str(e).strip().splitlines() or [""])[0]
            raise IngestError(f"{stage} failed: {type(e).__name__}: {first}", stage=stage) from e
        raise
    report.seconds = time.perf_counter() - t0
    return report


def build_pyramid(store, *, levels: int | None = None, bin_ratio=2, chunk_scale=1, method: str = "centroid",
                  attribute_reduction: dict | None = None, sample_size: int = 8, seed: int = 0,
                  min_points: int = 1024, client=None, compute: bool = True, job: WriteJob | None = None,
                  points_per_task: int = DEFAULT_POINTS_PER_TASK, progress: bool = False):
    """Build coarse levels 1..L of a store from its level 0, level by level.

    Parameters
    ----------
    levels
        Number of coarse levels; ``None`` goes on until a level holds at most
        ``min_points`` points, fits in one chunk, or removes no point.
    bin_ratio, chunk_scale
        Integer steps >= 1 from one level to the next: a scalar, a tuple (one
        per axis) or a list (one entry per level, scalar or tuple). Level k's
        bin is the base bin times the product of the steps so far; likewise its
        chunk (a ``chunk_scale`` other than 1 defeats the reference reader's
        bbox reads of that level: ZV format section 14.2).
    method
        ``"centroid"`` (default), ``"first"``, ``"random"`` or ``"sample"``
        (up to ``sample_size`` points per bin); see
        :mod:`zv_dask.pyramid.coarsen`.
    attribute_reduction
        ``{name: reduction}`` with reductions from
        :data:`~zv_dask.pyramid.reduce.REDUCTIONS` (``None`` drops the
        attribute; ``"count"`` under a new name adds the number of level-0
        points per metavertex). Defaults: ``mean`` for floats, ``mode`` for
        integers and bools.
    seed
        Seeds ``random`` / ``sample`` together with the bin: reproducible
        whatever the partitioning or the number of workers.
    client
        A distributed ``Client``; ``None`` uses dask's current scheduler.
    compute
        ``False`` returns a ``dask.delayed`` object that runs this build when
        computed. Compute it in the process that holds the store (e.g. with
        ``scheduler="sync"``): it drives ``client`` itself, and on icechunk it
        needs the process's session.
    job
        The :class:`~zv_dask.transaction.WriteJob` of an enclosing job (ingest):
        the pyramid then joins that job's single commit instead of committing.
    points_per_task
        Regions are grouped into tasks of about this many fine points.
    progress
        Show a progress bar per level.

    Existing coarse levels (and level-0 cross-level links) are replaced. On
    failure an own icechunk job is discarded; on plain stores the level being
    built is removed, earlier levels stay valid.
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, got {method!r}")
    if int(points_per_task) < 1:
        raise InputError(f"points_per_task must be >= 1, got {points_per_task!r}")
    run = functools.partial(_build, store, levels=levels, bin_ratio=bin_ratio, chunk_scale=chunk_scale,
                            method=method, attribute_reduction=attribute_reduction, sample_size=sample_size,
                            seed=seed, min_points=min_points, client=client, job=job,
                            points_per_task=points_per_task, progress=progress)
    if compute:
        return run()
    import dask

    return dask.delayed(run, pure=False)()
