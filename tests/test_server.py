"""The HTTP surface over a real socket: formats, compression, pages, auth and TLS."""

import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from aiohttp import web

from balance_exporter.config import ConfigError
from balance_exporter.exposition import ExpositionCache
from balance_exporter.server import build_app, parse_listen_address
from balance_exporter.webconfig import BasicAuth, load_web_config, ssl_context
from tests.test_metrics import fixed_store


async def serve(app: web.Application, tls: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
    return runner


def base_url(runner: web.AppRunner, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def server() -> AsyncIterator[str]:
    store = fixed_store()
    runner = await serve(build_app(ExpositionCache(store)))
    yield base_url(runner)
    await runner.cleanup()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_metrics_in_the_text_format_by_default(
    http: aiohttp.ClientSession, server: str
) -> None:
    async with http.get(f"{server}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        body = await response.text()
    assert 'gemini_balance_amount{account="treasury-primary",currency="BTC"} 5.0' in body
    assert "process_resident_memory_bytes" in body  # the process collectors are there


async def test_metrics_in_openmetrics_when_asked(
    http: aiohttp.ClientSession, server: str
) -> None:
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    async with http.get(f"{server}/metrics", headers={"Accept": accept}) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")


async def test_metrics_gzipped_only_when_asked(server: str) -> None:
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(f"{server}/metrics", headers={"Accept-Encoding": "gzip"}) as response:
            assert response.headers["Content-Encoding"] == "gzip"
            text = gzip.decompress(await response.read()).decode()
        async with raw.get(f"{server}/metrics", headers={"Accept-Encoding": "identity"}) as plain:
            assert "Content-Encoding" not in plain.headers
            assert (await plain.text()) == text
    assert "gemini_account_up" in text


async def test_landing_page_lists_accounts_with_status_and_age(
    http: aiohttp.ClientSession, server: str
) -> None:
    async with http.get(f"{server}/") as response:
        assert response.headers["Content-Type"].startswith("text/html")
        page = await response.text()
    assert '<a href="/metrics">' in page
    assert "treasury-primary" in page
    assert "down (RateLimit)" in page
    assert "waiting for first poll" in page


async def test_health_and_readiness(http: aiohttp.ClientSession, server: str) -> None:
    async with http.get(f"{server}/-/healthy") as response:
        assert response.status == 200
    async with http.get(f"{server}/-/ready") as response:
        assert response.status == 503  # one account was never polled


async def test_unknown_paths_404_and_wrong_methods_405(
    http: aiohttp.ClientSession, server: str
) -> None:
    async with http.get(f"{server}/nope") as response:
        assert response.status == 404
    async with http.post(f"{server}/metrics") as response:
        assert response.status == 405
    async with http.head(f"{server}/metrics") as response:
        assert response.status == 200


async def test_custom_telemetry_path() -> None:
    store = fixed_store()
    runner = await serve(build_app(ExpositionCache(store), "/probe"))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base_url(runner)}/probe") as response:
                assert response.status == 200
            async with http.get(f"{base_url(runner)}/metrics") as response:
                assert response.status == 404
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("address", "expected"), [
    (":8397", (None, 8397)), ("127.0.0.1:9", ("127.0.0.1", 9)), ("[::1]:80", ("::1", 80)),
])
def test_listen_addresses(address: str, expected: tuple[str | None, int]) -> None:
    assert parse_listen_address(address) == expected


@pytest.mark.parametrize("address", ["8397", "host:", "host:http", ":70000"])
def test_bad_listen_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="listen-address"):
        parse_listen_address(address)


PASSWORD = "TOPSECRET-password"


def write_web_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return path


async def test_basic_auth_guards_everything_but_the_probes(tmp_path: Path) -> None:
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    config = load_web_config(write_web_config(
        tmp_path, f"basic_auth_users:\n  prometheus: '{hashed}'\n"))
    assert PASSWORD not in repr(config)
    store = fixed_store()
    auth = BasicAuth(config.basic_auth_users)
    runner = await serve(build_app(ExpositionCache(store), middlewares=(auth.middleware,)))
    url = base_url(runner)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/metrics") as response:
                assert response.status == 401
                assert "Basic" in response.headers["WWW-Authenticate"]
            wrong = {"Authorization": aiohttp.encode_basic_auth("prometheus", "wrong")}
            async with http.get(f"{url}/metrics", headers=wrong) as response:
                assert response.status == 401
            right = {"Authorization": aiohttp.encode_basic_auth("prometheus", PASSWORD)}
            for _ in range(2):  # the second time from the cache
                async with http.get(f"{url}/metrics", headers=right) as response:
                    assert response.status == 200
            async with http.get(f"{url}/-/healthy") as response:
                assert response.status == 200
    finally:
        await runner.cleanup()


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for 127.0.0.1, made with openssl; returns its folder."""
    subprocess.run([
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem"),
    ], check=True, capture_output=True)
    return tmp_path


async def test_tls_from_the_web_config(certificate: Path) -> None:
    tmp_path = certificate
    config = load_web_config(write_web_config(
        tmp_path, "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"))
    assert config.tls_server_config is not None
    store = fixed_store()
    runner = await serve(build_app(ExpositionCache(store)),
                         ssl_context(config.tls_server_config))
    try:
        trust = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
        url = f"{base_url(runner, 'https')}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url, ssl=trust) as response:
            assert response.status == 200
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("text", "problem"), [
    ("basic_auth_users:\n  alice: plaintext\n", "not a bcrypt hash"),
    ("tls_server_config:\n  cert_file: a\n", "key_file: Field required"),
    ("tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: "
     "RequireAndVerifyClientCert\n", "client_ca_file"),
    ("tls_config: {}\n", "Extra inputs are not permitted"),
])
def test_bad_web_configs_are_refused(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        load_web_config(write_web_config(tmp_path, text))
    assert "plaintext" not in str(caught.value)
