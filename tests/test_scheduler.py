"""The scheduler's decisions with plain numbers, and its loop with a fake clock."""

import asyncio
import json
import random
from collections import Counter
from dataclasses import replace
from itertools import pairwise

import pytest
import structlog
from pydantic import SecretStr

from balance_exporter.config import Credentials, build_config
from balance_exporter.gemini.client import PrivateRequest, new_session
from balance_exporter.gemini.errors import (
    GeminiError,
    RateLimited,
    RequestRejected,
    TransientError,
)
from balance_exporter.gemini.nonce import NonceSource
from balance_exporter.gemini.replies import ReplyRules
from balance_exporter.precision import Precision
from balance_exporter.scheduler import (
    LISTING,
    TRANSFERS_ACCOUNT_SPACING_SECONDS,
    Backoffs,
    Clock,
    Job,
    KeyPacing,
    KeySchedule,
    KeyWorker,
    Scheduler,
    SharedBudget,
    jittered_backoff,
)
from balance_exporter.store import BalanceStore
from balance_exporter.targets import (
    AccountTarget,
    AllowList,
    Endpoint,
    KeyPlan,
    ListedAccount,
    Movements,
)
from tests.helpers import VirtualClock, wait_until

BACKOFFS = Backoffs(max_backoff_seconds=300, rejected_retry_seconds=600)


def targets(count: int, interval: float = 10.0) -> list[AccountTarget]:
    return [AccountTarget(f"a{i}", "k", f"a{i}", False, interval) for i in range(count)]


def key_plan(accounts: list[AccountTarget], listing: float | None = None) -> KeyPlan:
    return KeyPlan("k", tuple(accounts), listing, 1.0)


def schedule(count: int, rps: float = 2.0, interval: float = 10.0) -> KeySchedule:
    return KeySchedule(key_plan(targets(count, interval)), KeyPacing(rps), BACKOFFS, now=0.0,
                       rng=random.Random(7), shift=0.0)


def balances(label: str) -> Job:
    return Job(label, Endpoint.BALANCES)


def next_job(plan: KeySchedule, now: float = 0.0) -> tuple[Job, float]:
    planned = plan.next_poll(now)
    assert planned is not None
    return planned


def run_jobs(plan: KeySchedule, polls: int) -> list[tuple[Job, float]]:
    """Follow the schedule with every poll succeeding instantly."""
    history = []
    now = 0.0
    for _ in range(polls):
        job, now = next_job(plan, now)
        plan.started(now)
        plan.succeeded(job, now)
        history.append((job, now))
    return history


def run_rounds(plan: KeySchedule, polls: int) -> list[tuple[str, float]]:
    return [(job.label, at) for job, at in run_jobs(plan, polls)]


def test_first_round_polls_every_account_right_away_spaced_by_the_budget() -> None:
    history = run_rounds(schedule(4, rps=2.0), 4)
    assert history == [("a0", 0.0), ("a1", 0.5), ("a2", 1.0), ("a3", 1.5)]


def test_round_robin_keeps_each_account_on_its_interval_spread_evenly() -> None:
    history = run_rounds(schedule(4, rps=2.0, interval=10.0), 16)
    starts: dict[str, list[float]] = {}
    for label, start in history:
        starts.setdefault(label, []).append(start)
    # After the first round (all at once), each account on its own grid point: a0 at 0, a1 at
    # 2.5, a2 at 5, a3 at 7.5 s into every interval.
    assert starts == {"a0": [0.0, 10.0, 20.0, 30.0], "a1": [0.5, 2.5, 12.5, 22.5],
                      "a2": [1.0, 5.0, 15.0, 25.0], "a3": [1.5, 7.5, 17.5, 27.5]}
    gaps = [b[1] - a[1] for a, b in pairwise(history)]
    assert min(gaps) >= 0.5


def test_a_late_job_gets_its_slot_back_and_one_later_than_an_interval_skips_it() -> None:
    plan = schedule(1, rps=2.0, interval=10.0)
    plan.started(3.0)
    plan.succeeded(balances("a0"), 3.0)  # first poll, late for the 0 s point
    assert plan.next_due[balances("a0")] == 10.0  # no drift: back on the grid
    plan.started(24.0)
    plan.succeeded(balances("a0"), 24.0)  # missed 20 s by 4 s... and 10 s entirely
    assert plan.next_due[balances("a0")] == 30.0


def test_rate_limit_pauses_the_whole_key_for_retry_after() -> None:
    plan = schedule(3, rps=2.0)
    target, start = next_job(plan)
    plan.started(start)
    assert plan.rate_limited(now=0.1, retry_after=30.0) == 30.0
    again, next_start = next_job(plan, 0.1)
    assert again.label == target.label  # the same account goes first after the pause
    assert next_start == 30.1
    plan.succeeded(again, next_start)
    other, other_start = next_job(plan, next_start)
    assert other.label != target.label
    assert other_start >= 30.1


