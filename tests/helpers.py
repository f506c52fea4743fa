"""Helpers the test modules share: the simulator's and the exporter's test configs, a fixed store
state, free ports, waiting for conditions, and reading /metrics. Fixtures live in conftest.py."""

import asyncio
import heapq
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from balance_exporter.config import load_config
from balance_exporter.gemini.replies import (
    AllowListReply,
    ApprovedAddress,
    BalanceReply,
    CurrencyBalance,
    NotionalBalance,
    ParsedReply,
    StakingBalance,
    Transfer,
)
from balance_exporter.metrics import build_registry
from balance_exporter.server import ListenAddress, WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator
from balance_exporter.store import BalanceStore
from balance_exporter.targets import AccountTarget, AllowList, Endpoint, ListedAccount
from balance_exporter.transfers import TransfersQuery

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


def fixed_store() -> BalanceStore:
    store = BalanceStore()
    store.configure([
        AccountTarget("treasury-primary", "treasury", "primary", True, 30.0,
                      min_available=(("BTC", 1.0), ("USD", 10000.0)),
                      max_available_drop_ratio=0.5, notional_currency="USD",
                      notional_interval_seconds=60.0, staking_interval_seconds=300.0,
                      min_available_notional=250000.0, display_name="Primary",
                      allow_list_networks=("bitcoin", "ethereum"),
                      allow_list_interval_seconds=900.0, transfers_interval_seconds=60.0,
                      transfers_lookback_seconds=604800.0,
                      max_withdrawal_pending_seconds=3600.0,
                      max_withdrawn_per_hour=(("BTC", 2.0), ("USD", 50000.0))),
        AccountTarget("savings", "savings", None, False, 60.0),
        AccountTarget("never-polled", "treasury", "other", False, 30.0,
                      notional_currency="USD", notional_interval_seconds=300.0,
                      display_name="Other desk", discovered=True),
    ], ["treasury", "savings"], discovering={"treasury": 900.0}, streaming=["savings"])
    store.record_worker_running("treasury", True)
    store.record_worker_running("savings", True)
    store.record_request("treasury")
    store.record_listing("treasury", (
        ListedAccount("primary", "Primary", "exchange", "open"),
        ListedAccount("other", "Other desk", "exchange", "open"),
        ListedAccount("vault", "Vault", "custody", "open"),
        ListedAccount("gone", "Gone", "exchange", "closed"),
    ), False, 1_710_547_190.0)
    store.record_discovered_polled("treasury", 1, 0)
    store.record_listing_failure("treasury", "Timeout")
    store.record_request("treasury")
    store.record_reply("treasury-primary", Endpoint.NOTIONAL, ParsedReply((
        NotionalBalance("BTC", 325000.0, 292500.0, 292500.0),
        NotionalBalance("USD", 15000.0, 5000.0, 5000.0),
    ), 1_710_547_205_000_000_000), 0.25, 1_710_547_205.0)
    store.record_request("treasury")
    store.record_reply("treasury-primary", Endpoint.STAKING, ParsedReply((
        StakingBalance("ETH", 32.5, 32.0, 30.0, (
            ("5d3c9a0e-8f0b-4c8e-9a52-0e6f1f6d2a11", 20.5),
            ("9b1f3e2a-1c4d-4e7f-8a9b-2c3d4e5f6a7b", 12.0))),
    ), 1_710_547_206_000_000_000, None, 1), 0.375, 1_710_547_206.0)
    store.record_request("treasury")
    store.record_failure("treasury-primary", Endpoint.STAKING, "System", 0.5)
    store.record_request("treasury")
    store.record_reply("treasury-primary", Endpoint.BALANCES, BalanceReply((
        CurrencyBalance("BTC", 5.0, 4.5, 4.5, 0.25, 0.0),
        CurrencyBalance("USD", 15000.0, 5000.0, 5000.0, 0.0, 1250.5),
    ), 1_710_547_200_000_000_000, "exchange"), 0.125, 1_710_547_201.5)
    store.record_request("treasury")
    store.record_reply("treasury-primary", Endpoint.BALANCES, BalanceReply((
        CurrencyBalance("BTC", 999.0, 999.0, 999.0, 0.0, 0.0),), 1_710_547_100_000_000_000, None),
        0.25, 1_710_547_230.0)
    store.record_request("savings")
    store.record_reply("savings", Endpoint.BALANCES, BalanceReply((
        CurrencyBalance("USD", 1_000_000.0, 1_000_000.0, 1_000_000.0, 0.0, 0.0),), None, None),
        0.5, 1_710_547_202.0)
    store.record_request("savings")
    store.record_failure("savings", Endpoint.BALANCES, "System", 1.5)
    store.record_request("savings")
    store.record_rate_limited("savings")
    store.record_failure("savings", Endpoint.BALANCES, "RateLimit", 0.75)
    cold = ApprovedAddress("account", "active", "bc1qcold", "Cold storage", 1_700_000_000_000)
    store.record_allow_list("treasury-primary", AllowList("bitcoin"), AllowListReply((
        cold, ApprovedAddress("group", "active", "bc1qgroup", "Group desk", 1_700_000_100_000),
    )), 0.25, 1_710_547_210.0)
    store.record_allow_list("treasury-primary", AllowList("bitcoin"), AllowListReply((
        cold, ApprovedAddress("account", "pending_time", "bc1qnew", "", 1_710_547_000_000),
    )), 0.25, 1_710_548_110.0)
    store.record_allow_list_failure("treasury-primary", AllowList("ethereum"), "Timeout", 10.0)
    baseline = TransfersQuery(1_709_942_400_000, baseline=True)
    store.record_transfers("treasury-primary", baseline, (
        Transfer(1, "deposit", "Complete", 1_710_000_000_000, "USD", Decimal("100.00")),),
        0.25, 1_710_547_211.0)
    store.record_transfers("treasury-primary", TransfersQuery(1_709_999_999_999), (
        Transfer(3, "withdrawal", "Pending", 1_710_547_100_000, "BTC", Decimal("0.5"),
                 "bitcoin", "bc1qdest", "ab12"),
        Transfer(2, "deposit", "Complete", 1_710_547_000_000, "USD", Decimal("2500.50")),
    ), 0.25, 1_710_547_271.0)
    store.record_transfers_failure("treasury-primary", "RateLimit", 0.1)
    store.record_poll_lag("treasury", 0.125)
    store.record_stream_up("savings", True, connected=True)
    store.record_stream_frame("savings", 1_710_547_203.5, triggered=True)
    store.record_stream_frame("savings", 1_710_547_203.75, triggered=False)
    store.record_stream_error("savings", "malformed_frame")
    store.record_account_update("savings", 1_710_547_203_000_000_000)
    store.record_account_update("savings", 1_710_547_100_000_000_000)  # older: no effect
    return store


