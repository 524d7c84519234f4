"""zv-dask's own structural and consistency checks of a ZV store.

:func:`validate_store` reads a store the way a reader would and checks that
everything a reader relies on holds:

* the root metadata parses (``zarr_vectors``, ``multiscales`` axes and levels);
* levels are ``0..L`` without gaps, each with parseable level metadata and the
  arrays it lists in ``arrays_present`` (arrays and groups where the format
  puts them);
* the array grid of each level matches its chunk grid (shape and
  ``chunk_grid_origin``) and covers every chunk in ``nonempty_chunks``; every
  array of a level lists the same chunks;
* every listed cell decodes: vertices, fragment index, attributes (exactly
  ``rows x channels x itemsize`` bytes of the declared dtype for the chunk's
  vertex rows, and the root ``attribute_specs`` agree with level 0's arrays);
  fragments lie inside the chunk's rows (and tile them when the level says
  ``fragments_tile``); points are finite, inside the bounds and in the chunk
  they are stored in;
* row counts add up to the level's ``vertex_count``, and vertex counts never
  grow from one level to the next; bins never shrink;
* object manifests decode and point at chunks that exist and fragments those
  chunks have;
* cross-level links: family and offsets-array metadata, record counts, and
  both endpoints of every record (chunk present, row inside it); each vertex
  of a linked level has one parent.

Problems are collected, not raised: the result is a :class:`ValidationReport`
with ``errors`` (the store is wrong) and ``warnings`` (legal but suspicious).
It never imports the reference implementation.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import zarr

from zv_dask.errors import FormatError, MetadataError, StoreError, UnfinishedJobWarning
from zv_dask.format.cells import FragmentIndex, decode_fragments, decode_manifest, decode_vertices
from zv_dask.format.grid import Grid, parse_chunk_key
from zv_dask.format.links import parse_offset_segment
from zv_dask.format.metadata import ZV_VERSION, LevelMetadata, RootMetadata, level_bins_from_multiscales
from zv_dask.read_links import locate_chunks, read_links
from zv_dask.store.api import ZVStore, as_store, list_resolution_levels
from zv_dask.store.nodes import attrs_of, node_at
from zv_dask.types import StoreLike

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["ValidationReport", "validate_store", "attribute_size_problem"]

BATCH = 256  # cells read per zarr call
EXAMPLES = 3  # examples kept per kind of problem


@dataclass
class ValidationReport:
    """Outcome of :func:`validate_store`: ``ok`` when there is no error."""

    store: str
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    levels: list = field(default_factory=list)  # per level: level, vertex_count, chunks, rows, objects
    chunks_checked: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no error was found (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict:
        """A JSON-ready dict (with ``ok``)."""
        return {"store": self.store, "ok": self.ok, "errors": list(self.errors), "warnings": list(self.warnings),
                "levels": [dict(lv) for lv in self.levels], "chunks_checked": self.chunks_checked,
                "seconds": self.seconds}

    def to_json(self, **kw) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(), **kw)

    def __repr__(self) -> str:
        head = "valid" if self.ok else f"INVALID ({len(self.errors)} error{'s' if len(self.errors) != 1 else ''})"
        lines = [f"ValidationReport: {self.store}: {head}, {len(self.warnings)} warning(s), "
                 f"{self.chunks_checked:,} chunks checked in {self.seconds:.2f}s"]
        for lv in self.levels:
            obj = f", {lv['objects']:,} objects" if lv.get("objects") is not None else ""
            lines.append(f"  level {lv['level']:<3} {lv['vertex_count']:,} vertices in {lv['chunks']:,} chunks{obj}")
        lines += [f"  error    {e}" for e in self.errors]
        lines += [f"  warning  {w}" for w in self.warnings]
        return "\n".join(lines)


class _Found:
    """Problems grouped by kind: a count and the first few examples of each."""

    def __init__(self) -> None:
        self.kinds: dict[tuple[str, str], list] = {}

    def add(self, severity: str, kind: str, example: str | None = None, n: int = 1) -> None:
        entry = self.kinds.setdefault((severity, kind), [0, []])
        entry[0] += n
        if example is not None and len(entry[1]) < EXAMPLES:
            entry[1].append(example)

    def error(self, kind: str, example: str | None = None, n: int = 1) -> None:
        self.add("error", kind, example, n)

    def warning(self, kind: str, example: str | None = None, n: int = 1) -> None:
        self.add("warning", kind, example, n)

    def render(self, severity: str) -> list[str]:
        out = []
        for (sev, kind), (count, examples) in self.kinds.items():
            if sev != severity:
                continue
            if not examples:
                out.append(kind)
            elif count == 1:
                out.append(f"{kind}: {examples[0]}")
            else:
                more = f"; {count - len(examples)} more" if count > len(examples) else ""
                out.append(f"{kind} ({count} times): " + "; ".join(examples) + more)
        return out


def _key(c) -> str:
    return ".".join(str(int(v)) for v in c)


_DTYPES_OF_SIZE = {1: "uint8/int8/bool", 2: "uint16/int16/float16", 4: "uint32/int32/float32",
                   8: "uint64/int64/float64"}


def attribute_size_problem(nbytes: int, rows: int, dtype: str, channels: int | None) -> str | None:
    """What is wrong with an attribute cell of ``nbytes`` for a chunk of ``rows`` vertices (``None``: nothing).

    A reader sizes the cell by the array's declared dtype and channel count alone,
    so the cell must hold exactly ``rows x channels x itemsize`` bytes. The
    message says what the byte count suggests instead (another value width,
    another channel count), e.g. "4250 bytes for 2125 rows is 2 bytes a value
    (uint16/int16/float16?), not float64 (8 bytes a value)".
    """
    dt = np.dtype(dtype)
    width = channels or 1
    if nbytes == rows * width * dt.itemsize:
        return None
    declared = f"{dt.name}" + (f" x {width} channels" if channels is not None else "")
    what = f"{nbytes} bytes for {rows} rows"
    if rows == 0:
        return f"{what}, expected none ({declared})"
    size = nbytes // (rows * width) if nbytes % (rows * width) == 0 else None
    per_row = nbytes // (rows * dt.itemsize) if nbytes % (rows * dt.itemsize) == 0 else None
    a_value = f"{dt.itemsize} byte{'s' if dt.itemsize > 1 else ''} a value"
    if size in _DTYPES_OF_SIZE:
        return f"{what} is {size} byte{'s' if size > 1 else ''} a value ({_DTYPES_OF_SIZE[size]}?), not {declared} " \
               f"({a_value})"
    if per_row is not None:
        return f"{what} is {per_row} {dt.name} values a row, not {width} ({declared})"
    if size is not None:
        return f"{what} is {size} bytes a value, not {declared} ({a_value})"
    return f"{what} is not a whole number of values a row ({declared} needs {rows * width * dt.itemsize} bytes)"


# -- root --------------------------------------------------------------------------------
def _check_root(zs: ZVStore, found: _Found, levels: list[int]) -> dict[int, tuple]:
    """§2: the root's version, geometry types, NGFF ``multiscales`` and ``ome`` blocks; the level bins."""
    meta = zs.metadata  # parsed strictly when the store was opened
    attrs = attrs_of(zs.root)
    if meta.zv_version != ZV_VERSION:
        found.warning("root", f"zv_version is {meta.zv_version!r}; these checks follow ZV {ZV_VERSION}")
    if "point_cloud" not in meta.geometry_types:
        found.warning("root", f"geometry_types {meta.geometry_types} has no 'point_cloud'; "
                              "only point cells are checked")
    try:
        axes = attrs["multiscales"][0]["axes"]
        if len(axes) != meta.ndim:
            found.error("root multiscales", f"{len(axes)} axes for {meta.ndim}-D chunk_shape")
    except (KeyError, IndexError, TypeError):
        found.error("root multiscales", "the root has no 'multiscales' block with axes")
    bins = level_bins_from_multiscales(attrs)
    if sorted(bins) != levels:
        found.error("root multiscales", f"'multiscales' datasets list levels {sorted(bins)} but the store has "
                                        f"level groups {levels}")
    ome = attrs.get("ome")
    if isinstance(ome, dict):
        nodes = sorted(int(n["name"]) for n in ome.get("nodes", []) if str(n.get("name", "")).isdigit())
        if nodes != levels:
            found.warning("root ome", f"'ome' nodes list levels {nodes}, the store has {levels}")
    if 0 in bins and not np.allclose(bins[0], meta.effective_bin_shape):
        found.error("root multiscales", f"level 0 bin {list(bins[0])} differs from the base bin "
                                        f"{list(meta.effective_bin_shape)}")
    if meta.attribute_specs and levels and "0" in zs.root:
        level0 = zs.root["0"]
        if isinstance(level0, zarr.Group):
            _check_attribute_specs(meta.attribute_specs, level0, found)
    return bins


