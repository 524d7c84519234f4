"""Tables and the plot from a benchmark run's rows."""

from __future__ import annotations

import os


def _fmt_s(v):
    return f"{v:.2f}" if isinstance(v, (int, float)) else "—"


def _gib(v):
    return f"{v / 2**30:.2f}" if v else "—"


def write_report(result: dict, out: str, name: str) -> str:
    rows = result["rows"]
    m = result["machine"]
    lines = [f"# zv-dask benchmarks ({m['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; Python {m['python']}, "
             f"zv-dask {m['zv_dask']}, dask {m['dask']}, zarr {m['zarr']}. Stores written under "
             f"`{result.get('work_dir', '?')}`.",
             "3-D float32 points in [0, 1000)^3 plus two float32 attributes; chunk 125 (512 chunks); "
             f"pyramid of 3 levels (bin ratio 2). zv-dask runs on a LocalCluster (1 thread per worker process). "
             "The reference is zarr-vectors 0.9.2 `write_points` + `build_pyramid` in one process; its pyramid "
             "writes cross-level links by default and drops attributes, zv-dask's keeps attributes and writes "
             "no links (both shown). The floor sorts and writes the same cell bytes on one core, no metadata.",
             "", "| N | data | bins | system | workers | ingest s | pyramid s | total s | M pts/s (total) | "
             "peak worker RSS GiB | vs reference (total) | ingest vs floor per core |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def find(n, kind, bins, system, workers=None):
        for r in rows:
            if (r["n"], r["kind"], r["bins"], r["system"]) == (n, kind, bins, system) and \
                    (workers is None or r["workers"] == workers) and "error" not in r:
                return r
        return None
    for r in rows:
        n, kind, bins, sys_ = r["n"], r["kind"], r["bins"], r["system"]
        if "error" in r:
            lines.append(f"| {n:.0e} | {kind} | {bins} | {sys_} | {r['workers']} | — | — | — | — | — | — | "
                         f"{r['error']} |")
            continue
        if sys_ == "floor":
            ingest, pyr, total, rss = r["total_s"], None, r["total_s"], None
        elif sys_ == "zv-dask":
            ingest, pyr, total, rss = r["ingest_s"], r["pyramid_s"], r["total_s"], r["peak_worker_rss"]
        else:
            ingest, pyr, total, rss = r["write_s"], r["pyramid_s"], r["total_s"], r.get("peak_rss")
        vs_ref = vs_floor = ""
        if sys_ == "zv-dask":
            ref = find(n, kind, bins, "reference")
            if ref:
                vs_ref = f"{ref['total_s'] / total:.1f}x faster"
            fl = find(n, kind, bins, "floor")
            if fl:
                vs_floor = f"{ingest * r['workers'] / fl['total_s']:.2f}x"
        mpts = n / total / 1e6 if sys_ != "floor" else n / total / 1e6
        lines.append(f"| {n:.0e} | {kind} | {bins} | {sys_} | {r['workers']} | {_fmt_s(ingest)} | {_fmt_s(pyr)} | "
                     f"{_fmt_s(total)} | {mpts:.2f} | {_gib(rss)} | {vs_ref} | {vs_floor} |")
    lines += ["", "*ingest vs floor per core* = zv-dask level-0 ingest seconds x workers / floor seconds "
              "(1.0 = as fast per core as the floor, which writes no metadata and keeps everything in one "
              "process's memory). *vs reference* compares ingest + pyramid with the reference's "
              "write_points + build_pyramid (with its default cross-level links)."]
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
            if r["bins"] != bins or r["kind"] != "uniform" or "error" in r:
                continue
            label = r["system"] + (f" ({r['workers']} workers)" if r["system"] == "zv-dask" else "")
            series.setdefault(label, []).append((r["n"], r["n"] / r["total_s"] / 1e6))
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("points")
        ax.set_title(f"bins: {bins}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("M points / s (ingest + pyramid; floor: sort + write)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"zv-dask vs zarr-vectors 0.9.2 vs floor, uniform data, {m['cores']} cores, {m['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
