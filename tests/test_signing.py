"""Signing against vectors computed outside this code base, with `openssl dgst -sha384 -hmac`."""

import base64
import json

from pydantic import SecretStr

from balance_exporter.gemini.signing import encode_payload, sign_payload, signed_headers

SECRET = SecretStr("kitten-secret")
# printf '%s' '{"request":"/v1/balances","nonce":1234567890123}' | base64 -w0
PLAIN_PAYLOAD = b"eyJyZXF1ZXN0IjoiL3YxL2JhbGFuY2VzIiwibm9uY2UiOjEyMzQ1Njc4OTAxMjN9"
# printf '%s' "$PLAIN_PAYLOAD" | openssl dgst -sha384 -hmac kitten-secret
PLAIN_SIGNATURE = (
    "df36998d534d7c9b30eb0f741e2d0bc0a4672c6166eb949b444835ef3d2ab5a4"
    "c5d9ec5db47e60e41b9430b0d45f8c61"
)
ACCOUNT_PAYLOAD = (
    b"eyJyZXF1ZXN0IjoiL3YxL2JhbGFuY2VzIiwibm9uY2UiOjEyMzQ1Njc4OTAxMjMsInNob3dQZW5kaW5nQmFsYW5jZXMi"
    b"OnRydWUsImFjY291bnQiOiJwcmltYXJ5In0="
)
ACCOUNT_SIGNATURE = (
    "cc04401373cefbaa1e6e6b2eae6ca9fefaa3646bf4e98aefad416a137bb38e19"
    "7abecd1e40838fd9a4969de77bde7241"
)


def test_payload_is_base64_of_compact_json_with_request_and_nonce_first() -> None:
    assert encode_payload("/v1/balances", 1234567890123, {}) == PLAIN_PAYLOAD


def test_payload_carries_account_and_pending_flag() -> None:
    encoded = encode_payload(
        "/v1/balances", 1234567890123, {"showPendingBalances": True, "account": "primary"}
    )
    assert encoded == ACCOUNT_PAYLOAD
    assert json.loads(base64.b64decode(encoded)) == {
        "request": "/v1/balances", "nonce": 1234567890123,
        "showPendingBalances": True, "account": "primary",
    }


def test_signature_is_hex_hmac_sha384_of_the_base64_payload() -> None:
    assert sign_payload(PLAIN_PAYLOAD, SECRET) == PLAIN_SIGNATURE
    assert sign_payload(ACCOUNT_PAYLOAD, SECRET) == ACCOUNT_SIGNATURE


def test_headers_are_the_documented_ones() -> None:
    headers = signed_headers("account-abc", SECRET, PLAIN_PAYLOAD)
    assert headers == {
        "Content-Type": "text/plain",
        "Content-Length": "0",
        "Cache-Control": "no-cache",
        "X-GEMINI-APIKEY": "account-abc",
        "X-GEMINI-PAYLOAD": PLAIN_PAYLOAD.decode(),
        "X-GEMINI-SIGNATURE": PLAIN_SIGNATURE,
    }
    assert "kitten-secret" not in repr(headers)
