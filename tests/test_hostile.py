"""Hostile input as a new user meets it (issue 19): one clear error naming the problem, exit 2, nothing left.

Each case once ended in a raw ValueError / TypeError / OSError, an exit code 1, a
message naming no file, or a silent wrong answer (0 rows read from a killed job's
store). The CLI cases run in a subprocess where the exit code or what the process
leaves behind is the point, in this process (``cli.main``) otherwise.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
from helpers import tree_bytes

import zv_dask as Z
from zv_dask import cli
from zv_dask.errors import InputError, MetadataError, StoreError, UnfinishedJobError, UnfinishedJobWarning, ZVError

files = importlib.import_module("zv_dask.ingest.files")  # (zv_dask.ingest is also the function)
BIN = Path(sys.executable).parent / "zv-dask"
SYNC = {"scheduler": "sync"}


def _cli(*args, env=None, prefix=()):
    return subprocess.run([*prefix, str(BIN), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def _main(capfd, *args) -> tuple[int, str]:
    """``zv-dask ARGS`` in this process: ``(exit code, stderr)``."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capfd.readouterr().err


def one_error(code: int, err: str, expect: int = 2) -> str:
    """The single ``zv-dask CMD: error:`` line of a run that exited ``expect``."""
    assert code == expect, err
    assert "Traceback" not in err and "terminate called" not in err, err
    lines = [ln for ln in err.splitlines() if ": error:" in ln or ": failed:" in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def points():
    return np.random.default_rng(19).uniform(0, 100, (3000, 3))


def _parquet(path: Path, pts, **kw) -> Path:
    pd.DataFrame({"x": pts[:, 0], "y": pts[:, 1], "z": pts[:, 2]}).to_parquet(path, **kw)
    return path


# -- a killed job's leftover ---------------------------------------------------------------------
def test_a_killed_ingest_is_named_by_every_reader_and_info(tmp_path, capfd, points):
    """SIGKILL after the first write group: reading says whose leftover it is and how to resume, instead of 0 rows."""
    src = _parquet(tmp_path / "p.parquet", points)
    store = tmp_path / "s.zv"
    job = ["ingest", src, store, "--chunk-shape", "10", "--group-points", "500", "--levels", "1", "-q"]
    assert _cli(*job, env={"ZV_DASK_KILL_AT": "write:1"}).returncode == -signal.SIGKILL
    before = tree_bytes(store)
    with pytest.warns(UnfinishedJobWarning):
        zs = Z.open_store(store)
    for level in (0, 1):
        with pytest.raises(UnfinishedJobError, match=rf"cannot read level {level} of .*unfinished ingest job"
                                                     r".*resume=True"):
            Z.read_points(zs, level=level)
    with pytest.raises(UnfinishedJobError, match=r"level 0 holds 0 of the job's 3,000 points"):
        Z.open_level(zs)
    info = Z.store_info(zs)
    assert info["unfinished_job"] and "3,000 points" in info["levels"][0]["unfinished"]
    r = _cli("export", store, tmp_path / "out.parquet", "-q")
    line = one_error(r.returncode, r.stderr)
    assert "cannot read level 0" in line and "unfinished ingest job" in line and "--resume" in line, line
    assert "resume=True" not in line and not (tmp_path / "out.parquet").exists()
    code, text = _info(store)
    assert code == 0 and "UNFINISHED" in text and "level 0 holds 0 of the job's 3,000 points" in text, text
    assert "has no 'zarr_vectors_level'" not in text
    code, err = _main(capfd, "ingest", src, store, "--append", "-q")  # not "the new points lack ...": the job first
    line = one_error(code, err)
    assert "cannot append to" in line and "unfinished ingest job" in line and "--resume" in line, line
    assert tree_bytes(store) == before, "reading a leftover changed it"
    done = _cli(*job, "--resume")
    assert done.returncode == 0, done.stderr
    assert len(Z.read_points(store).compute()) == len(points)


def _info(store):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stderr(io.StringIO()):
        from zv_dask.cli import build_parser

        args = build_parser().parse_args(["info", str(store)])
        code = cli.cmd_info(args, out)
    return code, out.getvalue()


def test_levels_a_pyramid_build_did_not_touch_still_read(tmp_path, points):
    """Only what a job has not finished is refused: level 0 under an unfinished pyramid build reads, with a warning."""
    from zv_dask.local import write_points
    from zv_dask.store.journal import job_document, journal_at

    store = tmp_path / "s.zv"
    write_points(str(store), points, chunk_shape=[10] * 3)
    journal_at(str(store)).write_json("job.json", job_document("pyramid", {}, {}, {}, {}))  # as a killed build leaves
    with pytest.warns(UnfinishedJobWarning, match="unfinished pyramid job"):
        assert len(Z.read_points(str(store)).compute()) == len(points)
    with pytest.raises(UnfinishedJobError, match=r"there is no level 1 \(yet\).*unfinished pyramid job"), \
            pytest.warns(UnfinishedJobWarning):
        Z.read_points(str(store), level=1)
    with pytest.raises(InputError, match=r"level must be a level number .* got 'x'"), \
            pytest.warns(UnfinishedJobWarning):
        Z.read_points(str(store), level="x")


# -- parameters ------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, says", [
    ("1e-6", "makes a grid of about 9.98e+23 chunks"),
    ("1e-300", "makes a grid of more than 1e308 chunks"),
    ("0", "values must be > 0"),
    ("-5", "values must be > 0"),
    ("nan", "must be finite"),
])
def test_bad_chunk_shapes(tmp_path, capfd, points, value, says):
    np.save(tmp_path / "p.npy", points)
    code, err = _main(capfd, "ingest", tmp_path / "p.npy", tmp_path / "s.zv", f"--chunk-shape={value}", "-q")
    line = one_error(code, err)
    assert "--chunk-shape" in line and says in line and "RuntimeWarning" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy"]


