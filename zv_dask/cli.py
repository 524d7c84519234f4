"""The ``zv-dask`` command line: ingest, pyramid, info, validate and demo.

Every command has ``--help``. Exit codes: 0 done; 2 bad arguments or bad input
(one line on stderr, no traceback); 1 failure (a job that failed, or a store
that does not validate). Progress bars go to stderr (``--quiet`` turns them
off); reports go to stdout, as JSON with ``--json``.

Jobs run on a Dask cluster: ``--scheduler ADDRESS`` connects to a running one
(``tcp://host:8786``; ``synchronous`` or ``threads`` run in this process),
otherwise a LocalCluster of ``--workers N`` worker processes is started on
127.0.0.1 with its dashboard off, and closed when the command ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import zv_dask
from zv_dask import __version__
from zv_dask.errors import (
    InputError,
    MetadataError,
    OutOfBoundsError,
    StoreError,
    UnfinishedJobError,
    UnfinishedJobWarning,
)
from zv_dask.export import export
from zv_dask.format.crs import crs_label
from zv_dask.format.metadata import ZV_VERSION
from zv_dask.ingest.fused import pyramid_options
from zv_dask.ingest.options import IngestOptions
from zv_dask.ingest.plan import plan_ingest, preflight
from zv_dask.ingest.report import _fmt_bytes as fmt
from zv_dask.options import bounds_text, count, names, non_negative, numbers
from zv_dask.pyramid.options import PyramidOptions
from zv_dask.scheduling import IN_PROCESS_SCHEDULERS, describe_scheduler, local_cluster, local_scheduler, task_slots
from zv_dask.stats import format_stats, store_stats
from zv_dask.store.backends import local_path
from zv_dask.store.credentials import SECRET_OPTIONS, prepare_credentials, redact
from zv_dask.validate import validate_store

__all__ = ["main", "build_parser", "parse_storage_option", "demo_points"]

PROG = "zv-dask"
# A job that asks for no cluster runs on threads in this process, whatever its size: the numpy work
# releases the GIL, and worker processes cost their start-up (~2 s) and every piece of the shuffle
# pickled between them. Measured on one 2-core machine, tmpfs, whole CLI processes: 6.2 s against
# 6.9 s at 1e7 LAS points, 54.3 s against 69.2 s at 1e8 (benchmarks/results/peers*.md).
DEMO_STORE = "zv-demo.zv"
DEMO_POINTS = 300_000
DEMO_MAX_WORKERS = 4
DEMO_TASK_POINTS = 50_000  # small tasks, so that the demo spreads over every worker


class BadArguments(Exception):
    """Arguments that parse but cannot be used (exit code 2)."""


def _bad_input_types() -> tuple[type, ...]:
    return (InputError, StoreError, MetadataError, OutOfBoundsError, BadArguments)


# -- argument types (the options' own are in zv_dask.options) -------------------------------
def _memory(text: str) -> str:
    if text.lower() in ("auto", "0", "none"):
        return text.lower()
    from dask.utils import parse_bytes

    try:
        parse_bytes(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a size like 4GiB or 2GB (or auto), got {text!r}") from None
    return text


def _scalar(value: str):
    low = value.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


# options whose values stay strings as given (a key or a region of digits is not a number)
_STRING_OPTIONS = ("access_key_id", "aws_access_key_id", "region", "endpoint", "endpoint_url", "account",
                   "bucket", "worker_credentials")


def parse_storage_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(key, value)``; values become bool, int, float or stay str (secrets and keys stay str).

    A malformed argument is never echoed back: it may hold a secret.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep:
        raise argparse.ArgumentTypeError("expected KEY=VALUE (e.g. endpoint=http://127.0.0.1:9000), got an "
                                         "argument with no '=' (not shown: it may hold a secret)")
    if not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE, got an empty KEY (the value is not shown: it may "
                                         "hold a secret)")
    if key.lower() in SECRET_OPTIONS or key.lower() in _STRING_OPTIONS:
        return key, value
    return key, _scalar(value)


# -- the parser ------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_output(p, json_output: bool = True) -> None:
    g = p.add_argument_group("output")
    if json_output:
        g.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars or status lines")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="log what the job does on stderr: stages and their times, retries (the zv_dask logger)")
    g.add_argument("--debug", action="store_true", help="show a traceback when something fails (and log all)")


def _add_storage(p, writes: bool = True) -> None:
    g = p.add_argument_group("storage")
    g.add_argument("--icechunk", action="store_true",
                   help="STORE is an icechunk repository (path or URL)" + ("; the job is one commit" if writes else ""))
    g.add_argument("--branch", default="main", help="icechunk branch (default: main)")
    g.add_argument("--storage-option", "-S", metavar="KEY=VALUE", action="append", type=parse_storage_option,
                   default=[], help="object storage option, repeatable: endpoint, region, access_key_id, "
                                    "secret_access_key, allow_http, anonymous, timeout, max_retries, ... "
                                    "(values parsed as bool/int/float/str)")


def _add_cluster(p, default_workers: str = "one per CPU core") -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running Dask scheduler (tcp://host:8786), or 'synchronous' / 'threads' to run in this "
                        "process; default: threads in this process (one per core), unless --workers or another "
                        "LocalCluster option asks for worker processes")
    g.add_argument("--scheduler-file", metavar="FILE",
                   help="the JSON file a running scheduler wrote (dask scheduler --scheduler-file, dask-jobqueue, "
                        "dask-mpi)")
    g.add_argument("--workers", type=count, metavar="N",
                   help=f"start a LocalCluster of N worker processes (default when one is started: "
                        f"{default_workers})")
    g.add_argument("--threads-per-worker", type=count, metavar="N",
                   help="threads per LocalCluster worker (default: 1)")
    g.add_argument("--memory-limit", type=_memory, default="auto", metavar="SIZE",
                   help="memory limit per LocalCluster worker, e.g. 4GiB (default: auto, a share of the RAM)")
    g.add_argument("--dashboard", action="store_true",
                   help="serve the LocalCluster's Dask dashboard (on a free port of 127.0.0.1) and print its link")


def _add_pyramid(p, include_flag: bool) -> None:
    g = p.add_argument_group("pyramid")
    if include_flag:
        g.add_argument("--pyramid", action=argparse.BooleanOptionalAction, default=True,
                       help="build the coarse levels in the same job (default: yes)")
    PyramidOptions.add_arguments(p, {"pyramid": g}, skip=() if not include_flag else ("memory_budget",))


def build_parser() -> argparse.ArgumentParser:
    """The ``zv-dask`` argument parser (one sub-command per job)."""
    parser = _Parser(prog=PROG, description="Huge point clouds into multi-resolution Zarr Vectors "
                                            f"(ZV {ZV_VERSION}) stores, in parallel with Dask.",
                     epilog="Run 'zv-dask COMMAND --help' for a command's options. Exit codes: 0 done, "
                            "1 failure, 2 bad arguments or input.")
    parser.add_argument("--version", action="version", version=f"zv-dask {__version__} (writes ZV {ZV_VERSION})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("ingest", formatter_class=fmt,
                       help="ingest point files into a ZV store (and build its pyramid)",
                       description="Ingest point files into level 0 of a ZV store, then build the coarse levels.\n\n"
                                   "SOURCE: Parquet, CSV, NPY, zarr or LAS/LAZ files, or globs of them\n"
                                   "(quote a glob to let zv-dask expand it). STORE: a path, file:// or\n"
                                   "s3:// / gs:// / az:// URL, or an icechunk repository with --icechunk.",
                       epilog="example: zv-dask ingest 'tiles/*.laz' city.zv --chunk-shape 100 --bin-shape 5")
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="input file(s) or glob(s)")
    p.add_argument("store", metavar="STORE", help="the store to write")
    groups = {name: p.add_argument_group(name) for name in ("geometry", "input", "job")}
    IngestOptions.add_arguments(p, groups)
    g = groups["job"]
    g.add_argument("--append", action="store_true",
                   help="add the points to STORE, which holds points: its geometry applies, the points need its "
                        "attributes (and object ids); only the chunks they touch and the pyramid regions above "
                        "them are rewritten, with the options the pyramid was built with (pyramid options here "
                        "are ignored)")
    g.add_argument("--dry-run", action="store_true",
                   help="scan the input and print the plan (partitions, chunks, grid, bytes, memory); write nothing")
    _add_pyramid(p, True)
    _add_storage(p)
    _add_cluster(p)
    _add_output(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("pyramid", help="(re)build the coarse levels of a store",
                       description="Build coarse levels 1..L of a store from its level 0 (existing coarse levels are "
                                   "replaced).")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--message", "-m", help="icechunk commit message")
    p.add_argument("--resume", action="store_true",
                   help="continue the unfinished build in STORE (killed or failed) with the same options: "
                        "finished levels and tasks are not redone")
    _add_pyramid(p, False)
    _add_storage(p)
    _add_cluster(p)
    _add_output(p)
    p.set_defaults(func=cmd_pyramid)

    p = sub.add_parser("rollback", help="undo the unfinished (killed) append in a store",
                       description="Undo an append that was killed before it finished: the store's cells and "
                                   "metadata are put back byte for byte from the append's journal.")
    p.add_argument("store", metavar="STORE", help="the store (path or URL)")
    _add_storage(p)
    _add_output(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("info", help="describe a store",
                       description="Levels, point counts, bounds, attributes and (where cheap) sizes on disk. "
                                   "With --stats, per level the min / max / mean of every axis and attribute, "
                                   "value counts (classification), objects, CRS and bytes on disk: one pass over "
                                   "the data, on threads in this process.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--stats", action="store_true", help="read the points: per-level statistics (zv_dask.store_stats)")
    p.add_argument("--levels", type=lambda t: numbers(t, int, "level numbers"), metavar="K,K",
                   help="with --stats: only these levels, e.g. 0,1 (default: all)")
    _add_storage(p, writes=False)
    _add_output(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("validate", help="check a store's structure and consistency",
                       description="zv-dask's own checks: metadata parses, levels are contiguous, every non-empty "
                                   "cell decodes, fragments tile the rows, counts add up, object manifests point at "
                                   "existing chunks and fragments, vertex counts never grow by level, the grid "
                                   "covers every chunk. Exit code 1 when an error is found.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--strict", action="store_true", help="fail (exit 1) on warnings too")
    _add_storage(p, writes=False)
    _add_output(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("export", formatter_class=fmt, help="write a level (or a box of it) to LAS/LAZ or Parquet",
                       description="Write the points of a level (or of a box of it) to a LAS/LAZ or Parquet file,\n"
                                   "for PDAL, QGIS, CloudCompare and friends. A store ingested from LAS files\n"
                                   "gives back their points, dimensions, scales, offsets and CRS.\n\n"
                                   "OUT: OUT.las, OUT.laz, OUT.parquet (one file), or a path ending in / (a\n"
                                   "directory of Parquet part files, written in parallel).",
                       epilog="example: zv-dask export city.zv block.laz --bbox 100,200,0,300,400,50")
    p.add_argument("store", metavar="STORE", help="the store (path or URL)")
    p.add_argument("out", metavar="OUT", help="the file (or directory/) to write")
    g = p.add_argument_group("selection")
    g.add_argument("--level", type=non_negative, default=0, metavar="K", help="the level to export (default: 0)")
    g.add_argument("--bbox", type=bounds_text, metavar="B",
                   help="only the points in the closed box xmin,ymin,zmin,xmax,ymax,zmax")
    g.add_argument("--attributes", type=names, metavar="A,B", help="attributes to export (default: all)")
    g.add_argument("--format", choices=("las", "laz", "parquet"), help="the output format (default: from OUT's name)")
    g.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _add_storage(p, writes=False)
    _add_output(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="ingest a synthetic cloud, end to end",
                       description="Make a synthetic point cloud (clustered 3-D points with an intensity and a "
                                   "label), ingest it and build its pyramid on a LocalCluster, then print the "
                                   "report, the store summary and the validation. Replaces a previous demo store.")
    p.add_argument("store", nargs="?", default=None, metavar="STORE",
                   help=f"where to write (default: ./{DEMO_STORE})")
    p.add_argument("--icechunk", action="store_true", help="write a local icechunk repository instead")
    p.add_argument("--points", type=count, default=DEMO_POINTS, metavar="N",
                   help=f"number of points (default: {DEMO_POINTS:,})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_cluster(p, default_workers=f"one per CPU core, at most {DEMO_MAX_WORKERS}")
    _add_output(p)
    p.set_defaults(func=cmd_demo)
    for command_parser in sub.choices.values():
        command_parser.set_defaults(command_parser=command_parser)
    return parser


# -- helpers ---------------------------------------------------------------------------------
def _status(args, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, file=sys.stderr, flush=True)


def _options(args) -> dict | None:
    """The storage options of ``-S``; ``worker_credentials=env`` keeps the keys in this process."""
    if getattr(args, "_storage_options", None) is None:
        opts = dict(getattr(args, "storage_option", None) or [])
        args._storage_options = prepare_credentials(opts) or {}
    return dict(args._storage_options) or None


def _backend(args, store: str | None = None) -> str | None:
    if getattr(args, "icechunk", False):
        return "icechunk"
    if store is not None and _looks_like_icechunk(store):
        return "icechunk"
    return None


def _looks_like_icechunk(store: str) -> bool:
    """A local directory laid out as an icechunk repository (read commands detect it)."""
    if "://" in store and not store.startswith("file://"):
        return False
    p = Path(store[7:] if store.startswith("file://") else store)
    return p.is_dir() and not (p / "zarr.json").exists() and (p / "snapshots").is_dir() and (
        (p / "repo").exists() or (p / "refs").is_dir())


def _jsonable(obj):
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _print_json(obj, out) -> None:
    out.write(json.dumps(_jsonable(obj), indent=2) + "\n")
    out.flush()


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return fmt(int(n))


def _in_process_reason(args) -> str | None:
    """Why a job runs on threads in this process (no cluster asked for), or ``None`` when it has a cluster."""
    asked = (args.scheduler or args.scheduler_file or args.workers or args.dashboard
             or args.memory_limit != "auto" or args.threads_per_worker is not None)
    if asked:
        return None
    return (f"threads in this process ({task_slots(None)} threads; --workers N or --scheduler ADDRESS for a "
            "cluster)")


@contextlib.contextmanager
def _cluster(args, in_process: str | None = None):
    """The Dask client of a command: a running scheduler, this process, or a LocalCluster.

    ``in_process`` (a reason) runs a job that asked for no cluster on threads in this process.
    """
    address = getattr(args, "scheduler", None)
    if in_process:
        with local_scheduler("threads"):
            yield None
        return
    if address and address.lower() in IN_PROCESS_SCHEDULERS:
        with local_scheduler(address):
            yield None
        return
    from distributed import Client

    sched_file = getattr(args, "scheduler_file", None)
    if sched_file:
        if address:
            raise BadArguments("--scheduler and --scheduler-file name the scheduler twice; give one")
        if not os.path.isfile(sched_file):
            raise BadArguments(f"--scheduler-file {sched_file!r} does not exist (the scheduler writes it when it "
                               "starts: dask scheduler --scheduler-file FILE)")
        _status(args, f"connecting to the Dask scheduler of {sched_file}")
        try:
            client = Client(scheduler_file=sched_file, timeout="10s")
        except (OSError, TimeoutError, ValueError, KeyError) as e:
            raise BadArguments(f"cannot reach the Dask scheduler of {sched_file!r}: {_one_line(e)}") from None
        try:
            yield client
        finally:
            client.close()
        return
    if address:
        if not re.fullmatch(r"((tcp|tls|ws|wss|ucx)://)?[^\s/:]+(:\d+)", address) and not re.fullmatch(
                r"((tcp|tls|ws|wss|ucx)://)?\[[0-9a-fA-F:]+\](:\d+)", address):
            raise BadArguments(f"--scheduler {address!r} is not a scheduler address; expected tcp://HOST:PORT "
                               f"(or one of: synchronous, threads)")
        _status(args, f"connecting to the Dask scheduler at {address}")
        try:
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError, ValueError) as e:
            raise BadArguments(f"cannot reach the Dask scheduler at {address!r}: {_one_line(e)}") from None
        try:
            yield client
        finally:
            client.close()
        return

    n = args.workers or max(1, os.cpu_count() or 1)
    if args.command == "demo" and not args.workers:
        n = min(n, DEMO_MAX_WORKERS)
    memory = None if args.memory_limit == "none" else (0 if args.memory_limit == "0" else args.memory_limit)
    _status(args, f"starting a LocalCluster: {n} worker process{'es' if n > 1 else ''} x "
                  f"{args.threads_per_worker or 1} thread(s) on 127.0.0.1, memory limit {args.memory_limit}")
    cluster = local_cluster(n, threads_per_worker=args.threads_per_worker or 1, memory_limit=memory,
                            dashboard=args.dashboard)
    if args.dashboard:
        print(f"{PROG}: Dask dashboard at {cluster.dashboard_link}", file=sys.stderr, flush=True)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


# Messages are written in the API's spelling; the CLI says them in its own (one table, here).
_SPELLING = [
    (r"\boverwrite=True\b", "--overwrite"), (r"\bresume=True\b", "--resume"), (r"\bmode='append'", "--append"),
    (r"\bdurable=False\b", "durable=False (Python API only)"),
    (r"\bout_of_bounds='(\w+)'", r"--out-of-bounds \1"), (r"\bdtype='(\w+)'", r"--dtype \1"),
    (r"\bmemory_budget=\.\.\.", "--memory-budget SIZE"), (r"\bscratch=\.\.\.", "--scratch PATH_OR_URL"),
    (r"\bcrs=\.\.\.", "--crs CRS"), (r"\battributes=\[\.\.\.\]", "--attributes a,b,..."),
    (r"\bpartition_rows\b", "--partition-rows"), (r"\bchunk_shape\b", "--chunk-shape"),
    (r"\bbase_bin_shape\b", "--bin-shape"), (r"\bshard_shape\b", "--shard-shape"),
    (r" \(zv_dask\.roll_back\)", ""),
    # what said both spellings now says one twice
    (r"(--[a-z-]+(?: [A-Za-z_]+)?) \(\1\)", r"\1"), (r"\((--[a-z-]+)( [A-Z_]+)?, \1\)", r"(\1\2)"),
    (r"  +", " "),
]


def cli_spelling(message: str) -> str:
    """A zv-dask message with its option names in the command line's spelling."""
    for pattern, repl in _SPELLING:
        message = re.sub(pattern, repl, message)
    return message