def test_rate_limit_without_retry_after_backs_off_exponentially() -> None:
    plan = schedule(1)
    pauses = [plan.rate_limited(now=0.0, retry_after=None) for _ in range(12)]
    for strike, pause in enumerate(pauses, start=1):
        step = min(300.0, 2.0 ** (strike - 1))
        assert step / 2 <= pause <= step
    assert pauses[-1] <= 300.0


def test_success_resets_rate_limit_strikes() -> None:
    plan = schedule(1)
    for _ in range(5):
        plan.rate_limited(now=0.0, retry_after=None)
    plan.succeeded(balances("a0"), 100.0)
    assert plan.rate_limited(now=100.0, retry_after=None) <= 1.0


def test_transient_failure_backs_off_only_that_account() -> None:
    plan = schedule(2, rps=2.0, interval=10.0)
    plan.started(0.0)
    delays = [plan.failed(balances("a0"), now=0.0) for _ in range(10)]
    for failures, delay in enumerate(delays, start=1):
        step = min(300.0, 2.0 * 2 ** (failures - 1))
        assert step / 2 <= delay <= step
    assert plan.next_due[balances("a0")] == delays[-1]
    assert next_job(plan)[0].label == "a1"  # the other account keeps its schedule
    assert plan.next_due[balances("a1")] == 0.0


def test_backoff_has_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    values = {jittered_backoff(20, 2.0, 300.0, rng) for _ in range(50)}
    assert len(values) > 40
    assert all(150.0 <= value <= 300.0 for value in values)


def test_rejected_requests_retry_from_15_s_doubling_up_to_the_long_interval() -> None:
    plan = schedule(2)
    delays = [plan.rejected(balances("a0"), now=5.0) for _ in range(12)]
    for rejections, delay in enumerate(delays, start=1):
        step = min(600.0, 15.0 * 2 ** (rejections - 1))
        assert step / 2 <= delay <= step
    assert max(delays) <= 600.0
    assert plan.next_due[balances("a0")] == 5.0 + delays[-1]
    # A short blip: three tries cover more than 90 s of rejections at most.
    assert sum(min(600.0, 15.0 * 2 ** n) for n in range(3)) > 90


def test_backoffs_never_overflow_at_any_number_of_failures() -> None:
    rng = random.Random(2)
    for failures in (1024, 1025, 10_000, 10**9):
        assert 150.0 <= jittered_backoff(failures, 2.0, 300.0, rng) <= 300.0


def test_retry_after_is_clamped_to_the_largest_backoff() -> None:
    plan = schedule(1)  # max_backoff_seconds 300
    assert plan.rate_limited(now=0.0, retry_after=999_999.0) == 300.0
    assert next_job(plan)[1] == 300.0
    assert plan.rate_limited(now=400.0, retry_after=0.0) == 0.0


def test_shared_budget_spaces_every_key() -> None:
    budget = SharedBudget(requests_per_second=4)
    assert [budget.reserve(0.0) for _ in range(4)] == [0.0, 0.25, 0.5, 0.75]
    assert budget.reserve(10.0) == 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)


class ScriptedGemini:
    """Answers each account from a script of outcomes; records when each request came."""

    def __init__(self, clock: Clock, script: dict[str, list[bytes | GeminiError]]) -> None:
        self._clock = clock
        self._script = script
        self.calls: list[tuple[str | None, float]] = []
        self.enough = asyncio.Event()
        self.wanted = 0

    async def post(
        self, credentials: Credentials, nonces: NonceSource, request: PrivateRequest
    ) -> bytes:
        account = request.params.get("account")
        assert account is None or isinstance(account, str)
        self.calls.append((account, self._clock.monotonic()))
        if len(self.calls) >= self.wanted:
            self.enough.set()
        outcomes = self._script.get(account or "", [])
        outcome = outcomes.pop(0) if len(outcomes) > 1 else (outcomes[0] if outcomes else b"[]")
        if isinstance(outcome, GeminiError):
            raise outcome
        return outcome


async def run_worker(
    script: dict[str, list[bytes | GeminiError]], count: int, polls: int, rps: float = 2.0
) -> tuple[ScriptedGemini, BalanceStore]:
    clock = FakeClock()
    gemini = ScriptedGemini(clock, script)
    store = BalanceStore()
    accounts = targets(count)
    store.configure(accounts, {"k"})
    plan = KeySchedule(key_plan(accounts), KeyPacing(rps), BACKOFFS, clock.now,
                       random.Random(3), shift=0.0)
    credentials = Credentials("master-k", SecretStr("s"))
    worker = KeyWorker("k", credentials, NonceSource("milliseconds"), plan, gemini, store,
                       ReplyRules(Precision({}, 8)), clock)
    gemini.wanted = polls
    task = asyncio.create_task(worker.run())
    await gemini.enough.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return gemini, store


