"""Payloads of the per-chunk cells (ZV 0.9.2, encoding "raw" / "fragment_index_v1").

Each function maps numpy arrays to the bytes *inside* a cell's vlen-bytes frame
and back. Framing, compression and sharding are zarr's job.

Layouts (all little-endian):

* ``vertices``: ``N x D`` values of the vertex dtype, row-major.
* ``vertex_attributes/<name>``: ``N x C`` values of the attribute dtype, row-major,
  in vertex-row order. A reader sizes the values by the array's declared dtype
  alone, so :func:`encode_attribute` takes that declaration and refuses values of
  any other dtype or channel count.
* ``vertex_fragments`` (fragment index v1): a 16-byte header (magic ``GFVZ``,
  version 1, flags 0, fragment count F, range count R), a range bitmap padded to
  8 bytes, ``R`` pairs ``(i64 start, i64 count)``, then a CSR block
  ``u32 offsets[E+1]`` and ``i64 indices``. Point clouds only use ranges.
* object manifests: ``u32 B`` then ``B`` blocks of ``i64 chunk[D]``, ``u8 mode``
  and, by mode, ``i64 fragment`` (0), ``i64 start, i64 count`` (1) or
  ``u32 n, i64 fragments[n]`` (2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zv_dask.errors import FormatError

__all__ = [
    "FRAGMENT_MAGIC",
    "FragmentIndex",
    "encode_vertices",
    "decode_vertices",
    "check_attribute",
    "encode_attribute",
    "decode_attribute",
    "raw_view",
    "encode_fragments",
    "decode_fragments",
    "encode_manifest",
    "decode_manifest",
    "EMPTY_MANIFEST",
]

FRAGMENT_MAGIC = 0x5A564647
_HEADER = np.dtype([("magic", "<u4"), ("version", "<u2"), ("flags", "<u2"), ("F", "<u4"), ("R", "<u4")])
EMPTY_MANIFEST = b"\x00\x00\x00\x00"


def _le(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


# -- vertices / attributes ----------------------------------------------------------
def encode_vertices(positions: np.ndarray, dtype="float32") -> bytes:
    """``(N, D)`` positions -> raw little-endian bytes of the vertex dtype."""
    p = np.asarray(positions)
    if p.ndim != 2:
        raise FormatError(f"vertices must be a 2-D (N, D) array, got shape {p.shape}")
    return np.ascontiguousarray(p, dtype=_le(dtype)).tobytes()


def decode_vertices(payload: bytes, ndim: int, dtype="float32") -> np.ndarray:
    """Inverse of :func:`encode_vertices`; returns a native-endian ``(N, ndim)`` array."""
    dt = _le(dtype)
    row = dt.itemsize * ndim
    if len(payload) % row:
        raise FormatError(f"vertices payload of {len(payload)} bytes is not a whole number of "
                          f"{ndim}-D {np.dtype(dtype).name} rows ({row} bytes each)")
    return np.frombuffer(payload, dtype=dt).reshape(-1, ndim).astype(np.dtype(dtype).newbyteorder("="))


def check_attribute(values, dtype, channels: int | None = None, *, name: str | None = None,
                    where: str | None = None) -> np.ndarray:
    """``values`` as an array, after checking they are what the attribute's array declares.

    ``dtype`` and ``channels`` are the declaration of the ``vertex_attributes/<name>``
    array the values go to (``channels=None``: an ``(N,)`` attribute). The values
    must have that very dtype: only the byte order may differ (cells are
    little-endian), never the kind or width, since a reader sizes every value by
    the declared dtype. Nothing is cast here: a cast could lose data (float64
    into uint16); bringing input to its declared dtype is the input side's job,
    and only where no value changes (:func:`zv_dask.ingest.staging.lossless_cast`).
    Raises :class:`FormatError` naming the attribute, the declared dtype and the
    values'. One comparison per call, not per value.
    """
    v = np.asarray(values)
    declared = np.dtype(dtype)
    label = f"attribute {name!r}" if name is not None else "attribute"
    if where:
        label = f"{where}: {label}"
    if declared.kind not in "biuf":
        raise FormatError(f"{label} is declared {declared}, which is not numeric (bool, int, uint or float)")
    if _le(v.dtype) != _le(declared):
        raise FormatError(f"{label} is declared {declared.name} but its values are {v.dtype.name}: refusing to "
                          f"write {v.dtype.itemsize}-byte {v.dtype.name} values into cells read as "
                          f"{declared.itemsize}-byte {declared.name} (declare the attribute as {v.dtype.name}, "
                          f"or cast the values to {declared.name} before they are written)")
    width = 1 if channels is None else int(channels)
    if v.ndim not in (1, 2) or (v.shape[1] if v.ndim == 2 else 1) != width:
        raise FormatError(f"{label} is declared with {width} channel(s) ({declared.name}, row shape "
                          f"{[] if channels is None else [width]}) but its values have shape {tuple(v.shape)}")
    return v


def encode_attribute(values: np.ndarray, dtype, channels: int | None = None, *, name: str | None = None,
                     where: str | None = None, view: bool = False):
    """``(N,)`` or ``(N, C)`` values of an attribute declared ``dtype`` -> raw little-endian bytes.

    The one encoder of ``vertex_attributes`` cells: :func:`check_attribute` first
    (a :class:`FormatError` when the values are not of the declared dtype and
    channel count). ``view=True`` returns the zero-copy form of :func:`raw_view`
    (a ``memoryview`` of ``values`` when no copy is needed) instead of ``bytes``.
    """
    v = check_attribute(values, dtype, channels, name=name, where=where)
    if view:
        return raw_view(v, dtype)
    return np.ascontiguousarray(v, dtype=_le(dtype)).tobytes()


def decode_attribute(payload: bytes, dtype, n_rows: int, channels: int | None = None) -> np.ndarray:
    """Inverse of :func:`encode_attribute`. ``channels=None`` means a ``(N,)`` attribute."""
    dt = _le(dtype)
    if len(payload) % dt.itemsize:
        raise FormatError(f"attribute payload of {len(payload)} bytes is not a whole number of "
                          f"{np.dtype(dtype).name} values ({dt.itemsize} bytes each)")
    flat = np.frombuffer(payload, dtype=dt)
    width = 1 if channels is None else channels
    if flat.size != n_rows * width:
        raise FormatError(f"attribute payload holds {flat.size} {np.dtype(dtype).name} values, "
                          f"expected {n_rows} rows x {width} channels")
    out = flat.astype(np.dtype(dtype).newbyteorder("="))
    return out if channels is None else out.reshape(n_rows, channels)


def raw_view(values: np.ndarray, dtype=None):
    """The little-endian bytes of an array as a flat ``memoryview`` when no copy is needed, else ``bytes``.

    The encoders' zero-copy form: a contiguous slice of a sorted array is
    written as it sits in memory. It casts to ``dtype``: attribute cells go
    through :func:`encode_attribute` (``view=True``), which checks the values first.
    """
    v = np.asarray(values)
    dt = _le(v.dtype if dtype is None else dtype)
    if v.dtype == dt and v.flags.c_contiguous:
        return memoryview(v).cast("B") if v.size else b""
    return np.ascontiguousarray(v, dtype=dt).tobytes()


# -- fragment index v1 ---------------------------------------------------------------
@dataclass(frozen=True)
class FragmentIndex:
    """A decoded ``vertex_fragments`` cell.

    ``starts``/``counts`` hold one entry per fragment; explicit (CSR) fragments
    have ``counts == -1`` and their vertex rows in ``explicit[f]``.
    """

    starts: np.ndarray
    counts: np.ndarray
    explicit: dict

    @property
    def num_fragments(self) -> int:
        return len(self.starts)

    @property
    def vertex_extent(self) -> int:
        """Number of vertex rows the ranges cover (max of start + count)."""
        rng = self.counts >= 0
        return int((self.starts[rng] + self.counts[rng]).max()) if rng.any() else 0

    def tiles(self, n_rows: int) -> bool:
        """True when the fragments are ranges laid end to end over ``[0, n_rows)``.

        An index without fragments never tiles (as the reference decides).
        """
        if self.explicit or self.num_fragments == 0:
            return False
        ends = self.starts + self.counts
        return bool(self.starts[0] == 0 and (self.starts[1:] == ends[:-1]).all() and ends[-1] == n_rows)


def encode_fragments(counts: np.ndarray) -> bytes:
    """Fragment index v1 for consecutive range fragments with the given row counts.

    Fragment ``f`` is the range ``(sum(counts[:f]), counts[f])``, so the ranges
    tile the chunk's rows; empty fragments start at the running total.
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    if (counts < 0).any():
        raise FormatError("fragment counts must be >= 0")
    f = len(counts)
    header = np.zeros(1, _HEADER)
    header["magic"], header["version"], header["flags"], header["F"], header["R"] = FRAGMENT_MAGIC, 1, 0, f, f
    if f == 0:
        return header.tobytes()
    nbits = (f + 7) // 8
    bitmap = np.zeros(-(-nbits // 8) * 8, np.uint8)
    bitmap[:nbits] = 0xFF
    if f % 8:
        bitmap[nbits - 1] = (1 << (f % 8)) - 1
    table = np.empty((f, 2), "<i8")
    table[:, 1] = counts
    table[0, 0] = 0
    np.cumsum(counts[:-1], out=table[1:, 0])
    return b"".join((header.tobytes(), bitmap.tobytes(), table.tobytes(), b"\x00\x00\x00\x00"))


def decode_fragments(payload: bytes) -> FragmentIndex:
    """Parse a fragment index v1 cell; rejects anything malformed with :class:`FormatError`."""
    buf = memoryview(payload)
    if len(buf) < 16:
        raise FormatError(f"fragment index is {len(buf)} bytes, shorter than its 16-byte header")
    h = np.frombuffer(buf[:16], _HEADER)[0]
    if int(h["magic"]) != FRAGMENT_MAGIC:
        raise FormatError(f"fragment index magic is {int(h['magic']):#010x}, expected {FRAGMENT_MAGIC:#010x}")
    if int(h["version"]) != 1 or int(h["flags"]) != 0:
        raise FormatError(f"fragment index version {int(h['version'])} flags {int(h['flags'])}; only v1 with flags 0")
    f, r = int(h["F"]), int(h["R"])
    if r > f:
        raise FormatError(f"fragment index claims {r} ranges but only {f} fragments")
    if f == 0:
        if len(buf) != 16:
            raise FormatError("fragment index with 0 fragments has trailing bytes")
        return FragmentIndex(np.zeros(0, np.int64), np.zeros(0, np.int64), {})
    nbits = (f + 7) // 8
    off = 16 + -(-nbits // 8) * 8
    need = off + 16 * r + 4
    if len(buf) < need:
        raise FormatError(f"fragment index truncated: {len(buf)} bytes, need at least {need}")
    bits = np.unpackbits(np.frombuffer(buf[16:16 + nbits], np.uint8), bitorder="little")[:f].astype(bool)
    if int(bits.sum()) != r:
        raise FormatError(f"fragment bitmap has {int(bits.sum())} ranges set but the header says {r}")
    table = np.frombuffer(buf[off:off + 16 * r], "<i8").reshape(r, 2).astype(np.int64)
    off += 16 * r
    e = f - r
    if len(buf) < off + 4 * (e + 1):
        raise FormatError("fragment index truncated inside its CSR offsets")
    offsets = np.frombuffer(buf[off:off + 4 * (e + 1)], "<u4").astype(np.int64)
    off += 4 * (e + 1)
    n_idx = int(offsets[-1])
    if len(buf) != off + 8 * n_idx:
        raise FormatError(f"fragment index has {len(buf)} bytes, expected {off + 8 * n_idx}")
    indices = np.frombuffer(buf[off:], "<i8").astype(np.int64)
    starts = np.full(f, -1, np.int64)
    counts = np.full(f, -1, np.int64)
    starts[bits] = table[:, 0]
    counts[bits] = table[:, 1]
    explicit = {int(fi): indices[offsets[j]:offsets[j + 1]] for j, fi in enumerate(np.flatnonzero(~bits))}
    return FragmentIndex(starts, counts, explicit)


# -- object manifests -----------------------------------------------------------------
def _block_dtype(ndim: int) -> np.dtype:
    return np.dtype([("chunk", "<i8", (ndim,)), ("mode", "u1"), ("fragment", "<i8")])


def encode_manifest(chunks: np.ndarray, fragments: np.ndarray) -> bytes:
    """Manifest blob of one object: one mode-0 block per ``(chunk, fragment)`` pair."""
    chunks = np.asarray(chunks, np.int64)
    fragments = np.asarray(fragments, np.int64).reshape(-1)
    if chunks.ndim != 2 or len(chunks) != len(fragments):
        raise FormatError(f"manifest needs (B, D) chunks and (B,) fragments, got {chunks.shape} and {fragments.shape}")
    blocks = np.zeros(len(fragments), _block_dtype(chunks.shape[1]))
    blocks["chunk"] = chunks
    blocks["fragment"] = fragments
    return np.uint32(len(blocks)).astype("<u4").tobytes() + blocks.tobytes()


def encode_manifests(object_rows: np.ndarray, chunks: np.ndarray, fragments: np.ndarray, n_objects: int) -> list[bytes]:
    """Blobs for many objects at once.

    ``object_rows`` (sorted ascending) gives each block's object row; blocks of one
    object must already be in manifest order. Returns ``n_objects`` blobs (objects
    with no block get the empty manifest).
    """
    object_rows = np.asarray(object_rows, np.int64)
    blocks = np.zeros(len(object_rows), _block_dtype(np.asarray(chunks).shape[1]))
    blocks["chunk"] = chunks
    blocks["fragment"] = fragments
    raw = blocks.tobytes()
    size = blocks.dtype.itemsize
    bounds = np.searchsorted(object_rows, np.arange(n_objects + 1))
    counts = np.diff(bounds).astype("<u4")
    return [counts[i].tobytes() + raw[bounds[i] * size:bounds[i + 1] * size] for i in range(n_objects)]


def decode_manifest(blob: bytes, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse a manifest blob into ``(chunks (M, D), fragments (M,))``, expanding every mode."""
    buf = memoryview(blob)
    if len(buf) < 4:
        raise FormatError(f"object manifest is {len(buf)} bytes, shorter than its block count")
    n_blocks = int(np.frombuffer(buf[:4], "<u4")[0])
    off = 4
    chunks: list = []
    frags: list = []
    for _ in range(n_blocks):
        if len(buf) < off + 8 * ndim + 1:
            raise FormatError("object manifest truncated inside a block header")
        c = np.frombuffer(buf[off:off + 8 * ndim], "<i8")
        mode = buf[off + 8 * ndim]
        off += 8 * ndim + 1
        if mode not in (0, 1, 2):
            raise FormatError(f"object manifest block mode {mode}; only 0, 1, 2 exist")
        if mode == 2:
            if len(buf) < off + 4:
                raise FormatError("object manifest truncated inside a mode-2 fragment count")
            n = int(np.frombuffer(buf[off:off + 4], "<u4")[0])
            off += 4
        size = 8 if mode == 0 else 16 if mode == 1 else 8 * n
        if len(buf) < off + size:
            raise FormatError(f"object manifest truncated inside a mode-{mode} block: needs {size} bytes "
                              f"at offset {off}, has {len(buf) - off}")
        body = np.frombuffer(buf[off:off + size], "<i8")
        off += size
        if mode == 1:
            start, count = int(body[0]), int(body[1])
            if count < 0:
                raise FormatError(f"object manifest range block has a negative count {count}")
            f = np.arange(start, start + count, dtype=np.int64)
        else:
            f = body
        frags.append(np.asarray(f, np.int64).reshape(-1))
        chunks.append(np.repeat(c.astype(np.int64)[None, :], len(frags[-1]), axis=0))
    if off != len(buf):
        raise FormatError(f"object manifest has {len(buf) - off} trailing bytes")
    if not frags:
        return np.zeros((0, ndim), np.int64), np.zeros(0, np.int64)
    return np.concatenate(chunks), np.concatenate(frags)
