"""The pyramid engine: coarse levels (and cross-level links) from level 0.

``graph`` is the entry (:func:`build_pyramid`), ``builder`` the coordinator side
(rounds of tasks, arrays before, metadata after), ``tasks`` what a task does on a
worker, ``stack`` the pure per-region coarsening and links, ``coarsen`` /
``reduce`` the pure per-bin methods and reductions, ``plan`` the per-level
parameters and task regions.
"""

from zv_dask.pyramid.graph import PyramidReport, build_pyramid

__all__ = ["build_pyramid", "PyramidReport"]
