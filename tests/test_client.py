"""The client over a mocked transport: what it sends, and how each failure is typed."""

import asyncio
import base64
import gzip
import hashlib
import hmac
import json
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from pydantic import SecretStr
from yarl import URL

from balance_exporter.config import Credentials
from balance_exporter.gemini.client import (
    GeminiClient,
    balances_request,
    new_session,
    parse_retry_after,
    proxy_for,
)
from balance_exporter.gemini.errors import (
    GeminiError,
    MalformedReply,
    RateLimited,
    RequestRejected,
    TransientError,
)
from balance_exporter.gemini.nonce import NonceSource

BASE = "https://api.example.test"
URL_BALANCES = f"{BASE}/v1/balances"


@pytest.fixture
async def client() -> AsyncIterator[GeminiClient]:
    async with new_session("test") as session:
        yield GeminiClient(session, BASE, timeout_seconds=0.5)


@pytest.fixture
def key() -> Credentials:
    return Credentials("master-abc", SecretStr("shh-secret"))


@pytest.fixture
def nonces() -> NonceSource:
    return NonceSource("milliseconds")


def sent(mocked: aioresponses) -> list[Any]:
    """The requests the mock received for /v1/balances."""
    assert mocked.requests is not None
    return list(mocked.requests[("POST", URL(URL_BALANCES))])


def error_body(reason: str, message: str = "nope") -> dict[str, str]:
    return {"result": "error", "reason": reason, "message": message}


async def test_sends_a_signed_post_with_account_and_pending_flag(
    client: GeminiClient, key: Credentials, nonces: NonceSource
) -> None:
    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, status=200, body=b"[]")
        assert await client.post(key, nonces, balances_request("primary", True)) == b"[]"
        (request,) = sent(mocked)
    headers = request.kwargs["headers"]
    payload = json.loads(base64.b64decode(headers["X-GEMINI-PAYLOAD"]))
    assert payload["request"] == "/v1/balances"
    assert payload["account"] == "primary"
    assert payload["showPendingBalances"] is True
    assert isinstance(payload["nonce"], int)
    expected = hmac.new(b"shh-secret", headers["X-GEMINI-PAYLOAD"].encode(),
                        hashlib.sha384).hexdigest()
    assert headers["X-GEMINI-SIGNATURE"] == expected
    assert headers["X-GEMINI-APIKEY"] == "master-abc"


async def test_account_scoped_key_sends_no_account(
    client: GeminiClient, key: Credentials, nonces: NonceSource
) -> None:
    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, status=200, body=b"[]")
        await client.post(key, nonces, balances_request(None, False))
        (request,) = sent(mocked)
    payload = json.loads(base64.b64decode(request.kwargs["headers"]["X-GEMINI-PAYLOAD"]))
    assert "account" not in payload


async def test_concurrent_requests_on_one_key_go_one_at_a_time_in_nonce_order(
    client: GeminiClient, key: Credentials, nonces: NonceSource
) -> None:
    in_flight = 0
    most_in_flight = 0
    sent_nonces: list[int] = []

    async def slow_reply(url: URL, **kwargs: object) -> None:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        headers = kwargs["headers"]
        assert isinstance(headers, Mapping)
        sent_nonces.append(json.loads(base64.b64decode(headers["X-GEMINI-PAYLOAD"]))["nonce"])
        await asyncio.sleep(0.01)
        in_flight -= 1

    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, status=200, body=b"[]", callback=slow_reply, repeat=True)
        await asyncio.gather(*(client.post(key, nonces, balances_request(f"a{i}", False))
                               for i in range(5)))
    assert most_in_flight == 1
    assert sent_nonces == sorted(sent_nonces)
    assert len(set(sent_nonces)) == 5