def _in_cli_spelling(summary):
    """A report or plan whose messages (its warnings, the reason for its dtype) use the CLI's spelling."""
    summary.warnings = [cli_spelling(w) for w in summary.warnings]
    if getattr(summary, "dtype_reason", None):
        summary.dtype_reason = cli_spelling(summary.dtype_reason)
    return summary


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def _sources(args):
    return args.sources[0] if len(args.sources) == 1 else list(args.sources)


# -- commands --------------------------------------------------------------------------------
def cmd_ingest(args, out) -> int:
    """``zv-dask ingest``: :func:`zv_dask.ingest` (or :func:`zv_dask.plan_ingest` with ``--dry-run``)."""
    # the store's pyramid is rebuilt in an append with the options it was built with
    pyramid = PyramidOptions.from_args(args) if args.pyramid and not args.append else None
    opts = IngestOptions.from_args(args, mode="append" if args.append else "write", pyramid=pyramid,
                                   backend=_backend(args), storage_options=_options(args), branch=args.branch,
                                   progress=not args.quiet)
    # Check the input, the store and the parameters before starting a cluster: bad input fails fast.
    src, _, _, _ = preflight(_sources(args), args.store, opts)  # (a resume with other options is refused here)
    pyramid_options(pyramid, src.ndim)
    in_process = _in_process_reason(args)
    with _cluster(args, in_process) as client:
        if args.dry_run:
            plan = _in_cli_spelling(plan_ingest(_sources(args), args.store, client=client, **opts.to_dict()))
            if args.json:
                _print_json(plan.to_dict(), out)
            else:
                print(repr(plan), file=out)
            return 0
        report = zv_dask.ingest(_sources(args), args.store, client=client, **opts.to_dict())
    if in_process:
        report.scheduler = in_process
    _in_cli_spelling(report)
    if args.json:
        _print_json(report.to_dict(), out)
    else:
        print(repr(report), file=out)
    return 0


