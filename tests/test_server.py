"""The HTTP surface over a real socket: formats, compression, pages, auth and TLS."""

import asyncio
import gzip
import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import structlog

from balance_exporter.exposition import ExpositionCache
from balance_exporter.gemini.replies import KeyRoles
from balance_exporter.metrics import ExporterCounters
from balance_exporter.server import (
    ListenAddress,
    WebOptions,
    WebServer,
    _AcceptErrorLog,
    _Throttle,
    build_app,
)
from tests.conftest import Serve
from tests.helpers import fixed_store, scrape


@pytest.fixture
async def server(serve: Serve) -> str:
    return await serve(build_app(ExpositionCache(fixed_store())))


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


async def test_metrics_gzipped_only_when_asked(serve: Serve) -> None:
    # Without the process families, two scrapes are the same bytes (CPU seconds move).
    server = await serve(build_app(ExpositionCache(fixed_store(), process_metrics=False)))
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


async def test_landing_page_total_says_what_it_covers_and_agrees_with_the_metrics(
    http: aiohttp.ClientSession, server: str
) -> None:
    async with http.get(f"{server}/") as response:
        page = await response.text()
    samples = await scrape(http, server)
    valued = sum(value for (name, labels), value in samples.items()
                 if name == "gemini_balance_amount_notional"
                 and ("notional_currency", "USD") in labels)
    assert valued == 340_000.0  # what sum(gemini_balance_amount_notional) gives
    # Two accounts are valued in USD, one of them has no value yet; savings is not valued.
    assert ("Total value: <strong>340,000.00 USD</strong> (1 of 2 accounts valued, the others "
            "not yet).") in page
    cells = {row.split("</td>")[0].removeprefix("<tr><td>"): row.split("<td>")[7]
             for row in page.splitlines() if row.startswith("<tr><td>")}
    assert cells == {"treasury-primary": "340,000.00 USD</td>", "savings": "off</td>",
                     "never-polled": "not yet</td>"}


async def test_landing_page_shows_each_keys_roles_and_warns_of_a_key_that_can_move_funds(
    http: aiohttp.ClientSession, serve: Serve
) -> None:
    store = fixed_store()
    store.record_roles("treasury", KeyRoles(True, False, False, False), 1_710_547_200.0)
    store.record_roles("savings", KeyRoles(False, True, True), 1_710_547_200.0)
    store.record_roles_failure("savings", "Timeout")
    url = await serve(build_app(ExpositionCache(store)))
    async with http.get(f"{url}/") as response:
        page = await response.text()
    assert "<p>Key treasury: roles auditor.</p>" in page
    assert ('<p class="warning">&#9888; Key savings: roles fund_manager, trader (the last ask '
            "failed): this key can trade or move funds; a monitoring key needs Auditor "
            "only.</p>") in page


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


async def test_custom_telemetry_path(http: aiohttp.ClientSession, serve: Serve) -> None:
    url = await serve(build_app(ExpositionCache(fixed_store()), "/probe"))
    async with http.get(f"{url}/probe") as response:
        assert response.status == 200
    async with http.get(f"{url}/metrics") as response:
        assert response.status == 404


@pytest.mark.parametrize(("address", "host", "port", "shown"), [
    (":8397", None, 8397, ":8397"), ("127.0.0.1:9", "127.0.0.1", 9, "127.0.0.1:9"),
    ("[::1]:80", "::1", 80, "[::1]:80"), ("localhost:0", "localhost", 0, "localhost:0"),
])
def test_listen_addresses(address: str, host: str | None, port: int, shown: str) -> None:
    parsed = ListenAddress.parse(address)
    assert (parsed.host, parsed.port, str(parsed)) == (host, port, shown)


@pytest.mark.parametrize("address", [
    "8397", "host:", "host:http", ":70000", "::1:80", "[::1:80", "a b:80", ":\uff18\uff10", "",
])
def test_bad_listen_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        ListenAddress.parse(address)


async def test_healthy_is_503_while_a_keys_poll_worker_is_down(
    http: aiohttp.ClientSession, serve: Serve
) -> None:
    store = fixed_store()
    url = await serve(build_app(ExpositionCache(store)))
    store.record_worker_running("savings", False)
    async with http.get(f"{url}/-/healthy") as response:
        assert response.status == 503
        assert "savings" in await response.text()
    store.record_worker_running("savings", True)
    async with http.get(f"{url}/-/healthy") as response:
        assert response.status == 200


async def test_gzip_q_0_and_openmetrics_q_0_are_honoured(server: str) -> None:
    headers = {"Accept-Encoding": "gzip;q=0, identity",
               "Accept": "application/openmetrics-text;q=0, text/plain"}
    async with aiohttp.ClientSession(auto_decompress=False) as raw, raw.get(
            f"{server}/metrics", headers=headers) as response:
        assert "Content-Encoding" not in response.headers
        assert response.headers["Content-Type"].startswith("text/plain")
        assert not (await response.text()).endswith("# EOF\n")


