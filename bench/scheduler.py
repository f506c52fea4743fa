"""P4: how much of a key's budget the scheduler uses, against the simulator's real rate limit.

Two workloads on one key at 5 requests a second, each for a while:
- balances: 50 configured accounts polled every 10 s;
- mixed: the key discovers 20 accounts (listing every 30 s) and polls each one's balances every
  4 s, notional values every 8 s, staked balances every 12 s and transfers every 8 s (each
  account's within Gemini's own 5 s rule): more than the budget, so the plan stretches every
  interval by the same factor.
Each gives the share of the budget used, the 429s (the key's, and those of the 5 s rule per
account) and InvalidNonce the simulator saw, and the worst data age of any account and stream
as a multiple of its planned interval (sampled every 0.2 s once every account has been polled
on every stream).
"""

import asyncio
import time
from typing import Any

from balance_exporter.config import build_config
from balance_exporter.server import ListenAddress, WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import start_simulator
from balance_exporter.simulator.state import SimState
from balance_exporter.store import AccountSnapshot

API_KEY = "master-bench"
SECRET = "bench-secret"  # noqa: S105  # the simulator's, not a real one
RATE = 5.0


def simulator_document(accounts: int) -> dict[str, Any]:
    names = [f"sub{i:03d}" for i in range(accounts)]
    return {
        "keys": [{"api_key": API_KEY, "api_secret": SECRET, "accounts": names}],
        "accounts": [{"name": name, "balances": {"USD": {"amount": "100.00"},
                                                 "BTC": {"amount": "1.5"}},
                      "staking": {"ETH": {"balance": "32"}}} for name in names],
    }


def _key(**extra: Any) -> dict[str, Any]:
    return {"name": "bench", "api_key": API_KEY, "api_secret": SECRET,
            "requests_per_second": RATE, **extra}


def balances_document(accounts: int, base_url: str, interval: float = 10.0) -> dict[str, Any]:
    return {"gemini": {"base_url": base_url}, "keys": [_key()],
            "accounts": [{"key": "bench", "account": f"sub{i:03d}", "interval_seconds": interval}
                         for i in range(accounts)]}


def mixed_document(accounts: int, base_url: str) -> dict[str, Any]:
    del accounts  # all of them come from the listing
    return {"gemini": {"base_url": base_url},
            "notional": {"currency": "USD", "interval_seconds": 8},
            "transfers": {"interval_seconds": 8},
            "keys": [_key(discover={"refresh_seconds": 30, "defaults": {
                "interval_seconds": 4, "staking_interval_seconds": 12}})]}


def every_endpoint_polled(snapshots: tuple[AccountSnapshot, ...], accounts: int) -> bool:
    return len(snapshots) == accounts and all(
        snapshot.stream(stream).last_success_seconds is not None
        for snapshot in snapshots for stream, _ in snapshot.target.streams())


def worst_age_ratio(snapshots: tuple[AccountSnapshot, ...], now: float) -> float:
    """The largest data age of any account's stream, over that stream's planned interval."""
    ratios = [0.0]
    for snapshot in snapshots:
        for stream, interval in snapshot.target.streams():
            success = snapshot.stream(stream).last_success_seconds
            if success is not None:
                ratios.append((now - success) / interval)
    return max(ratios)


async def run(workload: str, accounts: int, seconds: float) -> dict[str, float]:
    simulator = await start_simulator(SimState.from_document(simulator_document(accounts)))
    document = (mixed_document if workload == "mixed" else balances_document)(
        accounts, simulator.url)
    service = Service(build_config(document, {}), None,
                      WebOptions(listen_address=ListenAddress("127.0.0.1", 0)))
    key = simulator.state.keys[API_KEY]
    try:
        await service.start()
        while not every_endpoint_polled(  # noqa: ASYNC110  # the store has no event to wait on
                service.store.account_snapshots(), accounts):
            await asyncio.sleep(0.05)
        # Measure from here: every account has data, the schedule is in its steady state.
        requests_before = key.counters.get("requests", 0)
        started = time.monotonic()
        worst = 0.0
        while time.monotonic() - started < seconds:
            worst = max(worst, worst_age_ratio(service.store.account_snapshots(), time.time()))
            await asyncio.sleep(0.2)
        elapsed = time.monotonic() - started
        sent = key.counters.get("requests", 0) - requests_before
        snapshot = service.store.account_snapshots()[0]
        intervals = {stream.value: interval for stream, interval in snapshot.target.streams()}
        refused = sum(account.transfers_spacing.refused
                      for account in simulator.state.accounts.values())
    finally:
        await service.stop()
        await simulator.close()
    return {
        "accounts": accounts,
        "seconds": elapsed,
        "requests": sent,
        "budget_used": sent / (RATE * elapsed),
        "rate_limited": key.counters.get("rate_limited", 0) + refused,
        "invalid_nonce": key.counters.get("invalid_nonce", 0),
        "worst_data_age_ratio": worst,
        **{f"interval_{name}_s": intervals.get(name, 0.0)
           for name in ("balances", "notional", "staking", "transfers")},
    }


def measure(quick: bool) -> dict[str, dict[str, float]]:
    return {
        "balances": asyncio.run(run("balances", 50, 12.0 if quick else 60.0)),
        "mixed": asyncio.run(run("mixed", 20, 12.0 if quick else 90.0)),
    }
