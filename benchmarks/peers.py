"""zv-dask's CLI against peer LiDAR LOD converters on the same LAS files, in one run.

    python -m benchmarks.peers                                  # 1e7 points, files on /dev/shm/zv-peers
    python -m benchmarks.peers --points 1e5 --dir /dev/shm/zv-peers-smoke --no-real
    python -m benchmarks.peers --repeat 3 --potree ~/PotreeConverter/build/PotreeConverter

Two inputs: a synthetic airborne strip of ``--points`` points (LAS 1.2, point
format 3, ``benchmarks.compression.write_las``; kept in ``--dir`` and reused by
the next run with the same count) and laspy's real test file
``tests/data/autzen_trim.laz`` (110,000 points, decompressed once to LAS in
``--dir``; ``--no-real`` leaves it out). Every tool gets the same LAS file and
runs as a whole process, the way a user runs it, its output removed before
each run:

* zv-dask: ``zv-dask ingest IN OUT --chunk-shape 125 --bin-shape 12.5 -q``, the
  pyramid (centroids, every attribute kept) built in the same job; its default
  scheduler (threads in the process, one per core, whatever the size),
  and again with ``--workers 2`` (a LocalCluster of worker processes);
* PotreeConverter 2 (``--potree``, ``$POTREE_CONVERTER`` or PATH; rows left out
  without one): ``-m random`` and its default, poisson-disk sampling;
* py3dtiles 12.1 (importable here, or ``--py3dtiles``/``$PY3DTILES``/PATH):
  ``py3dtiles convert IN --out OUT --jobs 2``, a 3D Tiles 1.0 tileset of
  ``.pnts`` files, positions and RGB only (its default). It pins numpy<2.4, so
  it may live in a separate venv: point ``--py3dtiles`` at that venv's
  ``py3dtiles`` script.

Each tool first runs once, untimed, on a 10,000-point file (``--no-warmup``
skips it): py3dtiles compiles its numba kernels on its first run after an
install (about 25 s here) and caches them. Then, for each input, ``--repeat``
rounds run the tools in turn (A, B, C, A, B, C...), to spread the machine's
noise over all of them. Per run: wall seconds of the process, CPU seconds of
its process tree (``RUSAGE_CHILDREN`` before and after: the child and every
descendant that was waited for), the peak RSS of each process of the tree
(its high-water mark, read every 50 ms; the table gives their sum and the
largest), the output's
bytes and files, and the exit code. The table has medians of the successful
runs (min and max are in the JSON); ratio is zv-dask's wall time over the
tool's: above 1, zv-dask is slower. Writes ``results/peers.json``,
``results/peers.md`` and ``results/peers.png``. The tools do not build the
same thing (formats, LOD schemes and kept attributes differ: the "what it
builds" column says), so read the times as "what a user waits for", not as a
like-for-like kernel comparison. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.common import HERE, disk_of, find_potree, machine, potree_version, tree_size

ROOT = os.path.dirname(HERE)
REAL = os.path.join(ROOT, "tests", "data", "autzen_trim.laz")
CHUNK, BIN = "125", "12.5"
WARM_POINTS = 10_000
TOOLS = ("zv-dask", "zv-dask-workers", "potree-random", "potree-poisson", "py3dtiles")


@dataclass
class Tool:
    """One row of the table: how to run it on a LAS file into an output directory."""

    key: str
    label: str
    builds: str
    argv: Callable[[str, str], list[str]]
    family: str
    version: str


@dataclass
class Input:
    name: str
    path: str
    points: int
    source: str


def las_points(path: str) -> int | None:
    """The point count in a LAS/LAZ header, ``None`` when there is no readable (or whole, for LAS) file."""
    import laspy

    try:
        with laspy.open(path) as fh:
            h = fh.header
            n = int(h.point_count)
            if not path.endswith(".laz") and os.path.getsize(path) < h.offset_to_point_data + n * h.point_format.size:
                return None
            return n
    except (OSError, ValueError, laspy.errors.LaspyException):
        return None


def _write_atomic(path: str, write: Callable[[str], None]) -> None:
    tmp = path[: -len(".las")] + ".partial.las"
    write(tmp)
    os.replace(tmp, path)


def synthetic_input(work: str, n: int) -> Input:
    from benchmarks.compression import write_las

    path = os.path.join(work, f"airborne-{n}.las")
    if las_points(path) == n:
        print(f"reusing {path} ({n:,} points)")
    else:
        t0 = time.perf_counter()
        _write_atomic(path, lambda p: write_las(p, n, 0))
        print(f"wrote {path} ({n:,} points, {os.path.getsize(path):,} bytes) in {time.perf_counter() - t0:.1f} s")
    return Input("synthetic airborne strip", path, n, "benchmarks.compression.write_las(path, n, seed=0)")


def real_input(work: str) -> Input | None:
    """laspy's autzen_trim.laz, decompressed to LAS once (every tool reads the same LAS file)."""
    if not os.path.isfile(REAL):
        print(f"(no {REAL}: real-file rows left out)")
        return None
    n = las_points(REAL)
    path = os.path.join(work, "autzen_trim.las")
    if las_points(path) == n:
        print(f"reusing {path} ({n:,} points)")
    else:
        import laspy

        _write_atomic(path, laspy.read(REAL).write)
        print(f"wrote {path} ({n:,} points, {os.path.getsize(path):,} bytes) from {os.path.relpath(REAL, ROOT)}")
    return Input("autzen_trim (real, laspy's test file)", path, n,
                 "tests/data/autzen_trim.laz decompressed by laspy")


