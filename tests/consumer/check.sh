#!/usr/bin/env bash
# Installs the library from BUILD_DIR into a scratch prefix, then builds and
# runs the consumer project through find_package and through add_subdirectory,
# with COMPILER (the build's). With SANITIZER (the build's TGI_GTC_SANITIZER),
# only through find_package: what an installed sanitizer build passes on is
# what is new there; add_subdirectory is how the build's own targets use it.
# Usage: check.sh SOURCE_DIR BUILD_DIR WORK_DIR [COMPILER [SANITIZER]]
set -euo pipefail
src=$1 build=$2 work=$3 cxx=${4:-c++} sanitizer=${5:-}
rm -rf "$work" && mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
cmake -S "$src/tests/consumer" -B "$work/pkg" -DCMAKE_CXX_COMPILER="$cxx" -DTGI_USE=package \
  -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/pkg" >/dev/null
"$work/pkg/consumer"
if [ -n "$sanitizer" ]; then
  echo "consumer: find_package works (sanitizer build: $sanitizer)"
  exit 0
fi
cmake -S "$src/tests/consumer" -B "$work/sub" -DCMAKE_CXX_COMPILER="$cxx" -DTGI_USE=subdir \
  -DTGI_SOURCE_DIR="$src" >/dev/null
cmake --build "$work/sub" >/dev/null
"$work/sub/consumer"
# As a subproject, the library builds no tests, tools or benchmarks.
if [ -e "$work/sub/tgi_gtc/tests" ] || [ -e "$work/sub/tgi_gtc/bench" ]; then
  echo "subproject built its tests or benchmarks" >&2
  exit 1
fi
echo "consumer: find_package and add_subdirectory both work"