def _pyramid_dict(store: str, rep) -> dict:
    return {"store": store, "levels": [
        {"level": k, "vertex_count": rep.vertex_counts.get(k), "chunks": rep.chunk_counts.get(k),
         "bin_shape": list(rep.bin_shapes[k]) if k in rep.bin_shapes else None, "tasks": rep.tasks.get(k),
         "seconds": rep.level_seconds.get(k)} for k in [0] + list(rep.levels)],
        "links": rep.links, "link_counts": rep.link_counts, "rounds": rep.batches, "resumed": rep.resumed,
        "tasks_resumed": rep.tasks_resumed, "rounds_resumed": rep.rounds_resumed,
        "seconds": rep.seconds, "stop_reason": rep.stop_reason, "snapshot_id": rep.snapshot_id,
        "warnings": rep.warnings}


def cmd_pyramid(args, out) -> int:
    """``zv-dask pyramid``: :func:`zv_dask.build_pyramid` on an existing store."""
    zs = zv_dask.open_store(args.store, "r+", backend=_backend(args, args.store), storage_options=_options(args),
                            branch=args.branch)
    opts = PyramidOptions.from_args(args)
    pyramid_options(opts, zs.metadata.ndim)
    in_process = _in_process_reason(args)
    with _cluster(args, in_process) as client:
        where = describe_scheduler(client)
        rep = zv_dask.build_pyramid(zs, client=client, progress=not args.quiet, resume=args.resume,
                                    message=args.message, **opts.to_dict())
    rep.warnings = [cli_spelling(w) for w in rep.warnings]
    d = _pyramid_dict(args.store, rep)
    d["scheduler"] = in_process or where
    if args.json:
        _print_json(d, out)
        return 0
    lines = [f"PyramidReport: {args.store}: {len(rep.levels)} coarse level(s) in {rep.seconds:.2f}s "
             f"({rep.stop_reason})"]
    lines.append(f"  scheduler {d['scheduler']}")
    for lv in d["levels"]:
        extra = "" if lv["level"] == 0 else f", bin {lv['bin_shape']}, {lv['tasks']} tasks, {lv['seconds']:.2f}s"
        lines.append(f"  level {lv['level']:<3} {lv['vertex_count']:,} vertices in {lv['chunks']:,} chunks{extra}")
    if any(rep.link_counts.values()):
        lines.append(f"  links     {rep.links}: {sum(rep.link_counts.values()):,} records "
                     f"({', '.join(f'{k} {v:,}' for k, v in rep.link_counts.items())})")
    if rep.snapshot_id:
        lines.append(f"  snapshot  {rep.snapshot_id}")
    for w in rep.warnings:
        lines.append(f"  warning   {w}")
    print("\n".join(lines), file=out)
    return 0