BTC = b'[{"currency":"BTC","amount":"1","available":"1","availableForWithdrawal":"1"}]'


async def test_worker_polls_in_round_robin_within_the_budget() -> None:
    gemini, store = await run_worker({}, count=3, polls=9)
    accounts = [account for account, _ in gemini.calls]
    assert accounts[:3] == ["a0", "a1", "a2"]
    assert sorted(str(account) for account in accounts) == ["a0"] * 3 + ["a1"] * 3 + ["a2"] * 3
    times = [at for _, at in gemini.calls]
    assert min(b - a for a, b in pairwise(times)) >= 0.5
    assert all(snapshot.balances.up for snapshot in store.account_snapshots())


async def test_a_key_behind_its_plan_shows_its_lag() -> None:
    # Five accounts due at once on a key that sends two requests a second: the fifth starts 2 s
    # after it was due.
    _, store = await run_worker({}, count=5, polls=5, rps=2.0)
    (key,) = store.key_counters()
    assert key.poll_lag_seconds == pytest.approx(2.0)


async def test_worker_pauses_key_on_rate_limit_and_recovers() -> None:
    limited = RateLimited("RateLimit", "slow down", 429, retry_after=20.0)
    gemini, store = await run_worker({"a0": [limited, BTC]}, count=2, polls=4)
    (a0_first, t0), (a0_again, t1), *_ = gemini.calls
    assert a0_first == a0_again == "a0"
    assert t1 - t0 == pytest.approx(20.0)
    assert store.key_counters()[0].rate_limited == 1
    snapshot = store.account_snapshots()[0]
    assert snapshot.balances.up
    assert dict(snapshot.balances.errors) == {"RateLimit": 1}


async def test_worker_marks_rejected_accounts_down_and_keeps_the_others() -> None:
    rejected = RequestRejected("MissingRole", "no role", 403)
    gemini, store = await run_worker({"a0": [rejected], "a1": [BTC]}, count=2, polls=12)
    a0, a1 = store.account_snapshots()
    assert not a0.balances.up
    assert a1.balances.up
    a0_times = [at for account, at in gemini.calls if account == "a0"]
    # Retried after 7.5-15 s, then 15-30 s, ...: fewer polls than a1's every 10 s.
    assert 1 < len(a0_times) < a1.balances.polls
    assert dict(a0.balances.errors) == {"MissingRole": len(a0_times)}
    assert 7.5 <= a0_times[1] - a0_times[0] <= 15.0


async def test_an_account_is_back_within_90_s_of_a_short_rejection_blip() -> None:
    rejected = RequestRejected("InvalidNonce", "blip", 400)
    gemini, store = await run_worker({"a0": [rejected, rejected, BTC]}, count=1, polls=3)
    (_, t0), _, (_, back) = gemini.calls
    assert back - t0 <= 90.0
    assert store.account_snapshots()[0].balances.up


async def test_worker_retries_transient_failures_with_backoff() -> None:
    failure = TransientError("System", "boom", 500)
    gemini, store = await run_worker({"a0": [failure, failure, failure, BTC]}, count=1, polls=4)
    times = [at for _, at in gemini.calls]
    gaps = [b - a for a, b in pairwise(times)]
    assert 1.0 <= gaps[0] <= 2.0
    assert 2.0 <= gaps[1] <= 4.0
    assert 4.0 <= gaps[2] <= 8.0
    (snapshot,) = store.account_snapshots()
    assert snapshot.balances.up
    assert dict(snapshot.balances.errors) == {"System": 3}


async def test_worker_survives_a_malformed_reply_and_keeps_old_balances() -> None:
    _, store = await run_worker({"a0": [BTC, b"<html>oops</html>", BTC]}, count=1, polls=2)
    (snapshot,) = store.account_snapshots()
    assert [balance.currency for balance in snapshot.balances.rows] == ["BTC"]
    assert dict(snapshot.balances.errors) == {"MalformedReply": 1}



async def test_ten_thousand_failures_in_a_row_never_stop_the_worker() -> None:
    failure = TransientError("System", "down for the weekend", 500)
    with structlog.testing.capture_logs() as logs:
        gemini, store = await run_worker({"a0": [failure]}, count=1, polls=10_000)
    assert sum(entry["event"] == "poll failed" for entry in logs) >= 9_999
    times = [at for _, at in gemini.calls]
    gaps = [b - a for a, b in pairwise(times[-100:])]
    assert all(150.0 <= gap <= 300.0 for gap in gaps)  # capped, never overflowing
    (snapshot,) = store.account_snapshots()
    assert dict(snapshot.balances.errors) == {"System": 10_000}


