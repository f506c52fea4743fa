"""The fast /metrics path: byte for byte what prometheus_client renders, re-rendering only what
changed, and never failing a scrape."""

import asyncio
import contextlib
import gzip
import shutil
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence

import pytest
import structlog
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from prometheus_client.metrics_core import Metric

from balance_exporter import encoding, exposition
from balance_exporter.exposition import (
    GROUP_ACCOUNTS,
    ExpositionCache,
    accepts_gzip,
    choose_format,
)
from balance_exporter.gemini.replies import BalanceReply, CurrencyBalance
from balance_exporter.slices import Slices
from balance_exporter.store import AccountSnapshot, BalanceStore
from balance_exporter.targets import AccountTarget, Endpoint
from tests.helpers import OPENMETRICS_ACCEPT, fixed_store, reference_body, wait_until

BAL = Endpoint.BALANCES


def large_store(accounts: int, currencies: int) -> BalanceStore:
    store = BalanceStore()
    store.configure([AccountTarget(f"acct-{i}", f"key-{i % 3}", f"a{i}", i % 2 == 0, 30.0,
                                   min_available=(("C0", 1.0),)) for i in range(accounts)],
                    [f"key-{k}" for k in range(3)])
    for i in range(accounts):
        update(store, f"acct-{i}", i, currencies)
    return store


def update(store: BalanceStore, label: str, seed: int, currencies: int = 20) -> None:
    balances = tuple(CurrencyBalance(f"C{c}", seed + c + 0.5, seed + c, 1e-9 * c, c / 3, 0.0)
                     for c in range(currencies))
    store.record_reply(label, BAL, BalanceReply(balances, 1_700_000_000_000_000_000 + seed, None),
                       0.01, 1_700_000_000.0 + seed)


async def fast(cache: ExpositionCache, openmetrics: bool = False, gzipped: bool = False) -> bytes:
    exposition = await cache.render(OPENMETRICS_ACCEPT if openmetrics else "",
                                    "gzip" if gzipped else "")
    return gzip.decompress(exposition.body) if gzipped else exposition.body


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
async def test_bytes_equal_prometheus_client_for_the_same_samples(openmetrics: bool) -> None:
    for store in (fixed_store(), large_store(30, 20), BalanceStore()):
        cache = ExpositionCache(store, process_metrics=False)
        assert await fast(cache, openmetrics) == reference_body(store, openmetrics)
        assert await fast(cache, openmetrics, gzipped=True) == reference_body(store, openmetrics)


async def test_label_values_are_escaped_as_the_library_does() -> None:
    store = BalanceStore()
    store.configure([AccountTarget("main", "k", None, True, 30.0)], ["k"])
    odd = CurrencyBalance('we"ird\\cur\nrency', 1.0, 2.0, 3.0, 4.0, 5.0)
    store.record_reply("main", BAL, BalanceReply((odd,), None, None), 0.1, 1.0)
    cache = ExpositionCache(store, process_metrics=False)
    assert await fast(cache) == reference_body(store)
    assert await fast(cache, openmetrics=True) == reference_body(store, openmetrics=True)


async def test_gzip_body_is_concatenated_members() -> None:
    cache = ExpositionCache(large_store(5, 20), process_metrics=False)
    body = (await cache.render("", "gzip")).body
    assert body.count(b"\x1f\x8b\x08") > 5  # one member per family and account, at least


