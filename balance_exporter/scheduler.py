"""When to send which request: one worker per API key, one request at a time, in nonce order.

Every request of a key is a job of its `KeySchedule`: each account's balances, notional and
staking polls and each of its networks' withdrawal allow-lists, the key's roles, and a
discovering key's account listing. They share the key's budget and its
nonces; each job has its own interval and its own backoff, so an endpoint that fails or is slow
backs off alone, and when several jobs are due the balances go first.

`KeySchedule` is the decision logic and takes times as arguments, so it is tested with plain
numbers; `KeyWorker` is the loop that follows it with a real (or fake) clock. Pacing state that
belongs to the API key itself (spacing, rate-limit pauses) lives in `KeyPacing`, which survives
a config reload so a reload cannot burst past the key's budget. A listing that changes what a
key polls makes the `Scheduler` plan every key again (a shared budget ties them together).
"""

import asyncio
import enum
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import aiohttp
import structlog

from balance_exporter.config import Config, Credentials, KeySettings
from balance_exporter.gemini.client import (
    LIST_ACCOUNTS_LIMIT,
    GeminiClient,
    PrivateRequest,
    account_list_request,
    approved_addresses_request,
    balances_request,
    notional_request,
    roles_request,
    staking_request,
    transfers_request,
)
from balance_exporter.gemini.errors import (
    GeminiError,
    MalformedReply,
    RateLimited,
    RequestRejected,
    TransientError,
)
from balance_exporter.gemini.nonce import NonceSource
from balance_exporter.gemini.replies import (
    AccountListing,
    AllowListReply,
    KeyRoles,
    ParsedReply,
    ReplyRules,
    RowCache,
    Transfer,
    parse_account_list,
    parse_approved_addresses,
    parse_balances_reply,
    parse_notional_reply,
    parse_roles,
    parse_staking_reply,
    parse_transfers,
)
from balance_exporter.heap import burst_frozen
from balance_exporter.ledger import KnownEntry
from balance_exporter.slices import Slices
from balance_exporter.store import AllowListChange, BalanceStore, ReplyVerdict
from balance_exporter.targets import (
    AccountTarget,
    AllowList,
    Endpoint,
    KeyPlan,
    ListedAccount,
    Movements,
    Plan,
    planning,
)
from balance_exporter.transfers import PageOutcome, TransfersQuery

log = structlog.get_logger("balance_exporter.scheduler")

TRANSIENT_BACKOFF_BASE_SECONDS = 2.0
RATE_LIMIT_BACKOFF_BASE_SECONDS = 1.0
# A rejection is often a short blip (a key being rotated, Gemini's auth service restarting):
# retry soon, then back off towards `rejected_retry_seconds`.
REJECTED_BACKOFF_BASE_SECONDS = 15.0
# The least time between two polls of one job, as a share of its interval.
MIN_GAP_SHARE = 0.1
# The most of a key's time that one endpoint other than the balances (or the listing) may take:
# requests of a key go one at a time, so a slow endpoint would otherwise hold up the balances.
SLOW_ENDPOINT_SHARE = 0.25
# Past this many doublings every backoff has reached any cap there can be (1 day / 1 s < 2**17).
MAX_BACKOFF_DOUBLINGS = 32
RESTART_BACKOFF_BASE_SECONDS = 1.0
# Real replies are a few kilobytes and parse in well under a millisecond.
PARSE_IN_THREAD_BYTES = 64 * 1024
# How long making or adopting a plan may hold the event loop before it gives it a turn.
PLAN_SLICE_SECONDS = 0.005
# The most audit lines one allow-list read logs one by one (a real list changes by a few).
MAX_AUDIT_LINES = 1000
# A key with nothing to poll (no accounts, no listing) looks again this often.
IDLE_SECONDS = 3600.0
T = TypeVar("T")


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class PrivateApi(Protocol):
    """What a worker needs of the Gemini client (tests drive workers with a fake one)."""

    async def post(
        self, credentials: Credentials, nonces: NonceSource, request: PrivateRequest
    ) -> bytes: ...


class KeyRequest(enum.Enum):
    """The requests of a key rather than of one of its accounts."""

    ACCOUNT_LIST = "account_list"
    ROLES = "roles"


@dataclass(frozen=True, slots=True)
class Job:
    """One request stream of a key: an account's endpoint, or a request of the key's own."""

    label: str  # the account's label; "" for a key's own request
    endpoint: Endpoint | KeyRequest | AllowList | Movements

    @property
    def log_fields(self) -> dict[str, str]:
        if isinstance(self.endpoint, KeyRequest):
            return {"endpoint": self.endpoint.value}
        if isinstance(self.endpoint, AllowList):
            return {"account": self.label, "endpoint": self.endpoint.value,
                    "network": self.endpoint.network}
        return {"account": self.label, "endpoint": self.endpoint.value}

    @property
    def kind(self) -> str:
        """The endpoint the job asks, whatever the network: what pacing and phases go by."""
        return self.endpoint.value


LISTING = Job("", KeyRequest.ACCOUNT_LIST)
ROLES = Job("", KeyRequest.ROLES)
# When several jobs are due, the balances go first: no other endpoint delays them.
_PRIORITY = {Endpoint.BALANCES.value: 0, KeyRequest.ACCOUNT_LIST.value: 1,
             KeyRequest.ROLES.value: 1, Endpoint.NOTIONAL.value: 2, Endpoint.STAKING.value: 2,
             AllowList.value: 2, Movements.TRANSFERS.value: 2}
