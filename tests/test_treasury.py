"""The treasury picture over real sockets: discovery, notional values and staking from the
simulator, in one budget, with the staleness and failure rules of /v1/balances."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
import yaml

from balance_exporter.config import build_config, load_config
from balance_exporter.server import WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState
from balance_exporter.targets import PLANNED_SHARE
from tests.conftest import LOOPBACK_ANY_PORT
from tests.helpers import (
    MASTER_KEY,
    PROVIDER_A,
    PROVIDER_B,
    Samples,
    add_fault,
    notional_value,
    sample,
    scrape,
    scrape_until,
    sim_call,
    sim_state,
    treasury_exporter_document,
    treasury_simulator_document,
    wait_until,
)


@pytest.fixture
async def group() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimState.from_document(treasury_simulator_document()))
    yield running
    await running.close()


@pytest.fixture
async def treasury(group: RunningSimulator) -> AsyncIterator[Service]:
    service = Service(build_config(treasury_exporter_document(group.url), {}), None,
                      WebOptions(listen_address=LOOPBACK_ANY_PORT))
    await service.start()
    yield service
    await service.stop()


def polled_accounts(samples: Samples) -> set[str]:
    return {dict(labels)["account"] for name, labels in samples if name == "gemini_account_up"}


async def everything_polled(http: aiohttp.ClientSession, exporter: Service) -> Samples:
    return await scrape_until(
        http, exporter.url, "alpha and beta polled on every endpoint", lambda s: all(
            sample(s, f"gemini_{endpoint}_up", account=account) == 1
            for account in ("alpha", "beta") for endpoint in ("account", "notional", "staking")))


async def test_discovery_polls_the_open_exchange_accounts_that_match(
    http: aiohttp.ClientSession, treasury: Service
) -> None:
    samples = await everything_polled(http, treasury)
    assert polled_accounts(samples) == {"alpha", "beta", "delta"}
    assert sample(samples, "gemini_account_info", account="alpha", key="treasury",
                  account_type="exchange", display_name="Alpha desk", discovered="1") == 1
    assert sample(samples, "gemini_account_info", account="delta", key="solo",
                  account_type="exchange", display_name="", discovered="0") == 1
    listed = {(dict(labels)["type"], dict(labels)["status"]): value
              for (name, labels), value in samples.items()
              if name == "gemini_key_discovered_accounts"}
    assert listed == {("exchange", "open"): 3, ("custody", "open"): 1,
                      ("exchange", "closed"): 1}
    assert sample(samples, "gemini_key_discovery_polled_accounts", key="treasury") == 2
    assert sample(samples, "gemini_key_discovery_up", key="treasury") == 1
    assert sample(samples, "gemini_key_discovery_listing_full", key="treasury") == 0
    assert sample(samples, "gemini_account_min_available_notional", account="alpha") == 1000


async def test_notional_and_staking_values_are_the_simulators(
    http: aiohttp.ClientSession, treasury: Service, group: RunningSimulator
) -> None:
    samples = await everything_polled(http, treasury)
    prices = {"BTC": "65000", "USD": "1", "ETH": "3200", "SOL": "150"}
    expected = {("alpha", "BTC"): notional_value("5.123456789123", prices["BTC"]),
                ("alpha", "USD"): notional_value("15000.129", "1"),
                ("beta", "ETH"): notional_value("10.5", prices["ETH"]),
                ("beta", "SOL"): notional_value("3.333", prices["SOL"])}
    for (account, currency), value in expected.items():
        assert sample(samples, "gemini_balance_amount_notional", account=account,
                      currency=currency, notional_currency="USD") == value, (account, currency)
    assert sample(samples, "gemini_balance_available_notional", account="alpha",
                  currency="BTC", notional_currency="USD") == notional_value("4.5", "65000")
    assert sample(samples, "gemini_staking_balance", account="alpha", currency="ETH") == 32.5
    assert sample(samples, "gemini_staking_available_for_withdrawal", account="alpha",
                  currency="ETH") == 30
    for account, currency, provider, amount in (("alpha", "ETH", PROVIDER_A, 20.5),
                                                ("alpha", "ETH", PROVIDER_B, 12.0),
                                                ("beta", "SOL", PROVIDER_A, 100.25)):
        assert sample(samples, "gemini_staking_balance_by_provider", account=account,
                      currency=currency, provider=provider) == amount
    # A new price is a new value at the next notional poll.
    await sim_call(http, "PUT", f"{group.url}/_sim/prices", {"BTC": "70000"})
    await scrape_until(http, treasury.url, "the new BTC price", lambda s: sample(
        s, "gemini_balance_amount_notional", account="alpha", currency="BTC",
        notional_currency="USD") == notional_value("5.123456789123", "70000"))


async def test_an_opened_account_is_polled_and_a_closed_one_goes_after_a_good_listing(
    http: aiohttp.ClientSession, treasury: Service, group: RunningSimulator
) -> None:
    await everything_polled(http, treasury)
    await sim_call(http, "POST", f"{group.url}/_sim/accounts", {
        "name": "gamma", "display_name": "Gamma", "balances": {"USD": {"amount": "9.99"}}})
    samples = await scrape_until(http, treasury.url, "gamma polled", lambda s: sample(
        s, "gemini_balance_amount", account="gamma", currency="USD") == 9.99)
    assert sample(samples, "gemini_key_discovery_polled_accounts", key="treasury") == 3
    # The listing fails from now on: beta closes, but until a listing says so it stays.
    await sim_call(http, "POST", f"{group.url}/_sim/keys/{MASTER_KEY}/faults",
                   {"kind": "status", "status": 503, "reason": "Maintenance"})
    await sim_call(http, "PATCH", f"{group.url}/_sim/accounts/beta", {"status": "closed"})
    samples = await scrape_until(http, treasury.url, "beta's polls failing", lambda s: sample(
        s, "gemini_account_up", account="beta") == 0 and (sample(
            s, "gemini_key_discovery_errors_total", key="treasury", reason="Maintenance") or 0)
        >= 2)
    assert sample(samples, "gemini_key_discovery_up", key="treasury") == 0
    assert sample(samples, "gemini_balance_amount", account="beta", currency="ETH") == 10.5
    async with http.delete(f"{group.url}/_sim/faults") as response:
        assert response.status == 200
    samples = await scrape_until(http, treasury.url, "beta gone",
                                 lambda s: "beta" not in polled_accounts(s))
    assert sample(samples, "gemini_balance_amount", account="beta", currency="ETH") is None
    assert sample(samples, "gemini_staking_balance", account="beta", currency="SOL") is None
    assert sample(samples, "gemini_key_discovered_accounts", key="treasury", type="exchange",
                  status="closed") == 2


async def test_notional_and_staking_keep_values_through_stale_and_failed_replies(
    http: aiohttp.ClientSession, treasury: Service, group: RunningSimulator
) -> None:
    await everything_polled(http, treasury)
    await add_fault(http, group, "alpha", {"kind": "stale", "endpoint": "notional", "count": 2})
    await add_fault(http, group, "beta", {"kind": "garbage", "endpoint": "staking", "count": 2})
    what = "a stale notional and a garbled staking reply"
    samples = await scrape_until(http, treasury.url, what, lambda s: (
        (sample(s, "gemini_notional_stale_replies_total", account="alpha") or 0) >= 1
        and (sample(s, "gemini_staking_poll_errors_total", account="beta",
                    reason="MalformedReply") or 0) >= 1))
    # The stale reply carried distorted numbers: none of them got in.
    assert sample(samples, "gemini_balance_amount_notional", account="alpha", currency="USD",
                  notional_currency="USD") == notional_value("15000.129", "1")
    assert sample(samples, "gemini_staking_balance", account="beta", currency="SOL") == 100.25
    assert sample(samples, "gemini_account_stale_replies_total", account="alpha") == 0
    assert sample(samples, "gemini_account_poll_errors_total", account="beta",
                  reason="MalformedReply") is None


async def test_every_request_shares_the_keys_budget_and_nonces(
    http: aiohttp.ClientSession, treasury: Service, group: RunningSimulator
) -> None:
    samples = await everything_polled(http, treasury)
    # Two accounts on three endpoints at 1 s plus the listing at 1 s are 7 a second of a
    # budget of 10: nothing stretched yet. Ten more accounts are 37 a second (and the key's
    # roles, once an hour), against the 97 % of the budget the plan fills: stretched
    # 37 / 9.7 times.
    assert sample(samples, "gemini_account_poll_interval_seconds", account="alpha") == 1
    for index in range(10):
        await sim_call(http, "POST", f"{group.url}/_sim/accounts",
                       {"name": f"desk-{index}", "balances": {"USD": {"amount": "1"}}})
    samples = await scrape_until(http, treasury.url, "the new accounts polled", lambda s: all(
        sample(s, "gemini_staking_up", account=f"desk-{index}") is not None
        for index in range(10)))
    stretch = (37 + 1 / 3600) / (10 * PLANNED_SHARE)
    assert sample(samples, "gemini_account_poll_interval_seconds", account="alpha") == \
        pytest.approx(stretch)
    assert sample(samples, "gemini_key_discovery_refresh_interval_seconds", key="treasury") == \
        pytest.approx(stretch)
    # At 97 % of the budget, the burst of ten new accounts drains in the 3 % left over, and the
    # notional and staking polls (behind the balances) wait longest: give them a minute.
    await scrape_until(http, treasury.url, "every new account's endpoints up", lambda s: all(
        sample(s, f"gemini_{endpoint}_up", account=f"desk-{index}") == 1
        for index in range(10) for endpoint in ("account", "notional", "staking")),
        limit_seconds=60.0)
    counters = (await sim_state(http, group))["keys"][MASTER_KEY]
    assert counters.get("rate_limited", 0) == 0
    assert counters.get("invalid_nonce", 0) == 0


async def test_a_reload_keeps_the_discovered_accounts_and_their_values(
    http: aiohttp.ClientSession, group: RunningSimulator, tmp_path: Path
) -> None:
    path = tmp_path / "exporter.yml"
    document = treasury_exporter_document(group.url)
    document["keys"][0]["discover"]["refresh_seconds"] = 600
    path.write_text(yaml.safe_dump(document))
    service = Service(load_config(path), path, WebOptions(listen_address=LOOPBACK_ANY_PORT))
    await service.start()
    try:
        samples = await everything_polled(http, service)
        polls = sample(samples, "gemini_account_polls_total", account="alpha")

        async def listings() -> int:
            counters = (await sim_state(http, group))["keys"][MASTER_KEY]
            return int(counters["requests /v1/account/list"])
        listed = await listings()
        assert await service.reload()
        samples = await scrape(http, service.url)
        assert {"alpha", "beta"} <= polled_accounts(samples)
        assert sample(samples, "gemini_staking_balance", account="alpha", currency="ETH") == 32.5
        await scrape_until(http, service.url, "alpha polled again after the reload", lambda s: (
            sample(s, "gemini_account_polls_total", account="alpha") or 0) > (polls or 0) + 1)
    finally:
        await service.stop()
    # Discovered accounts were polled at once; the listing keeps its 600 s rhythm.
    assert await listings() == listed


async def test_reloads_more_often_than_an_interval_starve_no_endpoint(
    http: aiohttp.ClientSession, group: RunningSimulator, tmp_path: Path
) -> None:
    """Production's config management reloads every minute against 300 s intervals: every
    job keeps its place on its grid, so each account's notional and staking polls come."""
    path = tmp_path / "exporter.yml"
    document = treasury_exporter_document(group.url)
    document["notional"]["interval_seconds"] = 3
    document["keys"][0]["discover"]["defaults"]["staking_interval_seconds"] = 3
    path.write_text(yaml.safe_dump(document))
    service = Service(load_config(path), path, WebOptions(listen_address=LOOPBACK_ANY_PORT))
    await service.start()
    try:
        async def all_endpoints_up() -> bool:
            assert await service.reload()  # every half second, far more often than 3 s
            await asyncio.sleep(0.5)
            samples = await scrape(http, service.url)
            return all(sample(samples, f"gemini_{endpoint}_up", account=account) == 1
                       for account in ("alpha", "beta", "delta") for endpoint in ("notional",)
                       ) and all(sample(samples, "gemini_staking_up", account=account) == 1
                                 for account in ("alpha", "beta"))
        await wait_until(all_endpoints_up, "every notional and staking poll under reloads",
                         limit_seconds=20.0)
    finally:
        await service.stop()


