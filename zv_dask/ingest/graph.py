"""``ingest``: the level-0 job (and its pyramid), wired as two Dask passes and a coordinator.

1. *scan*: per partition, statistics and (sampled) per-chunk counts, reduced on
   the client, which settles the bounds (the out-of-bounds policy) before
   anything is written; in-memory input is scanned in the client while it
   travels to the workers;
2. the coordinator creates (or resets) the store with the final bounds, plans
   which coarse levels the write tasks can build (:mod:`zv_dask.ingest.fused`),
   creates their arrays, and cuts the occupied write units into groups;
3. *shuffle + write*: each partition is binned and split by group with a radix
   sort; each group task concatenates its pieces in input order, lays them out,
   writes its level-0 cells and builds the fused coarse levels and their links
   (no two tasks share a chunk, a shard or a pyramid region);
4. the coordinator writes the metadata last, builds the remaining levels in
   rounds, and commits once on icechunk.

Each finished write group, pyramid task and round is recorded in the job's
journal (:mod:`zv_dask.store.journal`, :mod:`zv_dask.ingest.resume`), so a
killed or failed job keeps its finished work and ``resume=True`` continues it;
a job that fails before finishing anything is undone
(:mod:`zv_dask.ingest.recovery`).
"""

from __future__ import annotations

import os
import time

from zv_dask.budget import resolve_budget
from zv_dask.errors import InputError
from zv_dask.ingest.append import append_points
from zv_dask.ingest.fused import pyramid_options
from zv_dask.ingest.job import PreparedIngest, prepare
from zv_dask.ingest.options import MODES, IngestOptions
from zv_dask.ingest.plan import preflight
from zv_dask.ingest.report import IngestReport
from zv_dask.ingest.resume import JobRecorder, input_fingerprint, job_options
from zv_dask.lazy import PendingIngest, absolute, make_job
from zv_dask.options import takes_options
from zv_dask.scheduling import resolve_client, task_slots
from zv_dask.types import ClientLike, PointsLike, StoreLike

__all__ = ["ingest", "prepare_ingest", "PreparedIngest", "IngestOptions", "MODES"]

_PREPARE = object()  # ingest(compute=_PREPARE): what prepare_ingest asks for


