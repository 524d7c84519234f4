"""The tables, the JSON and the plot of a ``benchmarks.peers`` run."""

from __future__ import annotations

import json
import os
import shlex
import statistics


def _rss(v: float | None) -> str:
    if not v:
        return "—"
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:,.0f} MiB"


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarize(meta: dict, runs: list[dict]) -> list[dict]:
    """One row per input and tool: medians of the successful runs, min and max wall time, failures."""
    out = []
    for inp in meta["inputs"]:
        for key, tool in meta["tools"].items():
            mine = [r for r in runs if r["input"] == inp["name"] and r["tool"] == key]
            ok = [r for r in mine if r["ok"]]
            row = {"input": inp["name"], "tool": key, "label": tool["label"], "builds": tool["builds"],
                   "runs": len(mine), "ok_runs": len(ok),
                   "failures": [("timed out" if r["timed_out"] else f"exit {r['exit']}") for r in mine if not r["ok"]]}
            if ok:
                last = ok[-1]
                walls = [r["wall_s"] for r in ok]
                row.update(wall_s=_med(ok, "wall_s"), wall_min_s=min(walls), wall_max_s=max(walls),
                           cpu_s=_med(ok, "cpu_s"), rss_sum_bytes=_med(ok, "rss_sum_bytes"),
                           rss_max_bytes=_med(ok, "rss_max_bytes"), processes=max(r["processes_seen"] for r in ok),
                           bytes=last["bytes"], files=last["files"], lod=last.get("lod"))
            out.append(row)
    for row in out:  # zv-dask's default row is the ratio's numerator
        base = next((r for r in out if r["input"] == row["input"] and r["tool"] == "zv-dask" and "wall_s" in r), None)
        if base and "wall_s" in row and row["wall_s"] > 0:
            row["ratio"] = base["wall_s"] / row["wall_s"]
    return out


def table(rows: list[dict]) -> list[str]:
    lines = ["| tool | what it builds | wall s (median) | CPU s | peak RSS (sum over processes) | largest process "
             "| output bytes | files | ratio |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        builds = r["builds"] + (f"; {r['lod']}" if r.get("lod") else "")
        if "wall_s" not in r:
            why = ", ".join(sorted(set(r["failures"])))
            lines.append(f"| {r['label']} | {builds} | failed ({len(r['failures'])} of {r['runs']}: {why}) "
                         "| | | | | | |")
            continue
        spread = f" ({r['wall_min_s']:.2f}-{r['wall_max_s']:.2f})" if r["ok_runs"] > 1 else ""
        failed = f", {len(r['failures'])} failed" if r["failures"] else ""
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "—"
        lines.append(f"| {r['label']} | {builds} | {r['wall_s']:.2f}{spread}{failed} | {r['cpu_s']:.2f} | "
                     f"{_rss(r['rss_sum_bytes'])} ({r['processes']} proc.) | {_rss(r['rss_max_bytes'])} | "
                     f"{r['bytes']:,} | {r['files']:,} | {ratio} |")
    return lines


def markdown(meta: dict, rows: list[dict]) -> str:
    m = meta["machine"]
    warmup = "after one untimed warm-up run of each tool on a 10,000-point file" if meta["warmup"] else "no warm-up"
    out = ["# zv-dask against peer LiDAR LOD converters", "",
           f"`{shlex.join(meta['argv'])}`, {m['date']}: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB, "
           f"Python {m['python']}. LAS files and outputs in `{meta['dir']}` ({meta['disk']}). "
           f"{meta['repeat']} run(s) of each tool per input, alternating tools; "
           f"{warmup}. "
           "Each tool runs as a whole process; its output directory is removed before each run.", "",
           "Versions: " + "; ".join(f"{fam} {ver}" for fam, ver in meta["versions"].items()) + ".", ""]
    for line in meta.get("skipped", []):
        out.append(f"Left out: {line}.")
    if meta.get("skipped"):
        out.append("")
    out += ["wall s: the process's wall time (median; min-max with several runs). CPU s: user + system seconds of "
            "the process and every descendant it waited for. Peak RSS: each process's own peak (its high-water mark, "
            "read every 50 ms), summed over the processes of the tree, and the largest one. The sum over-counts: "
            "processes peak at different times and forked workers share pages (each counts them); the JSON also "
            "has the peak of the tree's total at one sample. "
            "ratio: zv-dask's wall time over the tool's (above 1, zv-dask is slower). The tools build different "
            "things (the second column): the times are what a user waits for, not one kernel against another.", ""]
    out += [f"- {n}" for n in meta.get("notes", [])]
    if meta.get("notes"):
        out.append("")
    for inp in meta["inputs"]:
        mine = [r for r in rows if r["input"] == inp["name"]]
        out += [f"## {inp['name']}: {inp['points']:,} points, LAS {inp['bytes']:,} bytes", "",
                f"Source: {inp['source']}.", "", *table(mine), "", "Commands, exactly as run:", "", "```"]
        out += list(meta["commands"].get(inp["name"], {}).values())
        out += ["```", ""]
    out += ["![wall seconds per tool](peers.png)", ""]
    return "\n".join(out)


def plot(meta: dict, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = [i["name"] for i in meta["inputs"]]
    walls = [r["wall_s"] for r in rows if "wall_s" in r]
    log = bool(walls) and min(walls) > 0 and max(walls) / min(walls) > 20
    n_tools = len(meta["tools"])
    fig, axes = plt.subplots(len(inputs), 1, figsize=(9, 1.2 + len(inputs) * (0.45 * n_tools + 0.8)), squeeze=False,
                             sharex=True)
    for ax, name in zip(axes[:, 0], inputs):
        mine = [r for r in rows if r["input"] == name]
        labels = [r["label"] for r in mine][::-1]
        vals = [r.get("wall_s", 0.0) for r in mine][::-1]
        colors = ["tab:blue" if r["tool"].startswith("zv-dask") else "tab:gray" for r in mine][::-1]
        ys = range(len(mine))
        ax.barh(ys, vals, color=colors)
        ax.set_yticks(list(ys), labels)
        for y, v, r in zip(ys, vals, mine[::-1]):
            text = (f" {v:.2f} s" if v < 100 else f" {v:,.0f} s") if "wall_s" in r else " failed"
            ax.text(v if v > 0 else (min(walls) / 2 if log else 0), y, text, va="center", fontsize=9)
        inp = next(i for i in meta["inputs"] if i["name"] == name)
        ax.set_title(f"{name}, {inp['points']:,} points", fontsize=10, loc="left")
        if log:
            ax.set_xscale("log")
        if log:
            ax.set_xlim(min(walls) / 2, max(walls) * 3)
        else:
            ax.set_xlim(0, max(walls, default=1) * 1.25)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel(f"wall seconds, whole process (median of {meta['repeat']}){', log scale' if log else ''}")
    m = meta["machine"]
    fig.suptitle(f"zv-dask and peer LOD converters, {m['cores']} cores, {meta['disk']}, {m['date']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(meta: dict, runs: list[dict], out_dir: str) -> str:
    """``peers.json``, ``peers.md`` and ``peers.png`` in ``out_dir``; returns the Markdown."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize(meta, runs)
    md = markdown(meta, rows)
    with open(os.path.join(out_dir, "peers.json"), "w") as fh:
        json.dump({**meta, "summary": rows, "runs": runs}, fh, indent=1)
    with open(os.path.join(out_dir, "peers.md"), "w") as fh:
        fh.write(md)
    plot(meta, rows, os.path.join(out_dir, "peers.png"))
    return md
