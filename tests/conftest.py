"""Fixtures that run the real parts on real sockets: the simulator, the exporter service, and any
aiohttp app a test serves. Shared plain helpers live in tests/helpers.py."""

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web

from balance_exporter.config import build_config
from balance_exporter.server import ListenAddress, WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator, start_simulator
from balance_exporter.simulator.state import SimState
from tests.helpers import exporter_document, simulator_document

LOOPBACK_ANY_PORT = ListenAddress("127.0.0.1", 0)

# Tests that take tens of seconds each (real Prometheus and Alertmanager, the benchmarks): each
# is named when it starts, so that a quiet run shows what it is waiting for rather than a
# minute on one dot.
SLOW_MARKERS = ("e2e", "slow")


class _SlowTestNames:
    def __init__(self, reporter: pytest.TerminalReporter) -> None:
        self._reporter = reporter
        self._slow: set[str] = set()

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self._slow = {item.nodeid for item in items
                      if any(item.get_closest_marker(marker) for marker in SLOW_MARKERS)}

    @pytest.hookimpl(trylast=True)  # after the reporter has named the test's file
    def pytest_runtest_logstart(self, nodeid: str) -> None:
        if nodeid in self._slow:
            self._reporter.ensure_newline()
            self._reporter.write_line(f"   running {nodeid} (slow: tens of seconds)")


@pytest.hookimpl(trylast=True)  # after the terminal reporter is made
def pytest_configure(config: pytest.Config) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and reporter.verbosity <= 0:  # -v names every test anyway
        config.pluginmanager.register(_SlowTestNames(reporter), "slow-test-names")

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def simulator() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator(SimState.from_document(simulator_document()))
    yield running
    await running.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def exporter(simulator: RunningSimulator) -> AsyncIterator[Service]:
    config = build_config(exporter_document(simulator.url), {})
    service = Service(config, None, WebOptions(listen_address=LOOPBACK_ANY_PORT))
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serve an app on a free loopback port (TLS if given a context); gives its base URL and
    stops every app it served when the test ends."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application, tls: ssl.SSLContext | None = None) -> str:
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls).start()
        scheme = "https" if tls else "http"
        return f"{scheme}://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()