def _check_attribute_specs(specs: dict, level0: zarr.Group, found: _Found) -> None:
    """§2.4: the root's ``attribute_specs`` name level 0's attribute arrays, with their dtypes and channels."""
    declared = set(specs.get("vertex", {}))
    arrays = _attribute_arrays(level0)
    present = set(arrays)
    if declared != present:
        found.warning("root attribute_specs", f"declares {sorted(declared)}, level 0 has {sorted(present)}")
    for name in sorted(declared & present):
        spec = specs["vertex"][name]
        a = attrs_of(arrays[name])
        if not isinstance(spec, dict) or spec.get("dtype") is None or a.get("dtype") is None:
            continue  # an array without a dtype is an error of its level
        try:
            said, has = np.dtype(spec["dtype"]).name, np.dtype(a["dtype"]).name
            rs = a.get("row_shape") or []
            said_ch, has_ch = int(spec.get("channels") or 1), int(rs[0]) if rs else 1
        except (TypeError, ValueError):
            found.error("root attribute_specs", f"{name!r}: dtype {spec['dtype']!r} / {a['dtype']!r} or its "
                                                "channels do not parse")
            continue
        if (said, said_ch) != (has, has_ch):
            found.error("root attribute_specs", f"{name!r} is declared {said} x {said_ch} at the root but "
                                                f"level 0's array says {has} x {has_ch}")