@pytest.fixture
async def guarded() -> AsyncIterator[WebServer]:
    """The real server with a short idle timeout and a small connection cap."""
    options = WebOptions(listen_address=ListenAddress("127.0.0.1", 0), idle_timeout_seconds=0.5,
                         max_connections=10)
    server = WebServer(ExpositionCache(fixed_store(), process_metrics=False), options)
    await server.start()
    yield server
    await server.stop()


async def slow_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A slowloris client: a request line and one header, and then nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    return reader, writer


async def test_the_loops_exception_handler_is_put_back_at_stop() -> None:
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    server = WebServer(ExpositionCache(fixed_store(), process_metrics=False),
                       WebOptions(listen_address=ListenAddress("127.0.0.1", 0)))
    await server.start()
    assert loop.get_exception_handler() is not before
    await server.stop()
    assert loop.get_exception_handler() is before


async def test_slow_headers_are_closed_after_the_idle_timeout(guarded: WebServer) -> None:
    assert guarded.port is not None
    reader, writer = await slow_client(guarded.port)
    # The server hangs up (EOF) instead of waiting for the rest of the headers for ever; the
    # limit only guards against a hang.
    assert await asyncio.wait_for(reader.read(), timeout=15) == b""
    writer.close()


async def test_a_flood_of_slow_connections_cannot_lock_a_scrape_out(
    guarded: WebServer, http: aiohttp.ClientSession
) -> None:
    assert guarded.port is not None
    flood = [await slow_client(guarded.port) for _ in range(30)]
    async with http.get(f"http://127.0.0.1:{guarded.port}/metrics") as response:
        assert response.status == 200
        assert "gemini_balance_amount" in await response.text()
    await asyncio.sleep(0.1)
    still_open = [reader for reader, _ in flood if not reader.at_eof()]
    assert len(still_open) <= 10  # the oldest were closed to make room
    async with http.get(f"http://127.0.0.1:{guarded.port}/metrics") as response:
        closed = [line for line in (await response.text()).splitlines()
                  if line.startswith("gemini_exporter_http_connections_closed_total ")]
    assert float(closed[0].split()[1]) >= 20
    for _, writer in flood:
        writer.close()


def test_accept_errors_are_logged_once_per_interval() -> None:
    loop = asyncio.new_event_loop()
    try:
        counters = ExporterCounters()
        handler = _AcceptErrorLog(loop, counters)
        context = {"message": "socket.accept() out of system resource",
                   "exception": OSError(24, "Too many open files")}
        with structlog.testing.capture_logs() as logs:
            for _ in range(1000):
                handler(loop, context)
    finally:
        loop.close()
    assert [entry["event"] for entry in logs] == ["cannot accept HTTP connections"]
    assert counters.http_accept_errors == 1000  # every one counted, one logged


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_bad_requests_log_one_short_line_not_a_traceback(guarded: WebServer) -> None:
    assert guarded.port is not None
    records = Records()
    aiohttp_server = logging.getLogger("aiohttp.server")
    aiohttp_server.addHandler(records)
    try:
        for raw in (b"GET /metrics HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", b"GARBAGE\r\n\r\n",
                    b"GET / HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n") * 20:
            reader, writer = await asyncio.open_connection("127.0.0.1", guarded.port)
            writer.write(raw)
            await writer.drain()
            assert (await reader.read(12)).endswith(b"400")
            writer.close()
    finally:
        aiohttp_server.removeHandler(records)
    assert len(records.records) == 1  # 60 bad requests, one line in this interval
    samples = {line.split(" ")[0]: line.split(" ")[1] for line in (await (await aiohttp.request(
        "GET", f"http://127.0.0.1:{guarded.port}/metrics").__aenter__()).text()).splitlines()
        if line.startswith("gemini_exporter_http")}
    # Bad headers and oversized lines are counted; a garbled request line aiohttp answers 400
    # without reporting it (port scanners, TLS spoken to a plain port), so it is not.
    assert samples["gemini_exporter_http_bad_requests_total"] == "40.0"
    (record,) = records.records
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert "\n" not in record.getMessage()
    assert record.getMessage().startswith("bad HTTP request answered 400: ")


def test_the_throttle_lets_one_line_through_per_interval_and_counts_the_rest() -> None:
    throttle = _Throttle(interval_seconds=0.2)
    assert throttle.allow() == 0
    assert [throttle.allow() for _ in range(5)] == [None] * 5
    time.sleep(0.25)  # just past the interval (the sleep is the input, nothing is timed)
    assert throttle.allow() == 5
    assert throttle.allow() is None
