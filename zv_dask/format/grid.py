"""Chunk and bin geometry of a ZV store.

All assignment happens in *base-bin index space*: a point's base bin is
``floor(p / base_bin_shape)`` computed from the position cast to the store's
vertex dtype and promoted to float64, exactly as the reference does. Its chunk
is ``base_bin // bins_per_chunk`` and its fragment the row-major position of
the bin inside the chunk. Coarse bins are whole multiples of the base bin, so
every level shares one integer lattice and no float comparison ever decides a
boundary twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from zv_dask.errors import InputError, MetadataError

__all__ = ["Grid", "chunk_key", "parse_chunk_key", "chunk_keys"]


def chunk_key(chunk) -> str:
    """Absolute chunk coordinates -> the metadata key ``"i.j.k"``."""
    return ".".join(str(int(c)) for c in chunk)


def chunk_keys(chunks: np.ndarray) -> list[str]:
    """Vectorised :func:`chunk_key` over an ``(M, D)`` integer array."""
    return [".".join(map(str, row)) for row in np.asarray(chunks, dtype=np.int64).tolist()]


def parse_chunk_key(key: str) -> tuple[int, ...]:
    """``"i.j.k"`` -> ``(i, j, k)``; negative coordinates allowed."""
    try:
        return tuple(int(p) for p in key.split("."))
    except ValueError:
        raise MetadataError(f"chunk key {key!r} is not of the form 'i.j.k' with integers") from None


def _as_float_tuple(name: str, value, ndim: int | None = None) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a sequence of numbers, got {value!r}") from None
    if ndim is not None and len(out) != ndim:
        raise InputError(f"{name} has {len(out)} values but the store has {ndim} axes: {value!r}")
    return out


MAX_GRID_CELLS = float(2 ** 62)  # chunks in a level's grid (int64 cell numbers, with room for arithmetic)


def grid_size_problem(lo, hi, chunk_shape) -> str | None:
    """Why chunks of ``chunk_shape`` over the box ``lo..hi`` cannot be addressed (int64 ids), or ``None``."""
    with np.errstate(over="ignore", invalid="ignore"):
        extent = [(float(h) - float(l_)) / float(c) for l_, h, c in zip(lo, hi, chunk_shape)]
        cells = math.prod(max(1.0, e + 2) for e in extent)
        reach = max(max(abs(float(l_)), abs(float(h))) / float(c) for l_, h, c in zip(lo, hi, chunk_shape))
    box = [[float(v) for v in lo], [float(v) for v in hi]]
    if cells > MAX_GRID_CELLS:  # chunk ids are int64 cell numbers: a grid past that cannot be addressed
        size = f"about {cells:.3g}" if math.isfinite(cells) else "more than 1e308"
        return (f"chunk_shape {[float(c) for c in chunk_shape]} over the bounds {box} makes a grid of {size} "
                f"chunks, more than the {MAX_GRID_CELLS:.3g} a store can address; use a larger chunk_shape")
    if reach > MAX_GRID_CELLS:  # a small box far away: its chunk coordinates are past int64
        return (f"the bounds {box} lie about {reach:.3g} chunks of chunk_shape {[float(c) for c in chunk_shape]} "
                f"from the origin, more than the {MAX_GRID_CELLS:.3g} chunk coordinates can count; use a larger "
                "chunk_shape, or subtract an offset from the coordinates")
    return None


@dataclass(frozen=True)
class Grid:
    """The chunk grid of one level plus the base-bin lattice shared by all levels.

    Parameters
    ----------
    bounds_min, bounds_max
        Inclusive store bounds (root metadata; shared by every level).
    chunk_shape
        This level's chunk edge lengths in world units.
    base_bin_shape
        Level-0 bin edge lengths (``chunk_shape`` of level 0 when absent).
    dtype
        The vertex dtype; positions are cast to it before any binning.
    """

    bounds_min: tuple[float, ...]
    bounds_max: tuple[float, ...]
    chunk_shape: tuple[float, ...]
    base_bin_shape: tuple[float, ...]
    dtype: str = "float32"

    def __post_init__(self):
        d = len(self.chunk_shape)
        for name in ("bounds_min", "bounds_max", "base_bin_shape"):
            if len(getattr(self, name)) != d:
                raise MetadataError(
                    f"{name} has {len(getattr(self, name))} values but chunk_shape has {d}: "
                    f"{getattr(self, name)!r} vs {self.chunk_shape!r}"
                )
        if not all(math.isfinite(c) and c > 0 for c in self.chunk_shape):
            raise MetadataError(f"chunk_shape must be finite and > 0 on every axis, got {self.chunk_shape!r}")
        if not all(math.isfinite(b) and b > 0 for b in self.base_bin_shape):
            raise MetadataError(f"base_bin_shape must be finite and > 0, got {self.base_bin_shape!r}")
        if not all(math.isfinite(v) for v in self.bounds_min + self.bounds_max):
            raise MetadataError(f"bounds must be finite, got {[self.bounds_min, self.bounds_max]!r}")
        if any(lo > hi for lo, hi in zip(self.bounds_min, self.bounds_max)):
            raise MetadataError(
                f"bounds are inverted: min {list(self.bounds_min)} > max {list(self.bounds_max)} on some axis"
            )
        for c, b in zip(self.chunk_shape, self.base_bin_shape):
            r = c / b
            if abs(r - round(r)) > 1e-9 * max(1.0, r) or round(r) < 1:
                raise MetadataError(
                    f"chunk_shape {list(self.chunk_shape)} must be a whole multiple of "
                    f"base_bin_shape {list(self.base_bin_shape)} on every axis"
                )
        np.dtype(self.dtype)  # raises on nonsense
        problem = grid_size_problem(self.bounds_min, self.bounds_max, self.chunk_shape)
        if problem:
            raise MetadataError(problem)

    # -- derived geometry -------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.chunk_shape)

    @property
    def bins_per_chunk(self) -> tuple[int, ...]:
        return tuple(int(round(c / b)) for c, b in zip(self.chunk_shape, self.base_bin_shape))

    @property
    def fragments_per_chunk(self) -> int:
        return int(np.prod(self.bins_per_chunk))

    @property
    def origin(self) -> tuple[int, ...]:
        """Absolute coordinates of the chunk stored at cell (0, ..., 0)."""
        lo = np.floor(np.asarray(self.bounds_min, np.float64) / np.asarray(self.chunk_shape, np.float64))
        via_bins = self.chunks_of_bins(self.base_bins(np.asarray([self.bounds_min])))[0]
        return tuple(int(v) for v in np.minimum(lo.astype(np.int64), via_bins))

    @property
    def shape(self) -> tuple[int, ...]:
        """Number of chunks per axis covering the bounds."""
        hi = np.floor(np.asarray(self.bounds_max, np.float64) / np.asarray(self.chunk_shape, np.float64))
        via_bins = self.chunks_of_bins(self.base_bins(np.asarray([self.bounds_max])))[0]
        top = np.maximum(hi.astype(np.int64), via_bins)
        return tuple(int(max(1, t - o + 1)) for t, o in zip(top, self.origin))

    @property
    def n_cells(self) -> int:
        return int(np.prod(self.shape))

    def with_bounds(self, bounds_min, bounds_max) -> Grid:
        return Grid(tuple(map(float, bounds_min)), tuple(map(float, bounds_max)), self.chunk_shape,
                    self.base_bin_shape, self.dtype)

    # -- assignment -----------------------------------------------------------------
    def cast(self, positions: np.ndarray) -> np.ndarray:
        """Positions as the store keeps them (the vertex dtype)."""
        return np.asarray(positions).astype(self.dtype, copy=False)

    def base_bins(self, positions: np.ndarray) -> np.ndarray:
        """``(N, D)`` int64 base-bin indices of positions (cast to the store dtype first)."""
        positions = np.asarray(positions)
        out = np.empty((len(positions), self.ndim), np.int64)
        for d in range(self.ndim):  # column by column: no (N, D) float64 temporary
            out[:, d] = self._bin_column(positions, d)
        return out

    def _bin_floats(self, positions: np.ndarray, d: int) -> np.ndarray:
        """``floor(p / base_bin)`` along axis ``d`` as float64 (exact integers), column-wise."""
        col = np.asarray(positions[:, d]).astype(self.dtype, copy=False).astype(np.float64)
        np.divide(col, self.base_bin_shape[d], out=col)
        np.floor(col, out=col)
        return col

    def _bin_column(self, positions: np.ndarray, d: int, dtype=np.int64) -> np.ndarray:
        """Base-bin index along axis ``d``, computed column-wise to stay cache friendly."""
        return self._bin_floats(positions, d).astype(dtype)

    def chunk_coords(self, positions: np.ndarray) -> np.ndarray:
        """``(N, D)`` absolute chunk coordinates (bounds-free), as :meth:`chunks_of_bins` of :meth:`base_bins`."""
        out = np.empty((len(positions), self.ndim), np.int64)
        for d, k in enumerate(self.bins_per_chunk):
            out[:, d] = np.floor_divide(self._bin_column(positions, d), k)
        return out

    def assign(self, positions: np.ndarray, units=None):
        """Linear cell id and fragment (bin inside chunk, row-major) of every point.

        The hot path of every layout: one pass per axis over contiguous columns,
        in 32-bit integers when the grid allows. With ``units`` (a
        :class:`~zv_dask.ingest.shuffle.UnitGrid`) also returns each point's
        write-unit id. Raises :class:`InputError` if a point falls outside the grid.
        """
        n = len(positions)
        shape, origin, bpc = self.shape, self.origin, self.bins_per_chunk
        small = self._int32_bins()
        it = np.int32 if small else np.int64
        cell: np.ndarray = np.zeros(n, np.int32 if small and self.n_cells < 2**31 else np.int64)
        frag: np.ndarray = np.zeros(n, np.int32 if self.fragments_per_chunk < 2**31 else np.int64)
        unit: np.ndarray | None = None
        if units is not None:
            unit = np.zeros(n, np.int32 if int(np.prod(units.shape)) < 2**31 and small else np.int64)
        cstride = fstride = ustride = 1
        for d in reversed(range(self.ndim)):
            x = self._bin_floats(positions, d)
            if n:  # the grid check, on the float bins: out-of-grid values never meet a 32-bit cast
                first, last = origin[d] * bpc[d], (origin[d] + shape[d]) * bpc[d] - 1
                lo, hi = float(x.min()), float(x.max())
                if not (lo >= first and hi <= last):
                    bad = lo if not lo >= first else hi
                    chunk = int(np.floor_divide(bad, bpc[d])) if np.isfinite(bad) else bad
                    raise InputError(f"a point falls in chunk {chunk} on axis {d}, outside the grid of "
                                     f"bounds {[list(self.bounds_min), list(self.bounds_max)]}")
            c, b = np.divmod(x.astype(it), it(bpc[d]))  # chunk and bin inside it (floor semantics)
            if unit is not None:
                u = np.floor_divide(c - it(units.anchor[d]), it(units.size[d]))
                if ustride != 1:
                    u *= it(ustride)
                unit += u
                ustride *= units.shape[d]
            if origin[d]:
                c -= it(origin[d])
            if cstride != 1:
                c *= it(cstride)
            cell += c
            if fstride != 1:
                b *= it(fstride)
            frag += b
            cstride *= shape[d]
            fstride *= bpc[d]
        cell = cell.astype(np.int64, copy=False)
        frag = frag.astype(np.int64, copy=False)
        return (cell, frag) if unit is None else (cell, frag, unit.astype(np.int64, copy=False))

    def _int32_bins(self) -> bool:
        """Whether every base-bin index of the grid (and the products assign forms) fits in 32 bits."""
        o = np.asarray(self.origin, np.int64)
        top = (o + np.asarray(self.shape, np.int64)) * np.asarray(self.bins_per_chunk, np.int64)
        lo = o * np.asarray(self.bins_per_chunk, np.int64)
        return bool(np.abs(np.r_[lo, top]).max() < 2**30 and self.n_cells < 2**31)

    def chunks_of_bins(self, bins: np.ndarray) -> np.ndarray:
        return np.floor_divide(bins, np.asarray(self.bins_per_chunk, np.int64))

    def fragments_of_bins(self, bins: np.ndarray, chunks: np.ndarray | None = None) -> np.ndarray:
        """Row-major index of each bin inside its chunk (axis 0 slowest)."""
        bpc = np.asarray(self.bins_per_chunk, np.int64)
        if chunks is None:
            chunks = self.chunks_of_bins(bins)
        local = bins - chunks * bpc
        if not len(local):
            return np.zeros(0, np.int64)
        return np.ravel_multi_index(tuple(local.T), tuple(bpc)).astype(np.int64)

    def cells(self, chunks: np.ndarray) -> np.ndarray:
        """Absolute chunk coordinates -> zero-based cell indices in the array grid."""
        return np.asarray(chunks, np.int64) - np.asarray(self.origin, np.int64)

    def cell_ids(self, chunks: np.ndarray) -> np.ndarray:
        """Linear (C-order) cell id of absolute chunk coordinates; raises if outside the grid."""
        cells = self.cells(chunks)
        shape = np.asarray(self.shape)
        if len(cells) and ((cells < 0).any() or (cells >= shape).any()):
            bad = cells[((cells < 0) | (cells >= shape)).any(axis=1)][0] + np.asarray(self.origin)
            raise InputError(f"chunk {chunk_key(bad)} lies outside the grid of bounds "
                             f"{[list(self.bounds_min), list(self.bounds_max)]}")
        if not len(cells):
            return np.zeros(0, np.int64)
        return np.ravel_multi_index(tuple(cells.T), self.shape).astype(np.int64)

    def chunks_of_cell_ids(self, ids: np.ndarray) -> np.ndarray:
        cells = np.stack(np.unravel_index(np.asarray(ids, np.int64), self.shape), axis=1)
        return cells + np.asarray(self.origin, np.int64)

    def in_bounds(self, positions: np.ndarray) -> np.ndarray:
        """Boolean mask: inside the inclusive bounds, compared in the store dtype."""
        p = self.cast(positions)
        lo = np.asarray(self.bounds_min).astype(self.dtype)
        hi = np.asarray(self.bounds_max).astype(self.dtype)
        return ((p >= lo) & (p <= hi)).all(axis=1)

    def chunk_box(self, chunk) -> tuple[np.ndarray, np.ndarray]:
        """World-space ``[lo, hi)`` box of an absolute chunk."""
        c = np.asarray(chunk, np.float64)
        cs = np.asarray(self.chunk_shape, np.float64)
        return c * cs, (c + 1) * cs

    def chunks_touching(self, lo, hi) -> np.ndarray:
        """Absolute chunks (inside the grid) that intersect the closed box ``[lo, hi]``."""
        lo_b = self.chunks_of_bins(self.base_bins(np.asarray([lo], np.float64)))[0]
        hi_b = self.chunks_of_bins(self.base_bins(np.asarray([hi], np.float64)))[0]
        o = np.asarray(self.origin)
        top = o + np.asarray(self.shape) - 1
        lo_b = np.clip(lo_b, o, top)
        hi_b = np.clip(hi_b, o, top)
        if (hi_b < lo_b).any():
            return np.zeros((0, self.ndim), np.int64)
        axes = [np.arange(a, b + 1) for a, b in zip(lo_b, hi_b)]
        mesh = np.meshgrid(*axes, indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1).astype(np.int64)
