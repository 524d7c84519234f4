"""What every benchmark shares: the machine's description, an RSS sampler, where a path lives."""

from __future__ import annotations

import os
import platform
import shutil
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


class RSSMonitor:
    """Samples the RSS of this process and of every descendant (Dask workers) every 50 ms."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = self._psutil.Process()
        while not self._stop.is_set():
            try:
                procs = [me] + me.children(recursive=True)
            except self._psutil.Error:
                procs = [me]
            for p in procs:
                try:
                    rss = p.memory_info().rss
                except self._psutil.Error:
                    continue
                if rss > self.peak.get(p.pid, 0):
                    self.peak[p.pid] = rss
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def machine() -> dict:
    import dask
    import psutil
    import zarr

    import zv_dask

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "zv_dask": zv_dask.__version__, "dask": dask.__version__,
            "zarr": zarr.__version__, "date": time.strftime("%Y-%m-%d")}


def disk_of(path: str) -> str:
    """The file system a path is on, for the record: ``"tmpfs"``, ``"disk (ext4)"``..."""
    path = os.path.abspath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                _, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, fstype
    except OSError:
        return kind
    return "tmpfs" if kind in ("tmpfs", "ramfs") else f"disk ({kind})"



POTREE_BUILD = os.path.join(HERE, ".peers", "potree", "build", "PotreeConverter")  # benchmarks/build_potree.sh


def find_potree(path: str | None = None) -> str | None:
    """PotreeConverter 2's executable: ``path``, else ``$POTREE_CONVERTER``, else ``PotreeConverter`` on PATH,
    else the one ``benchmarks/build_potree.sh`` built.

    It is not part of the project: ``benchmarks/build_potree.sh`` builds it from its public
    repository (potree/PotreeConverter). ``None`` when there is none (the benchmarks then leave
    its rows out).
    """
    for cand in (path, os.environ.get("POTREE_CONVERTER"), shutil.which("PotreeConverter"), POTREE_BUILD):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.abspath(cand)
    if path:
        raise SystemExit(f"--potree {path!r} is not an executable file")
    return None


def potree_version(exe: str) -> str | None:
    """The commit ``build_potree.sh`` recorded beside a build (PotreeConverter prints no version)."""
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(exe)), "VERSION")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def tree_size(path: str) -> tuple[int, int]:
    """Bytes and files under ``path``."""
    size = files = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            size += os.path.getsize(os.path.join(d, f))
            files += 1
    return size, files
