"""The store API: create and open ZV stores, manage their levels and bounds,
and commit or discard transactional changes.

A :class:`ZVStore` wraps the root zarr group of a store together with the
backend it lives on (and the icechunk session when there is one). Every
function of the seed API takes a ``ZVStore``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from zv_dask.errors import MetadataError, StoreBusyError, StoreError, UnfinishedJobWarning, ZVError, cause_text
from zv_dask.format.codecs import compression_of
from zv_dask.format.grid import Grid
from zv_dask.format.metadata import (
    LINK_STORAGE,
    LevelMetadata,
    RootMetadata,
    fragments_attrs,
    level_bins_from_multiscales,
    multiscales_block,
    ome_block,
    store_name,
    vertices_attrs,
)
from zv_dask.store.backends import Backend, check_creatable, local_path, resolve_backend
from zv_dask.store.journal import journal_for, unfinished_message
from zv_dask.store.nodes import (  # noqa: F401 - create_vlen_arrays, update_node_attrs: part of the store API
    array_at,
    attr_dict,
    attrs_of,
    create_vlen_array,
    create_vlen_arrays,
    group_at,
    update_node_attrs,
)
from zv_dask.types import BoxLike, StoreLike

if TYPE_CHECKING:
    import icechunk

__all__ = [
    "ZVStore",
    "create_store",
    "open_store",
    "name_store",
    "store_info",
    "read_root_metadata",
    "read_level_metadata",
    "create_resolution_level",
    "get_resolution_level",
    "list_resolution_levels",
    "add_resolution_level",
    "remove_resolution_level",
    "list_available_ratios",
    "write_parametric_types",
    "read_parametric_types",
    "session_for",
    "commit",
    "discard_changes",
    "rebind",
    "DEFAULT_BOUNDS_SIDE",
]

DEFAULT_BOUNDS_SIDE = 128.0
PARAMETRIC = "parametric"


class ZVStore:
    """An open ZV store: root group, backend and (for icechunk) the writable session."""

    def __init__(self, backend: Backend, root: zarr.Group, mode: str):
        self.backend = backend
        self.root = root
        self.mode = mode

    # -- basic facts --------------------------------------------------------------------
    @property
    def store(self):
        return self.backend.store

    @property
    def session(self):
        return self.backend.session

    @property
    def url(self) -> str | None:
        return self.backend.url

    @property
    def read_only(self) -> bool:
        return self.mode == "r"

    @property
    def metadata(self) -> RootMetadata:
        return RootMetadata.from_attrs(self.root.attrs.asdict())

    @property
    def levels(self) -> list[int]:
        return list_resolution_levels(self)

    def level_bin_shape(self, level: int) -> tuple[float, ...]:
        """Bin edge lengths of a level in world units (the base bin at level 0, from NGFF above)."""
        meta = self.metadata
        if level == 0:
            return meta.effective_bin_shape
        bins = level_bins_from_multiscales(self.root.attrs.asdict())
        if level not in bins:
            raise MetadataError(f"level {level} has no NGFF transform in 'multiscales'")
        return bins[level]

    def level_chunk_shape(self, level: int) -> tuple[float, ...]:
        """Chunk edge lengths of a level in world units (the root chunk unless the level sets its own)."""
        meta = self.metadata
        if level == 0:
            return meta.chunk_shape
        lm = LevelMetadata.from_attrs(get_resolution_level(self, level).attrs.asdict())
        return tuple(lm.chunk_shape) if lm.chunk_shape else meta.chunk_shape

    def grid(self, level: int = 0) -> Grid:
        """The chunk grid of a level (root bounds, the level's chunk shape, base bins)."""
        meta = self.metadata
        dtype = "float32"
        if level in self.levels and "vertices" in get_resolution_level(self, level):
            dtype = attrs_of(array_at(self.root, f"{level}/vertices")).get("dtype", "float32")
        elif self.levels and "vertices" in get_resolution_level(self, 0):
            dtype = attrs_of(array_at(self.root, "0/vertices")).get("dtype", "float32")
        return Grid(meta.bounds[0], meta.bounds[1], self.level_chunk_shape(level), meta.effective_bin_shape, dtype)

    def __repr__(self) -> str:
        try:
            meta = self.metadata
            return (f"<ZVStore {self.url or self.backend.kind} mode={self.mode} ndim={meta.ndim} "
                    f"levels={self.levels} bounds={[list(meta.bounds[0]), list(meta.bounds[1])]}>")
        except Exception:  # noqa: BLE001 - repr must never raise  # pragma: no cover
            return f"<ZVStore {self.url or self.backend.kind} mode={self.mode}>"

    @property
    def unfinished_job(self) -> str | None:
        """What the unfinished job in this store is and how to go on, or ``None`` (checked once)."""
        if not hasattr(self, "_unfinished"):
            journal = journal_for(self.backend)
            doc = journal.job() if journal is not None else None
            self._unfinished_doc = doc
            self._unfinished = None if doc is None or journal is None else unfinished_message(doc, journal)
        return self._unfinished

    @property
    def unfinished_job_document(self) -> dict | None:
        """The unfinished job's ``job.json`` (its ``kind``, options, scan and plan), or ``None``."""
        self.unfinished_job  # noqa: B018 - read once, with the message
        return getattr(self, "_unfinished_doc", None)

    def unfinished_level(self, level: int) -> str | None:
        """Why ``level`` is not what the unfinished job in this store will leave there, or ``None``.

        ``None`` too when no job is unfinished, and on icechunk (a job works on
        a branch of its own: the branch read is as the last commit left it). A
        level is unfinished when its group or its metadata is missing, when an
        append is part way through rewriting its chunks, or (level 0 of an
        ingest) when it holds fewer points than the job scanned.
        """
        if not self.unfinished_job or self.backend.kind == "icechunk":
            return None
        doc = self.unfinished_job_document or {}
        kind = doc.get("kind")
        level = int(level)
        if str(level) not in self.root or not isinstance(self.root[str(level)], zarr.Group):
            return f"there is no level {level} (yet)"
        level_group = group_at(self.root, str(level))
        if "zarr_vectors_level" not in level_group.attrs:
            return f"level {level} is not finished"
        if kind == "append":
            return "an append was part way through rewriting its chunks"
        if kind == "ingest" and level == 0 and isinstance(doc.get("scan"), dict):
            scan = doc["scan"]
            expected = int(scan.get("points", 0)) - int(scan.get("dropped", 0))
            have = attr_dict(level_group, "zarr_vectors_level").get("vertex_count")
            if have != expected:
                return (f"level 0 holds {int(have or 0):,} of the job's {expected:,} points (its metadata is "
                        "written when the last group is)")
        return None

    def _require_writable(self):
        if self.read_only:
            raise StoreError("the store is open read-only (mode='r'); open it with mode='r+' to change it")


# -- create / open --------------------------------------------------------------------
def _resolve_ndim(ndim, axes, chunk_shape, bounds, base_bin_shape) -> int:
    seen = {}
    if ndim is not None:
        seen["ndim"] = int(ndim)
    if axes is not None:
        seen["axes"] = len(axes)
    if chunk_shape is not None:
        seen["chunk_shape"] = len(chunk_shape)
    if bounds is not None:
        if len(bounds) != 2:
            raise MetadataError(f"bounds must be (min_corner, max_corner), got {bounds!r}")
        seen["bounds[0]"] = len(bounds[0])
        seen["bounds[1]"] = len(bounds[1])
    if base_bin_shape is not None:
        seen["base_bin_shape"] = len(base_bin_shape)
    if len(set(seen.values())) > 1:
        raise MetadataError("inconsistent number of axes: " + ", ".join(f"{k} has {v}" for k, v in seen.items()))
    return next(iter(seen.values())) if seen else 3


def _normalise_axes(axes, ndim: int) -> list[dict]:
    if axes is None:
        return []
    out = []
    for a in axes:
        if isinstance(a, str):
            out.append({"name": a, "type": "space"})
        elif isinstance(a, dict) and "name" in a:
            out.append({"type": "space", **a})
        else:
            raise MetadataError(f"an axis must be a name or a dict with 'name', got {a!r}")
    names = [a["name"] for a in out]
    if len(set(names)) != len(names):
        raise MetadataError(f"axis names must be unique, got {names}")
    return out


def _exists(backend: Backend) -> bool:
    from zarr.core.sync import sync

    if backend.kind == "local" and backend.url is not None:
        p = local_path(backend.url)
        return p.exists() and (not p.is_dir() or any(p.iterdir()))
    try:
        return bool(sync(backend.store.exists("zarr.json")))
    except Exception:  # noqa: BLE001 - a store that cannot answer is treated as empty
        return False


def name_store(zs: ZVStore, name: str) -> None:
    """Set the OME ``name`` of a store built somewhere else than where it will be (an overwrite, a rebuild)."""
    ome = zs.root.attrs.get("ome")
    if isinstance(ome, dict):
        zs.root.attrs.update({"ome": {**ome, "name": name}})


def _claim(backend: Backend, exists_message: str) -> None:
    """Make the root ``zarr.json`` of a new store only if there is none, or raise ``StoreError``.

    Two jobs creating one store at once both find the place empty; the root
    document is written create-if-absent (``O_EXCL`` locally, a conditional PUT on
    object storage) with a token of this call, and read back: only the job whose
    token is there goes on, the other gets ``exists_message``.
    """
    import json
    import uuid

    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    token = uuid.uuid4().hex
    doc = {"zarr_format": 3, "node_type": "group", "attributes": {"zv_dask_creating": token}}
    proto = default_buffer_prototype()
    sync(backend.store.set_if_not_exists("zarr.json", proto.buffer.from_bytes(json.dumps(doc).encode())))
    raw = sync(backend.store.get("zarr.json", prototype=proto))
    try:
        won = raw is not None and json.loads(raw.to_bytes())["attributes"].get("zv_dask_creating") == token
    except (ValueError, KeyError, TypeError, AttributeError):
        won = False
    if not won:
        raise StoreError(exists_message + " (another job created it a moment ago)")


def create_store(
    path: StoreLike,
    *,
    bounds: BoxLike | None = None,
    chunk_shape: float | Sequence[float] | None = None,
    axes: Sequence[str] | None = None,
    ndim: int | None = None,
    base_bin_shape: float | Sequence[float] | None = None,
    vertex_dtype: str = "float32",
    geometry_types: Sequence[str] | None = None,
    crs: dict | None = None,
    attribute_specs: dict | None = None,
    cross_level_depth: int = 0,
    cross_level_storage: str = "none",
    backend: str | None = None,
    storage_options: dict | None = None,
    branch: str = "main",
    overwrite: bool = False,
) -> ZVStore:
    """Create an empty ("warm") ZV store: root metadata, level ``0`` with empty
    ``vertices`` and ``vertex_fragments``.

    ``bounds`` default to ``[0, 128]`` per axis and ``chunk_shape`` to one chunk
    over the bounds. ``cross_level_storage`` (``"none"``, ``"implicit"`` or
    ``"explicit"``) with ``cross_level_depth=1`` declares the cross-level links
    :func:`~zv_dask.build_pyramid` then writes by default. Refuses an existing
    store unless ``overwrite=True``.
    """
    chunk_shape, base_bin_shape, bounds, ndim, axes, vdt = _create_arguments(chunk_shape, base_bin_shape, bounds,
                                                                             ndim, axes, vertex_dtype)
    scalars = {k: v for k, v in (("chunk_shape", chunk_shape), ("base_bin_shape", base_bin_shape))
               if v is not None and np.ndim(v) == 0}
    d = _resolve_ndim(ndim, axes, None if "chunk_shape" in scalars else chunk_shape, bounds,
                      None if "base_bin_shape" in scalars else base_bin_shape)
    if "chunk_shape" in scalars:  # one edge length for every axis
        chunk_shape = (float(np.asarray(scalars["chunk_shape"])),) * d
    if "base_bin_shape" in scalars:
        base_bin_shape = (float(np.asarray(scalars["base_bin_shape"])),) * d
    if bounds is None:
        bounds = ([0.0] * d, [DEFAULT_BOUNDS_SIDE] * d)
    lo = tuple(float(v) for v in bounds[0])
    hi = tuple(float(v) for v in bounds[1])
    if chunk_shape is None:
        chunk_shape = tuple(max(h - l_, 1e-12) for l_, h in zip(lo, hi))
    if cross_level_storage not in LINK_STORAGE:
        raise MetadataError(f"cross_level_storage must be one of {LINK_STORAGE}, got {cross_level_storage!r}")
    if isinstance(cross_level_depth, bool) or not isinstance(cross_level_depth, (int, np.integer)) \
            or int(cross_level_depth) not in (0, 1):
        raise MetadataError(f"cross_level_depth must be 0 or 1 (zv-dask writes +-1 links), got {cross_level_depth!r}")
    if (int(cross_level_depth) == 0) != (cross_level_storage == "none"):
        raise MetadataError(f"cross_level_depth={cross_level_depth} contradicts cross_level_storage="
                            f"{cross_level_storage!r}: use depth 0 with 'none', depth 1 otherwise")
    meta = RootMetadata(
        chunk_shape=tuple(float(c) for c in np.asarray(chunk_shape, float).reshape(-1)),
        bounds=(lo, hi),
        axes=_normalise_axes(axes, d),
        base_bin_shape=(tuple(float(b) for b in np.asarray(base_bin_shape, float).reshape(-1))
                        if base_bin_shape is not None else None),
        geometry_types=list(geometry_types) if geometry_types is not None else ["point_cloud"],
        crs=crs,
        attribute_specs=attribute_specs,
        cross_level_depth=int(cross_level_depth),
        cross_level_storage=cross_level_storage,
    )
    grid = Grid(lo, hi, meta.chunk_shape, meta.effective_bin_shape, vdt.name)  # validates geometry
    check_creatable(path)
    be = resolve_backend(path, mode="w", backend=backend, storage_options=storage_options, branch=branch, create=True)
    if be.kind == "local" and be.url and local_path(be.url).exists() and not local_path(be.url).is_dir():
        raise StoreError(f"cannot create a store at {be.url!r}: it is a file, a store needs a directory")
    exists_message = f"a store already exists at {be.url or path!r}; pass overwrite=True to replace it"
    if _exists(be) and not overwrite:
        raise StoreError(exists_message)
    try:
        if overwrite or be.kind == "icechunk":  # icechunk: two jobs end in one commit and a conflict
            root = zarr.open_group(be.store, mode="w", zarr_format=3)
        else:
            _claim(be, exists_message)
            root = zarr.open_group(be.store, mode="r+", zarr_format=3)
    except OSError as e:  # an existing directory this process may not write (read-only, no permission)
        if be.kind != "local":
            raise
        where = str(local_path(be.url)) if be.url else str(path)
        named = f" ({e.filename})" if e.filename and not str(e.filename).startswith(where) else ""
        raise StoreError(f"cannot make a store at {where!r}: {e.strerror or type(e).__name__}{named}") from None
    except ZVError:
        raise
    except Exception as e:
        raise StoreError(f"cannot make a store at {be.url or path!r}: {cause_text(e)}") from e
    zs = ZVStore(be, root, "r+")
    root.attrs.put({
        "zarr_vectors": meta.to_dict(),
        "multiscales": multiscales_block(meta.axes, meta.effective_bin_shape, {0: meta.effective_bin_shape}),
        "ome": ome_block(store_name(be.url), meta.axes, [0]),
    })
    lg = root.create_group("0")
    lg.attrs.update(LevelMetadata(level=0, arrays_present=["vertices", "vertex_fragments"],
                                  fragments_tile=True).to_dict())
    create_vlen_array(lg, "vertices", grid, vertices_attrs(vdt.name, [], grid.origin))
    create_vlen_array(lg, "vertex_fragments", grid, fragments_attrs([], grid.origin))
    return zs


def _create_arguments(chunk_shape, base_bin_shape, bounds, ndim, axes, vertex_dtype):
    """:func:`create_store`'s geometry arguments as numbers (``MetadataError`` naming one that is not)."""

    def floats(name, value, pair=False):
        if value is None:
            return None
        try:
            if isinstance(value, (str, bytes)) or (not pair and isinstance(value, dict)):
                raise TypeError
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise MetadataError(f"{name} must be " + ("(min_corner, max_corner), two lists of numbers"
                                                      if pair else "a number or a list of numbers")
                                + f", got {value!r}") from None
        if pair and (arr.ndim != 2 or arr.shape[0] != 2):
            raise MetadataError(f"{name} must be (min_corner, max_corner), two lists of numbers, got {value!r}")
        if not pair and arr.ndim > 1:
            raise MetadataError(f"{name} must be a number or a list of numbers, got {value!r}")
        if not pair and arr.ndim == 0:
            return float(arr)
        return [list(map(float, c)) for c in arr] if pair else tuple(map(float, arr))

    chunk_shape = floats("chunk_shape", chunk_shape)
    base_bin_shape = floats("base_bin_shape", base_bin_shape)
    if bounds is not None:
        try:
            lo, hi = bounds
            bounds = (floats("bounds", lo), floats("bounds", hi))
            if np.ndim(bounds[0]) == 0 or np.ndim(bounds[1]) == 0 or len(bounds[0]) != len(bounds[1]):
                raise TypeError
        except (TypeError, ValueError, MetadataError):
            if isinstance(bounds, (list, tuple)) and len(bounds) == 2 and all(
                    isinstance(b, (list, tuple, np.ndarray)) for b in bounds):
                raise MetadataError(f"bounds must be (min_corner, max_corner) with one number per axis in each, "
                                    f"got {bounds!r}") from None
            raise MetadataError(f"bounds must be (min_corner, max_corner), two lists of numbers, got {bounds!r}") \
                from None
    if ndim is not None and (isinstance(ndim, bool) or not isinstance(ndim, (int, np.integer)) or ndim < 1):
        raise MetadataError(f"ndim must be a positive integer, got {ndim!r}")
    if axes is not None and (isinstance(axes, (str, bytes, dict)) or not hasattr(axes, "__len__")):
        raise MetadataError(f"axes must be a list of axis names (or dicts with 'name'), got {axes!r}")
    try:
        vdt = np.dtype(vertex_dtype)
    except TypeError:
        raise MetadataError(f"vertex_dtype {vertex_dtype!r} is not a numpy dtype; use float32 or float64") from None
    if vdt.name not in ("float32", "float64"):
        raise MetadataError(f"vertex_dtype must be a float type (float32 or float64), got {vertex_dtype!r}")
    return chunk_shape, base_bin_shape, bounds, ndim, axes, vdt


def open_store(path: StoreLike, mode: str = "r", *, backend: str | None = None, storage_options: dict | None = None,
               branch: str = "main") -> ZVStore:
    """Open an existing ZV store; ``mode`` is ``"r"`` or ``"r+"``."""
    if mode not in ("r", "r+"):
        raise StoreError(f"open_store mode must be 'r' or 'r+', got {mode!r} (use create_store to make one)")
    if isinstance(path, ZVStore):
        return path
    try:
        be = resolve_backend(path, mode=mode, backend=backend, storage_options=storage_options, branch=branch)
    except ZVError:
        raise
    except Exception as e:
        raise StoreError(f"cannot open the store at {str(path)!r}: {cause_text(e)}") from e
    if be.kind == "local" and be.url and not local_path(be.url).exists():
        raise StoreError(f"no store at {be.url!r}: the path does not exist")
    if be.kind == "local" and be.url and not local_path(be.url).is_dir():
        raise StoreError(f"not a ZV store at {be.url!r}: it is a file, a store is a directory")
    try:
        root = zarr.open_group(be.store, mode="r" if mode == "r" else "r+", zarr_format=3)
    except (zarr.errors.GroupNotFoundError, FileNotFoundError, KeyError, ValueError) as e:
        raise StoreError(f"not a ZV store at {be.url or path!r}: no zarr v3 group there ({type(e).__name__})"
                         + _unfinished_note(be)) from None
    except Exception as e:
        raise StoreError(f"cannot read the store at {be.url or path!r}: {cause_text(e)}") from e
    if "zarr_vectors" not in root.attrs:
        if "zv_dask_creating" in root.attrs:  # the claim of create_store: its metadata follow in a moment
            raise StoreBusyError(f"another job is creating a store at {be.url or path!r} right now: wait for it to "
                                 "finish (if no job is running, one was killed as it began: pass overwrite=True)")
        raise StoreError(f"not a ZV store at {be.url or path!r}: the root group has no 'zarr_vectors' attributes")
    zs = ZVStore(be, root, mode)
    zs.metadata  # noqa: B018 - parse strictly; raises MetadataError on malformed roots
    if mode == "r" and zs.unfinished_job:
        import warnings

        warnings.warn(f"{zs.url or 'the store'} has an {zs.unfinished_job}", UnfinishedJobWarning, stacklevel=2)
    return zs


def _unfinished_note(be) -> str:
    """``"; it has an unfinished ingest job (...)"`` when a job that would make it one was interrupted."""
    try:
        journal = journal_for(be)
        doc = journal.job() if journal is not None else None
    except Exception:  # noqa: BLE001 - only a hint
        return ""
    return "" if doc is None or journal is None else f" yet; it has an {unfinished_message(doc, journal)}"


def as_store(store, mode: str = "r", **kw) -> ZVStore:
    """Accept a :class:`ZVStore` or anything :func:`open_store` opens."""
    return store if isinstance(store, ZVStore) else open_store(store, mode, **kw)


# -- metadata -------------------------------------------------------------------------
def read_root_metadata(store: ZVStore) -> RootMetadata:
    """Parse the root metadata."""
    return as_store(store).metadata


def write_root_metadata(store: ZVStore, meta: RootMetadata, level_bins: dict[int, tuple] | None = None,
                        extra: dict | None = None) -> None:
    """Rewrite the root attributes (``zarr_vectors``, ``multiscales``, ``ome``) from ``meta``.

    ``extra`` are other root attributes to set at the same time (zv-dask's own
    ``zv_dask`` block: the options the pyramid was built with).
    """
    attrs = attrs_of(store.root)
    if level_bins is None:
        level_bins = level_bins_from_multiscales(attrs)
        level_bins[0] = meta.effective_bin_shape
    levels = sorted(level_bins)
    ome = ome_block(store_name(store.url), meta.axes, levels)
    old = attrs.get("ome")
    if isinstance(old, dict):
        ome = {**old, **{k: ome[k] for k in ("version", "type", "nodes", "attributes")},
               "name": old.get("name", ome["name"])}
    extra = dict(extra or {})
    if isinstance(extra.get("zv_dask"), dict) and isinstance(attrs.get("zv_dask"), dict):
        extra["zv_dask"] = {**attrs["zv_dask"], **extra["zv_dask"]}  # one block, several writers (las, pyramid)
    store.root.attrs.update({
        "zarr_vectors": meta.to_dict(),
        "multiscales": multiscales_block(meta.axes, meta.effective_bin_shape, level_bins),
        "ome": ome,
        **extra,
    })


def read_level_metadata(store: ZVStore, level: int) -> LevelMetadata:
    """Parse a level's metadata; ``bin_shape``/``bin_ratio`` come from the NGFF block."""
    store = as_store(store)
    lm = LevelMetadata.from_attrs(get_resolution_level(store, level).attrs.asdict())
    base = store.metadata.effective_bin_shape
    bins = level_bins_from_multiscales(store.root.attrs.asdict())
    if level in bins:
        lm.bin_shape = bins[level]
        lm.bin_ratio = tuple(float(b) / float(a) for b, a in zip(bins[level], base))
    return lm


def get_resolution_level(store: ZVStore, level: int) -> zarr.Group:
    """The zarr group of a level; :class:`StoreError` if it does not exist."""
    store = as_store(store)
    try:
        g = store.root[str(int(level))]
    except KeyError:
        raise StoreError(f"resolution level {level} not found; the store has levels "
                         f"{list_resolution_levels(store)}") from None
    if not isinstance(g, zarr.Group):
        raise StoreError(f"{level!r} in the store is not a group")
    return g


def list_resolution_levels(store: ZVStore) -> list[int]:
    """Sorted integer level groups of the store."""
    store = as_store(store)
    out = []
    with warnings.catch_warnings():
        # zarr warns of every child that is not a node: a job's journal, scratch, or the empty "directory"
        # that S3 servers built on a file system (SeaweedFS, ...) list where a journal was
        warnings.filterwarnings("ignore", message=r"Object at .* is not recognized as a component")
        members = list(store.root.members())
    for name, node in members:
        if isinstance(node, zarr.Group):
            try:
                out.append(int(name))
            except ValueError:
                continue
    return sorted(out)


def _upsert_level_bins(store: ZVStore, level: int, bin_shape) -> None:
    meta = store.metadata
    bins = level_bins_from_multiscales(store.root.attrs.asdict())
    bins[0] = meta.effective_bin_shape
    if bin_shape is not None:
        bins[level] = tuple(float(b) for b in bin_shape)
    elif level not in bins:
        bins[level] = meta.effective_bin_shape
    existing = set(list_resolution_levels(store)) | {level}
    write_root_metadata(store, meta, {k: v for k, v in bins.items() if k in existing})


def create_resolution_level(store: ZVStore, level: int, level_metadata: LevelMetadata) -> zarr.Group:
    """Create (or replace the metadata of) a level group; its bin geometry goes to NGFF."""
    store._require_writable()
    level_metadata.validate()
    g = store.root.require_group(str(int(level)))
    g.attrs.update(level_metadata.to_dict())
    _upsert_level_bins(store, level, level_metadata.bin_shape if level else None)
    return g


def add_resolution_level(store: ZVStore, level_index: int, bin_ratio: int | Sequence[int], *,
                         object_sparsity: float = 1.0, coarsening_method: str = "manual",
                         parent_level: int | None = None) -> zarr.Group:
    """Add an empty level whose bins are ``bin_ratio`` times the base bin."""
    store._require_writable()
    if str(level_index) in store.root:
        raise StoreError(f"resolution level {level_index} already exists")
    meta = store.metadata
    ratio = tuple(float(r) for r in np.broadcast_to(np.asarray(bin_ratio, float), (meta.ndim,)))
    if any(r < 1 for r in ratio):
        raise MetadataError(f"bin_ratio must be >= 1 on every axis, got {list(ratio)}")
    bin_shape = tuple(b * r for b, r in zip(meta.effective_bin_shape, ratio))
    lm = LevelMetadata(level=level_index, arrays_present=["vertices", "vertex_fragments"],
                       object_sparsity=object_sparsity, coarsening_method=coarsening_method,
                       parent_level=max(0, level_index - 1) if parent_level is None else parent_level,
                       bin_shape=bin_shape)
    g = create_resolution_level(store, level_index, lm)
    grid = store.grid(level_index)
    create_vlen_array(g, "vertices", grid, vertices_attrs(grid.dtype, [], grid.origin))
    create_vlen_array(g, "vertex_fragments", grid, fragments_attrs([], grid.origin))
    return g


def remove_resolution_level(store: ZVStore, level_index: int) -> None:
    """Delete a level (never level 0) and its NGFF / RFC-8 entries."""
    store._require_writable()
    if int(level_index) == 0:
        raise StoreError("level 0 holds the full-resolution data and cannot be removed")
    get_resolution_level(store, level_index)
    del store.root[str(int(level_index))]
    meta = store.metadata
    bins = level_bins_from_multiscales(store.root.attrs.asdict())
    bins.pop(int(level_index), None)
    bins[0] = meta.effective_bin_shape
    write_root_metadata(store, meta, {k: v for k, v in bins.items() if k in set(list_resolution_levels(store))})


def list_available_ratios(store: ZVStore) -> list[tuple[float, ...]]:
    """Bin ratio (level bin / base bin) of every level, level 0 first."""
    store = as_store(store)
    return [tuple(float(b) / float(a) for b, a in zip(store.level_bin_shape(k), store.metadata.effective_bin_shape))
            for k in list_resolution_levels(store)]


def write_parametric_types(store: ZVStore, types: list[dict]) -> None:
    """Store a registry of parametric types under ``/parametric``."""
    store._require_writable()
    g = store.root.require_group(PARAMETRIC)
    g.attrs.update({"parametric_types": [dict(t) for t in types]})


def read_parametric_types(store: ZVStore) -> list[dict]:
    """The parametric type registry (empty when none was written)."""
    store = as_store(store)
    if PARAMETRIC not in store.root:
        return []
    return list(attrs_of(group_at(store.root, PARAMETRIC)).get("parametric_types", []))


def store_info(store: StoreLike, *, storage_options: dict | None = None, backend: str | None = None,
               branch: str = "main") -> dict[str, Any]:
    """A JSON-ready summary: format, geometry, and per level counts, bins, chunks, attributes and compression
    (the codec after ``vlen-bytes`` of the level's ``vertices`` array: ``{"name", "level"}``)."""
    store = as_store(store, storage_options=storage_options, backend=backend, branch=branch)
    meta = store.metadata
    levels = []
    unfinished = store.unfinished_job
    for k in list_resolution_levels(store):
        if unfinished and "zarr_vectors_level" not in store.root[str(k)].attrs:
            continue  # a level the unfinished job has not finished
        not_yet = store.unfinished_level(k) if unfinished else None
        lm = read_level_metadata(store, k)
        g = get_resolution_level(store, k)
        vertices = array_at(g, "vertices") if "vertices" in g else None
        entry: dict[str, Any] = {
            "level": k,
            "vertex_count": lm.vertex_count,
            "bin_shape": list(store.level_bin_shape(k)),
            "bin_ratio": list(lm.bin_ratio) if lm.bin_ratio else [1.0] * meta.ndim,
            "chunk_shape": list(store.level_chunk_shape(k)),
            "coarsening_method": lm.coarsening_method,
            "object_sparsity": lm.object_sparsity,
            "arrays_present": lm.arrays_present,
            "nonempty_chunks": len(attrs_of(vertices).get("nonempty_chunks", [])) if vertices is not None else 0,
            "compression": compression_of(vertices) if vertices is not None else None,
        }
        if "vertex_attributes" in g:
            entry["attributes"] = {
                name: {"dtype": attrs_of(a).get("dtype"), "channels": (attrs_of(a).get("row_shape") or [1])[0]}
                for name, a in group_at(g, "vertex_attributes").arrays()
            }
        if "object_index" in g:
            entry["num_objects"] = int(attrs_of(group_at(g, "object_index")).get("num_objects", 0))
        if "links" in g:
            entry["links"] = {name: int(attrs_of(fam).get("num_links", 0))
                              for name, fam in sorted(group_at(g, "links").groups())}
        if not_yet:
            entry["unfinished"] = not_yet
        levels.append(entry)
    return {
        "zv_version": meta.zv_version,
        "geometry_types": meta.geometry_types,
        "ndim": meta.ndim,
        "axes": meta.axis_names,
        "chunk_shape": list(meta.chunk_shape),
        "base_bin_shape": list(meta.base_bin_shape) if meta.base_bin_shape else None,
        "bins_per_chunk": list(meta.bins_per_chunk),
        "bounds": [list(meta.bounds[0]), list(meta.bounds[1])],
        "format_capabilities": meta.format_capabilities,
        "cross_level_links": {"depth": int(meta.cross_level_depth), "storage": meta.cross_level_storage},
        "crs": meta.crs,
        "las": _las_summary(store.root.attrs.get("zv_dask")),
        "backend": store.backend.kind,
        "levels": levels,
        "parametric_types": read_parametric_types(store),
        "unfinished_job": unfinished,
    }


def _las_summary(block) -> dict | None:
    """The LAS header record of the root's ``zv_dask`` block (``None`` for other inputs)."""
    las = block.get("las") if isinstance(block, dict) else None
    return las if isinstance(las, dict) else None


# -- transactions ---------------------------------------------------------------------
def session_for(store: ZVStore) -> icechunk.Session | None:
    """The writable icechunk session behind the store, or ``None``."""
    return as_store(store).session


def commit(store: ZVStore, message: str = "zv-dask write", *, rebase_tries: int = 0) -> str | None:
    """Commit pending icechunk changes; returns the snapshot id (``None`` for plain stores).

    ``rebase_tries > 0``: when another writer committed to the branch meanwhile,
    icechunk rebases the changes onto its commit (``ConflictDetector``: only when
    the two touched different nodes) up to that many times, then commits.
    """
    s = session_for(store)
    if s is None:
        return None
    if not s.has_uncommitted_changes:
        return s.snapshot_id
    if rebase_tries > 0:
        import icechunk

        snap = s.commit(message, rebase_with=icechunk.ConflictDetector(), rebase_tries=rebase_tries)
    else:
        snap = s.commit(message)
    # A committed session is spent in icechunk 2; continue on a fresh one on the same branch.
    repo = store.backend.repository
    if repo is not None:
        fresh = repo.writable_session(store.backend.branch)
        store.backend.session = fresh
        store.backend.store = fresh.store
        store.root = zarr.open_group(fresh.store, mode="r+", zarr_format=3)
    return snap


def discard_changes(store: ZVStore) -> None:
    """Drop uncommitted icechunk changes (no-op for plain stores)."""
    s = session_for(store)
    if s is None:
        return
    s.discard_changes()
    store.root = zarr.open_group(store.backend.store, mode="r+", zarr_format=3)


def rebind(store: ZVStore, backend: str | Any, **storage_options) -> ZVStore:
    """Reopen the same location through another driver (e.g. ``"obstore"``) without moving data."""
    if isinstance(backend, str):
        if store.url is None:
            raise StoreError("this store was opened from an object, not a URL; pass a zarr Store to rebind to")
        return open_store(store.url, store.mode, backend=backend, storage_options=storage_options)
    return open_store(backend, store.mode)
