"""Where an ingest's time goes, stage by stage, on one LAS file.

    python -m benchmarks.stages /dev/shm/zv-peers/airborne-10000000.las
    python -m benchmarks.stages A.las B.las --out benchmarks/results/stages.md

Each file is ingested twice, the way the CLI runs it (``--chunk-shape 125 --bin-shape 12.5``,
the default pyramid, every LAS dimension kept), into a store beside it (``--dir``):

1. on Dask's threads in this process, one per core (the CLI's default), timed whole: the
   job's own stage clocks (scan, prepare, write, finalize, pyramid) in wall seconds;
2. on the synchronous scheduler under cProfile: one thread's seconds (its elapsed time, which
   is CPU time but for waits), each profiled function's own time put in the stage of the first
   function up its callers that belongs to one (numpy's and zstd's time goes to the zv-dask
   function that called them; waits for zarr's event loop and the file-writing threads, to the
   function waiting):

   * read/decode: laspy and ``zv_dask.ingest.las`` (bytes to positions and attributes);
   * scan: pass 1's statistics and chunk counts (its reads are read/decode);
   * split: binning the points (``Grid.assign``) and cutting partitions into write groups;
   * lay out: a group's points sorted into chunks and fragments (``plan_chunks``, the gathers);
   * encode: cells to bytes (frames, zstd);
   * write: cell objects to the store (files, object PUTs, zarr's codec path);
   * metadata: arrays made and opened, ``zarr.json`` and ZV metadata, the journal;
   * pyramid: the coarse levels' binning and reductions, links (their cells' encoding and
     writing count as encode and write);
   * Dask and the rest: the scheduler, the graph, everything else.

   Transfer between workers is nil in one process; the CLI's ``--workers`` rows of
   ``benchmarks/results/peers.md`` against its default rows are what it costs.

Writes ``stages.json`` and ``stages.md`` in ``--out``. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import time

from benchmarks.common import HERE, disk_of, machine

STAGES = ("read/decode", "scan", "split", "lay out", "encode", "write", "metadata", "pyramid", "Dask and the rest")

# (path fragment, function name or None for any): the first rule a function matches gives its stage
_RULES = (
    ("/laspy/", None, "read/decode"), ("lazrs", None, "read/decode"), ("zv_dask/ingest/las.py", None, "read/decode"),
    ("zv_dask/ingest/sources.py", "_las_batch", "read/decode"),
    ("zv_dask/ingest/shuffle.py", "scan_partition", "scan"), ("zv_dask/ingest/bounds.py", None, "scan"),
    ("zv_dask/ingest/scan.py", None, "scan"), ("zv_dask/ingest/shuffle.py", "chunk_occupancy", "scan"),
    ("zv_dask/format/grid.py", "assign", "split"), ("zv_dask/ingest/shuffle.py", None, "split"),
    ("zv_dask/ingest/batch.py", None, "split"), ("zv_dask/ingest/staging.py", None, "split"),
    ("zv_dask/store/levels.py", "encode_frame", "encode"), ("zv_dask/format/cells.py", None, "encode"),
    ("zv_dask/format/layout.py", "encode_plan", "encode"), ("zv_dask/store/levels.py", "encode_level", "encode"),
    ("zv_dask/format/layout.py", None, "lay out"), ("zv_dask/ingest/tasks.py", "_lay_out", "lay out"),
    ("zv_dask/store/levels.py", "from_plan", "lay out"),
    ("zv_dask/store/cellio.py", None, "write"), ("zv_dask/store/levels.py", "write_cells", "write"),
    ("zarr/core/codec_pipeline", None, "write"), ("zarr/storage", None, "write"),
    ("zv_dask/pyramid/", None, "pyramid"), ("zv_dask/format/links.py", None, "pyramid"),
    ("zv_dask/format/metadata.py", None, "metadata"), ("zv_dask/store/", None, "metadata"),
    ("zarr/", None, "metadata"), ("zv_dask/ingest/resume.py", None, "metadata"),
)


def _rule(func: tuple) -> str | None:
    path, _, name = func
    for frag, fname, stage in _RULES:
        if frag in path and (fname is None or fname == name):
            return stage
    return None


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    """Every profiled function's own time, in the stage of its nearest caller that has one."""
    raw = stats.stats  # type: ignore[attr-defined]  # {func: (cc, nc, tt, ct, {caller: (cc, nc, tt, ct)})}
    memo: dict[tuple, dict[str, float]] = {}
    visiting: set[tuple] = set()

    def where(func: tuple) -> dict[str, float]:
        """Shares of ``func``'s calls per stage, from its callers' (weighted by the time spent under each)."""
        if func in memo:
            return memo[func]
        own = _rule(func)
        if own is not None:
            memo[func] = {own: 1.0}
            return memo[func]
        if func in visiting:  # a cycle: this path adds nothing, the others share it out
            return {}
        visiting.add(func)
        out: dict[str, float] = {}
        for c, e in raw.get(func, (0, 0, 0, 0, {}))[4].items():
            w = e[3] or e[2] or 1e-12
            for stage, share in where(c).items():
                out[stage] = out.get(stage, 0.0) + share * w
        visiting.discard(func)
        total = sum(out.values())
        memo[func] = {k: v / total for k, v in out.items()} if total else {"Dask and the rest": 1.0}
        return memo[func]

    got = dict.fromkeys(STAGES, 0.0)
    for func, (_, _, tt, _, _) in raw.items():
        for stage, share in where(func).items():
            got[stage] += tt * share
    return got