def _git(*args: str, cwd: str) -> str | None:
    try:
        p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else None


def zv_dask_version() -> str:
    import zv_dask

    commit = _git("describe", "--always", "--dirty", cwd=ROOT)
    return f"{zv_dask.__version__} ({commit})" if commit else zv_dask.__version__


def find_py3dtiles(path: str | None) -> tuple[str | None, str]:
    """py3dtiles' ``py3dtiles`` script and its version, or ``None`` and why there is none."""
    for cand in (path, os.environ.get("PY3DTILES")):
        if cand:
            if not (os.path.isfile(cand) and os.access(cand, os.X_OK)):
                raise SystemExit(f"py3dtiles {cand!r} is not an executable file")
            return os.path.abspath(cand), _script_version(cand, "py3dtiles")
    if importlib.util.find_spec("py3dtiles") is not None:
        exe = os.path.join(os.path.dirname(sys.executable), "py3dtiles")
        if os.path.isfile(exe):
            return exe, importlib.metadata.version("py3dtiles")
        return None, f"py3dtiles is importable but has no script beside {sys.executable}"
    exe = shutil.which("py3dtiles")
    if exe:
        return exe, _script_version(exe, "py3dtiles")
    return None, ("py3dtiles is not importable here and there is no --py3dtiles, $PY3DTILES or py3dtiles on "
                  "PATH (pip install 'zv-dask[bench]', or py3dtiles[las] into a venv of its own)")


