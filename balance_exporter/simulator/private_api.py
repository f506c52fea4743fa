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
from decimal import Decimal
from typing import Any

from aiohttp import web

from balance_exporter.simulator.state import (
    USD_PRICES,
    Fault,
    SimAccount,
    SimKey,
    SimState,
)

STATE_KEY = web.AppKey("sim_state", SimState)
TIME_BASED_NONCE_WINDOW_SECONDS = 30
STALE_OFFSET_NS = 5_000_000_000
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
    expected = hmac.new(key.api_secret.encode(), encoded, hashlib.sha384).hexdigest()
    if not hmac.compare_digest(expected, headers["X-GEMINI-SIGNATURE"].lower()):
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


async def _admit(request: web.Request) -> tuple[SimKey, dict[str, Any]]:
    """Everything a private request passes before its endpoint runs."""
    state = request.app[STATE_KEY]
    key, payload = _authenticate(request, state)
    key.count("requests")
    now = time.monotonic()
    delay = key.limiter.admit(now)
    if delay is None:
        key.count("rate_limited")
        raise SimError(429, "RateLimit", "Requests were made too frequently",
                       {"Retry-After": str(key.limiter.retry_after(now))})
    _check_nonce(key, payload)
    if not key.roles & {"Auditor", "Trader", "FundManager"}:
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
    return account


def _number(value: Decimal, account: SimAccount) -> str | float:
    return float(value) if account.number_format == "number" else str(value)


def _balance_rows(
    account: SimAccount, show_pending: bool, stamp_ns: int, distort: bool
) -> list[dict[str, Any]]:
    fields = ["amount", "available", "availableForWithdrawal"]
    if show_pending:
        fields += ["pendingWithdrawal", "pendingDeposit"]
    rows = []
    for currency, balance in account.balances.items():
        row: dict[str, Any] = {"type": account.type, "currency": currency}
        for name in fields:
            value = balance.values[name] + (1_000_000 if distort else 0)
            row[name] = _number(value, account)
        if account.timestamp_format == "ns":
            row["_timestamp"] = stamp_ns
        elif account.timestamp_format == "iso":
            row["_timestamp"] = _stamp_text(stamp_ns)
        rows.append(row)
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


async def _apply_fault(
    request: web.Request, fault: Fault, account: SimAccount
) -> web.StreamResponse | None:
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


async def balances_handler(request: web.Request) -> web.StreamResponse:
    state, clock = request.app[STATE_KEY], request.app[CLOCK_KEY]
    key, payload = await _admit(request)
    account = _account_for(key, payload, state)
    show_pending = bool(payload.get("showPendingBalances", False))
    fault = account.take_fault()
    if fault is not None and fault.kind == "stale":
        account.stale_served += 1
        stamp = max(1, account.last_stamp_ns - STALE_OFFSET_NS)
        return web.json_response(_balance_rows(account, show_pending, stamp, distort=True))
    if fault is not None and fault.kind == "future":
        stamp = clock.stamp_ns() + int(fault.offset_seconds * 1e9)
        return web.json_response(_balance_rows(account, show_pending, stamp, distort=True))
    # A response is a mapping that is empty, so falsy: compare with None.
    if fault is not None and (replaced := await _apply_fault(request, fault, account)) is not None:
        return replaced
    account.served += 1
    account.last_stamp_ns = clock.stamp_ns()
    return web.json_response(_balance_rows(account, show_pending, account.last_stamp_ns, False))


async def notional_handler(request: web.Request) -> web.Response:
    key, payload = await _admit(request)
    account = _account_for(key, payload, request.app[STATE_KEY])
    quote = request.match_info["currency"].upper()
    if quote not in USD_PRICES:
        raise SimError(400, "InvalidCurrency", f"no notional prices in {quote}")
    rows = []
    for currency, balance in account.balances.items():
        price = USD_PRICES.get(currency, Decimal(0)) / USD_PRICES[quote]
        row: dict[str, Any] = {"currency": currency}
        for name in ("amount", "available", "availableForWithdrawal"):
            row[name] = _number(balance.values[name], account)
            row[name + "Notional"] = _number((balance.values[name] * price).quantize(
                Decimal("0.01")), account)
        rows.append(row)
    return web.json_response(rows)


async def account_list_handler(request: web.Request) -> web.Response:
    key, payload = await _admit(request)
    if not key.is_master:
        raise SimError(400, "InvalidApiKey", "/v1/account/list needs a master key")
    limit = int(payload.get("limit_accounts", 500))
    if not 1 <= limit <= 500:
        raise SimError(400, "InvalidParameter", "limit_accounts must be 1 to 500")
    state = request.app[STATE_KEY]
    rows = [
        {"name": name.title(), "account": name, "type": state.accounts[name].type,
         "counterparty_id": f"EMONNYXH{index:04d}", "created": 1_589_310_000_000 + index,
         "status": "open"}
        for index, name in enumerate(key.accounts[:limit])
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
    web.post("/v1/account/list", account_list_handler),
)
