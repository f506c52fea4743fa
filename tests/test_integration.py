"""The exporter against the simulator over real sockets: what a user sees on /metrics."""

import asyncio
from pathlib import Path

import aiohttp
import yaml

from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator
from tests.helpers import (
    MASTER_KEY,
    add_fault,
    all_polled,
    exporter_document,
    floored,
    sample,
    scrape,
    sim_call,
    sim_state,
    wait_until,
)

FIELDS = {"amount": "gemini_balance_amount", "available": "gemini_balance_available",
          "availableForWithdrawal": "gemini_balance_available_for_withdrawal"}
PENDING = {"pendingWithdrawal": "gemini_balance_pending_withdrawal",
           "pendingDeposit": "gemini_balance_pending_deposit"}


async def test_metrics_equal_the_simulator_balances(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service
) -> None:
    samples = await all_polled(http, exporter)
    state = await sim_state(http, simulator)
    pending_accounts = {"alpha"}
    checked = 0
    for account, described in state["accounts"].items():
        for currency, values in described["balances"].items():
            fields = FIELDS | (PENDING if account in pending_accounts else {})
            for field, metric in fields.items():
                assert sample(samples, metric, account=account, currency=currency) == floored(
                    values[field], currency), (account, currency, field)
                checked += 1
            if account not in pending_accounts:
                assert sample(samples, "gemini_balance_pending_deposit",
                              account=account, currency=currency) is None
    assert checked == 22
    # Flooring is visible: 5.123456789123 BTC becomes 5.12345678, 15000.129 USD 15000.12.
    assert sample(samples, "gemini_balance_amount", account="alpha", currency="BTC") == 5.12345678
    assert sample(samples, "gemini_balance_amount", account="alpha", currency="USD") == 15000.12


async def test_both_timestamp_forms_and_none_are_handled(
    http: aiohttp.ClientSession, exporter: Service
) -> None:
    samples = await all_polled(http, exporter)
    for account in ("alpha", "beta"):  # integer ns and ISO-8601
        server = sample(samples, "gemini_account_server_timestamp_seconds", account=account)
        assert server is not None
        assert server > 1.7e9
    assert sample(samples, "gemini_account_server_timestamp_seconds", account="delta") is None
    unstamped = sample(samples, "gemini_account_unstamped_replies_total", account="delta")
    assert unstamped is not None
    assert unstamped >= 1


async def test_stale_replies_never_show(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service
) -> None:
    await all_polled(http, exporter)
    await add_fault(http, simulator, "alpha", {"kind": "stale", "count": 3})

    async def stale_counted() -> bool:
        samples = await scrape(http, exporter.url)
        # The stale replies carry amounts a million higher: none may ever be exported.
        assert sample(samples, "gemini_balance_amount", account="alpha",
                      currency="BTC") == 5.12345678
        stale = sample(samples, "gemini_account_stale_replies_total", account="alpha")
        return stale is not None and stale >= 3

    await wait_until(stale_counted, what="three stale replies counted")
    samples = await scrape(http, exporter.url)
    assert sample(samples, "gemini_account_up", account="alpha") == 1


async def test_a_vanished_currency_disappears(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service
) -> None:
    await all_polled(http, exporter)
    await sim_call(http, "PUT", f"{simulator.url}/_sim/accounts/alpha/balances",
                   {"USD": {"amount": "7.5"}})

    async def btc_gone() -> bool:
        samples = await scrape(http, exporter.url)
        return sample(samples, "gemini_balance_amount", account="alpha", currency="BTC") is None

    await wait_until(btc_gone, what="BTC to disappear")
    samples = await scrape(http, exporter.url)
    assert sample(samples, "gemini_balance_amount", account="alpha", currency="USD") == 7.5


