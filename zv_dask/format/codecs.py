"""The ``compression`` option: which zarr codecs follow ``vlen-bytes`` on every array.

One definition, used by :func:`zv_dask.ingest`, :func:`zv_dask.build_pyramid`,
:func:`zv_dask.local.write_points` and the CLI. Stores are zstd-compressed
unless asked otherwise (ZV format section 5.1: the whole one-item frame is
compressed); the reference reader, ``zarr-vectors`` 0.9.2, reads and
validates every level of such a store (tests/test_compression.py).

* ``"zstd"``: ``[vlen-bytes, zstd(level, checksum=false)]``, the default
  (level 3); zv-dask encodes and decodes these cells itself (the same bytes
  zarr writes);
* ``"none"``: ``[vlen-bytes]``;
* ``"blosc"``: ``[vlen-bytes, blosc(cname=zstd, clevel, noshuffle)]``; cells go
  through zarr's own codec pipeline (correct, slower per cell).

zarr is imported only when codec objects are made.
"""

from __future__ import annotations

from zv_dask.errors import InputError

__all__ = ["COMPRESSIONS", "DEFAULT_COMPRESSION", "DEFAULT_LEVELS", "check_compression", "compressors_for",
           "compression_of", "direct_codec"]

COMPRESSIONS = ("none", "zstd", "blosc")
#: what ``compression=None`` means: zstd 3 made a 1e7-point LAS store 2.9x smaller for 5% more ingest time
DEFAULT_COMPRESSION = "zstd"
#: zstd 3 (zstd's own default) and blosc-zstd 5: see benchmarks/results/compression.md
DEFAULT_LEVELS = {"zstd": 3, "blosc": 5}
_LEVEL_RANGE = {"zstd": (-7, 22), "blosc": (0, 9)}


def check_compression(compression, level=None) -> tuple[str, int | None]:
    """``(name, level)`` of a ``compression`` option (``None`` is the default, zstd); an :class:`InputError` if
    unusable."""
    name = DEFAULT_COMPRESSION if compression is None else compression
    if not isinstance(name, str) or name.lower() not in COMPRESSIONS:
        raise InputError(f"compression {compression!r} is not one of {', '.join(COMPRESSIONS)}")
    name = name.lower()
    if name == "none":
        if level is not None:
            raise InputError(f"compression_level={level!r} needs a compression (zstd or blosc), not 'none'")
        return name, None
    if level is None:
        return name, DEFAULT_LEVELS[name]
    lo, hi = _LEVEL_RANGE[name]
    if isinstance(level, bool) or not isinstance(level, int) or not lo <= level <= hi:
        raise InputError(f"compression_level={level!r} for {name} must be an integer from {lo} to {hi}")
    return name, int(level)


def compressors_for(compression, level=None) -> list | None:
    """The zarr v3 codec objects of ``compression`` (``None`` for ``"none"``: plain ``vlen-bytes``)."""
    name, lvl = check_compression(compression, level)
    if name == "none":
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    assert lvl is not None, "check_compression gives a level to every compression but none"
    if name == "zstd":
        return [ZstdCodec(level=lvl, checksum=False)]
    return [BloscCodec(cname="zstd", clevel=lvl, shuffle="noshuffle", typesize=1)]


def _codec_dicts(arr) -> list[dict]:
    return [c.to_dict() for c in arr.metadata.codecs]


def compression_of(arr) -> dict:
    """``{"name": ..., "level": ...}`` of an array's codecs after ``vlen-bytes`` (``sharded`` when it is)."""
    codecs = _codec_dicts(arr)
    sharded = bool(codecs) and codecs[0]["name"] == "sharding_indexed"
    if sharded:
        codecs = codecs[0].get("configuration", {}).get("codecs", [])
    rest = [c for c in codecs if c["name"] not in ("vlen-bytes", "vlen-utf8", "bytes")]
    out: dict = {"name": "none", "level": None}
    if rest:
        c = rest[0]
        conf = c.get("configuration", {})
        out = {"name": c["name"], "level": conf.get("level", conf.get("clevel"))}
        if len(rest) > 1:
            out["codecs"] = [r["name"] for r in rest]
    if sharded:
        out["sharded"] = True
    return out


def direct_codec(codec_dicts: list[dict]):
    """How zv-dask writes an array's cells itself: ``"plain"`` (``[vlen-bytes]``), ``("zstd", level, checksum)``,
    or ``None`` (zarr's own pipeline must)."""
    names = [c["name"] for c in codec_dicts]
    if names == ["vlen-bytes"]:
        return "plain"
    if names == ["vlen-bytes", "zstd"]:
        conf = codec_dicts[1].get("configuration", {})
        return ("zstd", int(conf.get("level", 0)), bool(conf.get("checksum", False)))
    return None