def _script_version(exe: str, dist: str) -> str:
    """The version of ``dist`` in the interpreter of a console script (its shebang)."""
    try:
        with open(exe, "rb") as fh:
            first = fh.readline().decode(errors="replace").strip()
    except OSError:
        return "unknown"
    if not first.startswith("#!"):
        return "unknown"
    interp = shlex.split(first[2:])
    try:
        p = subprocess.run([*interp, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return p.stdout.strip() if p.returncode == 0 and p.stdout.strip() else "unknown"


def make_tools(a: argparse.Namespace) -> tuple[list[Tool], list[str]]:
    """The selected tools that can run here, and a line for each one left out."""
    wanted = [t.strip() for t in a.tools.split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(TOOLS))
    if unknown:
        raise SystemExit(f"unknown --tools {', '.join(unknown)} (known: {', '.join(TOOLS)})")
    tools, skipped = [], []
    zv = os.path.join(os.path.dirname(sys.executable), "zv-dask")
    zv_cmd = [zv] if os.path.isfile(zv) else [sys.executable, "-m", "zv_dask.cli"]
    zv_version = zv_dask_version() if {"zv-dask", "zv-dask-workers"} & set(wanted) else ""
    zv_builds = "ZV store: level 0 + centroid pyramid, every LAS attribute"
    potree = find_potree(a.potree) if {"potree-random", "potree-poisson"} & set(wanted) else None
    py3d, py3d_version = find_py3dtiles(a.py3dtiles) if "py3dtiles" in wanted else (None, "")
    for key in wanted:
        if key == "zv-dask":
            tools.append(Tool(key, "zv-dask", f"{zv_builds} (default scheduler)",
                              lambda i, o: [*zv_cmd, "ingest", i, o, "--chunk-shape", CHUNK, "--bin-shape", BIN, "-q"],
                              "zv-dask", zv_version))
        elif key == "zv-dask-workers":
            tools.append(Tool(key, f"zv-dask --workers {a.jobs}", f"{zv_builds} (LocalCluster)",
                              lambda i, o: [*zv_cmd, "ingest", i, o, "--chunk-shape", CHUNK, "--bin-shape", BIN, "-q",
                                            "--workers", str(a.jobs)], "zv-dask", zv_version))
        elif key.startswith("potree-"):
            if potree is None:
                skipped.append(f"{key}: no PotreeConverter 2 (pass --potree PATH or set POTREE_CONVERTER)")
                continue
            method = key.split("-", 1)[1]
            extra = ["-m", "random"] if method == "random" else []  # poisson is its default
            tools.append(Tool(key, f"PotreeConverter 2 ({method})",
                              f"Potree 2 octree, {'random' if method == 'random' else 'poisson-disk'} subsampling, "
                              "every LAS attribute, uncompressed",
                              lambda i, o, x=extra: [potree, i, "-o", o, *x], "PotreeConverter 2",
                              a.potree_version or potree_version(potree) or "unknown"))
        elif key == "py3dtiles":
            if py3d is None:
                skipped.append(f"py3dtiles: {py3d_version}")
                continue
            tools.append(Tool(key, "py3dtiles convert", "3D Tiles 1.0 tileset (.pnts), grid subsampling, XYZ + RGB",
                              lambda i, o: [py3d, "convert", i, "--out", o, "--jobs", str(a.jobs)], "py3dtiles",
                              py3d_version))
    return tools, skipped


def notes(tools: list[Tool]) -> list[str]:
    """What a reader of the table should know about the tools that ran."""
    fams = {t.family for t in tools}
    out = []
    if "zv-dask" in fams:
        out.append("zv-dask's default scheduler is threads in its process (one per core) whatever the input's "
                   "size; the --workers row starts a LocalCluster of worker processes, which costs a few seconds "
                   "of start-up and shutdown and pickles the shuffle's pieces between the workers.")
    if "PotreeConverter 2" in fams:
        out.append("PotreeConverter's progress monitor sleeps a whole second between prints and is joined at the "
                   "end, so its wall time is its work rounded up to about the next second (its floor is 1 s).")
    if "py3dtiles" in fams:
        out.append("py3dtiles keeps positions and RGB only (its default; --extra-fields adds others), no "
                   "classification or intensity, and does not reproject without --srs_out (none given here). "
                   "When this benchmark was written, py3dtiles 12.1.1 (laspy 2.7, lazrs 0.8) given LAZ hung on "
                   "autzen_trim.laz and on a 1e5-point file (a 1e4-point one worked), a worker blocked in the LAZ "
                   "reader and the main process polling at 100% CPU: every tool reads the same uncompressed LAS.")
    return out


def _hwm(pid: int) -> int:
    """A process's peak RSS so far (``VmHWM``, bytes; 0 when gone). It starts anew at each exec."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeSampler:
    """Every 50 ms: the peak RSS and the CPU times of each process started under this one.

    Like ``benchmarks.common.RSSMonitor`` (this process's descendants), but it leaves this process
    out, keeps sampling a process whose parent exited (an orphan is no longer a descendant), and
    reads each process's own high-water mark (``VmHWM``), so a peak between two samples is not
    missed (only one in a process's last 50 ms can be). It also records the peak of the tree's
    total at one sample, and what each process is.
    """

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self._mine = self._me.cmdline()
        self.procs: dict[int, object] = {}
        self.peak: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.cmd: dict[int, str] = {}
        self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        psutil = self._psutil
        try:
            for q in self._me.children(recursive=True):
                self.procs.setdefault(q.pid, q)
        except psutil.Error:
            pass
        total = 0
        for pid, q in list(self.procs.items()):
            try:
                with q.oneshot():
                    cmd = q.cmdline()
                    if cmd == self._mine:  # forked, not yet exec'd: this process's memory, not the tool's
                        continue
                    rss = q.memory_info().rss
                    t = q.cpu_times()
                    self.cmd.setdefault(pid, shlex.join(cmd[:3])[:120])
            except psutil.Error:
                continue
            total += rss
            self.peak[pid] = max(rss, _hwm(pid), self.peak.get(pid, 0))
            self.cpu[pid] = t.user + t.system
        self.total_peak = max(self.total_peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(0.05)

    def running(self) -> list[int]:
        """The sampled processes still running (not zombies)."""
        out = []
        for pid, q in list(self.procs.items()):
            try:
                if q.is_running() and q.status() != self._psutil.STATUS_ZOMBIE:
                    out.append(pid)
            except self._psutil.Error:
                pass
        return out

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(argv: list[str], out: str, log: str, timeout: float, grace: float = 10.0) -> dict:
    """One whole-process run of ``argv``: wall and CPU seconds, RSS of its tree, exit code, output size.

    Processes of the tree still running when the tool's own process has exited (a Dask worker or
    multiprocessing's resource tracker shutting down) get ``grace`` seconds, outside the wall time,
    then are killed with their process group, which is the tool's.
    """
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed_out = threading.Event()
    with open(log, "wb") as fh, TreeSampler() as mon:
        t0 = time.perf_counter()
        # a session of its own: a timeout (or ^C) ends the whole tree by its process group, the child's pid
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)

        hard = threading.Timer(grace, _killpg, (proc.pid, signal.SIGKILL))

        def kill() -> None:  # SIGTERM first: multiprocessing's resource tracker ignores it and cleans up
            timed_out.set()
            _killpg(proc.pid, signal.SIGTERM)
            hard.start()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, own = os.wait4(proc.pid, 0)
        except BaseException:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        left = mon.running()
        waited = time.perf_counter()
        while mon.running() and time.perf_counter() - waited < grace:
            time.sleep(0.05)
        still = mon.running()
        if still:
            _killpg(proc.pid, signal.SIGKILL)
        hard.cancel()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    size, files = tree_size(out) if os.path.isdir(out) else (0, 0)
    run = {"exit": proc.returncode, "ok": proc.returncode == 0 and not timed_out.is_set(),
           "timed_out": timed_out.is_set(), "wall_s": round(wall, 3),
           "cpu_s": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 3),
           "user_s": round(after.ru_utime - before.ru_utime, 3), "sys_s": round(after.ru_stime - before.ru_stime, 3),
           "cpu_sampled_s": round(sum(mon.cpu.values()), 3),
           "rss_sum_bytes": sum(mon.peak.values()), "rss_max_bytes": max(mon.peak.values(), default=0),
           # not used: Linux keeps a process's max RSS across exec, so this starts at this harness's RSS
           "maxrss_wait4_bytes": own.ru_maxrss * 1024,
           "rss_total_peak_bytes": mon.total_peak, "processes_seen": len(mon.peak),
           "processes": [{"pid": pid, "cmd": mon.cmd.get(pid, ""), "peak_rss_bytes": mon.peak[pid],
                          "cpu_s": round(mon.cpu.get(pid, 0.0), 3)} for pid in mon.peak],
           "left_running_at_exit": [mon.cmd.get(pid, str(pid)) for pid in left],
           "killed_after_grace": [mon.cmd.get(pid, str(pid)) for pid in still],
           "bytes": size, "files": files}
    if not run["ok"]:
        with open(log, "rb") as fh:
            run["log_tail"] = fh.read()[-2000:].decode(errors="replace")
    return run


def lod_detail(key: str, out: str, log: str) -> str | None:
    """What the run's LOD holds, from its output: zv-dask's levels, Potree's octree nodes, py3dtiles' tiles."""
    try:
        if key.startswith("zv-dask"):
            with open(log, errors="replace") as fh:  # its report, printed even with -q
                levels = sum(1 for line in fh if re.match(r"\s+level \d+ ", line))
            return f"levels 0-{levels - 1}" if levels else None
        if key.startswith("potree-"):  # hierarchy.bin: 22 bytes per node
            return f"{os.path.getsize(os.path.join(out, 'hierarchy.bin')) // 22:,} nodes"
        if key == "py3dtiles":
            tiles = sum(f.endswith(".pnts") for _, _, fs in os.walk(out) for f in fs)
            return f"{tiles:,} tiles"
    except OSError:
        return None
    return None


def _killpg(pgid: int, sig: int) -> bool:
    """Signal the process group ``pgid`` (one this harness started); whether it still had a process."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--points", type=float, default=1e7, help="points of the synthetic file (default 1e7)")
    p.add_argument("--dir", default="/dev/shm/zv-peers",
                   help="where the LAS files (kept, reused) and the outputs go (default /dev/shm/zv-peers)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each tool per input; the table has the median")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, in this order (default: all: "
                                                            f"{','.join(TOOLS)})")
    p.add_argument("--potree", help="PotreeConverter 2 executable (default: $POTREE_CONVERTER or PATH)")
    p.add_argument("--potree-version", help="PotreeConverter's git commit, for the record (it prints none)")
    p.add_argument("--py3dtiles", help="py3dtiles' console script (default: $PY3DTILES, this interpreter's, PATH)")
    p.add_argument("--jobs", type=int, default=2, help="zv-dask --workers and py3dtiles --jobs (default 2)")
    p.add_argument("--no-real", action="store_true", help="leave out tests/data/autzen_trim.laz")
    p.add_argument("--no-warmup", action="store_true", help="no untimed first run of each tool")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (default 3600)")
    p.add_argument("--keep", action="store_true", help="keep each tool's last output")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="where peers.{json,md,png} go")
    a = p.parse_args(argv)
    from benchmarks.peers_report import write_results

    work = os.path.abspath(a.dir)
    os.makedirs(work, exist_ok=True)
    tools, skipped = make_tools(a)
    for line in skipped:
        print(f"({line}: its rows left out)")
    if not tools:
        raise SystemExit("no tool to run")
    m = machine()
    disk = disk_of(work)
    print(f"files in {work} ({disk}); {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, {m['date']}")
    versions = {t.family: t.version for t in tools}
    for fam, ver in versions.items():
        print(f"  {fam}: {ver}")
    inputs = [synthetic_input(work, int(a.points))]
    if not a.no_real:
        real = real_input(work)
        if real:
            inputs.append(real)

    if not a.no_warmup:
        from benchmarks.compression import write_las

        warm = os.path.join(work, f"warm-{WARM_POINTS}.las")
        if las_points(warm) != WARM_POINTS:
            _write_atomic(warm, lambda p: write_las(p, WARM_POINTS, 1))
        for t in tools:
            out = os.path.join(work, f"warm-{t.key}")
            r = measure(t.argv(warm, out), out, out + ".log", a.timeout)
            shutil.rmtree(out, ignore_errors=True)
            print(f"warm-up {t.label}: {r['wall_s']:.2f} s{'' if r['ok'] else f', FAILED (exit {r['exit']})'}")

    runs, commands = [], {}
    for inp in inputs:
        commands[inp.name] = {}
        print(f"\n{inp.name}: {inp.path}, {inp.points:,} points, {os.path.getsize(inp.path):,} bytes")
        for rep in range(max(a.repeat, 1)):
            for t in tools:
                out = os.path.join(work, f"out-{t.key}")
                cmd = t.argv(inp.path, out)
                commands[inp.name][t.key] = shlex.join(cmd)
                r = measure(cmd, out, os.path.join(work, f"{t.key}.log"), a.timeout)
                r.update(input=inp.name, tool=t.key, repeat=rep, command=cmd,
                         lod=lod_detail(t.key, out, os.path.join(work, f"{t.key}.log")))
                runs.append(r)
                state = "ok" if r["ok"] else ("TIMED OUT" if r["timed_out"] else f"FAILED (exit {r['exit']})")
                print(f"  [{rep + 1}/{a.repeat}] {t.label}: {r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, "
                      f"{r['rss_sum_bytes'] / 2**20:,.0f} MiB RSS over {r['processes_seen']} processes, "
                      f"{r['bytes']:,} bytes in {r['files']:,} files, {state}", flush=True)
                if not a.keep:
                    shutil.rmtree(out, ignore_errors=True)
    meta = {"argv": ["python", "-m", "benchmarks.peers", *(sys.argv[1:] if argv is None else argv)],
            "machine": m, "dir": work, "disk": disk, "repeat": max(a.repeat, 1), "warmup": not a.no_warmup,
            "jobs": a.jobs, "skipped": skipped, "versions": versions, "notes": notes(tools),
            "tools": {t.key: {"label": t.label, "builds": t.builds, "version": t.version} for t in tools},
            "inputs": [{"name": i.name, "path": i.path, "points": i.points, "bytes": os.path.getsize(i.path),
                        "source": i.source} for i in inputs],
            "commands": commands}
    print()
    print(write_results(meta, runs, a.out))
    print(f"\nwrote {os.path.join(a.out, 'peers.json')}, peers.md and peers.png; the LAS files stay in {work} "
          "for the next run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
