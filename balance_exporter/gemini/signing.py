"""Request signing for Gemini's private REST API and its WebSocket upgrade.

The payload travels base64-encoded in a header and the signature is the hex HMAC-SHA384 of that
base64 text (not of the raw JSON), keyed with the API secret. The WebSocket upgrade signs the
nonce alone: its payload is the base64 of the nonce's decimal text.
"""

import base64
import hashlib
import hmac
import json
from collections.abc import Mapping

from pydantic import SecretStr

PayloadValue = str | int | bool


def encode_payload(request_path: str, nonce: int, params: Mapping[str, PayloadValue]) -> bytes:
    """The base64 payload for one request; `request` and `nonce` come first as in Gemini's docs."""
    payload: dict[str, PayloadValue] = {"request": request_path, "nonce": nonce, **params}
    return base64.b64encode(json.dumps(payload, separators=(",", ":")).encode())


def sign_payload(encoded_payload: bytes, api_secret: SecretStr) -> str:
    secret = api_secret.get_secret_value().encode()
    return hmac.new(secret, encoded_payload, hashlib.sha384).hexdigest()


def signed_headers(api_key: str, api_secret: SecretStr, encoded_payload: bytes) -> dict[str, str]:
    return {
        "Content-Type": "text/plain",
        "Content-Length": "0",
        "Cache-Control": "no-cache",
        "X-GEMINI-APIKEY": api_key,
        "X-GEMINI-PAYLOAD": encoded_payload.decode(),
        "X-GEMINI-SIGNATURE": sign_payload(encoded_payload, api_secret),
    }


def stream_headers(api_key: str, api_secret: SecretStr, nonce: int) -> dict[str, str]:
    """The headers that authenticate a WebSocket upgrade (time-based nonce, in seconds)."""
    payload = base64.b64encode(str(nonce).encode())
    return {
        "X-GEMINI-APIKEY": api_key,
        "X-GEMINI-NONCE": str(nonce),
        "X-GEMINI-PAYLOAD": payload.decode(),
        "X-GEMINI-SIGNATURE": sign_payload(payload, api_secret),
    }
