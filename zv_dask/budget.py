"""The memory budget of a job: how much data a worker's tasks may hold at once.

A job's data in a worker is its running tasks plus, when the shuffle keeps them
in memory, the split pieces waiting for their write task. The budget bounds
both, whatever the number of points: it caps the points per input partition,
per write group and per pyramid task, and when the pieces would not fit in it
beside the tasks, they go to scratch storage instead
(:mod:`zv_dask.ingest.staging`). The worker process itself (interpreter and
libraries, about 300 MB) comes on top.

The per-point costs below were measured on the peak RSS of single tasks
(``benchmarks/scale.py`` prints them against the estimate), with room to spare:
they are what a task allocates per point at its peak, input and temporaries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from zv_dask.errors import InputError

__all__ = ["MemoryBudget", "parse_size", "fmt_bytes", "resolve_budget", "DEFAULT_FRACTION",
           "split_bytes_per_point", "write_bytes_per_point", "pyramid_bytes_per_point", "rows_within",
           "ShufflePlan", "plan_shuffle", "smallest_budget"]

#: Share of a worker's memory limit a job may use by default: under distributed's thresholds for
#: spilling (0.6), pausing (0.8) and restarting (0.95) a worker, with room for the worker itself.
DEFAULT_FRACTION = 0.5

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def fmt_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: sizes for people."""
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(x) < 1024 or unit == "TiB":
            return f"{x:.1f} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1024
    return f"{x} B"  # pragma: no cover