async def test_auth_error_marks_only_that_account_down(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service
) -> None:
    await all_polled(http, exporter)
    await add_fault(http, simulator, "beta",
                    {"kind": "auth", "status": 403, "reason": "MissingRole"})

    async def beta_down() -> bool:
        samples = await scrape(http, exporter.url)
        return sample(samples, "gemini_account_up", account="beta") == 0

    await wait_until(beta_down, what="beta down")
    samples = await scrape(http, exporter.url)
    errors = sample(samples, "gemini_account_poll_errors_total", account="beta",
                    reason="MissingRole")
    assert errors is not None
    assert errors >= 1
    for other in ("alpha", "gamma", "delta"):
        assert sample(samples, "gemini_account_up", account=other) == 1
    # The last good balances stay while the account is down.
    assert sample(samples, "gemini_balance_amount", account="beta", currency="ETH") == 10.5


async def test_429_storm_pauses_the_key_and_recovers_without_invalid_nonce(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service
) -> None:
    await all_polled(http, exporter)
    await add_fault(http, simulator, "gamma", {"kind": "rate_limit", "count": 3, "retry_after": 1})

    async def recovered() -> bool:
        samples = await scrape(http, exporter.url)
        limited = sample(samples, "gemini_key_rate_limited_total", key="treasury")
        return limited == 3 and sample(samples, "gemini_account_up", account="gamma") == 1

    await wait_until(recovered, what="recovery after three 429s")
    state = await sim_state(http, simulator)
    assert state["keys"][MASTER_KEY].get("invalid_nonce", 0) == 0
    assert state["keys"][MASTER_KEY].get("invalid_signature", 0) == 0
    assert state["accounts"]["gamma"]["faults"] == 0
    samples = await scrape(http, exporter.url)
    assert sample(samples, "gemini_key_rate_limited_total", key="solo") == 0


async def test_transient_faults_keep_balances_and_recover(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service
) -> None:
    await all_polled(http, exporter)
    for fault in ({"kind": "status", "status": 503, "reason": "Maintenance"},
                  {"kind": "html", "status": 502}, {"kind": "garbage"}):
        await add_fault(http, simulator, "gamma", {**fault, "count": 1})

    async def all_counted() -> bool:
        samples = await scrape(http, exporter.url)
        assert sample(samples, "gemini_balance_amount", account="gamma", currency="USD") == 42.0
        reasons = [sample(samples, "gemini_account_poll_errors_total", account="gamma", reason=r)
                   for r in ("Maintenance", "HTTP502", "MalformedReply")]
        return reasons == [1, 1, 1] and sample(
            samples, "gemini_account_up", account="gamma") == 1

    await wait_until(all_counted, what="three transient faults counted and recovery")


async def test_a_reply_slower_than_the_timeout_counts_as_timeout(
    http: aiohttp.ClientSession, simulator: RunningSimulator, exporter: Service
) -> None:
    await all_polled(http, exporter)
    await add_fault(http, simulator, "gamma", {"kind": "latency", "delay_seconds": 3, "count": 1})

    async def timed_out() -> bool:
        samples = await scrape(http, exporter.url)
        return sample(samples, "gemini_account_poll_errors_total", account="gamma",
                      reason="Timeout") == 1

    await wait_until(timed_out, what="a Timeout error for gamma")
    samples = await scrape(http, exporter.url)
    assert sample(samples, "gemini_balance_amount", account="gamma", currency="USD") == 42.0


async def test_overlapping_reloads_leave_one_worker_per_key(
    http: aiohttp.ClientSession, exporter: Service, tmp_path: Path, simulator: RunningSimulator
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(exporter_document(simulator.url)))
    exporter.config_path = path
    results = await asyncio.gather(*(exporter.reload() for _ in range(5)))
    assert results == [True] * 5
    workers = [task for task in asyncio.all_tasks() if task.get_name().startswith("poll-")]
    assert sorted(task.get_name() for task in workers) == ["poll-solo", "poll-treasury"]
    await all_polled(http, exporter)
