"""The simulator's control API under `/_sim/`: tests read the state, set balances and formats,
and inject or clear faults per account."""

import contextlib
import random
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from balance_exporter.simulator.private_api import STATE_KEY
from balance_exporter.simulator.state import (
    Fault,
    SimAccount,
    cast_number_format,
    cast_timestamp_format,
)


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
    })


@contextlib.contextmanager
def _bad_input_is_400() -> Iterator[None]:
    try:
        yield
    except (ValueError, TypeError) as error:
        raise web.HTTPBadRequest(text=str(error)) from None


async def control_set_balances(request: web.Request) -> web.Response:
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        account.set_balances(body)
    return web.json_response(account.describe())


async def control_patch_account(request: web.Request) -> web.Response:
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        if "timestamp_format" in body:
            account.timestamp_format = cast_timestamp_format(body["timestamp_format"])
        if "number_format" in body:
            account.number_format = cast_number_format(body["number_format"])
    return web.json_response(account.describe())


async def control_add_fault(request: web.Request) -> web.Response:
    account = _control_account(request)
    body = await _json_body(request)
    with _bad_input_is_400():
        account.faults.append(Fault.from_document(body if isinstance(body, dict) else {}))
    return web.json_response({"faults": len(account.faults)})


async def control_clear_faults(request: web.Request) -> web.Response:
    accounts = (
        [_control_account(request)] if "name" in request.match_info
        else list(request.app[STATE_KEY].accounts.values())
    )
    for account in accounts:
        account.faults.clear()
    return web.json_response({"cleared": [account.name for account in accounts]})


async def control_drift(request: web.Request) -> web.Response:
    request.app[STATE_KEY].drift(random.Random())
    return web.json_response({"drifted": True})


CONTROL_ROUTES = (
    web.get("/_sim/state", control_state),
    web.put("/_sim/accounts/{name}/balances", control_set_balances),
    web.patch("/_sim/accounts/{name}", control_patch_account),
    web.post("/_sim/accounts/{name}/faults", control_add_fault),
    web.delete("/_sim/accounts/{name}/faults", control_clear_faults),
    web.delete("/_sim/faults", control_clear_faults),
    web.post("/_sim/drift", control_drift),
)
