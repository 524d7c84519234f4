"""What resumable jobs cost and what they save: 1e8 points from Parquet on disk into a local store on disk.

    python -m benchmarks.resume                  # 1e8 points, 2 runs per variant
    python -m benchmarks.resume --n 2e7 --runs 1

Every run is a child process (``local_cluster(2)``, one thread per worker) that
ingests the Parquet set of ``benchmarks/data.py`` (uniform float32 xyz + two
float32 attributes) with chunk 125, bin 12.5 and 3 coarse levels; the parent
times the whole process and reads the job's own stage times from its report.

* *durable* (the default: the journal, a record per write group and pyramid
  task) against *not durable* (``durable=False``), alternating: the cost of
  durable progress;
* a run SIGKILLed (with its workers) once half of its write groups have
  finished, then ``resume=True``, against a full rerun: what resuming saves.

Writes ``results/resume.json`` and ``results/resume.md``. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from benchmarks.common import HERE, disk_of, machine

CHILD = r"""
import json, os, sys, time
if __name__ == "__main__":
    import zv_dask
    from distributed import Client
    from zv_dask.scheduling import local_cluster
    files, store, durable, resume = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    with local_cluster(2) as c, Client(c) as cl:
        t = time.perf_counter()
        rep = zv_dask.ingest(files, store, chunk_shape=125.0, base_bin_shape=12.5, bounds=([0] * 3, [1000] * 3),
                             client=cl, durable=durable, resume=resume, pyramid={"levels": 3, "links": "none"})
        job = time.perf_counter() - t
    print(json.dumps({"job_s": job, "groups": rep.groups, "groups_resumed": rep.groups_resumed,
                      "seconds": rep.seconds, "points": rep.points_written}))
"""


def _child(files, store, *, durable=True, resume=False, kill_at=None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if kill_at:
        env["ZV_DASK_KILL_AT"] = kill_at
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(files), store, "1" if durable else "0",
                             "1" if resume else "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True, cwd=HERE)
    out, err = proc.communicate()
    wall = time.perf_counter() - t
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # a killed run's workers go with it
    except ProcessLookupError:
        pass
    if kill_at:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, err[-2000:])
        return {"wall_s": wall}
    assert proc.returncode == 0, err[-3000:]
    return {"wall_s": wall, **json.loads(out.strip().splitlines()[-1])}


def main(argv=None) -> None:
    from benchmarks.data import parquet_files

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=float, default=1e8)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--data", default=os.path.join(HERE, "data", "scale"))
    p.add_argument("--work", default=os.path.join(HERE, "work"))
    args = p.parse_args(argv)
    n = int(args.n)
    files = parquet_files("uniform", n, args.data)
    os.makedirs(args.work, exist_ok=True)
    store = os.path.join(args.work, "resume.zv")
    rows: dict[str, list] = {"durable": [], "not durable": []}
    for i in range(args.runs):  # alternating, so that drift on this machine hits both
        for variant in (("durable", True), ("not durable", False))[:: 1 if i % 2 == 0 else -1]:
            shutil.rmtree(store, ignore_errors=True)
            r = _child(files, store, durable=variant[1])
            rows[variant[0]].append(r)
            print(f"{variant[0]:>12}: whole process {r['wall_s']:.1f} s, job {r['job_s']:.1f} s", flush=True)
    groups = rows["durable"][0]["groups"]
    shutil.rmtree(store, ignore_errors=True)
    killed = _child(files, store, kill_at=f"write:{groups // 2}")
    print(f"      killed: after {groups // 2} of {groups} groups, {killed['wall_s']:.1f} s", flush=True)
    resumed = _child(files, store, resume=True)
    print(f"     resumed: whole process {resumed['wall_s']:.1f} s, job {resumed['job_s']:.1f} s, "
          f"{resumed['groups_resumed']} groups not written again", flush=True)
    shutil.rmtree(store, ignore_errors=True)
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in rows.items()}
    job = {k: statistics.median(r["job_s"] for r in v) for k, v in rows.items()}
    result = {"machine": machine(), "n": n, "groups": groups, "runs": rows, "killed": killed, "resumed": resumed,
              "median_wall_s": med, "median_job_s": job, "data_disk": disk_of(args.data),
              "work_disk": disk_of(args.work)}
    out = os.path.join(HERE, "results")
    with open(os.path.join(out, "resume.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    m = result["machine"]
    cost = job["durable"] / job["not durable"] - 1
    lines = [f"# Resumable jobs: cost and saving ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; zv-dask {m['zv_dask']}. {n:.0e} points "
             f"from Parquet ({result['data_disk']}) into a local store ({result['work_disk']}), chunk 125, bin 12.5, "
             f"3 coarse levels, `local_cluster(2)`; {groups} write groups. Whole-process wall times; job = the "
             "`ingest` call alone.", "",
             "| run | whole process s (median) | job s (median) | runs |", "|---|---|---|---|",
             f"| durable (journal, default) | {med['durable']:.1f} | {job['durable']:.1f} | {len(rows['durable'])} |",
             f"| not durable (`durable=False`) | {med['not durable']:.1f} | {job['not durable']:.1f} | "
             f"{len(rows['not durable'])} |",
             f"| killed (SIGKILL) after {groups // 2} of {groups} groups | {killed['wall_s']:.1f} | | 1 |",
             f"| resume of the killed run ({resumed['groups_resumed']} groups kept) | {resumed['wall_s']:.1f} | "
             f"{resumed['job_s']:.1f} | 1 |", "",
             f"Durable progress costs {cost * 100:+.1f}% of the job time (median of {args.runs} against {args.runs}); "
             f"resuming the killed job took {resumed['wall_s'] / med['durable'] * 100:.0f}% of a full rerun "
             f"({resumed['wall_s']:.1f} s against {med['durable']:.1f} s, whole process).", "",
             "Resume stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in resumed["seconds"].items())]
    with open(os.path.join(out, "resume.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
