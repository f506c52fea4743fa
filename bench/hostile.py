"""P7: the worst event-loop lag while the exporter reads hostile replies.

The simulator runs as a process of its own (a real upstream does not share the exporter's
loop); one account of the bench key answers every poll with a hostile body (a 500 MB reply, a
gzip bomb of 1 GB, a 3.9 MiB reply just under the cap that must be parsed), and a ticker task in
the exporter's loop measures how late it runs. Target: no reply blocks the loop > ~20 ms.
"""

import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from balance_exporter.config import build_config
from balance_exporter.server import ListenAddress, WebOptions
from balance_exporter.service import Service
from bench.scheduler import balances_document, simulator_document

TICK_SECONDS = 0.001
HOSTILE_REPLIES: dict[str, dict[str, Any]] = {
    "500 MB body": {"kind": "huge", "size_bytes": 500 * 2**20},
    "gzip bomb (1 GB)": {"kind": "huge", "size_bytes": 2**30, "gzip": True},
    "3.9 MiB body under the cap": {"kind": "huge", "size_bytes": 4_089_446},
}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _control(url: str, path: str, body: object) -> None:
    request = urllib.request.Request(  # noqa: S310  # the simulator, on loopback
        url + path, data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(request, timeout=5).close()  # noqa: S310


def _start_simulator(state: Path, port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(  # noqa: S603  # this interpreter, this package
        [sys.executable, "-m", "balance_exporter", "simulate", "--listen", f"127.0.0.1:{port}",
         "--state", str(state)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/state", timeout=1).close()
            return process
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.1)


async def _worst_lag(url: str, seconds: float) -> tuple[float, int]:
    exporter_document = balances_document(2, url, interval=1)
    exporter_document["polling"] = {"max_backoff_seconds": 1}
    service = Service(build_config(exporter_document, {}), None,
                      WebOptions(listen_address=ListenAddress("127.0.0.1", 0)))
    worst = 0.0
    try:
        await service.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            before = time.monotonic()
            await asyncio.sleep(TICK_SECONDS)
            worst = max(worst, time.monotonic() - before - TICK_SECONDS)
        hostile = service.store.account_snapshots()[0]
        failures = sum(hostile.balances.errors.values())
    finally:
        await service.stop()
    return worst * 1000, failures


def measure(quick: bool) -> dict[str, Any]:
    seconds = 2.0 if quick else 6.0
    world = simulator_document(2)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        state = Path(folder) / "state.yml"
        state.write_text(yaml.safe_dump(world))
        for name, fault in HOSTILE_REPLIES.items():
            port = _free_port()
            simulator = _start_simulator(state, port)
            try:
                url = f"http://127.0.0.1:{port}"
                _control(url, "/_sim/accounts/sub000/faults", fault)
                lag_ms, failures = asyncio.run(_worst_lag(url, seconds))
            finally:
                simulator.terminate()
                simulator.wait(timeout=10)
            results[name] = {"worst_loop_lag_ms": lag_ms, "hostile_replies": failures}
    return results