def _dir_size(path: Path) -> int:
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total


def store_sizes(zs) -> dict:
    """Bytes on disk where that is cheap to know: per level of a local store, or a local icechunk repository."""
    url = zs.url
    if not url or ("://" in url and not url.startswith("file://")):
        return {"total": None, "levels": {}, "note": "sizes are only measured for local stores"}
    root = local_path(url)
    if not root.is_dir():
        return {"total": None, "levels": {}, "note": "not a local directory"}
    if zs.backend.kind == "icechunk":
        return {"total": _dir_size(root), "levels": {},
                "note": "an icechunk repository (all snapshots); per-level sizes are not separable"}
    levels = {str(k): _dir_size(root / str(k)) for k in zs.levels}
    return {"total": _dir_size(root), "levels": levels, "note": ""}


def info_dict(zs) -> dict:
    """:func:`zv_dask.store_info` plus the store location, position dtype and sizes on disk."""
    info = zv_dask.store_info(zs)
    info["store"] = zs.url or zs.backend.kind
    info["dtype"] = zs.grid(0).dtype
    info["sizes"] = store_sizes(zs)
    return info


def _compression_label(c) -> str:
    if not c or c.get("name") == "none":
        return "none"
    return f"{c['name']} level {c.get('level')}" + (" (sharded)" if c.get("sharded") else "")