# -- nodes ---------------------------------------------------------------------------------
def _node_at[N: (zarr.Array, zarr.Group)](group: zarr.Group, path: str, kind: type[N], where: str,
                                          found: _Found) -> N | None:
    """:func:`node_at`, with the other kind at ``path`` an error of ``where`` (and ``None``) instead of an
    exception."""
    try:
        return node_at(group, path, kind)
    except StoreError as e:
        found.error(f"{where}: nodes of the wrong kind", str(e))
        return None


def _array_at(group: zarr.Group, path: str, where: str, found: _Found) -> zarr.Array | None:
    return _node_at(group, path, zarr.Array, where, found)


def _group_at(group: zarr.Group, path: str, where: str, found: _Found) -> zarr.Group | None:
    return _node_at(group, path, zarr.Group, where, found)


def _attribute_arrays(level: zarr.Group) -> dict[str, zarr.Array]:
    """The arrays of ``<level>/vertex_attributes``, sorted by name (none when it is missing or not a group)."""
    node = level["vertex_attributes"] if "vertex_attributes" in level else None
    return dict(sorted(node.arrays())) if isinstance(node, zarr.Group) else {}


def _cells_at(arr: zarr.Array, sel: tuple[np.ndarray, ...]) -> np.ndarray:
    """The payloads of the cells at ``sel`` (one coordinate array per axis), as an object array."""
    return np.asarray(arr.get_coordinate_selection(sel))


# -- one level ---------------------------------------------------------------------------
@dataclass
class _LevelArrays:
    """A level's per-chunk arrays (§4) and its vertex dtype."""

    vertices: zarr.Array
    fragments: zarr.Array
    attributes: dict[str, zarr.Array]
    vertex_dtype: str

    def named(self) -> dict[str, zarr.Array]:
        """Every per-chunk array under its path in the level, ``vertices`` first."""
        return {"vertices": self.vertices, "vertex_fragments": self.fragments,
                **{f"vertex_attributes/{name}": a for name, a in self.attributes.items()}}


@dataclass
class _Chunks:
    """A level's listed chunks and what their cells hold: per chunk, its rows, fragment count and fragment index."""

    coords: np.ndarray  # (N, D) absolute chunk coordinates
    rows: np.ndarray
    nfrag: np.ndarray
    fragments: list[FragmentIndex | None]


def _check_level(zs: ZVStore, k: int, bins: dict[int, tuple], found: _Found, bar: tqdm | None) -> dict | None:
    """Level ``k``'s metadata, arrays, grid and cells; its summary for the report (``None``: not checkable)."""
    meta = zs.metadata
    lk = f"level {k}"
    g = _group_at(zs.root, str(k), lk, found)
    if g is None:
        return None
    lm = _level_metadata(g, k, found)
    if lm is None:
        return None
    if not _check_members(g, lk, lm, found):
        return {"level": k, "vertex_count": lm.vertex_count, "chunks": 0, "rows": 0, "objects": None}
    arrays = _level_arrays(g, lk, found)
    if arrays is None:
        return None
    grid = _level_grid(meta, lm, arrays.vertex_dtype, lk, found)
    if grid is None:
        return None
    _check_bins(meta, k, bins, found)
    origin = _check_array_grids(arrays, grid, lk, found)
    listed = _listed_chunks(arrays, origin, lk, found)
    if listed is None:
        return None
    specs = _attribute_dtypes(arrays.attributes, lk, found)
    coords, cells = listed
    chunks = _check_cells(arrays, coords, cells, grid, lm, specs, lk, found, bar)
    _check_vertex_count(chunks, lm, lk, found)
    n_objects = _check_objects(g, k, meta.ndim, chunks, lm, found) if "object_index" in g else None
    return {"level": k, "vertex_count": lm.vertex_count, "chunks": int(len(chunks.coords)),
            "rows": int(chunks.rows.sum()), "objects": n_objects, "_chunks": chunks.coords, "_rows": chunks.rows}


def _level_metadata(g: zarr.Group, k: int, found: _Found) -> LevelMetadata | None:
    """§3: the ``zarr_vectors_level`` block parses and names this level (and its parent)."""
    lk = f"level {k}"
    try:
        lm = LevelMetadata.from_attrs(attrs_of(g))
        lm.validate()
    except MetadataError as e:
        found.error(f"{lk} metadata", str(e))
        return None
    if lm.level != k:
        found.error(f"{lk} metadata", f"the group '{k}' says level {lm.level}")
    if k > 0 and lm.parent_level not in (None, k - 1):
        found.warning(f"{lk} metadata", f"parent_level is {lm.parent_level}, expected {k - 1}")
    return lm


def _check_members(g: zarr.Group, lk: str, lm: LevelMetadata, found: _Found) -> bool:
    """§3: ``arrays_present`` matches the level's members; ``False`` when vertices or vertex_fragments is missing."""
    members = {name for name, _ in g.members()}
    for name in lm.arrays_present:
        if name not in members:
            found.error(f"{lk}: arrays_present lists {name!r} but the level has no such array or group")
    for name in ("vertices", "vertex_fragments"):
        if name not in members:
            found.error(f"{lk}: the level has no {name!r} array")
            return False
    for name in sorted(members - set(lm.arrays_present) - {"links"}):
        found.warning(f"{lk}: {name!r} exists but is not in arrays_present")
    return True


