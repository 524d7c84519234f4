"""Reading and writing the cells and metadata of one level.

Three steps, so that a distributed job can run the middle one on workers:

1. :func:`prepare_level` creates the level group and its arrays (empty
   ``nonempty_chunks``) from the coordinator;
2. :func:`write_chunk_payloads` writes encoded chunks through any zarr store
   (a worker's own store, or an icechunk fork's) and returns a
   :class:`ChunkSummary`;
3. :func:`finalize_level` writes ``nonempty_chunks``, the level metadata and the
   object index from the gathered summaries, last, so that a reader never sees a
   level claim data it does not have.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.core.metadata import ArrayV3Metadata

from zv_dask.errors import FormatError, MetadataError
from zv_dask.format.cells import (
    EMPTY_MANIFEST,
    decode_attribute,
    decode_fragments,
    decode_vertices,
    encode_manifests,
)
from zv_dask.format.codecs import direct_codec
from zv_dask.format.grid import Grid, chunk_keys, parse_chunk_key
from zv_dask.format.layout import ChunkPayload, encode_plan, plan_chunks
from zv_dask.format.metadata import LevelMetadata, attribute_attrs, fragments_attrs, vertices_attrs
from zv_dask.store.cellio import cell_keys, get_cells, put_cells
from zv_dask.store.nodes import (
    array_at,
    attr_dict,
    attrs_of,
    create_vlen_arrays,
    group_at,
    update_node_attrs,
    v3_metadata,
    vlen_bytes,
)
from zv_dask.store.objects import object_entries, row_object_ids

if TYPE_CHECKING:
    from zv_dask.store.api import ZVStore

__all__ = [
    "AttributeSpec",
    "ChunkSummary",
    "prepare_level",
    "LevelCells",
    "level_cells",
    "payload_targets",
    "write_chunk_payloads",
    "write_cells",
    "finalize_level",
    "read_chunks",
    "read_payloads",
    "read_level",
    "write_level_points",
    "level_chunk_keys",
]


@dataclass(frozen=True)
class AttributeSpec:
    """A per-vertex attribute: numpy dtype and channel count (``None`` for ``(N,)``)."""

    name: str
    dtype: str
    channels: int | None = None
    unit: str | None = None
    description: str | None = None

    @classmethod
    def of(cls, name: str, values) -> AttributeSpec:
        v = np.asarray(values) if not hasattr(values, "dtype") else values
        if v.dtype.kind not in "biuf":
            raise MetadataError(f"attribute {name!r} has dtype {v.dtype}; only bool, integer and float attributes "
                                "are stored (encode categories as integer codes)")
        if len(v.shape) not in (1, 2):
            raise MetadataError(f"attribute {name!r} must be (N,) or (N, C), got shape {tuple(v.shape)}")
        return cls(name, np.dtype(v.dtype).name, int(v.shape[1]) if len(v.shape) == 2 else None)


@dataclass
class ChunkSummary:
    """What a write task reports back: per chunk its key and row count, plus object manifest entries."""

    chunks: np.ndarray  # (M, D) int64 absolute chunk coordinates
    rows: np.ndarray  # (M,) int64 vertex rows per chunk
    object_ids: np.ndarray | None = None  # (K,) object id of every (chunk, fragment) entry
    object_chunks: np.ndarray | None = None  # (K, D)
    object_fragments: np.ndarray | None = None  # (K,)
    bytes_written: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan, bytes_written: int = 0) -> ChunkSummary:
        """Summary of a written :class:`~zv_dask.format.layout.ChunkPlan` (with its object entries)."""
        out = cls(plan.chunks, np.diff(plan.row_splits), bytes_written=bytes_written)
        if plan.fragment_objects is not None:
            frag_chunk = np.repeat(np.arange(plan.n_chunks), np.diff(plan.frag_splits))
            out.object_ids = plan.fragment_objects
            out.object_chunks = plan.chunks[frag_chunk].reshape(-1, plan.chunks.shape[1])
            out.object_fragments = np.arange(len(plan.fragment_counts)) - plan.frag_splits[frag_chunk]
        return out

    @property
    def objects(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The object entries ``(object ids, chunks, fragments)``, or ``None`` (a level without objects)."""
        if self.object_ids is None or self.object_chunks is None or self.object_fragments is None:
            return None
        return self.object_ids, self.object_chunks, self.object_fragments

    @staticmethod
    def concat(parts: list[ChunkSummary], ndim: int) -> ChunkSummary:
        parts = [p for p in parts if p is not None]
        chunks = np.concatenate([p.chunks for p in parts]) if parts else np.zeros((0, ndim), np.int64)
        rows = np.concatenate([p.rows for p in parts]) if parts else np.zeros(0, np.int64)
        with_obj = [p for p in parts if p.object_ids is not None]
        oid: np.ndarray | None = None
        och: np.ndarray | None = None
        ofr: np.ndarray | None = None
        if with_obj:
            oid = np.concatenate([p.object_ids for p in with_obj])
            och = np.concatenate([p.object_chunks for p in with_obj]).reshape(-1, ndim)
            ofr = np.concatenate([p.object_fragments for p in with_obj])
        return ChunkSummary(chunks.reshape(-1, ndim), rows, oid, och, ofr, sum(p.bytes_written for p in parts))