class CrashingStore(BalanceStore):
    """A store whose request counter raises the first `crashes` times: a bug in the loop."""

    def __init__(self, crashes: int) -> None:
        super().__init__()
        self.crashes = crashes

    def record_request(self, key_name: str) -> None:
        if self.crashes > 0:
            self.crashes -= 1
            raise RuntimeError("injected crash")
        super().record_request(key_name)


async def test_a_crashed_worker_is_logged_counted_and_restarted() -> None:
    clock = FakeClock()
    store = CrashingStore(crashes=3)
    config = build_config({
        "gemini": {"base_url": "http://127.0.0.1:9", "timeout_seconds": 1},
        "keys": [{"name": "k", "api_key": "account-k", "api_secret": "TOPSECRET-crash"}],
        "accounts": [{"key": "k"}],
    }, {})
    async with new_session("test") as session:
        scheduler = Scheduler(session, store, clock)
        with structlog.testing.capture_logs() as logs:
            await scheduler.apply(config)
            for _ in range(200):
                await asyncio.sleep(0)
                if store.key_counters()[0].requests > 0:
                    break
            await scheduler.stop()
    (key,) = store.key_counters()
    assert key.worker_restarts == 3
    assert key.requests > 0  # polling went on after the restarts
    assert key.worker_running
    crashes = [entry for entry in logs if entry["event"] == "key worker crashed, restarting it"]
    assert [entry["crashes"] for entry in crashes] == [1, 2, 3]
    assert all(entry["log_level"] == "error" and entry["exc_info"] for entry in crashes)


async def test_a_worker_that_keeps_crashing_shows_as_not_running() -> None:
    clock = FakeClock()
    store = CrashingStore(crashes=10**9)
    config = build_config({
        "gemini": {"base_url": "http://127.0.0.1:9"},
        "keys": [{"name": "k", "api_key": "account-k", "api_secret": "TOPSECRET-crash"}],
        "accounts": [{"key": "k"}],
    }, {})
    async with new_session("test") as session:
        scheduler = Scheduler(session, store, clock)
        with structlog.testing.capture_logs():
            await scheduler.apply(config)
            running = []
            for _ in range(50):
                await asyncio.sleep(0)
                running.append(store.key_counters()[0].worker_running)
            await scheduler.stop()
    # Between a crash and its restart the key is not polled, and the store says so.
    assert False in running
    assert store.stopped_workers() == ["k"]
    assert store.key_counters()[0].worker_restarts > 5


@pytest.mark.parametrize(("retry_after", "pause"), [(299.5, 299.5), (300.0, 300.0),
                                                     (300.5, 300.0)])
def test_retry_after_clamp_at_and_past_the_bound(retry_after: float, pause: float) -> None:
    assert schedule(1).rate_limited(now=0.0, retry_after=retry_after) == pause


def treasury_target(label: str) -> AccountTarget:
    return AccountTarget(label, "k", label, False, 10.0, notional_currency="USD",
                         notional_interval_seconds=30.0, staking_interval_seconds=60.0)


def test_every_request_stream_is_a_job_and_balances_go_first_when_several_are_due() -> None:
    plan = KeySchedule(key_plan([treasury_target("a0"), treasury_target("a1")], listing=300.0),
                       KeyPacing(2.0), BACKOFFS, now=0.0, rng=random.Random(1), shift=0.0)
    sent = [(job.label, job.endpoint.value, at) for job, at in run_jobs(plan, 9)]
    # Every account's balances at once and the listing, then each endpoint's jobs spread evenly
    # over its interval (a1 half an interval after a0), balances first when several are due.
    assert sent == [("a0", "balances", 0.0), ("a1", "balances", 0.5), ("", "account_list", 1.0),
                    ("a0", "notional", 1.5), ("a0", "staking", 2.0), ("a1", "balances", 5.0),
                    ("a0", "balances", 10.0), ("a1", "balances", 15.0), ("a1", "notional", 15.5)]



