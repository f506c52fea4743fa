"""The simulator enforces Gemini's rules; requests here are signed by hand, not by the client."""

import asyncio
import base64
import hashlib
import hmac
import json
import random
import time
from collections.abc import AsyncIterator
from decimal import ROUND_DOWN, Decimal
from typing import Any

import aiohttp
import pytest

from balance_exporter.simulator.ratelimit import RateLimiter
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState, demo_document
from tests.helpers import (
    ACCOUNT_KEY,
    ACCOUNT_SECRET,
    MASTER_KEY,
    MASTER_SECRET,
    sim_call,
    sim_state,
    simulator_document,
)


class Caller:
    def __init__(self, http: aiohttp.ClientSession, base_url: str) -> None:
        self.http = http
        self.base_url = base_url
        self.nonce = int(time.time() * 1000)

    async def post(
        self, path: str, key: str = MASTER_KEY, secret: str = MASTER_SECRET,
        nonce: int | None = None, sign_with: str | None = None, request: str | None = None,
        **params: Any,
    ) -> tuple[int, Any, dict[str, str]]:
        if nonce is None:
            self.nonce += 1
            nonce = self.nonce
        payload = base64.b64encode(json.dumps(
            {"request": request or path, "nonce": nonce, **params}).encode())
        signature = hmac.new((sign_with or secret).encode(), payload, hashlib.sha384).hexdigest()
        headers = {"X-GEMINI-APIKEY": key, "X-GEMINI-PAYLOAD": payload.decode(),
                   "X-GEMINI-SIGNATURE": signature, "Content-Type": "text/plain"}
        async with self.http.post(self.base_url + path, headers=headers) as response:
            body = await response.read()
            try:
                document = json.loads(body)
            except ValueError:
                document = body
            return response.status, document, dict(response.headers)


@pytest.fixture
async def caller(simulator: RunningSimulator) -> AsyncIterator[Caller]:
    async with aiohttp.ClientSession() as http:
        yield Caller(http, simulator.url)


async def test_balances_for_a_master_key_account(caller: Caller) -> None:
    status, rows, _ = await caller.post("/v1/balances", account="alpha", showPendingBalances=True)
    assert status == 200
    assert [row["currency"] for row in rows] == ["BTC", "USD"]
    btc = rows[0]
    assert btc["amount"] == "5.123456789123"
    assert btc["pendingWithdrawal"] == "0.5"
    assert isinstance(btc["_timestamp"], int)


async def test_formats_per_account(caller: Caller) -> None:
    _, beta, _ = await caller.post("/v1/balances", account="beta")
    assert isinstance(beta[0]["amount"], float)
    assert beta[0]["_timestamp"].endswith("Z")
    assert "pendingWithdrawal" not in beta[0]
    _, delta, _ = await caller.post("/v1/balances", key=ACCOUNT_KEY, secret=ACCOUNT_SECRET)
    assert "_timestamp" not in delta[0]


async def test_server_timestamps_increase(caller: Caller) -> None:
    stamps = [(await caller.post("/v1/balances", account="alpha"))[1][0]["_timestamp"]
              for _ in range(3)]
    assert stamps == sorted(set(stamps))


@pytest.mark.parametrize(("overrides", "status", "reason"), [
    ({"sign_with": "wrong-secret"}, 400, "InvalidSignature"),
    ({"key": "master-unknown"}, 400, "InvalidSignature"),
    ({"request": "/v1/orders"}, 400, "EndpointMismatch"),
    ({"account": None}, 400, "MissingAccounts"),
    ({"account": "delta"}, 400, "InvalidAccountName"),
    ({"account": "nobody"}, 400, "InvalidAccountName"),
])
async def test_rejections(
    caller: Caller, overrides: dict[str, Any], status: int, reason: str
) -> None:
    params = {"account": "alpha", **overrides}
    if params["account"] is None:
        del params["account"]
    got_status, body, _ = await caller.post("/v1/balances", **params)
    assert (got_status, body["reason"]) == (status, reason)
    assert body["result"] == "error"


async def test_missing_headers_are_named(simulator: RunningSimulator) -> None:
    url = f"{simulator.url}/v1/balances"
    async with aiohttp.ClientSession() as http, http.post(url) as response:
        assert response.status == 400
        assert (await response.json())["reason"] == "MissingApikeyHeader"


