"""Signing against vectors computed outside this code base, with `openssl dgst -sha384 -hmac`."""

import base64
import json
import shutil
import subprocess

import pytest
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


def openssl_hmac_sha384(data: bytes, secret: str) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl not found: install Debian's openssl package (scripts/test.sh does)")
    result = subprocess.run([openssl, "dgst", "-sha384", "-hmac", secret, "-r"], input=data,
                            capture_output=True, check=True)
    return result.stdout.decode().split()[0]


@pytest.mark.parametrize(("nonce", "params", "secret"), [
    (1, {}, "s"),
    (1_700_000_000_123, {"account": "primary", "showPendingBalances": False}, "kitten-secret"),
    (2**53, {"account": "a-long-account-name_with.dots"}, "x" * 64),
    (42, {"limit_accounts": 500}, "secret with spaces and ünïcode"),
])
def test_signatures_agree_with_openssl(
    nonce: int, params: dict[str, str | int | bool], secret: str
) -> None:
    payload = encode_payload("/v1/balances", nonce, params)
    signature = signed_headers("account-k", SecretStr(secret), payload)["X-GEMINI-SIGNATURE"]
    assert signature == openssl_hmac_sha384(payload, secret)
    # A different secret signs differently: the signature depends on the secret at all.
    assert signature != sign_payload(payload, SecretStr(secret + "!"))