def test_each_network_of_an_allow_list_is_a_job_on_its_grid_spread_with_the_others() -> None:
    def reading(label: str) -> AccountTarget:
        return AccountTarget(label, "k", label, False, 10.0,
                             allow_list_networks=("bitcoin", "ethereum"),
                             allow_list_interval_seconds=40.0)
    plan = KeySchedule(key_plan([reading("a0"), reading("a1")]), KeyPacing(2.0), BACKOFFS,
                       now=0.0, rng=random.Random(1), shift=0.0)
    lists = {job: at for job, at in plan.next_due.items() if isinstance(job.endpoint, AllowList)}
    # Not at once like the balances: the four lists come at their grid points, a quarter of
    # their interval apart, every network's and account's together.
    assert sorted(lists.values()) == [0.0, 10.0, 20.0, 30.0]
    assert {(job.label, job.endpoint) for job in lists} == {
        (label, AllowList(network)) for label in ("a0", "a1")
        for network in ("bitcoin", "ethereum")}
    assert Job("a0", AllowList("bitcoin")).log_fields == {
        "account": "a0", "endpoint": "approved_addresses", "network": "bitcoin"}
    sent = [(job.label, job.endpoint.value, at) for job, at in run_jobs(plan, 4)]
    assert sent[:2] == [("a0", "balances", 0.0), ("a1", "balances", 0.5)]
    assert sent[2][1] == "approved_addresses"


def test_two_transfers_requests_for_one_account_are_never_closer_than_5_s() -> None:
    def reading(label: str) -> AccountTarget:
        return AccountTarget(label, "k", label, False, 60.0, transfers_interval_seconds=5.0)
    plan = KeySchedule(key_plan([reading("a0"), reading("a1")]), KeyPacing(10.0), BACKOFFS,
                       now=0.0, rng=random.Random(1), shift=0.0)
    sent: dict[str, list[float]] = {}
    now = 0.0
    while now < 60.0:
        job, now = next_job(plan, now)
        plan.started(now, job)
        if job.endpoint is Movements.TRANSFERS:
            sent.setdefault(job.label, []).append(now)
            plan.soon(job, now)  # a gap: as soon as allowed
            # A reload keeps the spacing: the same plan again, as a new object.
            plan.update(key_plan([reading("a0"), reading("a1")]), now)
        else:
            plan.succeeded(job, now)
    for starts in sent.values():
        assert len(starts) >= 10
        # Gemini's rule (the margin above it kept to float precision).
        assert min(b - a for a, b in pairwise(starts)) >= 5.0
        assert min(b - a for a, b in pairwise(starts)) == pytest.approx(
            TRANSFERS_ACCOUNT_SPACING_SECONDS)


def test_frames_before_a_poll_make_one_poll_within_the_budget_and_the_floor_holds() -> None:
    plan = KeySchedule(key_plan([AccountTarget("a0", "k", None, False, 30.0)]), KeyPacing(1.0),
                       BACKOFFS, now=0.0, rng=random.Random(1), shift=0.0)
    job = balances("a0")
    plan.started(0.0, job)
    plan.succeeded(job, 0.0)
    plan.set_balances_floor(300.0, 0.0)  # the stream is up
    plan.succeeded(job, 0.0)
    assert plan.next_due[job] == 300.0  # the regular poll waits for the reconcile interval
    # A burst of frames at 10 s: one poll, due at once; the key's spacing still holds.
    assert [plan.trigger_balances("a0", 10.0) for _ in range(5)] == [True, False, False, False,
                                                                        False]
    assert plan.next_poll(10.0) == (job, 10.0)
    plan.started(10.0, job)
    plan.succeeded(job, 10.0)
    assert plan.trigger_balances("a0", 10.2)
    assert plan.next_poll(10.2) == (job, 11.0)  # 1 request a second
    # The stream drops: the planned interval applies again at once.
    plan.set_balances_floor(None, 12.0)
    plan.started(11.0, job)
    plan.succeeded(job, 11.0)
    assert plan.next_due[job] == 30.0
    assert not plan.trigger_balances("other", 12.0)


def test_each_stream_keeps_its_own_interval_and_a_failing_one_backs_off_alone() -> None:
    plan = KeySchedule(key_plan([treasury_target("a0")]), KeyPacing(10.0), BACKOFFS, now=0.0,
                       rng=random.Random(1), shift=0.0)
    history: list[tuple[Job, float]] = []
    now = 0.0
    while now < 120.0:
        job, now = next_job(plan, now)
        plan.started(now)
        if job.endpoint is Endpoint.STAKING:
            plan.failed(job, now)
        else:
            plan.succeeded(job, now)
        history.append((job, now))

    def starts(endpoint: Endpoint) -> list[float]:
        return [at for job, at in history if job.endpoint is endpoint]
    def gaps(endpoint: Endpoint) -> set[float]:
        return {round(b - a, 6) for a, b in pairwise(starts(endpoint))}
    assert len(starts(Endpoint.BALANCES)) >= 12
    assert gaps(Endpoint.BALANCES) == {10.0}
    assert gaps(Endpoint.NOTIONAL) == {30.0}
    staking_gaps = [b - a for a, b in pairwise(starts(Endpoint.STAKING))]
    assert all(b > a for a, b in pairwise(staking_gaps[:5]))  # backing off, not every 60 s