async def test_nonces_must_increase_per_key(caller: Caller) -> None:
    assert (await caller.post("/v1/balances", account="alpha", nonce=1000))[0] == 200
    status, body, _ = await caller.post("/v1/balances", account="alpha", nonce=1000)
    assert (status, body["reason"]) == (400, "InvalidNonce")
    status, body, _ = await caller.post("/v1/balances", account="alpha", nonce=999)
    assert (status, body["reason"]) == (400, "InvalidNonce")
    # Another key has its own nonce sequence.
    status, _, _ = await caller.post("/v1/balances", key=ACCOUNT_KEY, secret=ACCOUNT_SECRET,
                                     nonce=500)
    assert status == 200


async def test_time_based_keys_need_a_nonce_within_30_seconds() -> None:
    document = {
        "keys": [{"api_key": "account-tb", "api_secret": "s", "accounts": ["a"],
                  "nonce": "seconds"}],
        "accounts": [{"name": "a", "balances": {}}],
    }
    running = await start_simulator(SimState.from_document(document))
    try:
        async with aiohttp.ClientSession() as http:
            caller = Caller(http, running.url)
            now = int(time.time())
            assert (await caller.post("/v1/balances", "account-tb", "s", nonce=now))[0] == 200
            status, body, _ = await caller.post("/v1/balances", "account-tb", "s", nonce=now + 60)
            assert (status, body["reason"]) == (400, "InvalidNonce")
            status, body, _ = await caller.post("/v1/balances", "account-tb", "s",
                                                nonce=int(time.time() * 1000))
            assert (status, body["reason"]) == (400, "InvalidNonce")
    finally:
        await running.close()


async def test_rate_limit_queues_then_answers_429_with_retry_after() -> None:
    # A slow limit (one a second, one queued) so that the burst needs no tight timing.
    document = {
        "keys": [{"api_key": "account-slow", "api_secret": "s", "accounts": ["a"],
                  "rate_limit_per_minute": 60, "rate_limit_queued": 1}],
        "accounts": [{"name": "a", "balances": {}}],
    }
    running = await start_simulator(SimState.from_document(document))
    try:
        async with aiohttp.ClientSession() as http:
            caller = Caller(http, running.url)
            results = await asyncio.gather(*(
                caller.post("/v1/balances", "account-slow", "s") for _ in range(4)))
    finally:
        await running.close()
    # One answered at once and one queued (whatever their nonces made of them), two refused.
    assert sum(status != 429 for status, _, _ in results) == 2
    limited = [(body, headers) for status, body, headers in results if status == 429]
    assert len(limited) == 2
    assert all(body["reason"] == "RateLimit" for body, _ in limited)
    assert all(int(headers["Retry-After"]) >= 1 for _, headers in limited)


def test_limiter_admits_600_a_minute() -> None:
    limiter = RateLimiter(per_minute=600, queued=5)
    delays = [limiter.admit(now=i * 0.1) for i in range(600)]
    assert all(delay is not None and delay < 1e-9 for delay in delays)
    assert [limiter.admit(now=60.0) for _ in range(7)][-1] is None


async def test_counted_faults_are_served_then_run_out(
    caller: Caller, simulator: RunningSimulator
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{simulator.url}/_sim/accounts/alpha/faults",
                             json={"kind": "status", "status": 503, "reason": "Maintenance",
                                   "count": 1}) as response:
            assert response.status == 200
        async with http.post(f"{simulator.url}/_sim/accounts/alpha/faults",
                             json={"kind": "nonsense"}) as response:
            assert response.status == 400
    status, body, _ = await caller.post("/v1/balances", account="alpha")
    assert (status, body["reason"]) == (503, "Maintenance")
    assert (await caller.post("/v1/balances", account="alpha"))[0] == 200


async def test_faults_until_cleared_stay_until_the_delete_endpoints_clear_them(
    caller: Caller, simulator: RunningSimulator, http: aiohttp.ClientSession
) -> None:
    fault = {"kind": "status", "status": 500, "reason": "System"}
    for account in ("alpha", "beta", "gamma"):
        async with http.post(f"{simulator.url}/_sim/accounts/{account}/faults", json=fault):
            pass

    async def status_of(account: str) -> int:
        return (await caller.post("/v1/balances", account=account))[0]

    assert [await status_of("alpha") for _ in range(3)] == [500, 500, 500]
    async with http.delete(f"{simulator.url}/_sim/accounts/alpha/faults") as response:
        assert (await response.json()) == {"cleared": ["alpha"]}
    assert await status_of("alpha") == 200
    assert await status_of("beta") == 500  # only alpha's were cleared
    async with http.delete(f"{simulator.url}/_sim/faults") as response:
        assert set((await response.json())["cleared"]) >= {"beta", "gamma"}
    assert [await status_of("beta"), await status_of("gamma")] == [200, 200]
    async with http.delete(f"{simulator.url}/_sim/accounts/nobody/faults") as response:
        assert response.status == 404