@pytest.mark.parametrize("kw, says", [
    (dict(chunk_shape="abc"), r"chunk_shape must be a number or a list of numbers, got 'abc'"),
    (dict(chunk_shape=["a", 1, 1]), r"chunk_shape must be a number or a list of numbers"),
    (dict(chunk_shape=25, base_bin_shape="x"), r"base_bin_shape must be a number"),
    (dict(chunk_shape=25, bounds=5), r"bounds must be \(min_corner, max_corner\)"),
    (dict(chunk_shape=25, bounds=("ab", "cd")), r"bounds must be \(min_corner, max_corner\)"),
    (dict(chunk_shape=25, vertex_dtype="bogus"), r"vertex_dtype 'bogus' is not a numpy dtype"),
    (dict(chunk_shape=25, vertex_dtype="float16"), r"float32 or float64.*'float16'"),
    (dict(ndim="x"), r"ndim must be a positive integer, got 'x'"),
    (dict(axes=5), r"axes must be a list of axis names"),
    (dict(cross_level_depth="x"), r"cross_level_depth must be 0 or 1"),
])
def test_bad_create_store_arguments(tmp_path, kw, says):
    kw.setdefault("bounds", ([0] * 3, [100] * 3))
    with pytest.raises(MetadataError, match=says):
        Z.create_store(tmp_path / "c.zv", **kw)
    assert not (tmp_path / "c.zv").exists()
    assert Z.create_store(tmp_path / "ok.zv", chunk_shape=25, bounds=([0] * 3, [100] * 3)).metadata.chunk_shape \
        == (25.0,) * 3


def test_odd_position_dtypes_are_refused(tmp_path, points):
    for dt in ("float16", "bogus"):
        with dask.config.set(SYNC), pytest.raises(InputError, match="float32 or float64|not a numpy dtype"):
            Z.ingest(points, tmp_path / "s.zv", chunk_shape=25, dtype=dt)
    assert not (tmp_path / "s.zv").exists()


