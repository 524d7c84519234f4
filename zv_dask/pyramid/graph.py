"""The pyramid engine: levels 1..L built from level 0 with Dask, a *batch* of levels per round of tasks.

A batch is a run of consecutive levels ``a..b`` built by one set of tasks. Each
task owns whole regions of level ``b`` (:func:`~zv_dask.pyramid.plan.region_shape`),
and a region of level ``b`` holds whole regions of every level below it, so a
task reads the level ``a-1`` chunks of its regions once and coarsens them level
after level in memory (:mod:`zv_dask.pyramid.stack`), writing each level's cells
and its cross-level links. A batch grows while its regions stay within
``points_per_task`` points and there are enough of them to keep the workers
busy: the small top levels of a pyramid cost one round of tasks, not one each.
An ingest job builds its first batch inside its own write tasks, which already
hold level 0 (see :class:`PyramidBuilder`).

The coordinator creates a batch's arrays before its tasks run and writes each
level's metadata after them (presence lists, object index, link counts, the
level group), level by level, the root last; on icechunk the tasks write through
forks of the job's session, merged before the metadata is written.

Layout notes (ZV format sections 8, 9 and 14.2): coarse levels of plain points
keep the level-0 layout (``prod(bpc)`` range fragments per chunk, fragment = root
base bin of the metavertex), which keeps the reference reader's bbox reads right
at coarse levels. A ``chunk_scale`` other than 1 writes a ``chunk_shape`` on the
level; the reference (0.9.2) then answers bbox reads of that level wrongly,
although whole-level reads and validation are fine. Cross-level links, when the
store declares them (or ``links=`` asks), are the reference's: ``+1`` records
``(fine row, coarse row)`` in the fine level's chunk cells and, for
``"explicit"`` storage, the ``-1`` mirror in the coarse level's. Neither the
``shared_fragments`` capability nor the level flag is stamped: every
metavertex belongs to one bin (plain) or one object (object levels), so no
fragment is shared between manifests, and no reader depends on the flag.
"""

from __future__ import annotations

import time

from zv_dask.errors import IngestError, InputError, StoreError, ZVError, cause_text
from zv_dask.faults import kill_point
from zv_dask.format.codecs import check_compression, compressors_for
from zv_dask.lazy import PendingPyramid, absolute, make_job
from zv_dask.options import takes_options
from zv_dask.pyramid.builder import (
    PyramidBuilder,
    PyramidReport,
    drop_coarse_levels,
    drop_up_links,
    source_from_store,
)
from zv_dask.pyramid.options import PyramidOptions
from zv_dask.pyramid.plan import LINK_STORAGE
from zv_dask.pyramid.rebuild import can_build_beside, finish_rebuild, open_rebuild, swap
from zv_dask.store.api import as_store, list_resolution_levels, read_level_metadata
from zv_dask.store.cellio import sweep_partials
from zv_dask.store.journal import (
    differences,
    job_document,
    job_options,
    journal_for,
    unfinished_message,
    with_resume_hint,
)
from zv_dask.transaction import WriteJob
from zv_dask.types import ClientLike, StoreLike

__all__ = ["build_pyramid", "PyramidReport", "PyramidBuilder", "LINK_STORAGE"]


