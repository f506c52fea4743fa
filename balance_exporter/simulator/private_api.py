"""The simulated Gemini's private REST API: the signed endpoints the exporter uses, with Gemini's
header, signature, nonce, role and rate-limit checks, and the faults injected per account."""

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import json
import time
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any

from aiohttp import web

from balance_exporter.simulator.state import (
    APPROVED_ADDRESS_NETWORKS,
    Fault,
    SimAccount,
    SimKey,
    SimState,
)
from balance_exporter.simulator.transfers import ACCOUNT_SPACING_SECONDS, transfers_page

STATE_KEY = web.AppKey("sim_state", SimState)
TIME_BASED_NONCE_WINDOW_SECONDS = 30
STALE_OFFSET_NS = 5_000_000_000
# Notional values go out with more places than any currency has: the exporter floors them.
NOTIONAL_QUANTUM = Decimal("1e-10")
RowsAt = Callable[[int, bool], list[dict[str, Any]]]
HUGE_CHUNK_BYTES = 1024 * 1024


class SimError(Exception):
    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.response = web.json_response(
            {"result": "error", "reason": reason, "message": message},
            status=status,
            headers=headers,
        )


class ServerClock:
    """Gemini's `_timestamp`: nanoseconds that only go forwards."""

    def __init__(self) -> None:
        self._last = 0

    def stamp_ns(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        return self._last


CLOCK_KEY = web.AppKey("sim_clock", ServerClock)


def _stamp_text(stamp_ns: int) -> str:
    seconds, nanos = divmod(stamp_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{moment}.{nanos // 1000:06d}Z"


def signed_by(key: SimKey, payload: bytes, signature: str) -> bool:
    """Whether `signature` is the key's: hex HMAC-SHA384 of the base64 payload."""
    expected = hmac.new(key.api_secret.encode(), payload, hashlib.sha384).hexdigest()
    return hmac.compare_digest(expected, signature.lower())


def _authenticate(request: web.Request, state: SimState) -> tuple[SimKey, dict[str, Any]]:
    """Gemini's header, signature and payload checks, in Gemini's order."""
    headers = request.headers
    for header, reason in (("X-GEMINI-APIKEY", "MissingApikeyHeader"),
                           ("X-GEMINI-PAYLOAD", "MissingPayloadHeader"),
                           ("X-GEMINI-SIGNATURE", "MissingSignatureHeader")):
        if not headers.get(header):
            raise SimError(400, reason, f"header {header} is missing")
    key = state.keys.get(headers["X-GEMINI-APIKEY"])
    if key is None:
        raise SimError(400, "InvalidSignature", "unknown API key")
    encoded = headers["X-GEMINI-PAYLOAD"].encode()
    if not signed_by(key, encoded, headers["X-GEMINI-SIGNATURE"]):
        key.count("invalid_signature")
        raise SimError(400, "InvalidSignature", "signature does not match the payload")
    try:
        payload = json.loads(base64.b64decode(encoded, validate=True))
    except (binascii.Error, ValueError):
        raise SimError(400, "InvalidJson", "payload is not base64 JSON") from None
    if not isinstance(payload, dict):
        raise SimError(400, "InvalidJson", "payload is not a JSON object")
    if payload.get("request") != request.path:
        raise SimError(400, "EndpointMismatch",
                       f"payload request {payload.get('request')!r} is not {request.path!r}")
    return key, payload


def _check_nonce(key: SimKey, payload: dict[str, Any]) -> None:
    raw = payload.get("nonce")
    if raw is None:
        raise SimError(400, "MissingNonce", "payload has no nonce")
    try:
        nonce = int(raw)
    except (TypeError, ValueError):
        raise SimError(400, "InvalidNonce", f"nonce {raw!r} is not a number") from None
    if key.nonce == "seconds" and abs(nonce - time.time()) > TIME_BASED_NONCE_WINDOW_SECONDS:
        key.count("invalid_nonce")
        raise SimError(400, "InvalidNonce", f"time-based nonce {nonce} is not within 30 s of now")
    if nonce <= key.last_nonce:
        key.count("invalid_nonce")
        raise SimError(400, "InvalidNonce",
                       f"Nonce '{nonce}' has not increased since your last call to the API.")
    key.last_nonce = nonce


async def _admit(
    request: web.Request, needs_role: bool = True
) -> tuple[SimKey, dict[str, Any]]:
    """Everything a private request passes before its endpoint runs."""
    state = request.app[STATE_KEY]
    key, payload = _authenticate(request, state)
    key.count("requests")
    key.count(f"requests {request.path}")
    now = time.monotonic()
    delay = key.limiter.admit(now)
    if delay is None:
        key.count("rate_limited")
        raise SimError(429, "RateLimit", "Requests were made too frequently",
                       {"Retry-After": str(key.limiter.retry_after(now))})
    _check_nonce(key, payload)
    if needs_role and not key.roles & {"Auditor", "Trader", "FundManager"}:
        raise SimError(403, "MissingRole", "API key lacks a role for this endpoint")
    if delay > 0:
        await asyncio.sleep(delay)
    return key, payload


def _account_for(key: SimKey, payload: dict[str, Any], state: SimState) -> SimAccount:
    name = payload.get("account")
    if key.is_master and name is None:
        raise SimError(400, "MissingAccounts", "a master key must name an account")
    name = name or key.accounts[0]
    if name not in key.accounts:
        raise SimError(400, "InvalidAccountName", f"no account {name!r} in this group")
    account = state.accounts[name]
    if account.type != "exchange":
        raise SimError(400, "InvalidAccountName", f"{name!r} is a custody account")
    if account.status != "open":
        raise SimError(400, "InvalidAccountName", f"{name!r} is closed")
    return account


def _number(value: Decimal, account: SimAccount) -> str | float:
    return float(value) if account.number_format == "number" else str(value)


def _stamped(row: dict[str, Any], account: SimAccount, stamp_ns: int) -> dict[str, Any]:
    if account.timestamp_format == "ns":
        row["_timestamp"] = stamp_ns
    elif account.timestamp_format == "iso":
        row["_timestamp"] = _stamp_text(stamp_ns)
    return row


def _distorted(value: Decimal, distort: bool) -> Decimal:
    # A stale or wrong reply carries numbers no good reply has, so a test sees if it got in.
    return value + 1_000_000 if distort else value


def _balance_rows(account: SimAccount, show_pending: bool) -> RowsAt:
    fields = ["amount", "available", "availableForWithdrawal"]
    if show_pending:
        fields += ["pendingWithdrawal", "pendingDeposit"]

    def rows(stamp_ns: int, distort: bool) -> list[dict[str, Any]]:
        return [_stamped({"type": account.type, "currency": currency, **{
            name: _number(_distorted(balance.values[name], distort), account)
            for name in fields}}, account, stamp_ns)
            for currency, balance in account.balances.items()]
    return rows


def _notional_rows(account: SimAccount, prices: dict[str, Decimal], quote: str) -> RowsAt:
    def rows(stamp_ns: int, distort: bool) -> list[dict[str, Any]]:
        result = []
        for currency, balance in account.balances.items():
            price = prices.get(currency.upper(), Decimal(0)) / prices[quote]
            row: dict[str, Any] = {"currency": currency}
            for name in ("amount", "available", "availableForWithdrawal"):
                value = _distorted(balance.values[name], distort)
                row[name] = _number(value, account)
                row[name + "Notional"] = _number(
                    (value * price).quantize(NOTIONAL_QUANTUM, ROUND_DOWN), account)
            result.append(_stamped(row, account, stamp_ns))
        return result
    return rows


def _staking_rows(account: SimAccount) -> RowsAt:
    def provider(amount: Decimal) -> Any:
        number = _number(amount, account)
        return {"balance": number} if account.provider_format == "object" else number

    def rows(stamp_ns: int, distort: bool) -> list[dict[str, Any]]:
        return [_stamped({
            "type": "Staking", "currency": currency,
            **{name: _number(_distorted(value, distort), account)
               for name, value in staking.values.items()},
            "balanceByProvider": {name: provider(amount)
                                  for name, amount in staking.providers.items()},
        }, account, stamp_ns) for currency, staking in account.staking.items()]
    return rows


@functools.cache
def huge_segments(gzipped: bool) -> tuple[bytes, bytes, bytes]:
    """The first, repeated and last pieces of a huge body: a JSON array of blanks, a megabyte a
    piece. Gzipped, with a window of blanks behind it every megabyte compresses to the same
    bytes, so a bomb of any size is these three pieces, made once."""
    blank = b" " * HUGE_CHUNK_BYTES
    first, repeated, last = b"[" + blank[1:], blank, b"]"
    if gzipped:
        compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        first = compressor.compress(first) + compressor.flush(zlib.Z_SYNC_FLUSH)
        repeated = compressor.compress(repeated) + compressor.flush(zlib.Z_SYNC_FLUSH)
        last = compressor.compress(last) + compressor.flush()
    return first, repeated, last


async def _huge_reply(request: web.Request, fault: Fault) -> web.StreamResponse:
    """A body of about `size_bytes` (whole megabytes), gzipped if asked: then a gzip bomb."""
    headers = {"Content-Type": "application/json"}
    if fault.gzip:
        headers["Content-Encoding"] = "gzip"
    response = web.StreamResponse(status=200, headers=headers)
    await response.prepare(request)
    first, repeated, last = huge_segments(fault.gzip)
    with contextlib.suppress(ConnectionError):  # the client hung up, as it should
        await response.write(first)
        for _ in range(1, fault.size_bytes // HUGE_CHUNK_BYTES):
            await response.write(repeated)
        await response.write(last)
        await response.write_eof()
    return response


async def _apply_fault(request: web.Request, fault: Fault) -> web.StreamResponse | None:
    """The reply a fault replaces the real one with; None when the real one goes out (latency)."""
    if fault.kind == "latency":
        await asyncio.sleep(fault.delay_seconds)
        return None
    if fault.kind == "rate_limit":
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
        raise SimError(429, fault.reason if fault.reason != "System" else "RateLimit",
                       "Requests were made too frequently", headers)
    if fault.kind in ("status", "auth"):
        raise SimError(fault.status, fault.reason, f"injected {fault.kind} fault")
    if fault.kind == "html":
        page = f"<html><head><title>{fault.status} Bad Gateway</title></head></html>"
        return web.Response(status=fault.status, text=page, content_type="text/html")
    if fault.kind == "garbage":
        return web.Response(status=200, text='[{"currency": "BTC", "amount": ',
                            content_type="application/json")
    if fault.kind == "redirect":
        return web.Response(status=fault.status, headers={"Location": fault.location})
    if fault.kind == "huge":
        return await _huge_reply(request, fault)
    raise AssertionError(f"unhandled fault {fault.kind}")


async def _serve_rows(
    request: web.Request, account: SimAccount, endpoint: str, rows: RowsAt
) -> web.StreamResponse:
    """An endpoint's rows for the account, or the fault queued for that endpoint."""
    clock = request.app[CLOCK_KEY]
    fault = account.faults.take(endpoint)
    if fault is not None and fault.kind == "stale":
        account.stale_served += 1
        stamp = max(1, account.last_stamps_ns.get(endpoint, 0) - STALE_OFFSET_NS)
        return web.json_response(rows(stamp, True))
    if fault is not None and fault.kind == "future":
        stamp = clock.stamp_ns() + int(fault.offset_seconds * 1e9)
        return web.json_response(rows(stamp, True))
    # A response is a mapping that is empty, so falsy: compare with None.
    if fault is not None and (replaced := await _apply_fault(request, fault)) is not None:
        return replaced
    if endpoint == "balances":
        account.served += 1
    stamp = account.last_stamps_ns[endpoint] = clock.stamp_ns()
    return web.json_response(rows(stamp, False))


async def balances_handler(request: web.Request) -> web.StreamResponse:
    key, payload = await _admit(request)
    account = _account_for(key, payload, request.app[STATE_KEY])
    show_pending = bool(payload.get("showPendingBalances", False))
    return await _serve_rows(request, account, "balances", _balance_rows(account, show_pending))


async def notional_handler(request: web.Request) -> web.StreamResponse:
    key, payload = await _admit(request)
    state = request.app[STATE_KEY]
    account = _account_for(key, payload, state)
    quote = request.match_info["currency"]
    if quote != quote.lower() or quote.upper() not in state.usd_prices:
        raise SimError(400, "InvalidCurrency", f"no notional values in {quote!r} (lower case)")
    return await _serve_rows(request, account, "notional",
                             _notional_rows(account, state.usd_prices, quote.upper()))


async def staking_handler(request: web.Request) -> web.StreamResponse:
    key, payload = await _admit(request)
    account = _account_for(key, payload, request.app[STATE_KEY])
    return await _serve_rows(request, account, "staking", _staking_rows(account))


async def approved_addresses_handler(request: web.Request) -> web.StreamResponse:
    """A withdrawal allow-list of one network (any role may read it)."""
    key, payload = await _admit(request, needs_role=False)
    state = request.app[STATE_KEY]
    account = _account_for(key, payload, state)
    network = request.match_info["network"]
    if network not in APPROVED_ADDRESS_NETWORKS:
        raise SimError(400, "InvalidNetwork", f"no allow-list for network {network!r} "
                       "(lower case, e.g. bitcoin)")
    fault = account.faults.take("approved_addresses")
    if fault is not None and fault.kind not in ("stale", "future") and (
            replaced := await _apply_fault(request, fault)) is not None:
        return replaced
    return web.json_response({"approvedAddresses": [
        entry.describe() for entry in state.approved_addresses(account, network)]})


def _within_account_spacing(account: SimAccount) -> None:
    """Gemini's one request per 5 s per account of /v2/transfers and /v1/custodyaccountfees."""
    if not account.transfers_spacing.admit():
        raise SimError(429, "RateLimit", f"one request per {ACCOUNT_SPACING_SECONDS:g} s for "
                       f"the transfers of {account.name!r}",
                       {"Retry-After": str(int(ACCOUNT_SPACING_SECONDS))})


async def transfers_handler(request: web.Request) -> web.StreamResponse:
    """An account's transfers after `timestamp`, newest first (Trader, Fund Manager or
    Auditor)."""
    key, payload = await _admit(request)
    account = _account_for(key, payload, request.app[STATE_KEY])
    _within_account_spacing(account)
    fault = account.faults.take("transfers")
    if fault is not None and fault.kind not in ("stale", "future") and (
            replaced := await _apply_fault(request, fault)) is not None:
        return replaced
    try:
        page = transfers_page(account.transfers, payload)
    except ValueError as error:
        raise SimError(400, "InvalidParameter", str(error)) from None
    return web.json_response([transfer.describe() for transfer in page])


async def custody_fees_handler(request: web.Request) -> web.StreamResponse:
    """No custody fees: served only because it shares the transfers' limit per account."""
    key, payload = await _admit(request)
    _within_account_spacing(_account_for(key, payload, request.app[STATE_KEY]))
    return web.json_response([])


async def roles_handler(request: web.Request) -> web.StreamResponse:
    """The calling key's roles; any role may ask, so this runs past _admit's role check."""
    key, _ = await _admit(request, needs_role=False)
    fault = key.faults.take("roles")
    if fault is not None and fault.kind not in ("stale", "future") and (
            replaced := await _apply_fault(request, fault)) is not None:
        return replaced
    roles: dict[str, object] = {"isAuditor": "Auditor" in key.roles,
                                "isFundManager": "FundManager" in key.roles,
                                "isTrader": "Trader" in key.roles}
    if key.is_master:
        roles |= {"counterparty_id": "EMONNYXH0000", "isAccountAdmin": "AccountAdmin" in key.roles}
    return web.json_response(roles)


async def account_list_handler(request: web.Request) -> web.StreamResponse:
    key, payload = await _admit(request)
    if not key.is_master:
        raise SimError(400, "InvalidApiKey", "/v1/account/list needs a master key")
    limit = payload.get("limit_accounts", 500)
    if not isinstance(limit, int) or not 1 <= limit <= 500:
        raise SimError(400, "InvalidParameter", "limit_accounts must be 1 to 500")
    created_at_or_before = payload.get("timestamp")
    if created_at_or_before is not None and (
            not isinstance(created_at_or_before, int) or isinstance(created_at_or_before, bool)
            or created_at_or_before < 0):
        raise SimError(400, "InvalidParameter", "timestamp must be milliseconds")
    fault = ((key.faults.take("account_list_page") if created_at_or_before is not None
              else None) or key.faults.take("account_list"))
    if fault is not None and fault.kind not in ("stale", "future") and (
            replaced := await _apply_fault(request, fault)) is not None:
        return replaced
    state = request.app[STATE_KEY]
    # Newest first, as Gemini pages backwards from `timestamp`: the accounts created at or
    # before it.
    group = sorted((state.accounts[name] for name in key.accounts
                    if created_at_or_before is None
                    or state.accounts[name].created_ms <= created_at_or_before),
                   key=lambda account: (-account.created_ms, account.name))
    rows = [
        {"name": account.display_name, "account": account.name, "type": account.type,
         "counterparty_id": f"EMONNYXH{index:04d}", "created": account.created_ms,
         "status": account.status}
        for index, account in enumerate(group[:limit])
    ]
    return web.json_response(rows)


@web.middleware
async def sim_errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except SimError as error:
        return error.response
    return response


PRIVATE_ROUTES = (
    web.post("/v1/balances", balances_handler),
    web.post("/v1/notionalbalances/{currency}", notional_handler),
    web.post("/v1/balances/staking", staking_handler),
    web.post("/v1/account/list", account_list_handler),
    web.post("/v1/roles", roles_handler),
    web.post("/v1/approvedAddresses/account/{network}", approved_addresses_handler),
    web.post("/v2/transfers", transfers_handler),
    web.post("/v1/custodyaccountfees", custody_fees_handler),
)