def parse_size(value, name: str = "memory_budget") -> int:
    """Bytes from an integer or a string like ``"2GiB"``, ``"500MB"``, ``"1.5 GB"``."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be a size in bytes or a string like '2GiB', got {value!r}")
    if isinstance(value, (int, float)):
        n = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(num):]
        try:
            n = float(num) * _UNITS[unit]
        except (ValueError, KeyError):
            raise InputError(f"{name} must be a size like '2GiB', '500MB' or a number of bytes, "
                             f"got {value!r}") from None
    else:
        raise InputError(f"{name} must be a size in bytes or a string like '2GiB', got {type(value).__name__}")
    if not n > 0 or n != n or n == float("inf"):
        raise InputError(f"{name} must be a positive size, got {value!r}")
    return int(n)


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes of data a job may hold per worker process, and how many tasks share them.

    ``origin`` says where the figure came from (asked for, the workers' memory
    limit, or this machine's memory).
    """

    per_worker: int
    workers: int
    threads_per_worker: int
    origin: str

    @property
    def per_task(self) -> int:
        """Bytes one running task may hold: the worker's budget over its threads."""
        return max(1, self.per_worker // max(self.threads_per_worker, 1))

    @property
    def total(self) -> int:
        return self.per_worker * self.workers

    def describe(self) -> str:
        return f"{fmt_bytes(self.per_worker)} per worker ({self.origin})"


def _machine_memory() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil is a dependency; a sandbox may still refuse it
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _workers(client) -> list[dict]:
    try:
        return list(client.scheduler_info(n_workers=-1)["workers"].values())
    except TypeError:  # older distributed: no n_workers argument
        return list(client.scheduler_info()["workers"].values())
    except Exception:  # noqa: BLE001 - an unusual client: planned as one worker
        return []


def resolve_budget(memory_budget, client) -> MemoryBudget:
    """The budget of a job on ``client`` (``None``: Dask's local scheduler in this process).

    ``memory_budget`` (bytes or a size string) is per worker; by default it is
    :data:`DEFAULT_FRACTION` of the smallest worker memory limit, or of this
    machine's memory shared by the workers when they have no limit.
    """
    asked = None if memory_budget is None else parse_size(memory_budget)
    if client is None:
        threads = os.cpu_count() or 1
        if asked is not None:
            return MemoryBudget(asked, 1, threads, "as asked")
        return MemoryBudget(int(_machine_memory() * DEFAULT_FRACTION), 1, threads,
                            f"{DEFAULT_FRACTION:.0%} of this machine's memory")
    workers = _workers(client)
    n = max(len(workers), 1)
    threads = max((int(w.get("nthreads", 1)) for w in workers), default=1)
    if asked is not None:
        return MemoryBudget(asked, n, threads, "as asked")
    limits = [int(w.get("memory_limit") or 0) for w in workers]
    if limits and all(limits):
        return MemoryBudget(int(min(limits) * DEFAULT_FRACTION), n, threads,
                            f"{DEFAULT_FRACTION:.0%} of the workers' memory limit")
    hosts = {w.get("host") for w in workers} or {None}
    per_host = -(-n // len(hosts))
    return MemoryBudget(int(_machine_memory() * DEFAULT_FRACTION / per_host), n, threads,
                        f"{DEFAULT_FRACTION:.0%} of the machine's memory (workers have no memory limit)")


# -- what a task holds per point ----------------------------------------------------------------
def split_bytes_per_point(in_row: int, piece_row: int) -> int:
    """Peak bytes per input row of a split task: the partition as read, as cast, its keys and its pieces."""
    return 2 * in_row + 2 * piece_row + 40


def write_bytes_per_point(piece_row: int, stored_row: int) -> int:
    """Peak bytes per point of a write task: its pieces merged, the sort keys, the points in storage order
    and their encoded cells, and the first coarse levels when the task builds them."""
    return 2 * piece_row + 2 * stored_row + 56


def pyramid_bytes_per_point(stored_row: int) -> int:
    """Peak bytes per fine point of a pyramid task: its cells as read, decoded, their bin keys and sums."""
    return 3 * stored_row + 64


def rows_within(budget_bytes: int, bytes_per_point: int, cap: int, floor: int = 1024) -> int:
    """The most rows whose peak fits ``budget_bytes`` (at most ``cap``, at least ``floor``)."""
    return int(max(floor, min(cap, budget_bytes // max(bytes_per_point, 1))))


#: The in-memory shuffle's pieces do not spread perfectly evenly over the workers.
IMBALANCE = 1.25


@dataclass(frozen=True)
class ShufflePlan:
    """How a job's level-0 shuffle holds its pieces, and the memory that takes per worker.

    ``mode`` is ``"memory"`` (pieces wait in worker memory for their write task)
    or ``"staged"`` (they wait on scratch storage). ``peak_per_worker`` is the
    estimate for the mode chosen; ``in_memory_per_worker`` what the in-memory
    shuffle would need, the figure the choice was made on.
    """

    mode: str
    peak_per_worker: int
    in_memory_per_worker: int
    staged_bytes: int
    reason: str


def plan_shuffle(budget: MemoryBudget, *, n_points: int, largest_partition: int, largest_group: int,
                 in_row: int, piece_row: int, stored_row: int, resident_row: int = 0) -> ShufflePlan:
    """Keep the pieces in memory when they fit in the budget beside the running tasks; else stage them.

    ``resident_row`` are bytes per point that sit in the workers whatever the
    shuffle does (in-memory input shipped to them).
    """
    workers, threads = max(budget.workers, 1), max(budget.threads_per_worker, 1)
    tasks = threads * max(largest_partition * split_bytes_per_point(in_row, piece_row),
                          largest_group * write_bytes_per_point(piece_row, stored_row))
    resident = int(n_points * resident_row / workers)
    pieces = int(n_points * piece_row * IMBALANCE / workers) + largest_partition * piece_row
    in_memory = resident + tasks + pieces
    staged = resident + tasks
    if in_memory <= budget.per_worker:
        return ShufflePlan("memory", in_memory, in_memory, 0,
                           f"the pieces (~{fmt_bytes(pieces)} per worker) fit in the budget")
    return ShufflePlan("staged", staged, in_memory, int(n_points * piece_row),
                       f"in memory the shuffle would need ~{fmt_bytes(in_memory)} per worker, over the budget of "
                       f"{fmt_bytes(budget.per_worker)}")


def smallest_budget(budget: MemoryBudget, unit_points: int, piece_row: int, stored_row: int) -> int:
    """The smallest per-worker budget whose tasks can hold a write unit of ``unit_points`` points."""
    return max(budget.threads_per_worker, 1) * unit_points * write_bytes_per_point(piece_row,
                                                                                                    stored_row)
