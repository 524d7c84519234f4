"""Why the out-of-core shuffle stages its pieces on scratch: the alternatives measured side by side.

    python -m benchmarks.shuffle_choice --n 1e8

On the same Parquet input (uniform float32 xyz + 2 float32 attributes, on disk,
``benchmarks/data.py``), on ``local_cluster(2)``, one run each:

* ``ingest`` with the shuffle in memory (the budget is large enough);
* ``ingest`` with the shuffle staged on scratch (``--budget``, 2 GiB by default);
* one extra *pass* over the input (read, bin, sort by group, nothing kept): what
  processing the write groups in waves costs per extra wave, since each wave
  reads and bins every partition again to keep only its own groups' rows;
* distributed's disk-backed P2P shuffle of the same rows by write group
  (``DataFrame.shuffle(..., shuffle_method="p2p")``), counted at the output,
  with no cell written: the shuffle alone.

Prints a table and writes ``results/shuffle_choice.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time

import numpy as np

from benchmarks.common import HERE, RSSMonitor, disk_of, machine
from benchmarks.scale import BIN, CHUNK

BOUNDS = ([0.0, 0.0, 0.0], [1000.0, 1000.0, 1000.0])


def _grid():
    from zv_dask.format.grid import Grid

    return Grid(tuple(BOUNDS[0]), tuple(BOUNDS[1]), (CHUNK,) * 3, (BIN,) * 3, "float32")


def _groups(n_groups: int) -> np.ndarray:
    """Group starts over the cell ids, ``n_groups`` even ranges (the data are uniform)."""
    g = _grid()
    return np.linspace(0, g.n_cells, n_groups, endpoint=False).astype(np.int64)


def _pass(batch, starts):
    """Read + bin + sort a partition by group, keep nothing (one wave's work beyond the first)."""
    from zv_dask.ingest.shuffle import sort_by_group

    out = sort_by_group(batch, _grid(), starts, False)
    return 0 if out is None else len(out[1])


def _with_group(pdf, starts):
    g = _grid()
    cell, _ = g.assign(pdf[["x", "y", "z"]].to_numpy())
    return pdf.assign(group=np.searchsorted(starts, cell, side="right") - 1)


def timed(fn, client) -> tuple[float, int]:
    pids = set(client.run(os.getpid).values())
    with RSSMonitor() as mon:
        t = time.perf_counter()
        fn()
        wall = time.perf_counter() - t
    return wall, max((v for p, v in mon.peak.items() if p in pids), default=0)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.shuffle_choice", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e8)
    ap.add_argument("--budget", default="2GiB")
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--work", default=os.path.join(HERE, "work"))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    import dask
    import dask.dataframe as dd
    from distributed import Client

    import zv_dask
    from benchmarks.data import parquet_files
    from zv_dask.budget import parse_size
    from zv_dask.ingest.sources import as_source
    from zv_dask.scheduling import local_cluster

    n = int(args.n)
    files = parquet_files("uniform", n, os.path.join(args.data, "scale"))
    store = os.path.join(args.work, "choice.zv")
    rows = []

    def cluster_run(fn):
        """``fn(client)`` on a cluster of its own, so that each row's peak RSS is its own."""
        with local_cluster(2, local_directory=os.path.join(args.work, "dask")) as cluster, Client(cluster) as client:
            client.run(lambda: __import__("zv_dask"))
            return timed(lambda: fn(client), client)

    reps = {}
    for label, budget in (("ingest, shuffle in memory", "64GiB"), ("ingest, shuffle staged", args.budget)):
        shutil.rmtree(store, ignore_errors=True)

        def job(client, budget=budget, label=label):
            reps[label] = zv_dask.ingest(files, store, chunk_shape=CHUNK, base_bin_shape=BIN, bounds=BOUNDS,
                                         client=client, memory_budget=budget, pyramid={"levels": 3, "links": "none"})

        wall, rss = cluster_run(job)
        r = reps[label]
        rows.append({"what": label, "wall_s": wall, "peak_worker_rss": rss, "shuffle": r.shuffle,
                     "groups": r.groups, "bytes_staged": r.bytes_staged, "stages": r.seconds})
        shutil.rmtree(store, ignore_errors=True)
        print(rows[-1], flush=True)
    groups = reps["ingest, shuffle staged"].groups
    # waves: each holds the pieces of its groups in memory beside the running tasks, within the budget
    plan = zv_dask.plan_ingest(files[:1], store, chunk_shape=CHUNK, base_bin_shape=BIN, bounds=BOUNDS,
                               memory_budget=args.budget)
    room = parse_size(args.budget) - plan.estimated_peak_worker_memory
    waves = math.ceil(n * 26 * 1.25 / 2 / max(room, 1))  # 26 B per point in a piece, 2 workers
    starts = _groups(groups)
    src = as_source(files)
    wall, rss = cluster_run(lambda client: dask.compute(*[dask.delayed(_pass)(p, starts) for p in src.partitions]))
    rows.append({"what": "one more pass over the input (a wave's extra read + bin + sort)", "wall_s": wall,
                 "peak_worker_rss": rss, "waves_needed": waves,
                 "waves_estimate_s": rows[0]["wall_s"] + (waves - 1) * wall})
    print(rows[-1], flush=True)

    def p2p(client):
        df = dd.read_parquet(files).map_partitions(_with_group, starts)
        out = df.shuffle("group", npartitions=groups, shuffle_method="p2p")
        return int(out.map_partitions(len).sum().compute())

    wall, rss = cluster_run(p2p)
    rows.append({"what": "distributed P2P shuffle of the rows by group (disk), nothing written", "wall_s": wall,
                 "peak_worker_rss": rss})
    print(rows[-1], flush=True)
    result = {"machine": machine(), "n": n, "budget": args.budget, "data_disk": disk_of(args.data),
              "work_disk": disk_of(args.work), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "shuffle_choice.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    lines = [f"# Out-of-core shuffle: the alternatives at N={n:.0e} ({result['machine']['date']})", "",
             f"Parquet on {result['data_disk']}, stores, scratch and P2P spill on {result['work_disk']}; "
             f"local_cluster(2), one run each; budget {args.budget} per worker for the staged job.", "",
             "| what | wall s | peak RSS per worker GiB |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['wall_s']:.1f} | {r['peak_worker_rss'] / 2**30:.2f} |")
    w = rows[2]
    lines += ["", f"Waves within the same budget: {w['waves_needed']} waves, so about {w['waves_estimate_s']:.0f} s "
              f"(the in-memory job plus {w['waves_needed'] - 1} extra passes of {w['wall_s']:.1f} s)."]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "shuffle_choice.md"), "w") as fh:
        fh.write(md)
    print(md)
    shutil.rmtree(os.path.join(args.work, "dask"), ignore_errors=True)


if __name__ == "__main__":
    main()
