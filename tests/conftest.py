"""Fixtures that run the real parts on real sockets: the simulator and the exporter service."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from balance_exporter.config import build_config
from balance_exporter.service import Service, WebOptions
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState

MASTER_KEY = "master-testkey"
MASTER_SECRET = "TOPSECRET-master"
ACCOUNT_KEY = "account-testkey"
ACCOUNT_SECRET = "TOPSECRET-account"


def simulator_document() -> dict[str, Any]:
    return {
        "keys": [
            {"api_key": MASTER_KEY, "api_secret": MASTER_SECRET,
             "accounts": ["alpha", "beta", "gamma"]},
            {"api_key": ACCOUNT_KEY, "api_secret": ACCOUNT_SECRET, "accounts": ["delta"]},
        ],
        "accounts": [
            {"name": "alpha", "balances": {
                "BTC": {"amount": "5.123456789123", "available": "4.5",
                        "availableForWithdrawal": "4.25", "pendingWithdrawal": "0.5"},
                "USD": {"amount": "15000.129", "available": "5000.00"},
            }},
            {"name": "beta", "timestamp_format": "iso", "number_format": "number",
             "balances": {"ETH": {"amount": "10.5"}, "USD": {"amount": "-12.5"}}},
            {"name": "gamma", "balances": {"USD": {"amount": "42.00"}}},
            {"name": "delta", "timestamp_format": "none", "balances": {"BTC": {"amount": "1"}}},
        ],
    }


def exporter_document(base_url: str, interval: float = 1.0) -> dict[str, Any]:
    return {
        "gemini": {"base_url": base_url, "timeout_seconds": 2},
        "keys": [
            {"name": "treasury", "api_key": MASTER_KEY, "api_secret": MASTER_SECRET,
             "requests_per_second": 5},
            {"name": "solo", "api_key": ACCOUNT_KEY, "api_secret": ACCOUNT_SECRET,
             "requests_per_second": 5},
        ],
        "accounts": [
            {"key": "treasury", "account": "alpha", "show_pending_balances": True,
             "interval_seconds": interval},
            {"key": "treasury", "account": "beta", "interval_seconds": interval},
            {"key": "treasury", "account": "gamma", "interval_seconds": interval},
            {"key": "solo", "name": "delta", "interval_seconds": interval},
        ],
        # Short backoffs keep recovery scenarios quick.
        "polling": {"max_backoff_seconds": 2, "rejected_retry_seconds": 2},
    }


# The precision the test config gets by default, per currency.
PLACES = {"USD": 2, "BTC": 8, "ETH": 18}


def floored(value: str, currency: str) -> float:
    """What the exporter should show for a simulator amount: floored, computed independently."""
    quantum = Decimal(1).scaleb(-PLACES.get(currency, 8))
    return float(Decimal(value).quantize(quantum, rounding=ROUND_FLOOR))


@pytest.fixture
async def simulator() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimState.from_document(simulator_document()))
    yield running
    await running.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def exporter(simulator: RunningSimulator) -> AsyncIterator[Service]:
    config = build_config(exporter_document(simulator.url), {})
    service = Service(config, None, WebOptions(listen_address="127.0.0.1:0"))
    await service.start()
    yield service
    await service.stop()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, limit_seconds: float = 15.0
) -> None:
    """Poll a condition until it holds; the generous limit guards against hangs only."""
    deadline = time.monotonic() + limit_seconds
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, base_url: str, path: str = "/metrics") -> Samples:
    async with http.get(base_url + path) as response:
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))
