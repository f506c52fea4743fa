"""The running exporter: wires config, scheduler, store and server together and owns signals.

The HTTP server is bound before the first poll, so a port in use stops the exporter before it
sends anything. SIGTERM and SIGINT stop it (in-flight requests are cancelled), SIGHUP re-reads
the config file and the secrets; a bad new config is logged and the running one stays.
"""

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import structlog

from balance_exporter import __version__
from balance_exporter.config import Config, ConfigError, load_config
from balance_exporter.exposition import ExpositionCache
from balance_exporter.gemini.client import new_session
from balance_exporter.heap import burst_frozen, collect_garbage_regularly
from balance_exporter.logging import redactor
from balance_exporter.scheduler import Clock, Scheduler, SystemClock
from balance_exporter.server import WebOptions, WebServer
from balance_exporter.storage import StatePersister, load_state
from balance_exporter.store import BalanceStore
from balance_exporter.streaming import StreamManager

log = structlog.get_logger("balance_exporter.service")


class Service:
    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        web_options: WebOptions,
        clock: Clock | None = None,
        storage_path: Path | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self._clock = clock or SystemClock()
        key_ids = {name: key.key_id for name, key in config.credentials.items()}
        restored = (load_state(storage_path, int(self._clock.wall() * 1e9),
                                config.settings.gemini.max_timestamp_skew_seconds, key_ids)
                    if storage_path is not None else [])
        self.store = BalanceStore(restored)
        exposition = ExpositionCache(self.store)
        self._persister = (StatePersister(self.store, storage_path,
                                          exposition.counters.count_state_save_error)
                           if storage_path else None)
        self._persisting: asyncio.Task[None] | None = None
        self._collecting: asyncio.Task[None] | None = None
        self._server = WebServer(exposition, web_options)
        self._session: aiohttp.ClientSession | None = None
        self._scheduler: Scheduler | None = None
        self._streams: StreamManager | None = None

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def port(self) -> int | None:
        return self._server.port

    async def start(self) -> None:
        """Bind the server, then start polling; raises `ListenError` if it cannot bind."""
        redactor.set_secrets(self.config.secrets)
        await self._server.start()
        self._collecting = asyncio.create_task(collect_garbage_regularly(), name="collect-garbage")
        self._session = new_session(f"balance-exporter/{__version__}")
        self._scheduler = Scheduler(self._session, self.store, self._clock)
        await self._scheduler.apply(self.config)
        self._streams = StreamManager(self._scheduler, self._session, self.store, self._clock)
        await self._streams.apply(self.config)
        if self._persister is not None:
            self._persisting = asyncio.create_task(self._persister.run(), name="save-state")
        log.info("exporter started", url=self.url,
                 configured_accounts=len(self.config.settings.accounts),
                 discovering_keys=sum(key.discover is not None
                                      for key in self.config.settings.keys),
                 keys=len(self.config.credentials), version=__version__)

    async def reload(self) -> bool:
        """Re-read the config and secrets; keep the running config if the new one is bad."""
        try:
            # In a thread: reading and checking 10,000 accounts and their secret files takes
            # seconds, which would hold every poll, scrape and probe.
            with burst_frozen():
                config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as error:
            log.error("config reload rejected, keeping the running config",
                      problems=error.problems)
            return False
        redactor.set_secrets(config.secrets)
        self.config = config
        assert self._scheduler is not None
        assert self._streams is not None
        await self._scheduler.apply(config)
        await self._streams.apply(config)
        for warning in config.warnings:
            log.warning("config warning", problem=warning)
        log.info("config reloaded", configured_accounts=len(config.settings.accounts))
        return True

    async def stop(self) -> None:
        """Close whatever `start` opened, also after a start that failed half-way."""
        if self._streams is not None:
            await self._streams.stop()
        if self._scheduler is not None:
            await self._scheduler.stop()
        for task in (self._persisting, self._collecting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._persister is not None and self._session is not None:
            await self._persister.save_if_changed()
        await self._server.stop()
        if self._session is not None:
            await self._session.close()
            log.info("exporter stopped")


async def wait_for_stop_signal(on_hangup: Callable[[], None] | None = None) -> None:
    """Wait for SIGTERM or SIGINT; call `on_hangup` on SIGHUP meanwhile."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = [signal.SIGTERM, signal.SIGINT]
    for signum in handled:
        loop.add_signal_handler(signum, stop.set)
    if on_hangup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
        handled.append(signal.SIGHUP)
    try:
        await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


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

    try:
        await service.start()
        if on_started is not None:
            on_started()
        await wait_for_stop_signal(on_hangup)
    finally:
        for task in reloads:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*reloads, return_exceptions=True)
        await service.stop()