@takes_options(IngestOptions)
def ingest(points: PointsLike, store: StoreLike, *, client: ClientLike = None, compute: bool = True,
           **options) -> IngestReport | PendingIngest | PreparedIngest:
    """Ingest a point cloud into level 0 of a ZV store, in parallel, and optionally build its pyramid.

    The keyword options are the fields of :class:`~zv_dask.ingest.options.IngestOptions`
    (checked together, before anything is read); :func:`~zv_dask.plan_ingest` takes the same.

    Parameters
    ----------
    points
        ``(N, D)`` numpy or dask array; pandas or dask DataFrame (``columns`` name
        the coordinates, other numeric columns become attributes unless
        ``attributes=[...]`` picks); xarray Dataset; or path(s)/glob of Parquet,
        CSV, NPY, zarr or LAS/LAZ files.
    store
        Path, URL (``s3://``, ``gs://``, ``az://``...), zarr Store, or icechunk
        Repository/Session (``backend="icechunk"`` for a repository path/URL).
    attributes, object_ids
        Per-point attributes ``{name: (N,) or (N, C)}`` and integer object ids
        (arrays for array inputs; column/variable names for tables and Datasets).
    chunk_shape, bounds, base_bin_shape
        Store geometry in world units (taken from an existing empty store).
        ``bounds=None`` fits the data exactly.
    out_of_bounds
        ``"raise"`` (default), ``"ignore"`` (drop and count) or ``"expand"``.
    dtype
        Stored position dtype; default float32, float64 for LAS/LAZ.
    shard_shape
        Chunks per shard (zarr sharding); one task writes each shard.
    pyramid
        ``True`` or a dict of :func:`zv_dask.build_pyramid` options to build
        the levels in the same job (and the same icechunk commit).
    client
        A ``distributed.Client``; by default the current one, else Dask's local scheduler.
    compute
        ``False`` returns a :class:`~zv_dask.lazy.PendingIngest`, a Dask collection
        that runs the job when computed (``dask.compute``, ``.compute()``,
        ``client.compute`` / ``persist``, watched with ``distributed.progress``) and
        returns this report. Making it checks the input and the options and makes
        paths absolute; nothing is written until it is computed. It runs on the
        cluster that computes it (``client`` is not kept), and the store must be
        a path, URL or icechunk Repository (a writable Session cannot travel).
    memory_budget
        Bytes (or a size like ``"2GiB"``) of data the job may hold per worker, on
        top of the worker process itself; by default half the workers' memory
        limit. It caps the points per task, and when the shuffle's pieces would
        not fit beside the running tasks they wait on ``scratch`` storage instead
        of in memory (the same bytes are written either way).
    scratch
        Where a staged shuffle keeps its pieces: a path or an object-store URL
        every worker reaches (``storage_options`` apply). By default a
        ``.zv-scratch`` prefix inside the store (beside an icechunk repository);
        removed when the job ends.
    resume
        Continue the unfinished job in ``store`` (killed, or failed after it
        wrote something): the same input and options, checked against the job's
        journal; the groups and pyramid tasks it finished are not redone, and the
        store ends byte-identical to an uninterrupted run's. Without an
        unfinished job the whole job runs.
    mode
        ``"write"`` (default): a new store, or an empty one made by
        :func:`~zv_dask.create_store`. ``"append"``: add the points to a store
        that holds points; its geometry applies, the points must carry the same
        attributes (and object ids if it has them), only the level-0 chunks they
        touch and the pyramid regions above them are rewritten, and the store
        ends byte-identical to an ingest of all the points. A failed append
        leaves the store as it was (on a plain store it is rolled back from a
        journal; a killed one is undone with ``resume=True`` or
        :func:`~zv_dask.roll_back`).
    crs
        The points' coordinate reference system, written to the root ``crs``:
        ``"EPSG:32610"``, an EPSG number, WKT, PROJJSON or a dict. LAS/LAZ
        files bring theirs (WKT VLR or GeoTIFF keys; files with different CRS
        are refused); a ``crs`` given overrides them.
    reproject
        A CRS to transform the positions to before anything else (as ``crs``;
        needs pyproj, the ``crs`` extra), from ``crs`` or each LAS file's own,
        so files in different CRSs can be one job. The root ``crs`` is this one;
        see :mod:`zv_dask.ingest.reproject`.
    compression, compression_level
        Codecs after ``vlen-bytes`` on every array the job makes (level 0,
        coarse levels, links, object indexes): ``"zstd"`` (default, as
        ``None``), ``"blosc"`` or ``"none"``, with a level (default zstd 3,
        blosc 5); see :mod:`zv_dask.format.codecs`. An append keeps the store's.
    durable
        Keep the job's journal (and on icechunk, its checkpoints on a job
        branch) while it runs, so that a killed job can resume (default). With
        ``False`` a failed job is undone as a whole and cannot resume.

    Returns
    -------
    IngestReport
    """
    opts = IngestOptions.of(options)  # every option checked before anything is read
    if compute is False:
        return _pending(points, store, opts, client)
    t0 = time.perf_counter()
    cl = resolve_client(client)
    slots = task_slots(cl)
    budget = resolve_budget(opts.memory_budget, cl)
    src, plan, dt, dt_reason = preflight(points, store, opts, budget=budget, slots=slots)
    if opts.appends:
        return append_points(src, plan, cl, slots, budget, t0, out_of_bounds=opts.out_of_bounds,
                             group_points=opts.group_points, scratch=opts.scratch, pyramid=opts.pyramid,
                             message=opts.message, progress=opts.progress, resume=opts.resume, dtype_reason=dt_reason,
                             options=job_options(attributes=sorted(src.attributes), object_ids=src.has_object_ids,
                                                 out_of_bounds=opts.out_of_bounds,
                                                 **({"reproject": opts.reproject} if opts.reproject is not None
                                                    else {})))
    pyramid_opts = pyramid_options(opts.pyramid, src.ndim, budget)  # checked before anything is read or written
    rec = JobRecorder(plan.resume_state, opts.record(src), input_fingerprint(points, src), enabled=opts.durable)
    try:
        prepared = prepare(src, plan, opts, pyramid_opts, rec, cl, slots, budget, t0, plan.dtype, dt_reason)
        return prepared if compute is _PREPARE else prepared.run()
    except BaseException:
        rec.release()  # (the job's lease; released already unless cleaning up failed)
        raise


@takes_options(IngestOptions)
def prepare_ingest(points: PointsLike, store: StoreLike, *, client: ClientLike = None, **options) -> PreparedIngest:
    """:func:`ingest` up to its first task: the input scanned, the bounds settled, the store made
    and the write graph built; :meth:`PreparedIngest.run` runs the rest.

    For acting between the two (a concurrent writer in a test, a look at the graph); a job
    prepared and never run leaves its store as an unfinished job (``resume`` or ``overwrite``).
    """
    if options.get("mode", "write") == "append":
        raise InputError("an append cannot be prepared apart from its run; run it, or make it lazy with "
                         "compute=False")
    return ingest(points, store, client=client, compute=_PREPARE, **options)


def _pending(points, store, opts: IngestOptions, client) -> PendingIngest:
    """``ingest(compute=False)``: check what can be checked without writing, then a job that runs the rest."""
    points = [absolute(p) for p in points] if isinstance(points, (list, tuple)) and points and all(
        isinstance(p, (str, os.PathLike)) for p in points) else absolute(points)
    store = absolute(store)
    cl = resolve_client(client)
    src, _, _, _ = preflight(points, store, opts, budget=resolve_budget(opts.memory_budget, cl), slots=task_slots(cl))
    if not opts.appends:
        pyramid_options(opts.pyramid, src.ndim)
    if opts.scratch is not None:
        opts = opts.replace(scratch=absolute(opts.scratch))
    return make_job(PendingIngest, ingest, (points, store), opts.to_dict(), store)
