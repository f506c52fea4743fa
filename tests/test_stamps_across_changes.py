"""Trust round two, black-box over real sockets: a stale reply never shows after an account
leaves the plan and comes back, after a reload changes its settings, or after a restart whose
state was saved before any listing succeeded."""

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState
from balance_exporter.storage import STATE_FILE_NAME
from tests.helpers import (
    MASTER_KEY,
    add_fault,
    running_exporter,
    sample,
    scrape,
    sim_call,
    treasury_exporter_document,
    treasury_simulator_document,
    wait_until,
)

# alpha's BTC amount, floored; a stale reply of the simulator carries a million more.
ALPHA_BTC = 5.12345678


@pytest.fixture
async def group() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimState.from_document(treasury_simulator_document()))
    yield running
    await running.close()


def write_config(group: RunningSimulator, tmp_path: Path, **changes: object) -> Path:
    """The treasury config, with `changes` to every discovered account's settings."""
    document = treasury_exporter_document(group.url)
    document["keys"][0]["discover"]["defaults"].update(changes)
    path = tmp_path / "exporter.yml"
    path.write_text(yaml.safe_dump(document))
    return path


@contextlib.asynccontextmanager
async def running(group: RunningSimulator, tmp_path: Path, storage: Path | None = None,
                  ) -> AsyncIterator[Service]:
    """The exporter with the treasury config (reloaded from `write_config`'s file)."""
    async with running_exporter(write_config(group, tmp_path), storage) as service:
        yield service


async def alpha_btc(http: aiohttp.ClientSession, service: Service) -> float | None:
    amount = sample(await scrape(http, service.url), "gemini_balance_amount", account="alpha",
                    currency="BTC")
    assert amount is None or amount < 1000, "a stale reply's balance reached /metrics"
    return amount


async def alpha_shown(http: aiohttp.ClientSession, service: Service) -> None:
    async def shown() -> bool:
        return await alpha_btc(http, service) == ALPHA_BTC
    await wait_until(shown, "alpha's balances on /metrics")


async def stale_reply_refused(http: aiohttp.ClientSession, service: Service) -> None:
    """alpha's next reply is stale: it must be counted, and never shown."""
    async def judged() -> bool:
        await alpha_btc(http, service)
        return (sample(await scrape(http, service.url), "gemini_account_stale_replies_total",
                       account="alpha") or 0) >= 1
    await wait_until(judged, "the stale reply to be refused")

    await alpha_shown(http, service)  # a fresh reply after it


async def test_an_account_listed_closed_then_open_refuses_an_older_reply(
    http: aiohttp.ClientSession, group: RunningSimulator, tmp_path: Path
) -> None:
    async with running(group, tmp_path) as service:
        await alpha_shown(http, service)
        await sim_call(http, "PATCH", f"{group.url}/_sim/accounts/alpha", {"status": "closed"})

        async def gone() -> bool:
            return sample(await scrape(http, service.url), "gemini_account_up",
                          account="alpha") is None
        await wait_until(gone, "alpha to leave the plan")
        await add_fault(http, group, "alpha", {"kind": "stale", "count": 1})
        await sim_call(http, "PATCH", f"{group.url}/_sim/accounts/alpha", {"status": "open"})
        await stale_reply_refused(http, service)


async def test_a_reload_that_changes_an_accounts_settings_refuses_an_older_reply(
    http: aiohttp.ClientSession, group: RunningSimulator, tmp_path: Path
) -> None:
    async with running(group, tmp_path) as service:
        await alpha_shown(http, service)
        await add_fault(http, group, "alpha", {"kind": "stale", "count": 1})
        write_config(group, tmp_path, show_pending_balances=True)
        assert await service.reload()
        await stale_reply_refused(http, service)


async def test_a_save_before_the_first_listing_keeps_the_discovered_accounts_stamps(
    http: aiohttp.ClientSession, group: RunningSimulator, tmp_path: Path
) -> None:
    storage = tmp_path / "storage"
    async with running(group, tmp_path, storage) as first:
        await alpha_shown(http, first)
    # A restart while the listing fails: nothing is discovered, and the state is saved.
    await sim_call(http, "POST", f"{group.url}/_sim/keys/{MASTER_KEY}/faults",
                   {"kind": "status", "status": 503, "reason": "Maintenance"})
    async with running(group, tmp_path, storage) as second:
        async def listing_failed() -> bool:
            return sample(await scrape(http, second.url), "gemini_key_discovery_up",
                          key="treasury") == 0
        await wait_until(listing_failed, "the listing to fail")
    saved = json.loads((storage / STATE_FILE_NAME).read_text())["stamps"]
    assert "alpha" in {entry["account"] for entry in saved}
    await sim_call(http, "DELETE", f"{group.url}/_sim/faults", {})
    await add_fault(http, group, "alpha", {"kind": "stale", "count": 1})
    async with running(group, tmp_path, storage) as third:
        await stale_reply_refused(http, third)
