#!/usr/bin/env bash
# Install fedmoe into the virtual environment .venv on a fresh Debian/Ubuntu machine (idempotent).
#   bash scripts/setup.sh          # .venv with the app, its dependencies and the offline Fashion-MNIST files
#   bash scripts/setup.sh --test   # the same plus the test tools (pytest, ruff, pyyaml, import-linter)
#                                  # and, as root with apt-get, Docker + docker-compose + debootstrap
# Then run everything with .venv/bin/python (e.g. `.venv/bin/python -m fedmoe_app.tools.launch`), or
# `source .venv/bin/activate` first to type `flwr run .`, `fedmoe-launch`, ... as usual.
#
# A virtual environment works where the system Python refuses `pip install` (PEP 668,
# "externally-managed-environment": Debian 12, Ubuntu 24.04). When the base Python already has
# the pinned torch/torchvision (several GB with their CUDA libraries), the venv sees its site-packages
# (--system-site-packages) instead of installing a second copy; elsewhere it is isolated.
# FEDMOE_VENV_SYSTEM_SITE=0|1 forces either; PYTHON picks the base interpreter (default python3).
#
# Inside the venv, every Python process (the launcher, pytest, flwr and the SuperLink it starts)
# finds the venv's executables first and runs with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1:
# apps use the installed packages, so `flwr run .` works offline (see scripts/fedmoe-venv.pth).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
TORCH=2.14.1
TORCHVISION=0.29.1
root=false
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && root=true
apt_updated=false
apt_install() {  # apt_install PACKAGE...: as root only
  $apt_updated || { apt-get update -qq; apt_updated=true; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Fashion-MNIST for offline runs: Debian's package puts the IDX files in /usr/share/datasets.
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if $root; then
    apt_install dataset-fashion-mnist
  else
    echo "note: Fashion-MNIST not in /usr/share/datasets; run 'sudo apt-get install dataset-fashion-mnist'," \
         "set FEDMOE_DATA_DIR, or let the app download it (needs internet)." >&2
  fi
fi

# The network-namespace deployment test needs iproute2 and openssl (present on most machines).
if $root; then
  for tool in ip:iproute2 openssl:openssl; do
    command -v "${tool%%:*}" >/dev/null || apt_install "${tool#*:}" || true
  done
fi

# --test: tests/data/test_text_data.py reads the eight languages of Debian's fortunes packages (as root with apt-get).
if [ "${1:-}" = "--test" ]; then
  missing=()
  for pkg in fortunes fortunes-de fortunes-ru fortunes-zh fortunes-es fortunes-it fortunes-pl fortunes-cs; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if $root; then
      apt_install "${missing[@]}"
    else
      echo "note: ${missing[*]} missing; the fortunes test skips (fails under CI=true):" \
           "sudo apt-get install ${missing[*]}" >&2
    fi
  fi
fi

# --test: the Docker end-to-end test needs the Docker engine, docker-compose and debootstrap
# (installed as root with apt-get; elsewhere the script says what is missing and the test skips).
[ "${1:-}" = "--test" ] && bash scripts/install-docker.sh

# The virtual environment. Debian/Ubuntu ship `venv` without ensurepip unless python3-venv is installed.
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -c "import ensurepip, venv" 2>/dev/null; then
    if $root; then
      apt_install python3-venv
    else
      echo "error: $PY cannot create a virtual environment; run 'sudo apt-get install python3-venv'" \
           "and then 'bash scripts/setup.sh' again." >&2
      exit 1
    fi
  fi
  system_site=${FEDMOE_VENV_SYSTEM_SITE:-}
  if [ -z "$system_site" ]; then
    system_site=0
    "$PY" - "$TORCH" "$TORCHVISION" 2>/dev/null <<'EOF' && system_site=1
import sys
from importlib.metadata import version

ok = [version(p).split("+")[0] == v for p, v in (("torch", sys.argv[1]), ("torchvision", sys.argv[2]))]
sys.exit(0 if all(ok) else 1)
EOF
  fi
  opts=()
  [ "$system_site" = 1 ] && opts=(--system-site-packages)
  echo "setup: creating $VENV ${opts[*]:-(isolated)} with $("$PY" --version)" >&2
  "$PY" -m venv "${opts[@]}" "$VENV"
fi
VPY="$VENV/bin/python"

# PyTorch first, pinned to the builds this project is tested with, then the app itself.
"$VPY" -m pip install -q "torch==$TORCH" "torchvision==$TORCHVISION"
extra=""
[ "${1:-}" = "--test" ] && extra="[test,hf,track]"
"$VPY" -m pip install -q -e ".${extra}"

# The venv's Python processes use the venv's executables and installed packages (see the .pth file);
# an activated shell gets the same variable, for a `flwr` that is not the venv's own.
site=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/fedmoe-venv.pth "$site/fedmoe-venv.pth"
marker="# fedmoe: apps use this environment's packages (no runtime dependency installation)"
if ! grep -qF "$marker" "$VENV/bin/activate"; then
  printf '\n%s\nexport FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1\n' "$marker" >>"$VENV/bin/activate"
fi

# A managed local SuperLink started before this setup keeps installing dependencies at runtime.
port=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}
if "$VPY" -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" \
    2>/dev/null; then
  echo "note: a local SuperLink is already running on 127.0.0.1:$port; if it was started outside" \
       "$VENV, stop it (kill its flower-superlink process) so that 'flwr run .' starts one from $VENV." >&2
fi
echo "setup: done; run '$VPY -m fedmoe_app.tools.launch --num-supernodes 10'," \
     "or 'source $VENV/bin/activate' and then 'flwr run . --stream'." >&2
