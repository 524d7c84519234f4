"""Deterministic synthetic point clouds: uniform and clustered, 3-D float32 plus two float32 attributes."""

from __future__ import annotations

import os

import numpy as np

EXTENT = 1000.0
GEN_BLOCK = 5_000_000


def make_block(kind: str, n: int, seed: int) -> tuple[np.ndarray, dict]:
    """``n`` points of a given kind from a seeded generator (blocks are independent and reproducible)."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        pts = rng.uniform(0, EXTENT, (n, 3)).astype(np.float32)
    elif kind == "clustered":
        centres = np.random.default_rng(7).uniform(50, EXTENT - 50, (64, 3))
        which = rng.integers(0, len(centres), n)
        pts = centres[which] + rng.normal(0, 25.0, (n, 3))
        pts = np.clip(pts, 0, EXTENT).astype(np.float32)
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    attrs = {"intensity": rng.random(n, dtype=np.float32),
             "height": (pts[:, 2] / EXTENT).astype(np.float32)}
    return pts, attrs


def make_points(kind: str, n: int) -> tuple[np.ndarray, dict]:
    """The whole cloud in memory (for sizes that fit)."""
    parts = [make_block(kind, min(GEN_BLOCK, n - s), seed=s // GEN_BLOCK) for s in range(0, n, GEN_BLOCK)]
    pts = np.concatenate([p for p, _ in parts])
    attrs = {k: np.concatenate([a[k] for _, a in parts]) for k in parts[0][1]}
    return pts, attrs


def write_parquet(kind: str, n: int, directory: str, rows_per_file: int = 2_000_000) -> str:
    """Write the cloud as Parquet files (one per block) and return a glob; reuses existing files."""
    import pandas as pd

    os.makedirs(directory, exist_ok=True)
    done = os.path.join(directory, "_complete")
    if not os.path.exists(done):
        for i, s in enumerate(range(0, n, rows_per_file)):
            m = min(rows_per_file, n - s)
            pts, attrs = make_block(kind, m, seed=1000 + i)
            pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], **attrs}).to_parquet(
                os.path.join(directory, f"part-{i:05d}.parquet"), row_group_size=m)
        open(done, "w").close()
    return os.path.join(directory, "part-*.parquet")


def parquet_files(kind: str, n: int, directory: str, rows_per_file: int = 2_000_000) -> list[str]:
    """The first ``n`` points of one growing Parquet set (file ``i`` holds block ``i``, seeded as in
    :func:`write_parquet`): files already there are reused, so every N shares the smaller N's files."""
    import pandas as pd

    os.makedirs(directory, exist_ok=True)
    out = []
    for i, s in enumerate(range(0, n, rows_per_file)):
        m = min(rows_per_file, n - s)
        path = os.path.join(directory, f"{kind}-{i:05d}-{m}.parquet")
        if not os.path.exists(path):
            pts, attrs = make_block(kind, m, seed=1000 + i)
            tmp = path + ".partial"
            pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2], **attrs}).to_parquet(tmp, row_group_size=m)
            os.replace(tmp, path)
        out.append(path)
    return out
