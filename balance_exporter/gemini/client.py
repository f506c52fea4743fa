"""HTTP transport to Gemini's private endpoints: signs, sends, and turns failures into types.

It returns the raw body of a successful reply; what the body means is `replies`' business.
Nothing here retries: a POST carries a nonce, and the scheduler decides when to try again.
"""

import json
from email.utils import parsedate_to_datetime
from time import time

import aiohttp

from balance_exporter.config import Credentials
from balance_exporter.gemini.errors import (
    GeminiError,
    TransientError,
    classify_error,
)
from balance_exporter.gemini.nonce import NonceSource
from balance_exporter.gemini.signing import PayloadValue, encode_payload, signed_headers

BALANCES_PATH = "/v1/balances"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds to wait; it may be delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time() if now is None else now))


def _error_from_reply(status: int, body: bytes, retry_after: float | None) -> GeminiError:
    reason: str | None = None
    message = ""
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        snippet = body[:80].decode("utf-8", "replace").strip()
        message = f"non-JSON body: {snippet!r}"
    else:
        if isinstance(document, dict):
            reason = document.get("reason") if isinstance(document.get("reason"), str) else None
            message = str(document.get("message", ""))
    return classify_error(status, reason, message, retry_after)


def _is_error_object(body: bytes) -> bool:
    if not body.lstrip().startswith(b"{"):
        return False
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(document, dict) and document.get("result") == "error"


class GeminiClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, timeout_seconds: float):
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)

    async def post_private(
        self, credentials: Credentials, nonces: NonceSource, path: str,
        params: dict[str, PayloadValue],
    ) -> bytes:
        async with nonces.lock:
            payload = encode_payload(path, nonces.next(), params)
            headers = signed_headers(credentials.api_key, credentials.api_secret, payload)
            try:
                async with self._session.post(
                    self._base_url + path, headers=headers, timeout=self._timeout
                ) as response:
                    body = await response.read()
                    status = response.status
                    retry_after = parse_retry_after(response.headers.get("Retry-After"))
            except TimeoutError:
                raise TransientError("Timeout", f"no reply within {self._timeout.total}s") from None
            except aiohttp.ClientError as error:
                detail = str(error) or type(error).__name__
                raise TransientError("ConnectionError", detail) from None
        # Some gateways answer errors with 200 and an error object.
        if status != 200 or _is_error_object(body):
            raise _error_from_reply(status, body, retry_after)
        return body

    async def fetch_balances(
        self, credentials: Credentials, nonces: NonceSource, account: str | None,
        show_pending_balances: bool,
    ) -> bytes:
        params: dict[str, PayloadValue] = {"showPendingBalances": show_pending_balances}
        if account is not None:
            params["account"] = account
        return await self.post_private(credentials, nonces, BALANCES_PATH, params)
