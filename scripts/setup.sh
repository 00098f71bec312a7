#!/usr/bin/env bash
# Install what fedmoe needs on a fresh Debian/Ubuntu machine with Python 3.10+ (idempotent).
#   bash scripts/setup.sh          # the app, its dependencies and the offline Fashion-MNIST files
#   bash scripts/setup.sh --test   # the same plus the test tools (pytest, ruff, pyyaml)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# Fashion-MNIST for offline runs: Debian's package puts the IDX files in /usr/share/datasets.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST not in /usr/share/datasets; run 'sudo apt-get install dataset-fashion-mnist'," \
         "set FEDMOE_DATA_DIR, or let the app download it (needs internet)." >&2
  fi
fi

# The network-namespace deployment test needs iproute2 and openssl (present on most machines).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  for tool in ip:iproute2 openssl:openssl; do
    command -v "${tool%%:*}" >/dev/null || apt-get install -y -qq "${tool#*:}" >/dev/null || true
  done
fi

# PyTorch first, pinned to the builds this project is tested with, then the app itself.
"$PY" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
"$PY" -m pip install -q -e ".${extra}"