def format_info(info: dict) -> str:
    """The human summary of :func:`info_dict`."""
    lv0 = info["levels"][0] if info["levels"] else {}
    attrs = lv0.get("attributes") or {}
    attr_text = ", ".join(f"{n} {a['dtype']}" + (f" x{a['channels']}" if a.get("channels", 1) != 1 else "")
                          for n, a in attrs.items()) or "none"
    lo, hi = info["bounds"]
    sizes = info.get("sizes") or {}
    lines = [f"ZV store {info['store']} ({info['backend']}, ZV {info['zv_version']}, "
             f"{', '.join(info['geometry_types'])})",
             f"  axes         {', '.join(info['axes'])}; positions {info.get('dtype', '?')}",
             f"  bounds       {lo} .. {hi}",
             f"  crs          {crs_label(info.get('crs'))}",
             f"  chunk_shape  {info['chunk_shape']}; base_bin_shape {info['base_bin_shape'] or info['chunk_shape']} "
             f"({' x '.join(map(str, info['bins_per_chunk']))} bins per chunk)",
             f"  attributes   {attr_text}"]
    if info.get("unfinished_job"):
        lines.insert(1, f"  UNFINISHED   {cli_spelling(info['unfinished_job'])}")
    if "num_objects" in lv0:
        lines.append(f"  objects      {lv0['num_objects']:,}")
    las = info.get("las")
    if las:
        lines.append(f"  LAS          {len(las.get('files') or [])} file(s), version {las['version']}, point format "
                     f"{las['point_format']}, scales {las['scales']}, "
                     + (f"offsets {las['offsets']}" if las.get("offsets") is not None else
                        f"reprojected to {(las.get('reprojected') or {}).get('to', '?')} (offsets chosen at export)")
                     + ("" if las.get("uniform", True) else " (the first file's; the files differ)"))
    xl = info.get("cross_level_links") or {}
    if xl.get("storage", "none") != "none":
        n = sum(v for lv in info["levels"] for v in (lv.get("links") or {}).values())
        lines.append(f"  links        {xl['storage']} cross-level links, depth {xl['depth']}: {n:,} records")
    comps = {_compression_label(lv.get("compression")) for lv in info["levels"]}
    if comps:
        lines.append(f"  compression  {', '.join(sorted(comps))}")
    if sizes.get("total") is not None:
        lines.append(f"  on disk      {_fmt_bytes(sizes['total'])}" + (f" ({sizes['note']})" if sizes.get("note")
                                                                       else ""))
    links = any(lv.get("links") for lv in info["levels"])
    lines.append(f"  {'level':<6} {'vertices':>12} {'chunks':>8}  {'bin_shape':<24} {'ratio':<12} {'on disk':>10}"
                 + ("  links" if links else ""))
    for lv in info["levels"]:
        size = (sizes.get("levels") or {}).get(str(lv["level"]))
        ratio = lv["bin_ratio"]
        ratio_text = f"{ratio[0]:g}" if len(set(ratio)) == 1 else "x".join(f"{r:g}" for r in ratio)
        fams = ", ".join(f"{k} {v:,}" for k, v in (lv.get("links") or {}).items())
        lines.append(f"  {lv['level']:<6} {lv['vertex_count']:>12,} {lv['nonempty_chunks']:>8,}  "
                     f"{str([float(f'{b:g}') for b in lv['bin_shape']]):<24} {ratio_text:<12} "
                     f"{_fmt_bytes(size) if size is not None else '-':>10}" + (f"  {fams}" if fams else "")
                     + (f"  UNFINISHED: {lv['unfinished']}" if lv.get("unfinished") else ""))
    return "\n".join(lines)


