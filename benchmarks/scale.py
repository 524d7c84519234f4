"""Out-of-core scale run: Parquet on disk -> a local store with a 3-level pyramid, 1e8 to 1e9 points.

    python -m benchmarks.scale                              # 1e8, 3e8, 1e9 with --memory-budget 2GiB
    python -m benchmarks.scale --sizes 1e8 --budgets 2GiB none   # also the default budget (half the limit)

For each N the harness generates uniform 3-D float32 points with two float32
attributes as Parquet files of 2,000,000 rows (``benchmarks/data.py``; kept on
disk under ``--data``, shared by every N and reused across runs), then runs one ``zv_dask.ingest``
job on ``local_cluster(2)`` (two worker processes, one thread each, memory limit
auto) into a store on disk (``--work``): chunk 125, bin 12.5, 3 coarse levels,
bin ratio 2, no cross-level links (the CLI's default). It prints and records
wall time, points per second, the shuffle mode, the bytes staged on scratch and
the peak RSS of each worker (sampled every 50 ms), then removes the store.
Writes ``results/scale.json``, ``results/scale.md`` and ``results/scale.png``.
Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from benchmarks.common import HERE, RSSMonitor, disk_of, machine

CHUNK, BIN, LEVELS = 125.0, 12.5, 3


def run_one(client, source: list[str], n: int, store: str, budget, label: str) -> dict:
    import zv_dask

    shutil.rmtree(store, ignore_errors=True)
    extra = {} if budget is None else {"memory_budget": budget}  # none: the default (or a build from before budgets)
    worker_pids = set(client.run(os.getpid).values())
    with RSSMonitor() as mon:
        t0 = time.perf_counter()
        rep = zv_dask.ingest(source, store, chunk_shape=CHUNK, base_bin_shape=BIN,
                             bounds=([0, 0, 0], [1000, 1000, 1000]), client=client, **extra,
                             pyramid={"levels": LEVELS, "bin_ratio": 2, "links": "none"})
        wall = time.perf_counter() - t0
    store_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(store) for f in fs)
    shutil.rmtree(store, ignore_errors=True)
    rss = sorted((v for p, v in mon.peak.items() if p in worker_pids), reverse=True)
    return {"n": n, "series": label, "budget": budget or "default",
            "memory_budget_bytes": getattr(rep, "memory_budget", 0), "wall_s": wall,
            "points_per_s": rep.points_written / wall, "points": rep.points_written,
            "shuffle": getattr(rep, "shuffle", "memory"),
            "bytes_staged": getattr(rep, "bytes_staged", 0), "store_bytes": store_bytes, "stages": rep.seconds,
            "levels": {lv["level"]: lv["vertex_count"] for lv in rep.levels},
            "levels_in_write_tasks": rep.levels_in_write_tasks, "groups": rep.groups, "partitions": rep.partitions,
            "peak_worker_rss": rss, "peak_client_rss": mon.peak.get(os.getpid(), 0)}


def write_report(result: dict, out: str) -> str:
    m = result["machine"]
    lines = [f"# Out-of-core scale run ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; Python {m['python']}, zv-dask "
             f"{m['zv_dask']}, dask {m['dask']}. Parquet input under `{result['data_dir']}` "
             f"({result['data_disk']}); stores and scratch under `{result['work_dir']}` ({result['work_disk']}).",
             "", "One `ingest` job per row: Parquet (uniform float32 xyz + 2 float32 attributes, 2,000,000 rows per "
             "file) -> level 0 + 3 coarse levels (chunk 125, bin 12.5, ratio 2, no links), `local_cluster(2)`: two "
             "worker processes with one thread each.", "",
             "| N | memory budget | shuffle | wall s | M points/s | staged GiB | store GiB | peak RSS per worker GiB |"
             " client RSS GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rss = ", ".join(f"{v / 2**30:.2f}" for v in r["peak_worker_rss"])
        budget = (f"{r['budget']} ({r['memory_budget_bytes'] / 2**30:.1f} GiB)" if r["memory_budget_bytes"]
                  else r["series"])
        lines.append(f"| {r['n']:.0e} | {budget} | {r['shuffle']} | "
                     f"{r['wall_s']:.1f} | {r['points_per_s'] / 1e6:.2f} | {r['bytes_staged'] / 2**30:.1f} | "
                     f"{r['store_bytes'] / 2**30:.1f} | {rss} | {r['peak_client_rss'] / 2**30:.2f} |")
    lines += ["", "Stage seconds per row: " + "; ".join(
        f"{r['n']:.0e}/{r['budget']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items())
        for r in result["rows"])]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, "scale.md"), "w") as fh:
        fh.write(md)
    _plot(result["rows"], os.path.join(out, "scale.png"))
    return md


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - the plot extra is optional
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for series in dict.fromkeys(r["series"] for r in rows):
        rs = sorted((r for r in rows if r["series"] == series), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        rss = [max(r["peak_worker_rss"]) / 2**30 for r in rs]
        a.plot(ns, rss, "o-", label=series)
        b.plot(ns, [r["wall_s"] for r in rs], "o-", label=series)
        for x, y, r in zip(ns, rss, rs):
            a.annotate(r["shuffle"], (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    a.axhline(3, color="grey", ls=":", lw=1)
    a.set(xscale="log", xlabel="points", ylabel="peak RSS of the largest worker (GiB)", ylim=(0, None),
          title="worker memory against N")
    b.set(xscale="log", yscale="log", xlabel="points", ylabel="wall time (s)", title="ingest + 3-level pyramid")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e8, 3e8, 1e9])
    ap.add_argument("--budgets", nargs="+", default=["2GiB"], help="memory budgets per worker ('none': default)")
    ap.add_argument("--data", default=os.path.join(HERE, "data"), help="where the Parquet input is kept (disk)")
    ap.add_argument("--work", default=os.path.join(HERE, "work"), help="where stores and scratch go (disk)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--append", action="store_true", help="add these rows to results/scale.json")
    ap.add_argument("--label", help="the series name in the table and plot (default: 'budget <budget>')")
    args = ap.parse_args(argv)
    from distributed import Client

    from benchmarks.data import parquet_files
    from zv_dask.scheduling import local_cluster

    os.makedirs(args.work, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes]:
        t = time.perf_counter()
        source = parquet_files("uniform", n, os.path.join(args.data, "scale"))
        print(f"input N={n:.0e}: {len(source)} files ready in {time.perf_counter() - t:.0f}s", flush=True)
        for budget in args.budgets:
            budget = None if budget == "none" else budget
            with local_cluster(2, local_directory=os.path.join(args.work, "dask")) as cluster, \
                    Client(cluster) as client:
                client.run(lambda: __import__("zv_dask"))  # imports are not what we measure
                r = run_one(client, source, n, os.path.join(args.work, "scale.zv"), budget,
                            args.label or f"budget {budget or 'default'}")
            rows.append(r)
            print(f"N={n:.0e} budget={r['budget']}: {r['wall_s']:.1f}s, {r['points_per_s'] / 1e6:.2f} M points/s, "
                  f"shuffle {r['shuffle']}, staged {r['bytes_staged'] / 2**30:.1f} GiB, worker RSS "
                  f"{', '.join(f'{v / 2**30:.2f}' for v in r['peak_worker_rss'])} GiB", flush=True)
    path = os.path.join(args.out, "scale.json")
    if args.append and os.path.exists(path):
        with open(path) as fh:
            rows = json.load(fh)["rows"] + rows
    result = {"machine": machine(), "data_dir": os.path.abspath(args.data), "data_disk": disk_of(args.data),
              "work_dir": os.path.abspath(args.work), "work_disk": disk_of(args.work), "rows": rows}
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    print(write_report(result, args.out))
    shutil.rmtree(os.path.join(args.work, "dask"), ignore_errors=True)


if __name__ == "__main__":
    main()