@pytest.mark.parametrize(("status", "body", "error_type", "reason"), [
    (400, error_body("InvalidSignature"), RequestRejected, "InvalidSignature"),
    (400, error_body("InvalidNonce"), RequestRejected, "InvalidNonce"),
    (400, error_body("MissingAccounts"), RequestRejected, "MissingAccounts"),
    (400, error_body("InvalidAccountName"), RequestRejected, "InvalidAccountName"),
    (403, error_body("MissingRole"), RequestRejected, "MissingRole"),
    # Gemini's conformance fixtures: the reason under `error`, a plain-text 500, an empty 404.
    (403, {"error": "MissingRole", "message": "needs Auditor"}, RequestRejected, "MissingRole"),
    (500, b"upstream unavailable", TransientError, "HTTP500"),
    (404, b"", RequestRejected, "HTTP404"),
    (401, b"", RequestRejected, "HTTP401"),
    (403, b"<html>Forbidden</html>", RequestRejected, "HTTP403"),
    (429, error_body("RateLimit"), RateLimited, "RateLimit"),
    (429, error_body("Too Many Requests"), RateLimited, "TooManyRequests"),
    (429, b"slow down", RateLimited, "RateLimit"),
    (400, error_body("RateLimit"), RateLimited, "RateLimit"),
    (500, error_body("System"), TransientError, "System"),
    (503, error_body("Maintenance"), TransientError, "Maintenance"),
    (502, b"<html><title>502 Bad Gateway</title></html>", TransientError, "HTTP502"),
    (200, error_body("InvalidSignature"), RequestRejected, "InvalidSignature"),
    (302, b"", RequestRejected, "Redirect"),
    (304, b"", MalformedReply, "MalformedReply"),  # not a redirect: an unexpected status
    (400, error_body("SomethingNew" * 20, "x" * 50_000), RequestRejected, "Other"),
    (400, error_body("InvalidSignature", "x" * 5_000_000), MalformedReply, "ReplyTooLarge"),
])
async def test_failures_become_typed_errors_keeping_the_reason(
    client: GeminiClient, key: Credentials, nonces: NonceSource, status: int, body: object,
    error_type: type[GeminiError], reason: str,
) -> None:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    assert isinstance(raw, bytes)
    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, status=status, body=raw)
        with pytest.raises(error_type) as caught:
            await client.post(key, nonces, balances_request("primary", False))
        # Never retried inside the client: exactly one request went out.
        assert len(sent(mocked)) == 1
    assert caught.value.reason == reason
    assert caught.value.status == status
    assert len(caught.value.message) < 400  # upstream text is truncated, whatever its size


async def test_rate_limit_keeps_retry_after(
    client: GeminiClient, key: Credentials, nonces: NonceSource
) -> None:
    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, status=429, body=json.dumps(error_body("RateLimit")),
                    headers={"Retry-After": "7"})
        with pytest.raises(RateLimited) as caught:
            await client.post(key, nonces, balances_request("primary", False))
    assert caught.value.retry_after == 7.0


async def test_timeouts_and_connection_errors_are_transient(
    client: GeminiClient, key: Credentials, nonces: NonceSource
) -> None:
    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, exception=TimeoutError())
        mocked.post(URL_BALANCES, exception=aiohttp.ClientConnectionError("refused"))
        with pytest.raises(TransientError, match="Timeout"):
            await client.post(key, nonces, balances_request("primary", False))
        with pytest.raises(TransientError, match="ConnectionError"):
            await client.post(key, nonces, balances_request("primary", False))


async def test_errors_and_credentials_do_not_carry_the_secret(
    client: GeminiClient, key: Credentials, nonces: NonceSource
) -> None:
    errors: list[GeminiError] = []
    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, status=400, body=json.dumps(error_body("InvalidSignature")))
        mocked.post(URL_BALANCES, exception=aiohttp.ClientConnectionError("reset by peer"))
        mocked.post(URL_BALANCES, exception=TimeoutError())
        mocked.post(URL_BALANCES, status=502, body=b"<html>bad gateway</html>")
        for _ in range(4):
            with pytest.raises(GeminiError) as caught:
                await client.post(key, nonces, balances_request("primary", False))
            errors.append(caught.value)
    assert [type(error) for error in errors] == [
        RequestRejected, TransientError, TransientError, TransientError]
    for error in errors:
        assert "shh-secret" not in f"{error!s} {error!r} {error.message} {error.args}"
    assert "shh-secret" not in f"{key!r} {key!s}"
    assert "master-abc" in repr(key)  # the key is no secret and helps to tell keys apart


