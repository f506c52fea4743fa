#!/usr/bin/env bash
# The benchmark suite (see docs/benchmarks.md): makes .venv with the package, then runs every
# benchmark, prints a table and writes JSON to bench/results/. Takes about a minute and a half;
# --quick runs small sizes in about 25 s. Run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/python -m bench "$@"
