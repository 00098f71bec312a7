#!/usr/bin/env bash
# Install what tests/deploy/test_docker_e2e.py needs on Debian/Ubuntu (idempotent): the Docker
# engine and CLI, docker-compose, and debootstrap (it builds the Debian base image of the
# test's stand-in images; no image registry is needed). The test starts the daemon
# itself when none runs (`dockerd --bridge=none --iptables=false --ip-masq=false`) and
# stops it afterwards. Without root or apt-get this only says what is missing.
set -euo pipefail
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }; then
    echo "note: apt-get could not install ${need[*]}; the Docker tests will be skipped" >&2
  fi
else
  echo "note: ${need[*]} missing; the Docker tests will be skipped (sudo apt-get install ${need[*]})" >&2
fi
