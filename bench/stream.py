"""P11: how long a balance change in the simulator takes to show on /metrics, with the key's
balances@account stream and without it (the issue calls this figure P8; P8 was taken by the
loop lag of a reload).

One account-scoped key (time-based nonces, so one request a second) polls its account every
60 s; the simulator changes the account's USD balance, and the time until a scrape shows the new
value is taken, over 50 changes (10 with --quick) a few seconds apart. Without the stream the
same is measured with the account polled every 10 s (2 s with --quick; a minute would make the
run an hour long): the figure is then up to an interval.
"""

import asyncio
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import aiohttp
import yaml

from balance_exporter.config import load_config
from balance_exporter.server import ListenAddress, WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState

API_KEY = "account-bench"
SECRET = "bench-secret"  # noqa: S105  # the simulator's, not a real one


def _document(simulator: RunningSimulator, streams: bool, interval: float) -> dict[str, Any]:
    key: dict[str, Any] = {"name": "hot", "api_key": API_KEY, "api_secret": SECRET,
                           "nonce": "seconds", "requests_per_second": 1}
    if streams:
        key["stream"] = {"reconcile_interval_seconds": 60}
    return {"gemini": {"base_url": simulator.url, "websocket_url": simulator.websocket_url},
            "keys": [key],
            "accounts": [{"key": "hot", "interval_seconds": interval}]}


async def _shows(http: aiohttp.ClientSession, url: str, line: str) -> None:
    while True:
        async with http.get(url + "/metrics") as response:
            if line in await response.text():
                return
        await asyncio.sleep(0.01)


async def run(streams: bool, changes: int, interval: float) -> dict[str, float]:
    state = SimState.from_document({
        "keys": [{"api_key": API_KEY, "api_secret": SECRET, "accounts": ["desk"],
                  "nonce": "seconds"}],
        "accounts": [{"name": "desk", "balances": {"USD": {"amount": "1.00"}}}]})
    simulator = await start_simulator(state)
    latencies = []
    try:
        with TemporaryDirectory() as directory:
            path = Path(directory) / "exporter.yml"
            path.write_text(yaml.safe_dump(_document(simulator, streams, interval)))
            service = Service(load_config(path), path,
                              WebOptions(listen_address=ListenAddress("127.0.0.1", 0)))
            await service.start()
            try:
                async with aiohttp.ClientSession() as http:
                    await _shows(http, service.url, 'currency="USD"} 1.0')
                    await asyncio.sleep(2)  # the stream up, the first polls done
                    for index in range(changes):
                        amount = f"{100 + index}.00"
                        changed = time.monotonic()
                        async with http.put(f"{simulator.url}/_sim/accounts/desk/balances",
                                            json={"USD": {"amount": amount}}):
                            pass
                        await _shows(http, service.url, f'currency="USD"}} {float(amount)}')
                        latencies.append(time.monotonic() - changed)
                        await asyncio.sleep(1.3)  # never two changes in one poll
            finally:
                await service.stop()
    finally:
        await simulator.close()
    ordered = sorted(latencies)
    return {"changes": changes, "interval_s": interval, "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}


def measure(quick: bool) -> dict[str, dict[str, float]]:
    changes = 10 if quick else 50
    return {"stream": asyncio.run(run(True, changes, 60.0)),
            "polling": asyncio.run(run(False, 3 if quick else changes, 2.0 if quick else 10.0))}