async def test_stale_fault_serves_an_older_stamp_and_other_values(
    caller: Caller, simulator: RunningSimulator
) -> None:
    _, fresh, _ = await caller.post("/v1/balances", account="alpha")
    async with aiohttp.ClientSession() as http:
        await http.post(f"{simulator.url}/_sim/accounts/alpha/faults",
                        json={"kind": "stale", "count": 1})
    _, stale, _ = await caller.post("/v1/balances", account="alpha")
    assert stale[0]["_timestamp"] < fresh[0]["_timestamp"]
    assert stale[0]["amount"] != fresh[0]["amount"]


async def test_notional_balances_and_account_list(caller: Caller) -> None:
    status, rows, _ = await caller.post("/v1/notionalbalances/usd", account="gamma")
    assert status == 200
    (row,) = rows
    assert isinstance(row.pop("_timestamp"), int)
    assert row == {"currency": "USD", "amount": "42.00", "amountNotional": "42.0000000000",
                   "available": "42.00", "availableNotional": "42.0000000000",
                   "availableForWithdrawal": "42.00",
                   "availableForWithdrawalNotional": "42.0000000000"}
    status, body, _ = await caller.post("/v1/notionalbalances/USD", account="gamma")
    assert (status, body["reason"]) == (400, "InvalidCurrency")  # the path is lower case
    # Newest first; the next page by `timestamp`: the accounts created at or before it.
    status, accounts, _ = await caller.post("/v1/account/list", limit_accounts=2)
    assert status == 200
    assert [row["account"] for row in accounts] == ["gamma", "beta"]
    assert {(row["type"], row["status"]) for row in accounts} == {("exchange", "open")}
    status, older, _ = await caller.post("/v1/account/list", limit_accounts=2,
                                         timestamp=accounts[-1]["created"])
    assert [row["account"] for row in older] == ["beta", "alpha"]
    status, body, _ = await caller.post("/v1/account/list", timestamp="yesterday")
    assert (status, body["reason"]) == (400, "InvalidParameter")
    status, body, _ = await caller.post("/v1/account/list", key=ACCOUNT_KEY,
                                        secret=ACCOUNT_SECRET)
    assert (status, body["reason"]) == (400, "InvalidApiKey")


async def test_prices_staking_and_accounts_are_set_through_the_control_api(
    caller: Caller, simulator: RunningSimulator
) -> None:
    http, control = caller.http, simulator.url + "/_sim"
    async with http.put(f"{control}/prices", json={"BTC": "70000.5"}) as response:
        assert response.status == 200
    _, rows, _ = await caller.post("/v1/notionalbalances/usd", account="alpha")
    assert rows[0]["amountNotional"] == str(
        (Decimal("5.123456789123") * Decimal("70000.5")).quantize(Decimal("1e-10"), ROUND_DOWN))
    staking = {"ETH": {"balance": "32.5", "providers": {"p-1": "20", "p-2": "12.5"}}}
    async with http.put(f"{control}/accounts/alpha/staking", json=staking) as response:
        assert response.status == 200
    _, rows, _ = await caller.post("/v1/balances/staking", account="alpha")
    assert (rows[0]["type"], rows[0]["balanceByProvider"]) == (
        "Staking", {"p-1": "20", "p-2": "12.5"})
    async with http.patch(f"{control}/accounts/alpha",
                          json={"provider_format": "object"}) as response:
        assert response.status == 200
    _, rows, _ = await caller.post("/v1/balances/staking", account="alpha")
    assert rows[0]["balanceByProvider"]["p-1"] == {"balance": "20"}
    async with http.post(f"{control}/accounts", json={"name": "new-desk", "balances": {
            "USD": {"amount": "5"}}}) as response:
        assert response.status == 200
    _, accounts, _ = await caller.post("/v1/account/list")
    assert accounts[0]["account"] == "new-desk"  # the newest first
    async with http.patch(f"{control}/accounts/new-desk", json={"status": "closed"}) as response:
        assert response.status == 200
    _, accounts, _ = await caller.post("/v1/account/list")
    assert accounts[0]["status"] == "closed"
    status, body, _ = await caller.post("/v1/balances", account="new-desk")
    assert (status, body["reason"]) == (400, "InvalidAccountName")


