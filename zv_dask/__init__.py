"""zv-dask: huge point clouds into multi-resolution Zarr Vectors (ZV 0.9.2) stores, in parallel with Dask."""

from zv_dask.errors import (
    FormatError,
    IngestError,
    InputError,
    MetadataError,
    OutOfBoundsError,
    StoreBusyError,
    StoreError,
    UnfinishedJobError,
    UnfinishedJobWarning,
    ZVError,
)
from zv_dask.export import export
from zv_dask.format.metadata import ZV_VERSION
from zv_dask.ingest.append import roll_back_append as roll_back
from zv_dask.ingest.graph import PreparedIngest, ingest, prepare_ingest
from zv_dask.ingest.options import IngestOptions
from zv_dask.ingest.plan import IngestPlan, plan_ingest
from zv_dask.ingest.report import IngestReport
from zv_dask.lazy import PendingIngest, PendingPyramid
from zv_dask.pyramid import PyramidReport, build_pyramid
from zv_dask.pyramid.options import PyramidOptions
from zv_dask.read import open_level, read_points
from zv_dask.read_links import parent_rows, read_links
from zv_dask.stats import store_stats
from zv_dask.store.api import (
    ZVStore,
    add_resolution_level,
    commit,
    create_resolution_level,
    create_store,
    discard_changes,
    get_resolution_level,
    list_available_ratios,
    list_resolution_levels,
    open_store,
    read_level_metadata,
    read_parametric_types,
    read_root_metadata,
    rebind,
    remove_resolution_level,
    session_for,
    store_info,
    write_parametric_types,
)
from zv_dask.store.credentials import ClientCredentials
from zv_dask.store.rewrite import set_bounds
from zv_dask.validate import ValidationReport, validate_store

__version__ = "0.1.0"


__all__ = [
    "ZV_VERSION",
    "build_pyramid",
    "PyramidOptions",
    "PyramidReport",
    "read_points",
    "open_level",
    "export",
    "read_links",
    "parent_rows",
    "ingest",
    "IngestOptions",
    "IngestReport",
    "PreparedIngest",
    "PendingIngest",
    "PendingPyramid",
    "prepare_ingest",
    "roll_back",
    "plan_ingest",
    "IngestPlan",
    "validate_store",
    "ValidationReport",
    "ZVStore",
    "ZVError",
    "UnfinishedJobWarning",
    "UnfinishedJobError",
    "StoreError",
    "StoreBusyError",
    "MetadataError",
    "FormatError",
    "InputError",
    "OutOfBoundsError",
    "IngestError",
    "create_store",
    "open_store",
    "store_info",
    "store_stats",
    "read_root_metadata",
    "read_level_metadata",
    "create_resolution_level",
    "get_resolution_level",
    "list_resolution_levels",
    "add_resolution_level",
    "remove_resolution_level",
    "list_available_ratios",
    "write_parametric_types",
    "read_parametric_types",
    "set_bounds",
    "session_for",
    "commit",
    "discard_changes",
    "rebind",
    "ClientCredentials",
]
