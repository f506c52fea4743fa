"""Reaching Gemini as treasury teams do: through a real egress proxy (Debian's tinyproxy), to the
simulator served over TLS with a private CA that `gemini.ca_file` trusts."""

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from balance_exporter.config import ConfigError, build_config
from balance_exporter.server import WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState
from tests.conftest import LOOPBACK_ANY_PORT
from tests.helpers import (
    ACCOUNT_KEY,
    ACCOUNT_SECRET,
    all_polled,
    exporter_document,
    free_port,
    sample,
    scrape_until,
    simulator_document,
)


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture
def private_ca(tmp_path: Path) -> Path:
    """A CA and a certificate for 127.0.0.1 signed by it, made with openssl; their folder."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Test CA",
            "-keyout", str(tmp_path / "ca.key"), "-out", str(tmp_path / "ca.pem"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(tmp_path / "server.key"), "-out", str(tmp_path / "server.csr"))
    (tmp_path / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(tmp_path / "server.csr"), "-days", "1",
            "-CA", str(tmp_path / "ca.pem"), "-CAkey", str(tmp_path / "ca.key"),
            "-CAcreateserial", "-extfile", str(tmp_path / "san.ext"),
            "-out", str(tmp_path / "server.pem"))
    return tmp_path


@pytest.fixture
async def tls_simulator(private_ca: Path) -> AsyncIterator[RunningSimulator]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(private_ca / "server.pem", private_ca / "server.key")
    running = await start_simulator(SimState.from_document(simulator_document()), tls=context)
    yield running
    await running.close()


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proxy:
    url: str
    log: Path

    def connects(self) -> int:
        return self.log.read_text(errors="replace").count("CONNECT")


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Proxy]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.fail("tinyproxy not found: install Debian's tinyproxy package (.ci/run does)")
    port = free_port()
    log = tmp_path / "tinyproxy.log"
    config = tmp_path / "tinyproxy.conf"
    config.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 30\nAllow 127.0.0.1\n"
                      f"LogFile \"{log}\"\nLogLevel Connect\nMaxClients 20\n"
                      f"PidFile \"{tmp_path / 'tinyproxy.pid'}\"\n")
    log.touch()
    process = subprocess.Popen([binary, "-d", "-c", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not port_open(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tinyproxy did not start: {log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield Proxy(f"http://127.0.0.1:{port}", log)
    finally:
        process.terminate()
        process.wait(timeout=10)


def proxied_document(simulator: RunningSimulator, ca: Path, proxy_url: str | None) -> dict[
        str, object]:
    document = exporter_document(simulator.url)
    gemini = document["gemini"]
    assert isinstance(gemini, dict)
    gemini["ca_file"] = str(ca / "ca.pem")
    if proxy_url is not None:
        gemini["proxy_url"] = proxy_url
    return document


async def polled_through(document: dict[str, object], http: aiohttp.ClientSession) -> None:
    service = Service(build_config(document, {}), None,
                      WebOptions(listen_address=LOOPBACK_ANY_PORT))
    await service.start()
    try:
        await all_polled(http, service)
    finally:
        await service.stop()


async def test_balances_come_through_proxy_url_and_the_private_ca(
    tls_simulator: RunningSimulator, private_ca: Path, tinyproxy: Proxy,
    http: aiohttp.ClientSession,
) -> None:
    await polled_through(proxied_document(tls_simulator, private_ca, tinyproxy.url), http)
    assert tinyproxy.connects() > 0  # the requests went through the proxy, tunnelled


async def test_https_proxy_from_the_environment_is_honoured_and_no_proxy_bypasses_it(
    tls_simulator: RunningSimulator, private_ca: Path, tinyproxy: Proxy,
    http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    await polled_through(proxied_document(tls_simulator, private_ca, None), http)
    through_proxy = tinyproxy.connects()
    assert through_proxy > 0
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    await polled_through(proxied_document(tls_simulator, private_ca, None), http)
    assert tinyproxy.connects() == through_proxy


async def test_without_the_private_ca_the_certificate_is_refused(
    tls_simulator: RunningSimulator, private_ca: Path, http: aiohttp.ClientSession,
) -> None:
    document = exporter_document(tls_simulator.url)
    service = Service(build_config(document, {}), None,
                      WebOptions(listen_address=LOOPBACK_ANY_PORT))
    await service.start()
    try:
        assert service.store.account_snapshots()
        for _ in range(100):
            snapshot = service.store.account_snapshots()[0]
            if snapshot.balances.attempted:
                break
            await asyncio.sleep(0.05)
        assert not snapshot.balances.up
        assert snapshot.balances.last_error == "ConnectionError"
    finally:
        await service.stop()


def test_a_ca_file_that_cannot_be_loaded_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-ca.pem").write_text("hello")
    document = exporter_document("https://127.0.0.1:1")
    document["gemini"] = {"base_url": "https://127.0.0.1:1", "ca_file": "not-a-ca.pem"}
    with pytest.raises(ConfigError, match=r"gemini\.ca_file: cannot load 'not-a-ca\.pem'"):
        build_config(document, {}, tmp_path)


async def test_the_stream_comes_through_the_proxy_with_the_private_ca(
    private_ca: Path, tinyproxy: Proxy, http: aiohttp.ClientSession,
) -> None:
    """REST to a plain-http simulator (proxied as absolute-URI requests), the stream to a TLS one
    of the private CA: only the stream's upgrade makes the proxy open a CONNECT tunnel."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(private_ca / "server.pem", private_ca / "server.key")
    world = simulator_document()
    world["keys"][1]["nonce"] = "seconds"
    rest = await start_simulator(SimState.from_document(world))
    streaming = await start_simulator(SimState.from_document(world), tls=context)
    try:
        document = proxied_document(rest, private_ca, tinyproxy.url)
        gemini = document["gemini"]
        assert isinstance(gemini, dict)
        gemini["websocket_url"] = streaming.websocket_url  # wss://, the private CA's
        document["keys"] = [{"name": "hot", "api_key": ACCOUNT_KEY, "api_secret": ACCOUNT_SECRET,
                             "nonce": "seconds", "requests_per_second": 1, "stream": {}}]
        document["accounts"] = [{"key": "hot", "name": "delta", "interval_seconds": 60}]
        service = Service(build_config(document, {}), None,
                          WebOptions(listen_address=LOOPBACK_ANY_PORT))
        await service.start()
        try:
            # Up only if the upgrade trusted the private CA (the system's does not know it).
            await scrape_until(http, service.url, "the stream over TLS", lambda s: sample(
                s, "gemini_stream_up", key="hot") == 1 and sample(
                s, "gemini_account_up", account="delta") == 1)
        finally:
            await service.stop()
    finally:
        await rest.close()
        await streaming.close()
    # The upgrade's tunnel to the TLS simulator (REST to the plain one needs none).
    port = streaming.websocket_url.rsplit(":", 1)[1].strip("/")
    assert f"CONNECT 127.0.0.1:{port} " in tinyproxy.log.read_text()
