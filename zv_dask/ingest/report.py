"""What an ingest job did, for people (``repr``) and for programs (``to_dict``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from zv_dask.budget import fmt_bytes as _fmt_bytes
from zv_dask.format.crs import crs_label

__all__ = ["IngestReport"]


@dataclass
class IngestReport:
    """Summary of an ingest job (and of its pyramid when one was built)."""

    store: str
    mode: str = "write"  # "write" (a new or empty store) or "append" (points added to a store)
    points_read: int = 0
    points_written: int = 0
    points_dropped: int = 0
    bounds: list = field(default_factory=list)
    dtype: str = "float32"
    dtype_reason: str = ""
    chunk_shape: list = field(default_factory=list)
    base_bin_shape: list | None = None
    chunks_written: int = 0
    partitions: int = 0
    groups: int = 0
    levels: list = field(default_factory=list)  # [{"level", "vertex_count", "chunks"}]
    levels_in_write_tasks: list = field(default_factory=list)  # coarse levels the level-0 write tasks built
    links: str = "none"  # cross-level links written: "none", "implicit" or "explicit"
    link_counts: dict = field(default_factory=dict)  # "<level>/<+1|-1>" -> records
    bytes_written: int = 0
    memory_budget: int = 0  # bytes per worker the job planned within
    shuffle: str = "memory"  # where the pieces waited: "memory" or "staged" (on scratch)
    scratch: str | None = None  # the scratch location of a staged shuffle (removed when the job ended)
    bytes_staged: int = 0  # bytes of pieces written to (and read back from) scratch
    resumed: bool = False  # this run continued an interrupted job
    groups_resumed: int = 0  # write groups the interrupted job had finished (not written again)
    pyramid_tasks_resumed: int = 0  # pyramid tasks the interrupted job had finished (not run again)
    crs: dict | None = None  # the root ``crs`` written (from the LAS headers or as given)
    scheduler: str = ""  # where the tasks ran (a cluster's address and workers, or this process)
    seconds: dict = field(default_factory=dict)
    snapshot_id: str | None = None
    warnings: list = field(default_factory=list)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    @property
    def points_per_second(self) -> float:
        t = self.total_seconds
        return self.points_written / t if t > 0 else float("nan")

    def to_dict(self) -> dict:
        """Every field as a JSON-ready dict, plus ``total_seconds`` and ``points_per_second``."""
        d = asdict(self)
        d["total_seconds"] = self.total_seconds
        d["points_per_second"] = self.points_per_second
        return d

    def __repr__(self) -> str:
        lines = [f"IngestReport: {self.store}" + (" (append)" if self.mode == "append" else ""),
                 f"  points      {self.points_written:,} written, {self.points_dropped:,} dropped "
                 f"(of {self.points_read:,} read)",
                 (f"  positions   {self.dtype} ({self.dtype_reason})" if self.dtype_reason
                  else f"  positions   {self.dtype}"),
                 f"  bounds      {self.bounds}",
                 f"  chunks      {self.chunks_written:,} written, chunk_shape {self.chunk_shape}",
                 f"  tasks       {self.partitions} input partitions -> {self.groups} write groups"
                 + (f" ({self.groups_resumed} finished before, resumed)" if self.resumed else ""),
                 f"  bytes       {_fmt_bytes(self.bytes_written)}",
                 f"  shuffle     {self.shuffle}" + (
                     f", {_fmt_bytes(self.bytes_staged)} staged on {self.scratch}" if self.shuffle == "staged" else "")
                 + (f" (memory budget {_fmt_bytes(self.memory_budget)} per worker)" if self.memory_budget else "")]
        if self.crs:
            lines.append(f"  crs         {crs_label(self.crs)}")
        if self.scheduler:
            lines.append(f"  scheduler   {self.scheduler}")
        for lv in self.levels:
            lines.append(f"  level {lv['level']:<5} {lv['vertex_count']:,} vertices in {lv.get('chunks', '?')} chunks"
                         + (" (built by the write tasks)" if lv["level"] in self.levels_in_write_tasks else "")
                         + (f" ({lv['rewritten']:,} rewritten" + (f" in {lv['regions']:,} regions" if lv.get("regions")
                                                                 else "") + ")" if "rewritten" in lv else ""))
        if self.links != "none":
            n = sum(self.link_counts.values())
            lines.append(f"  links       {self.links}: {n:,} cross-level link records in "
                         f"{len(self.link_counts)} families")
        if self.seconds:
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())
            lines.append(f"  time        {self.total_seconds:.2f}s ({stages}); "
                         f"{self.points_per_second / 1e6:.2f} M points/s")
        if self.snapshot_id:
            lines.append(f"  snapshot    {self.snapshot_id}")
        for w in self.warnings:
            lines.append(f"  warning     {w}")
        return "\n".join(lines)

    _repr_pretty_ = None  # IPython uses __repr__
