#!/usr/bin/env bash
# The demo on a fresh machine: makes .venv, installs the package, and runs the exporter against
# its built-in Gemini simulator (no credentials). Open the URL it prints. Extra arguments go to
# `balance-exporter demo` (e.g. --web.listen-address 127.0.0.1:9000).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/balance-exporter demo "$@"
