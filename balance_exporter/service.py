"""The running exporter: wires config, scheduler, store and server together and owns signals.

SIGTERM and SIGINT stop it (in-flight requests are cancelled), SIGHUP re-reads the config file
and the secrets; a bad new config is logged and the running one stays.
"""

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from balance_exporter import __version__
from balance_exporter.config import Config, ConfigError, load_config
from balance_exporter.exposition import ExpositionCache
from balance_exporter.logging import redactor
from balance_exporter.scheduler import Clock, Scheduler, SystemClock
from balance_exporter.server import build_app, parse_listen_address
from balance_exporter.store import BalanceStore
from balance_exporter.webconfig import BasicAuth, WebConfig, ssl_context

log = structlog.get_logger("balance_exporter.service")

# Leaves room inside the 5 s a container runtime usually grants between SIGTERM and SIGKILL.
SHUTDOWN_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class WebOptions:
    listen_address: str = ":8397"
    telemetry_path: str = "/metrics"
    web_config: WebConfig | None = None
    access_log: bool = False


class Service:
    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        web_options: WebOptions,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self._web = web_options
        self._clock = clock or SystemClock()
        self.store = BalanceStore()
        self._session: aiohttp.ClientSession | None = None
        self._scheduler: Scheduler | None = None
        self._runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()
        self.port: int | None = None

    @property
    def url(self) -> str:
        host, _ = parse_listen_address(self._web.listen_address)
        tls = self._web.web_config and self._web.web_config.tls_server_config
        scheme = "https" if tls else "http"
        shown = "localhost" if host in (None, "0.0.0.0", "::") else host  # noqa: S104
        shown = f"[{shown}]" if ":" in shown else shown
        return f"{scheme}://{shown}:{self.port}"

    async def start(self) -> None:
        redactor.set_secrets(self.config.secrets)
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": f"balance-exporter/{__version__}"}
        )
        self._scheduler = Scheduler(self._session, self.store, self._clock)
        await self._scheduler.apply(self.config)
        await self._start_server()
        log.info("exporter started", url=self.url, accounts=len(self.config.settings.accounts),
                 keys=len(self.config.keys), version=__version__)

    async def _start_server(self) -> None:
        web_config = self._web.web_config
        middlewares: tuple[Middleware, ...] = ()
        if web_config and web_config.basic_auth_users:
            middlewares = (BasicAuth(web_config.basic_auth_users).middleware,)
        app = build_app(ExpositionCache(self.store), self._web.telemetry_path, middlewares)
        self._runner = web.AppRunner(
            app,
            shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS,
            access_log=logging.getLogger("aiohttp.access") if self._web.access_log else None,
        )
        await self._runner.setup()
        host, port = parse_listen_address(self._web.listen_address)
        tls = web_config.tls_server_config if web_config else None
        site = web.TCPSite(
            self._runner, host, port, ssl_context=ssl_context(tls) if tls else None
        )
        await site.start()
        sockets = self._runner.addresses
        self.port = int(sockets[0][1]) if sockets else port

    async def reload(self) -> bool:
        """Re-read the config and secrets; keep the running config if the new one is bad."""
        try:
            config = load_config(self.config_path)
        except ConfigError as error:
            log.error("config reload rejected, keeping the running config",
                      problems=error.problems)
            return False
        redactor.set_secrets(config.secrets)
        self.config = config
        assert self._scheduler is not None
        await self._scheduler.apply(config)
        for warning in config.warnings:
            log.warning("config warning", problem=warning)
        log.info("config reloaded", accounts=len(config.settings.accounts))
        return True

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def stop(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        log.info("exporter stopped")


async def run_until_signalled(
    service: Service, on_started: Callable[[], None] | None = None
) -> None:
    """Start the service and run it until SIGTERM or SIGINT; SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hangup() -> None:
        task = loop.create_task(service.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    await service.start()
    if on_started is not None:
        on_started()
    loop.add_signal_handler(signal.SIGTERM, service.request_stop)
    loop.add_signal_handler(signal.SIGINT, service.request_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await service.wait_stopped()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for task in reloads:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*reloads, return_exceptions=True)
        await service.stop()
