"""Run failing zv-dask commands many times and count their exit codes (by hand; not a test).

An input error must end in exit 2 every time. This catches the rare abort at
interpreter exit (exit 134, "terminate called without an active exception")
that a C++ thread still alive at exit causes (icechunk's / obstore's tokio
runtime, pyarrow's thread pools), which one run in a test would almost never
show.

    .venv/bin/python scripts/exit_codes.py [--runs 60] [--case NAME ...]

Each case makes its own bad input in a temporary directory; the table prints
the exit codes seen and how many runs printed "terminate called".
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ZV = [sys.executable, "-m", "zv_dask"]  # what the zv-dask script runs; PYTHONPATH picks the tree


def _inputs(d: Path) -> dict[str, Path]:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    p = rng.uniform(0, 100, (20_000, 3))
    df = pd.DataFrame({"x": p[:, 0], "y": p[:, 1], "z": p[:, 2]})
    nan = df.copy()
    nan.loc[15_000, "x"] = np.nan
    nan.to_parquet(d / "nan.parquet")
    lines = df.to_csv(index=False).splitlines()
    lines[15_001] = "abc,1,2"
    (d / "late.csv").write_text("\n".join(lines) + "\n")
    # a directory of Parquet files read at once, one of them corrupt in a data page
    many = d / "many"
    many.mkdir()
    for k in range(6):
        df.to_parquet(many / f"part{k}.parquet", row_group_size=2_000, compression=None)
    raw = bytearray((many / "part3.parquet").read_bytes())
    import pyarrow.parquet as pq

    col = pq.ParquetFile(many / "part3.parquet").metadata.row_group(4).column(1)
    for i in range(col.data_page_offset + 40, col.data_page_offset + 400):
        raw[i] ^= 0xFF
    (many / "part3.parquet").write_bytes(bytes(raw))
    df.to_parquet(d / "good.parquet")
    return {"nan": d / "nan.parquet", "late": d / "late.csv", "corrupt": many / "*.parquet",
            "nan_free": d / "good.parquet"}


CASES = {
    # (arguments after 'ingest', with {nan}, {late}, {out} filled in)
    "cluster-nan": ["{nan}", "{out}", "--chunk-shape", "10", "--workers", "2", "-q"],
    "cluster-late-csv": ["{late}", "{out}", "--chunk-shape", "10", "--workers", "2", "-q"],
    "icechunk-nan": ["{nan}", "{out}", "--chunk-shape", "10", "--icechunk", "-q"],
    "icechunk-cluster-nan": ["{nan}", "{out}", "--chunk-shape", "10", "--icechunk", "--workers", "2", "-q"],
    "threads-nan": ["{nan}", "{out}", "--chunk-shape", "10", "-q"],
    "threads-late-csv": ["{late}", "{out}", "--chunk-shape", "10", "-q"],
    "threads-corrupt-parquet": ["{corrupt}", "{out}", "--chunk-shape", "10", "--partition-rows", "2000", "-q"],
    "cluster-corrupt-parquet": ["{corrupt}", "{out}", "--chunk-shape", "10", "--workers", "2", "-q"],
    "icechunk-corrupt-parquet": ["{corrupt}", "{out}", "--chunk-shape", "10", "--icechunk", "-q"],
    # a failure in the write stage (the job's lease thread and pools at work): exit 1, but the same way out
    "threads-fail-write": ["{nan_free}", "{out}", "--chunk-shape", "10", "--group-points", "2000", "-q",
                           "ENV:ZV_DASK_FAIL_AT=group:1"],
    "icechunk-fail-write": ["{nan_free}", "{out}", "--chunk-shape", "10", "--group-points", "2000", "--icechunk",
                            "-q", "ENV:ZV_DASK_FAIL_AT=group:1"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        files = _inputs(d)
        for name in args.case or list(CASES):
            codes, aborts, t0 = collections.Counter(), 0, time.perf_counter()
            sample = ""
            for i in range(args.runs):
                out = d / f"out-{name}-{i}.zv"
                argv = [a.format(**files, out=out) for a in CASES[name] if not a.startswith("ENV:")]
                env = dict(a[4:].split("=", 1) for a in CASES[name] if a.startswith("ENV:"))
                r = subprocess.run([*ZV, "ingest", *argv], capture_output=True, text=True, timeout=300,
                                   env={**os.environ, "PYTHONFAULTHANDLER": "0", **env})
                codes[r.returncode] += 1
                if "terminate called" in r.stderr:
                    aborts += 1
                if r.returncode not in (1, 2) and not sample:
                    sample = r.stderr.strip().splitlines()[-3:]
                if out.exists():
                    codes["left a store"] += 1
            print(f"{name:<22} {args.runs} runs in {time.perf_counter() - t0:5.0f}s: exit codes "
                  f"{dict(sorted(codes.items(), key=str))}, 'terminate called' in {aborts}"
                  + (f"; e.g. {sample}" if sample else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
