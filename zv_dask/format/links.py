"""Cross-level links (ZV format section 9): pure numpy, no I/O.

A coarse level ``k+1`` links every vertex of level ``k`` to the metavertex it
was folded into. Records are width-2 rows of vertex row indices, stored in the
cell of the record's first endpoint:

* ``<k>/links/+1/<offsets>``: cell = the fine vertex's chunk, rows
  ``(fine_vi, coarse_vi)``;
* ``<k+1>/links/-1/<offsets>`` (the ``explicit`` mirror): cell = the coarse
  chunk, rows ``(coarse_vi, fine_vi)``.

``offsets`` names where the second endpoint's chunk is relative to the
*anchor* of the first: ``anchor = floor(chunk * s_src / s_trg)`` per axis,
where ``s`` is each level's chunk shape in root chunks (1 when the levels
share a chunk shape, and the anchor is the chunk itself). The segment is
written ``"0"``, ``"+N"`` or ``"-N"`` per axis, joined by dots.

A cell's payload is ``i64 K``, ``K`` group offsets (``i64``), then the rows as
``i64`` pairs; zv-dask writes one group (``K = 1``, offset 0). The rows keep
the order of the first endpoint's level (fine row order for ``+1``; for
``-1``, fine row order within each coarse cell).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from zv_dask.errors import FormatError
from zv_dask.format.layout import stable_order

__all__ = [
    "LinkCells",
    "anchor",
    "offset_segment",
    "parse_offset_segment",
    "encode_link_rows",
    "decode_link_rows",
    "plan_link_cells",
    "plan_link_runs",
    "offset_axes",
    "possible_offsets",
    "offsets_count",
    "offset_allowed",
    "link_family_attrs",
    "link_array_attrs",
]

LINK_WIDTH = 2
_DENSE_PAIRS = 1 << 22  # (source, target) chunk pairs looked up in a table up to this many
_HEADER = np.array([1, 0], "<i8")
_HEADER_BYTES = _HEADER.tobytes()


def anchor(chunks: np.ndarray, scale_src, scale_trg) -> np.ndarray:
    """``floor(chunks * scale_src / scale_trg)`` per axis, in integers (exact for negative chunks)."""
    c = np.asarray(chunks, np.int64)
    return np.floor_divide(c * np.asarray(scale_src, np.int64), np.asarray(scale_trg, np.int64))


def offset_segment(offset) -> str:
    """``(0, 1, -1)`` -> ``"0.+1.-1"``: the name of an offsets array."""
    return ".".join("0" if int(o) == 0 else f"{int(o):+d}" for o in offset)


def parse_offset_segment(segment: str) -> tuple[int, ...]:
    """Inverse of :func:`offset_segment`; raises :class:`FormatError` on anything else."""
    out = []
    for part in segment.split("."):
        if part != "0" and not (len(part) > 1 and part[0] in "+-" and part[1:].isdigit() and part[1] != "0"):
            raise FormatError(f"bad link offsets segment {segment!r}: each axis must be '0', '+N' or '-N'")
        out.append(int(part))
    return tuple(out)


def encode_link_rows(rows: np.ndarray) -> bytes:
    """One link cell payload: ``i64 1``, ``i64 0``, then the ``(M, 2)`` rows as little-endian ``i64``."""
    r = np.ascontiguousarray(np.asarray(rows, "<i8").reshape(-1, LINK_WIDTH))
    return _HEADER.tobytes() + r.tobytes()


def decode_link_rows(payload: bytes) -> np.ndarray:
    """The ``(M, 2)`` int64 rows of a link cell payload (all groups concatenated)."""
    if len(payload) == 0:
        return np.zeros((0, LINK_WIDTH), np.int64)
    if len(payload) % 8:
        raise FormatError(f"link cell of {len(payload)} bytes is not a whole number of int64 words")
    words = np.frombuffer(payload, "<i8")
    k = int(words[0])
    if k < 0 or 1 + k > len(words):
        raise FormatError(f"link cell declares {k} groups but holds only {len(words)} words")
    body = words[1 + k:]
    if len(body) % LINK_WIDTH:
        raise FormatError(f"link cell body of {len(body)} words is not a whole number of width-2 rows")
    offs = words[1:1 + k]
    n_rows = len(body) // LINK_WIDTH
    if k and (offs[0] != 0 or np.any(np.diff(offs) < 0) or offs[-1] > n_rows):
        raise FormatError(f"link cell group offsets {offs.tolist()} are not ascending within 0..{n_rows}")
    return body.reshape(-1, LINK_WIDTH).astype(np.int64)


@dataclass
class LinkCells:
    """Records grouped into offsets-array cells, in cell order.

    Cell ``i`` belongs to the offsets array ``offsets[i]`` and the source chunk
    ``chunks[i]``; its rows are ``rows[splits[i]:splits[i+1]]`` (``(M, 2)``
    int64 ``(src_vi, dst_vi)``), in the order the records came in.
    """

    offsets: np.ndarray
    chunks: np.ndarray
    splits: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def n_records(self) -> int:
        return len(self.rows)

    def payload(self, i: int) -> bytes:
        """The encoded payload of cell ``i``."""
        return encode_link_rows(self.rows[self.splits[i]:self.splits[i + 1]])

    def payload_parts(self, i: int) -> tuple:
        """The payload of cell ``i`` as buffers (header, rows as they sit in memory): no copy."""
        rows = self.rows[self.splits[i]:self.splits[i + 1]]
        return _HEADER_BYTES, memoryview(np.ascontiguousarray(rows, "<i8")).cast("B")

    def segments(self) -> list[str]:
        """The offsets segment of every cell."""
        return [offset_segment(o) for o in self.offsets.tolist()]


def plan_link_cells(src_chunks: np.ndarray, src_index: np.ndarray, src_vi: np.ndarray, dst_chunks: np.ndarray,
                    dst_index: np.ndarray, dst_vi: np.ndarray, scale_src, scale_trg) -> LinkCells:
    """Group records ``(src chunk, src row) -> (dst chunk, dst row)`` into offsets-array cells.

    Chunks come as small tables of distinct chunks (``src_chunks (m, D)``,
    ``dst_chunks (k, D)``) and per-record indices into them. A record lands in the
    cell of its source chunk, in the array of ``offset = dst chunk - anchor(src
    chunk)``. Cells come out sorted by (offset, source chunk index); rows inside a
    cell keep their input order. Vectorised: one radix sort over the records, no loop.
    """
    n = len(np.asarray(src_index))
    return plan_link_runs(src_chunks, src_index, src_vi, 0, dst_chunks, dst_index, dst_vi, 0,
                          np.ones(n, np.int64), scale_src, scale_trg)


def plan_link_runs(src_chunks: np.ndarray, src_index: np.ndarray, src_vi: np.ndarray, src_step: int,
                   dst_chunks: np.ndarray, dst_index: np.ndarray, dst_vi: np.ndarray, dst_step: int,
                   lengths: np.ndarray, scale_src, scale_trg) -> LinkCells:
    """:func:`plan_link_cells` for records that come in runs.

    Run ``j`` stands for ``lengths[j]`` records ``(src_vi[j] + i * src_step,
    dst_vi[j] + i * dst_step)``, ``i = 0..lengths[j]-1``, between one source
    chunk and one target chunk (steps are 0 or 1): a fine bin's points and
    their shared metavertex are one run. The cells are planned over runs and
    the rows written once.
    """
    src_chunks = np.asarray(src_chunks, np.int64)
    ndim = src_chunks.shape[1]
    src_index = np.asarray(src_index, np.int64)
    lengths = np.asarray(lengths, np.int64)
    r = len(src_index)
    n = int(lengths.sum())
    if n == 0:
        z = np.zeros((0, ndim), np.int64)
        return LinkCells(z, z, np.zeros(1, np.int64), np.zeros((0, LINK_WIDTH), np.int64))
    keep = lengths > 0
    if not keep.all():
        src_index, lengths = src_index[keep], lengths[keep]
        dst_index = np.asarray(dst_index, np.int64)[keep]
        src_vi, dst_vi = np.asarray(src_vi)[keep], np.asarray(dst_vi)[keep]
        r = len(src_index)
    anchors = anchor(src_chunks, scale_src, scale_trg)
    dst_chunks = np.asarray(dst_chunks, np.int64).reshape(-1, ndim)
    dst_index = np.asarray(dst_index, np.int64)
    m, k = len(src_chunks), len(dst_chunks)
    # the cell of a run is a function of its (source chunk, target chunk) pair: work on the few pairs
    pair = src_index * k + dst_index
    if m * k <= _DENSE_PAIRS:
        present = np.zeros(m * k, bool)
        present[pair] = True
        pairs = np.flatnonzero(present)
        lut = np.cumsum(present, dtype=np.int64) - 1
        rank = lut[pair]
    else:
        pairs, rank = np.unique(pair, return_inverse=True)
        rank = rank.reshape(-1)
    p_src, p_dst = pairs // k, pairs % k
    offs = dst_chunks[p_dst] - anchors[p_src]  # (P, D)
    off_lo = offs.min(axis=0)
    ext = offs.max(axis=0) - off_lo + 1
    code = np.ravel_multi_index(tuple((offs - off_lo).T), tuple(int(e) for e in ext)).astype(np.int64)
    key = (code * m + p_src)[rank]
    if r > 1 and bool((key[1:] < key[:-1]).any()):
        ro = stable_order(key)
        key = key[ro]
    else:
        ro = None
    lens = lengths if ro is None else lengths[ro]
    before = np.cumsum(lens) - lens
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    splits = np.r_[before[first], n].astype(np.int64)
    rows = np.empty((n, LINK_WIDTH), np.int64)
    for col, vi, step in ((0, src_vi, src_step), (1, dst_vi, dst_step)):
        vi = np.asarray(vi, np.int64) if ro is None else np.asarray(vi, np.int64)[ro]
        if n == r:  # one record per run
            rows[:, col] = vi
        elif step:
            rows[:, col] = np.repeat(vi - before, lens) + np.arange(n, dtype=np.int64)
        else:
            rows[:, col] = np.repeat(vi, lens)
    cell_code = key[first] // m
    cell_src = key[first] % m
    cell_off = np.stack(np.unravel_index(cell_code, tuple(int(e) for e in ext)), axis=1).astype(np.int64) + off_lo
    return LinkCells(cell_off.reshape(-1, ndim), src_chunks[cell_src].reshape(-1, ndim), splits, rows)


def _axis_offsets(src_edge: int, trg_edge: int, bin_edge: int, src_origin_mod: int) -> set[int]:
    """Offsets on one axis between a record's two endpoints, both in one coarse bin.

    Everything is in base bins: ``src_edge`` / ``trg_edge`` are the chunk
    edges of the first / second endpoint's level, ``bin_edge`` the coarse bin.
    Enumerates one period of the grids' alignment, which is exact.
    """
    period = int(np.lcm.reduce([src_edge, trg_edge, bin_edge]))
    out: set[int] = set()
    for c0 in range(0, period, src_edge):  # first endpoint's chunk starts at base bin c0
        a = (c0 // src_edge) * src_edge // trg_edge  # anchor: floor(c * s_src / s_trg), c0 >= 0 here
        first_bin = c0 // bin_edge
        last_bin = (c0 + src_edge - 1) // bin_edge
        lo = first_bin * bin_edge // trg_edge
        hi = ((last_bin + 1) * bin_edge - 1) // trg_edge
        out.update(range(lo - a, hi - a + 1))
    return out


def offset_axes(fine_chunk: tuple[int, ...], coarse_chunk: tuple[int, ...], coarse_bin: tuple[int, ...],
                delta: int) -> tuple[tuple[int, ...], ...]:
    """Per axis, every offset a ``+1`` (``delta=1``) or ``-1`` family can need, before any data is seen.

    Arguments are edges in base bins per axis: the fine level's chunk, the
    coarse level's chunk and the coarse bin. A fine vertex and its metavertex
    share a coarse bin, so this is exact up to which bins the data occupies.
    The family's possible offsets segments are the product of the axes.
    """
    axes = []
    for f, c, b in zip(fine_chunk, coarse_chunk, coarse_bin):
        src, trg = (f, c) if delta > 0 else (c, f)
        axes.append(tuple(sorted(_axis_offsets(int(src), int(trg), int(b), 0))))
    return tuple(axes)


def possible_offsets(fine_chunk: tuple[int, ...], coarse_chunk: tuple[int, ...], coarse_bin: tuple[int, ...],
                     delta: int) -> list[tuple[int, ...]]:
    """Every offsets segment of a family (the product of :func:`offset_axes`)."""
    return [tuple(o) for o in itertools.product(*offset_axes(fine_chunk, coarse_chunk, coarse_bin, delta))]


def offsets_count(axes: tuple[tuple[int, ...], ...]) -> int:
    """How many offsets segments the per-axis offsets ``axes`` allow."""
    return int(np.prod([len(a) for a in axes], dtype=np.int64))


def offset_allowed(offset, axes: tuple[tuple[int, ...], ...]) -> bool:
    """Whether ``offset`` lies in the product of the per-axis offsets ``axes``."""
    return len(offset) == len(axes) and all(int(o) in a for o, a in zip(offset, axes))


def link_family_attrs(delta: int, ndim: int, num_links: int) -> dict:
    """Attributes of the ``links/<+1|-1>`` group."""
    return {"zv_array": "links_family", "level_delta": int(delta), "link_width": LINK_WIDTH, "directed": True,
            "store": "canonical", "sid_ndim": int(ndim), "num_links": int(num_links),
            "num_physical_records": int(num_links)}


def link_array_attrs(delta: int, offset, nonempty: list[str], origin) -> dict:
    """Attributes of one offsets array ``links/<delta>/<segment>``."""
    out: dict[str, Any] = {"nonempty_chunks": list(nonempty)}
    if any(int(o) != 0 for o in origin):
        out["chunk_grid_origin"] = [int(o) for o in origin]
    out.update({"zv_array": "links", "dtype": "int64", "offsets": [[int(o) for o in offset]], "has_perm": False,
                "link_width": LINK_WIDTH, "level_delta": int(delta)})
    return out
