"""HTTP transport to Gemini's private endpoints: signs, sends, and turns failures into types.

It returns the raw body of a successful reply; what the body means is `replies`' business.
Nothing here retries: a POST carries a nonce, and the scheduler decides when to try again.
Nothing here follows a redirect either: a signed request goes to `base_url` and nowhere else.
Bodies are read, and decompressed, only up to a cap, so a huge reply or a gzip bomb costs one
poll and a bounded amount of memory.
"""

import asyncio
import json
import math
import ssl
import zlib
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from time import time

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from balance_exporter.config import Credentials
from balance_exporter.gemini.errors import (
    REDIRECT_STATUSES,
    GeminiError,
    MalformedReply,
    TransientError,
    classify_error,
)
from balance_exporter.gemini.nonce import NonceSource
from balance_exporter.gemini.signing import PayloadValue, encode_payload, signed_headers
from balance_exporter.targets import LISTING_PAGE_ROWS, TRANSFERS_PAGE_ROWS

BALANCES_PATH = "/v1/balances"
STAKING_PATH = "/v1/balances/staking"
ACCOUNT_LIST_PATH = "/v1/account/list"
ROLES_PATH = "/v1/roles"
APPROVED_ADDRESSES_PATH = "/v1/approvedAddresses/account"
TRANSFERS_PATH = "/v2/transfers"
# Gemini's maximum a page.
LIST_ACCOUNTS_LIMIT = LISTING_PAGE_ROWS
DEFAULT_MAX_REPLY_BYTES = 4 * 1024 * 1024
_READ_CHUNK_BYTES = 64 * 1024
_INFLATE_STEP_BYTES = 256 * 1024
# Longer than any sane delay in seconds (a year is 8 digits); longer text is no number.
_MAX_RETRY_AFTER_DIGITS = 12
# gzip or zlib, told apart by their headers.
_GZIP_OR_ZLIB = 32 + zlib.MAX_WBITS
# Gemini's error objects are a few hundred bytes. A larger body is never read as one here, on the
# event loop: it goes to the reply parser, which parses large bodies in a thread.
MAX_ERROR_OBJECT_BYTES = 64 * 1024


@dataclass(frozen=True)
class PrivateRequest:
    """A signed POST: the path, which is also the payload's `request`, and the other params."""

    path: str
    params: dict[str, PayloadValue] = field(default_factory=dict)


def _for_account(path: str, account: str | None, **params: PayloadValue) -> PrivateRequest:
    # A master key names the account; an account-scoped key sends no `account`.
    return PrivateRequest(path, {**params, **({"account": account} if account else {})})


def balances_request(account: str | None, show_pending_balances: bool) -> PrivateRequest:
    return _for_account(BALANCES_PATH, account, showPendingBalances=show_pending_balances)


def notional_request(account: str | None, quote_currency: str) -> PrivateRequest:
    return _for_account(f"/v1/notionalbalances/{quote_currency.lower()}", account)


def staking_request(account: str | None) -> PrivateRequest:
    return _for_account(STAKING_PATH, account)


def approved_addresses_request(account: str | None, network: str) -> PrivateRequest:
    """One network's withdrawal allow-list of the account (the network is a lower-case word:
    the config allows nothing else into the path)."""
    return _for_account(f"{APPROVED_ADDRESSES_PATH}/{network}", account)


def transfers_request(account: str | None, after_ms: int, currency: str | None) -> PrivateRequest:
    """A page of the account's transfers after a time (of one currency, for a re-check)."""
    params: dict[str, PayloadValue] = {"timestamp": after_ms,
                                       "limit_transfers": TRANSFERS_PAGE_ROWS}
    if currency is not None:
        params["currency"] = currency
    return _for_account(TRANSFERS_PATH, account, **params)


def roles_request() -> PrivateRequest:
    """The calling key's roles (no `account`: they are the key's, not an account's)."""
    return PrivateRequest(ROLES_PATH)


def account_list_request(created_at_or_before_ms: int | None = None) -> PrivateRequest:
    """A page of the group's accounts: the newest, or those created at or before a time."""
    params: dict[str, PayloadValue] = {"limit_accounts": LIST_ACCOUNTS_LIMIT}
    if created_at_or_before_ms is not None:
        params["timestamp"] = created_at_or_before_ms
    return PrivateRequest(ACCOUNT_LIST_PATH, params)


def new_session(user_agent: str) -> aiohttp.ClientSession:
    """The session the client needs: it decompresses bodies itself (under the cap). It does not
    trust the environment: aiohttp would then read the proxy variables and ~/.netrc in a thread
    on every request (a third of a poll's cost); `proxy_for` reads the proxy once instead."""
    return aiohttp.ClientSession(
        headers={"User-Agent": user_agent, "Accept-Encoding": "gzip, deflate"},
        auto_decompress=False,
    )


def proxy_for(url: str, configured: str | None) -> str | None:
    """The proxy requests to `url` go through: `configured`, else the environment's for the
    URL's scheme (HTTPS_PROXY for https://, WSS_PROXY for wss://, with its ~/.netrc
    credentials) unless NO_PROXY exempts the host, as aiohttp's trust_env has it. Read when a
    client is made (at start and on every reload), not on every request."""
    if configured is not None:
        return configured
    try:
        proxy, auth = get_env_proxy_for_url(URL(url))
    except LookupError:
        return None
    if auth is not None:
        proxy = proxy.with_user(auth.login).with_password(auth.password)
    return str(proxy)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds to wait (delta-seconds or an HTTP date); None when absent or not
    readable. The caller clamps it: this says only what the header means."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) <= _MAX_RETRY_AFTER_DIGITS else None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    wait = moment.timestamp() - (time() if now is None else now)
    return max(0.0, wait) if math.isfinite(wait) else None


