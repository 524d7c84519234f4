"""How a level's points lay out as LAS: header, dimension mapping, integer positions. Pure: no I/O, no dask.

The header comes from the store's LAS record (``zv_dask.las``, see
:func:`las_record`) when there is one: its version, point format, scales,
offsets and extra-bytes definitions, so that LAS ingest then export gives the
same file contents back. Without one (a store made from arrays or Parquet):

* the smallest point format holding the attributes that are LAS dimensions
  (``rgb`` -> 2/3/7, ``gps_time`` -> 1/3/6, ``nir`` -> 8, ``overlap`` /
  ``scanner_channel`` / ``scan_angle`` -> 6+), LAS 1.2 for formats 0-3 and 1.4
  for 6+;
* scales 0.001 (coarser by powers of 10 if the extent needs it) and offsets
  the floor of the exported region's minimum (the store bounds, cut by the
  box), so the integers fit without a pass over the data.

Attributes map to dimensions by name (``rgb``'s three channels -> red, green,
blue); an attribute that is not a dimension of the format becomes an
extra-bytes dimension of its dtype and channels. Values that do not fit their
dimension (a fractional or too large classification, say) are refused with an
:class:`~zv_dask.errors.InputError` naming the attribute. Positions become
``round((x - offset) / scale)``, which gives LAS input's integers back exactly.

CRS: ``{"wkt": ...}`` -> a WKT VLR (and the WKT bit of LAS 1.4's global
encoding); ``{"epsg": N}`` -> a GeoKeyDirectory VLR (model type, raster type,
``ProjectedCSTypeGeoKey`` 3072 or ``GeographicTypeGeoKey`` 2048, and
``VerticalCSTypeGeoKey`` 4096 for ``vertical_epsg``). Which of 3072 / 2048 is
asked of pyproj when it is installed, else guessed from the code (4000-4999:
geographic); pass a WKT to be sure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from zv_dask.errors import InputError

if TYPE_CHECKING:
    from laspy import LasHeader

__all__ = ["LasLayout", "las_record", "plan_las", "choose_point_format", "grid_for", "to_integers"]

INT32 = (-(2 ** 31), 2 ** 31 - 1)
ON_GRID = 1e-3  # a position within this fraction of a step of an integer is on the LAS grid
COLOUR = ("red", "green", "blue")
EXTRA_KINDS = {"u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f4", "f8"}


def las_record(root_attrs: dict) -> dict | None:
    """The LAS record LAS ingest leaves in the root attributes (``zv_dask.las``), or ``None``."""
    z = root_attrs.get("zv_dask") if isinstance(root_attrs, dict) else None
    rec = z.get("las") if isinstance(z, dict) else None
    return rec if isinstance(rec, dict) and "point_format" in rec else None


def _dims(fmt: int) -> list[str]:
    import laspy

    return [d for d in laspy.PointFormat(fmt).dimension_names if d not in ("X", "Y", "Z")]


def _standard() -> set[str]:
    return {d for f in range(11) for d in _dims(f)}


def choose_point_format(needed: set[str], preferred: int | None = None) -> int:
    """``preferred`` if it holds ``needed``, else the smallest format (record size) that does.

    When none holds them all (names of formats 0-5 and 6-10 mixed), the smallest
    holding the most; the rest become extra bytes.
    """
    import laspy

    if preferred is not None and needed <= set(_dims(preferred)):
        return int(preferred)
    by_size = sorted(range(11), key=lambda f: (laspy.PointFormat(f).size, f))
    full = [f for f in by_size if needed <= set(_dims(f))]
    return full[0] if full else max(by_size, key=lambda f: len(needed & set(_dims(f))))


def grid_for(lo, hi, scales=None) -> tuple[list[float], list[float]]:
    """Scales and offsets for positions in ``[lo, hi]``: ``scales`` (default 0.001) made 10x coarser
    along an axis while its span overflows an int32, and offsets ``floor(lo)``."""
    lo = np.asarray(lo, np.float64)
    offsets = np.floor(lo)
    spans = np.asarray(hi, np.float64) - offsets
    out = []
    for span, s in zip(spans, scales or [0.001] * len(spans)):
        s = float(s)
        while span / s > INT32[1] - 1 and s < 1e12:
            s *= 10.0
        out.append(s)
    return out, offsets.tolist()


def _region(bounds, bbox) -> tuple[np.ndarray, np.ndarray]:
    """The exported region: the store's bounds cut by the box (when there is one)."""
    lo, hi = np.asarray(bounds[0], np.float64), np.asarray(bounds[1], np.float64)
    if bbox is not None:
        lo, hi = np.maximum(lo, bbox[0]), np.minimum(hi, bbox[1])
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return lo, hi


