"""Each key's roles (POST /v1/roles) against the simulator over real sockets: read at start,
after each reload and on their refresh; a key beyond Auditor shows and warns; a key whose roles
cannot be read goes on polling its balances."""

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
import yaml

from balance_exporter.config import load_config
from balance_exporter.server import WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState
from tests.conftest import LOOPBACK_ANY_PORT
from tests.helpers import (
    ACCOUNT_KEY,
    MASTER_KEY,
    Samples,
    sample,
    scrape_until,
    sim_call,
    treasury_exporter_document,
    treasury_simulator_document,
)


@pytest.fixture
async def group() -> AsyncIterator[RunningSimulator]:
    document = treasury_simulator_document()
    document["keys"][1]["roles"] = ["Trader", "FundManager"]  # the account key can move funds
    running = await start_simulator(SimState.from_document(document))
    yield running
    await running.close()


@pytest.fixture
def config_path(group: RunningSimulator, tmp_path: Path) -> Path:
    path = tmp_path / "exporter.yml"
    path.write_text(yaml.safe_dump(treasury_exporter_document(group.url)))
    return path


@pytest.fixture
async def exporter(config_path: Path) -> AsyncIterator[Service]:
    service = Service(load_config(config_path), config_path,
                      WebOptions(listen_address=LOOPBACK_ANY_PORT))
    await service.start()
    yield service
    await service.stop()


def roles(samples: Samples, key: str) -> dict[str, float]:
    return {dict(labels)["role"]: value for (name, labels), value in samples.items()
            if name == "gemini_key_role" and ("key", key) in labels}


async def test_each_keys_roles_show_and_a_key_beyond_auditor_warns(
    http: aiohttp.ClientSession, config_path: Path,
) -> None:
    with structlog.testing.capture_logs() as logs:
        service = Service(load_config(config_path), config_path,
                          WebOptions(listen_address=LOOPBACK_ANY_PORT))
        await service.start()
        try:
            samples = await scrape_until(http, service.url, "both keys' roles",
                                  lambda s: roles(s, "treasury") and roles(s, "solo"))
        finally:
            await service.stop()
    # The master key is Auditor only, and says it is no account administrator.
    assert roles(samples, "treasury") == {"auditor": 1, "fund_manager": 0, "trader": 0,
                                          "account_admin": 0}
    # An account key sends no isAccountAdmin: no series for it.
    assert roles(samples, "solo") == {"auditor": 0, "fund_manager": 1, "trader": 1}
    assert sample(samples, "gemini_key_roles_up", key="solo") == 1
    assert sample(samples, "gemini_key_roles_last_success_timestamp_seconds", key="solo")
    warnings = [entry for entry in logs
                if entry["event"].startswith("API key holds roles beyond Auditor")]
    assert [(entry["key"], entry["roles"]) for entry in warnings] == [
        ("solo", ["fund_manager", "trader"])]
    assert warnings[0]["log_level"] == "warning"


async def test_a_key_whose_roles_cannot_be_read_goes_on_polling(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service,
) -> None:
    await scrape_until(http, exporter.url, "the roles", lambda s: roles(s, "treasury"))
    await sim_call(http, "POST", f"{group.url}/_sim/keys/{MASTER_KEY}/faults",
                   {"kind": "status", "status": 503, "endpoint": "roles"})
    await exporter.reload()  # asks again at once
    samples = await scrape_until(http, exporter.url, "a failed ask", lambda s: sample(
        s, "gemini_key_roles_up", key="treasury") == 0)
    assert sample(samples, "gemini_key_roles_errors_total", key="treasury", reason="System")
    # The last roles read stay, and the balances are polled as before.
    assert roles(samples, "treasury")["auditor"] == 1
    before = sample(samples, "gemini_account_polls_total", account="alpha")
    samples = await scrape_until(http, exporter.url, "more balances polls", lambda s: (sample(
        s, "gemini_account_polls_total", account="alpha") or 0) > (
            before or 0) + 1)
    assert sample(samples, "gemini_account_up", account="alpha") == 1


async def test_a_reload_asks_every_key_for_its_roles_again(
    http: aiohttp.ClientSession, group: RunningSimulator, exporter: Service,
) -> None:
    await scrape_until(http, exporter.url, "the roles", lambda s: roles(s, "treasury"))
    await sim_call(http, "PUT", f"{group.url}/_sim/keys/{MASTER_KEY}/roles",
                   ["Trader", "AccountAdmin"])
    await sim_call(http, "PUT", f"{group.url}/_sim/keys/{ACCOUNT_KEY}/roles", ["Auditor"])
    assert await exporter.reload()
    # Only the reload asks before the hourly refresh.
    samples = await scrape_until(
        http, exporter.url, "the new roles",
        lambda s: roles(s, "treasury").get("trader") == 1 and roles(s, "solo").get("auditor") == 1)
    assert roles(samples, "treasury") == {"auditor": 0, "fund_manager": 0, "trader": 1,
                                          "account_admin": 1}
    assert roles(samples, "solo") == {"auditor": 1, "fund_manager": 0, "trader": 0}
