#!/usr/bin/env bash
# The README's test command: installs what is missing, then builds and runs the
# whole suite four times: Release with GCC (all tests, tools and benchmarks
# build), ThreadSanitizer (the concurrent tests), ASan+UBSan (every test) and
# Release with Clang (everything builds warning-free there too; every test).
# TGI_TEST_BUILDS="release tsan asan clang" selects builds; TGI_STRESS_ITERS scales stress.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/install-deps.sh"
jobs=$(nproc)
builds=${TGI_TEST_BUILDS:-"release tsan asan clang"}
export TGI_STRESS_ITERS=${TGI_STRESS_ITERS:-}
status=0
for b in $builds; do
  dir="$root/build-test-$b"
  case $b in
    release) args=(-DCMAKE_BUILD_TYPE=Release) ;;
    tsan)    args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DTGI_GTC_SANITIZER=thread -DTGI_GTC_BUILD_BENCHMARKS=OFF) ;;
    asan)    args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DTGI_GTC_SANITIZER=address -DTGI_GTC_BUILD_BENCHMARKS=OFF) ;;
    clang)   args=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=clang++) ;;
    *) echo "unknown build $b" >&2; exit 2 ;;
  esac
  echo "=== $b build ==="
  cmake -S "$root" -B "$dir" -G Ninja "${args[@]}" >/dev/null
  cmake --build "$dir" -j "$jobs"
  echo "=== $b tests ==="
  export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  (cd "$dir" && ctest --output-on-failure -j "$jobs") || status=1
done
exit $status