def test_a_new_plan_adds_jobs_due_at_once_drops_gone_ones_and_keeps_the_rest() -> None:
    plan = KeySchedule(key_plan([treasury_target("a0"), treasury_target("a1")]), KeyPacing(2.0),
                       BACKOFFS, now=0.0, rng=random.Random(1))
    run_jobs(plan, 6)
    kept = plan.next_due[balances("a0")]
    plan.update(key_plan([treasury_target("a0"), treasury_target("new")], listing=60.0), 50.0)
    assert plan.next_due[balances("a0")] == kept
    assert plan.next_due[balances("new")] == 50.0
    assert plan.next_due[LISTING] == 50.0
    assert not any(job.label == "a1" for job in plan.next_due)
    assert set(plan.targets) == {"a0", "new"}
    plan.succeeded(balances("a1"), 51.0)  # a poll that was running when a1 went: ignored
    assert balances("a1") not in plan.next_due


def test_a_key_with_nothing_to_poll_has_no_next_job() -> None:
    plan = KeySchedule(key_plan([]), KeyPacing(2.0), BACKOFFS, now=0.0)
    assert plan.next_poll(0.0) is None


def test_a_slow_endpoint_takes_at_most_a_quarter_of_the_keys_time() -> None:
    # Ten accounts, balances every 10 s; their staking replies take 8 s each (a slow provider).
    accounts = [replace(treasury_target(f"a{i}"), notional_interval_seconds=None)
                for i in range(10)]
    plan = KeySchedule(key_plan(accounts), KeyPacing(5.0), BACKOFFS, now=0.0,
                       rng=random.Random(1))
    now, busy = 0.0, {Endpoint.BALANCES: 0.0, Endpoint.STAKING: 0.0}
    starts: dict[str, list[float]] = {}
    while now < 600.0:
        job, start = next_job(plan, now)
        plan.started(start)
        assert isinstance(job.endpoint, Endpoint)
        duration = 8.0 if job.endpoint is Endpoint.STAKING else 0.01
        plan.finished(job, start, start + duration)
        plan.succeeded(job, start)
        busy[job.endpoint] += duration
        if job.endpoint is Endpoint.BALANCES:
            starts.setdefault(job.label, []).append(start)
        now = start + duration
    # A quarter of the time beyond the spacing: 8 / (8 + 3 * 7.8) of it, plus the last rest.
    assert busy[Endpoint.STAKING] <= 0.27 * now
    # The balances keep their interval, give or take one slow reply they had to wait for.
    late = [b - a for times in starts.values() for a, b in pairwise(times[1:])]
    assert max(late) <= 10.0 + 8.0
    assert sum(late) / len(late) == pytest.approx(10.0, rel=0.05)


class TimeBasedGemini:
    """Accepts a time-based key's nonce only within 30 s of its own clock, as Gemini does."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock
        self.outcomes: list[str] = []
        self.four = asyncio.Event()

    async def post(
        self, credentials: Credentials, nonces: NonceSource, request: PrivateRequest
    ) -> bytes:
        nonce = nonces.next()
        if len(self.outcomes) >= 3:
            self.four.set()
        if abs(nonce - self._clock.wall()) > 30:
            self.outcomes.append("InvalidNonce")
            raise RequestRejected("InvalidNonce", "nonce not within 30 s", 400)
        self.outcomes.append("ok")
        return b"[]"


async def test_a_time_based_key_recovers_from_a_forward_clock_step_at_its_next_retry() -> None:
    clock = FakeClock()
    stepped = [True]  # the host clock is an hour ahead for one reading, then right again

    def wall_ns() -> int:
        ahead = 3600 if stepped and stepped.pop() else 0
        return int((clock.wall() + ahead) * 1e9)

    gemini = TimeBasedGemini(clock)
    store = BalanceStore()
    accounts = targets(1)
    store.configure(accounts, {"k"})
    plan = KeySchedule(key_plan(accounts), KeyPacing(1.0), BACKOFFS, clock.now, random.Random(3))
    worker = KeyWorker("k", Credentials("account-k", SecretStr("s")),
                       NonceSource("seconds", wall_ns), plan, gemini, store,
                       ReplyRules(Precision({}, 8)), clock)
    task = asyncio.create_task(worker.run())
    await gemini.four.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # One refusal (the hour-ahead nonce), then the clock again, not an hour of refusals.
    assert gemini.outcomes[:4] == ["InvalidNonce", "ok", "ok", "ok"]



async def test_a_shared_budget_gives_every_key_its_share_and_is_never_exceeded() -> None:
    """Two keys of unequal loads behind one shared budget: the light key's next job, far off,
    must hold no slot that the busy key's due jobs wait behind."""
    clock = VirtualClock()
    gemini = ScriptedGemini(clock, {})
    busy = [AccountTarget(f"a{i}", "busy", f"a{i}", False, 10.0) for i in range(10)]
    light = [AccountTarget("b0", "light", "b0", False, 10.0)]
    store = BalanceStore()
    store.configure([*busy, *light], ["busy", "light"])
    shared = SharedBudget(requests_per_second=2.0)
    tasks = []
    for name, accounts in (("busy", busy), ("light", light)):
        schedule = KeySchedule(KeyPlan(name, tuple(accounts), None, 1.0), KeyPacing(5.0),
                               BACKOFFS, clock.now, random.Random(1))
        worker = KeyWorker(name, Credentials(f"master-{name}", SecretStr("s")),
                           NonceSource("milliseconds"), schedule, gemini, store,
                           ReplyRules(Precision({}, 8)), clock, shared)
        tasks.append(asyncio.create_task(worker.run()))
    await clock.run_for(120.0)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    polls = {label: sum(account == label for account, _ in gemini.calls)
             for label in [target.label for target in [*busy, *light]]}
    assert all(count >= 11 for count in polls.values()), polls  # every 10 s for 120 s
    times = sorted(at for _, at in gemini.calls)
    assert min(later - earlier for earlier, later in pairwise(times)) >= 0.5 - 1e-9


