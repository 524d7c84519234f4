"""What ``compression=`` costs and saves: one airborne-like LAS file ingested uncompressed, with zstd and blosc.

    python -m benchmarks.compression                      # 1e6 points, stores in a temporary directory
    python -m benchmarks.compression --points 2e5 --dir /some/disk/path

The LAS file (point format 3, written by laspy; also written as LAZ for the
size comparison) is a synthetic airborne strip: a smooth terrain with noise,
points in scan-line order, 1 cm scales, intensity, returns, classification,
scan angle, point source id, GPS time and RGB. Every ingest builds 2 coarse
levels (``pyramid={"levels": 2}``) with Dask's local threaded scheduler, in
this process, timed whole (the fastest of ``--repeat`` runs). The table gives the store's bytes and files, the
ingest wall time, the store's size against the LAS and LAZ files, and the
largest ``vertex_fragments`` cell of the coarse levels. With PotreeConverter 2
(``--potree``, ``$POTREE_CONVERTER`` or PATH) its octree of the same file,
uncompressed and BROTLI, is a row each (a whole process, its own LOD depth).
Nothing here is asserted; the tests do not run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from benchmarks.common import disk_of, find_potree, machine, tree_size

RUNS = [("none", None), ("zstd", 1), ("zstd", 3), ("blosc", 5)]


def write_las(path: str, n: int, seed: int = 0) -> None:
    """An airborne-like strip of ``n`` points (LAS 1.2, point format 3)."""
    import laspy

    rng = np.random.default_rng(seed)
    side = 1000.0
    lines = max(int(np.sqrt(n / 4)), 1)  # scan lines across the strip
    per = -(-n // lines)
    t = np.arange(n)
    line, pos = t // per, (t % per) / per
    x = 500_000.0 + pos * side + rng.normal(0, 0.05, n)
    y = 4_100_000.0 + line * (side / lines) + rng.normal(0, 0.05, n)
    ground = 120 + 15 * np.sin((x - 500_000) / 170.0) + 8 * np.cos((y - 4_100_000) / 230.0)
    veg = rng.random(n) < 0.3
    z = ground + np.where(veg, rng.gamma(2.0, 4.0, n), 0) + rng.normal(0, 0.03, n)
    hdr = laspy.LasHeader(point_format=3, version="1.2")
    hdr.scales = np.array([0.01, 0.01, 0.01])
    hdr.offsets = np.array([500_000.0, 4_100_000.0, 0.0])
    las = laspy.LasData(hdr)
    las.x, las.y, las.z = x, y, z
    las.intensity = np.clip(rng.normal(np.where(veg, 400, 900), 120), 0, 65535).astype(np.uint16)
    nret = np.where(veg, rng.integers(1, 4, n), 1).astype(np.uint8)
    las.number_of_returns = nret
    las.return_number = np.minimum(rng.integers(1, 4, n), nret).astype(np.uint8)
    las.classification = np.where(veg, 5, 2).astype(np.uint8)
    las.scan_angle_rank = np.clip((pos - 0.5) * 40, -20, 20).astype(np.int8)
    las.point_source_id = np.full(n, 7, np.uint16)
    las.gps_time = 300_000.0 + t * 1e-5
    las.red = (np.where(veg, 60, 140) * 256 + rng.integers(0, 4000, n)).astype(np.uint16)
    las.green = (np.where(veg, 120, 130) * 256 + rng.integers(0, 4000, n)).astype(np.uint16)
    las.blue = (np.where(veg, 50, 110) * 256 + rng.integers(0, 4000, n)).astype(np.uint16)
    las.write(path)


def coarse_fragment_cells(store: str) -> int:
    """The largest ``vertex_fragments`` cell of the coarse levels (bytes; 0 without coarse levels)."""
    big = 0
    for level in os.listdir(store):
        frag = os.path.join(store, level, "vertex_fragments")
        if level.isdigit() and int(level) > 0 and os.path.isdir(frag):
            for d, _, fs in os.walk(os.path.join(frag, "c")):
                big = max([big] + [os.path.getsize(os.path.join(d, f)) for f in fs])
    return big


def run_potree(exe: str, las: str, out: str, encoding: str) -> float:
    """PotreeConverter 2 on ``las`` (its default poisson sampling), whole-process wall seconds."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([exe, las, "-o", out, "--encoding", encoding], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=float, default=1e6)
    p.add_argument("--dir", help="where the LAS files and stores go (default: a new temporary directory)")
    p.add_argument("--chunk", type=float, default=100.0, help="chunk edge in metres (default 100)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--repeat", type=int, default=2, help="ingests per row; the table has the fastest (default 2)")
    p.add_argument("--potree", help="PotreeConverter 2 executable (default: $POTREE_CONVERTER or PATH; "
                                    "rows left out without one)")
    p.add_argument("--json", help="also write the rows here")
    a = p.parse_args(argv)
    import dask

    import zv_dask

    n = int(a.points)
    work = a.dir or tempfile.mkdtemp(prefix="zv-compression-")
    os.makedirs(work, exist_ok=True)
    las, laz = os.path.join(work, "strip.las"), os.path.join(work, "strip.laz")
    write_las(las, n)
    import laspy

    laspy.read(las).write(laz)
    las_size, laz_size = os.path.getsize(las), os.path.getsize(laz)
    m = machine()
    print(f"{n:,} points; files and stores in {work} ({disk_of(work)}); {m['cpu']}, {m['cores']} cores, "
          f"zarr {m['zarr']}, {m['date']}")
    print(f"LAS {las_size:,} bytes, LAZ {laz_size:,} bytes; chunk {a.chunk:g} m, 2 coarse levels, threaded scheduler")
    print()
    print("| output | level | bytes | files | wall s | / LAS | / LAZ | / none | coarse fragments cell |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []

    def row(name, level, size, files, dt, frag):
        base = rows[0]["bytes"] if rows else size
        rows.append({"output": name, "level": level, "bytes": size, "files": files, "seconds": round(dt, 3),
                     "coarse_fragments_cell": frag})
        print(f"| {name} | {'-' if level is None else level} | {size:,} | {files:,} | {dt:.2f} | "
              f"{size / las_size:.2f} | {size / laz_size:.2f} | {size / base:.2f} | "
              f"{'-' if frag is None else f'{frag:,}'} |", flush=True)

    with dask.config.set(scheduler="threads"):
        for name, level in RUNS:
            store = os.path.join(work, f"{name}{level or ''}.zv")
            times = []
            for _ in range(max(a.repeat, 1)):
                shutil.rmtree(store, ignore_errors=True)
                t0 = time.perf_counter()
                zv_dask.ingest(las, store, chunk_shape=(a.chunk, a.chunk, a.chunk), pyramid={"levels": 2},
                               compression=name, compression_level=level)
                times.append(time.perf_counter() - t0)
            row(f"zv-dask {name}", level, *tree_size(store), min(times), coarse_fragment_cells(store))
            if not a.keep:
                shutil.rmtree(store, ignore_errors=True)
    exe = find_potree(a.potree)
    if exe:  # its own octree format, all of its LOD levels; a whole process each
        for encoding in ("UNCOMPRESSED", "BROTLI"):
            out = os.path.join(work, f"potree-{encoding.lower()}")
            dt = min(run_potree(exe, las, out, encoding) for _ in range(max(a.repeat, 1)))
            row(f"PotreeConverter 2 {encoding.lower()}", None, *tree_size(out), dt, None)
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
    else:
        print("\n(no PotreeConverter 2: pass --potree PATH or set POTREE_CONVERTER for its rows)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"machine": m, "points": n, "dir": disk_of(work), "las_bytes": las_size, "laz_bytes": laz_size,
                       "chunk": a.chunk, "rows": rows}, fh, indent=1)
    if not a.keep and not a.dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
