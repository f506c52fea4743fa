"""When to poll which account: one worker per API key, one request at a time, in nonce order.

`KeySchedule` is the decision logic and takes times as arguments, so it is tested with plain
numbers; `KeyWorker` is the loop that follows it with a real (or fake) clock. Pacing state that
belongs to the API key itself (spacing, rate-limit pauses) lives in `KeyPacing`, which survives
a config reload so a reload cannot burst past the key's budget.
"""

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import structlog

from balance_exporter.config import Config, Credentials, KeySettings, Precision
from balance_exporter.gemini.client import GeminiClient
from balance_exporter.gemini.errors import (
    GeminiError,
    MalformedReply,
    RateLimited,
    RequestRejected,
    TransientError,
)
from balance_exporter.gemini.nonce import NonceSource
from balance_exporter.gemini.replies import parse_balances_reply
from balance_exporter.store import BalanceStore, ReplyVerdict
from balance_exporter.targets import AccountTarget, plan_targets

log = structlog.get_logger("balance_exporter.scheduler")

TRANSIENT_BACKOFF_BASE_SECONDS = 2.0
RATE_LIMIT_BACKOFF_BASE_SECONDS = 1.0


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class BalanceSource(Protocol):
    """What a worker needs of the Gemini client (tests drive workers with a fake one)."""

    async def fetch_balances(
        self, credentials: Credentials, nonces: NonceSource, account: str | None,
        show_pending_balances: bool,
    ) -> bytes: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def jittered_backoff(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff, capped, with "equal jitter": between half and all of the step."""
    step = min(cap, base * 2.0 ** max(0, failures - 1))
    return step / 2 + rng.random() * step / 2


class KeyPacing:
    """How fast one API key may go: its spacing between requests and any rate-limit pause."""

    def __init__(self, requests_per_second: float) -> None:
        self.min_spacing = 1.0 / requests_per_second
        self.last_start: float | None = None
        self.paused_until = float("-inf")
        self.rate_limit_strikes = 0

    def earliest_start(self) -> float:
        spaced = float("-inf") if self.last_start is None else self.last_start + self.min_spacing
        return max(spaced, self.paused_until)


class SharedBudget:
    """A request budget shared by every key (for a per-IP limit): hands out start times."""

    def __init__(self, requests_per_second: float) -> None:
        self._spacing = 1.0 / requests_per_second
        self._next_free = float("-inf")

    def reserve(self, earliest: float) -> float:
        start = max(earliest, self._next_free)
        self._next_free = start + self._spacing
        return start


@dataclass(frozen=True)
class Backoffs:
    max_backoff_seconds: float
    rejected_retry_seconds: float


class KeySchedule:
    """The next account to poll on one key, and how each outcome moves the schedule."""

    def __init__(
        self,
        targets: Sequence[AccountTarget],
        pacing: KeyPacing,
        backoffs: Backoffs,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        self.targets = {target.label: target for target in targets}
        self.pacing = pacing
        self._backoffs = backoffs
        self._rng = rng or random.Random()
        # Every account is due at once; the key's spacing spreads the first round evenly.
        self.next_due = dict.fromkeys(self.targets, now)
        self._failures = dict.fromkeys(self.targets, 0)

    def next_poll(self) -> tuple[AccountTarget, float]:
        """The account due first (config order breaks ties) and when its request may start."""
        label = min(self.next_due, key=self.next_due.__getitem__)
        return self.targets[label], max(self.next_due[label], self.pacing.earliest_start())

    def started(self, at: float) -> None:
        self.pacing.last_start = at

    def succeeded(self, label: str, started_at: float) -> None:
        self._failures[label] = 0
        self.pacing.rate_limit_strikes = 0
        # Measured from the start, not the end, so slow replies do not drift the schedule.
        self.next_due[label] = started_at + self.targets[label].interval_seconds

    def failed(self, label: str, now: float) -> float:
        self._failures[label] += 1
        delay = jittered_backoff(
            self._failures[label],
            TRANSIENT_BACKOFF_BASE_SECONDS,
            self._backoffs.max_backoff_seconds,
            self._rng,
        )
        self.next_due[label] = now + delay
        return delay

    def rejected(self, label: str, now: float) -> float:
        self.next_due[label] = now + self._backoffs.rejected_retry_seconds
        return self._backoffs.rejected_retry_seconds

    def rate_limited(self, now: float, retry_after: float | None) -> float:
        """Pause the whole key; the account stays due and goes first when the pause ends."""
        self.pacing.rate_limit_strikes += 1
        pause = retry_after if retry_after is not None else jittered_backoff(
            self.pacing.rate_limit_strikes,
            RATE_LIMIT_BACKOFF_BASE_SECONDS,
            self._backoffs.max_backoff_seconds,
            self._rng,
        )
        self.pacing.paused_until = now + pause
        return pause


class KeyWorker:
    """Polls one key's accounts forever, following its `KeySchedule`."""

    def __init__(
        self,
        credentials: Credentials,
        nonces: NonceSource,
        schedule: KeySchedule,
        client: BalanceSource,
        store: BalanceStore,
        precision: Precision,
        clock: Clock,
        shared_budget: SharedBudget | None = None,
    ) -> None:
        self._credentials = credentials
        self._nonces = nonces
        self._schedule = schedule
        self._client = client
        self._store = store
        self._precision = precision
        self._clock = clock
        self._shared_budget = shared_budget

    async def run(self) -> None:
        while True:
            target, start = self._schedule.next_poll()
            if self._shared_budget is not None:
                start = self._shared_budget.reserve(start)
            await self._clock.sleep(start - self._clock.monotonic())
            await self.poll(target)

    async def poll(self, target: AccountTarget) -> None:
        started = self._clock.monotonic()
        self._schedule.started(started)
        self._store.record_request(target.key_name)
        fields = {"account": target.label, "key": target.key_name}
        try:
            body = await self._client.fetch_balances(
                self._credentials, self._nonces, target.gemini_account,
                target.show_pending_balances,
            )
            reply = parse_balances_reply(body, self._precision)
        except GeminiError as error:
            self._record_error(target, error, started, fields)
            return
        except Exception as error:  # a bug must not stop the other accounts
            log.exception("poll crashed", **fields)
            internal = TransientError("InternalError", repr(error))
            self._record_error(target, internal, started, fields)
            return
        duration = self._clock.monotonic() - started
        verdict = self._store.record_reply(target.label, reply, duration, self._clock.wall())
        self._schedule.succeeded(target.label, started)
        if verdict is ReplyVerdict.STALE:
            log.debug("stale reply ignored", **fields, stamp_ns=reply.server_timestamp_ns)

    def _record_error(
        self, target: AccountTarget, error: GeminiError, started: float, fields: dict[str, str]
    ) -> None:
        now = self._clock.monotonic()
        self._store.record_failure(target.label, error.reason, now - started)
        details = {**fields, "reason": error.reason, "status": error.status, "error": error.message}
        if isinstance(error, RateLimited):
            self._store.record_rate_limited(target.key_name)
            pause = self._schedule.rate_limited(now, error.retry_after)
            log.warning("rate limited, pausing key", **details, pause_seconds=round(pause, 3))
        elif isinstance(error, RequestRejected):
            retry = self._schedule.rejected(target.label, now)
            log.error("request rejected", **details, hint=error.hint, retry_seconds=retry)
        else:
            assert isinstance(error, TransientError | MalformedReply)
            retry = self._schedule.failed(target.label, now)
            log.warning("poll failed", **details, retry_seconds=round(retry, 3))


class Scheduler:
    """Runs one `KeyWorker` per configured key; `apply` swaps in a new config.

    A key's nonces and pacing belong to the API key itself, not to its entry in the config, so
    they are kept per API key across reloads: a reload can neither reuse a nonce nor burst past
    the key's budget.
    """

    def __init__(self, session: aiohttp.ClientSession, store: BalanceStore, clock: Clock) -> None:
        self._session = session
        self._store = store
        self._clock = clock
        self._nonces: dict[str, NonceSource] = {}
        self._pacing: dict[str, KeyPacing] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # Two reloads in quick succession must not interleave and leave two workers on a key.
        self._applying = asyncio.Lock()

    def _key_continuity(
        self, key: KeySettings, credentials: Credentials
    ) -> tuple[NonceSource, KeyPacing]:
        api_key = credentials.api_key
        nonces = self._nonces.get(api_key)
        # A new unit means the key was recreated as (non-)time-based: its nonces start afresh.
        if nonces is None or nonces.unit != key.nonce:
            nonces = self._nonces[api_key] = NonceSource(key.nonce)
        pacing = self._pacing.setdefault(api_key, KeyPacing(key.requests_per_second))
        pacing.min_spacing = 1.0 / key.requests_per_second
        return nonces, pacing

    async def apply(self, config: Config) -> None:
        async with self._applying:
            await self.stop()
            self._start(config)

    def _start(self, config: Config) -> None:
        targets = plan_targets(config)
        self._store.configure(targets, config.credentials.keys())
        shared = (
            SharedBudget(config.settings.gemini.requests_per_second)
            if config.settings.gemini.requests_per_second is not None
            else None
        )
        backoffs = Backoffs(
            max_backoff_seconds=config.settings.polling.max_backoff_seconds,
            rejected_retry_seconds=config.settings.polling.rejected_retry_seconds,
        )
        precision = config.precision
        gemini = config.settings.gemini
        client = GeminiClient(self._session, gemini.base_url, gemini.timeout_seconds)
        now = self._clock.monotonic()
        for key in config.settings.keys:
            credentials = config.credentials[key.name]
            nonces, pacing = self._key_continuity(key, credentials)
            schedule = KeySchedule(
                [target for target in targets if target.key_name == key.name],
                pacing, backoffs, now,
            )
            worker = KeyWorker(
                credentials, nonces, schedule, client, self._store, precision, self._clock,
                shared,
            )
            self._tasks.append(asyncio.create_task(worker.run(), name=f"poll-{key.name}"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