def _build(store, options: PyramidOptions, *, client, job, progress, resume, message=None, compression=None,
           compression_level=None) -> PyramidReport:
    t0 = time.perf_counter()
    zs = job.store if job is not None else as_store(store, "r+")
    if zs.read_only:
        raise StoreError("build_pyramid needs a writable store; open it with mode='r+'")
    own = job is None
    job = job if job is not None else WriteJob(zs, message or "zv-dask build_pyramid")
    written = options.written()
    if compression is not None or compression_level is not None:
        written["compression"] = list(check_compression(compression, compression_level))
    journal, doc, lock = _pyramid_journal(zs, resume)
    builder = None
    store = zs  # the store the levels are for; ``zs`` is where they are built (beside it, on a local store)
    beside = own and can_build_beside(zs, journal)
    try:
        if beside:
            if doc is not None and swap(store):  # killed during the swap: the build was complete
                journal.remove()
                return _finished_report(store, t0)
            zs = open_rebuild(store, fresh=doc is None)
            job = WriteJob(zs, message or "zv-dask build_pyramid")
        builder = PyramidBuilder(zs, job, options, client=client, progress=progress)
        if compression is not None or compression_level is not None:
            builder.use_compressors(compressors_for(compression, compression_level))
        src = source_from_store(zs, 0)
        builder.check_attributes(src.specs, src.grid.dtype)  # raises before anything changes
        if doc is None:
            drop_coarse_levels(zs)
            if journal is not None:
                if job.transactional and own:  # icechunk: rounds are committed to a job branch as they finish
                    job.on_job_branch()
                    job.checkpoint(force=True)
                journal.write_json("job.json", pyramid_job(written, src, job.base))
        else:
            check_pyramid_resume(doc, written, src, journal)
            if job.transactional and own:
                job.on_job_branch(resume_from=doc["plan"]["base"])
                src = source_from_store(zs, 0)
            sweep_partials(zs.store)  # cells the killed build's tasks were writing
        builder.journal = journal
        builder.record_tasks = not job.durable
        builder.before_record = lambda: job.checkpoint(force=True)
        report = builder.report
        report.resumed = doc is not None
        report.vertex_counts[0] = src.vertex_count
        report.chunk_counts[0] = len(src.chunks)
        src = builder.run(src, builder.first_reason(src.vertex_count, len(src.chunks)))
        builder.finish_root(src.objects is not None)
        report = builder.report
        kill_point("commit")
        if own:
            report.snapshot_id = job.commit()
        if lock is not None:
            lock.check()
        if beside:
            finish_rebuild(store, zs)
        if journal is not None:
            journal.remove()
    except BaseException as e:
        if own:
            job.abort()
        building = builder.building if builder is not None else None
        kept = journal is not None and (not job.transactional or job.durable)
        if not job.transactional and building and not kept:
            for k in building:  # levels without metadata would break readers
                if str(k) in zs.root:
                    del zs.root[str(k)]
            drop_up_links(zs.root, building[0] - 1)
        if isinstance(e, Exception) and not isinstance(e, ZVError):  # e.g. KilledWorker, a storage error
            stage = "pyramid" if not building else f"pyramid level {building[0]}"
            err = IngestError(f"{stage} failed: {cause_text(e, zs.url)}", stage=stage)
            raise (with_resume_hint(err, "build") if kept else err) from e
        if kept and isinstance(e, IngestError):  # a task's own error
            raise with_resume_hint(e, "build")  # noqa: B904 - e itself, with the hint: its own cause stands
        raise
    finally:
        if lock is not None:
            lock.release()
            if not journal.exists():  # refused before the build began: no journal stays
                journal.remove()
    report.seconds = time.perf_counter() - t0
    return report


def _finished_report(zs, t0: float) -> PyramidReport:
    """The report of a build whose last step (the swap) a resumed run finished."""
    report = PyramidReport(resumed=True, stop_reason="resumed: the build was complete, its levels swapped in")
    for k in list_resolution_levels(zs):
        report.vertex_counts[k] = int(read_level_metadata(zs, k).vertex_count)
        report.chunk_counts[k] = len(zs.root[f"{k}/vertices"].attrs.get("nonempty_chunks", []))
        if k > 0:
            report.levels.append(k)
            report.bin_shapes[k] = tuple(zs.grid(k).base_bin_shape)
            report.tasks[k], report.level_seconds[k] = 0, 0.0
    report.seconds = time.perf_counter() - t0
    return report


def _pyramid_journal(zs, resume: bool):
    """``(journal, unfinished job document or None, lease)`` of a standalone build on a plain store."""
    journal = journal_for(zs.backend)
    if zs.backend.transactional and zs.backend.repository is None:
        journal = None
    if journal is None:
        if resume:
            raise InputError("resume needs a store at a path or URL (its journal lives there); this store has none")
        return None, None, None
    doc = journal.job()
    if doc is not None and doc.get("kind") in ("ingest", "append"):
        raise StoreError(f"{zs.url} has an {unfinished_message(doc, journal)}; build the pyramid after it")
    if resume and doc is None:
        raise InputError(f"no unfinished pyramid build to resume in {zs.url}; run the build without resume "
                         "(--resume) to build the levels")
    lock = journal.acquire("zv-dask pyramid" + (" (resuming)" if resume else ""))
    if doc is not None and not resume:  # a new build replaces the unfinished one
        journal.remove()
        lock = journal.acquire("zv-dask pyramid")
        doc = None
    return journal, doc, lock


