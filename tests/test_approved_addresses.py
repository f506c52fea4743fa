"""Withdrawal allow-lists (/v1/approvedAddresses/account/{network}) against the simulator over
real sockets: counts by scope and status, an added address counted once and logged, status
changes and removals logged, a malformed list keeping the last good one, and the count carried
across a reload, a restart with --storage.path, and an account that leaves and comes back."""

from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from balance_exporter.cli import config_summary
from balance_exporter.config import build_config, load_config
from balance_exporter.demo import demo_exporter_document
from balance_exporter.ledger import KnownEntry
from balance_exporter.scheduler import MAX_AUDIT_LINES, _log_allow_list_change
from balance_exporter.server import WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState, demo_document
from balance_exporter.store import AllowListChange
from tests.conftest import LOOPBACK_ANY_PORT
from tests.helpers import (
    Samples,
    running_exporter,
    sample,
    scrape,
    scrape_until,
    sim_call,
    treasury_exporter_document,
    treasury_simulator_document,
    write_config,
)

COLD = "bc1qcoldstorage0000000000000000000000000"
GROUP = "bc1qgroupdesk000000000000000000000000000"
NEW = "bc1qnewlyrequested0000000000000000000000"


@pytest.fixture
async def group() -> AsyncIterator[RunningSimulator]:
    document = treasury_simulator_document()
    accounts = {account["name"]: account for account in document["accounts"]}
    accounts["alpha"]["approved_addresses"] = [
        {"network": "bitcoin", "address": COLD, "label": "Cold storage", "status": "active",
         "created_ms": 1_700_000_000_000}]
    # A group-scope entry shows in every account of the master key's group.
    accounts["beta"]["approved_addresses"] = [
        {"network": "bitcoin", "address": GROUP, "label": "Group desk", "scope": "group",
         "status": "active", "created_ms": 1_700_000_100_000}]
    accounts["delta"]["approved_addresses"] = [
        {"network": "bitcoin", "address": NEW, "status": "pending-time",
         "created_ms": 1_700_000_200_000}]
    running = await start_simulator(SimState.from_document(document))
    yield running
    await running.close()


def allow_list_document(base_url: str, **changes: Any) -> dict[str, Any]:
    document = treasury_exporter_document(base_url)
    document["approved_addresses"] = {"networks": ["bitcoin", "ethereum"]}
    document["keys"][0]["discover"]["defaults"]["approved_addresses_interval_seconds"] = 1
    document["accounts"][0]["approved_addresses_interval_seconds"] = 1
    document.update(changes)
    return document


@pytest.fixture
def config_path(group: RunningSimulator, tmp_path: Path) -> Path:
    path = tmp_path / "exporter.yml"
    write_config(path, allow_list_document(group.url))
    return path


@pytest.fixture
async def exporter(config_path: Path) -> AsyncIterator[Service]:
    async with running_exporter(config_path) as service:
        yield service


def counts(samples: Samples, account: str, network: str = "bitcoin") -> dict[tuple[str, str],
                                                                              float]:
    return {(dict(labels)["scope"], dict(labels)["status"]): value
            for (name, labels), value in samples.items()
            if name == "gemini_approved_addresses"
            and ("account", account) in labels and ("network", network) in labels}


def added(samples: Samples, account: str, network: str = "bitcoin") -> float | None:
    return sample(samples, "gemini_approved_addresses_added_total", account=account,
                  network=network)


def polls(samples: Samples, account: str, network: str = "bitcoin") -> bool:
    return sample(samples, "gemini_approved_addresses_up", account=account,
                  network=network) == 1


async def address_call(http: aiohttp.ClientSession, simulator: RunningSimulator, method: str,
                       account: str, body: dict[str, Any]) -> None:
    await sim_call(http, method, f"{simulator.url}/_sim/accounts/{account}/approved-addresses",
                   {"network": "bitcoin", **body})


