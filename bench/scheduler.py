"""P4: how much of a key's budget the scheduler uses, against the simulator's real rate limit.

50 accounts on one key at 5 requests a second with a 10 s interval, for a while: the share of
the budget used, 429s and InvalidNonce seen by the simulator, and each account's data age
(sampled every 0.2 s once every account has been polled).
"""

import asyncio
import time
from typing import Any

from balance_exporter.config import build_config
from balance_exporter.server import ListenAddress, WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import start_simulator
from balance_exporter.simulator.state import SimState

API_KEY = "master-bench"
SECRET = "bench-secret"  # noqa: S105  # the simulator's, not a real one


def documents(accounts: int, base_url: str, rate: float, interval: float) -> tuple[
    dict[str, Any], dict[str, Any]
]:
    names = [f"sub{i:03d}" for i in range(accounts)]
    simulator = {
        "keys": [{"api_key": API_KEY, "api_secret": SECRET, "accounts": names}],
        "accounts": [{"name": name, "balances": {"USD": {"amount": "100.00"},
                                                 "BTC": {"amount": "1.5"}}} for name in names],
    }
    exporter = {
        "gemini": {"base_url": base_url},
        "keys": [{"name": "bench", "api_key": API_KEY, "api_secret": SECRET,
                  "requests_per_second": rate}],
        "accounts": [{"key": "bench", "account": name, "interval_seconds": interval}
                     for name in names],
    }
    return simulator, exporter


async def run(accounts: int, rate: float, interval: float, seconds: float) -> dict[str, float]:
    simulator_document, _ = documents(accounts, "", rate, interval)
    simulator = await start_simulator(SimState.from_document(simulator_document))
    _, exporter_document = documents(accounts, simulator.url, rate, interval)
    service = Service(build_config(exporter_document, {}), None,
                      WebOptions(listen_address=ListenAddress("127.0.0.1", 0)))
    key = simulator.state.keys[API_KEY]
    try:
        await service.start()
        while not service.store.all_attempted():  # noqa: ASYNC110  # the store has no event
            await asyncio.sleep(0.05)
        # Measure from here: every account has data, the schedule is in its steady state.
        requests_before = key.counters.get("requests", 0)
        started = time.monotonic()
        worst_age = 0.0
        while time.monotonic() - started < seconds:
            now = time.time()
            ages = [now - s.balances.last_success_seconds for s in service.store.account_snapshots()
                    if s.balances.last_success_seconds is not None]
            worst_age = max([worst_age, *ages])
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        sent = key.counters.get("requests", 0) - requests_before
    finally:
        await service.stop()
        await simulator.close()
    return {
        "accounts": accounts,
        "seconds": elapsed,
        "requests": sent,
        "budget_used": sent / (rate * elapsed),
        "rate_limited": key.counters.get("rate_limited", 0),
        "invalid_nonce": key.counters.get("invalid_nonce", 0),
        "worst_data_age_s": worst_age,
        "interval_s": interval,
    }


def measure(quick: bool) -> dict[str, float]:
    return asyncio.run(run(accounts=50, rate=5.0, interval=10.0, seconds=12.0 if quick else 60.0))
