"""Before/after: the same in-memory job on this checkout and on another commit, run in turn.

    python -m benchmarks.ab --against d094b7d            # 1e7 uniform numpy, ingest + 3 levels + links
    python -m benchmarks.ab --against d094b7d --kind clustered --pairs 7

The other commit is checked out with ``git worktree`` into a temporary directory
and imported from there (``PYTHONPATH``) by a child process; this checkout runs
the same child from here. Each pair runs A (this checkout) then B (the other),
each on a ``local_cluster(2)`` of its own, stores on tmpfs; the job time (the
``ingest`` call alone) is printed per run with the ratio per pair and the
median. Writes ``results/ab_<kind>_<n>.md``. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchmarks.common import HERE, machine

CHILD = r"""
import os, sys, time, shutil
if __name__ == "__main__":
    sys.path.append(sys.argv[3])                      # benchmarks/ of this checkout, after the tested zv_dask
    import zv_dask
    from distributed import Client
    from zv_dask.scheduling import local_cluster
    from benchmarks.data import make_points
    pts, attrs = make_points(sys.argv[1], int(float(sys.argv[2])))
    out = os.path.join(sys.argv[4], f"ab-{os.getpid()}.zv")
    with local_cluster(2, memory_limit="2.8GiB") as c, Client(c) as cl:
        t = time.perf_counter()
        zv_dask.ingest(pts, out, attributes=attrs, chunk_shape=125.0, base_bin_shape=12.5,
                       bounds=([0] * 3, [1000] * 3), client=cl,
                       pyramid={"levels": 3, "bin_ratio": 2, "links": "explicit"})
        dt = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    print(zv_dask.__file__, dt)
"""


def _run(pythonpath: str | None, args, script: str, work: str) -> float:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    p = subprocess.run([sys.executable, script, args.kind, str(args.n), os.path.dirname(HERE), work],
                       capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=600)
    if p.returncode:
        raise RuntimeError(p.stderr.strip().splitlines()[-1])
    return float(p.stdout.split()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the other commit (B)")
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--kind", default="uniform", choices=["uniform", "clustered"])
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--work", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    root = os.path.dirname(HERE)
    tmp = tempfile.mkdtemp(prefix="zv-ab-")
    other = os.path.join(tmp, "other")
    script = os.path.join(tmp, "child.py")
    with open(script, "w") as fh:
        fh.write(CHILD)
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", other, args.against], check=True,
                   capture_output=True)
    rows = []
    try:
        _run(None, args, script, args.work)  # warm-up: file caches, compiled bytecode
        for i in range(args.pairs):
            a = _run(None, args, script, args.work)
            b = _run(other, args, script, args.work)
            rows.append((a, b))
            print(f"pair {i + 1}: this checkout {a:.2f} s, {args.against} {b:.2f} s, ratio {a / b:.3f}", flush=True)
    finally:
        subprocess.run(["git", "-C", root, "worktree", "remove", "--force", other], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    med_a = statistics.median(a for a, _ in rows)
    med_b = statistics.median(b for _, b in rows)
    ratios = [a / b for a, b in rows]
    m = machine()
    head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    lines = [f"# Before/after, in-memory numpy input, N={args.n:.0e} {args.kind} ({m['date']})", "",
             f"{m['cpu']}, {m['cores']} cores; stores under `{args.work}`; `local_cluster(2)` per run; ingest + 3 "
             "levels + explicit links; the `ingest` call's time.", "",
             f"| pair | this checkout ({head.strip()}) s | {args.against} s | ratio |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {a:.2f} | {b:.2f} | {a / b:.3f} |" for i, (a, b) in enumerate(rows)]
    lines += [f"| median | {med_a:.2f} | {med_b:.2f} | {statistics.median(ratios):.3f} |"]
    md = "\n".join(lines) + "\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"ab_{args.kind}_{args.n:.0e}.md"), "w") as fh:
        fh.write(md)
    print(md)


if __name__ == "__main__":
    main()
