"""Messages: a job's milestones go to the ``zv_dask`` logger; progress lines follow the application's logging."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np

import zv_dask


def _points(n=5000):
    return np.random.default_rng(0).uniform(0, 100, (n, 3)).astype(np.float32)


def test_milestones_are_logged_and_progress_joins_a_configured_log(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="zv_dask")
    zv_dask.ingest(_points(), tmp_path / "a.zv", chunk_shape=25.0, pyramid={"levels": 2}, progress=True)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("zv_dask")]
    for stage in ("write", "finalize", "pyramid", "commit"):
        assert any(f": {stage} done in" in m for m in messages), (stage, messages)
    assert any("scanned 5000 points" in m for m in messages)
    assert any(m.startswith("pyramid level 2:") for m in messages)
    assert any(m.endswith(" tasks") for m in messages)  # the progress lines, through the log
    assert " tasks" not in capsys.readouterr().err  # ... and not printed beside it


def test_progress_lines_go_to_stderr_when_nothing_logs_them(tmp_path, capsys):
    logging.getLogger("zv_dask").setLevel(logging.NOTSET)  # the default: the root's WARNING
    zv_dask.ingest(_points(), tmp_path / "a.zv", chunk_shape=25.0, progress=True)
    err = capsys.readouterr().err
    assert "shuffle and write level 0:" in err and "done in" in err
    assert "finalize done" not in err  # milestones are INFO: not shown unless asked for


def test_cli_verbose_logs_the_stages_on_stderr(tmp_path):
    np.save(tmp_path / "p.npy", _points())
    r = subprocess.run([sys.executable, "-m", "zv_dask", "ingest", str(tmp_path / "p.npy"), str(tmp_path / "b.zv"),
                        "--chunk-shape", "25", "--levels", "1", "-v", "--scheduler", "synchronous"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "zv_dask.ingest.job INFO: ingest" in r.stderr and "commit done in" in r.stderr
    assert "zv_dask.pyramid.builder INFO: pyramid level 1:" in r.stderr
    assert "INFO" not in r.stdout  # the report alone on stdout
