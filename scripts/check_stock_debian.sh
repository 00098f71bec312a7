#!/usr/bin/env bash
# Check the README's setup on a stock Debian 12 (bookworm), whose python3 is PEP 668-protected.
#   sudo bash scripts/check_stock_debian.sh [CHROOT_DIR]       (needs debootstrap: apt-get install debootstrap)
# Builds a minimal bookworm chroot (`debootstrap --variant=minbase`) in CHROOT_DIR (default
# /var/tmp/fedmoe-bookworm; an existing one is reused), installs Debian's python3 and git there,
# clones this repository's HEAD commit into it and runs, as root inside, exactly:
#   1. bash scripts/setup.sh && .venv/bin/python -m fedmoe_app.tools.launch --num-supernodes 10
#   2. source .venv/bin/activate; flwr run . --stream      (every network path blocked: offline)
#   3. bash scripts/setup.sh --test && .venv/bin/python -m pytest -q -m "not slow"   (FULL=1: all tests)
# The host's pip configuration (pip.conf files, PIP_* variables) and local package folders it names
# are carried in, so pip inside uses the host's package sources. Mounts are undone on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-/var/tmp/fedmoe-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "error: run as root (debootstrap, chroot, mounts)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "error: apt-get install debootstrap" >&2; exit 1; }

if [ ! -x "$DIR/usr/bin/apt-get" ]; then
  echo "== debootstrap --variant=minbase bookworm $DIR"
  debootstrap --variant=minbase bookworm "$DIR" "$MIRROR" >/dev/null
fi

mounted=()
cleanup() {
  local m
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
    m=${mounted[i]}
    umount -R "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}
trap cleanup EXIT
bind() {  # bind SRC [ro]: mount SRC at the same path inside the chroot
  mkdir -p "$DIR$1"
  mountpoint -q "$DIR$1" && return 0
  mount --rbind "$1" "$DIR$1"
  mount --make-rslave "$DIR$1"  # unmounting the copy must never propagate to the host's mounts
  [ "${2:-}" = ro ] && mount -o remount,bind,ro "$DIR$1"
  mounted+=("$DIR$1")
}
mountpoint -q "$DIR/proc" || { mount -t proc proc "$DIR/proc"; mounted+=("$DIR/proc"); }
mountpoint -q "$DIR/sys" || { mount -t sysfs sys "$DIR/sys"; mounted+=("$DIR/sys"); }
bind /dev
cp /etc/resolv.conf "$DIR/etc/resolv.conf"

# The host's pip sources: config files, PIP_* variables and the local folders they name.
pipenv=()
while IFS='=' read -r name value; do pipenv+=("$name=$value"); done < <(env | grep '^PIP_' || true)
for f in /etc/pip.conf /etc/xdg/pip/pip.conf /etc/xdg/pip/constraints.txt "$HOME/.config/pip/pip.conf" \
         "$HOME/.pip/pip.conf"; do
  [ -f "$f" ] && { mkdir -p "$DIR$(dirname "$f")"; cp "$f" "$DIR$f"; }
done
for p in $( (cat /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" 2>/dev/null; env | grep '^PIP_') \
            | grep -oE '(file://)?/[A-Za-z0-9_./-]+' | sed 's|^file://||' | sort -u); do
  while [ "$p" != / ] && [ ! -d "$p" ]; do p=$(dirname "$p"); done
  [ "$(basename "$p")" = simple ] && p=$(dirname "$p")  # a PEP 503 index links to ../../files/...
  case "$p" in /|/etc|/etc/*|/usr|/usr/*|/root|/home) continue ;; esac
  bind "$p" ro
done

in_chroot() {
  chroot "$DIR" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${pipenv[@]}" bash -c "$1"
}

echo "== stock python3 and its PEP 668 marker"
in_chroot 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 git ca-certificates >/dev/null
python3 --version; ls /usr/lib/python3*/EXTERNALLY-MANAGED; python3 -c "import ensurepip" 2>&1 | tail -1 || true'

# pip's certificate bundle (e.g. one that trusts a proxy's CA), after ca-certificates wrote the chroot's own
for f in $( (cat /etc/pip.conf /etc/xdg/pip/pip.conf "$HOME/.config/pip/pip.conf" 2>/dev/null; env | grep '^PIP_') \
            | grep -iE '^\s*(cert|PIP_CERT)\s*=' | sed -E 's/^[^=]*=\s*//' | sort -u); do
  [ -f "$f" ] && { mkdir -p "$DIR$(dirname "$f")"; cp "$f" "$DIR$f"; }
done

echo "== clean clone of $(git -C "$ROOT" rev-parse --short HEAD)"
rm -rf "$DIR/root/fedmoe"
git clone -q "$ROOT" "$DIR/root/fedmoe"
git -C "$DIR/root/fedmoe" checkout -q "$(git -C "$ROOT" rev-parse HEAD)"

t0=$SECONDS
echo "== 1. bash scripts/setup.sh && .venv/bin/python -m fedmoe_app.tools.launch --num-supernodes 10"
in_chroot 'cd /root/fedmoe && bash scripts/setup.sh && .venv/bin/python -m fedmoe_app.tools.launch --num-supernodes 10'
echo "== 1. passed in $((SECONDS - t0)) s"

t0=$SECONDS
echo "== 2. source .venv/bin/activate; flwr run . --stream (offline)"
in_chroot 'cd /root/fedmoe && source .venv/bin/activate
export FLWR_HOME=/root/flwr-home-check HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9
export NO_PROXY=127.0.0.1,localhost UV_OFFLINE=1 PIP_NO_INDEX=1
flwr run . --stream --run-config "run-name='"'"'flwr-run-check'"'"'"
flwr ls --format json | tee /root/flwr-ls.json | grep -E "\"status\""
python - <<EOF   # stop the managed SuperLink (and its SuperExec) by PID: not this script nor its shell
import os, psutil
home, mine = "/root/flwr-home-check", {os.getpid(), os.getppid()}
procs = [p for p in psutil.process_iter(["environ"]) if (p.info["environ"] or {}).get("FLWR_HOME") == home and p.pid not in mine]
for p in procs:
    print("stopping", p.pid, " ".join(p.cmdline()[:2]), flush=True)
    p.terminate()
psutil.wait_procs(procs, timeout=15)
EOF
grep -q "\"status\": \"finished:completed\"" /root/flwr-ls.json'
echo "== 2. passed in $((SECONDS - t0)) s"

t0=$SECONDS
tests='-m "not slow"'
[ "${FULL:-0}" = 1 ] && tests=""
echo "== 3. bash scripts/setup.sh --test && .venv/bin/python -m pytest -q $tests"
in_chroot "cd /root/fedmoe && bash scripts/setup.sh --test && .venv/bin/python -m pytest -q $tests"
echo "== 3. passed in $((SECONDS - t0)) s"
