"""`--storage.path`: stamps survive a restart, and a file that cannot be used never stops one."""

import json
import os
import stat
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
import structlog

from balance_exporter.config import build_config
from balance_exporter.ledger import SavedAccount
from balance_exporter.metrics import ExporterCounters
from balance_exporter.server import WebOptions
from balance_exporter.service import Service
from balance_exporter.simulator.server import RunningSimulator
from balance_exporter.storage import STATE_FILE_NAME, StatePersister, load_state, save_state
from balance_exporter.store import BalanceStore
from balance_exporter.targets import AccountTarget
from balance_exporter.transfers import MAX_PENDING_TRANSFERS, PendingTransfer, TransfersCursor
from tests.conftest import LOOPBACK_ANY_PORT
from tests.helpers import add_fault, all_polled, exporter_document, sample, scrape, wait_until

NOW_NS = 1_800_000_000 * 10**9
# Version 1 and 2 files name keys; the loader translates names to API key identities.
KEY_IDS = {"treasury": "id-treasury"}
DIGEST = "0123456789abcdef0123456789abcdef"
STAMPS = [SavedAccount("treasury", "alpha", {"balances": NOW_NS - 10**9}),
          SavedAccount("solo", None, {"balances": NOW_NS - 2 * 10**9}, gone_since=1.8e9),
          SavedAccount("treasury", "beta", {"approved_addresses/bitcoin": NOW_NS - 10**9},
                       allow_lists={"bitcoin": {DIGEST: ("group", "pending_time")},
                                    "ethereum": {}}),
          SavedAccount("treasury", "gamma", {}, transfers=TransfersCursor(
              1_700_000_000_000, frozenset({5, 6}), (
                  PendingTransfer(4, "withdrawal", "ETH", Decimal("0.000000000000000001"),
                                  1_699_000_000_000),), rechecks=3, last_was_recheck=True))]


def test_stamps_round_trip_through_an_owner_only_file(tmp_path: Path) -> None:
    save_state(tmp_path / "state", STAMPS)
    path = tmp_path / "state" / STATE_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_state(tmp_path / "state", NOW_NS, 300, KEY_IDS) == STAMPS
    assert [p.name for p in (tmp_path / "state").iterdir()] == [STATE_FILE_NAME]  # no temp left


@pytest.mark.parametrize("content", [
    b"{not json", b"[]", b'{"version": 5, "stamps": []}', b'{"version": 1, "accounts": []}',
    b'{"version": 3, "stamps": {}}', b"\xff\xfe", b"[" * 100_000,
], ids=["not json", "a list", "another version", "accounts a list", "stamps a mapping",
        "not utf-8", "deep"])
def test_a_corrupt_file_is_a_warning_and_a_clean_start(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATE_FILE_NAME).write_bytes(content)
    with structlog.testing.capture_logs() as logs:
        assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == []
    assert [entry["event"] for entry in logs] == ["saved state unreadable, starting clean"]


def test_an_unreadable_file_is_a_warning_and_a_clean_start(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE_NAME).mkdir()  # readable by nobody as a file, root included
    with structlog.testing.capture_logs() as logs:
        assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == []
    assert logs[0]["log_level"] == "warning"


def test_no_file_yet_is_a_clean_start(tmp_path: Path) -> None:
    assert load_state(tmp_path / "new", NOW_NS, 300, KEY_IDS) == []


def test_saved_accounts_from_the_future_are_dropped(tmp_path: Path) -> None:
    future = SavedAccount("treasury", "beta", {"balances": NOW_NS + 10**12})
    save_state(tmp_path, [*STAMPS, future])
    with structlog.testing.capture_logs() as logs:
        assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == STAMPS
    assert logs[0]["ignored"] == 1
    assert future in load_state(tmp_path, NOW_NS, 0, KEY_IDS)  # 0 turns the skew check off


async def test_after_a_restart_a_stale_first_reply_is_ignored(
    tmp_path: Path, http: aiohttp.ClientSession, simulator: RunningSimulator
) -> None:
    config = build_config(exporter_document(simulator.url), {})
    storage = tmp_path / "storage"
    first = Service(config, None, WebOptions(listen_address=LOOPBACK_ANY_PORT),
                    storage_path=storage)
    await first.start()
    await all_polled(http, first)
    await first.stop()
    saved = json.loads((storage / STATE_FILE_NAME).read_text())["stamps"]
    # delta's replies carry no stamp
    assert {entry["account"] for entry in saved} == {"alpha", "beta", "gamma"}

    await add_fault(http, simulator, "alpha", {"kind": "stale", "count": 1})
    second = Service(config, None, WebOptions(listen_address=LOOPBACK_ANY_PORT),
                     storage_path=storage)
    await second.start()
    try:
        async def first_reply_judged() -> bool:
            samples = await scrape(http, second.url)
            # The stale reply carries amounts a million higher: it must never show.
            amount = sample(samples, "gemini_balance_amount", account="alpha", currency="BTC")
            assert amount is None or amount < 1000
            return sample(samples, "gemini_account_stale_replies_total", account="alpha") == 1

        await wait_until(first_reply_judged, what="the stale first reply to be ignored")
        await wait_until(lambda: _has_fresh_btc(http, second), what="a fresh reply after it")
    finally:
        await second.stop()