def cmd_rollback(args, out) -> int:
    """``zv-dask rollback``: :func:`zv_dask.roll_back`."""
    with warnings.catch_warnings():  # the unfinished append is what this command is about
        warnings.simplefilter("ignore")
        done = zv_dask.roll_back(args.store, storage_options=_options(args))
    result = {"store": args.store, "rolled_back": bool(done)}
    if args.json:
        _print_json(result, out)
    else:
        print(f"{args.store}: " + ("the unfinished append was rolled back; the store is as it was before it"
                                   if done else "no unfinished append to roll back"), file=out)
    return 0


def cmd_info(args, out) -> int:
    """``zv-dask info``: levels, counts, bounds, attributes and sizes of a store."""
    with warnings.catch_warnings():  # an unfinished job is the first line of the summary
        warnings.simplefilter("ignore", zv_dask.UnfinishedJobWarning)
        zs = zv_dask.open_store(args.store, "r", backend=_backend(args, args.store), storage_options=_options(args),
                                branch=args.branch)
    info = info_dict(zs)
    if args.levels is not None and not args.stats:
        raise BadArguments("--levels selects the levels of --stats; add --stats")
    stats = None
    if args.stats:
        with local_scheduler("threads"):  # dask tasks read the data, in this process
            stats = store_stats(zs, levels=args.levels, progress=not args.quiet)
    if args.json:
        _print_json(info if stats is None else {**info, "stats": stats}, out)
    else:
        print(format_info(info), file=out)
        if stats is not None:
            print(format_stats(stats, fmt_bytes=_fmt_bytes), file=out)
    return 0


