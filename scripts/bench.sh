#!/usr/bin/env bash
# The benchmark suite (see docs/benchmarks.md): makes .venv with the package, then runs every
# benchmark, prints a table and writes JSON to bench/results/. Takes about five minutes (the
# scrape benchmarks run at 100k and at 200k series); --quick runs small sizes in about a minute. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv ""
exec "$VENV_BIN/python" -m bench "$@"