@pytest.mark.parametrize(("header", "expected"), [
    ("5", 5.0), (None, None), ("", None), ("soon", None),
    ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),          # in the past: go at once
    ("999999", 999999.0),                            # read as sent; the scheduler clamps it
    ("9" * 400, None), ("\u00b2", None), ("\u0661", None), ("-5", None), ("1e3", None),
    ("inf", None), ("NaN", None),
    ("Fri, 31 Dec 9999 23:59:59 GMT", 253402300799.0 - 1445412480.0),
    ("Sat, 01 Jan 10000 00:00:00 GMT", None),
])
def test_retry_after_takes_seconds_or_an_http_date(
    header: str | None, expected: float | None
) -> None:
    now = 1445412480.0  # 07:28:00 that day
    assert parse_retry_after(header, now=now) == expected


async def test_a_large_error_like_body_is_not_parsed_on_the_event_loop(
    client: GeminiClient, key: Credentials, nonces: NonceSource
) -> None:
    big = json.dumps({"result": "error", "reason": "InvalidSignature",
                      "message": "x" * 100_000}).encode()
    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, status=200, body=big)
        mocked.post(URL_BALANCES, status=400, body=big)
        # Returned as a body (the reply parser rejects it, in a thread), not read as an error.
        assert await client.post(key, nonces, balances_request("primary", False)) == big
        with pytest.raises(RequestRejected) as caught:
            await client.post(key, nonces, balances_request("primary", False))
    assert caught.value.reason == "HTTP400"


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
async def test_the_reply_cap_holds_at_and_just_past_its_size(
    key: Credentials, nonces: NonceSource, gzipped: bool
) -> None:
    def body(size: int) -> bytes:
        data = b"[" + b" " * (size - 2) + b"]"
        return gzip.compress(data) if gzipped else data

    headers = {"Content-Encoding": "gzip"} if gzipped else {}
    async with new_session("test") as session:
        capped = GeminiClient(session, BASE, timeout_seconds=5, max_reply_bytes=100_000)
        with aioresponses() as mocked:
            mocked.post(URL_BALANCES, status=200, body=body(100_000), headers=headers)
            mocked.post(URL_BALANCES, status=200, body=body(100_001), headers=headers)
            assert len(await capped.post(key, nonces, balances_request(None, False))) == 100_000
            with pytest.raises(MalformedReply) as caught:
                await capped.post(key, nonces, balances_request(None, False))
    assert caught.value.reason == "ReplyTooLarge"


@pytest.mark.parametrize(("size", "reason"), [(64 * 1024, "InvalidSignature"),
                                              (64 * 1024 + 1, "HTTP400")])
async def test_error_objects_are_read_up_to_64_kib(
    client: GeminiClient, key: Credentials, nonces: NonceSource, size: int, reason: str
) -> None:
    head = b'{"result":"error","reason":"InvalidSignature","message":"'
    raw = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(raw) == size
    with aioresponses() as mocked:
        mocked.post(URL_BALANCES, status=400, body=raw)
        with pytest.raises(RequestRejected) as caught:
            await client.post(key, nonces, balances_request("primary", False))
    assert caught.value.reason == reason


