#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs the Debian tools the tests drive, makes
# .venv with the package and its test tools, then runs ruff, mypy --strict and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages of the real tools the tests drive: promtool, amtool, docker-compose, openssl,
# and tinyproxy as the egress proxy.
packages=(prometheus prometheus-alertmanager docker-compose openssl tinyproxy)
commands=(promtool amtool docker-compose openssl tinyproxy)
missing=()
for index in "${!commands[@]}"; do
  command -v "${commands[$index]}" >/dev/null 2>&1 || missing+=("${packages[$index]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing Debian packages the tests drive: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "missing Debian packages: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

source scripts/venv.sh
ensure_venv "[test]"

echo "== ruff"
"$VENV_BIN/ruff" check .
echo "== mypy --strict"
"$VENV_BIN/mypy"
echo "== pytest (about 4 minutes; the live Prometheus/Alertmanager chain is the slowest part)"
"$VENV_BIN/pytest" "$@"