# Gemini allows one /v2/transfers request per 5 s per account; the margin covers the time between
# this clock's start of a request and Gemini's arrival of it.
TRANSFERS_ACCOUNT_SPACING_SECONDS = 5.25


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
    """A request budget shared by every key (for a per-IP limit): hands out start times, one
    spacing apart, in the order they are asked for. A worker asks only once its job is due, so
    no key holds a slot far ahead that the others would wait behind: with N keys a due job waits
    at most N - 1 slots."""

    def __init__(self, requests_per_second: float) -> None:
        self.requests_per_second = requests_per_second
        self._spacing = 1.0 / requests_per_second
        self._next_free = float("-inf")

    def reserve(self, now: float) -> float:
        start = max(now, self._next_free)
        self._next_free = start + self._spacing
        return start


@dataclass(frozen=True)
class Backoffs:
    max_backoff_seconds: float
    rejected_retry_seconds: float


class KeySchedule:
    """The next job of one key, and how each outcome moves the schedule."""

    def __init__(
        self,
        key_plan: KeyPlan,
        pacing: KeyPacing,
        backoffs: Backoffs,
        now: float,
        rng: random.Random | None = None,
        shift: float | None = None,
    ) -> None:
        """`shift`: the key's phase shift, a fraction of an interval (by default one of its
        name's)."""
        self.pacing = pacing
        self._backoffs = backoffs
        self._rng = rng or random.Random()
        self.targets: dict[str, AccountTarget] = {}
        self.next_due: dict[Job, float] = {}
        self._intervals: dict[Job, float] = {}
        # The intervals as planned, and the least the balances polls' may be while a stream
        # tells when they change (see set_balances_floor).
        self._planned: dict[Job, float] = {}
        self._balances_floor: float | None = None
        # Each job runs on a grid, origin + (phase + k) * interval, with the phases of one
        # endpoint's jobs spread evenly over the interval: the requests of a full budget then
        # come one after another instead of in bursts that make some wait longer than others.
        # Each key's phases are shifted by a fraction of its own: keys started together would
        # otherwise share their grids, and a thousand keys' listings (or their first accounts'
        # polls) would all come due at the same moment, a burst that holds the event loop
        # (and the scrapes) for a hundred milliseconds and more.
        self._origin = now
        self._shift = _key_shift(key_plan.key_name) if shift is None else shift
        self._phases: dict[Job, float] = {}
        self._failures: dict[Job, int] = {}
        # When each endpoint but the balances may send again, by Job.kind (see `finished`).
        self._endpoint_free_at: dict[str, float] = {}
        # When each Gemini account's transfers may be asked for again (Gemini's 5 s rule),
        # kept through every new plan: a reload cannot send two within 5 s.
        self._transfers_free_at: dict[str | None, float] = {}
        self.key_plan: KeyPlan | None = None
        self.update(key_plan, now)

    def update(self, key_plan: KeyPlan, now: float, backoffs: Backoffs | None = None) -> bool:
        """Adopt a (new) plan; False when it is the one adopted already (the same object). A
        new account's balances are due at once (the key's spacing spreads them), its other
        endpoints at their first grid point; jobs that stay keep their due time, phase and
        failures: a reload or a listing moves no unchanged job on its grid."""
        if backoffs is not None:
            self._backoffs = backoffs
        if key_plan is self.key_plan:
            return False
        self.key_plan = key_plan
        intervals: dict[Job, float] = {}
        if key_plan.listing_interval_seconds is not None:
            intervals[LISTING] = key_plan.listing_interval_seconds
        if key_plan.roles_interval_seconds is not None:
            intervals[ROLES] = key_plan.roles_interval_seconds
        for target in key_plan.targets:
            for stream, interval in target.streams():
                intervals[Job(target.label, stream)] = interval
        self.targets = {target.label: target for target in key_plan.targets}
        self._planned = intervals
        self._intervals = self._floored(intervals)
        self._phases = {job: self._phases.get(job, phase)
                        for job, phase in _even_phases(list(intervals)).items()}
        self.next_due = {job: self.next_due[job] if job in self.next_due
                         else now if job.endpoint is Endpoint.BALANCES
                         or isinstance(job.endpoint, KeyRequest)
                         else self._grid_at_or_after(job, now)
                         for job in intervals}
        self._failures = {job: self._failures.get(job, 0) for job in intervals}
        return True

    def _floored(self, intervals: dict[Job, float]) -> dict[Job, float]:
        floor = self._balances_floor
        if floor is None:
            return dict(intervals)
        return {job: max(interval, floor) if job.endpoint is Endpoint.BALANCES else interval
                for job, interval in intervals.items()}

    def set_balances_floor(self, floor: float | None, now: float) -> None:
        """While a stream says when balances change, the regular balances polls come at most
        every `floor` seconds (never more often than planned); None: as planned, at once."""
        if floor == self._balances_floor:
            return
        self._balances_floor = floor
        self._intervals = self._floored(self._planned)
        if floor is None:
            for job in self._intervals:
                if job.endpoint is Endpoint.BALANCES:
                    self.next_due[job] = min(self.next_due[job],
                                             self._grid_at_or_after(job, now))

    def trigger_balances(self, label: str, now: float) -> bool:
        """A stream says the account's balances changed: poll them as soon as the key's budget
        allows. False when that poll is due already (frames before it make one poll)."""
        job = Job(label, Endpoint.BALANCES)
        if job not in self.next_due or self.next_due[job] <= now:
            return False
        self.next_due[job] = now
        return True

    def due_now(self, job: Job, now: float) -> bool:
        """Make a job of the plan due now (unless it is already); False if it is not one."""
        if job not in self._intervals:
            return False
        self.next_due[job] = min(self.next_due[job], now)
        return True

    def _grid_at_or_after(self, job: Job, moment: float) -> float:
        interval = self._intervals[job]
        offset = self._origin + (self._phases[job] + self._shift) % 1.0 * interval
        return offset + math.ceil((moment - offset) / interval) * interval

    def next_poll(self, now: float) -> tuple[Job, float] | None:
        """The job to send next and when it may start; None when the key has no jobs. Of the
        jobs due by then, balances go first, then the earliest due (plan order breaks ties)."""
        if not self.next_due:
            return None
        earliest = self.pacing.earliest_start()
        ready_at = max(now, earliest)
        free_at = self._endpoint_free_at
        available = {job: max(at, free_at.get(job.kind, at), self._account_free_at(job))
                     for job, at in self.next_due.items()}
        due = [job for job, at in available.items() if at <= ready_at]
        job = (min(due, key=lambda job: (_PRIORITY[job.kind], available[job])) if due
               else min(available, key=available.__getitem__))
        return job, max(available[job], earliest)

    def finished(self, job: Job, started_at: float, ended_at: float) -> None:
        """A request of the job is over (whatever its outcome). What it took beyond the key's
        spacing is time the other requests had to wait for; an endpoint other than the balances
        then rests three times that, so that slow replies take at most SLOW_ENDPOINT_SHARE of
        the key's time. A reply within the spacing costs no rest: the key could not have sent
        anything else meanwhile."""
        if job.endpoint is not Endpoint.BALANCES:
            excess = max(0.0, ended_at - started_at - self.pacing.min_spacing)
            self._endpoint_free_at[job.kind] = ended_at + excess * (
                1 / SLOW_ENDPOINT_SHARE - 1)

    def started(self, at: float, job: Job | None = None) -> None:
        self.pacing.last_start = at
        if job is not None and job.endpoint is Movements.TRANSFERS and job.label in self.targets:
            self._transfers_free_at[self.targets[job.label].gemini_account] = (
                at + TRANSFERS_ACCOUNT_SPACING_SECONDS)

    def _account_free_at(self, job: Job) -> float:
        """When a job may send by its account's own limit (transfers only)."""
        if job.endpoint is not Movements.TRANSFERS or job.label not in self.targets:
            return float("-inf")
        return self._transfers_free_at.get(self.targets[job.label].gemini_account, float("-inf"))

    def soon(self, job: Job, now: float) -> None:
        """Make a job due as soon as its limits allow (after a page that may have missed
        transfers: more are coming than an interval's page holds)."""
        if job in self._intervals:
            self.next_due[job] = now

    def succeeded(self, job: Job, started_at: float) -> None:
        if job not in self._intervals:  # dropped by a new plan while it ran
            return
        self._failures[job] = 0
        self.pacing.rate_limit_strikes = 0
        # The job's next grid point, at least a tenth of an interval after this start: a job
        # that had to wait for others gets its slot back next time (waits never pile up into a
        # drift), a slow reply does not delay the next one, a job that is very late skips the
        # point it missed rather than polling twice in a row, and a first poll (all at once)
        # joins its grid. Between two polls there is 0.1 to 1.1 intervals.
        self.next_due[job] = self._grid_at_or_after(
            job, started_at + MIN_GAP_SHARE * self._intervals[job])

    def _back_off(self, job: Job, now: float, base: float, cap: float) -> float:
        failures = self._failures.get(job, 0) + 1
        delay = jittered_backoff(failures, base, cap, self._rng)
        if job in self._intervals:
            self._failures[job] = failures
            self.next_due[job] = now + delay
        return delay

    def failed(self, job: Job, now: float) -> float:
        return self._back_off(job, now, TRANSIENT_BACKOFF_BASE_SECONDS,
                              self._backoffs.max_backoff_seconds)

    def rejected(self, job: Job, now: float) -> float:
        return self._back_off(job, now, REJECTED_BACKOFF_BASE_SECONDS,
                              self._backoffs.rejected_retry_seconds)

    def rate_limited(self, now: float, retry_after: float | None) -> float:
        """Pause the whole key; the job stays due and goes first when the pause ends.
        Gemini's Retry-After is followed up to `max_backoff_seconds`: one header must not park
        the key for days."""
        self.pacing.rate_limit_strikes += 1
        cap = self._backoffs.max_backoff_seconds
        pause = min(retry_after, cap) if retry_after is not None else jittered_backoff(
            self.pacing.rate_limit_strikes, RATE_LIMIT_BACKOFF_BASE_SECONDS, cap, self._rng)
        self.pacing.paused_until = now + pause
        return pause