def rendered_labels(cache: ExpositionCache, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The labels of the accounts `cache` renders from now on, as it renders them."""
    rendered: list[str] = []
    original = cache._render_account

    def counting(snapshot: AccountSnapshot) -> None:
        rendered.append(snapshot.target.label)
        original(snapshot)

    monkeypatch.setattr(cache, "_render_account", counting)
    return rendered


async def test_only_changed_accounts_are_rendered_again(monkeypatch: pytest.MonkeyPatch) -> None:
    store = large_store(50, 20)
    cache = ExpositionCache(store, process_metrics=False)
    rendered = rendered_labels(cache, monkeypatch)
    await fast(cache)
    assert len(rendered) == 50
    rendered.clear()
    await fast(cache)
    assert rendered == []  # nothing changed: the cached body is served
    update(store, "acct-7", 1000)
    assert await fast(cache) == reference_body(store)
    assert rendered == ["acct-7"]


async def test_removed_and_reordered_accounts_follow_the_store() -> None:
    store = large_store(6, 3)
    cache = ExpositionCache(store, process_metrics=False)
    await fast(cache)
    kept = [snapshot.target for snapshot in store.account_snapshots()][::-2]
    store.configure(kept, ["key-0", "key-1", "key-2"])
    assert await fast(cache) == reference_body(store)
    assert b"acct-5" in await fast(cache)
    assert b"acct-4" not in await fast(cache)


async def ticks_while_rendering(cache: ExpositionCache, gzipped: bool = False) -> int:
    """How often a poller-like task ran while `cache` rendered its first body."""
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    ticks_before = ticks
    await fast(cache, gzipped=gzipped)
    done.set()
    await task
    return ticks - ticks_before


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
async def test_rendering_many_accounts_yields_to_the_event_loop_between_slices(
    monkeypatch: pytest.MonkeyPatch, gzipped: bool,
) -> None:
    # A slice of no time: the loop gets a turn after every account but the last, and for a
    # gzip body after making every part of it (one per family and group) too.
    monkeypatch.setattr("balance_exporter.exposition.RENDER_SLICE_SECONDS", 0.0)
    cache = ExpositionCache(large_store(200, 20), process_metrics=False)
    parts = exposition._groups_of(200) * cache._family_count if gzipped else 0
    assert await ticks_while_rendering(cache, gzipped) >= 199 + parts
    # A slice longer than the whole render: the render never yields.
    monkeypatch.setattr("balance_exporter.exposition.RENDER_SLICE_SECONDS", 3600.0)
    assert await ticks_while_rendering(ExpositionCache(large_store(200, 20),
                                                       process_metrics=False), gzipped) <= 1


async def test_an_account_that_fails_to_render_costs_only_itself(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = large_store(3, 2)
    cache = ExpositionCache(store, process_metrics=False)
    before = await fast(cache)
    working = encoding.sample_lines

    def failing_for_acct_1(family: Metric) -> bytes:
        if any(sample.labels.get("account") == "acct-1" for sample in family.samples):
            raise RuntimeError("bug")
        return working(family)

    monkeypatch.setattr("balance_exporter.exposition.sample_lines", failing_for_acct_1)
    update(store, "acct-1", 99)
    update(store, "acct-2", 99)
    after = await fast(cache)
    assert cache.counters.collect_errors == 1
    assert b"gemini_exporter_collect_errors_total 1.0" in after
    # acct-1 keeps its last rendered samples; acct-2 shows its new ones.
    line = b'gemini_balance_amount{account="acct-1",currency="C0"} 1.5\n'
    assert line in before
    assert line in after
    assert b'gemini_balance_amount{account="acct-2",currency="C0"} 99.5\n' in after


async def test_a_poll_that_moved_no_balance_renders_only_what_changed_and_stays_exact(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = large_store(3, 20)
    cache = ExpositionCache(store, process_metrics=False)
    await fast(cache)
    rendered: list[str] = []
    working, working_gauges = encoding.sample_lines, encoding.gauge_lines

    def recording(family: Metric) -> bytes:
        rendered.append(family.name)
        return working(family)

    def recording_gauges(name: str, label_names: tuple[str, ...],
                         samples: Iterable[tuple[Sequence[str], float]]) -> bytes:
        rendered.append(name)
        return working_gauges(name, label_names, samples)

    monkeypatch.setattr("balance_exporter.exposition.sample_lines", recording)
    monkeypatch.setattr("balance_exporter.exposition.gauge_lines", recording_gauges)
    (snapshot,) = [s for s in store.account_snapshots() if s.target.label == "acct-1"]
    # The same rows again in a newer reply: the health lines move, the balances do not.
    store.record_reply("acct-1", BAL, BalanceReply(snapshot.balances.rows,
                                                   1_700_000_000_000_000_999, None),
                       0.02, 1_700_000_999.0)
    assert await fast(cache) == reference_body(store)
    assert "gemini_account_last_success_timestamp_seconds" in rendered
    assert not {"gemini_balance_amount", "gemini_balance_available",
                "gemini_balance_min_available"} & set(rendered)
    # A balance that moved is rendered again, exactly.
    rendered.clear()
    update(store, "acct-1", 1000)  # newer than the reply before
    assert await fast(cache) == reference_body(store)
    assert "gemini_balance_amount" in rendered


async def test_a_large_body_passes_promtool_check_metrics() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: scripts/test.sh installs it")
    body = await fast(ExpositionCache(large_store(200, 20)))
    check = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await check.communicate(body)
    assert check.returncode == 0, output.decode()


@pytest.mark.parametrize(("accept", "openmetrics"), [
    ("", False),
    ("text/plain", False),
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5", True),
    # Prometheus 2.x and 3.x, as sent.
    ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;"
     "version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2", True),
    ("APPLICATION/OpenMetrics-Text; version=1.0.0", True),          # case-insensitive
    ("application/openmetrics-text;q=0,text/plain", False),          # q=0: not acceptable
    ("application/openmetrics-text;q=0.2,text/plain;q=0.9", False),  # the higher q wins
    ("application/openmetrics-text;q=bogus", False),
    ("application/json", False),                                     # nothing we speak: text
    ("*/*", False),                                                  # curl: text
    ("application/openmetrics-text, */*;q=0.1", True),
    ("text/*;q=1, application/*;q=0.5", False),
    ("a/b," * 5000 + "application/openmetrics-text", False),         # past what is read
])
def test_content_negotiation_follows_q_values(accept: str, openmetrics: bool) -> None:
    assert (choose_format(accept) is exposition.OPENMETRICS) is openmetrics


@pytest.mark.parametrize(("accept_encoding", "gzipped"), [
    ("", False), ("gzip", True), ("GZIP", True), ("gzip, deflate, br", True),
    ("gzip;q=0", False), ("gzip;q=0.0, identity", False), ("*", True), ("*;q=0", False),
    ("identity", False), ("deflate, gzip;q=0.001", True), ("x-gzip", True),
    ("gzip;q=0, *;q=1", False),
])
def test_gzip_only_when_acceptable(accept_encoding: str, gzipped: bool) -> None:
    assert accepts_gzip(accept_encoding) is gzipped


def members(body: bytes) -> int:
    """How many gzip members a body is, read as Go's gzip reader does: one after another."""
    count = 0
    while body:
        decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        decoder.decompress(body)
        assert decoder.eof, "a member is cut short"
        body = decoder.unused_data
        count += 1
    return count


async def test_gzip_members_are_compacted_per_group_and_a_change_stays_exact() -> None:
    accounts = 2 * GROUP_ACCOUNTS + 5
    store = large_store(accounts, 20)
    cache = ExpositionCache(store, process_metrics=False)
    first = (await cache.render("", "gzip")).body
    await cache.compacted()
    compact = (await cache.render("", "gzip")).body
    assert gzip.decompress(compact) == gzip.decompress(first) == reference_body(store)
    # Far fewer members (one per family and group of accounts beside the families' headers,
    # which are members of their own in both), and smaller.
    headers = reference_body(store).count(b"# HELP ")
    assert members(compact) - headers < (members(first) - headers) / 10
    assert len(compact) < len(first) / 2
    # One account changes: its group is served from per-account members at once, exact...
    update(store, "acct-40", 99_999)
    changed = (await cache.render("", "gzip")).body
    assert gzip.decompress(changed) == reference_body(store)
    assert members(compact) < members(changed)
    # ...and compacted again in the background.
    await cache.compacted()
    again = (await cache.render("", "gzip")).body
    assert gzip.decompress(again) == reference_body(store)
    assert members(again) == members(compact)


def test_a_member_after_a_failed_compression_holds_its_own_text_only() -> None:
    members = exposition._Members()
    real = members._compressor

    class FailingOnce:
        def compress(self, data: bytes) -> bytes:
            return real.compress(data)  # the text goes in...

        def flush(self, mode: int) -> bytes:
            raise MemoryError("injected")  # ...and never out

    members._compressor = FailingOnce()  # type: ignore[assignment]
    with pytest.raises(MemoryError):
        members.of(b"lost text\n" * 50)
    assert gzip.decompress(members.of(b"kept\n")) == b"kept\n"


async def test_compacted_members_follow_removed_and_reordered_accounts() -> None:
    store = large_store(GROUP_ACCOUNTS + 3, 3)
    cache = ExpositionCache(store, process_metrics=False)
    await cache.render(OPENMETRICS_ACCEPT, "gzip")
    await cache.compacted()
    kept = [snapshot.target for snapshot in store.account_snapshots()][::-3]
    store.configure(kept, [f"key-{k}" for k in range(3)])
    body = (await cache.render(OPENMETRICS_ACCEPT, "gzip")).body
    assert gzip.decompress(body) == reference_body(store, openmetrics=True)
    await cache.compacted()
    body = (await cache.render(OPENMETRICS_ACCEPT, "gzip")).body
    assert gzip.decompress(body) == reference_body(store, openmetrics=True)
    await cache.close()


async def test_the_tail_is_shared_for_a_second_but_follows_every_counter_at_once() -> None:
    store = fixed_store()
    cache = ExpositionCache(store)  # with process metrics, which change all the time
    first = (await cache.render("", "")).body
    assert (await cache.render("", "")).body == first  # within a second: the same tail
    store.record_request("savings")
    cache.counters.http_bad_requests += 1
    after = (await cache.render("", "")).body.decode()
    assert 'gemini_key_requests_total{key="savings"} 4.0' in after
    assert "gemini_exporter_http_bad_requests_total 1.0" in after


async def test_a_compaction_that_fails_is_logged_counted_and_costs_only_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = large_store(GROUP_ACCOUNTS + 1, 3)
    cache = ExpositionCache(store, process_metrics=False)

    def broken(data: bytes) -> bytes:
        raise MemoryError("injected")

    with structlog.testing.capture_logs() as logs:
        await cache.render("", "gzip")  # rendered, and its compaction started
        # Every compression fails from here on, on the event loop and in the thread alike.
        monkeypatch.setattr("balance_exporter.exposition._gzip_member", broken)
        await cache.compacted()
    monkeypatch.undo()
    assert cache.counters.collect_errors == 1
    assert [entry["event"] for entry in logs] == ["compacting the gzip body failed"]
    cache.counters.collect_errors = 0  # the reference counts no errors of its own
    body = (await cache.render("", "gzip")).body
    assert gzip.decompress(body) == reference_body(store)


async def test_a_tail_older_than_its_age_limit_is_rendered_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = ExpositionCache(fixed_store(), process_metrics=False)
    renders: list[int] = []
    original = exposition._TailCollector.collect

    def counting(collector: exposition._TailCollector) -> Iterable[Metric]:
        renders.append(1)
        return original(collector)

    monkeypatch.setattr(exposition._TailCollector, "collect", counting)
    await cache.render("", "")
    await cache.render("", "")
    shared = len(renders)
    monkeypatch.setattr("balance_exporter.exposition.TAIL_MAX_AGE_SECONDS", -1.0)
    await cache.render("", "")
    assert len(renders) == shared + 1  # just past the limit: the tail alone is rendered again


async def test_a_poll_that_moved_no_balance_keeps_the_big_families_compacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = large_store(2 * GROUP_ACCOUNTS, 20)
    cache = ExpositionCache(store, process_metrics=False)
    await cache.render("", "gzip")
    await cache.compacted()
    original = exposition._gzip_member

    async def bytes_compacted_after(change: Callable[[], None]) -> int:
        change()
        body = (await cache.render("", "gzip")).body
        assert gzip.decompress(body) == reference_body(store)
        compressed: list[int] = []

        def counting(data: bytes) -> bytes:
            compressed.append(len(data))
            return original(data)

        monkeypatch.setattr("balance_exporter.exposition._gzip_member", counting)
        await cache.compacted()
        monkeypatch.setattr("balance_exporter.exposition._gzip_member", original)
        assert gzip.decompress((await cache.render("", "gzip")).body) == reference_body(store)
        return sum(compressed)

    # A failed poll: its counters and health change, its balances do not. Only its group's few
    # one-line families (polls, errors, up, duration) are compressed again, not the balance
    # families of twenty lines an account.
    failed_poll = await bytes_compacted_after(
        lambda: store.record_failure("acct-3", BAL, "Timeout", 0.2))
    moved = await bytes_compacted_after(lambda: update(store, "acct-40", 12_345))
    assert 0 < failed_poll * 10 < moved


async def test_changed_accounts_are_rendered_in_the_background_between_scrapes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("balance_exporter.exposition.BACKGROUND_RENDER_SECONDS", 0.01)
    store = large_store(10, 3)
    cache = ExpositionCache(store, process_metrics=False)
    await fast(cache)
    rendered = rendered_labels(cache, monkeypatch)
    cache.start()
    try:
        update(store, "acct-4", 77)
        async def rendered_some() -> bool:
            return bool(rendered)

        await wait_until(rendered_some, "the background render")
        assert rendered == ["acct-4"]
        assert await fast(cache) == reference_body(store)
        assert rendered == ["acct-4"]  # the scrape found it rendered
    finally:
        await cache.close()


@pytest.mark.parametrize("gzipped", [False, True], ids=["text", "gzip"])
async def test_a_scrape_behind_many_changes_is_answered_with_the_last_body_and_never_renders(
    monkeypatch: pytest.MonkeyPatch, gzipped: bool,
) -> None:
    store = large_store(20, 3)
    # Its pass will not come round during the test.
    async with with_background_pass(monkeypatch, 3600.0, store) as cache:
        last = await fast(cache, gzipped=gzipped)
        assert last == reference_body(store)
        rendered = rendered_labels(cache, monkeypatch)
        # As many changes as a scrape renders itself: it does, and is exact.
        for index in range(exposition.SCRAPE_RENDER_ACCOUNTS):
            update(store, f"acct-{index}", 1_000 + index, 3)
        last = await fast(cache, gzipped=gzipped)
        assert last == reference_body(store)
        assert len(rendered) == exposition.SCRAPE_RENDER_ACCOUNTS
        # One more than that: the scrape is the last body, rendering nothing.
        rendered.clear()
        for index in range(exposition.SCRAPE_RENDER_ACCOUNTS + 1):
            update(store, f"acct-{index}", 2_000 + index, 3)
        assert await fast(cache, gzipped=gzipped) == last != reference_body(store)
        assert rendered == []


async def test_after_a_reload_that_shrinks_the_set_a_scrape_renders_and_never_serves_the_old_body(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = large_store(20, 3)
    async with with_background_pass(monkeypatch, 3600.0, store) as cache:
        await fast(cache, gzipped=True)  # the last body: twenty accounts
        for index in range(exposition.SCRAPE_RENDER_ACCOUNTS + 1):
            update(store, f"acct-{index}", 4_000 + index, 3)
        # Behind more changes than a scrape renders, and then a reload keeps three accounts.
        store.configure([snapshot.target for snapshot in store.account_snapshots()][:3],
                        [f"key-{k}" for k in range(3)])
        body = await fast(cache, gzipped=True)
        assert body == reference_body(store)
        assert b'account="acct-19"' not in body


@pytest.mark.parametrize(("past_the_bound", "made_again"), [(-1.0, True), (1.0, False)])
async def test_the_pass_makes_again_only_the_bodies_scraped_within_publish_seconds(
    monkeypatch: pytest.MonkeyPatch, past_the_bound: float, made_again: bool,
) -> None:
    store = large_store(20, 3)
    async with with_background_pass(monkeypatch, 0.001, store) as cache:
        old = await fast(cache)  # a text scrape, and its body published
        variant = (exposition.TEXT_TYPE, False)
        cache._scraped[variant] = (time.monotonic() - exposition.PUBLISH_SECONDS
                                   - past_the_bound)
        update(store, "acct-1", 5_000, 3)

        async def rendered() -> bool:  # the pass after the change came round, and ended
            return cache._store_version == store.accounts_version and not cache._lock.locked()

        await wait_until(rendered, "the pass after the change")
        assert (cache._published[variant] != old) is made_again


async def test_the_background_pass_makes_the_scraped_bodies_again_after_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = large_store(20, 3)
    async with with_background_pass(monkeypatch, 0.001, store) as cache:
        await fast(cache, gzipped=True)
        for index in range(exposition.SCRAPE_RENDER_ACCOUNTS + 1):
            update(store, f"acct-{index}", 3_000 + index, 3)

        async def made_again() -> bool:  # the last body is the new one
            last = cache._published.get((exposition.TEXT_TYPE, True))
            return last is not None and gzip.decompress(last) == reference_body(store)

        await wait_until(made_again, "the body made again by the background pass")
        assert await fast(cache, gzipped=True) == reference_body(store)


async def test_an_idle_exporter_renders_nothing_and_its_pass_does_not_wake(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = large_store(5, 3)
    # The parts the scrape left stale would wake it once, to compact them: not during the test.
    monkeypatch.setattr("balance_exporter.exposition.COMPACTION_SHARE", 1e-9)
    async with with_background_pass(monkeypatch, 0.001, store) as cache:
        passes: list[int] = []
        original = cache._refresh

        async def counting(slices: Slices) -> None:
            passes.append(1)
            await original(slices)

        monkeypatch.setattr(cache, "_refresh", counting)
        await fast(cache, gzipped=True)
        await asyncio.sleep(0.1)  # a hundred pass intervals
        before = len(passes)
        await asyncio.sleep(0.2)
        assert len(passes) == before  # nothing changed: no pass came round
        update(store, "acct-1", 7, 3)

        async def passed() -> bool:
            return len(passes) > before

        await wait_until(passed, "a pass after a change")


async def test_a_background_render_that_fails_is_counted_and_logged_once_in_a_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("balance_exporter.exposition.BACKGROUND_RENDER_SECONDS", 0.001)
    store = large_store(3, 2)
    cache = ExpositionCache(store, process_metrics=False)

    async def broken(slices: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(cache, "_refresh", broken)
    with structlog.testing.capture_logs() as logs:
        cache.start()
        async def failed_thrice() -> bool:
            update(store, "acct-1", cache.counters.collect_errors)  # a pass follows a change
            return cache.counters.collect_errors >= 3

        await wait_until(failed_thrice, "three failed background passes")
        await cache.close()
    assert cache.counters.collect_errors >= 3
    assert [entry["event"] for entry in logs] == ["rendering accounts in the background failed"]


@pytest.mark.parametrize("over_the_bound", [False, True], ids=["at", "just-past"])
async def test_parts_up_to_the_inline_bound_are_compacted_on_the_loop_larger_ones_in_a_thread(
    monkeypatch: pytest.MonkeyPatch, over_the_bound: bool,
) -> None:
    store = large_store(3, 20)
    cache = ExpositionCache(store, process_metrics=False)
    await cache.render("", "gzip")
    await cache.compacted()

    def parts() -> list[bytes]:
        return [b"".join(fragments.text[family] for fragments in cache._accounts.values())
                for family in range(cache._family_count)]

    before = parts()
    update(store, "acct-1", 4_242)  # the balance families of the only group change
    await cache.render("", "gzip")  # rendered; its compaction starts at the next await
    largest = max(len(after) for after, old in zip(parts(), before, strict=True)
                  if after != old)
    monkeypatch.setattr("balance_exporter.exposition.INLINE_COMPACTION_BYTES",
                        largest - 1 if over_the_bound else largest)
    threaded: list[int] = []
    original = exposition._gzip_members

    def in_a_thread(texts: list[list[bytes]]) -> tuple[bytes, ...]:
        threaded.extend(len(b"".join(family)) for family in texts)
        return original(texts)

    monkeypatch.setattr("balance_exporter.exposition._gzip_members", in_a_thread)
    await cache.compacted()
    # Only parts over the bound went to the thread: the largest ones, one past it.
    assert set(threaded) == ({largest} if over_the_bound else set())
    assert gzip.decompress((await cache.render("", "gzip")).body) == reference_body(store)


async def wait_compacted(cache: ExpositionCache, first: bytes, what: str) -> None:
    """Wait until `cache`'s gzip body is in compacted members: less than half `first`, a body of
    the accounts' own members."""
    async def compacted() -> bool:
        return len((await cache.render("", "gzip")).body) < len(first) / 2

    await wait_until(compacted, what)


async def test_a_gzip_scrape_compacts_after_itself_without_the_background_pass() -> None:
    cache = ExpositionCache(large_store(GROUP_ACCOUNTS + 1, 20), process_metrics=False)
    first = (await cache.render("", "gzip")).body
    await wait_compacted(cache, first, "the compaction the scrape started")
    await cache.close()


@contextlib.asynccontextmanager
async def with_background_pass(
    monkeypatch: pytest.MonkeyPatch, every_seconds: float, store: BalanceStore | None = None,
) -> AsyncIterator[ExpositionCache]:
    """A cache of `store` (by default two groups of accounts) whose background pass comes round
    `every_seconds` after a change, closed afterwards."""
    monkeypatch.setattr("balance_exporter.exposition.BACKGROUND_RENDER_SECONDS", every_seconds)
    cache = ExpositionCache(store or large_store(GROUP_ACCOUNTS + 1, 20), process_metrics=False)
    cache.start()
    try:
        yield cache
    finally:
        await cache.close()


async def test_with_the_background_pass_a_scrape_leaves_compaction_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pass does not come round during the test: what is compacted, the scrape compacted.
    async with with_background_pass(monkeypatch, 3600.0) as cache:
        first = (await cache.render("", "gzip")).body
        await asyncio.sleep(0.05)  # time enough for a compaction on the loop to start
        assert (await cache.render("", "gzip")).body == first  # nothing was compacted


async def test_the_background_pass_compacts_what_a_gzip_scrape_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with with_background_pass(monkeypatch, 0.01) as cache:
        first = (await cache.render("", "gzip")).body
        await wait_compacted(cache, first, "the background pass's compaction")
        assert (gzip.decompress((await cache.render("", "gzip")).body)
                == reference_body(cache.store))


async def test_after_a_round_of_compaction_the_next_waits_for_compaction_s_share_of_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A share so small that the wait after the first round outlasts the test.
    monkeypatch.setattr("balance_exporter.exposition.COMPACTION_SHARE", 1e-9)
    async with with_background_pass(monkeypatch, 0.001) as cache:
        first = (await cache.render("", "gzip")).body
        await wait_compacted(cache, first, "the first round, which nothing waits for")
        compact = (await cache.render("", "gzip")).body
        update(cache.store, "acct-1", 5)
        changed = (await cache.render("", "gzip")).body
        assert len(changed) > len(compact)
        await asyncio.sleep(0.1)  # a hundred passes came round, none compacted the part
        assert (await cache.render("", "gzip")).body == changed
        monkeypatch.setattr("balance_exporter.exposition.COMPACTION_SHARE", 1.0)
        update(cache.store, "acct-1", 6)  # the next pass: compaction may go on at once

        async def compacted_again() -> bool:
            return len((await cache.render("", "gzip")).body) <= len(compact) * 1.01

        await wait_until(compacted_again, "the round once compaction's share allows it")


@pytest.mark.parametrize("meanwhile", ["changed-again", "group-removed"])
async def test_a_part_that_changes_while_its_group_is_compressed_is_never_served_old(
    monkeypatch: pytest.MonkeyPatch, meanwhile: str,
) -> None:
    store = large_store(GROUP_ACCOUNTS + 2, 20)
    cache = ExpositionCache(store, process_metrics=False)
    await cache.render("", "gzip")
    await cache.compacted()
    monkeypatch.setattr("balance_exporter.exposition.INLINE_COMPACTION_BYTES", 0)  # all threaded
    in_thread, release = threading.Event(), threading.Event()
    original = exposition._gzip_members

    def held(texts: list[list[bytes]]) -> tuple[bytes, ...]:
        in_thread.set()
        release.wait(15)
        return original(texts)

    monkeypatch.setattr("balance_exporter.exposition._gzip_members", held)
    update(store, f"acct-{GROUP_ACCOUNTS + 1}", 1)  # in the second group
    await cache.render("", "gzip")
    compacting = asyncio.ensure_future(cache.compacted())
    assert await asyncio.to_thread(in_thread.wait, 15)
    # While the thread compresses the group's lines of the first change:
    if meanwhile == "changed-again":
        update(store, f"acct-{GROUP_ACCOUNTS + 1}", 2)
    else:
        store.configure([snapshot.target for snapshot in store.account_snapshots()][:3],
                        [f"key-{k}" for k in range(3)])
    exact = reference_body(store)
    assert gzip.decompress((await cache.render("", "gzip")).body) == exact
    release.set()
    await compacting
    assert cache.counters.collect_errors == 0
    assert gzip.decompress((await cache.render("", "gzip")).body) == exact


# One step of a random history of the account set: (what, which account, a seed for values).
Step = tuple[str, int, int]
STEPS = st.lists(st.tuples(st.sampled_from(["add", "remove", "rename", "change", "compact",
                                            "shrink", "grow"]),
                           st.integers(0, 79), st.integers(0, 10**6)), max_size=25)


async def replay_against_the_reference(steps: list[Step], start: int) -> None:
    store = large_store(start, 2)
    cache = ExpositionCache(store, process_metrics=False)
    names = {f"acct-{i}": f"a{i}" for i in range(start)}
    try:
        assert await fast(cache, gzipped=True) == reference_body(store)
        for what, number, seed in steps:
            label = f"acct-{number}"
            if what == "compact":
                await cache.compacted()
                continue
            if what == "change" and label in names:
                update(store, label, seed, 2)
                continue
            targets = [snapshot.target for snapshot in store.account_snapshots()]
            if what == "add" and label not in names:
                names[label] = f"a{number}"
                targets.insert(seed % (len(targets) + 1),
                               AccountTarget(label, "key-0", names[label], False, 30.0))
            elif what == "shrink":  # to any size: across multiples of GROUP_ACCOUNTS too
                targets = targets[:seed % (len(targets) + 1)]
                names = {target.label: names[target.label] for target in targets}
            elif what == "grow":
                for extra in range(seed % 70):
                    added = f"acct-g{number}-{extra}"
                    if added not in names:
                        names[added] = added
                        targets.append(AccountTarget(added, "key-1", added, True, 30.0))
            elif what == "remove":
                names.pop(label, None)
                targets = [target for target in targets if target.label != label]
            elif what == "rename" and label in names:
                renamed = f"{label}-r{seed}"
                names[renamed] = names.pop(label)
                targets = [AccountTarget(renamed, "key-0", names[renamed], False, 30.0)
                           if target.label == label else target for target in targets]
            store.configure(targets, ["key-0", "key-1", "key-2"])
            if seed % 2 and names:  # a change right after the set changed, as in the report
                update(store, next(iter(names)), seed, 2)
            for openmetrics in (False, True):
                expected = reference_body(store, openmetrics)
                assert await fast(cache, openmetrics) == expected
                assert await fast(cache, openmetrics, gzipped=True) == expected
    finally:
        await cache.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=STEPS, start=st.sampled_from([0, 1, 20, 32, 33, 40, 64, 65]))
@example(steps=[("shrink", 0, 21)], start=40)  # the red team's: 40 accounts to 21, one changed
def test_any_history_of_adds_removals_renames_and_changes_renders_as_the_library(
        steps: list[Step], start: int) -> None:
    asyncio.run(replay_against_the_reference(steps, start))


async def test_gzip_scrapes_stay_exact_after_the_set_shrinks_below_a_group_multiple() -> None:
    """The red team's case: 40 accounts become 20, one of them changes, Prometheus asks for gzip."""
    store = large_store(40, 3)
    cache = ExpositionCache(store, process_metrics=False)
    await fast(cache, gzipped=True)
    store.configure([snapshot.target for snapshot in store.account_snapshots()][:20],
                    ["key-0", "key-1", "key-2"])
    update(store, "acct-3", 77)
    assert await fast(cache, gzipped=True) == reference_body(store)
    assert cache.counters.collect_errors == 0