def _level_arrays(g: zarr.Group, lk: str, found: _Found) -> _LevelArrays | None:
    """§4.3: the per-chunk arrays are arrays (attributes in a group) and the vertices are of a float dtype."""
    vert = _array_at(g, "vertices", lk, found)
    frag = _array_at(g, "vertex_fragments", lk, found)
    if "vertex_attributes" in g:
        _group_at(g, "vertex_attributes", lk, found)  # reported here: _attribute_arrays passes over an array
    if vert is None or frag is None:
        return None
    vdtype = attrs_of(vert).get("dtype", "float32")
    if np.dtype(vdtype).kind != "f":
        found.error(f"{lk}: vertex dtype {vdtype!r} is not a float type")
        return None
    return _LevelArrays(vert, frag, _attribute_arrays(g), vdtype)


def _level_grid(meta: RootMetadata, lm: LevelMetadata, vdtype: str, lk: str, found: _Found) -> Grid | None:
    """§4.2: the level's chunk grid from the root bounds and the level's chunk shape."""
    cs = tuple(lm.chunk_shape) if lm.chunk_shape else meta.chunk_shape
    try:
        return Grid(meta.bounds[0], meta.bounds[1], tuple(map(float, cs)), meta.effective_bin_shape, vdtype)
    except MetadataError as e:
        found.error(f"{lk} grid", str(e))
        return None


def _check_bins(meta: RootMetadata, k: int, bins: dict[int, tuple], found: _Found) -> None:
    """§2.2: a coarse level's bin is no smaller than the base bin or the previous level's."""
    if k not in bins or k == 0:
        return
    ratio = np.asarray(bins[k]) / np.asarray(meta.effective_bin_shape)
    if (ratio < 1 - 1e-9).any():
        found.error(f"level {k}: bins", f"bin {list(bins[k])} is smaller than the base bin")
    if k - 1 in bins and (np.asarray(bins[k]) < np.asarray(bins[k - 1]) * (1 - 1e-9)).any():
        found.error(f"level {k}: bins", f"bin {list(bins[k])} is smaller than level {k - 1}'s {list(bins[k - 1])}")


def _check_array_grids(arrays: _LevelArrays, grid: Grid, lk: str, found: _Found) -> np.ndarray:
    """§4.2: the vertices array has the grid's origin and shape, and every other array the same; the origin."""
    vert = arrays.vertices
    origin = _origin(vert, grid.ndim)
    if tuple(origin) != tuple(grid.origin):
        found.error(f"{lk} grid", f"chunk_grid_origin {origin.tolist()} but the bounds put the first chunk at "
                                  f"{list(grid.origin)}")
    shape = tuple(vert.shape)
    if shape != tuple(grid.shape):
        found.error(f"{lk} grid", f"the vertices array is {list(shape)} cells but the bounds and chunk shape need "
                                  f"{list(grid.shape)}")
    for name, a in arrays.named().items():
        if tuple(a.shape) != shape:
            found.error(f"{lk}: {name} has shape {list(a.shape)}, vertices {list(shape)}")
        if name != "vertices" and tuple(_origin(a, grid.ndim)) != tuple(origin):
            found.error(f"{lk}: {name} has chunk_grid_origin {_origin(a, grid.ndim).tolist()}, vertices "
                        f"{origin.tolist()}")
    return origin


def _array_keys(arr: zarr.Array, ndim: int, what: str, found: _Found) -> list[tuple[int, ...]] | None:
    """§4.1: an array's ``nonempty_chunks``, parsed (``None`` when it has none)."""
    keys = attrs_of(arr).get("nonempty_chunks")
    if keys is None:
        found.error(f"{what} has no 'nonempty_chunks' list")
        return None
    out = []
    for k in keys:
        try:
            c = parse_chunk_key(str(k))
        except (ValueError, MetadataError, FormatError):
            found.error(f"{what}: unparseable chunk key", repr(k))
            continue
        if len(c) != ndim:
            found.error(f"{what}: chunk key with {len(c)} coordinates in a {ndim}-D store", repr(k))
            continue
        out.append(c)
    if len(set(out)) != len(out):
        found.error(f"{what}: 'nonempty_chunks' lists a chunk twice")
    return out


def _origin(arr: zarr.Array, ndim: int) -> np.ndarray:
    return np.asarray(attrs_of(arr).get("chunk_grid_origin", [0] * ndim), np.int64)


