"""Run the reference (zarr-vectors 0.9.2) in a child process and report its times and peak RSS.

Usage (internal): python -m benchmarks.reference KIND N CHUNK BIN LEVELS LINKS OUT
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time


def main(argv):
    kind, n, chunk, bin_, levels, links, out = argv
    n, chunk, bin_, levels, links = int(float(n)), float(chunk), float(bin_), int(levels), links == "1"
    import warnings
    warnings.filterwarnings("ignore")
    from zarr_vectors.multiresolution.coarsen import build_pyramid
    from zarr_vectors.types.points import write_points

    from benchmarks.data import make_points

    pts, attrs = make_points(kind, n)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    write_points(out, pts, chunk_shape=(chunk,) * 3, bin_shape=(bin_,) * 3, vertex_attributes=attrs)
    t1 = time.perf_counter()
    kw = {} if links else {"cross_level_depth": 0, "cross_level_storage": "none"}
    build_pyramid(out, factors=[(2.0, 1.0)] * levels, **kw)
    t2 = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"write_s": t1 - t0, "pyramid_s": t2 - t1, "total_s": t2 - t0, "peak_rss": rss}))


if __name__ == "__main__":
    main(sys.argv[1:])