# -- places that cannot be written ---------------------------------------------------------------------
def test_unwritable_places(tmp_path, capfd, points):
    np.save(tmp_path / "p.npy", points)
    targets = {tmp_path / "p.npy" / "x.zv": "is a file, not a directory", "/proc/self/x.zv": "does not take new"}
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK):
        targets["/sys/x.zv"] = "does not take new directories"
    for target, says in targets.items():
        for extra in ([], ["--icechunk"]):
            code, err = _main(capfd, "ingest", tmp_path / "p.npy", target, "--chunk-shape", "10", "-q", *extra)
            line = one_error(code, err)
            assert str(target) in line and says in line, line
    # an existing empty directory this process may not write into (root: without the capability that lets it)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    prefix = ()
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: a read-only directory is writable")
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")
    try:
        r = _cli("ingest", tmp_path / "p.npy", ro, "--chunk-shape", "10", "-q", prefix=prefix)
        line = one_error(r.returncode, r.stderr)
        assert f"cannot make a store at '{ro}': Permission denied" in line, line
        assert list(ro.iterdir()) == [], "a stray file was left"
    finally:
        ro.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy", "ro"]


# -- bad files ---------------------------------------------------------------------------------------
def _csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def small_blocks(monkeypatch):
    """CSV blocks and samples of a few kilobytes: many partitions, and a late value outside the sample."""
    monkeypatch.setattr(files, "CSV_BLOCK", 4000)
    monkeypatch.setattr(files, "CSV_SAMPLE", 2000)


def test_csv_read_block_by_block_gives_every_row_once(tmp_path, small_blocks):
    rng = np.random.default_rng(3)
    df = pd.DataFrame(rng.uniform(0, 100, (900, 3)), columns=list("xyz")).assign(i=rng.integers(0, 9, 900))
    lines = df.to_csv(index=False).splitlines()
    lines.insert(300, "")  # blank lines are skipped, as pandas does
    a, b = _csv(tmp_path / "a.csv", lines), _csv(tmp_path / "b.csv", df.to_csv(index=False).splitlines())
    from zv_dask.ingest.sources import as_source

    src = as_source([str(a), str(b)])
    assert len(src.partitions) > 10 and src.attributes == {"i": ("int64", None)}
    with dask.config.set(SYNC):
        batches = dask.compute(*src.partitions)
    pos = np.concatenate([bt.positions for bt in batches])
    np.testing.assert_array_equal(pos, np.concatenate([df[list("xyz")].to_numpy()] * 2))
    np.testing.assert_array_equal(np.concatenate([bt.attributes["i"] for bt in batches]), np.r_[df.i, df.i])


@pytest.mark.parametrize("line, says", [
    ("abc,1,2,3", r"coordinate column 'x' holds text where numbers belong at line 701 \('abc'\)"),
    ("1,2,3,abc", r"attribute column 'i' holds text where numbers belong at line 701 \('abc'\)"),
    ("1,2,3,4,5", r"line 701 has 5 fields, the header 4"),
    ("1,2,3,2.5", r"attribute column 'i' holds 2.5 at line 701, but the input declares it int64"),
    ("1,2,3,", r"attribute column 'i' is empty at line 701"),
    ("1,,3,4", r"non-finite coordinates \(NaN or inf\), the first at line 701 of '.*bad.csv'"),
])
def test_a_late_bad_csv_line_is_named(tmp_path, small_blocks, line, says):
    rng = np.random.default_rng(4)
    df = pd.DataFrame(rng.uniform(0, 100, (900, 3)), columns=list("xyz")).assign(i=rng.integers(0, 9, 900))
    lines = df.to_csv(index=False).splitlines()
    lines[700] = line  # line 701 of the file, far past the sample
    bad = _csv(tmp_path / "bad.csv", lines)
    with dask.config.set(SYNC), pytest.raises(InputError, match=says) as e:
        Z.ingest(str(bad), tmp_path / "s.zv", chunk_shape=50)
    assert str(bad) in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_csv_without_rows(tmp_path, capfd):
    header = _csv(tmp_path / "h.csv", ["x,y,z"])
    (tmp_path / "e.csv").write_text("")
    code, err = _main(capfd, "ingest", header, tmp_path / "s.zv", "--chunk-shape", "10", "-q")
    line = one_error(code, err)
    assert f"'{header}' holds no rows (a header only): no points to ingest (the header: x,y,z)" in line, line
    assert "dtype" not in line
    code, err = _main(capfd, "ingest", tmp_path / "e.csv", tmp_path / "s.zv", "--chunk-shape", "10", "-q")
    assert f"'{tmp_path / 'e.csv'}' is empty: no header and no rows" in one_error(code, err)
    code, err = _main(capfd, "ingest", header, tmp_path / "s.zv", "--chunk-shape", "10", "-q", "--icechunk")
    assert "holds no rows" in one_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.csv", "h.csv"]


