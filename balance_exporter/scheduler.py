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
from functools import partial
from typing import Protocol

import aiohttp
import structlog

from balance_exporter.config import Config, Credentials, KeySettings
from balance_exporter.gemini.client import GeminiClient
from balance_exporter.gemini.errors import (
    GeminiError,
    MalformedReply,
    RateLimited,
    RequestRejected,
    TransientError,
)
from balance_exporter.gemini.nonce import NonceSource
from balance_exporter.gemini.replies import ReplyRules, parse_balances_reply
from balance_exporter.store import BalanceStore, ReplyVerdict
from balance_exporter.targets import AccountTarget, plan_targets

log = structlog.get_logger("balance_exporter.scheduler")

TRANSIENT_BACKOFF_BASE_SECONDS = 2.0
RATE_LIMIT_BACKOFF_BASE_SECONDS = 1.0
# A rejection is often a short blip (a key being rotated, Gemini's auth service restarting):
# retry soon, then back off towards `rejected_retry_seconds`.
REJECTED_BACKOFF_BASE_SECONDS = 15.0
# Past this many doublings every backoff has reached any cap there can be (1 day / 1 s < 2**17).
MAX_BACKOFF_DOUBLINGS = 32
RESTART_BACKOFF_BASE_SECONDS = 1.0
# Real replies are a few kilobytes and parse in well under a millisecond.
PARSE_IN_THREAD_BYTES = 64 * 1024


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
    """Exponential backoff, capped, with "equal jitter": between half and all of the step.
    Any number of failures is fine: the exponent stops growing once the cap is reached."""
    doublings = min(max(0, failures - 1), MAX_BACKOFF_DOUBLINGS)
    step = min(cap, base * 2.0 ** doublings)
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

    def _back_off(self, label: str, now: float, base: float, cap: float) -> float:
        self._failures[label] += 1
        delay = jittered_backoff(self._failures[label], base, cap, self._rng)
        self.next_due[label] = now + delay
        return delay

    def failed(self, label: str, now: float) -> float:
        return self._back_off(label, now, TRANSIENT_BACKOFF_BASE_SECONDS,
                              self._backoffs.max_backoff_seconds)

    def rejected(self, label: str, now: float) -> float:
        return self._back_off(label, now, REJECTED_BACKOFF_BASE_SECONDS,
                              self._backoffs.rejected_retry_seconds)

    def rate_limited(self, now: float, retry_after: float | None) -> float:
        """Pause the whole key; the account stays due and goes first when the pause ends.
        Gemini's Retry-After is followed up to `max_backoff_seconds`: one header must not park
        the key for days."""
        self.pacing.rate_limit_strikes += 1
        cap = self._backoffs.max_backoff_seconds
        pause = min(retry_after, cap) if retry_after is not None else jittered_backoff(
            self.pacing.rate_limit_strikes, RATE_LIMIT_BACKOFF_BASE_SECONDS, cap, self._rng)
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
        rules: ReplyRules,
        clock: Clock,
        shared_budget: SharedBudget | None = None,
    ) -> None:
        self._credentials = credentials
        self._nonces = nonces
        self._schedule = schedule
        self._client = client
        self._store = store
        self._rules = rules
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
            now_ns = int(self._clock.wall() * 1e9)
            if len(body) > PARSE_IN_THREAD_BYTES:
                # A large body would hold the event loop (and every other poll and scrape) for
                # tens of milliseconds; in a thread the interpreter switches away every 5 ms.
                reply = await asyncio.to_thread(parse_balances_reply, body, self._rules, now_ns)
            else:
                reply = parse_balances_reply(body, self._rules, now_ns)
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
        details: dict[str, object] = {**fields, "reason": error.reason, "status": error.status,
                                      "error": error.message}
        if error.gemini_reason != error.reason:
            details["gemini_reason"] = error.gemini_reason
        if isinstance(error, RateLimited):
            self._store.record_rate_limited(target.key_name)
            pause = self._schedule.rate_limited(now, error.retry_after)
            if error.retry_after is not None and pause < error.retry_after:
                details["retry_after_clamped_from"] = round(error.retry_after, 3)
            log.warning("rate limited, pausing key", **details, pause_seconds=round(pause, 3))
        elif isinstance(error, RequestRejected):
            retry = self._schedule.rejected(target.label, now)
            log.error("request rejected", **details, hint=error.hint,
                      retry_seconds=round(retry, 3))
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
        rules = ReplyRules(config.precision, config.settings.gemini.max_timestamp_skew_seconds)
        gemini = config.settings.gemini
        client = GeminiClient(self._session, gemini.base_url, gemini.timeout_seconds,
                              gemini.max_reply_bytes, gemini.proxy_url, config.gemini_tls)
        now = self._clock.monotonic()
        for key in config.settings.keys:
            credentials = config.credentials[key.name]
            nonces, pacing = self._key_continuity(key, credentials)
            schedule = KeySchedule(
                [target for target in targets if target.key_name == key.name],
                pacing, backoffs, now,
            )
            worker = KeyWorker(
                credentials, nonces, schedule, client, self._store, rules, self._clock, shared,
            )
            task = asyncio.create_task(self._supervise(key.name, worker, backoffs),
                                       name=f"poll-{key.name}")
            task.add_done_callback(partial(self._supervisor_ended, key.name))
            self._tasks.append(task)

    async def _supervise(self, key_name: str, worker: KeyWorker, backoffs: Backoffs) -> None:
        """Run the key's worker; if it raises (a bug), log it and start it again after a backoff,
        so that one bad reply or state never stops a key's polling for good."""
        crashes = 0
        rng = random.Random()
        while True:
            self._store.record_worker_running(key_name, True)
            try:
                await worker.run()
                raise RuntimeError("the worker returned")  # it loops forever by design
            except Exception:
                crashes += 1
                self._store.record_worker_running(key_name, False)
                self._store.record_worker_restart(key_name)
                delay = jittered_backoff(crashes, RESTART_BACKOFF_BASE_SECONDS,
                                         backoffs.max_backoff_seconds, rng)
                log.exception("key worker crashed, restarting it", key=key_name,
                              crashes=crashes, restart_in_seconds=round(delay, 3))
            await self._clock.sleep(delay)

    def _supervisor_ended(self, key_name: str, task: asyncio.Task[None]) -> None:
        # Only a cancelled task ends on purpose; anything else leaves the key unpolled, and that
        # must show (gemini_key_worker_running, /-/healthy) rather than pass in silence.
        if not task.cancelled():
            self._store.record_worker_running(key_name, False)
            log.error("key worker supervisor ended; the key is no longer polled", key=key_name,
                      error=repr(task.exception()))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
