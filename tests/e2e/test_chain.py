"""The live chain: exporter → real Prometheus → real Alertmanager → webhook receiver, driven by
simulator faults. Debian's prometheus and prometheus-alertmanager run on loopback with configs
generated from deploy/; the simulator and the exporter run as their own processes.

The tests run in file order over one chain: baseline, faults fire, the dashboard's queries
(while error series exist), faults cleared and alerts resolved, exporter stopped.
"""

import json
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.chain import (
    DEPLOY,
    Processes,
    Prometheus,
    WebhookReceiver,
    alert_rules,
    alertmanager_config,
    prometheus_config,
)
from tests.helpers import (
    MASTER_KEY,
    PROVIDER_A,
    PROVIDER_B,
    exporter_document,
    floored,
    free_port,
    http_json,
    http_status,
    notional_value,
    simulator_document,
    wait_for,
)

pytestmark = pytest.mark.e2e

ACCOUNTS = ("alpha", "beta", "gamma", "delta")
BALANCE_METRICS = {
    "amount": "gemini_balance_amount", "available": "gemini_balance_available",
    "availableForWithdrawal": "gemini_balance_available_for_withdrawal",
    "pendingWithdrawal": "gemini_balance_pending_withdrawal",
    "pendingDeposit": "gemini_balance_pending_deposit",
}
GAMMA_MINIMUM = 40.0
GAMMA_PENDING_SECONDS = 5
DISCOVERY_REFRESH_SECONDS = 2
STAKING = {"ETH": {"balance": "32.5", "available": "32", "availableForWithdrawal": "30",
                   "providers": {PROVIDER_A: "20.5", PROVIDER_B: "12"}}}


@dataclass
class Chain:
    processes: Processes
    receiver: WebhookReceiver
    prometheus: Prometheus
    simulator_url: str
    exporter_url: str
    exporter_command: list[str]
    exporter: Any  # the running exporter's Popen

    def sim(self, method: str, path: str, body: object) -> Any:
        return http_json(self.simulator_url + path, body, method)

    def sim_state(self) -> Any:
        return http_json(self.simulator_url + "/_sim/state")


def is_ready(url: str) -> bool:
    return http_status(f"{url}/-/ready") == 200


def binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: scripts/test.sh and .ci/run install it")
    return found


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    work = tmp_path_factory.mktemp("chain")
    processes = Processes(work)
    receiver = WebhookReceiver()
    ports = {name: free_port() for name in ("simulator", "exporter", "prometheus", "alertmanager")}
    simulator_url = f"http://127.0.0.1:{ports['simulator']}"
    world = simulator_document()
    world["keys"][1]["nonce"] = "seconds"  # the account key streams
    alpha_state = next(a for a in world["accounts"] if a["name"] == "alpha")
    alpha_state["staking"] = STAKING
    alpha_state["approved_addresses"] = [
        {"network": "bitcoin", "address": "bc1qcold", "label": "Cold", "status": "active"}]
    # A withdrawal pending since a minute before the start: counted and timed from the first
    # poll (alpha has no threshold for it).
    alpha_state["transfers"] = [
        {"type": "Withdrawal", "status": "Pending", "currency": "BTC", "amount": "0.1",
         "timestamp_ms": int(time.time() * 1000) - 60_000}]
    (work / "sim.yml").write_text(yaml.safe_dump(world))
    exporter_config = exporter_document(simulator_url)
    gamma = next(a for a in exporter_config["accounts"] if a.get("account") == "gamma")
    gamma["min_available"] = {"USD": GAMMA_MINIMUM}
    # The treasury picture: the master key discovers its group (the configured entries override
    # what it lists), every account is valued in USD, alpha's staked coins are polled.
    exporter_config["notional"] = {"currency": "USD", "interval_seconds": 1}
    treasury = exporter_config["keys"][0]
    treasury["requests_per_second"] = 10
    treasury["discover"] = {"refresh_seconds": DISCOVERY_REFRESH_SECONDS,
                            "defaults": {"interval_seconds": 1}}
    alpha = next(a for a in exporter_config["accounts"] if a.get("account") == "alpha")
    alpha.update(staking_interval_seconds=1, min_available_notional=1000)
    # Every account's bitcoin allow-list, read every second, and its transfers as often as
    # Gemini allows; gamma's withdrawals have short thresholds.
    exporter_config["approved_addresses"] = {"networks": ["bitcoin"]}
    exporter_config["transfers"] = {"interval_seconds": 5}
    for account in exporter_config["accounts"]:
        account["approved_addresses_interval_seconds"] = 1
    treasury["discover"]["defaults"]["approved_addresses_interval_seconds"] = 1
    gamma.update(max_withdrawal_pending_seconds=GAMMA_PENDING_SECONDS,
                 max_withdrawn_per_hour={"BTC": 1})
    # The account key streams balances@account (time-based nonces: one request a second).
    exporter_config["gemini"]["websocket_url"] = f"ws://127.0.0.1:{ports['simulator']}/"
    exporter_config["keys"][1].update(nonce="seconds", requests_per_second=1,
                                      stream={"reconcile_interval_seconds": 10})
    (work / "exporter.yml").write_text(yaml.safe_dump(exporter_config))
    alert_rules(work / "alerts.yml")
    prometheus_config(work / "prometheus.yml", work / "alerts.yml", ports["exporter"],
                      ports["alertmanager"])
    alertmanager_config(work / "alertmanager.yml", receiver.port)
    # The exporter as users run it: its console script.
    exporter_command = [str(Path(sys.executable).with_name("balance-exporter")),
                        "--config.file", str(work / "exporter.yml"),
                        "--web.listen-address", f"127.0.0.1:{ports['exporter']}"]
    try:
        processes.start("simulator", [sys.executable, "-m", "balance_exporter", "simulate",
                                      "--listen", f"127.0.0.1:{ports['simulator']}",
                                      "--state", str(work / "sim.yml")])
        exporter = processes.start("exporter", exporter_command)
        processes.start("alertmanager", [
            binary("prometheus-alertmanager"), f"--config.file={work / 'alertmanager.yml'}",
            f"--storage.path={work / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
            "--cluster.listen-address="])
        processes.start("prometheus", [
            binary("prometheus"), f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}"])
        chain = Chain(processes, receiver, Prometheus(ports["prometheus"]),
                      simulator_url, f"http://127.0.0.1:{ports['exporter']}", exporter_command,
                      exporter)
        for name, url in (("prometheus", chain.prometheus.url),
                          ("alertmanager", f"http://127.0.0.1:{ports['alertmanager']}"),
                          ("exporter", chain.exporter_url)):
            wait_for(partial(is_ready, url), f"{name} ready")
        yield chain
    finally:
        survivors = processes.stop_all()
        receiver.close()
        assert survivors == [], f"processes left behind: {survivors}"


def expected_balances(chain: Chain) -> dict[tuple[str, str, str], float]:
    pending_accounts = {a.get("account") for a in exporter_document("")["accounts"]
                        if a.get("show_pending_balances")}
    expected = {}
    for account, state in chain.sim_state()["accounts"].items():
        for currency, values in state["balances"].items():
            for field, metric in BALANCE_METRICS.items():
                if field.startswith("pending") and account not in pending_accounts:
                    continue
                expected[(metric, account, currency)] = floored(values[field], currency)
    return expected


def stored_balances(chain: Chain) -> dict[tuple[str, str, str], float]:
    result = chain.prometheus.query('{__name__=~"gemini_balance_(amount|available|available_for'
                                    '_withdrawal|pending_withdrawal|pending_deposit)"}')
    return {(series["metric"]["__name__"], series["metric"]["account"],
             series["metric"]["currency"]): float(series["value"][1]) for series in result}


def firing(chain: Chain, alertname: str, **labels: str) -> list[tuple[str, dict[str, str]]]:
    return [(path, got) for path, got in chain.receiver.alerts(alertname, "firing")
            if all(got.get(name) == value for name, value in labels.items())]


def resolved(chain: Chain, alertname: str, **labels: str) -> bool:
    return any(all(got.get(name) == value for name, value in labels.items())
               for _, got in chain.receiver.alerts(alertname, "resolved"))


def test_prometheus_stores_the_simulators_balances(chain: Chain) -> None:
    wait_for(lambda: chain.prometheus.query('up{job="balance-exporter"} == 1'),
             "the exporter's target to be up")
    expected = expected_balances(chain)
    assert len(expected) == 22
    wait_for(lambda: stored_balances(chain) == expected,
             "Prometheus to hold every balance gauge with the simulator's values")


def values_of(chain: Chain, query: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(series["metric"][label] for label in labels): float(series["value"][1])
            for series in chain.prometheus.query(query)}


def test_prometheus_stores_the_simulators_notional_and_staking_values(chain: Chain) -> None:
    state = chain.sim_state()
    prices = state["usd_prices"]
    expected_notional = {
        (account, currency): notional_value(values["amount"], prices.get(currency, "0"))
        for account, account_state in state["accounts"].items()
        for currency, values in account_state["balances"].items()}
    wait_for(lambda: values_of(chain, 'gemini_balance_amount_notional{notional_currency="USD"}',
                               "account", "currency") == expected_notional,
             "Prometheus to hold every account's notional values")
    expected_staking = {("alpha", "ETH", PROVIDER_A): 20.5, ("alpha", "ETH", PROVIDER_B): 12.0}
    wait_for(lambda: values_of(chain, "gemini_staking_balance_by_provider", "account",
                               "currency", "provider") == expected_staking,
             "Prometheus to hold the staked balances per provider")
    assert values_of(chain, "gemini_staking_balance", "account", "currency") == {
        ("alpha", "ETH"): 32.5}


def test_an_opened_account_appears_within_a_refresh_and_a_closed_one_goes(chain: Chain) -> None:
    chain.sim("POST", "/_sim/accounts", {"name": "epsilon", "keys": [MASTER_KEY],
                                         "balances": {"USD": {"amount": "123.45"}}})
    opened = time.time()
    wait_for(lambda: chain.prometheus.query('gemini_balance_amount{account="epsilon"} == 123.45'),
             "epsilon's balance in Prometheus")
    # One refresh, the polls and one scrape (the chain's Prometheus scrapes every second).
    assert time.time() - opened < DISCOVERY_REFRESH_SECONDS * 3 + 5
    assert chain.prometheus.query('gemini_account_info{account="epsilon", discovered="1"}')
    chain.sim("PATCH", "/_sim/accounts/epsilon", {"status": "closed"})
    wait_for(lambda: not chain.prometheus.query('gemini_account_up{account="epsilon"}'),
             "epsilon's series to be gone from Prometheus")
    assert chain.prometheus.query(
        'gemini_key_discovered_accounts{key="treasury", type="exchange", status="closed"} == 1')


# The faults, each on its own account or key so that they can run at once.
EXPECTED_FIRING = [
    ("GeminiBalanceAuthError", {"account": "beta", "reason": "InvalidSignature"},
     "/treasury-pager"),
    ("GeminiBalanceDataStale", {"account": "alpha"}, "/treasury-pager"),
    ("GeminiBalanceBelowMinimum", {"account": "gamma", "currency": "USD"}, "/treasury-pager"),
    ("GeminiBalanceRateLimited", {"key": "solo"}, "/treasury-chat"),
]
SCENARIO: dict[str, float] = {}


def test_faults_fire_their_alerts_through_alertmanager(chain: Chain) -> None:
    SCENARIO["start"] = time.time()
    chain.sim("POST", "/_sim/accounts/beta/faults", {"kind": "auth", "reason": "InvalidSignature"})
    chain.sim("POST", "/_sim/accounts/alpha/faults", {"kind": "stale"})
    chain.sim("PUT", "/_sim/accounts/gamma/balances", {"USD": {"amount": "10.00"}})
    chain.sim("POST", "/_sim/accounts/delta/faults", {"kind": "rate_limit", "retry_after": 1})
    # A failed listing or two: the discovery error series the dashboard shows.
    chain.sim("POST", f"/_sim/keys/{MASTER_KEY}/faults", {"kind": "status", "count": 2})
    for alertname, labels, receiver in EXPECTED_FIRING:
        deliveries = wait_for(partial(firing, chain, alertname, **labels),
                              f"{alertname} {labels} to reach the webhook")
        assert {path for path, _ in deliveries} == {receiver}
        for _, got in deliveries:
            assert got["job"] == "balance-exporter"
            assert got["severity"] == ("warning" if receiver == "/treasury-chat" else "critical")
    # The auth alert concerns the account with the auth error, and no other.
    assert {got["account"] for _, got in chain.receiver.alerts(
        "GeminiBalanceAuthError", "firing")} == {"beta"}


def test_every_dashboard_query_returns_data(chain: Chain) -> None:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/gemini-balances.json").read_text())
    substitutions = {"$__rate_interval": "1m", "$account": ".*", "$currency": ".*"}
    queries = [target["expr"] for panel in dashboard["panels"] for target in
               panel.get("targets", [])]
    queries += [variable["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0]
                for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    for query in queries:
        for variable, value in substitutions.items():
            query = query.replace(variable, value)
        assert chain.prometheus.query(query), f"no data for {query}"


def test_alerts_resolve_once_the_faults_are_gone(chain: Chain) -> None:
    chain.sim("DELETE", "/_sim/faults", None)
    chain.sim("PUT", "/_sim/accounts/gamma/balances", {"USD": {"amount": "42.00"}})
    for alertname, labels, _ in EXPECTED_FIRING:
        wait_for(partial(resolved, chain, alertname, **labels),
                 f"{alertname} {labels} to be resolved", limit_seconds=120)
    SCENARIO["end"] = time.time()
    # Prometheus never stored a value from a stale reply (they carry amounts a million higher).
    series = chain.prometheus.query_range('gemini_balance_amount{account="alpha"}',
                                          SCENARIO["start"], SCENARIO["end"])
    assert {s["metric"]["currency"] for s in series} == {"BTC", "USD"}
    for one in series:
        values = {float(value) for _, value in one["values"]}
        assert values == {floored({"BTC": "5.123456789123", "USD": "15000.129"}[
            one["metric"]["currency"]], one["metric"]["currency"])}
    # The exporter recovered by itself, and no request ever carried a stale nonce.
    wait_for(lambda: chain.prometheus.query('gemini_account_up{account="delta"} == 1'),
             "delta to be up again")
    keys = chain.sim_state()["keys"]
    assert all(counters.get("invalid_nonce", 0) == 0 for counters in keys.values())


def test_a_requested_address_pages_and_resolves_once_it_is_removed(chain: Chain) -> None:
    wait_for(lambda: chain.prometheus.query(
        'gemini_approved_addresses{account="alpha", network="bitcoin", status="active"} == 1'),
        "alpha's allow-list in Prometheus")
    entry = {"network": "bitcoin", "address": "bc1qsomebodyelse", "label": "Unknown"}
    chain.sim("POST", "/_sim/accounts/gamma/approved-addresses", entry)
    pending = wait_for(partial(firing, chain, "GeminiBalanceApprovedAddressPending",
                               account="gamma", network="bitcoin"),
                       "GeminiBalanceApprovedAddressPending to reach the pager")
    assert {path for path, _ in pending} == {"/treasury-pager"}
    added = wait_for(partial(firing, chain, "GeminiBalanceApprovedAddressAdded",
                             account="gamma", network="bitcoin"),
                     "GeminiBalanceApprovedAddressAdded to reach the chat")
    assert {path for path, _ in added} == {"/treasury-chat"}
    # The baseline lists counted nothing: no other account's list was added to.
    assert {got["account"] for _, got in chain.receiver.alerts(
        "GeminiBalanceApprovedAddressAdded", "firing")} == {"gamma"}
    chain.sim("DELETE", "/_sim/accounts/gamma/approved-addresses", entry)
    wait_for(partial(resolved, chain, "GeminiBalanceApprovedAddressPending", account="gamma"),
             "GeminiBalanceApprovedAddressPending to be resolved", limit_seconds=120)


def test_a_withdrawal_pending_too_long_and_above_the_limit_pages_and_resolves(
    chain: Chain,
) -> None:
    withdrawal = chain.sim("POST", "/_sim/accounts/gamma/transfers", {
        "type": "Withdrawal", "status": "Pending", "currency": "BTC", "amount": "2",
        "destination": "bc1qsomewhere"})
    for alertname in ("GeminiBalanceWithdrawnAboveLimit",
                      "GeminiBalanceWithdrawalPendingTooLong"):
        deliveries = wait_for(partial(firing, chain, alertname, account="gamma", currency="BTC"),
                              f"{alertname} to reach the pager")
        assert {path for path, _ in deliveries} == {"/treasury-pager"}
    # alpha's pending withdrawal has no threshold: no page for it.
    assert {got["account"] for _, got in chain.receiver.alerts(
        "GeminiBalanceWithdrawalPendingTooLong", "firing")} == {"gamma"}
    chain.sim("PATCH", f"/_sim/accounts/gamma/transfers/{withdrawal['eid']}",
              {"status": "Complete"})
    wait_for(partial(resolved, chain, "GeminiBalanceWithdrawalPendingTooLong", account="gamma"),
             "GeminiBalanceWithdrawalPendingTooLong to be resolved", limit_seconds=120)
    # Counted once, in the status it was first seen in.
    assert chain.prometheus.query('gemini_transfers_total{account="gamma", currency="BTC", '
                                  'type="withdrawal"} == 1')


def test_a_streamed_change_reaches_prometheus(chain: Chain) -> None:
    wait_for(lambda: chain.prometheus.query('gemini_stream_up{key="solo"} == 1'),
             "the stream to be up in Prometheus")
    chain.sim("PUT", "/_sim/accounts/delta/balances", {"BTC": {"amount": "2.5"}})
    wait_for(lambda: chain.prometheus.query(
        'gemini_balance_amount{account="delta", currency="BTC"} == 2.5'),
        "the streamed change in Prometheus")
    assert chain.prometheus.query('gemini_stream_frames_total{key="solo"} > 0')


def test_a_stopped_exporter_raises_exporter_down_until_it_is_back(chain: Chain) -> None:
    assert Processes.stop(chain.exporter) == 0
    deliveries = wait_for(lambda: firing(chain, "GeminiBalanceExporterDown"),
                          "GeminiBalanceExporterDown to reach the webhook")
    assert {path for path, _ in deliveries} == {"/treasury-pager"}
    chain.exporter = chain.processes.start("exporter", chain.exporter_command)
    wait_for(lambda: resolved(chain, "GeminiBalanceExporterDown"),
             "GeminiBalanceExporterDown to be resolved")
