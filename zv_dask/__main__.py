"""``python -m zv_dask``: the ``zv-dask`` command line."""

import sys

from zv_dask.cli import main

if __name__ == "__main__":
    sys.exit(main())
