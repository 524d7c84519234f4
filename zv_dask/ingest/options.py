"""The options of an ingest job, defined once (:class:`IngestOptions`).

:func:`zv_dask.ingest` and :func:`zv_dask.plan_ingest` take them as keywords
(their signatures are made from the fields), ``ingest(compute=False)`` carries
them to the process that runs the job, the job's journal records the ones that
decide what is written (a resumed job must give the same), and the CLI's
``zv-dask ingest`` arguments are made from their command-line spellings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zv_dask.errors import InputError
from zv_dask.format.codecs import COMPRESSIONS, check_compression, compressors_for
from zv_dask.ingest.bounds import POLICIES
from zv_dask.options import Flag, Options, bounded, bounds_text, count, names, option, positive_floats, positive_ints
from zv_dask.pyramid.options import PyramidOptions, memory_budget_problem, memory_budget_text
from zv_dask.store.journal import job_options

__all__ = ["IngestOptions", "MODES"]

MODES = ("write", "append")


@dataclass(frozen=True, kw_only=True)
class IngestOptions(Options):
    """The keyword options of :func:`zv_dask.ingest` (see its docstring for each)."""

    what = "ingest options"

    # -- geometry (what is written)
    chunk_shape: Any = option(None, cli=Flag(
        "chunk edge in world units: one number or one per axis (required for a new store)", metavar="C",
        parse=positive_floats, group="geometry"))
    bounds: Any = option(None, cli=Flag(
        "store bounds xmin,ymin,zmin,xmax,ymax,zmax (default: fit the data)", metavar="B", parse=bounds_text,
        group="geometry"))
    base_bin_shape: Any = option(None, cli=Flag(
        "base bin edge (divides the chunk shape; default: one bin per chunk)", flag="--bin-shape", metavar="B",
        parse=positive_floats, group="geometry"))
    out_of_bounds: str = option("raise", choices=POLICIES, cli=Flag(
        "points outside --bounds: refuse (default), drop and count, or grow the bounds", group="geometry"))
    dtype: Any = option(None, cli=Flag(
        "stored position dtype (default: float32; float64 for LAS/LAZ)", group="geometry",
        choices=("float32", "float64")))
    crs: Any = option(None, cli=Flag(
        "the points' coordinate system, e.g. EPSG:32610 or WKT (default: what LAS/LAZ headers say; given, it "
        "overrides them, e.g. for files whose headers disagree)", metavar="CRS", group="geometry"))
    reproject: Any = option(None, cli=Flag(
        "transform the positions to this CRS, e.g. EPSG:32610 (needs pyproj: pip install 'zv-dask[crs]'), from "
        "--crs or each file's own CRS", metavar="CRS", group="geometry"))
    shard_shape: Any = option(None, cli=Flag(
        "chunks per shard along each axis (zarr sharding)", metavar="K", parse=positive_ints, group="geometry"))
    compression: str | None = option(None, cli=Flag(
        "codec after vlen-bytes on every array (default: zstd)", group="geometry", choices=COMPRESSIONS))
    compression_level: int | None = option(None, cli=Flag(
        "level of --compression (default: zstd 3, blosc 5)", metavar="N", parse=int, group="geometry"))
    axes: Any = option(None)
    # -- input
    columns: Any = option(None, cli=Flag(
        "coordinate columns (default: x,y,z)", metavar="X,Y,Z", parse=names, group="input"))
    attributes: Any = option(None, cli=Flag(
        "attribute columns to keep (default: every other numeric column)", metavar="A,B", parse=names,
        group="input"))
    object_ids: Any = option(None, cli=Flag(
        "integer column of object ids (e.g. cell_id)", metavar="COLUMN", group="input"))
    partition_rows: int | None = option(None, check=bounded(1), written=False, cli=Flag(
        "points per input partition (arrays, NPY, LAS)", metavar="N", parse=count, group="input"))
    group_points: int | None = option(None, check=bounded(1), written=False, cli=Flag(
        "points per level-0 write task (default: what the memory budget allows)", metavar="N", parse=count,
        group="input"))
    # -- the job
    pyramid: Any = option(None)  # True, a dict or PyramidOptions: the CLI makes it from PyramidOptions' flags
    mode: str = option("write", choices=MODES, written=False)  # the CLI spells it --append
    overwrite: bool = option(False, written=False, cli=Flag(
        "replace a store that already holds points (or discard an unfinished job in it)", group="job"))
    resume: bool = option(False, written=False, cli=Flag(
        "continue the unfinished job in STORE (killed or failed) with the same input and options: finished groups "
        "and pyramid tasks are not redone (a killed --append is undone and run again)", group="job"))
    durable: bool = option(True, written=False)
    message: str | None = option(None, written=False, cli=Flag(
        "icechunk commit message", flag=("--message", "-m"), group="job"))
    memory_budget: Any = option(None, check=memory_budget_problem, written=False, cli=Flag(
        "memory the job may use per worker, e.g. 2GiB (default: half the workers' memory limit); tasks are sized "
        "to it, and a shuffle that would not fit waits on scratch storage", metavar="SIZE",
        parse=memory_budget_text, group="job"))
    scratch: Any = option(None, written=False, cli=Flag(
        "where a staged shuffle keeps its pieces: a path or URL every worker reaches (default: a .zv-scratch "
        "directory inside the store, beside an icechunk repository)", metavar="PATH_OR_URL", group="job"))
    progress: bool = option(False, written=False)
    # -- the store (the CLI spells these --icechunk, --branch and -S)
    backend: str | None = option(None, written=False)
    storage_options: Any = option(None, written=False)
    branch: str = option("main", written=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_compression(self.compression, self.compression_level)  # the name and the level together
        if self.resume and not self.durable:
            raise InputError("resume needs the job's journal: resume=True and durable=False contradict each other")
        if self.appends:
            if self.shard_shape is not None:
                raise InputError("shard_shape is the store's in an append (leave it out)")
            if self.compression is not None or self.compression_level is not None:
                raise InputError("compression is the store's in an append (leave it out)")
        if self.pyramid and not self.appends:
            PyramidOptions.of_ingest(self.pyramid)  # its own checks, before anything is read

    @property
    def appends(self) -> bool:
        return self.mode == "append"

    def record(self, src) -> dict:
        """What the job's journal records of these options for input ``src`` (a resumed job must give the same):
        the written options, the attributes and object ids as found, the pyramid's written options."""
        pyramid = None if self.appends else PyramidOptions.of_ingest(self.pyramid)
        written = self.written()
        written.update(attributes=sorted(src.attributes), object_ids=src.has_object_ids,
                       pyramid=pyramid.written() if pyramid is not None else None,
                       compression=list(check_compression(self.compression, self.compression_level)))
        del written["compression_level"]
        return job_options(**written)

    def compressors(self) -> list | None:
        """The zarr codecs after ``vlen-bytes`` (``None``: plain ``vlen-bytes``)."""
        return compressors_for(self.compression, self.compression_level)