def reference_body(store: BalanceStore, openmetrics: bool = False) -> bytes:
    """The store's /metrics body as prometheus_client's generic path renders it (no process
    metrics): the oracle of the fast path."""
    registry = build_registry(store, process_metrics=False)
    if openmetrics:
        body: bytes = generate_openmetrics(registry)  # type: ignore[no-untyped-call]
        return body
    return generate_latest(registry)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: Callable[[], Any], what: str, limit_seconds: float = 90.0) -> Any:
    """Poll until the condition gives something truthy; the limit only guards against hangs."""
    deadline = time.monotonic() + limit_seconds
    while True:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit_seconds}s waiting for {what}")
        time.sleep(0.25)


def http_json(url: str, body: object | None = None, method: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310  # loopback
    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
        return json.loads(response.read())


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  # loopback
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, limit_seconds: float = 15.0
) -> None:
    """Poll a condition until it holds; the generous limit guards against hangs only."""
    deadline = time.monotonic() + limit_seconds
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class VirtualClock:
    """A clock whose time moves only when `run_for` moves it: to the next sleeper's wake time,
    once every task has done what it can at this time. Several workers can share it (a
    stepping fake clock that jumps at every sleep cannot stand for more than one)."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._count = 0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:
        waiting = asyncio.get_running_loop().create_future()
        self._count += 1
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), self._count, waiting))
        await waiting

    async def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            for _ in range(50):  # every task does what it can at this time
                await asyncio.sleep(0)
            while self._sleepers and self._sleepers[0][2].cancelled():
                heapq.heappop(self._sleepers)
            if not self._sleepers or self._sleepers[0][0] > end:
                break
            wake, _, waiting = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            waiting.set_result(None)
        self.now = end


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


async def scrape_until(http: aiohttp.ClientSession, base_url: str, what: str,
                       holds: Callable[[Samples], object], limit_seconds: float = 15.0,
                       ) -> Samples:
    """Scrape `base_url` until what it serves satisfies `holds`; the last scrape."""
    samples: Samples = {}

    async def check() -> bool:
        nonlocal samples
        samples = await scrape(http, base_url)
        return bool(holds(samples))

    await wait_until(check, what, limit_seconds)
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# What Prometheus sends when it prefers OpenMetrics.
OPENMETRICS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


async def sim_state(http: aiohttp.ClientSession, simulator: RunningSimulator) -> Any:
    async with http.get(f"{simulator.url}/_sim/state") as response:
        return await response.json()


async def sim_call(http: aiohttp.ClientSession, method: str, url: str, body: object) -> None:
    async with http.request(method, url, json=body) as response:
        assert response.status == 200, await response.text()


async def add_fault(http: aiohttp.ClientSession, simulator: RunningSimulator, account: str,
                    fault: dict[str, object]) -> None:
    await sim_call(http, "POST", f"{simulator.url}/_sim/accounts/{account}/faults", fault)


async def all_polled(http: aiohttp.ClientSession, exporter: Service) -> Samples:
    samples: Samples = {}

    async def ready() -> bool:
        nonlocal samples
        samples = await scrape(http, exporter.url)
        return all(sample(samples, "gemini_account_up", account=name) == 1
                   for name in ("alpha", "beta", "gamma", "delta"))

    await wait_until(ready, what="every account up")
    return samples


PROVIDER_A = "5d3c9a0e-8f0b-4c8e-9a52-0e6f1f6d2a11"
PROVIDER_B = "9b1f3e2a-1c4d-4e7f-8a9b-2c3d4e5f6a7b"


def treasury_simulator_document() -> dict[str, Any]:
    """A group with every kind of account discovery meets, and staking in two shapes."""
    return {
        "keys": [
            {"api_key": MASTER_KEY, "api_secret": MASTER_SECRET,
             "accounts": ["alpha", "beta", "vault", "old", "test-1"]},
            {"api_key": ACCOUNT_KEY, "api_secret": ACCOUNT_SECRET, "accounts": ["delta"]},
        ],
        "accounts": [
            {"name": "alpha", "display_name": "Alpha desk", "balances": {
                "BTC": {"amount": "5.123456789123", "available": "4.5"},
                "USD": {"amount": "15000.129"}},
             "staking": {"ETH": {"balance": "32.5", "available": "32", "availableForWithdrawal":
                                 "30", "providers": {PROVIDER_A: "20.5", PROVIDER_B: "12"}}}},
            {"name": "beta", "timestamp_format": "iso", "number_format": "number",
             "provider_format": "object",
             "balances": {"ETH": {"amount": "10.5"}, "SOL": {"amount": "3.333"}},
             "staking": {"SOL": {"balance": "100.25", "providers": {PROVIDER_A: "100.25"}}}},
            {"name": "vault", "type": "custody"},
            {"name": "old", "status": "closed", "balances": {"USD": {"amount": "1"}}},
            {"name": "test-1", "balances": {"USD": {"amount": "7"}}},
            {"name": "delta", "balances": {"BTC": {"amount": "1"}}},
        ],
    }


def treasury_exporter_document(base_url: str) -> dict[str, Any]:
    return {
        "gemini": {"base_url": base_url, "timeout_seconds": 2},
        "notional": {"currency": "USD", "interval_seconds": 1},
        "keys": [
            {"name": "treasury", "api_key": MASTER_KEY, "api_secret": MASTER_SECRET,
             "requests_per_second": 10,
             "discover": {"exclude": ["test-*"], "refresh_seconds": 1,
                          "defaults": {"interval_seconds": 1, "staking_interval_seconds": 1,
                                       "min_available_notional": 1000}}},
            {"name": "solo", "api_key": ACCOUNT_KEY, "api_secret": ACCOUNT_SECRET,
             "requests_per_second": 5},
        ],
        "accounts": [{"key": "solo", "name": "delta", "interval_seconds": 1}],
        "polling": {"max_backoff_seconds": 2, "rejected_retry_seconds": 2},
    }


def notional_value(amount: str, usd_price: str) -> float:
    """What the exporter shows for an amount at a price: the product floored to cents."""
    return float((Decimal(amount) * Decimal(usd_price)).quantize(Decimal("0.01"), ROUND_FLOOR))


def write_config(path: Path, document: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(document))


@asynccontextmanager
async def running_exporter(config_path: Path,
                           storage: Path | None = None) -> AsyncIterator[Service]:
    """The exporter of a config file on a free loopback port, stopped on the way out."""
    service = Service(load_config(config_path), config_path,
                      WebOptions(listen_address=ListenAddress("127.0.0.1", 0)),
                      storage_path=storage)
    await service.start()
    try:
        yield service
    finally:
        await service.stop()