async def _has_fresh_btc(http: aiohttp.ClientSession, service: Service) -> bool:
    samples = await scrape(http, service.url)
    return sample(samples, "gemini_balance_amount", account="alpha", currency="BTC") == 5.12345678


def test_a_state_file_past_64_mib_is_not_read(tmp_path: Path) -> None:
    save_state(tmp_path, STAMPS)
    path = tmp_path / STATE_FILE_NAME
    with path.open("r+b") as file:  # sparse: no 64 MiB written
        file.truncate(64 * 1024 * 1024)
    with structlog.testing.capture_logs() as logs:
        assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == []  # at the bound: read (and corrupt)
    assert "larger than" not in str(logs)
    with path.open("r+b") as file:
        file.truncate(64 * 1024 * 1024 + 1)
    with structlog.testing.capture_logs() as logs:
        assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == []
    assert "larger than" in str(logs[0]["error"])


def test_a_file_planted_where_a_temporary_file_could_be_is_never_written(
        tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("not the exporter's")
    victim.chmod(0o644)
    (tmp_path / f".{STATE_FILE_NAME}.tmp").symlink_to(victim)  # the old fixed name
    leftover = tmp_path / f".{STATE_FILE_NAME}.left.tmp"
    leftover.write_text("half a state file")
    save_state(tmp_path, STAMPS)
    assert victim.read_text() == "not the exporter's"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / STATE_FILE_NAME).stat().st_mode) == 0o600
    assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == STAMPS
    # Nothing of its own is left beside the file; what others left is theirs.
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [STATE_FILE_NAME, victim.name, f".{STATE_FILE_NAME}.tmp", leftover.name])


def test_a_version_2_file_is_still_read_its_key_names_as_identities(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE_NAME).write_text(json.dumps({"version": 2, "accounts": {
        "alpha": {"key": "treasury", "account": "alpha",
                  "server_timestamps_ns": {"balances": 5, "staking": 7}},
        "gone": {"key": "no-longer-configured", "account": "gone",
                 "server_timestamps_ns": {"balances": 5}}}}))
    assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == [
        SavedAccount("id-treasury", "alpha", {"balances": 5, "staking": 7})]


@pytest.mark.parametrize("stamp", ["1e400", "-1", "true", "1.5", '"5"', str(2**63), "null"])
def test_an_entry_with_a_stamp_that_is_no_stamp_is_dropped_with_a_warning(
        tmp_path: Path, stamp: str) -> None:
    entries = [{"key": "treasury", "account": "alpha",
                "server_timestamps_ns": {"balances": 5}, "gone_since": None}]
    text = json.dumps({"version": 3, "stamps": entries})
    odd = text.replace('"stamps": [', '"stamps": [{"key": "k", "account": null, '
                       f'"server_timestamps_ns": {{"balances": {stamp}}}}}, ')
    (tmp_path / STATE_FILE_NAME).write_text(odd)
    with structlog.testing.capture_logs() as logs:
        assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == [
            SavedAccount("treasury", "alpha", {"balances": 5})]
    assert logs[0]["ignored"] == 1


def test_the_largest_stamp_there_can_be_is_read(tmp_path: Path) -> None:
    largest = [SavedAccount("treasury", "alpha", {"balances": 2**63 - 1})]
    save_state(tmp_path, largest)
    assert load_state(tmp_path, NOW_NS, 0, KEY_IDS) == largest


@pytest.mark.parametrize("kind", ["a device", "a fifo", "a directory"])
def test_a_state_file_that_is_no_regular_file_is_not_read(tmp_path: Path, kind: str) -> None:
    """A symlink to /dev/zero would be read for ever, a FIFO would hang the start."""
    path = tmp_path / STATE_FILE_NAME
    if kind == "a device":
        path.symlink_to("/dev/zero")
    elif kind == "a fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with structlog.testing.capture_logs() as logs:
        assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == []
    assert [entry["event"] for entry in logs] == ["saved state unreadable, starting clean"]


