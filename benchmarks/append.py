"""What an append costs: 1e6 points into a 1e8-point store, against the chunks it touches and a full re-ingest.

    python -m benchmarks.append                 # base 1e8, three appends of 1e6, a full re-ingest
    python -m benchmarks.append --n 2e7 --verify

The base store is the Parquet set of ``benchmarks/data.py`` (uniform float32
xyz in [0, 1000)^3 + two float32 attributes) ingested with chunk 125 (an 8^3
grid: 512 chunks of ~195,000 points at 1e8), bin 12.5 and 3 coarse levels.
Then three batches of 1e6 points are appended in a row, each touching more of
the store: one chunk (a tile), one slab of 64 chunks, and the whole store.
Last, everything (base + the three batches, in that order) is ingested again
in one job, which is what an append saves; ``--verify`` compares the two
stores file by file. Every step is a child process (``local_cluster(2)``, one
thread per worker) timed whole; stores and data are on this machine's
(rate-limited) virtual disk. Writes ``results/append.json`` and
``results/append.md``; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from benchmarks.common import HERE, disk_of, machine

GEOMETRY = dict(chunk_shape=125.0, base_bin_shape=12.5, bounds=([0] * 3, [1000] * 3))
PYRAMID = {"levels": 3, "links": "none"}

CHILD = r"""
import json, sys, time
if __name__ == "__main__":
    import zv_dask
    from distributed import Client
    from zv_dask.scheduling import local_cluster
    files, store, kw = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    with local_cluster(2) as c, Client(c) as cl:
        t = time.perf_counter()
        rep = zv_dask.ingest(files, store, client=cl, **kw)
        job = time.perf_counter() - t
    print(json.dumps({"job_s": job, "levels": rep.levels, "seconds": rep.seconds, "points": rep.points_written}))
"""

BATCHES = [  # name, lower corner, upper corner (world units); 1e6 points each
    ("tile: 1 chunk", (0, 0, 0), (125, 125, 125)),
    ("slab: 64 chunks", (250, 0, 0), (375, 1000, 1000)),
    ("everywhere: 512 chunks", (0, 0, 0), (1000, 1000, 1000)),
]


def _child(files, store, kw) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(files), store, json.dumps(kw)],
                          capture_output=True, text=True, cwd=HERE, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"wall_s": wall, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _batch_file(directory: str, i: int, lo, hi, n: int) -> str:
    import numpy as np
    import pandas as pd

    # (named to sort after the base files: a list of Parquet files is read in sorted order)
    path = os.path.join(directory, f"uniform-append-{i}-{n}.parquet")
    if not os.path.exists(path):
        rng = np.random.default_rng(500 + i)
        pts = rng.uniform(lo, hi, (n, 3)).astype(np.float32)
        pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2],
                      "intensity": rng.random(n, dtype=np.float32),
                      "height": (pts[:, 2] / 1000).astype(np.float32)}).to_parquet(path)
    return path


def _digest(root: str) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.blake2b(fh.read(), digest_size=16).hexdigest()
    return out


def main(argv=None) -> None:
    from benchmarks.data import parquet_files

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=float, default=1e8, help="points in the base store")
    p.add_argument("--batch", type=float, default=1e6, help="points per appended batch")
    p.add_argument("--data", default=os.path.join(HERE, "data", "scale"))
    p.add_argument("--work", default=os.path.join(HERE, "work"))
    p.add_argument("--verify", action="store_true", help="compare the appended store with the re-ingest, file by file")
    p.add_argument("--keep", action="store_true", help="keep the stores")
    args = p.parse_args(argv)
    n, m = int(args.n), int(args.batch)
    base_files = parquet_files("uniform", n, args.data)
    os.makedirs(args.work, exist_ok=True)
    # the same name in two directories: a store's name is in its root metadata ("ome")
    store, whole = os.path.join(args.work, "append.zv"), os.path.join(args.work, "whole", "append.zv")
    for s in (store, whole):
        shutil.rmtree(s, ignore_errors=True)
    kw = {**GEOMETRY, "pyramid": PYRAMID}
    base = _child(base_files, store, kw)
    print(f"base ingest of {n:.0e}: whole process {base['wall_s']:.1f} s", flush=True)
    steps, files = [], list(base_files)
    for i, (name, lo, hi) in enumerate(BATCHES):
        f = _batch_file(args.data, i, lo, hi, m)
        files.append(f)
        r = _child(f, store, {"mode": "append"})
        touched = {lv["level"]: (lv.get("rewritten", 0), lv.get("regions", 0)) for lv in r["levels"]}
        steps.append({"batch": name, **r, "touched": touched})
        print(f"append {name}: whole process {r['wall_s']:.1f} s, job {r['job_s']:.1f} s, rewritten "
              + ", ".join(f"L{k} {c} chunks" + (f"/{g} regions" if g else "") for k, (c, g) in touched.items()),
              flush=True)
    full = _child(files, whole, kw)
    print(f"full re-ingest of {n + 3 * m:.2e}: whole process {full['wall_s']:.1f} s", flush=True)
    same = None
    if args.verify:
        a, b = _digest(store), _digest(whole)
        same = a == b
        if not same:
            print("differ:", sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:10])
        print(f"appended store == re-ingest, file by file: {same} ({len(a)} files)", flush=True)
    if not args.keep:
        for s in (store, whole):
            shutil.rmtree(s, ignore_errors=True)
    result = {"machine": machine(), "n": n, "batch": m, "base": base, "appends": steps, "reingest": full,
              "identical": same, "data_disk": disk_of(args.data), "work_disk": disk_of(args.work)}
    out = os.path.join(HERE, "results")
    with open(os.path.join(out, "append.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    mc = result["machine"]
    lines = [f"# Append: cost against chunks touched and against a re-ingest ({mc['date']})", "",
             f"Machine: {mc['cpu']}, {mc['cores']} cores, {mc['ram_gib']} GiB; zv-dask {mc['zv_dask']}. Base store "
             f"{n:.0e} points from Parquet ({result['data_disk']}) into a local store ({result['work_disk']}), "
             "chunk 125 (512 chunks), bin 12.5, 3 coarse levels, no links, `local_cluster(2)`. Each append adds "
             f"{m:.0e} points; whole-process wall times (the job's process, cluster start included).", "",
             "| step | level-0 chunks rewritten | coarse regions rebuilt (L1/L2/L3) | whole process s | job s | "
             "share of a re-ingest |", "|---|---|---|---|---|---|",
             f"| base ingest ({n:.0e}) | 512 | | {base['wall_s']:.1f} | {base['job_s']:.1f} | |"]
    for s in steps:
        t = s["touched"]
        regions = "/".join(str(t.get(k, (0, 0))[1]) for k in (1, 2, 3))
        lines.append(f"| append {s['batch']} | {t[0][0]} | {regions} | {s['wall_s']:.1f} | {s['job_s']:.1f} | "
                     f"{s['wall_s'] / full['wall_s'] * 100:.0f}% |")
    lines += [f"| full re-ingest ({n + 3 * m:.3e}) | 512 | | {full['wall_s']:.1f} | {full['job_s']:.1f} | 100% |",
              ""]
    if same is not None:
        lines.append(f"The appended store and the re-ingest are identical file by file: {same}.")
    with open(os.path.join(out, "append.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
