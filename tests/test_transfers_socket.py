"""Money movements (/v2/transfers) against the simulator over real sockets: exact counts and
amounts over overlapping pages, a burst that makes a gap, pending transfers settled or
cancelled, a restart with --storage.path that neither loses nor doubles one, and never two
requests for one account within Gemini's 5 s."""

import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from balance_exporter.cli import config_summary
from balance_exporter.config import build_config, load_config
from balance_exporter.demo import demo_exporter_document
from balance_exporter.gemini.replies import Transfer
from balance_exporter.scheduler import MAX_AUDIT_LINES, _log_transfers
from balance_exporter.server import WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState, demo_document
from balance_exporter.transfers import PageOutcome, TransfersQuery
from tests.conftest import LOOPBACK_ANY_PORT
from tests.helpers import (
    Samples,
    running_exporter,
    sample,
    scrape,
    scrape_until,
    sim_state,
    treasury_exporter_document,
    treasury_simulator_document,
    write_config,
)

HOUR_MS = 3_600_000


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
async def group() -> AsyncIterator[RunningSimulator]:
    document = treasury_simulator_document()
    alpha = next(account for account in document["accounts"] if account["name"] == "alpha")
    alpha["transfers"] = [
        # Settled before the start: the baseline, never counted.
        {"type": "Deposit", "currency": "USD", "amount": "1000",
         "timestamp_ms": now_ms() - HOUR_MS},
        # Pending since before the start: counted at the first poll, and timed.
        {"type": "Withdrawal", "status": "Pending", "currency": "BTC", "amount": "0.5",
         "timestamp_ms": now_ms() - HOUR_MS, "network": "bitcoin", "destination": "bc1qdest"},
        # Older than the look-back: never seen.
        {"type": "Withdrawal", "status": "Pending", "currency": "BTC", "amount": "9",
         "timestamp_ms": now_ms() - 30 * 24 * HOUR_MS},
    ]
    running = await start_simulator(SimState.from_document(document))
    yield running
    await running.close()


def transfers_document(base_url: str) -> dict[str, Any]:
    document = treasury_exporter_document(base_url)
    document["transfers"] = {"interval_seconds": 5, "lookback_seconds": 7 * 86400}
    document["keys"][0]["discover"]["defaults"].update(
        transfers_interval_seconds=5, max_withdrawal_pending_seconds=600,
        max_withdrawn_per_hour={"BTC": 2})
    document["accounts"][0]["transfers_interval_seconds"] = 0
    return document


@pytest.fixture
def config_path(group: RunningSimulator, tmp_path: Path) -> Path:
    path = tmp_path / "exporter.yml"
    write_config(path, transfers_document(group.url))
    return path


@pytest.fixture
async def exporter(config_path: Path) -> AsyncIterator[Service]:
    async with running_exporter(config_path) as service:
        yield service


def of(samples: Samples, name: str, currency: str, kind: str,
       account: str = "alpha") -> float | None:
    return sample(samples, name, account=account, currency=currency, type=kind)


def counted(samples: Samples, currency: str, kind: str) -> tuple[float | None, float | None]:
    return (of(samples, "gemini_transfers_total", currency, kind),
            of(samples, "gemini_transferred_amount_total", currency, kind))


async def add_transfer(http: aiohttp.ClientSession, simulator: RunningSimulator,
                       **fields: Any) -> int:
    async with http.post(f"{simulator.url}/_sim/accounts/alpha/transfers",
                         json=fields) as response:
        assert response.status == 200, await response.text()
        return int((await response.json())["eid"])


async def set_status(http: aiohttp.ClientSession, simulator: RunningSimulator, eid: int,
                     status: str) -> None:
    async with http.patch(f"{simulator.url}/_sim/accounts/alpha/transfers/{eid}",
                          json={"status": status}) as response:
        assert response.status == 200, await response.text()


async def refused(http: aiohttp.ClientSession, simulator: RunningSimulator) -> int:
    """The simulator's 429s for the 5 s rule, over every account."""
    state = await sim_state(http, simulator)
    return sum(account["transfers_refused"] for account in state["accounts"].values())


def up(samples: Samples, account: str = "alpha") -> bool:
    return sample(samples, "gemini_transfers_up", account=account) == 1