class LateGemini:
    """Answers (or fails) once the test let it, so that the plan can change while the request
    is out."""

    def __init__(self, failing: bool) -> None:
        self.sent = asyncio.Event()
        self.answer = asyncio.Event()
        self._failing = failing

    async def post(
        self, credentials: Credentials, nonces: NonceSource, request: PrivateRequest
    ) -> bytes:
        self.sent.set()
        await self.answer.wait()
        if self._failing:
            raise TransientError("System", "late failure", 500)
        return BTC


@pytest.mark.parametrize("failing", [False, True], ids=["reply", "failure"])
async def test_a_late_reply_is_not_stored_under_a_label_that_passed_to_another_key(
    failing: bool,
) -> None:
    """Two discovering master keys list the same short name; the label passes from one to the
    other while the first key's request is in flight."""
    clock = VirtualClock()
    gemini = LateGemini(failing)
    group_a = AccountTarget("primary", "group-a", "primary", False, 10.0, discovered=True)
    group_b = replace(group_a, key_name="group-b", key_id="group-b")
    store = BalanceStore()
    store.configure([group_a], ["group-a", "group-b"])
    schedule = KeySchedule(KeyPlan("group-a", (group_a,), None, 1.0), KeyPacing(5.0), BACKOFFS,
                           clock.now, random.Random(1))
    worker = KeyWorker("group-a", Credentials("master-a", SecretStr("s")),
                       NonceSource("milliseconds"), schedule, gemini, store,
                       ReplyRules(Precision({}, 8)), clock)
    polling = asyncio.create_task(worker.poll(Job("primary", Endpoint.BALANCES)))
    await gemini.sent.wait()
    store.configure([group_b], ["group-a", "group-b"])  # the label is group B's now
    gemini.answer.set()
    await polling
    (snapshot,) = store.account_snapshots()
    assert snapshot.target.key_name == "group-b"
    assert (snapshot.balances.rows, snapshot.balances.polls, dict(snapshot.balances.errors)) == (
        (), 0, {})


async def test_a_plan_that_cannot_be_made_after_a_listing_is_logged_counted_and_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = BalanceStore()
    config = build_config({
        "gemini": {"base_url": "http://127.0.0.1:9"},
        "keys": [{"name": "k", "api_key": "master-k", "api_secret": "TOPSECRET-plan",
                  "discover": {"refresh_seconds": 3600}}],
    }, {})
    listed = (ListedAccount("a", "", "exchange", "open"),)
    async with new_session("test") as session:
        scheduler = Scheduler(session, store, FakeClock())
        await scheduler.apply(config)

        def broken(*args: object) -> object:
            raise RuntimeError("injected planning bug")
        with structlog.testing.capture_logs() as logs:
            monkeypatch.setattr("balance_exporter.scheduler.planning", broken)
            scheduler._adopt_listing("master-k", listed)
            await wait_until(lambda: asyncio.sleep(0, store.plan_errors == 1),
                             "the failed plan to be counted")
            monkeypatch.undo()
            # The next listing change plans again.
            scheduler._adopt_listing("master-k", (ListedAccount("b", "", "exchange", "open"),))
            await wait_until(lambda: asyncio.sleep(0, [s.target.label for s in
                                                       store.account_snapshots()] == ["b"]),
                             "the next plan")
        await scheduler.stop()
    assert store.plan_errors == 1
    assert [entry["log_level"] for entry in logs
            if entry["event"].startswith("planning after an account listing failed")] == [
        "error"]