def to_integers(x: np.ndarray, scale: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """LAS integers of positions: ``round((x - offset) / scale)``, as float, and which were off the grid."""
    q = (np.asarray(x, np.float64) - offset) / scale
    r = np.round(q)
    return r, np.abs(q - r) > ON_GRID


@dataclass
class _Field:
    attribute: str
    columns: list[str]
    dim: str
    extra: bool
    dtype: np.dtype  # of the dimension
    lo: float | None = None  # integer range of a standard dimension
    hi: float | None = None


@dataclass
class LasLayout:
    """A LAS header and how a frame of :func:`~zv_dask.read_points` fills its points."""

    header: LasHeader
    axes: list[str]
    fields: list[_Field]
    header_from: str
    crs_written: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def scales(self) -> list[float]:
        return [float(s) for s in self.header.scales]

    @property
    def offsets(self) -> list[float]:
        return [float(o) for o in self.header.offsets]

    def points(self, df):
        """``(laspy.ScaleAwarePointRecord, number of points moved to the integer grid)`` of a frame."""
        import laspy

        rec = laspy.ScaleAwarePointRecord.zeros(len(df), header=self.header)
        moved = np.zeros(len(df), bool)
        for ax, dim, s, o in zip(self.axes, "XYZ", self.scales, self.offsets):
            r, off = to_integers(df[ax].to_numpy(), s, o)
            bad = ~np.isfinite(r) | (r < INT32[0]) | (r > INT32[1])
            if bad.any():
                raise InputError(f"position {ax}={df[ax].to_numpy()[bad][0].item()!r} does not fit a LAS integer with "
                                 f"scale {s} and offset {o}")
            rec[dim] = r.astype(np.int32)
            moved |= off
        for f in self.fields:
            cols = [df[c].to_numpy() for c in f.columns]
            v = cols[0] if len(cols) == 1 else np.stack(cols, axis=1)
            rec[f.dim] = v.astype(f.dtype) if f.extra else _fit(v, f)
        return rec, int(moved.sum())

    def describe(self) -> dict:
        h = self.header
        return {"version": str(h.version), "point_format": int(h.point_format.id), "scales": self.scales,
                "offsets": self.offsets, "header_from": self.header_from,
                "dimensions": [f.dim for f in self.fields if not f.extra],
                "extra_bytes": [f.dim for f in self.fields if f.extra]}


def _fit(v: np.ndarray, f: _Field) -> np.ndarray:
    """``v`` in the dtype of standard dimension ``f.dim``; an error naming the attribute if it does not fit."""
    lo, hi = f.lo, f.hi
    if lo is None or hi is None:  # a float dimension
        return v.astype(f.dtype)
    where = f"attribute {f.attribute!r}" + (f" (column {f.columns[0]!r})" if f.columns[0] != f.attribute else "")
    if v.dtype.kind == "f":
        bad = ~np.isfinite(v) | (v != np.round(v))
        if bad.any():
            raise InputError(f"{where} holds {v[bad][0].item()!r}, not an integer: LAS dimension {f.dim!r} holds "
                             f"integers {int(lo)}..{int(hi)}")
    elif v.dtype.kind not in "biu":
        raise InputError(f"{where} is {v.dtype}: LAS dimension {f.dim!r} holds integers {int(lo)}..{int(hi)}")
    if len(v):
        v_lo, v_hi = v.min(), v.max()
        if v_lo < lo or v_hi > hi:
            bad = (v_lo if v_lo < lo else v_hi).item()
            raise InputError(f"{where} holds {bad!r}, outside {int(lo)}..{int(hi)}, the range of LAS dimension "
                             f"{f.dim!r} in this point format" + (" (point formats 6-10 hold classifications up to "
                                                                  "255)" if f.dim == "classification" else ""))
    return v.astype(f.dtype)


def _standard_field(attribute: str, columns: list[str], dim: str, fmt: int) -> _Field:
    import laspy

    d = laspy.PointFormat(fmt).dimension_by_name(dim)
    if d.kind.name == "FloatingPoint":
        return _Field(attribute, columns, dim, False, np.dtype(d.dtype))
    if d.kind.name == "BitField":
        return _Field(attribute, columns, dim, False, np.dtype(np.uint8), 0, 2 ** d.num_bits - 1)
    info = np.iinfo(d.dtype)
    return _Field(attribute, columns, dim, False, np.dtype(d.dtype), info.min, info.max)


def _extra_dtype(name: str, dt: np.dtype, notes: list[str]) -> np.dtype:
    dt = np.dtype(dt)
    if dt.kind == "b":
        notes.append(f"attribute {name!r} (bool) is written as a uint8 extra-bytes dimension")
        return np.dtype(np.uint8)
    code = f"{dt.kind}{dt.itemsize}"
    if code not in EXTRA_KINDS:
        raise InputError(f"attribute {name!r} is {dt}, which LAS extra bytes cannot hold (they hold 8- to 64-bit "
                         "integers and 32/64-bit floats); leave it out with attributes=[...]")
    if len(name.encode()) > 32:
        raise InputError(f"attribute {name!r} is longer than 32 bytes, the longest LAS extra-bytes name; "
                         "leave it out with attributes=[...]")
    return dt.newbyteorder("<")


def _columns(name: str, channels: int | None) -> list[str]:
    return [name] if channels is None else [f"{name}_{i}" for i in range(channels)]


def _epsg(value) -> int | None:
    if isinstance(value, str) and value.upper().startswith("EPSG:"):
        value = value[5:]
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _is_geographic(code: int) -> tuple[bool, str]:
    try:
        import pyproj

        return bool(pyproj.CRS.from_epsg(code).is_geographic), "by pyproj"
    except Exception:  # noqa: BLE001 - no pyproj, or a code it does not know: the range heuristic
        return 4000 <= code <= 4999, "guessed from the code's range, no pyproj"


def add_crs(header, crs: dict | None, notes: list[str]) -> str | None:
    """Add the CRS VLR for ``crs`` to ``header``; how it was written, or ``None``."""
    from laspy.vlrs.known import GeoKeyDirectoryVlr, GeoKeyEntryStruct, WktCoordinateSystemVlr

    if not crs:
        return None
    if crs.get("wkt"):
        header.vlrs.append(WktCoordinateSystemVlr(str(crs["wkt"])))
        if header.version.minor >= 4:
            header.global_encoding.wkt = True
        return "WKT VLR"
    code = _epsg(crs.get("epsg"))
    if code is None:
        notes.append(f"the store's CRS (keys {sorted(crs)}) has neither 'wkt' nor 'epsg': no CRS written")
        return None
    vertical = _epsg(crs.get("vertical_epsg"))
    if not 0 < code <= 65535 or (vertical is not None and not 0 < vertical <= 65535):
        notes.append(f"EPSG code {code} does not fit a GeoKey (at most 65535): no CRS written; give the store a WKT")
        return None
    geographic, how = _is_geographic(code)
    keys = [(1024, 2 if geographic else 1), (1025, 1), (2048 if geographic else 3072, code)]
    if vertical is not None:
        keys.append((4096, vertical))
    vlr = GeoKeyDirectoryVlr()
    vlr.geo_keys = [GeoKeyEntryStruct(id=k, tiff_tag_location=0, count=1, value_offset=v) for k, v in keys]
    vlr.geo_keys_header.number_of_keys = len(keys)
    header.vlrs.append(vlr)
    kind = "geographic" if geographic else "projected"
    if header.point_format.id >= 6:
        notes.append(f"point format {header.point_format.id} calls for a WKT CRS; EPSG:{code} is written as GeoKeys "
                     "(give the store a WKT to write one)")
    return f"GeoKeyDirectory VLR (EPSG:{code}, {kind}, {how})"


# global-encoding bits set from what the export writes, never copied from the input
GLOBAL_WKT, GLOBAL_WAVEFORM = 0b1_0000, 0b0110


def _restore_identity(header, record: dict, notes: list[str]) -> None:
    """The LAS input's global encoding (GPS time type, synthetic returns), file source id, system
    identifier and project id, from the store's LAS record (stores made before these were kept have none)."""
    from uuid import UUID

    enc = record.get("global_encoding")
    if isinstance(enc, int):
        if enc & GLOBAL_WAVEFORM:
            notes.append("the LAS input declared waveform data packets; they are not kept, so the flags are cleared")
        header.global_encoding.value = enc & ~(GLOBAL_WKT | GLOBAL_WAVEFORM) & 0xFFFF
    if isinstance(record.get("file_source_id"), int):
        header.file_source_id = record["file_source_id"]
    if isinstance(record.get("system_identifier"), str):
        header.system_identifier = record["system_identifier"][:32]
    try:
        header.uuid = UUID(str(record["project_id"]))
    except (KeyError, ValueError):
        pass


def plan_las(axes: list[str], attrs: dict, has_obj: bool, record: dict | None, crs: dict | None, *, bounds, bbox=None,
             level: int = 0, vertex_dtype="float64") -> LasLayout:
    """The header and field mapping of a LAS export.

    ``attrs``: ``{name: (dtype, channels or None)}`` as :func:`zv_dask.read_points`
    names them; ``has_obj`` adds ``object_id`` (an int64 extra-bytes dimension);
    ``bounds`` are the store's, ``bbox`` the exported box (or ``None``).
    """
    try:
        import laspy
        from laspy.point import dims as las_dims
    except ImportError as e:
        raise InputError("writing LAS/LAZ needs laspy with lazrs: pip install 'zv-dask[las]'") from e
    if len(axes) != 3:
        raise InputError(f"LAS holds 3-D points; the store has {len(axes)} axes {axes}")
    notes: list[str] = []
    standard = _standard()
    items = dict(attrs)
    if has_obj:
        items["object_id"] = (np.dtype(np.int64), None)
    wanted = {}  # attribute -> standard dimensions it would fill
    for n, (_dt, ch) in items.items():
        if n == "rgb" and ch == 3:
            wanted[n] = list(COLOUR)
        elif ch is None and n in standard:
            wanted[n] = [n]
    needed = {d for ds in wanted.values() for d in ds}
    preferred = int(record["point_format"]) if record else None
    fmt = choose_point_format(needed, preferred)
    if record:
        version = str(record.get("version") or las_dims.preferred_file_version_for_point_format(fmt))
        if version not in las_dims.VERSION_TO_POINT_FMT or fmt not in las_dims.VERSION_TO_POINT_FMT[version]:
            version = las_dims.preferred_file_version_for_point_format(fmt)
        scales = [float(s) for s in record["scales"]]
        header_from = "the store's LAS record"
        if record.get("offsets") is None:  # reprojected at ingest: the files' integers are gone
            scales, offsets = grid_for(*_region(bounds, bbox), scales=scales)
            notes.append(f"the points were reprojected at ingest ({record.get('reprojected', {}).get('to', '')}): "
                         f"new LAS integers with scales {scales} and offsets {offsets} (floor of the exported "
                         "region's minimum)")
        else:
            offsets = [float(o) for o in record["offsets"]]
        if preferred is not None and fmt != preferred:
            notes.append(f"point format {preferred} of the store's LAS record cannot hold "
                         f"{sorted(needed - set(_dims(preferred)))}: point format {fmt} written")
        if record.get("uniform") is False:
            notes.append("the store's LAS files disagreed on point format, scales or offsets: the first file's "
                         f"are used (point format {preferred}, scales {scales}, offsets {offsets})")
    else:
        version = las_dims.preferred_file_version_for_point_format(fmt)
        scales, offsets = grid_for(*_region(bounds, bbox))
        header_from = "chosen (no LAS record in the store)"
        notes.append(f"no LAS record in the store: point format {fmt} (the smallest holding "
                     f"{', '.join(sorted(needed)) or 'positions only'}), LAS {version}, scales {scales[0]:g}, "
                     f"offsets {offsets} (floor of the exported region's minimum)")
    header = laspy.LasHeader(point_format=fmt, version=version)
    header.scales = np.asarray(scales, np.float64)
    header.offsets = np.asarray(offsets, np.float64)
    header.generating_software = "zv-dask export"
    if record:
        _restore_identity(header, record, notes)
    fmt_dims = set(_dims(fmt))
    fields: list[_Field] = []
    extra: dict[str, tuple[np.dtype, int | None]] = {}
    for n, (dt, ch) in items.items():
        dims = wanted.get(n)
        if dims and set(dims) <= fmt_dims:
            cols = _columns(n, ch)
            fields += [_standard_field(n, [c], d, fmt) for c, d in zip(cols, dims)]
        elif n in fmt_dims:
            raise InputError(f"attribute {n!r} has {ch} channels, but LAS dimension {n!r} holds one value; leave it "
                             "out with attributes=[...]")
        else:
            extra[n] = (_extra_dtype(n, dt, notes), ch)
    described = {e.get("name"): e for e in (record or {}).get("extra_bytes") or [] if isinstance(e, dict)}
    order = [n for n in described if n in extra] + [n for n in extra if n not in described]
    params = []
    for n in order:
        dt, ch = extra[n]
        params.append(laspy.ExtraBytesParams(name=n, type=np.dtype((dt, (ch,))) if ch else dt,
                                             description=str((described.get(n) or {}).get("description") or "")[:31]))
        fields.append(_Field(n, _columns(n, ch), n, True, dt))
    rank = {d: i for i, d in enumerate(_dims(fmt))}
    fields.sort(key=lambda f: (f.extra, rank.get(f.dim, 0)))  # standard dimensions in LAS order, then extra bytes
    if params:
        header.add_extra_dims(params)
    new = [n for n in order if n not in described]
    if new:
        notes.append(f"{', '.join(new)} {'is' if len(new) == 1 else 'are'} not "
                     f"{'a dimension' if len(new) == 1 else 'dimensions'} of point format {fmt}: written as "
                     "extra bytes")
    if level:
        notes.append(f"level {level} is a coarse level: its positions (bin centroids or kept points) are rounded to "
                     "the LAS integer grid, its attributes are the pyramid's reductions")
    if np.dtype(vertex_dtype) == np.float32 and not record:
        notes.append("positions are stored as float32: rounded to the LAS integer grid")
    layout = LasLayout(header, list(axes), fields, header_from, notes=notes)
    layout.crs_written = add_crs(header, crs, notes)
    return layout