async def test_a_failed_save_is_logged_counted_and_retried(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the state directory should be")
    store = BalanceStore(STAMPS)
    store.configure([AccountTarget("alpha", "treasury", "alpha", False, 30.0)], ["treasury"])
    counters = ExporterCounters()
    persister = StatePersister(store, blocked, counters.count_state_save_error)
    with structlog.testing.capture_logs() as logs:
        await persister.save_if_changed()
        await persister.save_if_changed()  # not saved, so still changed: tried again
    assert counters.state_save_errors == 2
    assert [entry["event"] for entry in logs] == [
        "saving state failed; it is kept in memory and saved again later"] * 2


def test_an_account_with_allow_lists_and_no_stamps_round_trips(tmp_path: Path) -> None:
    lists_only = [SavedAccount("treasury", "gamma", {}, allow_lists={"solana": {}})]
    save_state(tmp_path, lists_only)
    assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == lists_only


@pytest.mark.parametrize("allow_lists", [
    [], {"Bitcoin": {}}, {"bitcoin": []}, {"bitcoin": {"not-a-digest": ["account", "active"]}},
    {"bitcoin": {DIGEST: ["account"]}}, {"bitcoin": {DIGEST: ["team", "active"]}},
    {"bitcoin": {DIGEST: ["account", "pending-time"]}}, {"bitcoin": {DIGEST: [["a"], "active"]}},
], ids=["a list", "upper case", "entries a list", "no digest", "no status", "unknown scope",
        "Gemini's spelling", "a list for a scope"])
def test_an_entry_with_allow_lists_this_exporter_never_writes_is_dropped(
        tmp_path: Path, allow_lists: object) -> None:
    good = {"key": "treasury", "account": "alpha", "server_timestamps_ns": {"balances": 5}}
    (tmp_path / STATE_FILE_NAME).write_text(json.dumps({"version": 4, "stamps": [
        good, {**good, "account": "beta", "approved_addresses": allow_lists}]}))
    with structlog.testing.capture_logs() as logs:
        assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == [
            SavedAccount("treasury", "alpha", {"balances": 5})]
    assert logs[0]["ignored"] == 1


def test_a_version_3_file_is_still_read(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE_NAME).write_text(json.dumps({"version": 3, "stamps": [
        {"key": "treasury", "account": "alpha", "server_timestamps_ns": {"balances": 5},
         "gone_since": None}]}))
    assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == [
        SavedAccount("treasury", "alpha", {"balances": 5})]


GOOD_CURSOR = {"newest_ms": 5, "at_newest": [1], "rechecks": 0, "last_was_recheck": False,
               "pending": [[1, "withdrawal", "BTC", "0.5", 5]]}


@pytest.mark.parametrize("cursor", [
    [], {**GOOD_CURSOR, "newest_ms": -1}, {**GOOD_CURSOR, "at_newest": [True]},
    {**GOOD_CURSOR, "pending": [[1, "gift", "BTC", "0.5", 5]]},
    {**GOOD_CURSOR, "pending": [[1, "withdrawal", "btc", "0.5", 5]]},
    {**GOOD_CURSOR, "pending": [[1, "withdrawal", "BTC", "-0.5", 5]]},
    {**GOOD_CURSOR, "pending": [[1, "withdrawal", "BTC", "1e3", 5]]},
    {**GOOD_CURSOR, "pending": [[1, "withdrawal", "BTC", "0.5"]]},
    {**GOOD_CURSOR, "pending": [[1, "withdrawal", "BTC", "0.5", 5]] * (MAX_PENDING_TRANSFERS + 1)},
    {**GOOD_CURSOR, "last_was_recheck": 0},
], ids=["a list", "negative time", "a flag for an id", "unknown type", "lower-case currency",
        "negative amount", "an exponent", "a field short", "past the bound", "a number flag"])
def test_an_entry_with_a_transfers_cursor_this_exporter_never_writes_is_dropped(
        tmp_path: Path, cursor: object) -> None:
    good = {"key": "treasury", "account": "alpha", "server_timestamps_ns": {},
            "transfers": GOOD_CURSOR}
    (tmp_path / STATE_FILE_NAME).write_text(json.dumps({"version": 4, "stamps": [
        good, {**good, "account": "beta", "transfers": cursor}]}))
    with structlog.testing.capture_logs() as logs:
        (kept,) = load_state(tmp_path, NOW_NS, 300, KEY_IDS)
    assert kept.gemini_account == "alpha"
    assert kept.transfers == TransfersCursor(5, frozenset({1}), (
        PendingTransfer(1, "withdrawal", "BTC", Decimal("0.5"), 5),))
    assert logs[0]["ignored"] == 1


def test_a_cursor_at_the_pending_bound_is_read(tmp_path: Path) -> None:
    pending = tuple(PendingTransfer(i, "deposit", "USD", Decimal(1), i)
                    for i in range(MAX_PENDING_TRANSFERS))
    saved = [SavedAccount("treasury", "alpha", {}, transfers=TransfersCursor(9, pending=pending))]
    save_state(tmp_path, saved)
    assert load_state(tmp_path, NOW_NS, 300, KEY_IDS) == saved
