"""``reproject=``: positions transformed to another CRS, per partition, before the bounds scan.

pyproj (the ``crs`` extra) does the work: one ``Transformer`` per source CRS and thread,
``always_xy`` (x is easting / longitude whatever the CRS's axis order), in float64. Heights
change only when both CRSs have a vertical part (``EPSG:2994+5703`` -> ``EPSG:4979``, say);
otherwise z passes through as it is, in its own units.

Each partition keeps its own source CRS, so the files of one job may be in different CRSs
when they are reprojected to one. A partition whose points do not transform (outside the
source CRS's area, so pyproj gives ``inf``) fails the job with the count and a first point.

LAS input keeps its LAS record, with the scales carried over to the target's units (a 0.01 ft
scale becomes 0.001 m, 1e-8 degrees) and no offsets: the files' integers are gone, and an
export picks offsets from the region it writes.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from zv_dask.errors import InputError
from zv_dask.format.crs import crs_label, crs_text, normalize_crs, pyproj_crs

__all__ = ["check_reproject", "reproject_source", "transform_positions"]

_METRES_PER_DEGREE = 111_320.0  # at the equator: only to carry a LAS scale over to degrees
_local = threading.local()


def check_reproject(target) -> dict:
    """The root ``crs`` of a ``reproject=`` target; an :class:`InputError` if pyproj is missing or does not know it."""
    crs = normalize_crs(target)
    if crs is None:
        raise InputError("reproject= needs the CRS to reproject to, got None")
    pyproj_crs(crs, "reproject")
    return crs


def _transformer(src: str, dst: str):
    cache = getattr(_local, "transformers", None)
    if cache is None:
        cache = _local.transformers = {}
    t = cache.get((src, dst))
    if t is None:
        import pyproj

        t = cache[(src, dst)] = pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(src),
                                                            pyproj.CRS.from_user_input(dst), always_xy=True)
    return t


def transform_positions(pos: np.ndarray, src: str, dst: str, where: str = "") -> np.ndarray:
    """``(n, 2|3)`` positions from CRS text ``src`` to ``dst`` in float64 (a new array)."""
    pos = np.asarray(pos, np.float64)
    out = np.column_stack(_transformer(src, dst).transform(*(pos[:, i] for i in range(pos.shape[1]))))
    bad = ~np.isfinite(out).all(axis=1) & np.isfinite(pos).all(axis=1)
    if bad.any():
        raise InputError(f"{int(bad.sum()):,} of {len(pos):,} points{where} do not transform from "
                         f"{crs_label(normalize_crs(src))} to {crs_label(normalize_crs(dst))}, e.g. "
                         f"{pos[bad][0].tolist()}: are they in the CRS their source declares?")
    return out.reshape(pos.shape)


def _reproject_batch(batch, src: str, dst: str, where: str):
    batch.positions = transform_positions(batch.positions, src, dst, where)
    return batch


def _scale_in(scale: float, src, dst) -> float:
    """A LAS scale in ``src`` units carried to ``dst`` units, rounded down to a power of ten."""
    def metres(c):
        return _METRES_PER_DEGREE if c.is_geographic else float(c.axis_info[0].unit_conversion_factor)

    value = scale * metres(src) / metres(dst)
    return 10.0 ** math.floor(math.log10(value) + 1e-9)


def reproject_source(src, target: dict, partition_crs: list | None = None, paths: list | None = None,
                     scales: list | None = None):
    """``src`` with every partition's positions transformed to ``target`` (a root ``crs``).

    ``partition_crs``: each partition's own CRS (LAS files), else ``src.crs`` for all;
    ``paths``: each partition's file, for messages; ``scales``: each partition's LAS x scale.
    """
    from dask import delayed

    if src.ndim not in (2, 3):
        raise InputError(f"reproject transforms 2-D or 3-D positions (x, y[, z]); the input has {src.ndim} axes")
    crss = partition_crs if partition_crs is not None else [src.crs] * len(src.partitions)
    if any(c is None for c in crss):
        missing = sorted({p for p, c in zip(paths or [None] * len(crss), crss) if c is None and p})
        who = f"the files {', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''} declare" if missing \
            else "the input declares"
        raise InputError(f"reproject needs the points' own CRS, and {who} none: pass crs=... to say what "
                         "they are in")
    dst_crs = pyproj_crs(target, "reproject")
    dst = crs_text(target)
    parts = []
    known: dict = {}
    for i, (part, c) in enumerate(zip(src.partitions, crss)):
        key = crs_text(c)
        if key not in known:
            src_crs = pyproj_crs(c, "the input's crs")
            known[key] = (src_crs == dst_crs, src_crs)
        same, src_crs = known[key]
        where = f" of {paths[i]}" if paths else ""
        parts.append(part if same else delayed(_reproject_batch, pure=True)(part, key, dst, where))
    src.partitions = parts
    src.scan_parts = None  # the scan reads what the job reads: reprojected positions
    src.position_dtype = np.dtype(np.float64)
    labels = sorted({crs_label(c) for c in crss})
    if src.las is not None:
        rec = dict(src.las)
        xy = min(_scale_in(s, known[key][1], dst_crs)
                 for s, key in set(zip(scales or [rec["scales"][0]] * len(crss), map(crs_text, crss))))
        rec["scales"] = [xy, xy, float(rec["scales"][2])]
        rec["offsets"] = None
        rec["reprojected"] = {"from": labels, "to": crs_label(target)}
        src.las = rec
    src.reprojected_from = labels
    src.description += f", reprojected to {crs_label(target)}"
    src.crs = target
    return src