def group_of(total: int, same_millisecond: range = range(0)) -> dict[str, object]:
    """The treasury group grown to `total` accounts; those at the indexes of
    `same_millisecond` (newest first, as the listing pages them) created in one millisecond."""
    document = treasury_simulator_document()
    group = document["keys"][0]["accounts"]
    names = [f"sub{index:04d}" for index in range(total - len(group))]
    group += names
    created = {name: 1_700_000_000_000 + index for index, name in enumerate(names)}
    newest_first = sorted(names, key=created.__getitem__, reverse=True)
    for index in same_millisecond:
        created[newest_first[index]] = created[newest_first[same_millisecond.start]]
    document["accounts"] += [{"name": name, "created_ms": created[name]} for name in names]
    return document


@contextlib.asynccontextmanager
async def listing_group(
    document: dict[str, object], max_pages: int | None = None,
) -> AsyncIterator[tuple[RunningSimulator, Service]]:
    """The group `document` describes, and the exporter listing it (polling none of it)."""
    simulator = await start_simulator(SimState.from_document(document))
    exporter_document = treasury_exporter_document(simulator.url)
    discover = exporter_document["keys"][0]["discover"]
    discover["include"] = ["nothing-*"]
    if max_pages is not None:
        discover["max_pages"] = max_pages
    try:
        service = Service(build_config(exporter_document, {}), None,
                          WebOptions(listen_address=LOOPBACK_ANY_PORT))
        await service.start()
        try:
            yield simulator, service
        finally:
            await service.stop()
    finally:
        await simulator.close()


