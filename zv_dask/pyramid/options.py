"""The options of a pyramid build, defined once (:class:`PyramidOptions`).

:func:`zv_dask.build_pyramid` takes them as keywords, ``ingest(pyramid=...)``
as a dict (or an instance), the CLI as ``--levels``, ``--bin-ratio`` ...; the
ones that decide what is written are recorded in the store's root
(:meth:`PyramidOptions.record`) so that an append rebuilds the pyramid the same way.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from zv_dask.budget import MemoryBudget, parse_size
from zv_dask.errors import InputError
from zv_dask.format.metadata import LINK_STORAGE
from zv_dask.options import Flag, Options, bounded, count, non_negative, one_or_tuple, option, positive_ints
from zv_dask.pyramid.coarsen import METHODS

__all__ = ["PyramidOptions", "check_links", "memory_budget_problem", "memory_budget_text"]

_GROUP = "pyramid"


def check_links(links) -> str | None:
    """What is wrong with a ``links`` value (``None``: nothing)."""
    if links is None or isinstance(links, bool) or links in LINK_STORAGE:
        return None
    return f"must be one of {LINK_STORAGE}, True, False or None (the store's declaration)"


def memory_budget_text(text: str) -> str:
    """``--memory-budget``: a size like ``2GiB`` (kept as text: the job parses it)."""
    try:
        parse_size(text, "--memory-budget")
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--memory-budget must be ", "expected ")) from None
    return text


def memory_budget_problem(value) -> str | None:
    """What is wrong with a ``memory_budget`` value (``None``: nothing); raises the size parser's own error."""
    if not isinstance(value, MemoryBudget):
        parse_size(value)
    return None


