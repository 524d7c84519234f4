"""zv-dask benchmarks: ``python -m benchmarks --help``."""
