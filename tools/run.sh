#!/usr/bin/env bash
# The README's run command: installs what is missing, builds the serving
# simulator (Release, in build/), replays the bundled trace under the four
# policies, prints the comparison table and writes the chart under out/sim/.
# Arguments are passed to sched-sim, e.g.
#   tools/run.sh --trace AzureLLMInferenceTrace_conv.csv --rate-scale 2
# (the Azure LLM inference trace, not bundled: docs/simulator.md).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/tools/install-deps.sh"

# Quiet unless something fails.
quiet() {
  local log
  if ! log=$("$@" 2>&1); then
    printf '%s\n' "$log" >&2
    exit 1
  fi
}
build="$root/build"
echo "building sched-sim in $build ..."
quiet cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DTGI_GTC_BUILD_TESTS=OFF -DTGI_GTC_BUILD_BENCHMARKS=OFF -DTGI_GTC_BUILD_TOOLS=ON
quiet cmake --build "$build" --target sched-sim -j "$(nproc)"

# Run from the repository root: paths in the output, and relative paths given
# as arguments, are relative to it.
cd "$root"
out=out/sim
mkdir -p "$out"
"$build/tools/sim/sched-sim" --trace tools/sim/traces/default.csv --json "$out/results.json" "$@"

# Debian's matplotlib belongs to /usr/bin/python3; another python3 may come first on PATH.
python=
for candidate in python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import matplotlib' 2>/dev/null; then
    python=$candidate
    break
  fi
done
if [[ -z $python ]]; then
  echo "run.sh: no python3 with matplotlib found (install python3-matplotlib)" >&2
  exit 1
fi
echo
echo "chart:"
"$python" tools/sim/plot.py "$out/results.json" "$out/chart"