def test_a_corrupt_parquet_page_is_named(tmp_path, capfd, points):
    import pyarrow.parquet as pq

    good = _parquet(tmp_path / "good.parquet", points, row_group_size=500, compression=None)
    raw = bytearray(good.read_bytes())
    col = pq.ParquetFile(good).metadata.row_group(3).column(1)
    for i in range(col.data_page_offset + 40, col.data_page_offset + 300):
        raw[i] ^= 0xFF
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(raw))
    code, err = _main(capfd, "ingest", bad, tmp_path / "s.zv", "--chunk-shape", "10", "-q")
    line = one_error(code, err)
    assert f"'{bad}' is corrupt or unreadable in row group 3 (rows 1500..1999)" in line, line
    # many partitions of it (row groups apart), and the icechunk backend: the same, and nothing left
    code, err = _main(capfd, "ingest", bad, tmp_path / "r", "--chunk-shape", "10", "-q", "--icechunk",
                      "--partition-rows", "500")
    assert "in row group 3 (rows 1500..1999)" in one_error(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "good.parquet"]


def test_huge_finite_coordinates_are_not_called_nan(tmp_path, points):
    pts = points.copy()
    pts[120, 0] = 1e300
    src = _parquet(tmp_path / "huge.parquet", pts)
    with dask.config.set(SYNC):
        with pytest.raises(InputError, match=r"too large for the stored position dtype.*row 120 of '.*huge.parquet'"
                                             r".*dtype='float64'") as e:
            Z.ingest(str(src), tmp_path / "s.zv", chunk_shape=10)
        assert "NaN" not in str(e.value)
        with pytest.raises(MetadataError, match=r"makes a grid of about 1\.\d+e\+301 chunks"):
            Z.ingest(str(src), tmp_path / "s.zv", chunk_shape=10, dtype="float64")
        far = points + 1e20  # a small box far away: chunk coordinates past int64
        with pytest.raises(MetadataError, match=r"from the origin.*subtract an offset"):
            Z.ingest(far, tmp_path / "s.zv", chunk_shape=1, dtype="float64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.parquet"]


# -- the process ends cleanly, and races end in one clear line -------------------------------------------
def test_an_input_error_on_icechunk_exits_2_cleanly(tmp_path, points):
    """One run of what once aborted with exit 134 about one time in 20 (scripts/exit_codes.py counts many)."""
    pts = points.copy()
    pts[2500, 1] = np.nan
    src = _parquet(tmp_path / "nan.parquet", pts)
    r = _cli("ingest", src, tmp_path / "repo", "--chunk-shape", "10", "--icechunk", "-q")
    assert "row 2500 of" in one_error(r.returncode, r.stderr)
    assert not (tmp_path / "repo").exists()


def test_two_ingests_racing_for_a_new_icechunk_repository(tmp_path, points):
    src = _parquet(tmp_path / "p.parquet", points)
    repo = tmp_path / "repo"
    args = [str(BIN), "ingest", str(src), str(repo), "--chunk-shape", "10", "--icechunk", "-q"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(c for c, _ in results) == [0, 2], results  # one job wins; the other is told, in one line
    for code, err in results:
        if code == 2:
            line = one_error(code, err)
            assert "GroupNotFound" not in line and str(repo) in line, line
    assert len(Z.read_points(str(repo), backend="icechunk").compute()) == len(points)
    assert Z.validate_store(str(repo), backend="icechunk").ok


def test_errors_are_zv_errors():
    assert issubclass(UnfinishedJobError, StoreError) and issubclass(UnfinishedJobError, ZVError)
