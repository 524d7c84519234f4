"""``python -m zv_dask``: the ``zv-dask`` command line."""

from zv_dask.cli import console_main

if __name__ == "__main__":
    console_main()
