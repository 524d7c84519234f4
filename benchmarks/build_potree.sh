#!/usr/bin/env bash
# PotreeConverter 2, the C++ LAS -> LOD octree converter, built from its public repository for
# `python -m benchmarks.peers` (it is a peer to measure against, not a dependency of zv-dask).
#
#   benchmarks/build_potree.sh SOURCE [OUT]
#
# SOURCE: a checkout of github.com/potree/PotreeConverter, or its git directory (a bare clone or
# a mirror: HEAD is exported). OUT (default benchmarks/.peers/potree): where it is built; the
# executable is OUT/build/PotreeConverter, which benchmarks.common.find_potree finds there.
# Needs cmake, a C++20 compiler and TBB (Debian/Ubuntu: apt-get install cmake g++ libtbb-dev;
# installed here when missing and apt-get is there). Nothing is downloaded but those packages.
# Prints the executable's path and the commit it was built from (`--potree-version` of peers).
set -euo pipefail
SRC=${1:?usage: build_potree.sh SOURCE [OUT]}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${2:-$HERE/.peers/potree}
SRC=$(cd "$SRC" && pwd)

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
[ -e /usr/include/tbb/tbb.h ] || [ -e /usr/include/oneapi/tbb.h ] || need+=(libtbb-dev)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || { echo "build_potree.sh: install ${need[*]} first" >&2; exit 2; }
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

rm -rf "$OUT" && mkdir -p "$OUT"
if [ -d "$SRC/.git" ] || [ -f "$SRC/CMakeLists.txt" ]; then
    (cd "$SRC" && tar cf - CMakeLists.txt Converter LICENSE) | (cd "$OUT" && tar xf -)
    version=$(git -C "$SRC" describe --tags --always 2>/dev/null || echo unknown)
else  # a git directory: export the sources of HEAD
    git --git-dir="$SRC" archive HEAD CMakeLists.txt Converter LICENSE | tar xf - -C "$OUT"
    version=$(git --git-dir="$SRC" describe --tags --always 2>/dev/null || echo unknown)
fi
# its CMakeLists copies a README and the web viewer's page template; converting needs neither
touch "$OUT/README.md" && mkdir -p "$OUT/resources/page_template"
cmake -S "$OUT" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release >"$OUT/cmake.log"
cmake --build "$OUT/build" -j"$(nproc)" >"$OUT/build.log"
echo "$version" >"$OUT/VERSION"
echo "$OUT/build/PotreeConverter ($version)"
