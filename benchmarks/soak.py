"""Soak: many jobs on one store with random faults at random stages; every one must end well.

    python -m benchmarks.soak                      # 50 jobs on a local store on tmpfs, seed 1
    python -m benchmarks.soak --jobs 20 --backend icechunk --seed 3
    python -m benchmarks.soak --backend s3         # on a loopback S3 server (SeaweedFS, tests/s3server.py)

A sequence of CLI jobs on one target: ingest (a new store, later ``--overwrite``),
``--append`` of a new batch, and ``pyramid`` rebuilds with another level count.
Each job gets a fault drawn at random: none; the process SIGKILLing itself at a
stage point drawn from those the job passes (``ZV_DASK_KILL_AT``: the scan,
the n-th write group, level 0's metadata, the n-th pyramid task, a rebuild's
swap, the commit); a task raising (``ZV_DASK_FAIL_AT``: a write group, a
pyramid level); or a SIGKILL from outside after a random delay. Every job has
a timeout (a hang is an outcome, and a violation).

After each job the target must be in one of three states, checked here:

* ``ok``: the job succeeded; the store validates and holds the points it should;
* ``unchanged``: the job failed and the target is byte for byte as before it
  (a plain store's files; an icechunk branch's keys and history);
* ``resumed``: the job failed and left its journal; the same command with
  ``--resume`` (no fault) succeeds, and the store then validates and holds the
  points it should.

Anything else (a mix, a wrong count, an invalid store, a failed resume, a hang)
is a violation; the table of outcomes is printed and written to
``results/soak.md`` / ``results/soak.json``. Exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from benchmarks.common import HERE, disk_of, machine

BIN = Path(sys.executable).parent / "zv-dask"
ROOT = Path(HERE).parent
BOUNDS = "0,0,0,1000,1000,1000"
GEOMETRY = ["--chunk-shape", "250", "--bin-shape", "25", "--bounds", BOUNDS]
GROUPS = ["--group-points", "4000"]
TASKS = ["--levels-per-task", "1", "--points-per-task", "3000", "--links", "explicit",
         "--scheduler", "synchronous", "-q"]
TIMEOUT = 300.0


# -- inputs -------------------------------------------------------------------------------------
def make_inputs(d: Path, n: int, batches: int, rng) -> tuple[Path, list[tuple[Path, int]]]:
    import pandas as pd

    def frame(m):
        return pd.DataFrame({"x": rng.uniform(0, 1000, m), "y": rng.uniform(0, 1000, m),
                             "z": rng.uniform(0, 1000, m), "intensity": rng.integers(0, 65535, m).astype("u2")})

    base = d / "base.parquet"
    frame(n).to_parquet(base, row_group_size=max(1, n // 3))
    more = []
    for i in range(batches):
        m = int(rng.integers(n // 20, n // 5))
        p = d / f"batch{i}.parquet"
        frame(m).to_parquet(p)
        more.append((p, m))
    return base, more


# -- the target ---------------------------------------------------------------------------------
class Target:
    """Where the jobs write, how to pass it to the CLI, and how to snapshot what a reader sees."""

    def __init__(self, backend: str, work: Path):
        self.backend = backend
        self.server = None
        if backend == "s3":
            sys.path.insert(0, str(ROOT / "tests"))
            from s3server import SeaweedS3

            self.server = SeaweedS3.start(work / "seaweedfs")
            self.where = self.server.url("soak", "x.zv")
            self.args = [a for k, v in self.server.storage_options().items()
                         for a in ("--storage-option", f"{k}={v}")]
            self.options = {"storage_options": self.server.storage_options()}
        else:
            self.where = str(work / ("repo" if backend == "icechunk" else "x.zv"))
            self.args = ["--icechunk"] if backend == "icechunk" else []
            self.options = {"backend": "icechunk"} if backend == "icechunk" else {}

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()

    def snapshot(self) -> object:
        """Everything a reader of the target sees (and, on a plain store, every file), for 'unchanged'."""
        if self.backend == "local":
            out = {}
            for d, _, files in os.walk(self.where):
                for f in files:
                    p = os.path.join(d, f)
                    with open(p, "rb") as fh:
                        out[os.path.relpath(p, self.where)] = fh.read()
            return out
        if self.backend == "s3":
            import obstore

            obs = self.server.obstore(prefix="soak/x.zv")
            return {m["path"]: bytes(obstore.get(obs, m["path"]).bytes()) for b in obstore.list(obs) for m in b}
        import icechunk
        from zarr.core.buffer import default_buffer_prototype

        storage = icechunk.local_filesystem_storage(self.where)
        if not icechunk.Repository.exists(storage):
            return None
        repo = icechunk.Repository.open(storage)
        st = repo.readonly_session(branch="main").store

        async def read():
            return {k: (await st.get(k, default_buffer_prototype())).to_bytes() async for k in st.list()}

        return asyncio.run(read()), [a.id for a in repo.ancestry(branch="main")]

    def unfinished(self) -> bool:
        """A journal is there: the failed job kept its progress for --resume."""
        if self.backend == "local":
            return os.path.isdir(os.path.join(self.where, ".zv-job"))
        if self.backend == "s3":
            import obstore

            return bool(obstore.list(self.server.obstore(prefix="soak/x.zv/.zv-job")).collect())
        return os.path.isdir(self.where + ".zv-job")

    def state(self) -> tuple[bool, int, int]:
        """(validates, level-0 points, levels) of the store as it is."""
        import zv_dask

        rep = zv_dask.validate_store(self.where, **self.options)
        n = len(zv_dask.read_points(self.where, **self.options).compute())
        info = zv_dask.open_store(self.where, **self.options)
        return rep.ok, n, len(info.levels)


# -- jobs and faults ----------------------------------------------------------------------------
def points_of(kind: str, levels: int, groups: int) -> tuple[list[str], list[str]]:
    """(kill points, fail points) a job of ``kind`` passes."""
    write = [f"write:{i}" for i in range(1, groups + 1)]
    tasks = [f"pyramid:{i}" for i in range(1, 4)]
    levels_ = [f"level:{k}" for k in range(1, levels + 1)]
    groups_ = [f"group:{g}" for g in range(groups)]
    if kind == "ingest":
        return ["scan", *write, "level0", *tasks, "commit"], [*groups_, *levels_]
    if kind == "append":
        return [f"append:{i}" for i in range(1, 3)] + ["commit"], groups_[:2] + levels_
    return [*tasks, "swap", "commit"], levels_


def run(cmd: list, env: dict, outside_kill: float | None) -> tuple[int | None, str, float]:
    t = time.perf_counter()
    proc = subprocess.Popen([str(BIN), *map(str, cmd)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        if outside_kill is not None:
            try:
                proc.wait(timeout=outside_kill)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, err.strip().splitlines()[-1] if err.strip() else "", time.perf_counter() - t
    except subprocess.TimeoutExpired:
        return None, "timed out", time.perf_counter() - t
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def soak(args) -> int:
    rng = np.random.default_rng(args.seed)
    pick = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="zv-soak-", dir=args.dir))
    base, batches = make_inputs(work, args.points, args.jobs, rng)
    target = Target(args.backend, work)
    env0 = {**os.environ, "PYTHONWARNINGS": "ignore", "ZV_DASK_CHECKPOINT_SECONDS": "0"}
    expected = None  # level-0 points the store should hold (None: no store yet)
    levels = 3
    rows, table = [], Counter()
    violations = []
    t_all = time.perf_counter()
    try:
        for j in range(args.jobs):
            if expected is None:
                kind = "ingest"
            else:
                kind = pick.choices(["ingest", "append", "pyramid"], weights=[1, 3, 2])[0]
            new_levels = pick.randint(2, 4) if kind != "append" else levels
            if kind == "ingest":
                cmd = ["ingest", base, target.where, *GEOMETRY, *GROUPS, *TASKS, "--levels", new_levels, *target.args]
                if expected is not None:
                    cmd.append("--overwrite")
                after = args.points
            elif kind == "append":
                batch, m = batches[j]
                cmd = ["ingest", batch, target.where, "--append", *GROUPS, *TASKS, *target.args]
                after = expected + m
            else:
                cmd = ["pyramid", target.where, *TASKS, "--levels", new_levels, *target.args]
                after = expected
            groups = max(1, (after if kind == "ingest" else args.points // 10) // 4000)
            kills, fails = points_of(kind, new_levels, groups)
            fault = pick.choices(["none", "kill", "fail", "outside"], weights=[3, 4, 2, 1])[0]
            env, at, outside = dict(env0), "", None
            if fault == "kill":
                at = pick.choice(kills)
                env["ZV_DASK_KILL_AT"] = at
            elif fault == "fail":
                at = pick.choice(fails)
                env["ZV_DASK_FAIL_AT"] = at
            elif fault == "outside":
                outside = pick.uniform(0.3, 2.0)
                at = f"after {outside:.1f} s"
            before = target.snapshot()
            code, err, seconds = run(cmd, env, outside)
            outcome, note = None, ""
            if code is None:
                outcome, note = "HANG", err
            elif code == 0:
                outcome = "ok"
            elif target.unfinished():
                rcode, rerr, rs = run([*cmd, "--resume"], env0, None)
                seconds += rs
                outcome = "resumed" if rcode == 0 else "RESUME FAILED"
                note = "" if rcode == 0 else rerr
            elif target.snapshot() == before:
                outcome = "unchanged"
                after = expected
            else:
                outcome, note = "CHANGED", err
            if outcome in ("ok", "resumed"):
                ok, n, nlev = target.state()
                if not ok or n != after:
                    note = f"validates={ok}, {n} points, expected {after}"
                    outcome = "WRONG"
                else:
                    expected = after
                    if kind != "append":
                        levels = new_levels
            elif outcome == "unchanged" and expected is not None:
                ok, n, _ = target.state()
                if not ok or n != expected:
                    outcome, note = "WRONG", f"validates={ok}, {n} points, expected {expected}"
            table[(kind, fault, outcome)] += 1
            rows.append({"job": j, "kind": kind, "fault": fault, "at": at, "exit": code, "outcome": outcome,
                         "seconds": round(seconds, 2), "note": note or (err if code else "")})
            if outcome.isupper():
                violations.append(rows[-1])
            if not args.quiet:
                print(f"{j:3d} {kind:8s} {fault:8s} {at:14s} exit {code!s:5s} -> {outcome:10s} "
                      f"{seconds:6.1f} s {(note or err)[:110]}", flush=True)
    finally:
        target.close()
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t_all
    outcomes = sorted({r["outcome"] for r in rows})
    lines = [f"# Soak: {args.jobs} jobs on a {args.backend} store ({disk_of(args.dir or tempfile.gettempdir())}), "
             f"seed {args.seed}, {total:.0f} s", "",
             f"{args.points:,} base points, appends of {args.points // 20:,}-{args.points // 5:,}; "
             "CLI jobs in this process's children, scheduler in process.", "",
             "| job | fault | " + " | ".join(outcomes) + " |", "|---|---|" + "---|" * len(outcomes)]
    for kind in ("ingest", "append", "pyramid"):
        for fault in ("none", "kill", "fail", "outside"):
            counts = [table[(kind, fault, o)] for o in outcomes]
            if sum(counts):
                lines.append(f"| {kind} | {fault} | " + " | ".join(str(c) for c in counts) + " |")
    lines += ["", f"violations: {len(violations)}"]
    lines += [f"- job {v['job']} ({v['kind']}, {v['fault']} {v['at']}): {v['outcome']} {v['note']}"
              for v in violations]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        out = Path(HERE) / "results"
        (out / f"soak_{args.backend}.md").write_text(text)
        (out / f"soak_{args.backend}.json").write_text(json.dumps({"machine": machine(), "args": vars(args),
                                                                   "seconds": total, "jobs": rows}, indent=1,
                                                                  default=str))
    return 1 if violations else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=50)
    p.add_argument("--points", type=int, default=30_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backend", choices=["local", "s3", "icechunk"], default="local")
    p.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the store and inputs live (default /dev/shm)")
    p.add_argument("--no-write", dest="write", action="store_false", help="do not write results/soak_*")
    p.add_argument("-q", "--quiet", action="store_true")
    return soak(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