def _listed_chunks(arrays: _LevelArrays, origin: np.ndarray, lk: str,
                   found: _Found) -> tuple[np.ndarray, np.ndarray] | None:
    """§4.1, §4.2: the chunks ``vertices`` lists, the same in every array, inside the grid.

    Returns the listed chunks inside the grid and the cells they are stored at.
    """
    ndim = len(origin)
    keys = _array_keys(arrays.vertices, ndim, f"{lk} vertices", found)
    if keys is None:
        return None
    kset = set(keys)
    for name, a in arrays.named().items():
        if name == "vertices":
            continue
        other = _array_keys(a, ndim, f"{lk} {name}", found)
        if other is not None and set(other) != kset:
            miss, extra = kset - set(other), set(other) - kset
            found.error(f"{lk}: {name} lists other chunks than vertices",
                        f"{len(miss)} missing (e.g. {_key(next(iter(miss)))}) " if miss else
                        f"{len(extra)} extra (e.g. {_key(next(iter(extra)))})")
    chunks = np.array(keys, np.int64).reshape(-1, ndim)
    cells = chunks - origin
    shape = np.asarray(arrays.vertices.shape)
    inside = ((cells >= 0) & (cells < shape)).all(axis=1) if len(chunks) else np.zeros(0, bool)
    for c in chunks[~inside]:
        found.error(f"{lk}: chunks outside the array grid", _key(c))
    return chunks[inside], cells[inside]


def _attribute_dtypes(attributes: dict[str, zarr.Array], lk: str, found: _Found) -> dict[str, tuple[str, int | None]]:
    """§4.3: each attribute array declares a bool, integer or float dtype: ``{name: (dtype, channels)}``."""
    specs = {}
    for name, a in attributes.items():
        attrs = attrs_of(a)
        rs = attrs.get("row_shape") or []
        raw = attrs.get("dtype")
        try:
            dt, width = (np.dtype(raw) if raw is not None else None), (int(rs[0]) if rs else None)
        except (TypeError, ValueError):
            dt = None
        if dt is None:
            found.error(f"{lk}: attribute {name!r} has no valid dtype")
        elif dt.kind not in "biuf":
            found.error(f"{lk}: attribute {name!r} is declared {dt.name}, not a bool, integer or float dtype")
        else:
            specs[name] = (dt.name, width)
    return specs


def _check_cells(arrays: _LevelArrays, coords: np.ndarray, cells: np.ndarray, grid: Grid, lm: LevelMetadata,
                 specs: dict[str, tuple[str, int | None]], lk: str, found: _Found, bar: tqdm | None) -> _Chunks:
    """§5: the cells of every listed chunk decode and agree with each other (read ``BATCH`` chunks at a time)."""
    bounds = (np.asarray(grid.bounds_min).astype(grid.dtype).astype(np.float64),
              np.asarray(grid.bounds_max).astype(grid.dtype).astype(np.float64))
    n_chunks = len(coords)
    out = _Chunks(coords, np.zeros(n_chunks, np.int64), np.zeros(n_chunks, np.int64), [None] * n_chunks)
    for start in range(0, n_chunks, BATCH):
        sel = tuple(cells[start:start + BATCH].T)
        vb = _cells_at(arrays.vertices, sel)
        fb = _cells_at(arrays.fragments, sel)
        ab = {name: _cells_at(arrays.attributes[name], sel) for name in specs}
        for j in range(len(vb)):
            i = start + j
            key = _key(coords[i])
            n = _check_vertices_cell(bytes(vb[j]), coords[i], grid, bounds, lk, found)
            if n is None:
                continue
            out.rows[i] = n
            fi = _check_fragments_cell(bytes(fb[j]), n, key, lm, lk, found)
            if fi is None:
                continue
            out.nfrag[i] = fi.num_fragments
            out.fragments[i] = fi
            for name, (dt, ch) in specs.items():
                problem = attribute_size_problem(len(ab[name][j]), n, dt, ch)
                if problem is not None:  # §5.4
                    found.error(f"{lk}: attribute cells that do not match their chunk's rows and declared dtype",
                                f"{name} in chunk {key}: {problem}")
        if bar is not None:
            bar.update(len(vb))
    return out


def _check_vertices_cell(payload: bytes, chunk: np.ndarray, grid: Grid, bounds: tuple[np.ndarray, np.ndarray],
                         lk: str, found: _Found) -> int | None:
    """§5.2, §10: a vertices cell decodes into finite points inside the bounds and the chunk; its rows."""
    key = _key(chunk)
    try:
        pos = decode_vertices(payload, grid.ndim, grid.dtype)
    except FormatError as e:
        found.error(f"{lk}: vertices cells that do not decode", f"{key}: {e}")
        return None
    n = len(pos)
    if n == 0:
        found.warning(f"{lk}: nonempty_chunks lists chunks whose vertices cell is empty", key)
    p64 = pos.astype(np.float64)
    finite = np.isfinite(p64).all(axis=1)
    if not finite.all():
        found.error(f"{lk}: non-finite positions", f"chunk {key} ({int((~finite).sum())} rows)")
    outside = ~((p64 >= bounds[0]) & (p64 <= bounds[1])).all(axis=1) & finite
    if outside.any():
        found.error(f"{lk}: points outside the bounds", f"chunk {key} ({int(outside.sum())} points)")
    if n and finite.all():
        home = grid.chunks_of_bins(grid.base_bins(pos))
        wrong = (home != chunk).any(axis=1)
        if wrong.any():
            found.error(f"{lk}: points stored in a chunk that does not contain them",
                        f"chunk {key} ({int(wrong.sum())} points, e.g. one of chunk {_key(home[wrong][0])})")
    return n


