"""The options objects: one definition each, from which the signatures, the checks and the CLI are made."""

from __future__ import annotations

import dataclasses
import inspect
import shlex

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import zv_dask
from zv_dask.cli import build_parser
from zv_dask.errors import InputError
from zv_dask.ingest.options import IngestOptions
from zv_dask.pyramid.coarsen import METHODS
from zv_dask.pyramid.options import PyramidOptions


def _keywords(fn) -> dict:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@pytest.mark.parametrize("fn, options, own", [
    (zv_dask.ingest, IngestOptions, {"client", "compute"}),
    (zv_dask.plan_ingest, IngestOptions, {"client"}),
    (zv_dask.prepare_ingest, IngestOptions, {"client"}),
    (zv_dask.build_pyramid, PyramidOptions, {"client", "compute", "job", "progress", "resume", "message",
                                              "compression", "compression_level"}),
])
def test_signatures_are_the_options(fn, options, own):
    """help() and IPython show every option as a keyword with the options object's default."""
    kw = _keywords(fn)
    assert set(kw) - own == set(options.names())
    for f in dataclasses.fields(options):
        assert kw[f.name] == f.default, f.name


def test_unknown_and_bad_options_are_named_before_anything_is_written(tmp_path):
    pts = np.zeros((10, 3), np.float32)
    store = tmp_path / "s.zv"
    with pytest.raises(InputError, match=r"\['chunk_sahpe'\] is not one of the ingest options"):
        zv_dask.ingest(pts, store, chunk_sahpe=1.0)
    with pytest.raises(InputError, match=r"out_of_bounds='clip' is not one of \('raise'"):
        zv_dask.ingest(pts, store, chunk_shape=1.0, out_of_bounds="clip")
    with pytest.raises(InputError, match="method='median' is not one of"):
        zv_dask.ingest(pts, store, chunk_shape=1.0, pyramid={"method": "median"})
    with pytest.raises(InputError, match=r"\['level'\] is not one of the pyramid options"):
        zv_dask.ingest(pts, store, chunk_shape=1.0, pyramid={"level": 2})
    with pytest.raises(InputError, match="points_per_task must be >= 1"):
        zv_dask.ingest(pts, store, chunk_shape=1.0, pyramid={"points_per_task": 0}, compute=False)
    with pytest.raises(InputError, match="resume=True and durable=False"):
        zv_dask.ingest(pts, store, chunk_shape=1.0, resume=True, durable=False)
    with pytest.raises(InputError, match="compression"):
        zv_dask.ingest(pts, store, chunk_shape=1.0, compression="lz4")
    assert not store.exists()


def test_options_are_frozen_and_pyramid_accepts_an_instance(tmp_path):
    opts = PyramidOptions(levels=2, method="first")
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.levels = 3
    pts = np.random.default_rng(0).uniform(0, 10, (2000, 3)).astype(np.float32)
    rep = zv_dask.ingest(pts, tmp_path / "a.zv", chunk_shape=5.0, base_bin_shape=0.5, pyramid=opts)
    assert [lv["level"] for lv in rep.levels] == [0, 1, 2]
    assert zv_dask.open_store(tmp_path / "a.zv").root.attrs["zv_dask"]["pyramid"]["method"] == "first"


def test_every_cli_flag_defaults_to_the_option_default():
    """The CLI's arguments are the options' own: same defaults, same choices."""
    parser = build_parser()
    args = parser.parse_args(["ingest", "in.parquet", "out.zv"])
    for cls in (IngestOptions, PyramidOptions):
        for f in dataclasses.fields(cls):
            if f.metadata["cli"] is not None:
                assert getattr(args, f.name) == f.default, f.name
    assert IngestOptions.from_args(args) == IngestOptions()
    assert PyramidOptions.from_args(args) == PyramidOptions()
    with pytest.raises(SystemExit):
        parser.parse_args(["ingest", "a", "b", "--method", "median"])
    help_text = parser._subparsers._group_actions[0].choices["ingest"].format_help()
    for m in METHODS:
        assert m in help_text


_steps = st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)))


@settings(max_examples=60, deadline=None)
@given(levels=st.none() | st.integers(0, 6), bin_ratio=_steps, chunk_scale=_steps, method=st.sampled_from(METHODS),
       sample_size=st.integers(1, 50), seed=st.integers(0, 2**31), min_points=st.integers(0, 10**6),
       links=st.sampled_from([None, "none", "implicit", "explicit"]),
       points_per_task=st.none() | st.integers(1, 10**7), levels_per_task=st.none() | st.integers(1, 5))
def test_cli_spelling_round_trips(levels, bin_ratio, chunk_scale, method, sample_size, seed, min_points, links,
                                  points_per_task, levels_per_task):
    """Options -> the flags a user would type -> parsed back: the same options."""
    opts = PyramidOptions(levels=levels, bin_ratio=bin_ratio, chunk_scale=chunk_scale, method=method,
                          sample_size=sample_size, seed=seed, min_points=min_points, links=links,
                          points_per_task=points_per_task, levels_per_task=levels_per_task)
    words = ["pyramid", "store.zv"]
    for name, value in opts.changed().items():
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        words += ["--" + name.replace("_", "-"), text]
    args = build_parser().parse_args(shlex.split(shlex.join(words)))
    assert PyramidOptions.from_args(args) == opts


@settings(max_examples=60, deadline=None)
@given(levels=st.none() | st.integers(0, 6), bin_ratio=_steps | st.lists(_steps, min_size=1, max_size=4),
       method=st.sampled_from(METHODS), reduction=st.none() | st.dictionaries(
           st.sampled_from(["a", "b", "c"]), st.sampled_from([None, "mean", "max", "mode"])))
def test_record_round_trips(levels, bin_ratio, method, reduction):
    """What a store records of its pyramid gives back the options that decide what was written."""
    opts = PyramidOptions(levels=levels, bin_ratio=bin_ratio, method=method, attribute_reduction=reduction)
    again = PyramidOptions.from_record(opts.record("explicit"))
    assert again.written() == opts.replace(links="explicit").written()


def test_the_public_functions_are_annotated():
    """Every parameter and return of the functions in ``zv_dask.__all__`` has a type (checked by mypy in CI)."""
    missing = []
    for name in zv_dask.__all__:
        fn = getattr(zv_dask, name)
        if not inspect.isfunction(fn):
            continue
        sig = inspect.signature(fn)
        missing += [f"{name}({p.name})" for p in sig.parameters.values()
                    if p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> ?")
    assert missing == []