def test_keys_started_together_do_not_share_their_grids() -> None:
    """A thousand keys' listings (and their first accounts' polls) would otherwise all come
    due at the same moment: a burst that holds the event loop. Each key's grid is shifted by a
    fraction of its own, the same at every start."""
    def listing_after_first(name: str) -> float:
        plan = KeySchedule(KeyPlan(name, (), 30.0, 1.0), KeyPacing(5.0), BACKOFFS, now=0.0)
        job, at = next_job(plan)
        plan.started(at)
        plan.succeeded(job, at)
        return plan.next_due[job]

    names = [f"key-{index}" for index in range(200)]
    second_listings = [listing_after_first(name) for name in names]
    tenths = Counter(int(at / 3.0) for at in second_listings)  # of the 30 s interval
    assert sorted(tenths) == list(range(1, 11))  # every tenth but the first 3 s (the gap)
    assert max(tenths.values()) <= 40  # 20 each on average
    assert [listing_after_first(name) for name in names] == second_listings


class PagedGroup:
    """A group's /v1/account/list, paged as Gemini pages it: newest first, 500 at most, at or
    before `timestamp`; records each request's time and `timestamp`."""

    def __init__(self, clock: FakeClock, accounts: int, fail_page: int | None = None) -> None:
        self._clock = clock
        self._created = {f"a{index:04d}": 1_600_000_000_000 + index // 2  # two per millisecond
                         for index in range(accounts)}
        self._fail_page = fail_page
        self.pages: list[tuple[float, object]] = []

    async def post(
        self, credentials: Credentials, nonces: NonceSource, request: PrivateRequest
    ) -> bytes:
        at_or_before = request.params.get("timestamp")
        self.pages.append((self._clock.monotonic(), at_or_before))
        if len(self.pages) == self._fail_page:
            raise TransientError("HTTP503", "a page failed")
        rows = sorted(((created, name) for name, created in self._created.items()
                       if not isinstance(at_or_before, int) or created <= at_or_before),
                      reverse=True)[:500]
        return json.dumps([{"account": name, "type": "exchange", "status": "open",
                            "created": created} for created, name in rows]).encode()


async def list_group(group: PagedGroup, clock: FakeClock, rps: float = 2.0,
                     max_pages: int = 20) -> tuple[BalanceStore, list[tuple[ListedAccount, ...]]]:
    store = BalanceStore()
    store.configure([], {"k"}, discovering={"k": 900.0})
    adopted: list[tuple[ListedAccount, ...]] = []
    plan = KeySchedule(KeyPlan("k", (), 900.0, 1.0, max_pages), KeyPacing(rps), BACKOFFS,
                       clock.now, random.Random(3), shift=0.0)
    worker = KeyWorker("k", Credentials("master-k", SecretStr("s")), NonceSource("milliseconds"),
                       plan, group, store, ReplyRules(Precision({}, 8)), clock,
                       on_listing=lambda _key, rows: adopted.append(rows))
    await worker.poll(LISTING)
    return store, adopted


async def test_a_long_listing_is_read_page_by_page_each_in_the_keys_budget() -> None:
    clock = FakeClock()
    group = PagedGroup(clock, 1201)
    store, adopted = await list_group(group, clock, rps=2.0)
    (rows,) = adopted
    assert len(rows) == len({row.short_name for row in rows}) == 1201
    times = [at for at, _ in group.pages]
    assert len(times) == 3
    assert all(later - earlier >= 0.5 for earlier, later in pairwise(times))  # 2 a second
    # Each page after the first asks from the oldest `created` of the page before.
    assert [at_or_before for _, at_or_before in group.pages] == [
        None, 1_600_000_000_000 + 350, 1_600_000_000_000 + 101]
    (key,) = store.key_counters()
    assert key.requests == 3
    assert key.discovery is not None
    assert not key.discovery.full


async def test_a_failed_page_fails_the_whole_listing() -> None:
    clock = FakeClock()
    store, adopted = await list_group(PagedGroup(clock, 1201, fail_page=2), clock)
    assert adopted == []  # the first page alone is never taken for the group
    (key,) = store.key_counters()
    assert key.discovery is not None
    assert not key.discovery.up
    assert key.discovery.listed == ()


async def test_a_listing_past_max_pages_is_cut_short() -> None:
    clock = FakeClock()
    store, adopted = await list_group(PagedGroup(clock, 1201), clock, max_pages=2)
    (rows,) = adopted
    assert len(rows) == 999  # 500, then 499 more and the one both pages share
    (key,) = store.key_counters()
    assert key.discovery is not None
    assert key.discovery.full