def prepare_level(root: zarr.Group, level: int, grid: Grid, attributes: list[AttributeSpec], *,
                  shards=None, compressors=None) -> zarr.Group:
    """(Re)create the arrays of a level with empty presence lists."""

    g = root.require_group(str(level))
    for name in list(g.keys()):
        if name in ("vertices", "vertex_fragments", "vertex_attributes", "object_index", "links"):
            del g[name]
    kw = dict(shards=shards, compressors=compressors)
    create_vlen_arrays(g, grid, [("vertices", vertices_attrs(grid.dtype, [], grid.origin)),
                                 ("vertex_fragments", fragments_attrs([], grid.origin))], **kw)
    if attributes:
        va = g.create_group("vertex_attributes")
        create_vlen_arrays(va, grid, [(spec.name, attribute_attrs(spec.name, spec.dtype, spec.channels, [], grid.origin,
                                                                  spec.unit, spec.description))
                                      for spec in attributes], **kw)
    return g


def _object_array(values: list[bytes]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _direct(arr: zarr.Array):
    """How zv-dask moves this array's cells itself (:func:`~zv_dask.format.codecs.direct_codec`: ``"plain"`` or
    ``("zstd", level, checksum)``), or ``None`` when zarr's codec pipeline must (sharding, blosc, another key
    encoding)."""
    return _direct_metadata(arr.metadata)


def _direct_metadata(md) -> Any:
    """:func:`_direct` of an array's metadata."""
    if not isinstance(md, ArrayV3Metadata):  # a zarr v2 array (no ZV store has one): zarr's pipeline
        return None
    shape = getattr(md.chunk_grid, "chunk_shape", None)  # a regular grid's; the shard's when sharded
    if shape is None or tuple(shape) != (1,) * md.ndim:  # one frame per object holds one cell only
        return None
    enc: dict[str, Any] = md.chunk_key_encoding.to_dict()
    if enc.get("name") != "default" or enc.get("configuration", {}).get("separator", "/") != "/":
        return None
    return direct_codec([c.to_dict() for c in md.codecs])


_HOW: dict[bytes, tuple] = {}  # zarr.json bytes -> (how, chunk key encoding)


def _how_to_write(zstore, path: str, document: bytes | None):
    """``(how, chunk key encoding, array)``: how :func:`write_cells` writes an array's cells.

    The decision comes from the array's ``zarr.json`` (``document``, read by the caller with
    every other target's in one batch), parsed once per distinct document: opening each array
    with zarr in every write task cost 0.7 s of the 10 s a 1e7-point LAS ingest spent on one
    core here (cProfile: about 1.8 ms an array, 384 arrays). ``array`` is the opened zarr array when zarr's
    codec pipeline must write (else ``None``); a missing document is zarr's error to raise.
    """
    if document is not None:
        hit = _HOW.get(document)
        if hit is None:
            import json

            try:
                md = ArrayV3Metadata.from_dict(json.loads(document))
            except Exception:  # noqa: BLE001 - not a v3 array document: zarr says what it is below
                md = None
            hit = (_direct_metadata(md), getattr(md, "chunk_key_encoding", None))
            if len(_HOW) > 1024:
                _HOW.clear()
            _HOW[document] = hit
        if hit[0] is not None:
            return hit[0], hit[1], None
    arr = zarr.open_array(zstore, path=path, mode="r+", zarr_format=3)
    how = _direct(arr)
    return how, (v3_metadata(arr).chunk_key_encoding if how is not None else None), arr


_ZSTD: dict = {}


def _zstd(level: int, checksum: bool):
    """The numcodecs ``Zstd`` zarr's ``ZstdCodec`` uses for these settings (so the bytes are zarr's)."""
    key = (level, checksum)
    if key not in _ZSTD:
        from numcodecs import Zstd

        _ZSTD[key] = Zstd(level=level, checksum=checksum)
    return _ZSTD[key]


def encode_frame(payload, how) -> tuple | bytes:
    """The stored object of a cell: its frame as buffers (``"plain"``) or the frame compressed whole (zstd)."""
    parts = frame_parts(payload)
    if how == "plain":
        return parts
    return bytes(_zstd(how[1], how[2]).encode(b"".join(parts)))


def decode_frame(obj, how) -> bytes:
    """The payload of a stored cell object (``b""`` for a missing one)."""
    if obj is None:
        return b""
    if how != "plain":
        obj = bytes(_zstd(how[1], how[2]).decode(obj))
    return unframe(obj)


_FRAME_HEADER = struct.Struct("<II")


def payload_parts(payload) -> tuple:
    """A payload (bytes, a flat memoryview, or a tuple of such) as a tuple of buffers."""
    return payload if isinstance(payload, tuple) else (payload,)


def payload_size(payload) -> int:
    """Bytes in a payload (its buffers are flat: ``len`` is their size)."""
    return sum(len(p) for p in payload_parts(payload))


def frame_parts(payload) -> tuple:
    """The vlen-bytes frame of a payload as buffers (frame header first), without joining them."""
    parts = payload_parts(payload)
    return (_FRAME_HEADER.pack(1, sum(len(p) for p in parts)),) + parts


def payload_targets(level: int, grid: Grid, payloads: list[ChunkPayload], attributes: list[AttributeSpec]) -> list:
    """The :func:`write_cells` targets of encoded chunks: vertices, fragments and one per declared attribute.

    ``attributes`` are the level's attribute arrays as they were created. Every
    attribute cell must hold exactly ``rows x channels x itemsize`` bytes of its
    declaration, whatever made the payload: a :class:`FormatError` (naming the
    level, attribute, chunk and sizes) rather than a cell a reader cannot decode.
    A length per cell, so no write path (plain frames PUT directly, or zarr's
    codecs) can store an attribute cell of another width.
    """
    cells = grid.cells(np.array([p.chunk for p in payloads], np.int64).reshape(len(payloads), grid.ndim))
    targets = [(f"{level}/vertices", cells, [p.vertices for p in payloads]),
               (f"{level}/vertex_fragments", cells, [p.fragments for p in payloads])]
    for spec in attributes:
        row = np.dtype(spec.dtype).itemsize * (spec.channels or 1)
        values = []
        for p in payloads:
            v = p.attributes.get(spec.name)
            if v is None:
                raise FormatError(f"level {level} chunk {'.'.join(map(str, p.chunk))}: no cell for attribute "
                                  f"{spec.name!r}; the chunk's payload holds {sorted(p.attributes)}")
            nbytes = payload_size(v)
            if nbytes != p.n_rows * row:
                raise FormatError(f"level {level} chunk {'.'.join(map(str, p.chunk))}: attribute {spec.name!r} is "
                                  f"declared {spec.dtype} x {spec.channels or 1} ({row} bytes a row) but its cell "
                                  f"holds {nbytes} bytes for {p.n_rows} rows")
            values.append(v)
        targets.append((f"{level}/vertex_attributes/{spec.name}", cells, values))
    return targets


def write_chunk_payloads(zstore, level: int, grid: Grid, payloads: list[ChunkPayload],
                         attributes: list[AttributeSpec]) -> int:
    """Write the cells of ``payloads`` into level ``level`` of the store; returns payload bytes written.

    ``attributes`` are the level's :class:`AttributeSpec` (see :func:`payload_targets`).
    See :func:`write_cells`; chunks of one shard must all be in one call.
    """
    if not payloads:
        return 0
    return write_cells(zstore, payload_targets(level, grid, payloads, attributes))


def write_cells(zstore, targets: list[tuple[str, np.ndarray, list[bytes]]], *, plain: bool | None = None) -> int:
    """Write one-item vlen cells: ``targets`` holds ``(array path, grid cells (N, D), payloads)``.

    Arrays whose pipeline zv-dask can encode itself (plain ``vlen-bytes``, or
    ``vlen-bytes`` + ``zstd``: the frame compressed whole, zarr's bytes) get their
    cell objects PUT directly, all arrays and cells in one concurrent batch (the
    store's own atomic put); blosc or sharded arrays go through zarr's codec
    pipeline. ``plain=True`` says every target is a plain array without opening
    it (its ``zarr.json`` may not exist yet). Returns the payload bytes written.
    """
    total = 0
    direct: list[tuple[str, tuple | bytes]] = []
    targets = [t for t in targets if len(t[2])]
    documents = [None] * len(targets) if plain else get_cells(
        zstore, [f"{path.strip('/')}/zarr.json" for path, _, _ in targets])
    for (path, cells, values), document in zip(targets, documents):
        how, encoding, arr = ("plain", None, None) if plain else _how_to_write(zstore, path, document)
        total += sum(payload_size(v) for v in values)
        if how is not None:
            keys = cell_keys(path, cells, encoding)
            direct.extend((k, encode_frame(v, how)) for k, v in zip(keys, values))
        else:
            assert arr is not None, "plain=True targets have their cells moved directly"
            joined = [b"".join(payload_parts(v)) for v in values]
            arr.set_coordinate_selection(tuple(np.asarray(cells).T), _object_array(joined))
    put_cells(zstore, direct)
    return total


def _sorted_keys(chunks: np.ndarray) -> list[str]:
    return sorted(chunk_keys(chunks))


def finalize_level(root: zarr.Group, level: int, grid: Grid, summary: ChunkSummary, meta: LevelMetadata,
                   attributes: list[AttributeSpec], all_object_ids: np.ndarray | None = None,
                   vertex_count: int | None = None) -> LevelMetadata:
    """Write presence lists, the object index and the level metadata (in that order).

    ``all_object_ids`` lists every object the index must have a row for (a
    coarse level keeps its parent's objects; absent ones get empty manifests).
    ``vertex_count`` is the level's when ``summary`` holds only presence (an
    append, which knows the chunks it did not touch but not their rows).
    """

    g = group_at(root, str(level))
    keys = _sorted_keys(summary.chunks[summary.rows > 0]) if len(summary.chunks) else []
    origin = grid.origin
    base = g.path
    updates = {f"{base}/vertices": vertices_attrs(grid.dtype, keys, origin),
               f"{base}/vertex_fragments": fragments_attrs(keys, origin)}
    for spec in attributes:
        updates[f"{base}/vertex_attributes/{spec.name}"] = attribute_attrs(
            spec.name, spec.dtype, spec.channels, keys, origin, spec.unit, spec.description)
    update_node_attrs(g.store, updates)
    present = ["vertices", "vertex_fragments"] + (["vertex_attributes"] if attributes else [])
    if summary.object_ids is not None:
        write_object_index(g, summary, grid.ndim, all_ids=all_object_ids)
        present.append("object_index")
    if vertex_count is not None:
        meta.vertex_count = int(vertex_count)
    else:
        meta.vertex_count = int(summary.rows.sum()) if len(summary.rows) else 0
    meta.arrays_present = present
    update_node_attrs(g.store, {base: meta.to_dict()})
    return meta


def _level_compressors(g: zarr.Group):
    """The compressors of a level's ``vertices`` array (``None``: uncompressed, or no such array)."""
    try:
        return tuple(array_at(g, "vertices").compressors) or None
    except Exception:  # noqa: BLE001 - no vertices array (or one zarr cannot describe): the defaults
        return None


def write_object_index(g: zarr.Group, summary: ChunkSummary, ndim: int, all_ids: np.ndarray | None = None) -> None:
    """``object_index`` (layout ``vlen_manifests_v2``): one manifest per object, ids ascending.

    ``all_ids`` lists every object that should get a row (objects absent from this
    level get the empty manifest); by default the ids present.
    """
    oid = np.asarray(summary.object_ids, np.int64)
    och = np.asarray(summary.object_chunks, np.int64).reshape(-1, ndim)
    ofr = np.asarray(summary.object_fragments, np.int64)
    ids = np.unique(oid) if all_ids is None else np.unique(np.asarray(all_ids, np.int64))
    if len(ids) > 1 << 26:
        raise MetadataError(f"{len(ids)} objects exceed the object index limit of 2**26 rows")
    order = np.lexsort(tuple([ofr] + [och[:, d] for d in range(ndim - 1, -1, -1)] + [oid]))
    rows = np.searchsorted(ids, oid[order])
    blobs = encode_manifests(rows, och[order], ofr[order], len(ids))
    n = max(len(ids), 1)
    chunk = min(16384, n)
    if "object_index" in g:
        del g["object_index"]
    oi = g.create_group("object_index")
    # a compressed level's index takes its codecs; else the reference's (manifests zstd 0, ids uncompressed)
    comp = _level_compressors(g)
    with vlen_bytes():
        m = oi.create_array("manifests", shape=(len(ids),), chunks=(chunk,), dtype="bytes", fill_value=b"",
                            **({"compressors": comp} if comp else {}))
    ia = oi.create_array("object_ids", shape=(len(ids),), chunks=(chunk,), dtype="int64", fill_value=0,
                         compressors=comp or None)
    if len(ids):
        m[:] = _object_array(blobs)
        ia[:] = ids
    oi.attrs.update({"zv_array": "object_index", "num_objects": int(len(ids)),
                     "num_present": int(sum(1 for b in blobs if b != EMPTY_MANIFEST)),
                     "sid_ndim": int(ndim), "layout": "vlen_manifests_v2", "object_ids_sorted": True})


# -- reading --------------------------------------------------------------------------
def level_grid(root: zarr.Group, level: int) -> Grid:
    """The :class:`Grid` of a level, from the root and level attributes alone."""
    zv = attr_dict(root, "zarr_vectors")
    lvl = attr_dict(group_at(root, str(level)), "zarr_vectors_level", {})
    cs = tuple(lvl.get("chunk_shape") or zv["chunk_shape"])
    base = tuple(zv.get("base_bin_shape") or zv["chunk_shape"])
    dtype = attrs_of(array_at(root, f"{level}/vertices")).get("dtype", "float32")
    return Grid(tuple(zv["bounds"][0]), tuple(zv["bounds"][1]), cs, base, dtype)


def level_chunk_keys(level_group: zarr.Group) -> list[str]:
    return list(attrs_of(array_at(level_group, "vertices")).get("nonempty_chunks", []))


@dataclass
class ChunkData:
    """Decoded cells of one chunk."""

    chunk: tuple[int, ...]
    positions: np.ndarray
    fragment_starts: np.ndarray
    fragment_counts: np.ndarray
    attributes: dict[str, np.ndarray]


def _attr_arrays(g: zarr.Group, names) -> dict[str, zarr.Array]:
    if "vertex_attributes" not in g:
        if names:
            raise MetadataError(f"level has no vertex attributes; asked for {list(names)}")
        return {}
    arrays = dict(group_at(g, "vertex_attributes").arrays())
    if names is None:
        return arrays
    missing = [n for n in names if n not in arrays]
    if missing:
        raise MetadataError(f"attributes {missing} are not in this level; it has {sorted(arrays)}")
    return {n: arrays[n] for n in names}


def unframe(frame) -> bytes:
    """Payload of a one-item vlen-bytes frame (``b""`` for a missing cell)."""
    if frame is None:
        return b""
    count, n = np.frombuffer(frame[:8], "<u4")
    if count != 1 or len(frame) != 8 + int(n):
        raise FormatError(f"cell frame holds {int(count)} items / {len(frame)} bytes; expected one item of {int(n)}")
    return frame[8:]


def _read_cells(zstore, arr: zarr.Array, cells: np.ndarray) -> list:
    """Payload bytes of the given cells: straight from the store when zv-dask can decode the array's cells
    itself (plain or zstd vlen arrays, see :func:`write_cells`), else through zarr."""
    how = _direct(arr)
    if how is not None:
        keys = cell_keys(arr.path, cells, v3_metadata(arr).chunk_key_encoding)
        return [decode_frame(f, how) for f in get_cells(zstore, keys)]
    return list(np.asarray(arr.get_coordinate_selection(tuple(cells.T))))


def read_payloads(zstore, arr: zarr.Array, chunks: np.ndarray) -> list[bytes]:
    """The payloads of an array's cells at absolute ``chunks`` (``b""`` where a cell is missing)."""
    if not len(chunks):
        return []
    chunks = np.asarray(chunks, np.int64).reshape(len(chunks), -1)
    origin = np.asarray(attrs_of(arr).get("chunk_grid_origin", [0] * chunks.shape[1]), np.int64)
    return [bytes(p) if p is not None else b"" for p in _read_cells(zstore, arr, chunks - origin)]


@dataclass(frozen=True)
class LevelCells:
    """What reading a level's cells takes from its metadata, opened once and then passed to every read.

    ``arrays`` maps ``"vertices"``, ``"vertex_fragments"`` and each attribute
    name to ``(array path, how its cells are moved, dtype, channels)``; ``how``
    is ``None`` where zarr's own pipeline must read them (sharding, blosc).
    Opening the metadata costs a few milliseconds per array; a read task of
    one chunk would otherwise spend most of its time on it.
    """

    level: int
    dtype: str
    origin: tuple
    arrays: dict


def level_cells(zstore, level: int, attributes=None) -> LevelCells:
    """The :class:`LevelCells` of a level for reads of ``attributes`` (``None``: all of them)."""
    root = zarr.open_group(zstore, mode="r", zarr_format=3)
    g = group_at(root, str(level))
    vert, frags = array_at(g, "vertices"), array_at(g, "vertex_fragments")
    arrays = {"vertices": (vert.path, _direct(vert), None, None),
              "vertex_fragments": (frags.path, _direct(frags), None, None)}
    for n, a in _attr_arrays(g, attributes).items():
        a_attrs = attrs_of(a)
        rs = a_attrs.get("row_shape") or []
        arrays[n] = (a.path, _direct(a), a_attrs["dtype"], rs[0] if rs else None)
    v_attrs = attrs_of(vert)
    origin = tuple(int(v) for v in v_attrs.get("chunk_grid_origin", [0] * len(vert.shape)))
    return LevelCells(level, v_attrs.get("dtype", "float32"), origin, arrays)


def _payloads(zstore, cells: LevelCells, names: list[str], idx: np.ndarray) -> dict[str, list]:
    """The payloads of the grid cells ``idx`` of each named array: the direct ones in one batch of gets."""
    keys: list[str] = []
    spans: dict[str, tuple[int, tuple | str]] = {}
    out: dict[str, list] = {}
    tails = ["/".join(map(str, c)) for c in idx.tolist()]
    for n in names:
        path, how = cells.arrays[n][:2]
        if how is None:
            arr = zarr.open_array(zstore, path=path, mode="r", zarr_format=3)
            out[n] = list(np.asarray(arr.get_coordinate_selection(tuple(idx.T))))
        else:
            spans[n] = (len(keys), how)
            keys.extend(f"{path}/c/{t}" for t in tails)
    if keys:
        got = get_cells(zstore, keys)
        for n, (start, how) in spans.items():
            out[n] = [decode_frame(f, how) for f in got[start:start + len(tails)]]
    return out


def read_chunks(zstore, level: int, chunks: np.ndarray, attributes=None, *, ndim: int,
                cells: LevelCells | None = None) -> list[ChunkData]:
    """Read and decode the cells of the given absolute chunks (all must be non-empty).

    ``cells`` (from :func:`level_cells`, for these ``attributes``) saves opening the level's metadata.
    """
    chunks = np.asarray(chunks, np.int64).reshape(-1, ndim)
    if not len(chunks):
        return []
    if cells is None:
        cells = level_cells(zstore, level, attributes)
    names = [n for n in cells.arrays if n not in ("vertices", "vertex_fragments")]
    if attributes is not None:
        missing = [n for n in attributes if n not in cells.arrays]
        if missing:
            raise MetadataError(f"attributes {missing} are not in this level; it has {sorted(names)}")
        names = list(attributes)
    got = _payloads(zstore, cells, ["vertices", "vertex_fragments"] + names,
                    chunks - np.asarray(cells.origin, np.int64))
    out = []
    for i, c in enumerate(chunks):
        pos = decode_vertices(bytes(got["vertices"][i]), ndim, cells.dtype)
        frag = decode_fragments(bytes(got["vertex_fragments"][i]))
        attrs = {}
        for n in names:
            _, _, dtype, channels = cells.arrays[n]
            attrs[n] = decode_attribute(bytes(got[n][i]), dtype, len(pos), channels)
        out.append(ChunkData(tuple(int(x) for x in c), pos, frag.starts, frag.counts, attrs))
    return out


def read_level(zstore, level: int, *, bbox=None, attributes=None, ndim: int | None = None,
               with_object_ids: bool = False) -> dict:
    """Read a whole level (or the points inside the closed box ``bbox=(lo, hi)``) into numpy."""
    root = zarr.open_group(zstore, mode="r", zarr_format=3)
    if ndim is None:
        ndim = len(attr_dict(root, "zarr_vectors")["chunk_shape"])
    g = group_at(root, str(level))
    keys = level_chunk_keys(g)
    chunks = np.array([parse_chunk_key(k) for k in keys], np.int64).reshape(-1, ndim)
    if bbox is not None:
        grid = level_grid(root, level)
        touch = grid.chunks_touching(*bbox)
        if len(touch) and len(chunks):
            keep = np.isin(grid.cell_ids(chunks), grid.cell_ids(touch))
        else:
            keep = np.zeros(len(chunks), bool)
        chunks = chunks[keep]
    if len(chunks):
        chunks = chunks[np.lexsort(chunks.T[::-1])]
    data = read_chunks(zstore, level, chunks, attributes, ndim=ndim)
    dtype = attrs_of(array_at(g, "vertices")).get("dtype", "float32")
    attr_arrays = _attr_arrays(g, attributes)
    pos = np.concatenate([d.positions for d in data]) if data else np.zeros((0, ndim), dtype)
    attrs = {}
    for n, a in attr_arrays.items():
        parts = [d.attributes[n] for d in data]
        a_attrs = attrs_of(a)
        rs = a_attrs.get("row_shape") or []
        attrs[n] = np.concatenate(parts) if parts else np.zeros((0,) + tuple(rs), a_attrs["dtype"])
    out: dict[str, Any] = {"positions": pos, "attributes": attrs, "chunks": [d.chunk for d in data]}
    if with_object_ids and "object_index" in g:
        out["object_ids"] = _object_ids_of_rows(g, data, ndim)
    if bbox is not None:
        lo, hi = (np.asarray(b, np.float64) for b in bbox)
        m = ((pos >= lo) & (pos <= hi)).all(axis=1)
        out["positions"] = pos[m]
        out["attributes"] = {n: v[m] for n, v in attrs.items()}
        if "object_ids" in out:
            out["object_ids"] = out["object_ids"][m]
    return out


def _object_ids_of_rows(g: zarr.Group, data: list[ChunkData], ndim: int) -> np.ndarray:
    """Per row, the id of the object whose fragment holds it (objects layout)."""

    _, oid, och, ofr = object_entries(g, ndim)
    ids, _ = row_object_ids(data, oid, och, ofr)
    return ids


def write_level_points(zs: ZVStore, level: int, positions, attributes: dict, object_ids, meta: LevelMetadata,
                       *, shards=None, compressors=None, all_object_ids=None) -> LevelMetadata:
    """Lay out, encode and write in-bounds points as one level, metadata last."""
    grid = zs.grid(level)
    specs = [AttributeSpec.of(n, v) for n, v in attributes.items()]
    prepare_level(zs.root, level, grid, specs, shards=shards, compressors=compressors)
    plan = plan_chunks(positions, grid, object_ids)
    payloads = list(encode_plan(plan, grid.cast(positions), attributes, grid.dtype, specs, level=level))
    write_chunk_payloads(zs.store, level, grid, payloads, specs)
    summary = ChunkSummary.from_plan(plan)
    meta.fragments_tile = True
    return finalize_level(zs.root, level, grid, summary, meta, specs)