@dataclass(frozen=True, kw_only=True)
class PyramidOptions(Options):
    """What a pyramid build writes, and how its tasks are sized.

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
        (up to ``sample_size`` points per bin); see :mod:`zv_dask.pyramid.coarsen`.
    attribute_reduction
        ``{name: reduction}`` with reductions from
        :data:`~zv_dask.pyramid.reduce.REDUCTIONS` (``None`` drops the
        attribute; ``"count"`` under a new name adds the number of level-0
        points per metavertex). Defaults: ``mean`` for floats, ``mode`` for
        integers and bools.
    sample_size
        Points kept per bin by ``method="sample"``.
    seed
        Seeds ``random`` / ``sample`` together with the bin: reproducible
        whatever the partitioning or the number of workers.
    min_points
        With ``levels=None``, no level is added above one of at most this many points.
    links
        Cross-level links from every vertex to the metavertex it folds into
        (ZV format section 9): ``"explicit"`` (``+1`` at the fine level and the
        ``-1`` mirror at the coarse one, the reference's default),
        ``"implicit"`` (``+1`` only), ``"none"``; ``True``/``False`` mean
        ``"explicit"``/``"none"``. ``None`` follows the store's
        ``cross_level_storage`` (zv-dask's own stores declare ``"none"``,
        the reference's ``"explicit"``). Links add 16 bytes per fine vertex
        and direction.
    points_per_task
        A task owns whole regions of about this many fine points (default: what
        ``memory_budget`` lets a task hold, at most 2,000,000); a round of tasks
        builds as many consecutive levels as such regions hold.
    levels_per_task
        At most this many levels per round of tasks (``None``: as many as fit).
        ``1`` makes every level durable on its own on a plain store.
    memory_budget
        Bytes (or a size like ``"2GiB"``) the build may hold per worker; by
        default half the workers' memory limit (see :func:`zv_dask.ingest`).
    """

    what = "pyramid options"

    levels: int | None = option(None, cli=Flag(
        "number of coarse levels (default: until a level is small or fits one chunk)", metavar="L",
        parse=non_negative, group=_GROUP))
    bin_ratio: Any = option(2, cli=Flag(
        "bin growth per level: one integer or one per axis, e.g. 2 or 2,2,1 (default: 2)", metavar="R",
        parse=positive_ints, group=_GROUP, to_value=one_or_tuple))
    chunk_scale: Any = option(1, cli=Flag(
        "chunk growth per level, as --bin-ratio (default: 1)", metavar="S", parse=positive_ints, group=_GROUP,
        to_value=one_or_tuple))
    method: str = option("centroid", choices=METHODS, cli=Flag(
        "how a bin's points become its coarse points (default: centroid)", group=_GROUP))
    attribute_reduction: Mapping[str, str | None] | None = option(None)
    sample_size: int = option(8, check=bounded(1), cli=Flag(
        "points kept per bin by --method sample (default: 8)", metavar="N", parse=count, group=_GROUP))
    seed: int = option(0, check=bounded(-(2**63)), cli=Flag(
        "seed of --method random/sample, reproducible whatever the workers (default: 0)", parse=int, group=_GROUP))
    min_points: int = option(1024, check=bounded(0), cli=Flag(
        "stop adding levels once a level holds at most N points (default: 1024)", metavar="N", parse=non_negative,
        group=_GROUP))
    links: str | bool | None = option(None, check=check_links, cli=Flag(
        "cross-level links from each point to its coarse point: +1 and the -1 mirror (explicit), +1 only "
        "(implicit) or none (default: what the store declares; new stores: none)", group=_GROUP,
        choices=LINK_STORAGE))
    points_per_task: int | None = option(None, check=bounded(1), written=False, cli=Flag(
        "fine points per pyramid task (default: what the memory budget allows)", metavar="N", parse=count,
        group=_GROUP))
    levels_per_task: int | None = option(None, check=bounded(1, none_ok=True), written=False, cli=Flag(
        "at most N levels per round of tasks (default: as many as a task's region holds; 1 makes every level "
        "durable on its own on a plain store)", metavar="N", parse=count, group=_GROUP))
    memory_budget: Any = option(None, check=memory_budget_problem, written=False, cli=Flag(
        "memory the build may use per worker, e.g. 2GiB (default: half the workers' memory limit); tasks are "
        "sized to it", metavar="SIZE", parse=memory_budget_text))

    @classmethod
    def of_ingest(cls, pyramid) -> PyramidOptions | None:
        """``ingest(pyramid=...)`` (``True``, a dict, an instance; falsy: none) as options, checked."""
        if not pyramid:
            return None
        if pyramid is True:
            return cls()
        if not isinstance(pyramid, (Mapping, PyramidOptions)):
            raise InputError(f"pyramid must be True, a dict of build_pyramid options or PyramidOptions, "
                             f"got {type(pyramid).__name__}")
        return cls.of(pyramid)

    def record(self, links: str) -> dict:
        """The ``zv_dask.pyramid`` root attribute: what an append needs to rebuild the pyramid the same way
        (``links`` as the build resolved them)."""
        return {"levels": None if self.levels is None else int(self.levels), "bin_ratio": _step_value(self.bin_ratio),
                "chunk_scale": _step_value(self.chunk_scale), "method": str(self.method),
                "attribute_reduction": None if self.attribute_reduction is None else dict(self.attribute_reduction),
                "sample_size": int(self.sample_size), "seed": int(self.seed), "min_points": int(self.min_points),
                "links": str(links)}

    @classmethod
    def from_record(cls, record: Mapping) -> PyramidOptions:
        """The options a :meth:`record` was made from."""
        return cls(levels=record["levels"], bin_ratio=_step_from(record["bin_ratio"]),
                   chunk_scale=_step_from(record["chunk_scale"]), method=record["method"],
                   attribute_reduction=record["attribute_reduction"], sample_size=record["sample_size"],
                   seed=record["seed"], min_points=record["min_points"], links=record["links"])


def _step_value(v):
    """A ``bin_ratio`` / ``chunk_scale`` as JSON that keeps its form (a list is per level, a tuple per axis)."""
    if isinstance(v, list):
        return {"per_level": [_step_value(x) for x in v]}
    if isinstance(v, (tuple, np.ndarray)):
        return {"per_axis": [int(x) for x in np.asarray(v).reshape(-1).tolist()]}
    return int(v)


def _step_from(v):
    if isinstance(v, dict) and "per_level" in v:
        return [_step_from(x) for x in v["per_level"]]
    if isinstance(v, dict) and "per_axis" in v:
        return tuple(int(x) for x in v["per_axis"])
    return int(v)