def _check_fragments_cell(payload: bytes, n: int, key: str, lm: LevelMetadata, lk: str,
                          found: _Found) -> FragmentIndex | None:
    """§5.3: a vertex_fragments cell decodes, stays inside the chunk's ``n`` rows and tiles them if claimed."""
    try:
        fi = decode_fragments(payload)
    except FormatError as e:
        found.error(f"{lk}: vertex_fragments cells that do not decode", f"{key}: {e}")
        return None
    rng = fi.counts >= 0
    bad = rng & ((fi.starts < 0) | (fi.starts + fi.counts > n))
    bad_explicit = [f for f, idx in fi.explicit.items() if len(idx) and (idx.min() < 0 or idx.max() >= n)]
    if bad.any() or bad_explicit:
        found.error(f"{lk}: fragments reaching outside their chunk's rows",
                    f"chunk {key} fragment {int(np.flatnonzero(bad)[0]) if bad.any() else bad_explicit[0]}"
                    f" ({n} rows)")
    elif lm.fragments_tile and n and not fi.tiles(n):
        found.error(f"{lk}: fragments do not tile the rows although the level says fragments_tile",
                    f"chunk {key}")
    elif n and not fi.explicit:
        covered = int(fi.counts[rng].sum())
        if covered < n and not lm.fragments_tile:
            found.warning(f"{lk}: rows in no fragment", f"chunk {key} ({n - covered} rows)")
    return fi



def _check_vertex_count(chunks: _Chunks, lm: LevelMetadata, lk: str, found: _Found) -> None:
    """§3: the rows of the level's chunks add up to its ``vertex_count``."""
    total = int(chunks.rows.sum())
    if total != lm.vertex_count:
        found.error(f"{lk}: row counts", f"the chunks hold {total:,} rows but vertex_count is {lm.vertex_count:,}")


# -- object index ------------------------------------------------------------------------
def _check_objects(g: zarr.Group, k: int, ndim: int, chunks: _Chunks, lm: LevelMetadata, found: _Found) -> int | None:
    """§7: the object index's tables agree and its manifests cover the level's rows; the number of objects."""
    lk = f"level {k} object_index"
    oi = g["object_index"]
    if not isinstance(oi, zarr.Group) or "manifests" not in oi:
        found.error(f"{lk}: no 'manifests' array")
        return None
    table = _object_table(oi, lk, found)
    if table is None:
        return None
    ids, blobs = table
    covered, shared, present = _check_manifests(ids, blobs, ndim, chunks, lk, found)
    if shared and not lm.shared_fragments:
        found.warning(f"{lk}: {shared} fragments belong to more than one object but the level does not set "
                      "shared_fragments")
    missing = chunks.rows - np.minimum(covered, chunks.rows)
    if missing.sum():
        found.warning(f"{lk}: rows in no object", f"{int(missing.sum()):,} rows in {int((missing > 0).sum())} chunks "
                                                   f"(e.g. chunk {_key(chunks.coords[np.flatnonzero(missing)[0]])})")
    declared_present = attrs_of(oi).get("num_present")
    if declared_present is not None and int(declared_present) != present:
        found.warning(f"{lk}: num_present is {declared_present} but {present} manifests are non-empty")
    return int(len(ids))


def _object_table(oi: zarr.Group, lk: str, found: _Found) -> tuple[np.ndarray, np.ndarray] | None:
    """§7: one object id per manifest, as many as ``num_objects`` says, unique (and ascending if so declared)."""
    manifests = _array_at(oi, "manifests", lk, found)
    id_array = _array_at(oi, "object_ids", lk, found) if "object_ids" in oi else None
    if manifests is None or ("object_ids" in oi and id_array is None):
        return None
    blobs = np.asarray(manifests[:])
    ids = np.asarray(id_array[:], np.int64) if id_array is not None else np.arange(len(blobs), dtype=np.int64)
    if len(ids) != len(blobs):
        found.error(f"{lk}: {len(ids)} object ids for {len(blobs)} manifests")
        return None
    attrs = attrs_of(oi)
    declared = attrs.get("num_objects")
    if declared is not None and int(declared) != len(ids):
        found.error(f"{lk}: num_objects is {declared} but there are {len(ids)} manifests")
    if len(ids) > 1 and attrs.get("object_ids_sorted") and not (np.diff(ids) > 0).all():
        found.error(f"{lk}: object_ids_sorted is set but the ids are not strictly ascending")
    elif len(np.unique(ids)) != len(ids):
        found.error(f"{lk}: object ids repeat")
    return ids, blobs