async def away_and_back(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service, config_path: Path,
    away: dict[str, Any], address: str, pending: int,
) -> Samples:
    """Reload with `away` (alpha's bitcoin list no longer read), request `address` on alpha
    meanwhile, reload with the usual config: the samples once the list is read again and holds
    `pending` entries in their hold."""
    write_config(config_path, away)
    assert await exporter.reload()
    await scrape_until(http, exporter.url, "alpha's list gone",
                       lambda s: added(s, "alpha") is None)
    await address_call(http, group, "POST", "alpha", {"address": address})
    write_config(config_path, allow_list_document(group.url))
    assert await exporter.reload()
    return await scrape_until(http, exporter.url, "alpha's list again", lambda s: counts(
        s, "alpha").get(("account", "pending_time")) == pending)


def audit(logs: list[MutableMapping[str, Any]]) -> Iterator[tuple[str, str, str, str, str | None]]:
    """The audit lines: (event, account, scope, status, address)."""
    for entry in logs:
        if entry["event"].startswith("approved withdrawal address"):
            assert entry["log_level"] == "warning"
            yield (entry["event"], entry["account"], entry["scope"], entry["status"],
                   entry["address"])


async def test_each_list_is_counted_by_scope_and_status(
    http: aiohttp.ClientSession, exporter: Service,
) -> None:
    samples = await scrape_until(http, exporter.url, "every list read", lambda s: all(
        polls(s, account, network) for account in ("alpha", "beta", "delta")
        for network in ("bitcoin", "ethereum")))
    assert counts(samples, "alpha") == {("account", "active"): 1, ("group", "active"): 1}
    assert counts(samples, "beta") == {("group", "active"): 1}
    assert counts(samples, "delta") == {("account", "pending_time"): 1}
    # An empty list has no entries to count, and nothing was added to any list.
    assert counts(samples, "alpha", "ethereum") == {}
    assert {added(samples, account, network) for account in ("alpha", "beta", "delta")
            for network in ("bitcoin", "ethereum")} == {0}
    assert sample(samples, "gemini_approved_address_newest_created_timestamp_seconds",
                  account="alpha", network="bitcoin") == 1_700_000_100
    assert sample(samples, "gemini_approved_addresses_last_success_timestamp_seconds",
                  account="delta", network="ethereum")
    # Configured at 1 s, stretched with the key's other streams to fit its budget.
    assert (sample(samples, "gemini_approved_addresses_poll_interval_seconds", account="alpha",
                   network="bitcoin") or 0) >= 1
    # Accounts the key does not poll (custody, closed, excluded) have no lists read.
    assert not counts(samples, "vault")
    assert added(samples, "test-1") is None
    page = await (await http.get(exporter.url + "/")).text()
    assert "bitcoin: 1 <span class=\"warning\">&#9888; 1 pending-time</span>" in page


async def test_an_added_address_counts_once_and_every_change_is_logged(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service,
) -> None:
    await scrape_until(http, exporter.url, "the baseline", lambda s: polls(s, "alpha"))
    with structlog.testing.capture_logs() as logs:
        await address_call(http, group, "POST", "alpha", {"address": NEW, "label": "New desk"})
        samples = await scrape_until(http, exporter.url, "the addition",
                                     lambda s: added(s, "alpha") == 1)
        assert counts(samples, "alpha")[("account", "pending_time")] == 1
        before = sample(samples, "gemini_approved_addresses_last_success_timestamp_seconds",
                        account="alpha", network="bitcoin") or 0
        await address_call(http, group, "PATCH", "alpha", {"address": NEW, "status": "active"})
        samples = await scrape_until(http, exporter.url, "the approval", lambda s: counts(
            s, "alpha").get(("account", "active")) == 2)
        await address_call(http, group, "DELETE", "alpha", {"address": COLD})
        samples = await scrape_until(http, exporter.url, "the removal", lambda s: counts(
            s, "alpha").get(("account", "active")) == 1)
        # Many polls later: still counted once.
        await scrape_until(http, exporter.url, "more polls", lambda s: (sample(
            s, "gemini_approved_addresses_last_success_timestamp_seconds", account="alpha",
            network="bitcoin") or 0) > before + 2, limit_seconds=20)
        samples = await scrape(http, exporter.url)
    assert added(samples, "alpha") == 1
    # The pending pair is gone and shows 0, not nothing.
    assert counts(samples, "alpha") == {("account", "active"): 1, ("account", "pending_time"): 0,
                                        ("group", "active"): 1}
    assert list(audit(logs)) == [
        ("approved withdrawal address added", "alpha", "account", "pending_time", NEW),
        ("approved withdrawal address changed status", "alpha", "account", "active", NEW),
        ("approved withdrawal address removed", "alpha", "account", "active", COLD),
    ]
    line = next(entry for entry in logs if entry["event"] == "approved withdrawal address added")
    assert (line["network"], line["label"], line["key"]) == ("bitcoin", "New desk", "treasury")