def cmd_validate(args, out) -> int:
    """``zv-dask validate``: :func:`zv_dask.validate_store`; exit 1 when the store has errors."""
    rep = validate_store(args.store, backend=_backend(args, args.store), storage_options=_options(args),
                         branch=args.branch, progress=not args.quiet)
    if args.json:
        _print_json(rep.to_dict(), out)
    else:
        print(repr(rep), file=out)
    return 0 if rep.ok and not (args.strict and rep.warnings) else 1


def cmd_export(args, out) -> int:
    """``zv-dask export``: :func:`zv_dask.export`, on threads in this process."""
    with local_scheduler("threads"):
        d = export(args.store, args.out, level=args.level, bbox=args.bbox, attributes=args.attributes,
                   format=args.format, storage_options=_options(args), backend=_backend(args, args.store),
                   branch=args.branch, overwrite=args.overwrite, progress=not args.quiet)
    d["notes"] = [cli_spelling(n) for n in d["notes"]]
    if args.json:
        _print_json(d, out)
        return 0
    las = d.get("las")
    what = (f"{d['format'].upper()}, point format {las['point_format']}, LAS {las['version']}" if las
            else "Parquet " + ("part files" if d["layout"] == "directory" else "file"))
    crs = d["crs_written"] or "no CRS"
    lines = [f"exported {d['points']:,} points of level {d['level']}" + (" in the box" if d["bbox"] else "")
             + f" to {d['file']} ({what}, {_fmt_bytes(d['bytes'])}, {crs}) in {d['seconds']:.2f}s"]
    lines += [f"  note: {n}" for n in d["notes"]]
    print("\n".join(lines), file=out)
    return 0