def _check_manifests(ids: np.ndarray, blobs: np.ndarray, ndim: int, chunks: _Chunks, lk: str,
                     found: _Found) -> tuple[np.ndarray, int, int]:
    """§7: every manifest decodes and names listed chunks and their fragments.

    Returns the rows each chunk has in some object, how many fragments a second
    object names, and how many manifests are non-empty.
    """
    index = {tuple(int(v) for v in c): i for i, c in enumerate(chunks.coords)}
    owner: dict[tuple[int, int], int] = {}
    shared = 0
    covered = np.zeros(len(chunks.coords), np.int64)
    present = 0
    for oid, blob in zip(ids.tolist(), blobs):
        try:
            ch, fr = decode_manifest(bytes(blob), ndim)
        except FormatError as e:
            found.error(f"{lk}: manifests that do not decode", f"object {oid}: {e}")
            continue
        present += bool(len(fr))
        for c, f in zip(map(tuple, ch.tolist()), fr.tolist()):
            i = index.get(c)
            if i is None:
                found.error(f"{lk}: manifests naming chunks that are not in nonempty_chunks",
                            f"object {oid} -> chunk {_key(c)}")
                continue
            if not 0 <= f < chunks.nfrag[i]:
                found.error(f"{lk}: manifests naming fragments a chunk does not have",
                            f"object {oid} -> chunk {_key(c)} fragment {f} (the chunk has {chunks.nfrag[i]})")
                continue
            prev = owner.setdefault((i, f), oid)
            if prev != oid:
                shared += 1
                continue
            fi = chunks.fragments[i]
            if fi is not None:
                covered[i] += fi.counts[f] if fi.counts[f] >= 0 else len(fi.explicit.get(f, ()))
    return covered, shared, present


# -- cross-level links -------------------------------------------------------------------
# what a check raises on a value of the wrong type where the format wants a number, a dtype or a list
_UNREADABLE = (TypeError, ValueError, KeyError, IndexError, OverflowError)


def _check_links(zs: ZVStore, infos: dict[int, dict], found: _Found) -> None:
    """§9: every level's link families, and the families the root's ``cross_level_storage`` promises."""
    meta = zs.metadata
    any_links = False
    for k in sorted(infos):
        g = _group_at(zs.root, str(k), f"level {k}", found)
        if g is None:
            continue
        if "links" not in g:
            _check_declared_links(meta, k, infos, found)
            continue
        links = _group_at(g, "links", f"level {k}", found)
        if links is None:
            continue
        for name, fam in sorted(links.groups()):
            any_links = True
            try:
                _check_link_family(zs, k, name, fam, infos, found)
            except _UNREADABLE as e:
                found.error(f"level {k} links {name}: metadata the checks cannot read", f"{type(e).__name__}: {e}")
    if any_links and meta.cross_level_storage == "none":
        found.warning("the root declares cross_level_storage 'none' but levels hold cross-level links")


def _check_declared_links(meta: RootMetadata, k: int, infos: dict[int, dict], found: _Found) -> None:
    """§9: a level without links where the root declares them (``+1`` to a next level; ``-1`` if explicit)."""
    if meta.cross_level_storage == "none" or int(meta.cross_level_depth) <= 0:
        return
    if k + 1 in infos:
        found.warning(f"level {k}: the root declares {meta.cross_level_storage} cross-level links "
                      f"but the level has no links/+1")
    if meta.cross_level_storage == "explicit" and k > 0 and k - 1 in infos:
        found.warning(f"level {k}: the root declares explicit cross-level links but the level has no "
                      f"links/-1")


def _check_link_family(zs: ZVStore, k: int, name: str, fam: zarr.Group, infos: dict[int, dict],
                       found: _Found) -> None:
    """§9: the family ``<k>/links/<name>``: its name, attributes, offsets arrays, record count and records."""
    ndim = zs.metadata.ndim
    lk = f"level {k} links/{name}"
    try:
        delta = int(name)
    except ValueError:
        found.error(f"level {k}: a links family named {name!r} (expected +N or -N)")
        return
    if k + delta not in infos:
        found.error(f"{lk}: links to level {k + delta}, which the store does not have")
        return
    a = attrs_of(fam)
    if a.get("level_delta") != delta or a.get("link_width") != 2 or a.get("sid_ndim") != ndim:
        found.error(f"{lk}: family attributes", f"level_delta {a.get('level_delta')}, link_width "
                                                f"{a.get('link_width')}, sid_ndim {a.get('sid_ndim')}")
    for seg, arr in sorted(fam.arrays()):
        try:
            off = parse_offset_segment(seg)
        except FormatError as e:
            found.error(f"{lk}: offsets arrays with a malformed name", str(e))
            continue
        if len(off) != ndim or attrs_of(arr).get("offsets") != [list(off)]:
            found.error(f"{lk}: offsets arrays whose attributes disagree with their name",
                        f"{seg}: offsets {attrs_of(arr).get('offsets')}")
    try:
        rec = read_links(zs, k, delta)
    except (FormatError, MetadataError, ValueError) as e:
        found.error(f"{lk}: cells that do not decode", str(e))
        return
    n = len(rec["src_vi"])
    for key in ("num_links", "num_physical_records"):
        if key in a and int(a[key]) != n:
            found.error(f"{lk}: record counts", f"{key} is {a[key]:,} but the cells hold {n:,} records")
    _check_link_records(rec, k, delta, infos, lk, found)


