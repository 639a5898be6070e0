#!/usr/bin/env bash
# Install everything AIMaaS needs on a fresh Debian/Ubuntu machine: etcd (apt) and the Python
# package with its extras in ./.venv. Idempotent. Usage: scripts/install.sh [extras, default "dev"]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"

# apt packages: etcd (coordination); with the dev extras also Chromium, which the dashboard test
# drives headless through Playwright (Playwright's own browser download cannot run here).
apt_packages=()
command -v etcd >/dev/null 2>&1 || apt_packages+=(etcd-server)
if [[ "$extras" == *dev* ]] && ! command -v chromium >/dev/null 2>&1; then
  apt_packages+=(chromium)
fi
# etcdctl: tests/deploy run the operations guide's etcd snapshot backup and restore.
if [[ "$extras" == *dev* ]] && ! command -v etcdctl >/dev/null 2>&1; then
  apt_packages+=(etcd-client)
fi
if [ ${#apt_packages[@]} -gt 0 ]; then
  echo "==> installing ${apt_packages[*]} (apt)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi
# apt's package registers a system service; the mesh and the tests run their own etcd.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
  echo "note: a system etcd service is running on 2379; 'aimaas up' will use another port if needed" >&2
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$python" -m venv .venv
fi
echo "==> installing aimaas[$extras] into .venv"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "==> installed: $(.venv/bin/aimaas --version 2>/dev/null || echo aimaas)"
