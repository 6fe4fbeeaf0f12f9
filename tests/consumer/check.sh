#!/usr/bin/env bash
# Installs the library from BUILD_DIR into a scratch prefix, then builds and
# runs the consumer project through find_package and through add_subdirectory.
set -euo pipefail
src=$1 build=$2 work=$3
rm -rf "$work" && mkdir -p "$work"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
cmake -S "$src/tests/consumer" -B "$work/pkg" -DTGI_USE=package -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/pkg" >/dev/null
"$work/pkg/consumer"
cmake -S "$src/tests/consumer" -B "$work/sub" -DTGI_USE=subdir -DTGI_SOURCE_DIR="$src" >/dev/null
cmake --build "$work/sub" >/dev/null
"$work/sub/consumer"
# As a subproject, the library builds no tests, tools or benchmarks.
if [ -e "$work/sub/tgi_gtc/tests" ] || [ -e "$work/sub/tgi_gtc/bench" ]; then
  echo "subproject built its tests or benchmarks" >&2
  exit 1
fi
echo "consumer: find_package and add_subdirectory both work"