async def test_a_group_entry_added_counts_in_every_account_of_the_group(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service,
) -> None:
    await scrape_until(http, exporter.url, "the baselines",
                       lambda s: polls(s, "alpha") and polls(s, "beta"))
    await address_call(http, group, "POST", "beta", {"address": NEW, "scope": "group"})
    samples = await scrape_until(http, exporter.url, "the addition in both accounts",
                                 lambda s: added(s, "alpha") == 1 and added(s, "beta") == 1)
    assert counts(samples, "alpha")[("group", "pending_time")] == 1
    # The account key's account is in no group of the master key.
    assert added(samples, "delta") == 0


async def test_a_malformed_list_keeps_the_last_good_one(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service,
) -> None:
    samples = await scrape_until(http, exporter.url, "the baseline", lambda s: polls(s, "alpha"))
    good = counts(samples, "alpha")
    await sim_call(http, "POST", f"{group.url}/_sim/accounts/alpha/faults",
                   {"kind": "garbage", "endpoint": "approved_addresses", "count": 2})
    samples = await scrape_until(http, exporter.url, "a malformed list", lambda s: sample(
        s, "gemini_approved_addresses_poll_errors_total", account="alpha", network="bitcoin",
        reason="MalformedReply") or sample(
        s, "gemini_approved_addresses_poll_errors_total", account="alpha", network="ethereum",
        reason="MalformedReply"))
    assert counts(samples, "alpha") == good
    samples = await scrape_until(http, exporter.url, "good lists again", lambda s: polls(
        s, "alpha") and polls(s, "alpha", "ethereum") and (sum(
            value for (name, labels), value in s.items()
            if name == "gemini_approved_addresses_poll_errors_total"
            and ("account", "alpha") in labels) == 2))
    # The good list after the bad ones is no new baseline, and nothing was added.
    assert counts(samples, "alpha") == good
    assert added(samples, "alpha") == 0


async def test_a_restart_with_storage_counts_an_address_added_while_stopped_once(
    http: aiohttp.ClientSession, group: RunningSimulator, config_path: Path, tmp_path: Path,
) -> None:
    storage = tmp_path / "state"
    async with running_exporter(config_path, storage) as service:
        await scrape_until(http, service.url, "the baselines",
                           lambda s: polls(s, "alpha") and polls(s, "delta"))
    await address_call(http, group, "POST", "alpha", {"address": NEW, "label": "While away"})
    await address_call(http, group, "DELETE", "delta", {"address": NEW})
    with structlog.testing.capture_logs() as logs:
        async with running_exporter(config_path, storage) as service:
            samples = await scrape_until(http, service.url, "the addition after the restart",
                                         lambda s: added(s, "alpha") == 1 and polls(s, "delta"))
            first = sample(samples, "gemini_approved_addresses_last_success_timestamp_seconds",
                           account="alpha", network="bitcoin") or 0
            samples = await scrape_until(http, service.url, "more polls", lambda s: (sample(
                s, "gemini_approved_addresses_last_success_timestamp_seconds", account="alpha",
                network="bitcoin") or 0) > first + 1)
    assert added(samples, "alpha") == 1
    assert added(samples, "delta") == 0
    # The removal is logged without the address: the state file keeps digests only.
    assert list(audit(logs)) == [
        ("approved withdrawal address added", "alpha", "account", "pending_time", NEW),
        ("approved withdrawal address removed", "delta", "account", "pending_time", None),
    ]
    assert NEW not in (storage / "state.json").read_text()