def _ingest(path: str, store: str, scheduler: str):
    import dask

    import zv_dask

    shutil.rmtree(store, ignore_errors=True)
    with dask.config.set(scheduler=scheduler):
        t = time.perf_counter()
        rep = zv_dask.ingest(path, store, chunk_shape=125, base_bin_shape=12.5, pyramid=True)
        wall = time.perf_counter() - t
    shutil.rmtree(store, ignore_errors=True)
    return rep, wall


def _warm(work: str) -> None:
    """First-call costs (imports, codecs, laspy) out of the way, on a small LAS file."""
    from benchmarks.compression import write_las

    small = os.path.join(work, "stages-warm.las")
    if not os.path.exists(small):
        write_las(small, 10_000, seed=1)
    _ingest(small, os.path.join(work, "stages-warm.zv"), "threads")


def measure(path: str, work: str) -> dict:
    store = os.path.join(work, "stages.zv")
    _warm(work)
    rep, wall = _ingest(path, store, "threads")
    # cProfile's own clock (the main thread's elapsed time): the process's CPU clock costs a system call
    # a call and slowed the profiled job 2.6x; what the main thread waits for (zarr's event loop, the
    # file-writing threads) counts in the stage that waits
    prof = cProfile.Profile()
    prof.enable()
    _, cpu_wall = _ingest(path, store, "synchronous")
    prof.disable()
    stats = pstats.Stats(prof)
    return {"file": os.path.basename(path), "points": rep.points_written, "threads_wall_s": wall,
            "threads_stages_s": dict(rep.seconds), "synchronous_wall_s": cpu_wall,
            "cpu_stages_s": stage_seconds(stats), "profiled_s": float(stats.total_tt)}  # type: ignore[attr-defined]


def report(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Where an ingest's time goes ({m['date']})", "",
             f"`python -m benchmarks.stages {' '.join(result['files'])}`: {m['cpu']}, {m['cores']} cores, "
             f"{m['ram_gib']} GiB, Python {m['python']}, zv-dask {m['zv_dask']}, dask {m['dask']}, zarr "
             f"{m['zarr']}. Files and stores on {result['disk']} (`{result['dir']}`). Each file: `ingest(path, "
             "store, chunk_shape=125, base_bin_shape=12.5, pyramid=True)`, every LAS dimension kept, zstd.", "",
             "## Wall seconds on threads in one process (the CLI's default), the job's own stage clocks", "",
             "| file | points | scan | prepare | write (split, lay out, encode, write, fused coarse levels) | "
             "finalize | pyramid (the rest of the levels) | whole call |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        s = r["threads_stages_s"]
        lines.append(f"| {r['file']} | {r['points']:,} | " + " | ".join(
            f"{s.get(k, 0.0):.2f}" for k in ("scan", "prepare", "write", "finalize", "pyramid")) +
            f" | {r['threads_wall_s']:.2f} |")
    lines += ["", "## One thread's seconds per stage (synchronous scheduler, cProfile)", "",
              "| file | " + " | ".join(STAGES) + " | profiled s | wall under the profiler |",
              "|---|" + "---:|" * (len(STAGES) + 2)]
    for r in result["rows"]:
        c = r["cpu_stages_s"]
        tot = sum(c.values()) or 1.0
        lines.append(f"| {r['file']} | " + " | ".join(f"{c[k]:.2f} ({100 * c[k] / tot:.0f}%)" for k in STAGES) +
                     f" | {r['profiled_s']:.2f} | {r['synchronous_wall_s']:.2f} |")
    lines += ["", "Each function's own time goes to the stage of the nearest function up its callers that "
              "belongs to one (shared out by the time spent under each caller); numpy's and zstd's time is its "
              "caller's. The profiler slows Python-heavy code more than numpy-heavy code. Transfer between "
              "workers is nil here (one process): the `--workers` rows of `peers.md` show what it costs."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stages", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="LAS/LAZ files, one row each")
    ap.add_argument("--dir", default=None, help="where the stores go (default: beside the first file)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"), help="where stages.{json,md} go")
    a = ap.parse_args(argv)
    work = a.dir or os.path.dirname(os.path.abspath(a.files[0]))
    os.makedirs(work, exist_ok=True)
    rows = []
    for f in a.files:
        rows.append(measure(f, work))
        r = rows[-1]
        print(f"{r['file']}: threads {r['threads_wall_s']:.2f} s; CPU " +
              ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_stages_s"].items()), flush=True)
    result = {"machine": machine(), "files": [os.path.basename(f) for f in a.files], "dir": work,
              "disk": disk_of(work), "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "stages.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    md = report(result)
    with open(os.path.join(a.out, "stages.md"), "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
