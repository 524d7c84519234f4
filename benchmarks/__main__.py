"""Throughput, scaling and memory of zv-dask against the reference and the floor, in one run.

    python -m benchmarks                 # the full table (1e5 .. 1e7 in memory, 1e8 from Parquet)
    python -m benchmarks --smoke         # the smallest size only, well under a minute
    python -m benchmarks --sizes 1e7 --kinds uniform --bins realistic --repeat 5

Every configuration runs:

* zv-dask, ``ingest(..., pyramid={"levels": 3, "links": ...})``: one job writing level 0, the
  pyramid and (``links``) the reference's cross-level links, +1 and -1: *the same arrays* the
  reference writes by default. Also without links, level 0 alone (against the floor), and
  level 0 then ``build_pyramid`` as a second job (``rounds``);
* the reference, zarr-vectors 0.9.2 ``write_points`` + ``build_pyramid`` in a child process,
  with its default links and without;
* the floor: the same level-0 sort and cell bytes, one core, no metadata.

zv-dask runs ``--repeat`` times on one LocalCluster (``zv_dask.scheduling.local_cluster``) and
reports the median; the reference runs once (it takes 10x longer). Writes
``results/benchmarks.json``, ``results/benchmarks.md`` and ``results/throughput.png``.
Timings are wall-clock on this machine; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import HERE, RSSMonitor, machine

CHUNK = 125.0
BINS = {"realistic": 12.5, "one-per-chunk": None}  # 1000 bins per chunk vs the reference's default
LEVELS = 3
MODES = ("links", "no links", "level 0", "rounds")


def run_reference(kind, n, bin_, links, work) -> dict:
    out = os.path.join(work, "ref.zv")
    cmd = [sys.executable, "-m", "benchmarks.reference", kind, str(n), str(CHUNK), str(bin_ or CHUNK), str(LEVELS),
           "1" if links else "0", out]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=os.path.dirname(HERE), capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {p.returncode}: {tail}"[:200], "wall_s": time.perf_counter() - t}
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_floor(pts, attrs, bin_, work) -> dict:
    from benchmarks.floor import floor_write

    out = os.path.join(work, "floor")
    r = floor_write(pts, attrs, CHUNK, bin_ or CHUNK, out)
    shutil.rmtree(out, ignore_errors=True)
    return r


def _one_zv(client, source, attrs, bin_, mode, out) -> dict:
    import zv_dask

    shutil.rmtree(out, ignore_errors=True)
    pyramid = None
    if mode in ("links", "no links"):
        pyramid = {"levels": LEVELS, "bin_ratio": 2, "links": "explicit" if mode == "links" else "none"}
    t0 = time.perf_counter()
    rep = zv_dask.ingest(source, out, attributes=attrs, chunk_shape=CHUNK, base_bin_shape=bin_,
                         bounds=([0, 0, 0], [1000, 1000, 1000]), client=client, pyramid=pyramid)
    t1 = time.perf_counter()
    counts = {int(lv["level"]): int(lv["vertex_count"]) for lv in rep.levels}
    pyr_s = 0.0
    if mode == "rounds":
        pr = zv_dask.build_pyramid(out, levels=LEVELS, bin_ratio=2, links="explicit", client=client)
        pyr_s = time.perf_counter() - t1
        counts.update({int(k): int(v) for k, v in pr.vertex_counts.items()})
    total = time.perf_counter() - t0
    r = {"ingest_s": t1 - t0, "pyramid_s": pyr_s, "total_s": total, "points": rep.points_written,
         "stages": rep.seconds, "bytes": rep.bytes_written, "level_counts": counts,
         "levels_in_write_tasks": rep.levels_in_write_tasks, "link_records": sum(rep.link_counts.values())}
    shutil.rmtree(out, ignore_errors=True)
    return r


@contextlib.contextmanager
def _scheduler(workers: int, threads: bool, work: str):
    """``(client, worker pids)``: a LocalCluster of ``workers`` processes, or (``threads``) Dask's threads in
    this process, one per core, as the CLI runs a job that asks for no cluster."""
    if threads:
        import dask

        with dask.config.set(scheduler="threads", num_workers=workers):
            yield None, {os.getpid()}
        return
    from distributed import Client

    from zv_dask.scheduling import local_cluster

    with local_cluster(workers, memory_limit="2.8GiB", local_directory=os.path.join(work, "dask")) as cluster, \
            Client(cluster) as client:
        client.run(lambda: __import__("zv_dask"))  # imports are not what we measure
        yield client, set(client.run(os.getpid).values())


def run_zv(source, attrs, bin_, workers, work, modes, repeat, threads: bool = False) -> list[dict]:
    """Each mode ``repeat`` times on one LocalCluster (or threads); returns one row per mode (median and spread)."""
    rows = []
    with _scheduler(workers, threads, work) as (client, worker_pids):
        warm = np.random.default_rng(0).uniform(0, 1000, (20_000, 3)).astype("f4")
        _one_zv(client, warm, {"a": warm[:, 0]}, bin_, "links", os.path.join(work, "warm.zv"))  # first-call costs
        for mode in modes:
            runs = []
            with RSSMonitor() as mon:
                for _ in range(repeat):
                    runs.append(_one_zv(client, source, attrs, bin_, mode, os.path.join(work, "zv.zv")))
            worker_rss = max((v for p, v in mon.peak.items() if p in worker_pids), default=0)
            totals = [r["total_s"] for r in runs]
            best = runs[int(np.argsort(totals)[len(totals) // 2])]  # the median run
            rows.append({**best, "mode": mode, "runs": totals, "total_s": statistics.median(totals),
                         "peak_worker_rss": worker_rss, "peak_client_rss": mon.peak.get(os.getpid(), 0)})
    return rows


def _default_work() -> str:
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 8 * 2**30:
        return "/dev/shm/zvbench"
    return os.path.join(HERE, "work")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="smallest size, one configuration, zv-dask and the reference with links only (CI)")
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e5, 1e6, 1e7, 1e8])
    ap.add_argument("--kinds", nargs="+", default=["uniform", "clustered"])
    ap.add_argument("--bins", nargs="+", default=list(BINS), choices=list(BINS))
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--threads", action="store_true",
                    help="run zv-dask on that many threads in this process (the CLI's default) instead of a "
                         "LocalCluster of worker processes")
    ap.add_argument("--repeat", type=int, default=3, help="zv-dask runs per configuration (median reported)")
    ap.add_argument("--reference-max", type=float, default=1e7, help="largest N run through the reference")
    ap.add_argument("--floor-max", type=float, default=1e7, help="largest N for the in-memory floor")
    ap.add_argument("--parquet-from", type=float, default=1e8, help="N from which input is read from Parquet")
    ap.add_argument("--append", action="store_true", help="add these rows to the existing results file")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--work", default=_default_work(),
                    help="where stores are written (default: /dev/shm/zvbench when there is a tmpfs, so a "
                         "rate-limited disk does not decide the result; else benchmarks/work)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.kinds, args.bins, args.workers, args.repeat = [3e4], ["uniform"], ["realistic"], [2], 1
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)
    from benchmarks.data import make_points, write_parquet
    from benchmarks.report import write_report

    rows = []
    for n in [int(s) for s in args.sizes]:
        for kind in args.kinds:
            parquet = n >= args.parquet_from
            if parquet:
                if kind != "uniform":
                    continue  # 1e8: one data kind is enough to show the scaling
                source = write_parquet(kind, n, os.path.join(args.work, f"parquet-{kind}-{n}"))
                pts = attrs = None
            else:
                pts, attrs = make_points(kind, n)
                source = pts
            for bins in args.bins:
                bin_ = BINS[bins]
                base = {"n": n, "kind": kind, "bins": bins}
                if pts is not None and n <= args.floor_max:
                    r = run_floor(pts, attrs, bin_, args.work)
                    rows.append({**base, "system": "floor", "workers": 1, **r})
                    print(f"floor      {kind:9s} {bins:13s} N={n:.0e}  {r['total_s']:.2f}s", flush=True)
                for w in args.workers:
                    modes = MODES if (w == max(args.workers) and not parquet and not args.smoke) else ("links",)
                    repeat = 1 if parquet else args.repeat
                    for r in run_zv(source, attrs if not parquet else None, bin_, w, args.work, modes, repeat,
                                    args.threads):
                        rows.append({**base, "system": f"zv-dask ({r['mode']})", "workers": w,
                                     "scheduler": "threads" if args.threads else "processes",
                                     "input": "parquet" if parquet else "numpy", **r})
                        who = f"{w}{'t' if args.threads else ''}"
                        print(f"zv-dask/{who} {r['mode']:9s} {kind:9s} {bins:13s} N={n:.0e}  total {r['total_s']:.2f}s "
                              f"(runs {', '.join(f'{t:.2f}' for t in r['runs'])}) worker RSS "
                              f"{r['peak_worker_rss'] / 2**30:.2f} GiB", flush=True)
                if n <= args.reference_max:
                    for links in (True,) if args.smoke else (True, False):
                        r = run_reference(kind, n, bin_, links, args.work)
                        rows.append({**base, "system": "reference (links)" if links else "reference (no links)",
                                     "workers": 1, **r})
                        print(f"reference  {kind:9s} {bins:13s} N={n:.0e}  links={links} {r}", flush=True)
                else:
                    rows.append({**base, "system": "reference (links)", "workers": 1,
                                 "error": f"not run: N > {args.reference_max:.0e} (its pyramid with links passed "
                                          "20 GiB and was killed at 1e8 on this machine, see NOTES)"})
            del pts, attrs
    name = "smoke" if args.smoke else "benchmarks"
    path = os.path.join(args.out, f"{name}.json")
    if args.append and os.path.exists(path):
        with open(path) as fh:
            rows = json.load(fh)["rows"] + rows
    result = {"machine": machine(), "smoke": args.smoke, "work_dir": os.path.abspath(args.work),
              "repeat": args.repeat, "rows": rows}
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    md = write_report(result, args.out, name)
    print(md)
    shutil.rmtree(os.path.join(args.work, "dask"), ignore_errors=True)


if __name__ == "__main__":
    main()
