#!/usr/bin/env bash
# The demo on a fresh machine: makes .venv, installs the package, and runs the exporter against
# its built-in Gemini simulator (no credentials). Open the URL it prints. Extra arguments go to
# `balance-exporter demo` (e.g. --web.listen-address 127.0.0.1:9000).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ""
exec "$VENV_BIN/balance-exporter" demo "$@"
