"""P3: resident memory at a given size, each way measured in a fresh interpreter.

`python -m bench.memory ours|baseline ACCOUNTS CURRENCIES` prints a JSON line: the RSS after
building the store and serving it (ours: every format and encoding rendered once, as Prometheus
and a curl user would ask; baseline: prometheus_client rendering it), and the peak (VmHWM).
"""

import asyncio
import gzip
import json
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest

from balance_exporter.exposition import ExpositionCache
from balance_exporter.metrics import build_registry
from bench.workload import make_store

ROOT = Path(__file__).parent.parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


async def _ours(accounts: int, currencies: int) -> None:
    cache = ExpositionCache(make_store(accounts, currencies))
    for accept in ("application/openmetrics-text;version=1.0.0", ""):
        for encoding in ("gzip", ""):
            await cache.render(accept, encoding)
    await cache.compacted()  # the steady state holds the compacted gzip members too


def _baseline(accounts: int, currencies: int) -> None:
    gzip.compress(generate_latest(build_registry(make_store(accounts, currencies))))


def measure_here(way: str, accounts: int, currencies: int) -> dict[str, float]:
    if way == "ours":
        asyncio.run(_ours(accounts, currencies))
    else:
        _baseline(accounts, currencies)
    return {"rss_mib": _status_kib("VmRSS") / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024}


def measure(way: str, accounts: int, currencies: int) -> dict[str, float]:
    """The figures from a fresh interpreter, so that nothing else in this process counts."""
    output = subprocess.run(  # noqa: S603  # this interpreter, this module
        [sys.executable, "-m", "bench.memory", way, str(accounts), str(currencies)],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(output)
    return result


if __name__ == "__main__":
    print(json.dumps(measure_here(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