@pytest.mark.parametrize(("header", "expected"), [("9" * 12, 999999999999.0), ("9" * 13, None)])
def test_retry_after_digits_are_bounded(header: str, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_upstream_messages_are_cut_at_300_characters() -> None:
    assert GeminiError("System", "x" * 300).message == "x" * 300
    assert GeminiError("System", "x" * 301).message.startswith("x" * 300 + "… (301")


@pytest.mark.parametrize(("encoding", "body", "expected"), [
    ("gzip", gzip.compress(b'[{"a":') + gzip.compress(b'"1"}]'), b'[{"a":"1"}]'),
    ("gzip", b"".join(gzip.compress(b"x" * 10_000) for _ in range(10)), b"x" * 100_000),
    ("gzip", gzip.compress(b"[" + b" " * 50_000 + b"]")[:-9], None),  # cut short
    ("gzip", gzip.compress(b"[]") + b"trailing junk", None),
    ("deflate", zlib.compress(b"[]") + zlib.compress(b"[]"), None),
    ("gzip", gzip.compress(b"x" * 60_000) + gzip.compress(b"x" * 40_001), "ReplyTooLarge"),
], ids=["two members", "ten members at the cap", "cut short", "junk after a member",
        "two zlib streams", "members past the cap"])
async def test_every_gzip_member_is_read_and_part_of_a_reply_is_never_the_whole(
    key: Credentials, nonces: NonceSource, encoding: str, body: bytes,
    expected: bytes | str | None,
) -> None:
    async with new_session("test") as session:
        capped = GeminiClient(session, BASE, timeout_seconds=5, max_reply_bytes=100_000)
        with aioresponses() as mocked:
            mocked.post(URL_BALANCES, status=200, body=body,
                        headers={"Content-Encoding": encoding})
            if isinstance(expected, bytes):
                assert await capped.post(key, nonces, balances_request(None, False)) == expected
                return
            with pytest.raises(MalformedReply) as caught:
                await capped.post(key, nonces, balances_request(None, False))
    assert caught.value.reason == (expected or "MalformedReply")


@pytest.mark.parametrize(("url", "environment", "configured", "expected"), [
    ("https://api.gemini.com", {"HTTPS_PROXY": "http://egress:3128"}, None, "http://egress:3128"),
    ("https://api.gemini.com", {"HTTPS_PROXY": "http://egress:3128"}, "http://mine:8080",
     "http://mine:8080"),
    ("https://api.gemini.com", {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "gemini.com"},
     None, None),
    ("https://api.gemini.com", {"HTTP_PROXY": "http://egress:3128"}, None, None),
    ("wss://api.gemini.com", {"HTTPS_PROXY": "http://egress:3128"}, None, None),
    ("wss://api.gemini.com", {"WSS_PROXY": "http://egress:3128"}, None, "http://egress:3128"),
    ("https://api.gemini.com", {"HTTPS_PROXY": "http://user:pw@egress:3128"}, None,
     "http://user:pw@egress:3128"),
    ("https://api.gemini.com", {}, None, None),
])
def test_the_proxy_is_the_configured_one_else_the_environments_for_the_scheme(
    url: str, environment: dict[str, str], configured: str | None, expected: str | None,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "WSS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert proxy_for(url, configured) == expected


def test_the_proxy_takes_its_credentials_from_netrc(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
) -> None:
    (tmp_path / "netrc").write_text("machine egress login bob password s3cret\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("HTTPS_PROXY", "http://egress:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert proxy_for("https://api.gemini.com", None) == "http://bob:s3cret@egress:3128"


async def test_the_environment_is_read_when_the_client_is_made_not_on_every_request(
    key: Credentials, nonces: NonceSource, monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    async with new_session("test") as session:
        client = GeminiClient(session, BASE, timeout_seconds=0.5)
        # A proxy named after the client was made is not taken: the request goes straight.
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
        with aioresponses() as mocked:
            mocked.post(URL_BALANCES, payload=[])
            assert await client.post(key, nonces, balances_request("a", False)) == b"[]"
            assert sent(mocked)[0].kwargs["proxy"] is None
        # Nor does aiohttp read it (and ~/.netrc) again for each request.
        assert not session.trust_env
