"""The coordinator side of a pyramid build: plan, prepare and finish rounds of tasks.

A :class:`PyramidBuilder` picks the levels of each round (a *batch*: as many
consecutive levels as a task's region holds within ``points_per_task``),
creates their arrays (and link arrays) before the tasks run, and after them
writes each level's metadata, level by level, then the root. The tasks
themselves are in :mod:`zv_dask.pyramid.tasks`; :func:`~zv_dask.build_pyramid`
drives a builder over a written level 0, and :func:`~zv_dask.ingest` lets its
level-0 write tasks build the first batch.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zv_dask.budget import MemoryBudget, pyramid_bytes_per_point, resolve_budget, rows_within
from zv_dask.errors import StoreError
from zv_dask.faults import kill_point
from zv_dask.format.grid import Grid, chunk_keys, parse_chunk_key
from zv_dask.format.links import (
    link_array_attrs,
    link_family_attrs,
    offset_allowed,
    offset_axes,
    offset_segment,
    offsets_count,
    parse_offset_segment,
)
from zv_dask.format.metadata import LevelMetadata
from zv_dask.pyramid.coarsen import CoarsenParams
from zv_dask.pyramid.options import PyramidOptions
from zv_dask.pyramid.plan import (
    LevelStep,
    level_steps,
    plan_tasks,
    region_loads,
    region_shape,
    resolve_attributes,
    resolve_links,
)
from zv_dask.pyramid.stack import StepGeometry
from zv_dask.pyramid.tasks import batch_task
from zv_dask.scheduling import run_tasks, task_slots
from zv_dask.store.api import (
    ZVStore,
    create_resolution_level,
    create_vlen_arrays,
    list_resolution_levels,
    remove_resolution_level,
    update_node_attrs,
    write_root_metadata,
)
from zv_dask.store.levels import (
    AttributeSpec,
    ChunkSummary,
    finalize_level,
    level_chunk_keys,
    level_grid,
    prepare_level,
    write_cells,
)
from zv_dask.store.nodes import array_at, attr_dict, group_at
from zv_dask.store.objects import chunks_in, object_entries
from zv_dask.transaction import WriteJob

__all__ = ["PyramidBuilder", "PyramidReport", "LevelSource", "Round", "source_from_store",
           "drop_coarse_levels", "drop_up_links", "specs_of", "small_enough", "mark_links_present",
           "DEFAULT_POINTS_PER_TASK"]

log = logging.getLogger(__name__)

DEFAULT_POINTS_PER_TASK = 2_000_000
MAX_BATCH_LEVELS = 8
# On stores whose link arrays must exist before tasks write cells (icechunk, compressed), a family with
# up to this many possible offsets gets all its arrays up front; past it (coarse bins many chunks wide)
# tasks return the family's cells, which are few there, and only the arrays used are made.
EAGER_LINK_ARRAYS = 27


@dataclass
class PyramidReport:
    """What :func:`build_pyramid` wrote: per level its vertex count, chunks, bin shape, tasks and links."""

    levels: list[int] = field(default_factory=list)
    vertex_counts: dict[int, int] = field(default_factory=dict)
    chunk_counts: dict[int, int] = field(default_factory=dict)
    bin_shapes: dict[int, tuple[float, ...]] = field(default_factory=dict)
    tasks: dict[int, int] = field(default_factory=dict)
    level_seconds: dict[int, float] = field(default_factory=dict)
    links: str = "none"
    link_counts: dict[str, int] = field(default_factory=dict)  # "<level>/<+1|-1>" -> records
    batches: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    stop_reason: str = ""
    snapshot_id: str | None = None
    warnings: list[str] = field(default_factory=list)
    resumed: bool = False  # this build continued an interrupted one
    tasks_resumed: int = 0  # tasks the interrupted build had finished (not run again)
    rounds_resumed: int = 0  # rounds of levels it had finished


@dataclass
class LevelSource:
    """A written level the next one is made from."""

    level: int
    grid: Grid
    scale: tuple[int, ...]  # chunk edge in root chunks
    chunks: np.ndarray
    rows: np.ndarray | None
    vertex_count: int
    specs: list[AttributeSpec]
    objects: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # (oid, chunk, fragment) entries
    all_ids: np.ndarray | None

    def weights(self) -> np.ndarray:
        """Points per chunk (spread evenly when only the level's total is known)."""
        if self.rows is not None:
            return self.rows
        return np.full(len(self.chunks), self.vertex_count / max(len(self.chunks), 1))


@dataclass
class _Level:
    """A coarse level of a batch as the coordinator plans it."""

    step: LevelStep
    geom: StepGeometry
    specs: list[AttributeSpec]
    bin_shape: tuple[float, ...]
    link_axes: dict[int, tuple] = field(default_factory=dict)  # delta -> the offsets each axis allows
    link_created: dict[int, list[tuple[int, ...]]] = field(default_factory=dict)  # delta -> arrays made up front


@dataclass
class Round:
    """Levels ``a..b`` built by one round of tasks from level ``a - 1``."""

    fine_level: int
    levels: list[_Level]
    read_names: tuple[str, ...]
    region: tuple[int, ...]  # task region edge in base bins (the top level's)

    @property
    def geoms(self) -> tuple[StepGeometry, ...]:
        return tuple(lv.geom for lv in self.levels)

    @property
    def numbers(self) -> list[int]:
        return [lv.step.level for lv in self.levels]


# -- coordinator helpers -------------------------------------------------------------------
def specs_of(group) -> list[AttributeSpec]:
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


def source_from_store(zs: ZVStore, level: int) -> LevelSource:
    """The :class:`LevelSource` of a written level, from its metadata."""
    g = group_at(zs.root, str(level))
    ndim = zs.metadata.ndim
    chunks = np.array([parse_chunk_key(k) for k in level_chunk_keys(g)], np.int64).reshape(-1, ndim)
    count = int(attr_dict(g, "zarr_vectors_level", {}).get("vertex_count", 0))
    objects = all_ids = None
    if "object_index" in g:
        all_ids, oid, och, ofr = object_entries(g, ndim)
        objects = (oid, och, ofr)
    grid = level_grid(zs.root, level)
    scale = tuple(int(round(c / r)) for c, r in zip(grid.chunk_shape, zs.metadata.chunk_shape))
    return LevelSource(level, grid, scale, chunks, None, count, specs_of(g), objects, all_ids)


def _compressors(zs: ZVStore):
    try:
        comp = tuple(array_at(zs.root, "0/vertices").compressors)
    except Exception:  # noqa: BLE001 - metadata we cannot introspect: write uncompressed
        return None
    return comp or None


def _unique(forks):
    return list({id(f): f for f in forks if f is not None}.values())


def drop_coarse_levels(zs: ZVStore) -> None:
    """Remove every level above 0 and level 0's links (to levels that will no longer exist)."""
    for k in sorted(list_resolution_levels(zs), reverse=True):
        if k > 0:
            remove_resolution_level(zs, k)
    g0 = group_at(zs.root, "0")
    if "links" in g0:
        del g0["links"]


def small_enough(count: int, n_chunks: int, min_points: int) -> str:
    if count <= min_points:
        return f"level holds {count} <= min_points={min_points} points"
    if n_chunks <= 1:
        return "level fits in a single chunk"
    return ""


class PyramidBuilder:
    """Plans, prepares and finishes the batches of one pyramid build (coordinator side).

    :func:`build_pyramid` drives it from a written level 0; :func:`zv_dask.ingest`
    plans the first batch before its write tasks run (:meth:`plan_first`), lets
    those tasks build it, and hands the results back (:meth:`finish_batch`)
    before :meth:`run` goes on.
    """

    def __init__(self, zs: ZVStore, job: WriteJob, options: PyramidOptions, *, client, progress,
                 slots: int | None = None, meta=None):
        o = options
        budget = o.memory_budget if isinstance(o.memory_budget, MemoryBudget) else resolve_budget(o.memory_budget,
                                                                                                   client)
        self.zs, self.job = zs, job
        self.options = o
        meta = meta if meta is not None else zs.metadata
        self.ndim = meta.ndim
        self.levels = o.levels
        self.min_points = o.min_points
        self.client = client
        self.budget = budget
        self._asked_points = None if o.points_per_task is None else int(o.points_per_task)
        self.points_per_task = self._asked_points or DEFAULT_POINTS_PER_TASK
        self.levels_per_task = None if o.levels_per_task is None else int(o.levels_per_task)
        self.progress = progress
        self.slots = slots if slots is not None else task_slots(client)
        self.links, warns = resolve_links(o.links, meta)
        self.report = PyramidReport(links=self.links, warnings=warns)
        self._steps = level_steps(self.ndim, o.levels, o.bin_ratio, o.chunk_scale)  # checks every parameter
        self.record = o.record(self.links)
        self._pending: list[LevelStep] = []
        self._exhausted = False
        self.bpc = tuple(int(round(c / b)) for c, b in zip(meta.chunk_shape, meta.effective_bin_shape))
        self.compressors = _compressors(zs) if zs is not None else None
        # plain vlen arrays take their cells as direct PUTs; on a plain store their link arrays are then
        # created at the end, only where cells were written (icechunk wants every array to exist first)
        self.plain = self.compressors is None
        self.eager_links = (job is not None and job.transactional) or not self.plain
        self.building: list[int] | None = None  # the levels of the batch under way (removed if it fails)
        self.journal = None  # the job's Journal: rounds and tasks are recorded there as they finish
        self.record_tasks = True  # tasks record themselves (plain stores); icechunk records whole rounds only
        # called before a round is recorded (icechunk: the checkpoint)
        self.before_record: Callable[[], Any] | None = None
        self.tasks_done = 0  # pyramid tasks finished by this process
        self.tasks_reused = 0  # pyramid tasks an interrupted job had finished (not run again)

    def use_compressors(self, compressors) -> None:
        """Make the new arrays with these zarr compressors (``None``: plain vlen-bytes) instead of level 0's."""
        self.compressors = tuple(compressors) if compressors else None
        self.plain = self.compressors is None
        self.eager_links = (self.job is not None and self.job.transactional) or not self.plain

    # -- steps -----------------------------------------------------------------------------
    def _peek(self, i: int) -> LevelStep | None:
        while len(self._pending) <= i and not self._exhausted:
            nxt = next(self._steps, None)
            if nxt is None:
                self._exhausted = True
            else:
                self._pending.append(nxt)
        return self._pending[i] if i < len(self._pending) else None

    def _step(self, i: int) -> LevelStep:
        """The ``i``-th step still to build, where one is known to be there (a started round's)."""
        step = self._peek(i)
        assert step is not None, f"no step {i} still to build"
        return step

    def peek_step(self, i: int = 0) -> LevelStep | None:
        """The step of the ``i``-th level still to build (``None`` past the last)."""
        return self._peek(i)

    def advance(self, n: int = 1) -> None:
        """Mark the next ``n`` levels built (by someone else than :meth:`run`: an append's rebuild)."""
        self._peek(n - 1)
        self._pending = self._pending[n:]

    def check_attributes(self, specs: list[AttributeSpec], dtype: str = "float64") -> None:
        """Raise now (before anything changes) if ``attribute_reduction`` does not fit the level-0 attributes.

        Also sizes the tasks: unless ``points_per_task`` was given, as many points
        as the memory budget lets a task hold (at most ``DEFAULT_POINTS_PER_TASK``).
        """
        resolve_attributes(specs, self.options.attribute_reduction, self.options.method)
        if self._asked_points is None:
            row = self.ndim * np.dtype(dtype).itemsize + sum(np.dtype(s.dtype).itemsize * (s.channels or 1)
                                                              for s in specs)
            self.points_per_task = rows_within(self.budget.per_task, pyramid_bytes_per_point(row),
                                               DEFAULT_POINTS_PER_TASK, 1)

    # -- planning --------------------------------------------------------------------------
    def first_reason(self, count: int, n_chunks: int) -> str:
        """Why no level would be built from a level 0 of this size (``""`` if one would)."""
        return small_enough(count, n_chunks, self.min_points) if self.levels is None else ""

    def choose_steps(self, chunks: np.ndarray, weights: np.ndarray, scale: tuple[int, ...],
                     budget: int | None = None) -> list[LevelStep]:
        """The steps of the next batch over a source level with these chunks (and points per chunk)."""
        budget = self.points_per_task if budget is None else int(budget)
        first = self._peek(0)
        if first is None:
            return []
        fine_bpc = tuple(b * s for b, s in zip(self.bpc, scale))
        out = [first]
        n0, _ = region_loads(chunks, weights, fine_bpc, region_shape(first, self.bpc))
        total = float(np.sum(weights))
        cap = MAX_BATCH_LEVELS if self.levels_per_task is None else self.levels_per_task
        while len(out) < cap:
            nxt = self._peek(len(out))
            if nxt is None:
                break
            n, biggest = region_loads(chunks, weights, fine_bpc, region_shape(nxt, self.bpc))
            if biggest > budget:
                break
            if n < min(n0, 2 * self.slots) and total > budget:
                break
            out.append(nxt)
        return out

    def plan_batch(self, src: LevelSource, steps: list[LevelStep]) -> Round:
        """Geometry, attributes and link arrays of a batch (nothing is written)."""
        meta = self.zs.metadata
        levels = []
        parent_specs, parent_grid, parent_scale = src.specs, src.grid, src.scale
        read_names = None
        for step in steps:
            reductions, explicit, specs = resolve_attributes(parent_specs, self.options.attribute_reduction,
                                                              self.options.method)
            if read_names is None:
                read_names = tuple(s.name for s in parent_specs if s.name in reductions)
            cs = tuple(float(c) * s for c, s in zip(meta.chunk_shape, step.total_scale))
            grid = Grid(meta.bounds[0], meta.bounds[1], cs, meta.effective_bin_shape, src.grid.dtype)
            params = CoarsenParams(step.total_ratio, self.options.method, reductions, explicit,
                                   self.options.sample_size, self.options.seed, step.level)
            axes, created, returned = self._plan_links(parent_scale, step)
            geom = StepGeometry(step.level, parent_grid, grid, self.bpc, tuple(parent_scale), step.total_scale,
                                params, self.links, tuple(specs), self.plain, returned)
            bin_shape = tuple(float(b) * r for b, r in zip(meta.effective_bin_shape, step.total_ratio))
            lv = _Level(step, geom, specs, bin_shape, axes, created)
            levels.append(lv)
            parent_specs, parent_grid, parent_scale = specs, grid, step.total_scale
        return Round(src.level, levels, read_names or (), region_shape(steps[-1], self.bpc))

    def _plan_links(self, parent_scale, step: LevelStep) -> tuple[dict, dict, tuple[int, ...]]:
        """Link families of a level and its parent: ``(offsets per axis, arrays made up front, returned)``.

        Per delta, the offsets each axis allows and the offsets arrays made before
        the tasks run; and the deltas whose cells the tasks return. Plain stores make no array up front
        (the cells come first, the arrays around them at the end); other stores make a family's arrays
        up front unless there are more than ``EAGER_LINK_ARRAYS`` of them (coarse bins many chunks wide),
        when only those used are made.
        """
        axes: dict[int, tuple] = {}
        created: dict[int, list[tuple[int, ...]]] = {}
        returned: list[int] = []
        if self.links == "none":
            return axes, created, ()
        fine_c = tuple(b * s for b, s in zip(self.bpc, parent_scale))
        coarse_c = tuple(b * s for b, s in zip(self.bpc, step.total_scale))
        for delta in (1, -1) if self.links == "explicit" else (1,):
            axes[delta] = offset_axes(fine_c, coarse_c, step.total_ratio, delta)
            if not self.eager_links:
                continue
            if offsets_count(axes[delta]) <= EAGER_LINK_ARRAYS:
                created[delta] = list(itertools.product(*axes[delta]))
            else:
                returned.append(delta)
        return axes, created, tuple(returned)

    # -- preparing and finishing -------------------------------------------------------------
    def prepare(self, batch: Round) -> None:
        """Create the batch's level arrays and link arrays (empty presence lists)."""
        root = self.zs.root
        for lv in batch.levels:
            k = lv.step.level
            prepare_level(root, k, lv.geom.grid, lv.specs, compressors=self.compressors)
            for delta in lv.link_axes:
                offsets = lv.link_created.get(delta)
                owner = k - 1 if delta > 0 else k
                grid = lv.geom.fine_grid if delta > 0 else lv.geom.grid
                g = group_at(root, str(owner))
                links = g.require_group("links")
                fam_name = f"{delta:+d}"
                if fam_name in links:
                    del links[fam_name]
                fam = links.create_group(fam_name, attributes=link_family_attrs(delta, self.ndim, 0))
                if offsets:
                    create_vlen_arrays(fam, grid, [(offset_segment(off), link_array_attrs(delta, off, [], grid.origin))
                                                   for off in offsets], compressors=self.compressors)
        self.job.absorb([])  # the next target must see the arrays just created

    def finish_batch(self, batch: Round, results: list, src: LevelSource, t0: float, n_tasks: int):
        """Write the metadata of each level of a finished batch; returns ``(source, stop reason)``.

        With ``levels=None`` the stop criteria are checked level by level, and
        the levels a batch built past the stopping point are removed.
        """
        summaries = [r[0] for r in results]
        reason = ""
        for i, lv in enumerate(batch.levels):
            k = lv.step.level
            parts = [s.levels[k] for s in summaries if k in s.levels]
            summary = ChunkSummary.concat(parts, self.ndim)
            if src.objects is not None and summary.object_ids is None:
                summary.object_ids = np.zeros(0, np.int64)
                summary.object_chunks = np.zeros((0, self.ndim), np.int64)
                summary.object_fragments = np.zeros(0, np.int64)
            src = self._finish_level(lv, summary, summaries, src)
            self.report.tasks[k] = n_tasks
            self.report.level_seconds[k] = time.perf_counter() - t0
            log.info("pyramid level %d: %d vertices in %d chunks (%d tasks, %.2f s)", k, src.vertex_count,
                     len(src.chunks), n_tasks, self.report.level_seconds[k])
            if self.levels is None:
                prev = self.report.vertex_counts.get(k - 1, None)
                reason = small_enough(src.vertex_count, len(src.chunks), self.min_points)
                if not reason and prev is not None and src.vertex_count >= prev:
                    reason = f"level {k} removed no point"
                if reason:
                    self._prune([x.step.level for x in batch.levels[i + 1:]], k)
                    break
        done = [lv.step.level for lv in batch.levels if lv.step.level in self.report.vertex_counts]
        self.report.batches.append(done)
        self._pending = self._pending[len(batch.levels):]
        return src, reason

    def level_metadata(self, lv: _Level, src: LevelSource) -> LevelMetadata:
        """The metadata of a coarse level made from ``src`` (its counts are filled in when it is finished)."""
        k = lv.step.level
        grid = lv.geom.grid
        return LevelMetadata(level=k, object_sparsity=1.0, coarsening_method="per_object", parent_level=k - 1,
                             chunk_shape=grid.chunk_shape if any(s != 1 for s in lv.step.total_scale) else None,
                             bin_shape=lv.bin_shape, fragments_tile=True,
                             inherited_num_objects=0 if src.all_ids is None else len(src.all_ids),
                             preserves_object_ids=True if src.objects is not None else None)

    def _finish_level(self, lv: _Level, summary: ChunkSummary, summaries: list, src: LevelSource) -> LevelSource:
        zs = self.zs
        k = lv.step.level
        grid = lv.geom.grid
        lm = self.level_metadata(lv, src)
        finalize_level(zs.root, k, grid, summary, lm, lv.specs, all_object_ids=src.all_ids)
        for delta in lv.link_axes:
            owner = k - 1 if delta > 0 else k
            n = self._finish_links(owner, delta, lv.geom.fine_grid if delta > 0 else grid, lv, summaries)
            self.report.link_counts[f"{owner}/{delta:+d}"] = n
            if n and owner == k:
                lm.arrays_present = list(lm.arrays_present) + ["links"]
            elif n:
                mark_links_present(group_at(zs.root, str(owner)))
        create_resolution_level(zs, k, lm)
        nonempty = summary.rows > 0
        self.report.levels.append(k)
        self.report.vertex_counts[k] = lm.vertex_count
        self.report.chunk_counts[k] = int(nonempty.sum())
        self.report.bin_shapes[k] = lv.bin_shape
        # an object source's summary has entries (finish_batch gives it empty ones at the least)
        objects = summary.objects if src.objects is not None else None
        return LevelSource(k, grid, lv.step.total_scale, summary.chunks[nonempty], summary.rows[nonempty],
                           lm.vertex_count, lv.specs, objects, src.all_ids)

    def _finish_links(self, owner: int, delta: int, grid: Grid, lv: _Level, summaries: list) -> int:
        """Presence lists and record counts of one link family; only arrays with records remain.

        Arrays are there already when they were made before the tasks ran
        (``lv.link_created``, empty ones are removed now); otherwise they are
        made now around the cells the tasks wrote (plain stores) or returned
        (``StepGeometry.returned_links``), which are written after them.
        """
        root = self.zs.root
        if "links" not in group_at(root, str(owner)) or f"{delta:+d}" not in group_at(root, f"{owner}/links"):
            return 0  # an interrupted finish of this round removed it already: it had no records
        links = group_at(root, f"{owner}/links")
        fam = group_at(links, f"{delta:+d}")
        per_seg: dict[str, list] = {}
        returned = []
        for s in summaries:
            for (lvl, d, seg), (chunks, counts) in s.links.items():
                if lvl == owner and d == delta:
                    per_seg.setdefault(seg, []).append((chunks, counts))
            returned += s.link_cells.get((owner, delta), [])
        axes = lv.link_axes[delta]
        unknown = [seg for seg in per_seg if not offset_allowed(parse_offset_segment(seg), axes)]
        if unknown:  # a record outside the offsets the geometry allows: a bug, never silently dropped
            raise StoreError(f"links {owner}/{delta:+d}: cells written under unexpected offsets {sorted(unknown)}")
        created = lv.link_created.get(delta)
        segments = [offset_segment(o) for o in created] if created is not None else sorted(per_seg)
        total = 0
        create, update = [], {}
        for seg in segments:
            parts = per_seg.get(seg, [])
            chunks = np.concatenate([c for c, _ in parts]) if parts else np.zeros((0, self.ndim), np.int64)
            n = int(sum(int(np.sum(c)) for _, c in parts))
            attrs = link_array_attrs(delta, parse_offset_segment(seg), sorted(chunk_keys(chunks)), grid.origin)
            if created is None and seg not in fam:  # (an interrupted finish may have made it already)
                if n:
                    create.append((seg, attrs))
            elif n == 0:
                if seg in fam:
                    del fam[seg]
            else:
                update[f"{fam.path}/{seg}"] = attrs
            total += n
        create_vlen_arrays(fam, grid, create, compressors=self.compressors)
        update_node_attrs(fam.store, update)
        write_cells(fam.store, returned, plain=self.plain or None)
        if total:
            update_node_attrs(fam.store, {fam.path: link_family_attrs(delta, self.ndim, total)})
        else:
            del links[f"{delta:+d}"]
            if not list(links.keys()):
                del group_at(root, str(owner))["links"]
        return total

    def _prune(self, levels: list[int], last: int) -> None:
        """Remove levels a speculative batch built past the stopping level ``last``."""
        root = self.zs.root
        for k in sorted(levels, reverse=True):
            if str(k) in root:
                del root[str(k)]
        drop_up_links(root, last)
        self.report.link_counts.pop(f"{last}/+1", None)

    # -- running ------------------------------------------------------------------------------
    def build_batch(self, batch: Round, src: LevelSource) -> list:
        """Run the tasks of a batch (regions of the top level, grouped up to ``points_per_task``)."""
        import dask

        target = self.job.target()
        fine_bpc = tuple(b * s for b, s in zip(self.bpc, src.scale))
        stage = _round_stage(batch)
        chunks_all, weights = src.chunks, src.weights()
        earlier: list[tuple] = []
        if self.journal is not None:  # a resumed round: the tasks that finished are not run again
            for name in self.journal.finished(stage):
                covered, res = self.journal.load(stage, name)
                earlier.append((res, None))
                self.tasks_reused += 1
                self.report.tasks_resumed += 1
                keep = ~chunks_in(chunks_all, np.asarray(covered).reshape(-1, self.ndim))
                chunks_all, weights = chunks_all[keep], weights[keep]
        groups = plan_tasks(chunks_all, fine_bpc, batch.region, weights, self.points_per_task) if len(chunks_all) \
            else []
        task_fn = dask.delayed(batch_task, pure=False)
        token = uuid.uuid4().hex[:12]
        tasks = []
        for i, idx in enumerate(groups):
            chunks = chunks_all[idx]
            obj = None
            if src.objects is not None:
                m = chunks_in(src.objects[1], chunks)
                obj = tuple(a[m] for a in src.objects)
            record = (stage, "t" + "_".join(map(str, chunks[0])))
            tasks.append(task_fn(target, batch.geoms, src.level, batch.read_names, self.ndim, chunks, obj,
                                 self.journal if self.record_tasks else None, record,
                                 dask_key_name=f"zv-pyramid-{batch.numbers[0]}-{i}-{token}"))
        a, b = batch.numbers[0], batch.numbers[-1]
        label = (f"pyramid level {a}" if a == b else f"pyramid levels {a}-{b}" if self.levels is not None
                 else f"pyramid level {a} (and up to {b}, until a level is small enough)")
        results = run_tasks(tasks, self.client, self.progress, label, on_result=self._task_finished)
        self.job.absorb(_unique([fork for _, fork in results]))
        return earlier + results

    def _task_finished(self, i: int, result) -> None:
        self.tasks_done += 1
        kill_point(f"pyramid:{self.tasks_done}")

    # -- the journal ---------------------------------------------------------------------------
    def replay_round(self, first: int):
        """``(source, stop reason)`` of the round from level ``first`` if the journal has it finished, else ``None``."""
        if self.journal is None:
            return None
        rec = self.journal.load("rounds", f"{first:03d}")
        if rec is None:
            return None
        self._peek(rec["levels"] - 1)
        self._pending = self._pending[rec["levels"]:]
        old = self.report
        self.report = rec["report"]
        for name in ("warnings", "resumed", "tasks_resumed"):  # this run's, not the recorded run's
            setattr(self.report, name, getattr(old, name))
        self.report.rounds_resumed = old.rounds_resumed + 1
        for key, n in self.report.link_counts.items():  # a rewritten fine level's metadata lists its links again
            owner = key.split("/")[0]
            if n and owner in self.zs.root:
                mark_links_present(self.zs.root[owner])
        return rec["source"], rec["reason"]

    def started_round(self, first: int) -> int | None:
        """How many levels the round from level ``first`` builds, if it was started (its arrays made)."""
        if self.journal is None:
            return None
        rec = self.journal.load("started", f"{first:03d}")
        return None if rec is None else int(rec)

    def record_round(self, batch: Round, src: LevelSource, reason: str) -> None:
        """The round's metadata is written: record what the next round starts from."""
        if self.journal is not None:
            if self.before_record is not None:
                self.before_record()
            self.journal.record("rounds", f"{batch.numbers[0]:03d}",
                                {"levels": len(batch.levels), "source": src, "reason": reason, "report": self.report})

    def run(self, src: LevelSource, reason: str = "") -> LevelSource:
        """Build batches from ``src`` until the steps run out or a stop criterion holds."""
        while not reason:
            if self._peek(0) is None:
                reason = (f"{self.levels} levels built" if self.levels is not None
                          else "bin_ratio/chunk_scale lists exhausted")
                break
            first = self._step(0).level
            replayed = self.replay_round(first)
            if replayed is not None:  # finished before the job was interrupted
                src, reason = replayed
                continue
            started = self.started_round(first)
            steps = ([self._step(i) for i in range(started)] if started is not None
                     else self.choose_steps(src.chunks, src.weights(), src.scale))
            batch = self.plan_batch(src, steps)
            self.building = batch.numbers
            t0 = time.perf_counter()
            if started is None:
                self.prepare(batch)
                if self.journal is not None and self.record_tasks:
                    self.journal.record("started", f"{first:03d}", len(steps))
            results = self.build_batch(batch, src)
            src, reason = self.finish_batch(batch, results, src, t0, len(results))
            self.record_round(batch, src, reason)
            self.building = None
        self.report.stop_reason = reason
        return src

    def finish_root(self, has_objects: bool) -> None:
        """Capabilities and cross-level declaration, then the root metadata (last)."""
        meta = self.zs.metadata
        caps = [c for c in meta.format_capabilities if c != "multiscale_links"]
        if has_objects and "preserved_object_ids" not in caps:
            caps.append("preserved_object_ids")
        linked = self.links != "none" and any(self.report.link_counts.values())
        if linked:
            caps.append("multiscale_links")
        meta.format_capabilities = caps
        meta.cross_level_depth = 1 if linked else 0
        meta.cross_level_storage = self.links if linked else "none"
        write_root_metadata(self.zs, meta, extra={"zv_dask": {"pyramid": self.record}})


def _round_stage(batch: Round) -> str:
    return f"round-{batch.numbers[0]:03d}"


def drop_up_links(root, level: int) -> None:
    """Remove level ``level``'s ``+1`` links (to a level that is gone), and its ``links`` group if empty."""
    if str(level) not in root:
        return
    g = root[str(level)]
    if "links" not in g:
        return
    if "+1" in g["links"]:
        del g["links"]["+1"]
    if list(g["links"].keys()):
        return
    del g["links"]
    lm = dict(g.attrs.get("zarr_vectors_level", {}))
    if "links" in lm.get("arrays_present", []):
        lm["arrays_present"] = [a for a in lm["arrays_present"] if a != "links"]
        g.attrs["zarr_vectors_level"] = lm


def mark_links_present(group) -> None:
    lm = dict(group.attrs.get("zarr_vectors_level", {}))
    present = list(lm.get("arrays_present", []))
    if lm and "links" not in present:
        lm["arrays_present"] = present + ["links"]
        group.attrs["zarr_vectors_level"] = lm

