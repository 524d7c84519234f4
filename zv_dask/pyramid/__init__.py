"""The pyramid engine: coarse levels from level 0 (``graph``), pure per-region coarsening (``coarsen``)."""

from zv_dask.pyramid.graph import PyramidReport, build_pyramid

__all__ = ["build_pyramid", "PyramidReport"]
