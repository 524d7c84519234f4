"""The benchmark harness runs end to end at its smallest size (no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke(tmp_path):
    p = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "smoke.json").read_text())
    systems = {r["system"] for r in result["rows"] if "error" not in r}
    assert {"floor", "zv-dask (links)", "reference (links)"} <= systems
    zv = next(r for r in result["rows"] if r["system"] == "zv-dask (links)")
    assert zv["points"] == 30_000 and zv["peak_worker_rss"] > 0
    assert sorted(zv["level_counts"]) == ["0", "1", "2", "3"] and all(v > 0 for v in zv["level_counts"].values())
    assert zv["link_records"] > 2 * 30_000, "+1 and -1 links for every point of level 0, and more"
    md = (tmp_path / "out" / "smoke.md").read_text()
    assert "| 3e+04 | uniform | realistic | zv-dask (links) |" in md and "Same data, same bins, same arrays" in md
    assert (tmp_path / "out" / "smoke.png").stat().st_size > 1000


def test_stages_smoke(tmp_path):
    """benchmarks.stages on a small LAS file: every profiled second lands in one stage, the tables are written."""
    from benchmarks.compression import write_las

    las = tmp_path / "small.las"
    write_las(str(las), 20_000, seed=3)
    p = subprocess.run([sys.executable, "-m", "benchmarks.stages", str(las), "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    row = json.loads((tmp_path / "out" / "stages.json").read_text())["rows"][0]
    assert row["points"] == 20_000
    cpu = row["cpu_stages_s"]
    assert abs(sum(cpu.values()) - row["profiled_s"]) < 1e-6 * max(1.0, row["profiled_s"])
    assert cpu["read/decode"] > 0 and cpu["encode"] > 0 and cpu["write"] > 0 and cpu["pyramid"] > 0
    assert {"scan", "write", "pyramid"} <= set(row["threads_stages_s"])
    assert "| small.las |" in (tmp_path / "out" / "stages.md").read_text()
