"""Per-level parameters of a pyramid, in integer base-bin units.

Level ``k`` has bins ``R_k`` base bins wide and chunks ``S_k`` root chunks
wide, per axis, where ``R_k`` / ``S_k`` are the running products of the
per-level ``bin_ratio`` / ``chunk_scale`` steps. Nothing here touches a store.

Parameter forms (both ``bin_ratio`` and ``chunk_scale``):

* a scalar: the same step on every axis at every level;
* a tuple (or 1-D array) of D values: one step per axis, at every level;
* a list: one entry per level, each a scalar or a D-tuple. With
  ``levels=None`` the list's length caps the number of levels.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from zv_dask.errors import InputError
from zv_dask.format.metadata import LINK_STORAGE
from zv_dask.pyramid.coarsen import bin_keys
from zv_dask.pyramid.reduce import REDUCTIONS, default_reduction
from zv_dask.store.levels import AttributeSpec

__all__ = ["LevelStep", "level_steps", "region_shape", "region_loads", "plan_tasks", "resolve_attributes",
           "resolve_links", "LINK_STORAGE"]



@dataclass(frozen=True)
class LevelStep:
    """Geometry of coarse level ``level`` relative to the base bin and root chunk."""

    level: int
    ratio: tuple[int, ...]  # this step's bin ratio (bins of level-1 -> level)
    total_ratio: tuple[int, ...]  # R_k: level bin = base bin * R_k
    chunk_scale: tuple[int, ...]  # this step's chunk scale
    total_scale: tuple[int, ...]  # S_k: level chunk = root chunk * S_k
    parent_scale: tuple[int, ...]  # S_{k-1}


def _as_int_tuple(name: str, value, ndim: int) -> tuple[int, ...]:
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.full(ndim, arr)
    if arr.ndim != 1 or len(arr) != ndim:
        raise InputError(f"{name} entry {value!r} must be a scalar or {ndim} values (one per axis)")
    out = []
    for v in arr.tolist():
        if isinstance(v, bool) or not float(v).is_integer() or v < 1:
            raise InputError(f"{name} values must be integers >= 1, got {value!r}")
        out.append(int(v))
    return tuple(out)


def _per_level(name: str, value, ndim: int) -> tuple[list[tuple[int, ...]], bool]:
    """The validated steps and whether the last one repeats for ever (scalar / tuple forms)."""
    if isinstance(value, list):
        if not value:
            raise InputError(f"{name} as a per-level list must not be empty")
        return [_as_int_tuple(name, v, ndim) for v in value], False
    return [_as_int_tuple(name, value, ndim)], True


def level_steps(ndim: int, levels: int | None, bin_ratio=2, chunk_scale=1) -> Iterator[LevelStep]:
    """The :class:`LevelStep` of levels 1, 2, ... (``levels`` of them, or unbounded).

    Every parameter is checked here, before anything is written.
    """
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 0):
        raise InputError(f"levels must be None or an integer >= 0, got {levels!r}")
    ratios, r_repeat = _per_level("bin_ratio", bin_ratio, ndim)
    scales, s_repeat = _per_level("chunk_scale", chunk_scale, ndim)
    for k, r in enumerate(ratios, 1):
        if all(v == 1 for v in r):
            raise InputError(f"bin_ratio of level {k} is 1 on every axis: the level would not be coarser")
    caps = [len(x) for x, rep in ((ratios, r_repeat), (scales, s_repeat)) if not rep]
    if levels is not None and caps and min(caps) < levels:
        raise InputError(f"levels={levels} but bin_ratio/chunk_scale lists give only {min(caps)} levels")
    n = levels if levels is not None else (min(caps) if caps else None)
    return _steps(ndim, n, ratios, scales)


def _steps(ndim, n, ratios, scales) -> Iterator[LevelStep]:
    total_r = (1,) * ndim
    total_s = (1,) * ndim
    for k in itertools.count(1):
        if n is not None and k > n:
            return
        r = ratios[min(k, len(ratios)) - 1]
        s = scales[min(k, len(scales)) - 1]
        parent_s = total_s
        total_r = tuple(a * b for a, b in zip(total_r, r))
        total_s = tuple(a * b for a, b in zip(total_s, s))
        yield LevelStep(k, r, total_r, s, total_s, parent_s)


def region_shape(step: LevelStep, bins_per_chunk: tuple[int, ...]) -> tuple[int, ...]:
    """Task-region edge in base bins: lcm of the fine chunk, coarse chunk and coarse bin.

    Every coarse bin, coarse chunk and fine chunk then lies wholly inside one
    region, so regions are independent units of work.
    """
    return tuple(math.lcm(b * sp, b * s, r) for b, sp, s, r in
                 zip(bins_per_chunk, step.parent_scale, step.total_scale, step.total_ratio))


def region_loads(chunks: np.ndarray, weights: np.ndarray, fine_bins_per_chunk: tuple[int, ...],
                 region: tuple[int, ...]) -> tuple[int, float]:
    """How many regions of edge ``region`` (base bins) the chunks fall in, and the most points one holds."""
    chunks = np.asarray(chunks, np.int64)
    if not len(chunks):
        return 0, 0.0
    per = np.asarray(region, np.int64) // np.asarray(fine_bins_per_chunk, np.int64)
    _, inv = np.unique(bin_keys(np.floor_divide(chunks, per)), return_inverse=True)
    loads = np.bincount(inv.reshape(-1), weights=np.asarray(weights, np.float64))
    return len(loads), float(loads.max())


def plan_tasks(chunks: np.ndarray, fine_bins_per_chunk: tuple[int, ...], region: tuple[int, ...],
               weights: np.ndarray, points_per_task: int) -> list[np.ndarray]:
    """Split the fine chunks of a level into tasks: whole regions, grouped up to ``points_per_task``.

    Returns, per task, the indices (into ``chunks``) of its fine chunks in
    ascending chunk order. A region never spans two tasks, so no two tasks
    write the same coarse chunk; regions with no fine chunk produce no task.
    """
    chunks = np.asarray(chunks, np.int64)
    if not len(chunks):
        return []
    per = np.asarray(region, np.int64) // np.asarray(fine_bins_per_chunk, np.int64)
    reg_key = bin_keys(np.floor_divide(chunks, per))
    order = np.lexsort(tuple(chunks.T[::-1]) + (reg_key,))
    rk = reg_key[order]
    starts = np.flatnonzero(np.r_[True, rk[1:] != rk[:-1]])
    ends = np.r_[starts[1:], len(rk)]
    w = np.cumsum(np.r_[0, np.asarray(weights, np.float64)[order]])
    tasks, first, acc = [], 0, 0.0
    for i, (a, b) in enumerate(zip(starts, ends)):
        acc += w[b] - w[a]
        last = i == len(starts) - 1
        if acc >= points_per_task or last or (w[ends[i + 1]] - w[starts[i + 1]]) + acc > points_per_task:
            idx = order[starts[first]:b]
            tasks.append(idx[np.lexsort(tuple(chunks[idx].T[::-1]))])
            first, acc = i + 1, 0.0
    return tasks


def resolve_attributes(parent: list, attribute_reduction, method: str):
    """Reductions of the coarse level's attributes, the explicit ones, and the coarse level's specs.

    ``parent`` are the parent level's :class:`~zv_dask.store.levels.AttributeSpec`; raises
    :class:`InputError` for an unknown reduction or attribute.
    """
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


def resolve_links(links, meta) -> tuple[str, list[str]]:
    """The link storage a build writes (``"none"``, ``"implicit"`` or ``"explicit"``) and any warnings.

    ``links`` is a checked :attr:`PyramidOptions.links <zv_dask.pyramid.options.PyramidOptions>`;
    ``None`` follows the store's declaration (``cross_level_storage``, off
    when ``cross_level_depth`` is 0); ``True`` means ``"explicit"``, ``False``
    ``"none"``.
    """
    warnings = []
    if links is None:
        mode = meta.cross_level_storage if int(meta.cross_level_depth) != 0 else "none"
        if mode not in LINK_STORAGE:
            mode = "explicit"
        if mode != "none" and int(meta.cross_level_depth) not in (0, 1):
            warnings.append(f"the store declares cross_level_depth={meta.cross_level_depth}; zv-dask writes the "
                            "+-1 links only and records cross_level_depth=1")
        return mode, warnings
    if links is True:
        return "explicit", warnings
    if links is False:
        return "none", warnings
    return links, warnings