async def test_a_restart_without_storage_starts_from_a_new_baseline(
    http: aiohttp.ClientSession, group: RunningSimulator, config_path: Path,
) -> None:
    async with running_exporter(config_path) as service:
        await scrape_until(http, service.url, "the baseline", lambda s: polls(s, "alpha"))
    await address_call(http, group, "POST", "alpha", {"address": NEW})
    async with running_exporter(config_path) as service:
        samples = await scrape_until(http, service.url, "the new list", lambda s: counts(
            s, "alpha").get(("account", "pending_time")) == 1)
    assert added(samples, "alpha") == 0


async def test_a_reload_keeps_the_count_and_an_account_that_comes_back_counts_what_came_meanwhile(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service, config_path: Path,
) -> None:
    await scrape_until(http, exporter.url, "the baseline", lambda s: polls(s, "alpha"))
    await address_call(http, group, "POST", "alpha", {"address": NEW})
    await scrape_until(http, exporter.url, "the addition", lambda s: added(s, "alpha") == 1)
    assert await exporter.reload()
    assert added(await scrape(http, exporter.url), "alpha") == 1
    # Alpha leaves the plan, gains an address while away, and comes back.
    away = allow_list_document(group.url)
    away["keys"][0]["discover"]["exclude"] = ["test-*", "alpha"]
    samples = await away_and_back(http, group, exporter, config_path, away, GROUP, pending=2)
    # Its count began again at 0 when it came back; the address added while it was away counts.
    assert added(samples, "alpha") == 1


async def test_a_network_read_again_after_a_pause_starts_from_a_new_baseline(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service, config_path: Path,
) -> None:
    await scrape_until(http, exporter.url, "the baseline", lambda s: polls(s, "alpha"))
    off = allow_list_document(group.url, approved_addresses={"networks": ["ethereum"]})
    samples = await away_and_back(http, group, exporter, config_path, off, NEW, pending=1)
    assert added(samples, "alpha") == 0


def test_config_check_says_which_lists_are_read_and_how_often() -> None:
    path = Path(__file__).parent / "testdata" / "config" / "good" / "allow_lists_at_the_bounds.yml"
    summary = config_summary(load_config(path, environ={}))
    assert "Withdrawal allow-lists of aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa, bitcoin, n3" in summary
    assert "every 60s unless an account says otherwise" in summary
    primary, quiet = (line for line in summary.splitlines()
                      if line.startswith(("  primary:", "  quiet:")))
    assert "32 allow-lists every" in primary
    assert "allow-lists" not in quiet


async def test_the_demo_shows_a_requested_address_in_its_hold(http: aiohttp.ClientSession) -> None:
    simulator = await start_simulator(SimState.from_document(demo_document()))
    try:
        document = demo_exporter_document(simulator.state, simulator.url)
        document["keys"][0]["discover"]["defaults"]["approved_addresses_interval_seconds"] = 1
        service = Service(build_config(document, {}), None,
                          WebOptions(listen_address=LOOPBACK_ANY_PORT))
        await service.start()
        try:
            samples = await scrape_until(http, service.url, "the lists", lambda s: all(
                polls(s, account, network) for account in ("trading", "treasury-primary")
                for network in ("bitcoin", "ethereum")))
        finally:
            await service.stop()
    finally:
        await simulator.close()
    assert counts(samples, "trading") == {("account", "pending_time"): 1}
    assert counts(samples, "treasury-primary", "ethereum") == {("group", "active"): 1}
    # A group entry shows in every account of the group.
    assert counts(samples, "trading", "ethereum") == {("group", "active"): 1}


@pytest.mark.parametrize("changes", [MAX_AUDIT_LINES, MAX_AUDIT_LINES + 1])
def test_the_audit_lines_of_one_read_are_bounded_and_the_rest_counted(changes: int) -> None:
    added = tuple(KnownEntry("account", "pending_time", "", f"a{i}") for i in range(changes))
    with structlog.testing.capture_logs() as logs:
        _log_allow_list_change(AllowListChange(False, added=added), changes, {"account": "a"})
    assert len(list(audit(logs))) == min(changes, MAX_AUDIT_LINES)
    summary = [entry for entry in logs if entry["event"].startswith("allow-list changes past")]
    assert [entry["not_logged"] for entry in summary] == (
        [changes - MAX_AUDIT_LINES] if changes > MAX_AUDIT_LINES else [])
