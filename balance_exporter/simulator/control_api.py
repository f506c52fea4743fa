"""The simulator's control API under `/_sim/`: tests read the state, set balances and formats,
and inject or clear faults per account."""

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web

from balance_exporter.simulator.private_api import STATE_KEY
from balance_exporter.simulator.state import (
    APPROVED_ADDRESS_STATUSES,
    Fault,
    FaultQueue,
    SimAccount,
    SimKey,
    key_roles,
)
from balance_exporter.simulator.transfers import TRANSFER_STATUSES, SimTransfer


async def _json_body(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="body is not JSON") from None


def _control_account(request: web.Request) -> SimAccount:
    name = request.match_info["name"]
    account = request.app[STATE_KEY].accounts.get(name)
    if account is None:
        raise web.HTTPNotFound(text=f"no account {name!r}")
    return account


async def control_state(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({
        "accounts": {name: account.describe() for name, account in state.accounts.items()},
        "keys": {key.api_key: {**key.counters, "last_nonce": key.last_nonce}
                 for key in state.keys.values()},
        "usd_prices": {currency: str(price) for currency, price in state.usd_prices.items()},
    })


@contextlib.contextmanager
def _bad_input_is_400() -> Iterator[None]:
    try:
        yield
    except (ValueError, TypeError) as error:
        raise web.HTTPBadRequest(text=str(error)) from None


async def _replace_rows(
    request: web.Request, replace: Callable[[SimAccount, Any], None]
) -> web.Response:
    """Replace an account's balances or staking rows with the body's."""
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        replace(account, body)
    return web.json_response(account.describe())


async def control_set_balances(request: web.Request) -> web.Response:
    response = await _replace_rows(request, SimAccount.set_balances)
    account = _control_account(request)
    request.app[STATE_KEY].balances_changed(account, sorted(account.balances))
    return response


async def control_set_staking(request: web.Request) -> web.Response:
    return await _replace_rows(request, SimAccount.set_staking)


async def control_patch_account(request: web.Request) -> web.Response:
    """Formats, `status` (open or closed: a closed account leaves no listing, it shows closed)
    and `display_name`."""
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        if not isinstance(body, dict):
            raise ValueError("expected a JSON object")
        account.patch(body)
    return web.json_response(account.describe())


async def control_add_account(request: web.Request) -> web.Response:
    """Open an account: the state document's account entry, plus `keys` (the API keys whose
    group it joins; every master key when left out)."""
    body = await _json_body(request)
    with _bad_input_is_400():
        account = request.app[STATE_KEY].add_account(body)
    return web.json_response(account.describe())


async def control_request_address(request: web.Request) -> web.Response:
    """Request an address for the account's allow-list: `network`, `address`, and optionally
    `label`, `scope` (account or group) and `status` (pending-time: the 7-day hold)."""
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        entry = account.add_approved_address(body, int(time.time() * 1000))
    return web.json_response(entry.describe())


async def control_set_address_status(request: web.Request) -> web.Response:
    """Change an entry's `status` (active approves it), named by `network`, `address` and
    `scope`."""
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        entry = account.approved_address(body)
        status = body.get("status")
        if status not in APPROVED_ADDRESS_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(APPROVED_ADDRESS_STATUSES)}")
        entry.status = status
    return web.json_response(entry.describe())


async def control_remove_address(request: web.Request) -> web.Response:
    """Remove an entry from the allow-list, named by `network`, `address` and `scope`."""
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        account.approved_addresses.remove(account.approved_address(body))
    return web.json_response({"approved_addresses": len(account.approved_addresses)})


async def control_add_transfer(request: web.Request) -> web.Response:
    """Add a transfer: `type`, `currency`, `amount`, and optionally `status` (Complete),
    `timestamp_ms` (now), `network`, `destination` and `tx_hash`. Answers its row with its eid."""
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        transfer = SimTransfer.from_document(body, int(time.time() * 1000))
        account.transfers.append(transfer)
    return web.json_response(transfer.describe())