async def test_faults_are_served_on_the_endpoint_they_name(
    caller: Caller, simulator: RunningSimulator
) -> None:
    http, control = caller.http, simulator.url + "/_sim"
    for endpoint in ("notional", "staking"):
        async with http.post(f"{control}/accounts/alpha/faults",
                             json={"kind": "status", "endpoint": endpoint, "count": 1}) as reply:
            assert reply.status == 200
    async with http.post(f"{control}/keys/{MASTER_KEY}/faults",
                         json={"kind": "html", "count": 1}) as response:
        assert response.status == 200
    assert (await caller.post("/v1/balances", account="alpha"))[0] == 200
    assert (await caller.post("/v1/notionalbalances/usd", account="alpha"))[0] == 500
    assert (await caller.post("/v1/balances/staking", account="alpha"))[0] == 500
    assert (await caller.post("/v1/account/list"))[0] == 502
    assert (await caller.post("/v1/account/list"))[0] == 200


def test_demo_state_is_valid_and_its_secrets_are_fresh() -> None:
    first, second = SimState.from_document(demo_document()), SimState.from_document(
        demo_document())
    assert len(first.keys) == 2
    assert {k.api_secret for k in first.keys.values()}.isdisjoint(
        k.api_secret for k in second.keys.values())


def test_drift_keeps_available_within_amount() -> None:
    state = SimState.from_document(demo_document())
    rng = random.Random(5)
    for _ in range(50):
        state.drift(rng)
    for account in state.accounts.values():
        for balance in account.balances.values():
            assert 0 <= balance.values["available"] <= balance.values["amount"]


async def test_withdrawal_allow_lists_by_network_with_both_scopes_and_every_status(
    caller: Caller, simulator: RunningSimulator,
) -> None:
    http, control = caller.http, f"{simulator.url}/_sim/accounts"
    path = "/v1/approvedAddresses/account/bitcoin"
    status, body, _ = await caller.post(path, account="alpha")
    assert (status, body) == (200, {"approvedAddresses": []})
    # A requested address waits out the 7-day hold; a group one shows in every account of the
    # group; one waiting for a second administrator.
    requested = {"network": "bitcoin", "address": "bc1qrequested", "label": "new desk"}
    async with http.post(f"{control}/alpha/approved-addresses", json=requested) as reply:
        assert reply.status == 200
        assert (await reply.json())["status"] == "pending-time"
    for entry in ({"network": "bitcoin", "address": "bc1qgroup", "scope": "group",
                   "status": "active"},
                  {"network": "bitcoin", "address": "bc1qmua", "status": "pending-mua"},
                  {"network": "ethereum", "address": "0xabc", "status": "active"}):
        await sim_call(http, "POST", f"{control}/beta/approved-addresses", entry)
    _, body, _ = await caller.post(path, account="alpha")
    entries = {entry["address"]: entry for entry in body["approvedAddresses"]}
    assert {address: (entry["scope"], entry["status"]) for address, entry in entries.items()} == {
        "bc1qrequested": ("account", "pending-time"), "bc1qgroup": ("group", "active")}
    assert entries["bc1qrequested"]["label"] == "new desk"
    assert entries["bc1qrequested"]["createdAt"].isdigit()  # milliseconds, as a string
    _, body, _ = await caller.post(path, account="beta")
    assert {entry["address"] for entry in body["approvedAddresses"]} == {"bc1qgroup", "bc1qmua"}
    # Approved, then removed.
    await sim_call(http, "PATCH", f"{control}/alpha/approved-addresses",
                   {"network": "bitcoin", "address": "bc1qrequested", "status": "active"})
    _, body, _ = await caller.post(path, account="alpha")
    assert {entry["address"]: entry["status"] for entry in body["approvedAddresses"]} == {
        "bc1qrequested": "active", "bc1qgroup": "active"}
    await sim_call(http, "DELETE", f"{control}/alpha/approved-addresses",
                   {"network": "bitcoin", "address": "bc1qrequested"})
    _, body, _ = await caller.post(path, account="alpha")
    assert [entry["address"] for entry in body["approvedAddresses"]] == ["bc1qgroup"]
    # One address once per scope; an unknown network; a master key must name its account.
    async with http.post(f"{control}/beta/approved-addresses", json={
            "network": "bitcoin", "address": "bc1qmua"}) as reply:
        assert reply.status == 400
    status, body, _ = await caller.post("/v1/approvedAddresses/account/Bitcoin", account="alpha")
    assert (status, body["reason"]) == (400, "InvalidNetwork")
    status, body, _ = await caller.post(path)
    assert (status, body["reason"]) == (400, "MissingAccounts")
    status, body, _ = await caller.post(path, key=ACCOUNT_KEY, secret=ACCOUNT_SECRET)
    assert (status, body) == (200, {"approvedAddresses": []})


