#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the Debian tools the tests drive, makes
# .venv with the package and its test tools, then runs ruff, mypy --strict and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages of the real tools the tests drive: promtool, amtool, docker-compose, openssl,
# and tinyproxy as the egress proxy. Installed without recommends (those would add docker.io,
# node-exporter and 200 more), and without starting their services: the tests start their own
# processes, on ports of their own.
packages=(prometheus prometheus-alertmanager docker-compose openssl tinyproxy)
commands=(promtool amtool docker-compose openssl tinyproxy)
missing=()
for index in "${!commands[@]}"; do
  command -v "${commands[$index]}" >/dev/null 2>&1 || missing+=("${packages[$index]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing Debian packages the tests drive: ${missing[*]}"
    echo "   (apt-get install --no-install-recommends; their services are not started)"
    # policy-rc.d is Debian's switch for "do not start services from package scripts"
    # (invoke-rc.d and deb-systemd-invoke both obey it); ours only if there is none already.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy"
      chmod 755 "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
    if [ -n "$(trap -p EXIT)" ]; then
      rm -f "$policy"
      trap - EXIT
    fi
  else
    echo "missing Debian packages: ${missing[*]} (as root: apt-get install --no-install-recommends ${missing[*]})" >&2
    exit 1
  fi
fi

source scripts/venv.sh
ensure_venv "[test]"

echo "== ruff"
"$VENV_BIN/ruff" check .
echo "== mypy --strict"
"$VENV_BIN/mypy"
echo "== pytest (about 6 minutes; the live Prometheus/Alertmanager chain and the quick bench are the slowest parts, each named as it starts)"
"$VENV_BIN/pytest" "$@"