def _check_link_records(rec: dict[str, np.ndarray], k: int, delta: int, infos: dict[int, dict], lk: str,
                        found: _Found) -> None:
    """§9: both ends of every record name a row of a listed chunk; a ``+1`` family gives each vertex one parent."""
    for side, level in (("src", k), ("dst", k + delta)):
        if "_chunks" not in infos.get(level, {}):
            continue  # a level without its vertex arrays (an error already): no rows to check against
        pos = locate_chunks(infos[level]["_chunks"], rec[f"{side}_chunk"])
        have = np.full(len(pos), -1, np.int64)  # rows of each record's chunk, -1: no such chunk
        have[pos >= 0] = infos[level]["_rows"][pos[pos >= 0]]
        vi = rec[f"{side}_vi"]
        if (have < 0).any():
            found.error(f"{lk}: records naming a chunk level {level} does not have",
                        f"chunk {_key(rec[f'{side}_chunk'][np.argmax(have < 0)])}", int((have < 0).sum()))
        bad = (have >= 0) & ((vi < 0) | (vi >= have))
        if bad.any():
            found.error(f"{lk}: records naming a row past the end of its chunk",
                        f"row {int(vi[bad][0])} of chunk {_key(rec[f'{side}_chunk'][bad][0])}", int(bad.sum()))
    n = len(rec["src_vi"])
    if delta == 1 and n:
        sources = np.concatenate([rec["src_chunk"], rec["src_vi"][:, None]], axis=1)
        uniq = len(np.unique(sources, axis=0))
        if uniq != n:
            found.warning(f"{lk}: vertices with more than one parent", n=n - uniq)
        if uniq != infos[k]["rows"]:
            found.warning(f"{lk}: vertices without a parent", n=infos[k]["rows"] - uniq)


# -- entry point -------------------------------------------------------------------------
def _progress_bar(zs: ZVStore, levels: list[int]) -> tqdm:
    """A bar over the chunks the levels' ``vertices`` list (on stderr)."""
    from tqdm import tqdm

    total = 0
    for k in levels:
        try:
            total += len(attrs_of(zs.root[f"{k}/vertices"]).get("nonempty_chunks", []))
        except KeyError:
            pass
    return tqdm(total=total, desc="validate: decoding chunks", unit="chunk", file=sys.stderr)


def _label(store, zs: ZVStore | None) -> str:
    if zs is not None and zs.url:
        return str(zs.url)
    if isinstance(store, str):
        return store
    if isinstance(store, os.PathLike):
        return os.fspath(store)
    return type(store).__name__


def validate_store(store: StoreLike, *, backend: str | None = None, storage_options: dict | None = None,
                   branch: str = "main", progress: bool = False) -> ValidationReport:
    """Check a ZV store's structure and consistency; never raises on what it finds.

    Parameters
    ----------
    store
        A :class:`~zv_dask.ZVStore`, or anything :func:`~zv_dask.open_store`
        opens (path, URL, zarr Store, icechunk Repository/Session; pass
        ``backend="icechunk"`` for an icechunk repository path or URL).
    progress
        Show a progress bar over the chunks (on stderr).

    Returns
    -------
    ValidationReport
        ``errors`` and ``warnings`` (each problem kind once, with a count and
        the first few examples), per-level counts, and how many chunks were
        checked. ``ok`` is true when there is no error.

    Raises
    ------
    StoreError
        Only when there is no ZV store at all to check (missing path, no zarr
        group, no ``zarr_vectors`` block).
    """
    t0 = time.perf_counter()
    found = _Found()
    try:
        with warnings.catch_warnings():  # reported below as an error
            warnings.simplefilter("ignore", UnfinishedJobWarning)
            zs = as_store(store, "r", backend=backend, storage_options=storage_options, branch=branch)
    except MetadataError as e:
        report = ValidationReport(_label(store, None), errors=[f"root metadata does not parse: {e}"])
        report.seconds = time.perf_counter() - t0
        return report
    report = ValidationReport(_label(store, zs))
    if zs.unfinished_job:
        found.error("unfinished job", zs.unfinished_job)
    levels = list_resolution_levels(zs)
    bins = _check_root(zs, found, levels)
    if not levels or levels[0] != 0:
        found.error("levels", f"the store has no level 0 (level groups: {levels})")
    elif levels != list(range(len(levels))):
        found.error("levels", f"levels are not contiguous from 0: {levels}")
    bar = _progress_bar(zs, levels) if progress else None
    infos: dict[int, dict] = {}
    try:
        prev = None
        for k in levels:
            try:
                info = _check_level(zs, k, bins, found, bar)
            except _UNREADABLE as e:  # a value no check expected (a dtype numpy cannot read, a count of text)
                found.error(f"level {k}: metadata the checks cannot read", f"{type(e).__name__}: {e}")
                continue
            if info is None:
                continue
            infos[k] = info
            report.levels.append({kk: v for kk, v in info.items() if not kk.startswith("_")})
            report.chunks_checked += info["chunks"]
            if prev is not None and info["vertex_count"] > prev["vertex_count"]:
                found.error("vertex counts grow with the level",
                            f"level {k} has {info['vertex_count']:,}, level {prev['level']} "
                            f"{prev['vertex_count']:,}")
            prev = info
        _check_links(zs, infos, found)
    finally:
        if bar is not None:
            bar.close()
    report.errors = found.render("error")
    report.warnings = found.render("warning")
    report.seconds = time.perf_counter() - t0
    return report