class _Inflater:
    """Decompresses a body of gzip members (concatenated members are one valid gzip stream, and
    every one is read) or one zlib/deflate stream, a step at a time. A body that ends inside a
    member, or has anything but another gzip member after one, is malformed: part of a reply is
    never taken for the whole."""

    def __init__(self, encoding: str) -> None:
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise MalformedReply(f"reply in an encoding that was not asked for: {encoding[:40]!r}")
        self._members = encoding != "deflate"
        self._decoder = zlib.decompressobj(_GZIP_OR_ZLIB)
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        self._pending += chunk

    def step(self) -> bytes | None:
        """Up to _INFLATE_STEP_BYTES of output; None when the input so far is used up."""
        if not self._pending:
            return None
        if self._decoder.eof:
            if not self._members:
                raise MalformedReply("reply has data after the end of its compressed stream")
            self._decoder = zlib.decompressobj(_GZIP_OR_ZLIB)  # the next gzip member
        data = self._decoder.decompress(self._pending, _INFLATE_STEP_BYTES)
        self._pending = self._decoder.unused_data or self._decoder.unconsumed_tail
        return data

    def finish(self) -> bytes:
        rest = self._decoder.flush()
        if not self._decoder.eof:
            raise MalformedReply("reply ends inside its compressed stream (cut short)")
        return rest


def _inflater(encoding: str) -> _Inflater | None:
    return None if encoding in ("", "identity") else _Inflater(encoding)


def _too_large(limit: int, status: int) -> MalformedReply:
    return MalformedReply(f"reply is larger than {limit} bytes (gemini.max_reply_bytes)",
                          status, reason="ReplyTooLarge")


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, decompressed, or MalformedReply(ReplyTooLarge) as soon as it passes `limit`:
    never more than `limit` bytes (plus one step) are held."""
    inflater = _inflater(response.headers.get("Content-Encoding", "").strip().lower())
    pieces: list[bytes] = []
    size = 0

    def take(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise _too_large(limit, response.status)
        pieces.append(data)

    try:
        async for chunk in response.content.iter_chunked(_READ_CHUNK_BYTES):
            if inflater is None:
                take(chunk)
                continue
            # A compressed chunk may inflate a thousandfold: a step at a time, with the loop
            # free between steps.
            inflater.feed(chunk)
            while (data := inflater.step()) is not None:
                take(data)
                await asyncio.sleep(0)
        if inflater is not None:
            take(inflater.finish())
    except zlib.error as error:
        raise MalformedReply(f"reply does not decompress: {error}", response.status) from None
    body = b"".join(pieces)
    if len(body) > limit:
        raise _too_large(limit, response.status)
    return body


def _redirect_message(response: aiohttp.ClientResponse) -> str:
    location = response.headers.get("Location", "")
    try:
        target = response.url.join(URL(location)) if location else None
    except ValueError:
        target = None
    host = target.host if target is not None and target.host else "an unreadable address"
    return (f"HTTP {response.status} redirect to {host[:100]}, not followed (the signed request "
            f"and its credentials go to {response.url.host} only)")


def _json_object(body: bytes) -> dict[str, object] | None:
    """The body as a JSON object if it is a small one (an error object), else None: parsed once,
    and never a large body on the event loop."""
    if len(body) > MAX_ERROR_OBJECT_BYTES or not body.lstrip().startswith(b"{"):
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def _error_from_reply(
    status: int, body: bytes, document: dict[str, object] | None, retry_after: float | None
) -> GeminiError:
    if document is None:
        snippet = body[:80].decode("utf-8", "replace").strip()
        return classify_error(status, None, f"non-JSON body: {snippet!r}", retry_after)
    # Gemini's usual shape says `reason`; its conformance fixtures also send the reason under
    # `error` ({"error": "MissingRole", "message": ...}).
    reason = next((value for name in ("reason", "error")
                   if isinstance(value := document.get(name), str) and value), None)
    return classify_error(status, reason, str(document.get("message", "")), retry_after)


class GeminiClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        timeout_seconds: float,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        proxy_url: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        if session.auto_decompress:
            raise ValueError("the session must not decompress on its own: use new_session()")
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._max_reply_bytes = max_reply_bytes
        self._proxy = proxy_for(base_url, proxy_url)
        self._tls: ssl.SSLContext | bool = tls if tls is not None else True

    async def post(
        self, credentials: Credentials, nonces: NonceSource, request: PrivateRequest
    ) -> bytes:
        """The body of a successful reply; a GeminiError for anything else."""
        path = request.path
        async with nonces.lock:
            payload = encode_payload(path, nonces.next(), request.params)
            headers = signed_headers(credentials.api_key, credentials.api_secret, payload)
            try:
                async with self._session.post(
                    self._base_url + path, headers=headers, timeout=self._timeout,
                    allow_redirects=False, proxy=self._proxy, ssl=self._tls,
                ) as response:
                    status = response.status
                    if status in REDIRECT_STATUSES:
                        raise classify_error(status, None, _redirect_message(response), None)
                    body = await read_capped(response, self._max_reply_bytes)
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                raise TransientError("Timeout", f"no reply within {self._timeout.total}s") from None
            except aiohttp.ClientError as error:
                detail = str(error) or type(error).__name__
                raise TransientError("ConnectionError", detail) from None
        # Some gateways answer errors with 200 and an error object.
        document = _json_object(body)
        if status != 200 or (document is not None and document.get("result") == "error"):
            raise _error_from_reply(status, body, document, retry_after)
        return body