async def test_the_first_poll_counts_what_is_pending_and_then_every_transfer_once(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service,
) -> None:
    samples = await scrape_until(http, exporter.url, "the first poll", up)
    assert counted(samples, "BTC", "withdrawal") == (1, 0.5)
    assert counted(samples, "USD", "deposit") == (None, None)  # the baseline
    assert of(samples, "gemini_transfers_pending", "BTC", "withdrawal") == 1
    assert of(samples, "gemini_transfer_oldest_pending_timestamp_seconds", "BTC",
              "withdrawal") == pytest.approx(time.time() - 3600, abs=60)
    assert sample(samples, "gemini_account_max_withdrawal_pending_seconds", account="alpha") == 600
    assert sample(samples, "gemini_account_max_withdrawn_per_hour", account="alpha",
                  currency="BTC") == 2
    # Two in one millisecond, on either side of a poll, and a reward.
    moment = now_ms()
    await add_transfer(http, group, type="Deposit", currency="USD", amount="10.005",
                       timestamp_ms=moment)
    await scrape_until(http, exporter.url, "the first deposit",
                       lambda s: counted(s, "USD", "deposit")[0] == 1, limit_seconds=20)
    await add_transfer(http, group, type="Deposit", currency="USD", amount="20",
                       timestamp_ms=moment)
    await add_transfer(http, group, type="Reward", currency="ETH", amount="0.000000000000000001")
    samples = await scrape_until(http, exporter.url, "the second deposit and the reward",
                                 lambda s: counted(s, "USD", "deposit")[0] == 2
                                 and counted(s, "ETH", "reward")[0] == 1, limit_seconds=20)
    # Floored to cents: 10.005 counts 10.00.
    assert counted(samples, "USD", "deposit") == (2, 30.0)
    assert counted(samples, "ETH", "reward") == (1, 1e-18)
    polled = sample(samples, "gemini_transfers_last_success_timestamp_seconds",
                    account="alpha") or 0
    samples = await scrape_until(http, exporter.url, "more polls", lambda s: (sample(
        s, "gemini_transfers_last_success_timestamp_seconds", account="alpha") or 0) > polled + 6,
        limit_seconds=30)
    assert counted(samples, "USD", "deposit") == (2, 30.0)
    assert counted(samples, "BTC", "withdrawal") == (1, 0.5)
    assert await refused(http, group) == 0


async def test_a_pending_withdrawal_is_settled_or_gone_and_counted_once(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service,
) -> None:
    await scrape_until(http, exporter.url, "the first poll", up)
    with structlog.testing.capture_logs() as logs:
        completing = await add_transfer(http, group, type="Withdrawal", status="Pending",
                                        currency="ETH", amount="3")
        cancelled = await add_transfer(http, group, type="Withdrawal", status="Pending",
                                       currency="ETH", amount="4")
        samples = await scrape_until(http, exporter.url, "both withdrawals pending",
                                     lambda s: of(s, "gemini_transfers_pending", "ETH",
                                                  "withdrawal") == 2, limit_seconds=20)
        assert counted(samples, "ETH", "withdrawal") == (2, 7.0)
        assert of(samples, "gemini_transfers_pending_amount", "ETH", "withdrawal") == 7.0
        await set_status(http, group, completing, "Complete")
        await set_status(http, group, cancelled, "Cancelled")
        samples = await scrape_until(http, exporter.url, "neither pending",
                                     lambda s: of(s, "gemini_transfers_pending", "ETH",
                                                  "withdrawal") == 0, limit_seconds=40)
    assert counted(samples, "ETH", "withdrawal") == (2, 7.0)
    assert of(samples, "gemini_transfer_oldest_pending_timestamp_seconds", "ETH",
              "withdrawal") is None
    events = {(entry["event"], entry.get("eid")) for entry in logs}
    assert ("pending transfer settled", completing) in events
    assert ("pending transfer no longer listed (cancelled or returned)", cancelled) in events
    withdrawals = [entry for entry in logs if entry["event"] == "transfer"]
    assert {entry["eid"] for entry in withdrawals} == {completing, cancelled}
    assert {entry["log_level"] for entry in withdrawals} == {"warning"}
    assert await refused(http, group) == 0


async def test_a_burst_past_a_page_is_a_gap_and_the_next_poll_comes_sooner(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service,
) -> None:
    await scrape_until(http, exporter.url, "the first poll", up)
    moment = now_ms()
    for index in range(60):
        await add_transfer(http, group, type="Deposit", currency="GUSD", amount="1",
                           timestamp_ms=moment + index)
    with structlog.testing.capture_logs() as logs:
        samples = await scrape_until(http, exporter.url, "the gap", lambda s: sample(
            s, "gemini_transfers_gaps_total", account="alpha") == 1, limit_seconds=20)
    # The 50 newest were counted; the 10 before them were not on any page.
    assert counted(samples, "GUSD", "deposit") == (50, 50.0)
    assert any(entry["event"].startswith("transfers page full") for entry in logs)
    assert await refused(http, group) == 0