async def control_set_transfer_status(request: web.Request) -> web.Response:
    """Change a transfer's `status` (Cancelled: it is no longer listed)."""
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        transfer = account.transfer(int(request.match_info["eid"]))
        status = body.get("status") if isinstance(body, dict) else None
        if not isinstance(status, str) or status not in TRANSFER_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(TRANSFER_STATUSES)}")
        transfer.status = status
    return web.json_response(transfer.describe())


async def control_set_prices(request: web.Request) -> web.Response:
    body = await _json_body(request)
    state = request.app[STATE_KEY]
    with _bad_input_is_400():
        state.set_prices(body)
    return web.json_response({name: str(price) for name, price in state.usd_prices.items()})


def _queue_fault(queue: FaultQueue, body: Any) -> web.Response:
    with _bad_input_is_400():
        queue.faults.append(Fault.from_document(body if isinstance(body, dict) else {}))
    return web.json_response({"faults": len(queue.faults)})


async def control_add_fault(request: web.Request) -> web.Response:
    """A fault on one of the account's endpoints (`endpoint`, balances by default)."""
    account = _control_account(request)
    return _queue_fault(account.faults, await _json_body(request))


async def control_add_key_fault(request: web.Request) -> web.Response:
    """A fault on the key's /v1/account/list (`"endpoint": "account_list_page"`: on its later
    pages only; `"roles"`: on its /v1/roles)."""
    key = _key(request)
    body = await _json_body(request)
    if isinstance(body, dict) and body.get("endpoint") not in ("account_list_page", "roles"):
        body = {**body, "endpoint": "account_list"}
    return _queue_fault(key.faults, body)


async def control_set_key_roles(request: web.Request) -> web.Response:
    """Give the key other roles (a list of Auditor, Trader, FundManager, AccountAdmin)."""
    key = _key(request)
    try:
        key.roles = key_roles(await _json_body(request), key.is_master)
    except ValueError as error:
        raise web.HTTPBadRequest(text=str(error)) from None
    return web.json_response({"roles": sorted(key.roles)})


def _key(request: web.Request) -> SimKey:
    key: SimKey | None = request.app[STATE_KEY].keys.get(request.match_info["api_key"])
    if key is None:
        raise web.HTTPNotFound(text="no such API key")
    return key


async def control_clear_faults(request: web.Request) -> web.Response:
    accounts = (
        [_control_account(request)] if "name" in request.match_info
        else list(request.app[STATE_KEY].accounts.values())
    )
    for account in accounts:
        account.faults.faults.clear()
    if "name" not in request.match_info:
        for key in request.app[STATE_KEY].keys.values():
            key.faults.faults.clear()
    return web.json_response({"cleared": [account.name for account in accounts]})


async def control_drift(request: web.Request) -> web.Response:
    request.app[STATE_KEY].drift(random.Random())
    return web.json_response({"drifted": True})


CONTROL_ROUTES = (
    web.get("/_sim/state", control_state),
    web.put("/_sim/accounts/{name}/balances", control_set_balances),
    web.patch("/_sim/accounts/{name}", control_patch_account),
    web.post("/_sim/accounts", control_add_account),
    web.put("/_sim/accounts/{name}/staking", control_set_staking),
    web.put("/_sim/prices", control_set_prices),
    web.post("/_sim/keys/{api_key}/faults", control_add_key_fault),
    web.put("/_sim/keys/{api_key}/roles", control_set_key_roles),
    web.post("/_sim/accounts/{name}/faults", control_add_fault),
    web.post("/_sim/accounts/{name}/approved-addresses", control_request_address),
    web.patch("/_sim/accounts/{name}/approved-addresses", control_set_address_status),
    web.delete("/_sim/accounts/{name}/approved-addresses", control_remove_address),
    web.post("/_sim/accounts/{name}/transfers", control_add_transfer),
    web.patch(r"/_sim/accounts/{name}/transfers/{eid:\d+}", control_set_transfer_status),
    web.delete("/_sim/accounts/{name}/faults", control_clear_faults),
    web.delete("/_sim/faults", control_clear_faults),
    web.post("/_sim/drift", control_drift),
)