def pyramid_job(options: dict, src, base: str | None = None) -> dict:
    return job_document("pyramid", job_options(**options), {"level0_points": int(src.vertex_count),
                                                           "level0_chunks": int(len(src.chunks))}, {},
                        {"base": base})


def check_pyramid_resume(doc: dict, options: dict, src, journal) -> None:
    diffs = differences(doc.get("options", {}), job_options(**options), "option ")
    diffs += differences(doc.get("input", {}), {"level0_points": int(src.vertex_count),
                                                "level0_chunks": int(len(src.chunks))}, "")
    if diffs:
        raise InputError(f"cannot resume the unfinished pyramid build (started {doc.get('started')}): it was started "
                         f"with other options or another level 0: {'; '.join(diffs[:6])}. Resume with the same "
                         "options, or run the build without resume to start again")


@takes_options(PyramidOptions)
def build_pyramid(store: StoreLike, *, client: ClientLike = None, compute: bool = True, job: WriteJob | None = None,
                  progress: bool = False, resume: bool = False, message: str | None = None,
                  compression: str | None = None, compression_level: int | None = None,
                  **options) -> PyramidReport | PendingPyramid:
    """Build coarse levels 1..L of a store from its level 0.

    Parameters
    ----------
    **options
        The :class:`~zv_dask.pyramid.options.PyramidOptions` (what is built and
        how the tasks are sized): ``levels``, ``bin_ratio``, ``chunk_scale``,
        ``method``, ``attribute_reduction``, ``sample_size``, ``seed``,
        ``min_points``, ``links``, ``points_per_task``, ``levels_per_task``,
        ``memory_budget``.
    client
        A distributed ``Client``; ``None`` uses dask's current scheduler.
    compute
        ``False`` returns a :class:`~zv_dask.lazy.PendingPyramid`, a Dask
        collection that runs the build when computed (``dask.compute``,
        ``.compute()``, ``client.compute`` / ``persist``) on the cluster that
        computes it, and returns this report. Nothing is written before; the
        store must be a path, URL or icechunk Repository (not an open writable
        session).
    job
        The :class:`~zv_dask.transaction.WriteJob` of an enclosing job (ingest):
        the pyramid then joins that job's single commit instead of committing.
    progress
        Show a progress bar per round of tasks.
    message
        The icechunk commit message of the build's own job (default ``"zv-dask build_pyramid"``).
    resume
        Continue the unfinished build in the store (killed, or failed) with the
        same options: its finished rounds of levels and finished tasks are not
        redone. A build without ``resume`` replaces an unfinished one.
    compression, compression_level
        Codecs of the new arrays (coarse levels, links, object indexes):
        ``"none"``, ``"zstd"`` or ``"blosc"`` with a level (see
        :mod:`zv_dask.format.codecs`); ``None`` (default) makes them as the
        store's level-0 ``vertices`` array is.

    Existing coarse levels (and level-0 cross-level links) are replaced. On
    failure an own icechunk job is discarded; on plain stores what the build
    finished stays, with its journal, for ``resume=True``.
    """
    opts = PyramidOptions.of(options)  # raises now even when compute=False
    if compression is not None or compression_level is not None:
        check_compression(compression, compression_level)
    if not compute:
        if job is not None:
            raise InputError("compute=False makes a job of its own: it cannot join another job's commit (job=...)")
        store = absolute(store)
        if isinstance(store, str):
            as_store(store)  # a store that is not there fails here, not when computed
        return make_job(PendingPyramid, build_pyramid, (store,), {
            **opts.to_dict(), "progress": progress, "resume": resume, "message": message,
            "compression": compression, "compression_level": compression_level}, store)
    return _build(store, opts, client=client, job=job, progress=progress, resume=resume, message=message,
                  compression=compression, compression_level=compression_level)
