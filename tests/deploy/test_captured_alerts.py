"""The alert rules over series captured from a live exporter: every endpoint's failure since the
start reaches an alert. The exporter polls the simulator over real sockets, its /metrics is
scraped every 1.5 s, and promtool replays the scrapes as one a minute (the exporter's
timestamps moved onto promtool's clock), evaluating the rules of deploy/alerts.yml."""

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from balance_exporter.config import build_config
from balance_exporter.server import WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import start_simulator
from balance_exporter.simulator.state import SimState
from tests.conftest import LOOPBACK_ANY_PORT
from tests.deploy.tools import DEPLOY, run, tool
from tests.helpers import (
    Samples,
    add_fault,
    scrape,
    treasury_exporter_document,
    treasury_simulator_document,
)

SCRAPES = 12
TARGET = {"job": "balance-exporter", "instance": "e:8397"}


def is_time(name: str) -> bool:
    return name.endswith("_timestamp_seconds") or name == "process_start_time_seconds"


def promtool_series(captured: list[tuple[float, Samples]]) -> list[dict[str, str]]:
    """Each series of the scrapes, one value a minute ('_' where a scrape lacked it); times
    moved so that scrape i was taken at minute i of promtool's clock."""
    names = sorted({key for _, samples in captured for key in samples})
    series = []
    for name, labels in names:
        values = []
        for index, (taken, samples) in enumerate(captured):
            value = samples.get((name, labels))
            if value is not None and is_time(name):
                value = value - taken + 60 * index
            values.append("_" if value is None else repr(value))
        label_text = ", ".join(f"{key}={json.dumps(value)}"
                               for key, value in sorted({**dict(labels), **TARGET}.items()))
        series.append({"series": f"{name}{{{label_text}}}", "values": " ".join(values)})
    return series


async def capture(http: aiohttp.ClientSession, service: Service) -> list[tuple[float, Samples]]:
    captured = []
    for _ in range(SCRAPES):
        captured.append((time.time(), await scrape(http, service.url)))
        await asyncio.sleep(1.5)
    return captured


@pytest.mark.slow
async def test_notional_and_staking_that_never_succeed_reach_their_alerts(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """A key without the role for notional values and staking (403 MissingRole on those
    endpoints only, from the first poll on): the balances are fine, and alerts still fire."""
    simulator = await start_simulator(SimState.from_document(treasury_simulator_document()))
    for account, endpoints in (("alpha", ("notional", "staking")),
                               ("beta", ("notional", "staking")), ("delta", ("notional",))):
        for endpoint in endpoints:
            await add_fault(http, simulator, account, {
                "kind": "auth", "status": 403, "reason": "MissingRole", "endpoint": endpoint})
    service = Service(build_config(treasury_exporter_document(simulator.url), {}), None,
                      WebOptions(listen_address=LOOPBACK_ANY_PORT))
    await service.start()
    try:
        captured = await capture(http, service)
    finally:
        await service.stop()
        await simulator.close()
    firing = 'count by (alertname, endpoint) (ALERTS{alertstate="firing"})'
    tests = {"rule_files": [str(DEPLOY / "alerts.yml")], "evaluation_interval": "1m",
             "tests": [{"interval": "1m", "input_series": promtool_series(captured),
                        "promql_expr_test": [{"expr": firing, "eval_time": f"{SCRAPES - 1}m",
                                              "exp_samples": [
        {"labels": f'{{alertname="{alert}", endpoint="{endpoint}"}}', "value": count}
        for alert, endpoint, count in (
            ("GeminiBalanceTreasuryAuthError", "notional", 3),
            ("GeminiBalanceTreasuryAuthError", "staking", 2),
            ("GeminiBalanceTreasuryDataStale", "notional", 3),
            ("GeminiBalanceTreasuryDataStale", "staking", 2),
            ("GeminiBalanceTreasuryPollingFailing", "notional", 3),
            ("GeminiBalanceTreasuryPollingFailing", "staking", 2))]}]}]}
    path = tmp_path / "captured_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = run(tool("promtool"), "test", "rules", str(path))
    # Nothing else fires: the balances were polled fine all along.
    assert result.returncode == 0, result.stdout + result.stderr
