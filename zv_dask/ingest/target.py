"""Decide what store a job writes to, before anything is written.

A job either creates a store, or fills an existing *empty* ("warm") store made
by :func:`zv_dask.create_store`, whose chunk shape, bins, dtype and bounds then
apply. A store that already holds points is refused unless ``overwrite=True``:
zv-dask never half-overwrites.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zv_dask.errors import InputError, StoreBusyError, StoreError
from zv_dask.format.grid import Grid
from zv_dask.format.metadata import store_name
from zv_dask.ingest.replace import OBJECT_SCHEMES, finish_swap, refuse_object_overwrite, replacement_path
from zv_dask.ingest.resume import ResumeState
from zv_dask.store.api import ZVStore, create_store, name_store, open_store, write_root_metadata
from zv_dask.store.backends import check_creatable, local_path, url_scheme
from zv_dask.store.journal import job_branch_name, journal_at, journal_for, unfinished_message
from zv_dask.store.nodes import array_at, attrs_of, group_at

__all__ = ["TargetPlan", "plan_target", "materialize_target"]


@dataclass
class TargetPlan:
    target: Any  # what the user gave: a path, URL or store object
    existing: ZVStore | None
    ndim: int
    chunk_shape: tuple
    base_bin_shape: tuple | None
    bounds: tuple | None
    dtype: str
    axes: list | None
    backend: str | None
    storage_options: dict | None
    overwrite: bool
    branch: str = "main"
    resume_state: ResumeState | None = None  # the unfinished job a resuming ingest continues
    notes: list | None = None  # what the plan noticed (e.g. nothing to resume)
    build_at: str | None = None  # an overwrite builds the new store here (beside the old one) ...
    replaces: str | None = None  # ... and swaps it in here when the job is done (see zv_dask.ingest.replace)


def _probe(store, backend, storage_options, branch) -> ZVStore | None:
    if isinstance(store, ZVStore):
        return store
    if isinstance(store, os.PathLike):
        store = os.fspath(store)
    if backend != "icechunk" and isinstance(store, str) and url_scheme(store) in ("", "file"):
        p = local_path(store)
        if not p.exists() or (p.is_dir() and not any(p.iterdir())):
            return None
    if backend == "icechunk" and isinstance(store, str) and url_scheme(store) in ("", "file") \
            and not local_path(store).exists():
        check_creatable(store)  # a file in the way, a read-only place: said before icechunk's own error
    try:
        return open_store(store, "r+", backend=backend, storage_options=storage_options, branch=branch)
    except StoreBusyError:
        raise
    except StoreError:
        if backend == "icechunk" or not isinstance(store, str) or url_scheme(store) not in ("", "file"):
            return None
        raise StoreError(f"{store!r} exists and is not a ZV store; refusing to write into it") from None


def _on_job_branch(store, storage_options, branch) -> ZVStore | None:
    """An interrupted job's store on its job branch, when the user's branch holds no store yet (a new repository)."""
    journal = journal_at(store, icechunk=True, options=storage_options, branch=branch)
    if journal is None or journal.job() is None:
        return None
    try:
        zs = open_store(store, "r+", backend="icechunk", storage_options=storage_options,
                        branch=job_branch_name(branch))
    except StoreError:
        return None
    zs.backend.branch = branch  # the job's branch is where it goes on; the user's is where it ends
    return zs


def _local_target(store, existing: ZVStore | None, backend) -> Path | None:
    """The directory of a plain local target (existing or not), else ``None`` (icechunk, object storage...)."""
    if backend == "icechunk" or (existing is not None and existing.session is not None):
        return None
    if existing is not None:
        be = existing.backend
        return local_path(be.url) if be.kind == "local" and be.url else None
    if isinstance(store, os.PathLike) or (isinstance(store, str) and url_scheme(store) in ("", "file")):
        return local_path(store)
    return None


def _unfinished_replacement(target: Path, backend) -> ZVStore | None:
    """The store a killed overwrite of ``target`` was building, when it holds an unfinished ingest job."""
    finish_swap(target)  # our own leftovers of a swap killed between its renames: completed, nothing else moves
    beside = replacement_path(target)
    if not beside.is_dir():
        return None
    try:
        zs = open_store(str(beside), "r+", backend=backend)
    except StoreError:
        return None
    journal = journal_for(zs.backend)
    doc = journal.job() if journal is not None else None
    return zs if doc is not None and doc.get("kind") == "ingest" else None


def _changed_under(where, e: KeyError) -> StoreBusyError:
    """A node found a moment before is gone: another job is making the store (or its level 0) right now."""
    return StoreBusyError(f"another job is writing this store ({where}): its {e.args[0] if e.args else 'metadata'!r} "
                          "changed while this job read it; wait for that job to finish, or pass overwrite=True")


def still_empty(plan) -> None:
    """Under the job's lease: the empty store the plan found is still empty and has no other job's journal."""
    try:
        _still_empty(plan)
    except KeyError as e:
        raise _changed_under(plan.existing.url or plan.target, e) from None


def _still_empty(plan) -> None:
    import zarr

    be = plan.existing.backend
    root = zarr.open_group(be.store, mode="r", zarr_format=3)  # read afresh, not the plan's cached view
    where = plan.existing.url or plan.target
    if "0" in root and "vertices" in group_at(root, "0") and \
            attrs_of(array_at(root, "0/vertices")).get("nonempty_chunks"):
        raise StoreError(f"the store at {where!r} already holds points (another job wrote them while this one "
                         "scanned its input); pass overwrite=True to replace it, or mode='append' to add the points "
                         "to it")
    journal = journal_for(be)
    doc = journal.read_json("job.json") if journal is not None else None
    if journal is not None and doc is not None:
        raise StoreError(f"{where} has an {unfinished_message(doc, journal)}")


def _has_points(zs: ZVStore) -> bool:
    if "0" not in zs.root or "vertices" not in group_at(zs.root, "0"):
        return False
    return bool(attrs_of(array_at(zs.root, "0/vertices")).get("nonempty_chunks"))


def _per_axis(name: str, value, ndim: int) -> tuple[float, ...]:
    """A scalar or ``ndim`` numbers as a float tuple; :class:`InputError` names anything else."""
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number or {ndim} numbers, got {value!r}") from None
    if len(arr) not in (1, ndim):
        raise InputError(f"{name} has {len(arr)} values ({value!r}) but the points have {ndim} coordinates; "
                         f"pass one value or {ndim}")
    return tuple(float(c) for c in np.broadcast_to(arr, (ndim,)))


def _unfinished(existing: ZVStore | None, resume: bool, overwrite: bool):
    """The unfinished job in ``existing`` to resume (``None``: none); refuses a plain job into an unfinished store."""
    if existing is None:
        return None
    journal = journal_for(existing.backend)
    doc = journal.job() if journal is not None else None
    if journal is None or doc is None or overwrite:
        return None
    if not resume or doc.get("kind") == "append":
        where = existing.url or "the store"
        if doc.get("kind") in ("ingest", "append"):
            raise StoreError(f"{where} has an {unfinished_message(doc, journal)}")
        return None  # an unfinished pyramid build over finished points: the store holds points (refused below)
    return ResumeState(journal, doc)


def plan_target(store, *, ndim: int, chunk_shape=None, bounds=None, base_bin_shape=None, dtype="float32",
                axes=None, backend=None, storage_options=None, overwrite=False, branch="main",
                resume: bool = False, append: bool = False) -> TargetPlan:
    """Check the target and the geometry without writing anything.

    With ``resume``, an unfinished ingest in the store is the job to continue
    (its geometry applies); a store with no unfinished job is a new job. With
    ``append``, the store must exist and hold a ZV point cloud, whose geometry
    applies (any geometry given must agree with it). A store another job is
    making at this moment raises :class:`~zv_dask.errors.StoreBusyError`.
    """
    try:
        return _plan_target(store, ndim=ndim, chunk_shape=chunk_shape, bounds=bounds, base_bin_shape=base_bin_shape,
                            dtype=dtype, axes=axes, backend=backend, storage_options=storage_options,
                            overwrite=overwrite, branch=branch, resume=resume, append=append)
    except KeyError as e:  # a level 0 array the probe saw is being remade (another job's prepare_level)
        raise _changed_under(os.fspath(store) if isinstance(store, (str, os.PathLike)) else store, e) from None


def _plan_target(store, *, ndim, chunk_shape, bounds, base_bin_shape, dtype, axes, backend, storage_options,
                 overwrite, branch, resume, append) -> TargetPlan:
    if bounds is not None:
        try:
            lo, hi = (np.asarray(b, dtype=np.float64).reshape(-1) for b in bounds)
        except (TypeError, ValueError):
            raise InputError(f"bounds must be (min, max) with {ndim} numbers each, got {bounds!r}") from None
        if len(lo) != ndim or len(hi) != ndim:
            raise InputError(f"bounds must be (min, max) with {ndim} values each, got {bounds!r}")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            raise InputError(f"bounds must be finite, got {bounds!r}")
        if (lo > hi).any():
            raise InputError(f"bounds are inverted: min {lo.tolist()} exceeds max {hi.tolist()} on some axis")
    try:
        dtype = np.dtype(dtype).name
    except TypeError:
        raise InputError(f"dtype {dtype!r} is not a numpy dtype; use float32 or float64") from None
    if np.dtype(dtype).name not in ("float32", "float64"):
        raise InputError(f"dtype must be float32 or float64 for positions, got {dtype!r}")
    try:
        existing = _probe(store, backend, storage_options, branch)
    except StoreBusyError:  # a root claimed by a job that has not written the metadata (or was killed doing so)
        if not overwrite or append:
            raise
        existing = None  # nothing there to keep: overwrite makes the store in its place
    if append:
        return _append_target(store, existing, ndim=ndim, chunk_shape=chunk_shape, bounds=bounds,
                              base_bin_shape=base_bin_shape, backend=backend, storage_options=storage_options,
                              overwrite=overwrite, branch=branch)
    if existing is None and resume and backend == "icechunk":
        existing = _on_job_branch(store, storage_options, branch)
    build_at = replaces = None
    here = _local_target(store, existing, backend)
    if here is not None:
        beside = _unfinished_replacement(here, backend) if resume and not overwrite else None
        if beside is not None:  # a killed overwrite: it goes on beside the store it will replace
            existing = beside
        if beside is not None or (overwrite and existing is not None):
            build_at, replaces = str(replacement_path(here)), str(here)
    elif overwrite and existing is not None and existing.session is None and _has_points(existing) and \
            url_scheme(existing.url or "") in OBJECT_SCHEMES:
        refuse_object_overwrite(existing.url or "")
    if existing is not None:
        existing._require_writable()
    state = _unfinished(existing, resume, overwrite)
    notes = []
    if resume and state is None and not overwrite:
        if existing is not None and _has_points(existing):
            raise StoreError(f"nothing to resume at {existing.url or store!r}: the store holds points and no "
                             "unfinished job (it finished, or was written by a job without a journal); pass "
                             "overwrite=True (--overwrite) to replace it")
        notes.append("nothing to resume: no unfinished job in the store, so the whole job ran")
    if existing is not None and state is None and _has_points(existing) and not overwrite:
        raise StoreError(f"the store at {existing.url or store!r} already holds points; pass overwrite=True to "
                         "replace it, or mode='append' to add the points to it")
    if existing is not None and not overwrite:
        meta = existing.metadata
        if meta.ndim != ndim:
            raise InputError(f"the points have {ndim} coordinates but the store has {meta.ndim} axes")
        if chunk_shape is not None and not np.allclose(_per_axis("chunk_shape", chunk_shape, ndim), meta.chunk_shape):
            raise InputError(f"chunk_shape {np.atleast_1d(chunk_shape).astype(float).tolist()} differs from the "
                             f"store's {list(meta.chunk_shape)}: an empty store keeps the geometry it was made with "
                             "(leave it out, or pass overwrite=True to remake the store)")
        if state is None and base_bin_shape is not None and not np.allclose(
                _per_axis("base_bin_shape", base_bin_shape, ndim), meta.effective_bin_shape):
            raise InputError(f"base_bin_shape {np.atleast_1d(base_bin_shape).astype(float).tolist()} differs from the "
                             f"store's {list(meta.effective_bin_shape)}: an empty store keeps the geometry it was made "
                             "with (leave it out, or pass overwrite=True to remake the store)")
        return TargetPlan(store, existing, ndim, meta.chunk_shape, meta.base_bin_shape,
                          bounds if bounds is not None else meta.bounds, existing.grid(0).dtype,
                          meta.axes, backend, storage_options, overwrite, branch, state, notes, build_at, replaces)
    if chunk_shape is None:
        raise InputError("chunk_shape is required when creating a store (world units per chunk, one per axis)")
    if existing is None:
        check_creatable(store)
    cs = _per_axis("chunk_shape", chunk_shape, ndim)
    bb = _per_axis("base_bin_shape", base_bin_shape, ndim) if base_bin_shape is not None else None
    if axes is not None and len(axes) != ndim:
        raise InputError(f"axes has {len(axes)} entries ({list(axes)!r}) but the points have {ndim} coordinates")
    Grid((0.0,) * ndim, (0.0,) * ndim, cs, bb or cs, np.dtype(dtype).name)  # validate geometry early
    return TargetPlan(store, existing, ndim, cs, bb, bounds, np.dtype(dtype).name, axes, backend,
                      storage_options, overwrite, branch, None, notes, build_at, replaces)


def _append_target(store, existing: ZVStore | None, *, ndim, chunk_shape, bounds, base_bin_shape, backend,
                   storage_options, overwrite, branch) -> TargetPlan:
    where = getattr(existing, "url", None) or (os.fspath(store) if isinstance(store, os.PathLike) else store)
    if overwrite:
        raise InputError("append and overwrite contradict each other: an append keeps the store's points")
    if existing is None:
        raise StoreError(f"cannot append to {where!r}: there is no ZV store there (ingest without append "
                         "to create one)")
    existing._require_writable()
    meta = existing.metadata
    if meta.ndim != ndim:
        raise InputError(f"the new points have {ndim} coordinates but the store at {where!r} has {meta.ndim} axes "
                         f"({', '.join(meta.axis_names)})")
    if chunk_shape is not None and not np.allclose(_per_axis("chunk_shape", chunk_shape, ndim), meta.chunk_shape):
        raise InputError(f"chunk_shape {np.atleast_1d(chunk_shape).astype(float).tolist()} differs from the store's "
                         f"{list(meta.chunk_shape)}: an append keeps the store's geometry (leave it out)")
    if base_bin_shape is not None and not np.allclose(_per_axis("base_bin_shape", base_bin_shape, ndim),
                                                      meta.effective_bin_shape):
        raise InputError(f"base_bin_shape {np.atleast_1d(base_bin_shape).astype(float).tolist()} differs from the "
                         "store's "
                         f"{list(meta.effective_bin_shape)}: an append keeps the store's geometry (leave it out)")
    if bounds is not None:
        raise InputError("an append keeps the store's bounds; out_of_bounds decides what happens to new points "
                         "outside them ('raise', 'ignore' or 'expand')")
    return TargetPlan(store, existing, ndim, meta.chunk_shape, meta.base_bin_shape, meta.bounds,
                      existing.grid(0).dtype, meta.axes, backend, storage_options, False, branch, None, [])


def materialize_target(plan: TargetPlan, final_bounds, attribute_specs: dict | None = None, *, crs: dict | None = None,
                       extra: dict | None = None) -> ZVStore:
    """Create (or reset) the store with the settled bounds, the input's ``crs`` and zv-dask's ``extra``
    root attributes (the LAS header record). The first write of a job."""
    if plan.existing is not None and not plan.overwrite:
        zs = plan.existing
        meta = zs.metadata
        meta.bounds = (tuple(map(float, final_bounds[0])), tuple(map(float, final_bounds[1])))
        if attribute_specs:
            meta.attribute_specs = attribute_specs
        if crs is not None:
            meta.crs = crs
        write_root_metadata(zs, meta, extra=extra)
        return zs
    target = plan.existing if plan.existing is not None else plan.target
    if plan.build_at is not None:  # an overwrite: the new store beside the old one, which stays as it is
        target = plan.build_at
    if isinstance(target, ZVStore):
        # overwrite an open store in place: same backend, fresh root
        import zarr

        be = target.backend
        src = be.session if be.session is not None else (be.url if be.kind == "local" else be.store)
        assert src is not None, "a local backend has a URL"
        zs = create_store(src, bounds=final_bounds, chunk_shape=plan.chunk_shape,
                          base_bin_shape=plan.base_bin_shape, vertex_dtype=plan.dtype, axes=plan.axes,
                          attribute_specs=attribute_specs, crs=crs, overwrite=True)
        if be.session is not None:
            zs.backend = be
            zs.root = zarr.open_group(be.store, mode="r+", zarr_format=3)
    else:
        zs = create_store(target, bounds=final_bounds, chunk_shape=plan.chunk_shape,
                          base_bin_shape=plan.base_bin_shape, vertex_dtype=plan.dtype, axes=plan.axes,
                          attribute_specs=attribute_specs, crs=crs, backend=plan.backend,
                          storage_options=plan.storage_options, branch=plan.branch,
                          overwrite=plan.overwrite or plan.build_at is not None)
    if plan.build_at is not None:  # named after the store it will be, not the place it is built
        name_store(zs, store_name(plan.replaces))
    if extra:
        zs.root.attrs.update(extra)
    return zs
