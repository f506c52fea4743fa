"""A key's `balances@account` stream, kept open: the stream says *when*, REST says *what*.

A frame never writes a balance: it makes the key's account's balances poll due now, and that
poll (within the key's budget, like every request) brings the values through the same staleness
rule, flooring and validation as any. Frames before that poll make one poll. While the stream is
up and subscribed the regular balances polls come every `reconcile_interval_seconds` at most;
when it drops they come at their planned interval again at once, and the stream is opened again
after a jittered backoff (a refused upgrade backs off like a rejected request).
"""

import asyncio
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import structlog

from balance_exporter.config import Config, Credentials, KeySettings, StreamSettings
from balance_exporter.gemini.client import proxy_for
from balance_exporter.gemini.nonce import NonceSource
from balance_exporter.gemini.replies import BalanceUpdate
from balance_exporter.gemini.stream import (
    StreamEnded,
    StreamHandlers,
    StreamRejected,
    stream_balances,
)
from balance_exporter.scheduler import (
    REJECTED_BACKOFF_BASE_SECONDS,
    Backoffs,
    Clock,
    KeyWorker,
    Scheduler,
    jittered_backoff,
)
from balance_exporter.store import BalanceStore

log = structlog.get_logger("balance_exporter.streaming")

RECONNECT_BACKOFF_BASE_SECONDS = 2.0
_NS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True)
class StreamEndpoint:
    """Where and how a key's connections are opened: Gemini's WebSocket URL, with the REST
    client's proxy and CA settings."""

    session: aiohttp.ClientSession
    url: str
    proxy_url: str | None = None
    tls: ssl.SSLContext | None = field(default=None, repr=False)

    async def __call__(self, credentials: Credentials, nonces: NonceSource,
                       handlers: StreamHandlers) -> None:
        await stream_balances(self.session, self.url, credentials, nonces, handlers,
                              self.proxy_url, self.tls)


# Opens one connection and reads it until it ends (tests pass a fake).
Connect = Callable[[Credentials, NonceSource, StreamHandlers], Awaitable[None]]


class StreamSupervisor:
    """Keeps one key's stream open and turns its frames into polls of the key's worker."""

    def __init__(
        self, worker: KeyWorker, credentials: Credentials, nonces: NonceSource,
        settings: StreamSettings, connect: Connect, store: BalanceStore,
        clock: Clock, backoffs: Backoffs, max_skew_seconds: float,
    ) -> None:
        self._worker = worker
        self._credentials = credentials
        self._nonces = nonces
        self._settings = settings
        self._connect = connect
        self._store = store
        self._clock = clock
        self._backoffs = backoffs
        self._max_skew_seconds = max_skew_seconds
        self._rng = random.Random()
        self._subscribed = False

    @property
    def _key(self) -> str:
        return self._worker.key_name

    async def run(self) -> None:
        try:
            await self._keep_open()
        finally:  # stopped (a reload turned the stream off, or shutdown)
            self._store.record_stream_up(self._key, False)
            self._worker.schedule.set_balances_floor(None, self._clock.monotonic())
            self._worker.wake()

    async def _keep_open(self) -> None:
        failures = rejections = 0
        while True:
            self._subscribed = False
            try:
                await self._connect(self._credentials, self._nonces, StreamHandlers(
                    self._on_subscribed, self._on_update, self._on_malformed))
                raise StreamEnded("closed")  # a connection never ends without a reason
            except StreamRejected as error:
                rejections += 1
                delay = jittered_backoff(rejections, REJECTED_BACKOFF_BASE_SECONDS,
                                         self._backoffs.rejected_retry_seconds, self._rng)
                self._ended(error, delay, log.error, hint=(
                    "Gemini's WebSocket API takes account-scoped keys with time-based nonces "
                    "and a role that reads balances; REST polling goes on"))
            except StreamEnded as error:
                rejections = 0
                failures = 1 if self._subscribed else failures + 1
                delay = jittered_backoff(failures, RECONNECT_BACKOFF_BASE_SECONDS,
                                         self._backoffs.max_backoff_seconds, self._rng)
                self._ended(error, delay, log.warning)
            await self._clock.sleep(delay)

    def _ended(self, error: StreamEnded, delay: float, level: Callable[..., object],
               **details: object) -> None:
        self._store.record_stream_up(self._key, False)
        self._store.record_stream_error(self._key, error.reason)
        # The regular interval applies again at once.
        self._worker.schedule.set_balances_floor(None, self._clock.monotonic())
        self._worker.wake()
        level("balance stream ended, opening it again", key=self._key, reason=error.reason,
              detail=error.detail, retry_seconds=round(delay, 3), **details)

    def _on_subscribed(self) -> None:
        self._subscribed = True
        self._store.record_stream_up(self._key, True, connected=True,
                                     reconcile_seconds=self._settings.reconcile_interval_seconds)
        now = self._clock.monotonic()
        self._worker.schedule.set_balances_floor(self._settings.reconcile_interval_seconds, now)
        # What changed while there was no stream: one poll now.
        self._trigger(now)
        log.info("balance stream subscribed", key=self._key)

    def _trigger(self, now: float) -> bool:
        triggered = False
        for label in self._worker.schedule.targets:
            triggered |= self._worker.schedule.trigger_balances(label, now)
        if triggered:
            self._worker.wake()
        return triggered

    def _on_update(self, update: BalanceUpdate) -> None:
        wall = self._clock.wall()
        triggered = self._trigger(self._clock.monotonic())
        self._store.record_stream_frame(self._key, wall, triggered)
        ahead = update.update_ns / _NS_PER_SECOND - wall
        if self._max_skew_seconds > 0 and ahead > self._max_skew_seconds:
            # Its `u` only: the poll it asked for still comes.
            self._store.record_stream_error(self._key, "future_update")
            return
        for label in self._worker.schedule.targets:
            self._store.record_account_update(label, update.update_ns)

    def _on_malformed(self, problem: str) -> None:
        self._store.record_stream_error(self._key, "malformed_frame")
        log.warning("malformed stream frame ignored", key=self._key, problem=problem[:300])


