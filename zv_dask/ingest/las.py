"""LAS/LAZ input: every dimension of every point format, the header's scale and offset, the CRS.

Every dimension other than X, Y, Z becomes a vertex attribute under its laspy name in its
native dtype (bit fields as ``uint8``): the standard ones of the point format, ``rgb`` (red,
green, blue as one ``uint16`` attribute of 3 channels), ``nir``, and extra-bytes dimensions
(an array of n elements is an attribute of n channels). Positions are the scaled coordinates
``X * scale + offset`` in float64, so the stored integers can be restored exactly from the
header record kept in the root attributes (``zv_dask`` -> ``las``, :func:`las_record`).

The CRS comes from the files' WKT VLR, else their GeoTIFF keys (EPSG codes); files of one job
with different CRS, or different dimensions, are refused with a message naming them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from zv_dask.errors import InputError
from zv_dask.format.crs import crs_label, normalize_crs

__all__ = ["LasFile", "las_dimensions", "las_crs", "read_las_files", "las_slice", "las_record", "choose_attributes",
           "choose_crs"]

_COLOUR = ("red", "green", "blue")
_GEOKEY_PROJECTED, _GEOKEY_GEOGRAPHIC, _GEOKEY_VERTICAL = 3072, 2048, 4096


@dataclass
class LasFile:
    """What one file's header says."""

    path: str
    points: int
    version: str
    point_format: int
    scales: list
    offsets: list
    dimensions: dict  # attribute name -> (dtype, channels)
    extra_bytes: list  # [{"name", "dtype", "channels", "description"}]
    crs: dict | None
    identity: dict  # global_encoding, file_source_id, system_identifier, project_id of the header


def las_dimensions(point_format) -> tuple[dict, list]:
    """``({attribute: (dtype, channels)}, extra_bytes)`` for a laspy point format, in LAS order."""
    names = set(point_format.dimension_names)
    dims: dict = {}
    extra = []
    for d in point_format.dimensions:
        if d.name in ("X", "Y", "Z"):
            continue
        if d.name in _COLOUR and set(_COLOUR) <= names:
            if "rgb" not in dims:
                dims["rgb"] = ("uint16", 3)
            continue
        if d.dtype is None:  # a bit field (return_number, flags, 5-bit classification...)
            dt, channels = np.dtype(np.uint8), None
        else:
            dt = np.dtype(d.dtype)
            channels = None
            if dt.subdtype is not None:  # an extra-bytes array of n elements
                dt, shape = dt.subdtype
                channels = int(np.prod(shape))
        dims[d.name] = (dt.name, channels)
        if not d.is_standard:
            extra.append({"name": d.name, "dtype": dt.name, "channels": channels,
                          "description": getattr(d, "description", "") or ""})
    return dims, extra


def _geokeys(vlr) -> dict:
    keys = {}
    for k in getattr(vlr, "geo_keys", []) or []:
        if int(k.tiff_tag_location) == 0:  # the value is the key's own (a code), not a pointer
            keys[int(k.id)] = int(k.value_offset)
    return keys


def las_crs(header) -> dict | None:
    """The CRS a LAS header declares: ``{"wkt": ...}`` from a WKT VLR, else ``{"epsg": ...}`` from GeoTIFF keys."""
    from laspy.vlrs.known import GeoKeyDirectoryVlr, WktCoordinateSystemVlr

    vlrs = list(header.vlrs) + list(getattr(header, "evlrs", None) or [])
    for v in vlrs:
        if isinstance(v, WktCoordinateSystemVlr):
            wkt = (v.string or "").strip("\0 \n")
            if wkt:
                return {"wkt": wkt}
    for v in vlrs:
        if isinstance(v, GeoKeyDirectoryVlr):
            keys = _geokeys(v)
            code = keys.get(_GEOKEY_PROJECTED) or keys.get(_GEOKEY_GEOGRAPHIC)
            if code and code != 32767:  # 32767: user-defined, described by other keys
                out = {"epsg": code}
                if keys.get(_GEOKEY_VERTICAL) and keys[_GEOKEY_VERTICAL] != 32767:
                    out["vertical_epsg"] = keys[_GEOKEY_VERTICAL]
                return out
    return None


def _identity(header) -> dict:
    """The header fields that say what the points are besides their dimensions (GPS time type above all)."""
    sid = header.system_identifier
    return {"global_encoding": int(header.global_encoding.value), "file_source_id": int(header.file_source_id),
            "system_identifier": (sid.decode("ascii", "replace") if isinstance(sid, bytes) else str(sid)).rstrip("\0"),
            "project_id": str(header.uuid)}


def _check_whole(path: str, header) -> None:
    """An uncompressed file that ends before the points its header declares: an :class:`InputError` saying so."""
    if getattr(header, "are_points_compressed", path.lower().endswith(".laz")):
        return  # LAZ: a cut file shows when its chunks are read (las_slice)
    need = int(header.offset_to_point_data) + int(header.point_count) * int(header.point_format.size)
    size = os.path.getsize(path)
    if size < need:
        holds = max(0, size - int(header.offset_to_point_data)) // int(header.point_format.size)
        raise InputError(f"{path!r} is truncated: its header declares {int(header.point_count):,} points, the file "
                         f"ends after {holds:,} of them ({size:,} of {need:,} bytes); copy it again, or fix its "
                         "header's point count")


