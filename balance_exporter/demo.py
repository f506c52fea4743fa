"""The demo and the stand-alone simulator: the only exporter module that imports the simulator.

`demo` runs the simulator and the exporter polling it in one process; `simulate` runs the
simulator alone and can write an exporter config that points at it.
"""

from pathlib import Path
from typing import Any

import yaml

from balance_exporter.config import build_config
from balance_exporter.files import write_private_file
from balance_exporter.server import ListenAddress, WebOptions
from balance_exporter.service import Service, run_until_signalled, wait_for_stop_signal
from balance_exporter.simulator.server import start_simulator
from balance_exporter.simulator.state import SimState, demo_document


def demo_exporter_document(simulator_state: SimState, base_url: str) -> dict[str, Any]:
    """An exporter config for the demo simulator: its master key discovers the group's accounts
    (one of them configured with alert thresholds), and its account-scoped key; every account's
    value in USD, its staked coins, its bitcoin and ethereum withdrawal allow-lists and its
    money movements; the account key streams balances@account."""
    master, account_key = simulator_state.keys.values()
    return {
        "gemini": {"base_url": base_url, "timeout_seconds": 5,
                   "websocket_url": base_url.replace("http", "ws", 1) + "/"},
        "notional": {"currency": "USD", "interval_seconds": 15},
        "approved_addresses": {"networks": ["bitcoin", "ethereum"]},
        "transfers": {"interval_seconds": 30},
        "keys": [
            {"name": "treasury", "api_key": master.api_key, "api_secret": master.api_secret,
             "requests_per_second": 2,
             "discover": {"refresh_seconds": 30, "defaults": {
                 "interval_seconds": 5, "show_pending_balances": True,
                 "staking_interval_seconds": 30, "approved_addresses_interval_seconds": 30,
                 "max_withdrawal_pending_seconds": 3600,
                 "max_withdrawn_per_hour": {"BTC": 2, "USD": 100000}}}},
            {"name": "savings", "api_key": account_key.api_key,
             "api_secret": account_key.api_secret, "requests_per_second": 1,
             "nonce": "seconds", "stream": {"reconcile_interval_seconds": 60}},
        ],
        "accounts": [
            {"key": "treasury", "account": "primary", "name": "treasury-primary",
             "min_available": {"USD": 1000, "BTC": 1}, "max_available_drop_ratio": 0.5,
             "min_available_notional": 100000},
            {"key": "savings", "name": "savings", "interval_seconds": 10,
             "staking_interval_seconds": 30, "approved_addresses_interval_seconds": 30},
        ],
    }


def generic_exporter_document(state: SimState, base_url: str) -> dict[str, Any]:
    """An exporter config that polls every exchange account of every key of a simulator."""
    keys, accounts = [], []
    for index, key in enumerate(state.keys.values()):
        name = f"key{index}"
        keys.append({"name": name, "api_key": key.api_key, "api_secret": key.api_secret,
                     "nonce": key.nonce})
        for account in key.accounts:
            if state.accounts[account].type == "exchange":
                accounts.append({"key": name, "account": account if key.is_master else None,
                                 "name": account})
    return {"gemini": {"base_url": base_url}, "keys": keys, "accounts": accounts}


def with_secret_files(document: dict[str, Any], config_path: Path) -> dict[str, Any]:
    """`document` with each key's inline secret moved to a file of its own beside
    `config_path` (mode 0600), named in `api_secret_file` relative to the config."""
    keys = []
    for key in document["keys"]:
        key = dict(key)
        secret_file = config_path.with_name(f"{config_path.stem}.{key['name']}.secret")
        write_private_file(secret_file, key.pop("api_secret") + "\n")
        keys.append({**key, "api_secret_file": secret_file.name})
    return {**document, "keys": keys}


async def run_demo(web_options: WebOptions, drift_seconds: float) -> None:
    simulator = await start_simulator(SimState.from_document(demo_document()),
                                      drift_seconds=drift_seconds)
    try:
        config = build_config(demo_exporter_document(simulator.state, simulator.url), {})
        service = Service(config, None, web_options)

        def announce() -> None:
            print(f"balance-exporter demo: simulator at {simulator.url}\n"
                  f"Open {service.url}/ (landing page) or {service.url}"
                  f"{web_options.telemetry_path} (metrics). Ctrl-C stops.", flush=True)

        await run_until_signalled(service, on_started=announce)
    finally:
        await simulator.close()


async def run_simulator(
    listen: ListenAddress, state_document: Any | None, drift_seconds: float,
    write_config: Path | None,
) -> None:
    """Serve the simulator (the demo's world without a state document) until SIGTERM or SIGINT.
    Raises OSError or ValueError for a state or an address that cannot be used."""
    if state_document is not None and not isinstance(state_document, dict):
        raise ValueError("the state file must hold a mapping with keys and accounts")
    state = SimState.from_document(state_document or demo_document())
    simulator = await start_simulator(state, listen.host or "0.0.0.0", listen.port,  # noqa: S104
                                      drift_seconds=drift_seconds)
    try:
        if write_config:
            exporter_document = (generic_exporter_document(state, simulator.url) if state_document
                                 else demo_exporter_document(state, simulator.url))
            write_private_file(write_config, yaml.safe_dump(
                with_secret_files(exporter_document, write_config), sort_keys=False))
            print(f"Exporter config for this simulator run written to {write_config}",
                  flush=True)
        print(f"Gemini simulator at {simulator.url}", flush=True)
        await wait_for_stop_signal()
    finally:
        await simulator.close()