def _key_shift(key_name: str) -> float:
    """A fraction in [0, 1), the same for a key at every start, spread evenly over keys."""
    digest = hashlib.blake2b(key_name.encode(), digest_size=8).digest()
    return int.from_bytes(digest) / 2**64


def _even_phases(jobs: list[Job]) -> dict[Job, float]:
    """Each job's phase, a fraction of its interval: one endpoint's jobs spread evenly (the
    allow-lists of every network together)."""
    by_endpoint: dict[str, list[Job]] = {}
    for job in jobs:
        by_endpoint.setdefault(job.kind, []).append(job)
    return {job: index / len(group) for group in by_endpoint.values()
            for index, job in enumerate(group)}


# Called with the API key that listed (its identity, whatever its entry is named) and the rows.
ListingHandler = Callable[[str, tuple[ListedAccount, ...]], None]


class KeyWorker:
    """Sends one key's requests forever, following its `KeySchedule`. It outlives reloads: a new
    config changes its settings (`reconfigure`) and its schedule in place and wakes it."""

    def __init__(
        self,
        key_name: str,
        credentials: Credentials,
        nonces: NonceSource,
        schedule: KeySchedule,
        client: PrivateApi,
        store: BalanceStore,
        rules: ReplyRules,
        clock: Clock,
        shared_budget: SharedBudget | None = None,
        on_listing: ListingHandler | None = None,
    ) -> None:
        self.schedule = schedule
        self._store = store
        self._clock = clock
        self._on_listing = on_listing
        self._woken = asyncio.Event()
        self._row_caches: dict[Job, RowCache] = {}
        self.reconfigure(key_name, credentials, nonces, client, rules, shared_budget)

    def reconfigure(
        self, key_name: str, credentials: Credentials, nonces: NonceSource, client: PrivateApi,
        rules: ReplyRules, shared_budget: SharedBudget | None,
    ) -> None:
        """A reload's settings for the same API key; the next request uses them."""
        self.key_name = key_name
        self._credentials = credentials
        self._nonces = nonces
        self._client = client
        self._rules = rules
        self._shared_budget = shared_budget

    def wake(self) -> None:
        """The schedule changed: look at it again now, not when the current wait ends."""
        self._woken.set()

    async def run(self) -> None:
        while True:
            self._woken.clear()
            now = self._clock.monotonic()
            planned = self.schedule.next_poll(now)
            if not await self._sleep_until(planned[1] if planned else now + IDLE_SECONDS):
                continue  # a new plan meanwhile: look again
            if planned is None:
                continue
            job = planned[0]
            if self._shared_budget is not None:
                # Asked for only now that the job is due (see SharedBudget).
                slot = self._shared_budget.reserve(self._clock.monotonic())
                await self._clock.sleep(slot - self._clock.monotonic())
            # A new plan (a reload, another key's listing) may have dropped the job meanwhile.
            if job in self.schedule.next_due:
                # How late it starts: a key behind its plan shows it (and its data ages).
                self._store.record_poll_lag(self.key_name, max(
                    0.0, self._clock.monotonic() - self.schedule.next_due[job]))
                await self.poll(job)

    async def _sleep_until(self, moment: float) -> bool:
        """Sleep until `moment` (monotonic); False when woken before it by a new plan."""
        delay = moment - self._clock.monotonic()
        if delay <= 0:
            return True
        if self._woken.is_set():
            return False
        sleeping = asyncio.ensure_future(self._clock.sleep(delay))
        woken = asyncio.ensure_future(self._woken.wait())
        try:
            await asyncio.wait((sleeping, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()
        return not self._woken.is_set()

    async def poll(self, job: Job) -> None:
        started = self._clock.monotonic()
        self.schedule.started(started, job)
        self._store.record_request(self.key_name)
        fields = {"key": self.key_name, **job.log_fields}
        # What the request is for, as planned when it is sent: its reply or failure is this
        # target's only, whatever a new plan makes of the label meanwhile.
        endpoint = job.endpoint
        target = (None if isinstance(endpoint, KeyRequest)
                  else self.schedule.targets.get(job.label))
        try:
            if endpoint is KeyRequest.ACCOUNT_LIST:
                listed, complete = await self._list_accounts()
            elif endpoint is KeyRequest.ROLES:
                roles = await self._fetch(roles_request(), _parse_roles)
            elif isinstance(endpoint, AllowList):
                assert target is not None  # a job of the plan is one of its targets'
                allow_list = await self._fetch(
                    approved_addresses_request(target.gemini_account, endpoint.network),
                    partial(_parse_allow_list, self._rules))
            elif endpoint is Movements.TRANSFERS:
                assert target is not None
                # None: the store adopted a plan without them, and the worker's comes next.
                query = self._store.transfers_query(job.label, int(self._clock.wall() * 1000))
                transfers = () if query is None else await self._fetch(
                    transfers_request(target.gemini_account, query.after_ms, query.currency),
                    partial(_parse_transfers, self._rules))
            else:
                assert target is not None  # a job of the plan is one of its targets'
                request, parse = _request_for(target, endpoint, self._rules,
                                              self._row_cache(job))
                reply = await self._fetch(request, parse)
        except GeminiError as error:
            self._record_error(job, target, error, started, fields)
            return
        except Exception as error:  # a bug must not stop the other accounts
            log.exception("poll crashed", **fields)
            internal = TransientError("InternalError", repr(error))
            self._record_error(job, target, internal, started, fields)
            return
        finally:
            self.schedule.finished(job, started, self._clock.monotonic())
        self.schedule.succeeded(job, started)
        if endpoint is KeyRequest.ACCOUNT_LIST:
            self._adopt_listing(listed, complete)
            return
        if endpoint is KeyRequest.ROLES:
            self._adopt_roles(roles)
            return
        duration = self._clock.monotonic() - started
        if isinstance(endpoint, AllowList):
            self._adopt_allow_list(job.label, endpoint, allow_list, duration, target, fields)
            return
        if endpoint is Movements.TRANSFERS:
            self._adopt_transfers(job, query, transfers, duration, target, fields)
            return
        assert isinstance(endpoint, Endpoint)
        verdict = self._store.record_reply(job.label, endpoint, reply, duration,
                                           self._clock.wall(), sent=target)
        if verdict is ReplyVerdict.STALE:
            log.debug("stale reply ignored", **fields, stamp_ns=reply.server_timestamp_ns)
        elif verdict is ReplyVerdict.NOT_PLANNED:
            log.info("reply dropped: the plan changed while it was on its way (the account "
                     "now has another key, account, label or quote currency)", **fields)
        elif reply.skipped_entries:
            log.warning("staking provider entries left out: their shape is not one this "
                        "exporter reads (the rows' totals were kept)", **fields,
                        entries=reply.skipped_entries)

    def _row_cache(self, job: Job) -> RowCache:
        """The job's cache of the rows it parsed last; those of jobs a new plan dropped go."""
        caches = self._row_caches
        if job not in caches and len(caches) >= len(self.schedule.next_due):
            for gone in [known for known in caches if known not in self.schedule.next_due]:
                del caches[gone]
        return caches.setdefault(job, RowCache())

    async def _fetch(self, request: PrivateRequest, parse: Callable[[bytes, int], T]) -> T:
        body = await self._client.post(self._credentials, self._nonces, request)
        now_ns = int(self._clock.wall() * 1e9)
        if len(body) > PARSE_IN_THREAD_BYTES:
            # A large body would hold the event loop (and every other poll and scrape) for
            # tens of milliseconds; in a thread the interpreter switches away every 5 ms.
            return await asyncio.to_thread(parse, body, now_ns)
        return parse(body, now_ns)

    async def _list_accounts(self) -> tuple[tuple[ListedAccount, ...], bool]:
        """The group's accounts, page after page (newest first), and whether the listing is
        complete. Each next page asks for the accounts created at or before the oldest of the
        page before; the rows of that millisecond come on both, so rows count once by short
        name. A page that fails fails the whole listing: half of one is never used."""
        listed: dict[str, ListedAccount] = {}
        created_at_or_before: int | None = None
        max_pages = self.schedule.key_plan.listing_max_pages if self.schedule.key_plan else 1
        for page in range(max_pages):
            if page:
                await self._wait_for_turn()
            reply = await self._fetch(account_list_request(created_at_or_before), _parse_listing)
            new_rows = {row.short_name: row for row in reply.accounts
                        if row.short_name not in listed}
            listed.update(new_rows)
            if len(reply.accounts) < LIST_ACCOUNTS_LIMIT:
                return tuple(listed.values()), True
            if reply.oldest_created_ms is None or not new_rows:
                break  # no time to page from, or a page of one millisecond: no way further
            created_at_or_before = reply.oldest_created_ms
        return tuple(listed.values()), False

    async def _wait_for_turn(self) -> None:
        """Wait until the key may send again, as a job would (its spacing, a 429's pause and
        the shared budget), and count the request."""
        while (delay := self.schedule.pacing.earliest_start() - self._clock.monotonic()) > 0:
            await self._clock.sleep(delay)
        if self._shared_budget is not None:
            slot = self._shared_budget.reserve(self._clock.monotonic())
            await self._clock.sleep(slot - self._clock.monotonic())
        self.schedule.started(self._clock.monotonic())
        self._store.record_request(self.key_name)

    def _adopt_listing(self, listed: tuple[ListedAccount, ...], complete: bool) -> None:
        if not complete:
            log.warning("account listing cut short: more accounts than discover.max_pages "
                        "pages of 500 hold (or a page Gemini cannot page past), so some may be "
                        "missing", key=self.key_name, accounts=len(listed))
        self._store.record_listing(self.key_name, listed, not complete, self._clock.wall())
        if self._on_listing is not None:
            self._on_listing(self._credentials.api_key, listed)

    def _adopt_allow_list(
        self, label: str, allow_list: AllowList, reply: AllowListReply, duration: float,
        target: AccountTarget | None, fields: dict[str, str],
    ) -> None:
        verdict, change = self._store.record_allow_list(label, allow_list, reply, duration,
                                                        self._clock.wall(), sent=target)
        if verdict is ReplyVerdict.STALE:
            log.debug("stale reply ignored", **fields, stamp_ns=reply.server_timestamp_ns)
        elif verdict is ReplyVerdict.NOT_PLANNED:
            log.info("reply dropped: the plan changed while it was on its way", **fields)
        elif change is not None:
            _log_allow_list_change(change, len(reply.entries), fields)

    def _adopt_transfers(
        self, job: Job, query: TransfersQuery | None, rows: tuple[Transfer, ...],
        duration: float, target: AccountTarget | None, fields: dict[str, str],
    ) -> None:
        outcome = None if query is None else self._store.record_transfers(
            job.label, query, rows, duration, self._clock.wall(), sent=target)
        if query is None or outcome is None:
            log.info("reply dropped: the plan changed while it was on its way", **fields)
            return
        _log_transfers(outcome, query, len(rows), fields)
        if outcome.gap:
            self.schedule.soon(job, self._clock.monotonic())

    def _adopt_roles(self, roles: KeyRoles) -> None:
        self._store.record_roles(self.key_name, roles, self._clock.wall())
        if roles.beyond_auditor:
            log.warning("API key holds roles beyond Auditor: a monitoring key needs Auditor "
                        "only, and any other role can trade or move funds; give the exporter "
                        "an Auditor-only key", key=self.key_name, roles=roles.beyond_auditor)

    def _record_error(
        self, job: Job, target: AccountTarget | None, error: GeminiError, started: float,
        fields: dict[str, str],
    ) -> None:
        now = self._clock.monotonic()
        if job.endpoint is KeyRequest.ACCOUNT_LIST:
            self._store.record_listing_failure(self.key_name, error.reason)
        elif job.endpoint is KeyRequest.ROLES:
            self._store.record_roles_failure(self.key_name, error.reason)
        elif isinstance(job.endpoint, AllowList):
            self._store.record_allow_list_failure(job.label, job.endpoint, error.reason,
                                                  now - started, sent=target)
        elif job.endpoint is Movements.TRANSFERS:
            self._store.record_transfers_failure(job.label, error.reason, now - started,
                                                 sent=target)
        else:
            self._store.record_failure(job.label, job.endpoint, error.reason, now - started,
                                       sent=target)
        details: dict[str, object] = {**fields, "reason": error.reason, "status": error.status,
                                      "error": error.message}
        if error.gemini_reason != error.reason:
            details["gemini_reason"] = error.gemini_reason
        if isinstance(error, RateLimited) and job.endpoint is Movements.TRANSFERS:
            # Gemini's limit per account, not the key's: that account's transfers back off.
            self._store.record_rate_limited(self.key_name)
            retry = self.schedule.failed(job, now)
            log.warning("transfers rate limited for the account, backing off", **details,
                        retry_seconds=round(retry, 3))
        elif isinstance(error, RateLimited):
            self._store.record_rate_limited(self.key_name)
            pause = self.schedule.rate_limited(now, error.retry_after)
            if error.retry_after is not None and pause < error.retry_after:
                details["retry_after_clamped_from"] = round(error.retry_after, 3)
            log.warning("rate limited, pausing key", **details, pause_seconds=round(pause, 3))
        elif isinstance(error, RequestRejected):
            if error.reason == "InvalidNonce":
                self._nonces.rejected()
            retry = self.schedule.rejected(job, now)
            log.error("request rejected", **details, hint=error.hint,
                      retry_seconds=round(retry, 3))
        else:
            assert isinstance(error, TransientError | MalformedReply)
            retry = self.schedule.failed(job, now)
            log.warning("poll failed", **details, retry_seconds=round(retry, 3))


def _parse_listing(body: bytes, now_ns: int) -> AccountListing:
    return parse_account_list(body)


def _parse_roles(body: bytes, now_ns: int) -> KeyRoles:
    return parse_roles(body)


def _parse_allow_list(rules: ReplyRules, body: bytes, now_ns: int) -> AllowListReply:
    return parse_approved_addresses(body, rules, now_ns)


def _parse_transfers(rules: ReplyRules, body: bytes, now_ns: int) -> tuple[Transfer, ...]:
    return parse_transfers(body, rules)


def _log_transfers(outcome: PageOutcome, query: TransfersQuery, rows: int,
                   fields: dict[str, str]) -> None:
    """The audit trail of an account's money: one line per new transfer (a warning for a
    withdrawal), and what became of pending ones."""
    if query.baseline:
        log.info("transfers read for the first time: settled ones are the baseline, pending "
                 "ones count", **fields, rows=rows, pending=len(outcome.new))
    for transfer in outcome.new[:MAX_AUDIT_LINES]:
        level = log.warning if transfer.type == "withdrawal" else log.info
        level("transfer", **fields, type=transfer.type, status=transfer.status,
              currency=transfer.currency, amount=format(transfer.amount, "f"),
              network=transfer.network, eid=transfer.eid, destination=transfer.destination,
              tx_hash=transfer.tx_hash)
    if len(outcome.new) > MAX_AUDIT_LINES:
        log.warning("transfers past the audit lines logged one by one", **fields,
                    not_logged=len(outcome.new) - MAX_AUDIT_LINES)
    for held in outcome.settled:
        log.info("pending transfer settled", **fields, eid=held.eid, type=held.type,
                 currency=held.currency, amount=format(held.amount, "f"))
    for held in outcome.gone:
        log.warning("pending transfer no longer listed (cancelled or returned)", **fields,
                    eid=held.eid, type=held.type, currency=held.currency,
                    amount=format(held.amount, "f"))
    if outcome.dropped:
        log.warning("pending transfers past the tracking limit dropped, oldest first", **fields,
                    dropped=len(outcome.dropped), eids=[held.eid for held in outcome.dropped][:20])
    if outcome.gap:
        log.warning("transfers page full before the time asked: transfers may have been "
                    "missed, polling again soon", **fields, after_ms=query.after_ms)


def _entry_fields(entry: KnownEntry) -> dict[str, object]:
    """An allow-list entry as the audit log shows it (an entry known from before a restart only
    by its digest has no label or address to show)."""
    if entry.address is None:
        return {"scope": entry.scope, "status": entry.status, "label": None, "address": None,
                "address_note": "known only by its digest in the state file"}
    return {"scope": entry.scope, "status": entry.status, "label": entry.label,
            "address": entry.address}


def _log_allow_list_change(change: AllowListChange, entries: int,
                           fields: dict[str, str]) -> None:
    """The audit trail of a withdrawal allow-list: one warning per entry added or removed and
    per change of an entry's status, up to MAX_AUDIT_LINES a list (then one line counting the
    rest: a server that churns thousands of entries on every read must not flood the log)."""
    if change.baseline:
        log.info("allow-list read for the first time: its entries are the baseline, none "
                 "counts as added", **fields, entries=entries)
        return
    lines = [*(("approved withdrawal address added", entry, {}) for entry in change.added),
             *(("approved withdrawal address removed", entry, {}) for entry in change.removed),
             *(("approved withdrawal address changed status", after,
                {"status_before": before.status}) for before, after in change.status_changed)]
    for event, entry, extra in lines[:MAX_AUDIT_LINES]:
        log.warning(event, **fields, **_entry_fields(entry), **extra)
    if len(lines) > MAX_AUDIT_LINES:
        log.warning("allow-list changes past the audit lines logged one by one", **fields,
                    not_logged=len(lines) - MAX_AUDIT_LINES, added=len(change.added),
                    removed=len(change.removed), status_changed=len(change.status_changed))


def _request_for(
    target: AccountTarget, endpoint: Endpoint, rules: ReplyRules, cache: RowCache,
) -> tuple[PrivateRequest, Callable[[bytes, int], ParsedReply[Any]]]:
    """An endpoint's request for the account, and the parser of its reply (with the job's
    `cache` of the rows it parsed last)."""
    account = target.gemini_account
    if endpoint is Endpoint.BALANCES:
        return (balances_request(account, target.show_pending_balances),
                lambda body, now_ns: parse_balances_reply(body, rules, now_ns, cache))
    if endpoint is Endpoint.NOTIONAL:
        quote = target.notional_currency
        assert quote is not None  # the plan polls notional values only with a quote currency
        return (notional_request(account, quote),
                lambda body, now_ns: parse_notional_reply(body, rules, now_ns, quote, cache))
    return (staking_request(account),
            lambda body, now_ns: parse_staking_reply(body, rules, now_ns))


@dataclass
class _KeyRuntime:
    """One API key's running worker, and the task that supervises it."""

    worker: KeyWorker
    task: asyncio.Task[None]


class Scheduler:
    """Runs one `KeyWorker` per configured API key; `apply` swaps in a new config.

    A key's nonces, pacing, schedule, worker and last listing belong to the API key itself, not
    to its entry in the config, so they are kept per API key across reloads: a reload can
    neither reuse a nonce nor burst past the key's budget, it cancels no request in flight and
    moves no unchanged job on its grid, and discovered accounts stay polled through it.

    Plans are made and adopted a few milliseconds at a time (at 10,000 accounts that takes a
    tenth of a second or more), one at a time: a listing that changes what a key polls asks for
    a new plan, and listings that come while one is being made are taken into the next.
    """

    def __init__(self, session: aiohttp.ClientSession, store: BalanceStore, clock: Clock) -> None:
        self._session = session
        self._store = store
        self._clock = clock
        self._nonces: dict[str, NonceSource] = {}
        self._pacing: dict[str, KeyPacing] = {}
        # Per API key: the last successful listing, and when (monotonic) it came.
        self._listings: dict[str, tuple[tuple[ListedAccount, ...], float]] = {}
        self._config: Config | None = None
        self._runtimes: dict[str, _KeyRuntime] = {}
        # Workers of API keys a reload dropped, until they have ended.
        self._retired: set[asyncio.Task[None]] = set()
        self._shared: SharedBudget | None = None
        # One plan at a time, reloads and listings alike; a listing that comes while a plan is
        # made sets this, and the planner plans again.
        self._planning = asyncio.Lock()
        self._replan_wanted = False
        self._replanning: asyncio.Task[None] | None = None
        # The plan installed last: the next one reuses its unchanged parts (see targets.plan).
        self._plan: Plan | None = None

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
        """Adopt a config (at start, and at each reload): every key asks for its roles again
        at once, since a reload is when a key may have changed."""
        async with self._planning:
            await self._plan_and_install(config)
            now = self._clock.monotonic()
            for runtime in self._runtimes.values():
                if runtime.worker.schedule.due_now(ROLES, now):
                    runtime.worker.wake()

    async def _plan_and_install(self, config: Config) -> None:
        with burst_frozen():  # planning makes a burst of objects (see heap)
            current = await self._planned(config)
            await self._install(config, current)
            self._plan = current

    async def _planned(self, config: Config) -> Plan:
        """The plan for `config`, made on the event loop a few milliseconds at a time. Not in
        a thread: a thread busy with Python code takes the interpreter lock from the loop for
        5 ms at every one of its system calls, and a poll makes several."""
        steps = planning(config, self._known_listings(config), self._plan)
        slices = Slices(PLAN_SLICE_SECONDS)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            await slices.pause_if_due()

    def _known_listings(self, config: Config) -> dict[str, tuple[ListedAccount, ...]]:
        """The last listing of each discovering key (by key name), if its API key has one."""
        return {key.name: self._listings[config.credentials[key.name].api_key][0]
                for key in config.settings.keys
                if key.discover is not None
                and config.credentials[key.name].api_key in self._listings}

    async def _configure_store(self, config: Config, current: Plan, slices: Slices) -> None:
        discovering = {name: key_plan.listing_interval_seconds
                       for name, key_plan in current.keys.items()
                       if key_plan.listing_interval_seconds is not None}
        old_labels = {snapshot.target.label for snapshot in self._store.account_snapshots()}
        for _ in self._store.configuring(
                current.targets, config.credentials.keys(), discovering,
                {name: key.key_id for name, key in config.credentials.items()},
                [key.name for key in config.settings.keys if key.streams]):
            await slices.pause_if_due()
        for name, key_plan in current.keys.items():
            if name in discovering:
                polled = sum(target.discovered for target in key_plan.targets)
                conflicts = sum(skipped.key_name == name for skipped in current.skipped)
                self._store.record_discovered_polled(name, polled, conflicts)
        for skipped in current.skipped:
            log.warning("discovered account not polled: its label is taken", key=skipped.key_name,
                        account=skipped.short_name, taken_by_key=skipped.taken_by)
        new_labels = {target.label for target in current.targets}
        if old_labels and new_labels != old_labels:
            log.info("what is polled changed", accounts=len(new_labels),
                     added=sorted(new_labels - old_labels)[:50],
                     removed=sorted(old_labels - new_labels)[:50])

    def _shared_budget(self, config: Config) -> SharedBudget | None:
        """The shared budget, kept across a reload that does not change its rate (a new one
        would forget the slots just handed out)."""
        rate = config.settings.gemini.requests_per_second
        if rate is None:
            return None
        if self._shared is None or self._shared.requests_per_second != rate:
            self._shared = SharedBudget(rate)
        return self._shared

    async def _install(self, config: Config, current: Plan) -> None:
        """Adopt a plan made for `config`: the store first, then every key's worker, giving the
        event loop a turn every few milliseconds (a thousand keys take tens of them). Until its
        turn a key's worker polls by its old plan, and the store takes nothing from a job that
        is no longer planned as it was."""
        self._config = config
        slices = Slices(PLAN_SLICE_SECONDS)
        await self._configure_store(config, current, slices)
        shared = self._shared_budget(config)
        backoffs = Backoffs(
            max_backoff_seconds=config.settings.polling.max_backoff_seconds,
            rejected_retry_seconds=config.settings.polling.rejected_retry_seconds,
        )
        rules = ReplyRules(config.precision, config.settings.gemini.max_timestamp_skew_seconds)
        gemini = config.settings.gemini
        client = GeminiClient(self._session, gemini.base_url, gemini.timeout_seconds,
                              gemini.max_reply_bytes, gemini.proxy_url, config.gemini_tls)
        now = self._clock.monotonic()
        runtimes: dict[str, _KeyRuntime] = {}
        try:
            for key in config.settings.keys:
                await slices.pause_if_due()
                credentials = config.credentials[key.name]
                nonces, pacing = self._key_continuity(key, credentials)
                key_plan = current.keys[key.name]
                runtime = self._runtimes.pop(credentials.api_key, None)
                if runtime is None:
                    runtime = self._start_worker(key.name, credentials, nonces, key_plan, pacing,
                                                 backoffs, client, rules, shared, now)
                else:
                    runtime.worker.reconfigure(key.name, credentials, nonces, client, rules,
                                               shared)
                    if runtime.worker.schedule.update(key_plan, now, backoffs):
                        runtime.worker.wake()
                runtimes[credentials.api_key] = runtime
        except asyncio.CancelledError:
            self._runtimes.update(runtimes)  # every worker stays known, so that stop() ends it
            raise
        for dropped in self._runtimes.values():  # API keys the config no longer has
            dropped.task.cancel()
            self._retired.add(dropped.task)
            dropped.task.add_done_callback(self._retired.discard)
        self._runtimes = runtimes

    def _start_worker(
        self, key_name: str, credentials: Credentials, nonces: NonceSource, key_plan: KeyPlan,
        pacing: KeyPacing, backoffs: Backoffs, client: GeminiClient, rules: ReplyRules,
        shared: SharedBudget | None, now: float,
    ) -> _KeyRuntime:
        schedule = KeySchedule(key_plan, pacing, backoffs, now)
        known = self._listings.get(credentials.api_key)
        if known is not None and key_plan.listing_interval_seconds is not None:
            # The accounts it listed are polled at once; the listing keeps its rhythm.
            schedule.next_due[LISTING] = known[1] + key_plan.listing_interval_seconds
        worker = KeyWorker(key_name, credentials, nonces, schedule, client, self._store, rules,
                           self._clock, shared, on_listing=self._adopt_listing)
        task = asyncio.create_task(self._supervise(worker), name=f"poll-{key_name}")
        task.add_done_callback(partial(self._supervisor_ended, worker))
        return _KeyRuntime(worker, task)

    def _adopt_listing(self, api_key: str, listed: tuple[ListedAccount, ...]) -> None:
        """A key's new listing: if it differs from the last, plan again."""
        previous = self._listings.get(api_key)
        self._listings[api_key] = (listed, self._clock.monotonic())
        if previous is not None and previous[0] == listed:
            return
        self._replan_wanted = True
        if self._replanning is None or self._replanning.done():
            self._replanning = asyncio.create_task(self._replan(), name="replan")

    async def _replan(self) -> None:
        async with self._planning:
            while self._replan_wanted:
                self._replan_wanted = False
                assert self._config is not None  # listings come from workers a config started
                try:
                    await self._plan_and_install(self._config)
                except Exception:  # a bug: the last plan stays; the next listing tries again
                    self._store.record_plan_error()
                    log.exception("planning after an account listing failed; the last plan "
                                  "stays in use")
                    return

    async def _supervise(self, worker: KeyWorker) -> None:
        """Run the key's worker; if it raises (a bug), log it and start it again after a backoff,
        so that one bad reply or state never stops a key's polling for good."""
        crashes = 0
        rng = random.Random()
        while True:
            self._store.record_worker_running(worker.key_name, True)
            try:
                await worker.run()
                raise RuntimeError("the worker returned")  # it loops forever by design
            except Exception:
                crashes += 1
                self._store.record_worker_running(worker.key_name, False)
                self._store.record_worker_restart(worker.key_name)
                assert self._config is not None
                delay = jittered_backoff(crashes, RESTART_BACKOFF_BASE_SECONDS,
                                         self._config.settings.polling.max_backoff_seconds, rng)
                log.exception("key worker crashed, restarting it", key=worker.key_name,
                              crashes=crashes, restart_in_seconds=round(delay, 3))
            await self._clock.sleep(delay)

    def _supervisor_ended(self, worker: KeyWorker, task: asyncio.Task[None]) -> None:
        # Only a cancelled task ends on purpose; anything else leaves the key unpolled, and that
        # must show (gemini_key_worker_running, /-/healthy) rather than pass in silence.
        if not task.cancelled():
            self._store.record_worker_running(worker.key_name, False)
            log.error("key worker supervisor ended; the key is no longer polled",
                      key=worker.key_name, error=repr(task.exception()))

    def worker_of(self, api_key: str) -> tuple[KeyWorker, NonceSource] | None:
        """The running worker of an API key and its nonces (for its stream)."""
        runtime = self._runtimes.get(api_key)
        return None if runtime is None else (runtime.worker, self._nonces[api_key])

    async def stop(self) -> None:
        tasks = [runtime.task for runtime in self._runtimes.values()]
        tasks += [*self._retired, *([self._replanning] if self._replanning else [])]
        self._runtimes = {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