def read_las_files(files: list[str]) -> list[LasFile]:
    """Every file's header, read once (in this process)."""
    try:
        import laspy
    except ImportError as e:  # pragma: no cover
        raise InputError("reading LAS/LAZ needs laspy with lazrs: pip install 'zv-dask[las]'") from e
    out = []
    for f in files:
        try:
            with laspy.open(f) as reader:
                h = reader.header
                _check_whole(f, h)
                dims, extra = las_dimensions(h.point_format)
                out.append(LasFile(f, int(h.point_count), f"{h.version.major}.{h.version.minor}",
                                   int(h.point_format.id), [float(s) for s in h.scales],
                                   [float(o) for o in h.offsets], dims, extra, las_crs(h), _identity(h)))
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001
            raise InputError(f"{f!r} is not a valid LAS/LAZ file: {e}") from None
    return out


def _names(files: list[LasFile], n: int = 3) -> str:
    shown = ", ".join(os.path.basename(f.path) for f in files[:n])
    return shown + (f" and {len(files) - n} more" if len(files) > n else "")


def choose_attributes(files: list[LasFile], attributes) -> dict:
    """The attributes of the job: all the files' dimensions, or those asked for (every file must have them)."""
    if attributes is not None:
        wanted = list(attributes)
        for f in files:
            bad = [a for a in wanted if a not in f.dimensions]
            if bad:
                hint = " (colour is one attribute, 'rgb')" if set(bad) & set(_COLOUR) else ""
                raise InputError(f"{f.path!r} has no dimension(s) {bad}{hint}; it has {list(f.dimensions)}")
        dims = {a: files[0].dimensions[a] for a in wanted}
    else:
        dims = files[0].dimensions
    for f in files[1:]:
        own = {a: f.dimensions[a] for a in dims if a in f.dimensions} if attributes is not None else f.dimensions
        if own != dims:
            differ = sorted(set(own) ^ set(dims))
            changed = sorted(a for a in set(own) & set(dims) if own[a] != dims[a])
            common = [a for a in dims if a in f.dimensions and f.dimensions[a] == dims[a]]
            what = (f"dimensions {differ} are in one and not the other" if differ else "") + (
                "; " if differ and changed else "") + (f"{changed} have other dtypes" if changed else "")
            raise InputError(f"the LAS files carry different dimensions: {os.path.basename(files[0].path)!r} "
                             f"(point format {files[0].point_format}) and {os.path.basename(f.path)!r} (point format "
                             f"{f.point_format}): {what}. Pass attributes=[...] with the ones to keep, e.g. "
                             f"{','.join(common)}")
    return dims


def choose_crs(files: list[LasFile], crs) -> dict | None:
    """The job's CRS: ``crs`` when given (it overrides the files'), else the files' one CRS."""
    if crs is not None:
        return normalize_crs(crs)
    groups: dict = {}
    for f in files:
        groups.setdefault(repr(f.crs), []).append(f)
    if len(groups) > 1:
        parts = "; ".join(f"{crs_label(fs[0].crs)}: {_names(fs)}" for fs in groups.values())
        raise InputError(f"the LAS files are in different coordinate systems ({parts}); ingest them in separate "
                         "jobs, or pass crs=... to state the one they share")
    return files[0].crs


def las_record(files: list[LasFile], dims: dict) -> dict:
    """The header facts an export needs to restore the files' integers and header (root ``zv_dask`` -> ``las``).

    ``global_encoding`` (GPS week or adjusted standard time, synthetic returns),
    ``file_source_id``, ``system_identifier`` and ``project_id`` are the first
    file's; ``uniform`` says whether every file agreed on version, point format,
    scales, offsets and global encoding.
    """
    first = files[0]

    def key(f):
        return f.version, f.point_format, f.scales, f.offsets, f.identity["global_encoding"]

    return {"version": first.version, "point_format": first.point_format, "scales": first.scales,
            "offsets": first.offsets, "dimensions": list(dims),
            "extra_bytes": [e for e in first.extra_bytes if e["name"] in dims],
            "uniform": all(key(f) == key(first) for f in files), **first.identity,
            "files": [{"name": os.path.basename(f.path), "points": f.points, "version": f.version,
                       "point_format": f.point_format, "scales": f.scales, "offsets": f.offsets,
                       "global_encoding": f.identity["global_encoding"]} for f in files]}


def las_slice(path: str, start: int, count: int, specs: dict):
    """Positions (float64) and attributes ``{name: array}`` of ``count`` points of a file from ``start``."""
    import laspy

    try:
        with laspy.open(path) as reader:
            reader.seek(start)
            pts = reader.read_points(count)
    except Exception as e:  # noqa: BLE001 - a corrupt or cut file: name it and the points, not numpy's words
        raise InputError(f"cannot read points {start:,} to {start + count:,} of {path!r} (corrupt or truncated?): "
                         f"{type(e).__name__}: {e}") from None
    if len(pts) < count:
        raise InputError(f"{path!r} ends after {start + len(pts):,} points; its header declares more (truncated?)")
    # X * scale + offset (laspy's own arithmetic, so the same float64 values) written straight into
    # the (N, 3) array: no scaled copies stacked afterwards
    raw, scales, offsets = pts.array, pts.scales, pts.offsets
    pos = np.empty((len(raw), 3), np.float64)
    for k, c in enumerate("XYZ"):
        np.multiply(raw[c], float(scales[k]), out=pos[:, k])
        pos[:, k] += float(offsets[k])
    attrs = {}
    for name, (dtype, channels) in specs.items():
        if name == "rgb":
            v = np.empty((len(raw), 3), np.uint16)
            for k, c in enumerate(_COLOUR):
                v[:, k] = raw[c]
        else:
            v = np.asarray(pts[name])
            if channels is not None:
                v = v.reshape(len(v), channels)
        attrs[name] = v.astype(dtype, copy=False)  # bit fields come as uint8 already: no copy
    return pos, attrs