class StreamManager:
    """One supervisor per streaming API key, kept across reloads: a reload opens a key's stream
    again only if its credentials or stream settings changed."""

    def __init__(self, scheduler: Scheduler, session: aiohttp.ClientSession,
                 store: BalanceStore, clock: Clock) -> None:
        self._scheduler = scheduler
        self._session = session
        self._store = store
        self._clock = clock
        # Per API key: what its stream was opened with, and the supervisor's task.
        self._running: dict[str, tuple[tuple[object, ...], asyncio.Task[None]]] = {}

    async def apply(self, config: Config) -> None:
        gemini, polling = config.settings.gemini, config.settings.polling
        backoffs = Backoffs(polling.max_backoff_seconds, polling.rejected_retry_seconds)
        wanted: dict[str, tuple[tuple[object, ...], KeySettings, Credentials]] = {}
        for key in config.settings.keys:
            if key.stream is not None and key.stream.enabled:
                credentials = config.credentials[key.name]
                settings: tuple[object, ...] = (
                    credentials, key.name, key.stream, gemini.websocket_url, gemini.proxy_url,
                    gemini.ca_file, backoffs, gemini.max_timestamp_skew_seconds)
                wanted[credentials.api_key] = (settings, key, credentials)
        for api_key, (opened_with, task) in list(self._running.items()):
            if api_key not in wanted or wanted[api_key][0] != opened_with:
                await _stopped(task)
                del self._running[api_key]
        for api_key, (settings, key, credentials) in wanted.items():
            found = self._scheduler.worker_of(api_key)
            if api_key in self._running or found is None or key.stream is None:
                continue
            worker, nonces = found
            endpoint = StreamEndpoint(
                self._session, gemini.websocket_url,
                proxy_for(gemini.websocket_url, gemini.proxy_url), config.gemini_tls)
            supervisor = StreamSupervisor(worker, credentials, nonces, key.stream, endpoint,
                                          self._store, self._clock, backoffs,
                                          gemini.max_timestamp_skew_seconds)
            self._running[api_key] = (settings, asyncio.create_task(
                supervisor.run(), name=f"stream-{key.name}"))

    async def stop(self) -> None:
        for _, task in self._running.values():
            await _stopped(task)
        self._running = {}


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