async def test_a_restart_with_storage_neither_loses_nor_doubles_a_transfer(
    http: aiohttp.ClientSession, group: RunningSimulator, config_path: Path, tmp_path: Path,
) -> None:
    storage = tmp_path / "state"
    async with running_exporter(config_path, storage) as service:
        await scrape_until(http, service.url, "the first poll", up)
        await add_transfer(http, group, type="Deposit", currency="USD", amount="5")
        await scrape_until(http, service.url, "the deposit",
                           lambda s: counted(s, "USD", "deposit")[0] == 1, limit_seconds=20)
    await add_transfer(http, group, type="Withdrawal", currency="BTC", amount="1.25")
    async with running_exporter(config_path, storage) as service:
        samples = await scrape_until(
            http, service.url, "the withdrawal made while stopped",
            lambda s: counted(s, "BTC", "withdrawal")[0] == 1, limit_seconds=20)
        polled = sample(samples, "gemini_transfers_last_success_timestamp_seconds",
                        account="alpha") or 0
        samples = await scrape_until(http, service.url, "more polls", lambda s: (sample(
            s, "gemini_transfers_last_success_timestamp_seconds", account="alpha") or 0)
            > polled + 6, limit_seconds=30)
    # Counted after the restart: the withdrawal made meanwhile, not the deposit before it, and
    # the pending one from before the start stays pending without counting again.
    assert counted(samples, "BTC", "withdrawal") == (1, 1.25)
    assert counted(samples, "USD", "deposit") == (None, None)
    assert of(samples, "gemini_transfers_pending", "BTC", "withdrawal") == 1


async def test_reloads_never_send_two_requests_for_one_account_within_5_s(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service, config_path: Path,
) -> None:
    await scrape_until(http, exporter.url, "the first poll", up)
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline:
        assert await exporter.reload()
        await scrape(http, exporter.url)
    samples = await scrape(http, exporter.url)
    assert await refused(http, group) == 0
    assert sample(samples, "gemini_transfers_poll_errors_total", account="alpha",
                  reason="RateLimit") is None


async def test_the_demo_shows_a_withdrawal_pending_past_its_threshold(
    http: aiohttp.ClientSession,
) -> None:
    simulator = await start_simulator(SimState.from_document(demo_document()))
    try:
        document = demo_exporter_document(simulator.state, simulator.url)
        document["keys"][0]["discover"]["defaults"]["transfers_interval_seconds"] = 5
        service = Service(build_config(document, {}), None,
                          WebOptions(listen_address=LOOPBACK_ANY_PORT))
        await service.start()
        try:
            samples = await scrape_until(http, service.url, "the trading desk's transfers",
                                         lambda s: up(s, "trading"), limit_seconds=30)
            page = await (await http.get(service.url + "/")).text()
        finally:
            await service.stop()
    finally:
        await simulator.close()
    assert of(samples, "gemini_transfers_pending", "BTC", "withdrawal", "trading") == 1
    assert of(samples, "gemini_transfers_pending", "USD", "deposit", "trading") == 1
    # The deposit of yesterday is the baseline; the pending ones count.
    assert counted(samples, "USD", "deposit") == (None, None)
    assert of(samples, "gemini_transfers_total", "USD", "deposit", "trading") == 1
    assert '<span class="warning">&#9888; 1 (0.25 BTC), oldest 2h 0m</span>' in page


def test_config_check_says_how_often_transfers_are_read() -> None:
    path = Path(__file__).parent / "testdata" / "config" / "good" / "transfers_at_the_bounds.yml"
    summary = config_summary(load_config(path, environ={}))
    assert "Transfers every 5s unless an account says otherwise" in summary
    assert "looks back 2592000s" in summary
    primary, quiet = (line for line in summary.splitlines()
                      if line.startswith(("  primary:", "  quiet:")))
    assert "transfers every 5s" in primary
    assert "transfers" not in quiet


@pytest.mark.parametrize("new", [MAX_AUDIT_LINES, MAX_AUDIT_LINES + 1])
def test_the_transfer_lines_of_one_page_are_bounded_and_the_rest_counted(new: int) -> None:
    transfers = tuple(Transfer(eid, "deposit", "Complete", 1, "USD", Decimal(1))
                      for eid in range(new))
    with structlog.testing.capture_logs() as logs:
        _log_transfers(PageOutcome(new=transfers), TransfersQuery(0), new, {"account": "a"})
    assert sum(entry["event"] == "transfer" for entry in logs) == min(new, MAX_AUDIT_LINES)
    assert [entry["not_logged"] for entry in logs
            if entry["event"].startswith("transfers past")] == (
        [new - MAX_AUDIT_LINES] if new > MAX_AUDIT_LINES else [])
