"""Tables and the plot from a benchmark run's rows."""

from __future__ import annotations

import os

REFERENCE_OF = {"zv-dask (links)": "reference (links)", "zv-dask (rounds)": "reference (links)",
                "zv-dask (no links)": "reference (no links)"}


def _fmt_s(v):
    return f"{v:.2f}" if isinstance(v, (int, float)) else "—"


def _gib(v):
    return f"{v / 2**30:.2f}" if v else "—"


def _find(rows, n, kind, bins, system, workers=None):
    for r in rows:
        if (r["n"], r["kind"], r["bins"], r["system"]) == (n, kind, bins, system) and \
                (workers is None or r["workers"] == workers) and "error" not in r:
            return r
    return None


def _who(r) -> str:
    """The workers column: ``2`` (worker processes) or ``2 threads`` (in the benchmark's process)."""
    return f"{r['workers']} threads" if r.get("scheduler") == "threads" else str(r["workers"])


def _total(r):
    return r["total_s"]


def headline(rows) -> list[str]:
    """The like-for-like lines: zv-dask on its most workers against the reference, same arrays."""
    out = ["| N | data | bins | arrays | zv-dask s (workers) | reference s | reference / zv-dask |",
           "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["n"], r["kind"], r["bins"])
        if key in seen or r["system"] != "zv-dask (links)":
            continue
        seen.add(key)
        for zsys, label in (("zv-dask (links)", "with cross-level links (+1 and -1)"),
                            ("zv-dask (no links)", "without links")):
            zs = [x for x in rows if (x["n"], x["kind"], x["bins"], x["system"]) == key + (zsys,) and "error" not in x]
            if not zs:
                continue
            z = max(zs, key=lambda x: x["workers"])
            ref = _find(rows, *key, REFERENCE_OF[zsys])
            ratio = f"**{ref['total_s'] / z['total_s']:.1f}x**" if ref else "—"
            out.append(f"| {r['n']:.0e} | {r['kind']} | {r['bins']} | {label} | {z['total_s']:.2f} ({_who(z)}) | "
                       f"{_fmt_s(ref['total_s']) if ref else '—'} | {ratio} |")
    return out


def write_report(result: dict, out: str, name: str) -> str:
    rows = result["rows"]
    m = result["machine"]
    lines = [f"# zv-dask benchmarks ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; Python {m['python']}, "
             f"zv-dask {m['zv_dask']}, dask {m['dask']}, zarr {m['zarr']}. Stores written under "
             f"`{result.get('work_dir', '?')}`.",
             "",
             "3-D float32 points in [0, 1000)^3 plus two float32 attributes (in memory up to 1e7, Parquet files "
             "at 1e8); chunk 125 (512 chunks); a pyramid of 3 levels (bin ratio 2). zv-dask runs on "
             + ("Dask's threads in the benchmark's process (`--threads`, as the CLI runs a job that asks for no "
                "cluster; workers = threads), " if any(r.get("scheduler") == "threads" for r in rows) else
                "`zv_dask.scheduling.local_cluster` (worker processes, 1 thread each), ") +
             f"{result.get('repeat', 1)} runs per row, the median shown (all runs in the JSON). The reference is "
             "zarr-vectors 0.9.2 `write_points` + `build_pyramid` in one process, run once. *links* rows write the "
             "reference's default arrays: cross-level links +1 and their -1 mirror at every level pair. Both "
             "pyramids are centroids; zv-dask's also keeps the attributes (averaged), the reference drops them.",
             "",
             "## Same data, same bins, same arrays", ""] + headline(rows) + [
             "", "## Every run", "",
             "| N | data | bins | system | workers | ingest s | pyramid s | total s (median; runs) | M pts/s | "
             "peak worker RSS GiB | vs reference | level 0 vs floor per core |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n, kind, bins, sys_ = r["n"], r["kind"], r["bins"], r["system"]
        if "error" in r:
            lines.append(f"| {n:.0e} | {kind} | {bins} | {sys_} | {r['workers']} | — | — | — | — | — | — | "
                         f"{r['error']} |")
            continue
        runs = ""
        if sys_ == "floor":
            ingest, pyr, total, rss = r["total_s"], None, r["total_s"], None
        elif sys_.startswith("zv-dask"):
            ingest, pyr, total, rss = r["ingest_s"], r["pyramid_s"] or None, r["total_s"], r["peak_worker_rss"]
            if len(r.get("runs", [])) > 1:
                runs = f" ({min(r['runs']):.2f}–{max(r['runs']):.2f})"
        else:
            ingest, pyr, total, rss = r["write_s"], r["pyramid_s"], r["total_s"], r.get("peak_rss")
        vs_ref = vs_floor = ""
        if sys_ in REFERENCE_OF:
            ref = _find(rows, n, kind, bins, REFERENCE_OF[sys_])
            if ref:
                vs_ref = f"{ref['total_s'] / total:.1f}x faster"
        if sys_ == "zv-dask (level 0)":
            ref = _find(rows, n, kind, bins, "reference (links)")
            if ref:
                vs_ref = f"{ref['write_s'] / total:.1f}x faster (write_points)"
            fl = _find(rows, n, kind, bins, "floor")
            if fl:
                vs_floor = f"{total * r['workers'] / fl['total_s']:.2f}x"
        lines.append(f"| {n:.0e} | {kind} | {bins} | {sys_} | {_who(r)} | {_fmt_s(ingest)} | {_fmt_s(pyr)} | "
                     f"{_fmt_s(total)}{runs} | {n / total / 1e6:.2f} | {_gib(rss)} | {vs_ref} | {vs_floor} |")
    lines += ["", "*ingest s* for zv-dask is the whole `ingest` call (with `pyramid=`, the pyramid is built in the "
              "same job, its first levels inside the level-0 write tasks); *pyramid s* is a separate "
              "`build_pyramid` job (rows *rounds*). *level 0 vs floor per core* = zv-dask level-0 seconds x workers / "
              "floor seconds (1.0 = as fast per core as the floor, which sorts and writes the same level-0 cell bytes "
              "in one process with no metadata and no Dask)."]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write(md)
    try:
        _plot(rows, os.path.join(out, "throughput.png" if name == "benchmarks" else f"{name}.png"), m)
    except ImportError:
        pass
    return md


def _plot(rows, path, m):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, bins in zip(axes, ["realistic", "one-per-chunk"]):
        series = {}
        for r in rows:
            if r["bins"] != bins or r["kind"] != "uniform" or "error" in r or r["system"] == "zv-dask (rounds)":
                continue
            label = r["system"] + (f", {r['workers']} workers" if r["system"].startswith("zv-dask") else "")
            series.setdefault(label, []).append((r["n"], r["n"] / r["total_s"] / 1e6))
        for label, pts in sorted(series.items()):
            pts.sort()
            style = "--" if "reference" in label else ":" if label == "floor" else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("points")
        ax.set_title(f"bins: {bins}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("M points / s (whole job)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"zv-dask vs zarr-vectors 0.9.2 vs floor, uniform data, {m['cores']} cores, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