def demo_points(n: int = DEMO_POINTS, seed: int = 0):
    """A synthetic cloud: clustered 3-D points in a 1000-unit cube, ``intensity`` (float32) and ``label`` (uint8).

    Returns ``(positions (n, 3) float64, {"intensity": ..., "label": ...})``;
    label 0 is the uniform background, 1..12 the clusters.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    k = 12
    centres = rng.uniform(150, 850, (k, 3))
    spread = rng.uniform(20, 80, (k, 1)) * rng.uniform(0.5, 1.5, (k, 3))
    n_bg = n // 10
    label = np.concatenate([np.zeros(n_bg, np.uint8), rng.integers(1, k + 1, n - n_bg).astype(np.uint8)])
    pos = np.empty((n, 3))
    pos[:n_bg] = rng.uniform(0, 1000, (n_bg, 3))
    c = label[n_bg:].astype(np.int64) - 1
    pos[n_bg:] = centres[c] + rng.standard_normal((n - n_bg, 3)) * spread[c]
    pos = np.clip(pos, 0, 1000)
    dist = np.linalg.norm((pos[n_bg:] - centres[c]) / spread[c], axis=1)
    intensity = np.empty(n, np.float32)
    intensity[:n_bg] = rng.uniform(0, 0.2, n_bg)
    intensity[n_bg:] = np.exp(-0.5 * dist ** 2) + rng.normal(0, 0.05, n - n_bg)
    order = rng.permutation(n)  # scanner order, not sorted by cluster
    return pos[order], {"intensity": intensity[order], "label": label[order]}


def cmd_demo(args, out) -> int:
    """``zv-dask demo``: synthetic points -> ingest + pyramid on a LocalCluster -> report, info, validation."""
    import dask.array as da

    store = args.store or DEMO_STORE
    backend = "icechunk" if args.icechunk else None
    t0 = time.perf_counter()
    pos, attrs = demo_points(args.points, args.seed)
    _status(args, f"demo: {args.points:,} synthetic points (12 clusters + background) in "
                  f"{time.perf_counter() - t0:.1f}s -> {store}" + (" (icechunk)" if backend else ""))
    rows = max(10_000, -(-args.points // 8))
    pts = da.from_array(pos, chunks=(rows, 3))
    dattrs = {k: da.from_array(v, chunks=(rows,)) for k, v in attrs.items()}
    with _cluster(args) as client:
        report = zv_dask.ingest(pts, store, attributes=dattrs, chunk_shape=125.0, base_bin_shape=25.0,
                                bounds=([0.0] * 3, [1000.0] * 3), backend=backend, client=client, overwrite=True,
                                pyramid={"method": "centroid", "points_per_task": DEMO_TASK_POINTS},
                                group_points=DEMO_TASK_POINTS, progress=not args.quiet, message="zv-dask demo")
    _in_cli_spelling(report)
    zs = zv_dask.open_store(store, "r", backend=backend)
    info = info_dict(zs)
    check = validate_store(zs)
    if args.json:
        _print_json({"report": report.to_dict(), "info": info, "validation": check.to_dict()}, out)
    else:
        print(repr(report), file=out)
        print("", file=out)
        print(format_info(info), file=out)
        print("", file=out)
        print(repr(check), file=out)
        print(f"\nnext: zv-dask info {store}" + (" --icechunk" if backend else "") +
              f"; in Python: zv_dask.read_points(zv_dask.open_store({store!r}"
              + (", backend='icechunk'" if backend else "") + "), level=2).compute()", file=out)
    return 0 if check.ok else 1


# -- entry point -------------------------------------------------------------------------------
def _quiet_logs(args) -> None:
    """Keep stderr for progress bars and errors: icechunk's and distributed's chatter off unless --debug;
    zv-dask's own log on stderr with --verbose (INFO) or --debug (DEBUG)."""
    debug, verbose = getattr(args, "debug", False), getattr(args, "verbose", False)
    if debug or verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        zv_log = logging.getLogger("zv_dask")
        zv_log.addHandler(handler)
        zv_log.setLevel(logging.DEBUG if debug else logging.INFO)
    if debug:
        return
    os.environ.setdefault("ICECHUNK_LOG", "error")
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")
    for name in ("distributed", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", module="zarr")
    warnings.filterwarnings("ignore", category=UserWarning, module="distributed")


@contextlib.contextmanager
def _result_stream():
    """A stream for the command's result; stdout (Python's and file descriptor 1) points at stderr meanwhile."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real file descriptors (embedded use): redirect Python's stdout only
        with contextlib.redirect_stdout(sys.stderr):
            yield sys.stdout
        return
    out = os.fdopen(saved, "w", encoding="utf-8", closefd=False)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield out
    finally:
        out.flush()
        sys.stderr.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str] | None = None) -> int:
    """Run the ``zv-dask`` command line; returns the exit code (0 done, 1 failure, 2 bad arguments or input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (getattr(args, "scheduler", None) or getattr(args, "scheduler_file", None)) and getattr(args, "workers", None):
        args.command_parser.error(
            "argument --workers: not allowed with argument --scheduler (the scheduler's cluster has its workers)")
    _quiet_logs(args)
    prog = f"{PROG} {args.command}"

    with _job_warnings() as said:
        code = _run(args, prog)
    if not isinstance(getattr(args, "error", None), UnfinishedJobError):  # (which says it already)
        for m in said:
            print(f"{prog}: warning: {cli_spelling(m)}", file=sys.stderr, flush=True)
    return code


@contextlib.contextmanager
def _job_warnings():
    """A store's unfinished job (:class:`UnfinishedJobWarning`), collected to be said once in the CLI's spelling.

    Python would print it with a file name and a source line, among the progress bars.
    """
    said: list[str] = []
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, UnfinishedJobWarning):
            if str(message) not in said:
                said.append(str(message))
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield said
    finally:
        warnings.showwarning = shown


def _run(args, prog: str) -> int:
    try:
        # Only the result goes to stdout (so --json output stays parseable): anything else printed
        # here or by worker processes started during the command goes to stderr.
        with _result_stream() as out:
            return int(args.func(args, out))
    except KeyboardInterrupt:
        kept = " (what the job finished is kept: run the same command with --resume to continue)" \
            if getattr(args, "func", None) in (cmd_ingest, cmd_pyramid) else ""
        print(f"{prog}: interrupted{kept}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's job is to turn errors into one line and an exit code
        args.error = e
        secrets = dict(getattr(args, "storage_option", None) or [])  # never print a secret given with -S
        if args.debug:
            import traceback
            print(redact("".join(traceback.format_exception(e)), secrets), end="", file=sys.stderr)
        code = 2 if isinstance(e, _bad_input_types()) else 1
        message = redact(cli_spelling(_one_line(e)), secrets)
        if getattr(args, "json", False):  # --json: the result on stdout is the error, as JSON
            _print_json({"error": message, "type": type(e).__name__, "exit_code": code}, sys.stdout)
        if code == 2:
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 2
        print(f"{prog}: failed: {type(e).__name__}: {message}" +
              ("" if args.debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1


def console_main() -> None:
    """The ``zv-dask`` executable: :func:`main`, then the process ends without the interpreter's finalization.

    Measured: a command that had used icechunk sometimes died *after* printing its result or
    error, at interpreter exit, with SIGSEGV (-11; a CI run and a soak job, 2026-12-03) or an
    abort (134, "terminate called without an active exception", reported in issue 19): icechunk's
    runtime threads still running while Python tears itself down. Every command closes its
    clusters, stores and files itself, so once the output is flushed nothing is left for
    finalization to do.
    """
    import logging

    try:
        code = main()
    except SystemExit as e:  # argparse's errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    console_main()