async def first_listing(http: aiohttp.ClientSession, document: dict[str, object],
                        max_pages: int | None = None) -> Samples:
    async with listing_group(document, max_pages) as (_, service):
        return await scrape_until(http, service.url, "a listing", lambda s: sample(
            s, "gemini_key_discovery_up", key="treasury") == 1)


def listed(samples: Samples) -> float:
    return sum(value for (name, labels), value in samples.items()
               if name == "gemini_key_discovered_accounts" and ("key", "treasury") in labels)


@pytest.mark.parametrize(("total", "full"), [(998, 0), (999, 1)])
async def test_a_listing_longer_than_max_pages_is_cut_short_and_says_so(
    http: aiohttp.ClientSession, total: int, full: int
) -> None:
    # Two pages of 500 at most, the second starting with the last account of the first: 998
    # accounts end on a short page; 999 fill it, and a third page might hold more.
    with structlog.testing.capture_logs() as logs:
        samples = await first_listing(http, group_of(total), max_pages=2)
    assert sample(samples, "gemini_key_discovery_listing_full", key="treasury") == full
    assert listed(samples) == total
    assert sample(samples, "gemini_key_discovery_polled_accounts", key="treasury") == 0
    warned = any(entry["event"].startswith("account listing cut short") for entry in logs)
    assert warned == bool(full)


async def test_a_group_of_1200_accounts_is_listed_whole_page_by_page(
    http: aiohttp.ClientSession,
) -> None:
    # Sixty accounts of one millisecond straddle the end of the first page: they come on the
    # first page and the second, and count once.
    samples = await first_listing(http, group_of(1200, same_millisecond=range(470, 530)))
    assert listed(samples) == 1200
    assert sample(samples, "gemini_key_discovery_listing_full", key="treasury") == 0


async def test_a_failed_later_page_keeps_the_last_complete_listing(
    http: aiohttp.ClientSession,
) -> None:
    async with listing_group(group_of(1200)) as (simulator, service):
        await scrape_until(http, service.url, "a listing", lambda s: listed(s) == 1200)
        await sim_call(http, "POST", f"{simulator.url}/_sim/keys/{MASTER_KEY}/faults",
                       {"kind": "status", "status": 503, "endpoint": "account_list_page"})
        samples = await scrape_until(
            http, service.url, "a listing whose second page failed",
            lambda s: sample(s, "gemini_key_discovery_up", key="treasury") == 0)
    # Its first page alone (500 accounts) is never taken for the group.
    assert listed(samples) == 1200