def test_a_state_file_allow_list_entry_is_checked() -> None:
    document = simulator_document()
    document["accounts"][0]["approved_addresses"] = [{"network": "bitcoin", "address": ""}]
    with pytest.raises(ValueError, match="accounts\\[0\\]: address"):
        SimState.from_document(document)
    document["accounts"][0]["approved_addresses"] = [
        {"network": "bitcoin", "address": "bc1q", "status": "pending-time", "created_ms": 5}]
    (entry,) = SimState.from_document(document).accounts["alpha"].approved_addresses
    assert entry.describe()["createdAt"] == "5"


async def test_transfers_are_listed_newest_first_after_a_time_and_one_request_per_5_s(
    caller: Caller, simulator: RunningSimulator,
) -> None:
    clock = [1000.0]
    simulator.state.accounts["alpha"].transfers_spacing.clock = lambda: clock[0]
    http, control = caller.http, f"{simulator.url}/_sim/accounts/alpha/transfers"
    eids = []
    for index, (kind, currency) in enumerate((("Deposit", "USD"), ("Withdrawal", "BTC"),
                                              ("Reward", "ETH"), ("AdminCredit", "USD"))):
        async with http.post(control, json={"type": kind, "currency": currency, "amount": "1.5",
                                            "timestamp_ms": 5000 + index}) as reply:
            assert reply.status == 200
            eids.append((await reply.json())["eid"])

    async def page(**params: Any) -> tuple[int, Any]:
        clock[0] += 5.0  # the 5 s rule
        status, body, _ = await caller.post("/v2/transfers", account="alpha", **params)
        return status, body
    status, rows = await page(timestamp=5000, limit_transfers=2)
    assert status == 200
    assert [row["eid"] for row in rows] == [eids[3], eids[2]]  # newest first, after 5000
    assert rows[0] == {"type": "AdminCredit", "status": "Complete", "timestampms": 5003,
                       "eid": eids[3], "currency": "USD", "amount": "1.5"}
    _, rows = await page(timestamp=4999, currency="usd")
    assert [row["eid"] for row in rows] == [eids[3], eids[0]]
    # Cancelled transfers are no longer listed.
    await sim_call(http, "PATCH", f"{control}/{eids[3]}", {"status": "Cancelled"})
    _, rows = await page(timestamp=4999)
    assert [row["eid"] for row in rows] == [eids[2], eids[1], eids[0]]
    status, body = await page(limit_transfers=51)
    assert (status, body["reason"]) == (400, "InvalidParameter")
    # One request per 5 s per account, shared with /v1/custodyaccountfees; other accounts are
    # not held up.
    status, _, _ = await caller.post("/v1/custodyaccountfees", account="alpha")
    assert status == 429
    status, _, _ = await caller.post("/v2/transfers", account="beta")  # its own clock
    assert status == 200
    clock[0] += 4.9
    status, _, headers = await caller.post("/v2/transfers", account="alpha")
    assert (status, headers["Retry-After"]) == (429, "5")
    clock[0] += 0.1
    status, _, _ = await caller.post("/v1/custodyaccountfees", account="alpha")
    assert status == 200
    state = await sim_state(http, simulator)
    assert state["accounts"]["alpha"]["transfers_refused"] == 2


def test_a_state_file_transfer_is_checked() -> None:
    document = simulator_document()
    document["accounts"][0]["transfers"] = [{"type": "Gift", "currency": "USD", "amount": "1"}]
    with pytest.raises(ValueError, match="accounts\\[0\\]: type"):
        SimState.from_document(document)
    document["accounts"][0]["transfers"] = [{"type": "Deposit", "currency": "USD",
                                             "amount": "-1"}]
    with pytest.raises(ValueError, match="amount"):
        SimState.from_document(document)
