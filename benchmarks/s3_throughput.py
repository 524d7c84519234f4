"""Write throughput of ``zv_dask.ingest`` to S3 against the floor, on a loopback SeaweedFS server.

    python benchmarks/s3_throughput.py            # 1e7 points
    python benchmarks/s3_throughput.py 3e6        # any N
    python benchmarks/s3_throughput.py --smoke    # 1e5 points, a few seconds

The server is started here (``tests/s3server.py``: SeaweedFS ``weed mini`` on
127.0.0.1, random ports, its own temporary data dir) and stopped at the end.

* **zv-dask**: ``zv_dask.ingest`` of a uniform cloud (3-D float32 + two float32
  attributes, chunk 125, bin 12.5) to ``s3://test/zv/x.zv`` on a ``LocalCluster``
  (2 worker processes, 1 thread each): scan, store creation, shuffle, encode,
  parallel PUTs, metadata. The cluster is up before the clock starts.
* **floor**: the very same cell objects (read back from the zv-dask store: same
  keys, same bytes, same object count) PUT again to a fresh prefix with
  ``obstore.put_async`` at ``--concurrency`` requests in flight from one process.
  No computation at all: only what the server and the HTTP client cost.

The ratio is zv-dask's time over the floor's (1.0 would be "as fast as PUTting
the finished bytes"). Prints a markdown table and writes
``benchmarks/results/s3_throughput.json``. Timings are wall clock on this
machine; the server shares its cores with the writers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, os.path.join(ROOT, "tests")):  # benchmarks.data and tests/s3server.py (also in spawned workers)
    if _p not in sys.path:
        sys.path.insert(0, _p)

CHUNK = 125.0
BIN = 12.5


def _cells(raw, prefix: str) -> dict[str, bytes]:
    """Every chunk cell object under ``prefix`` (keys with ``/c/``), with its bytes."""
    import obstore

    async def fetch(keys):
        sem = asyncio.Semaphore(32)

        async def one(k):
            async with sem:
                r = await obstore.get_async(raw, k)
                return k, bytes(await r.bytes_async())

        return dict(await asyncio.gather(*(one(k) for k in keys)))

    keys = [m["path"] for m in obstore.list(raw, prefix=f"{prefix}/").collect() if "/c/" in m["path"]]
    return asyncio.run(fetch(keys))


def floor_put(raw, cells: dict[str, bytes], prefix: str, concurrency: int) -> float:
    """PUT ``cells`` under a new prefix with ``concurrency`` requests in flight; returns seconds."""
    import obstore

    async def run():
        sem = asyncio.Semaphore(concurrency)

        async def one(k, v):
            async with sem:
                await obstore.put_async(raw, f"{prefix}/{k}", v)

        await asyncio.gather(*(one(k, v) for k, v in cells.items()))

    t0 = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - t0


def run(n: int, workers: int, concurrency: int, partition_rows: int | None) -> dict:
    import obstore
    from distributed import Client, LocalCluster
    from s3server import SeaweedS3

    import zv_dask
    from benchmarks.data import make_points

    pts, attrs = make_points("uniform", n)
    tmp = tempfile.mkdtemp(prefix="zv-s3bench-")
    srv = SeaweedS3.start(os.path.join(tmp, "seaweedfs"))
    try:
        opts = srv.storage_options()
        raw = srv.obstore()
        with LocalCluster(n_workers=workers, processes=True, threads_per_worker=1, dashboard_address=None,
                          host="127.0.0.1", local_directory=os.path.join(tmp, "dask")) as cluster, \
                Client(cluster) as client:
            client.submit(sum, [1]).result()  # workers warm
            kw = {"partition_rows": partition_rows} if partition_rows else {}
            t0 = time.perf_counter()
            rep = zv_dask.ingest(pts, srv.url("zv", "x.zv"), attributes=attrs, chunk_shape=(CHUNK,) * 3,
                                 base_bin_shape=(BIN,) * 3, storage_options=opts, client=client, **kw)
            zv_seconds = time.perf_counter() - t0

        all_objects = obstore.list(raw, prefix="zv/x.zv/").collect()
        cells = _cells(raw, "zv/x.zv")
        cell_bytes = sum(len(v) for v in cells.values())
        rel = {k[len("zv/x.zv/"):]: v for k, v in cells.items()}
        floor_seconds = floor_put(raw, rel, "floor/x.zv", concurrency)
        floor_objects = len(obstore.list(raw, prefix="floor/x.zv/").collect())
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    mib = cell_bytes / 2**20
    write_s = rep.seconds.get("write", float("nan"))
    return {
        "n_points": n,
        "workers": workers,
        "concurrency": concurrency,
        "chunk_shape": CHUNK,
        "base_bin_shape": BIN,
        "cells": len(cells),
        "cell_bytes": cell_bytes,
        "objects_written_by_zv_dask": len(all_objects),
        "objects_written_by_floor": floor_objects,
        "zv_dask": {"seconds": zv_seconds, "stages": rep.seconds, "MiB_per_s": mib / zv_seconds,
                    "points_per_s": n / zv_seconds, "write_stage_MiB_per_s": mib / write_s,
                    "partitions": rep.partitions, "groups": rep.groups},
        "floor": {"seconds": floor_seconds, "MiB_per_s": mib / floor_seconds},
        "ratio": zv_seconds / floor_seconds,
        "write_stage_ratio": write_s / floor_seconds,
    }


def table(r: dict) -> str:
    zv, fl = r["zv_dask"], r["floor"]
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in zv["stages"].items())
    return "\n".join([
        f"S3 write throughput, {r['n_points']:,} points, {r['cells']:,} cells "
        f"({r['cell_bytes'] / 2**20:.1f} MiB), loopback SeaweedFS",
        "",
        "| writer | objects | seconds | MiB/s | M points/s | time / floor |",
        "|---|---:|---:|---:|---:|---:|",
        f"| zv-dask ingest ({r['workers']} workers) | {r['objects_written_by_zv_dask']:,} | {zv['seconds']:.2f} | "
        f"{zv['MiB_per_s']:.1f} | {zv['points_per_s'] / 1e6:.2f} | {r['ratio']:.2f} |",
        f"| zv-dask write stage only | {r['cells']:,} cells | {zv['stages'].get('write', float('nan')):.2f} | "
        f"{zv['write_stage_MiB_per_s']:.1f} | | {r['write_stage_ratio']:.2f} |",
        f"| floor: obstore.put_async x{r['concurrency']} | {r['objects_written_by_floor']:,} | {fl['seconds']:.2f} | "
        f"{fl['MiB_per_s']:.1f} | {r['n_points'] / fl['seconds'] / 1e6:.2f} | 1.00 |",
        "",
        f"zv-dask stages: {stages}",
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=float, default=1e7, help="number of points (default 1e7)")
    ap.add_argument("--smoke", action="store_true", help="1e5 points, to check that it works")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16, help="PUTs in flight for the floor")
    ap.add_argument("--partition-rows", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "s3_throughput.json"))
    args = ap.parse_args(argv)
    n = 100_000 if args.smoke else int(args.n)

    r = run(n, args.workers, args.concurrency, args.partition_rows)
    r["smoke"] = args.smoke
    r["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    print(table(r))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(r, fh, indent=1, default=float)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
