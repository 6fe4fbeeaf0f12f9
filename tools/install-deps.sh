#!/usr/bin/env bash
# Installs, from Debian 12's packages, whatever the build needs and is missing.
# Both README commands call it; it does nothing when everything is present.
set -euo pipefail
pkgs=(cmake ninja-build g++ clang make python3
      libboost-dev libconcurrentqueue-dev doctest-dev libbenchmark-dev
      libtbb-dev libatomic-queue-dev libcli11-dev python3-matplotlib)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
