"""Pure ZV 0.9.2 encoding: numpy in, bytes and JSON-ready dicts out. No I/O, no Dask."""

from zv_dask.format.cells import (
    FragmentIndex,
    check_attribute,
    decode_attribute,
    decode_fragments,
    decode_manifest,
    decode_vertices,
    encode_attribute,
    encode_fragments,
    encode_manifest,
    encode_vertices,
)
from zv_dask.format.grid import Grid, chunk_key, parse_chunk_key

__all__ = [
    "FragmentIndex",
    "Grid",
    "check_attribute",
    "chunk_key",
    "decode_attribute",
    "decode_fragments",
    "decode_manifest",
    "decode_vertices",
    "encode_attribute",
    "encode_fragments",
    "encode_manifest",
    "encode_vertices",
    "parse_chunk_key",
]
