"""The transfers cursor and re-check rules with plain numbers: what to ask next, and what a page
means (counted once, gaps, pending settled or gone, the baseline, the bounds)."""

import json
from decimal import Decimal

import pytest

from balance_exporter.gemini.errors import MalformedReply
from balance_exporter.gemini.replies import ReplyRules, Transfer, parse_transfers
from balance_exporter.precision import Precision
from balance_exporter.targets import TRANSFERS_PAGE_ROWS
from balance_exporter.transfers import (
    MAX_IDS_AT_NEWEST,
    MAX_PENDING_TRANSFERS,
    PageOutcome,
    PendingTransfer,
    TransfersCursor,
    TransfersQuery,
    apply_page,
    next_query,
    pending_of,
)

LOOKBACK_MS = 7 * 86_400_000
NOW_MS = 1_800_000_000_000


def row(eid: int, at: int, status: str = "Complete", kind: str = "withdrawal",
        currency: str = "BTC", amount: str = "1") -> Transfer:
    return Transfer(eid, kind, status, at, currency, Decimal(amount))


def test_the_first_poll_looks_back_and_counts_only_what_is_pending() -> None:
    query = next_query(None, NOW_MS, LOOKBACK_MS)
    assert query == TransfersQuery(NOW_MS - LOOKBACK_MS, baseline=True)
    start = query.after_ms
    old, held = row(1, start + 1000), row(2, start + 2000, "Pending")
    cursor, outcome = apply_page(None, query, (held, old))
    assert outcome == PageOutcome(new=(held,))
    assert cursor == TransfersCursor(start + 2000, frozenset({2}), (pending_of(held),))
    # Nothing in the look-back: the next poll starts where it looked from, not again at "now".
    empty, _ = apply_page(None, query, ())
    assert empty.newest_ms == NOW_MS - LOOKBACK_MS + 1
    assert next_query(empty, NOW_MS + 5000, LOOKBACK_MS) == TransfersQuery(NOW_MS - LOOKBACK_MS)


def test_a_poll_asks_from_the_newest_millisecond_and_counts_each_transfer_once() -> None:
    cursor = TransfersCursor(5000, frozenset({7}))
    assert next_query(cursor, NOW_MS, LOOKBACK_MS) == TransfersQuery(4999)
    # 7 again (same millisecond), 8 new at that millisecond, 9 newer.
    cursor, outcome = apply_page(cursor, TransfersQuery(4999),
                                 (row(9, 6000), row(8, 5000), row(7, 5000)))
    assert [transfer.eid for transfer in outcome.new] == [9, 8]
    assert (cursor.newest_ms, cursor.at_newest) == (6000, frozenset({9}))
    cursor, outcome = apply_page(cursor, TransfersQuery(5999), (row(9, 6000),))
    assert outcome.new == ()


@pytest.mark.parametrize(("rows", "gap"), [
    (TRANSFERS_PAGE_ROWS - 1, False),  # not full: everything after the time asked is there
    (TRANSFERS_PAGE_ROWS, True),  # full, and its oldest row is newer than the cursor
])
def test_a_full_page_that_does_not_reach_back_is_a_gap(rows: int, gap: bool) -> None:
    page = tuple(row(100 + i, 6000 + i) for i in range(rows))
    cursor, outcome = apply_page(TransfersCursor(5000), TransfersQuery(4999), page)
    assert outcome.gap is gap
    assert len(outcome.new) == rows
    assert cursor.newest_ms == 6000 + rows - 1


def test_a_full_page_that_reaches_the_cursor_is_no_gap() -> None:
    page = (*(row(100 + i, 6000 + i) for i in range(TRANSFERS_PAGE_ROWS - 1)), row(7, 5000))
    _, outcome = apply_page(TransfersCursor(5000, frozenset({7})), TransfersQuery(4999), page)
    assert not outcome.gap


def test_pending_transfers_are_rechecked_in_turn_with_the_polls() -> None:
    cursor = TransfersCursor(9000, pending=(
        PendingTransfer(1, "withdrawal", "BTC", Decimal("1.0"), 3000),
        PendingTransfer(2, "withdrawal", "USD", Decimal("5.0"), 4000),
        PendingTransfer(3, "deposit", "BTC", Decimal("2.0"), 2000)))
    asked = []
    for _ in range(4):
        query = next_query(cursor, NOW_MS, LOOKBACK_MS)
        asked.append((query.currency, query.after_ms))
        cursor, _ = apply_page(cursor, query, tuple(
            row(transfer.eid, transfer.timestamp_ms, "Pending", transfer.type,
                transfer.currency) for transfer in cursor.pending
            if query.currency in (None, transfer.currency)))
    # Re-checks of BTC (from its oldest) and USD, each after a poll.
    assert asked == [("BTC", 1999), (None, 8999), ("USD", 3999), (None, 8999)]
    assert len(cursor.pending) == 3


def test_a_recheck_settles_a_completed_transfer_and_drops_one_no_longer_listed() -> None:
    held = PendingTransfer(1, "withdrawal", "BTC", Decimal("1.0"), 3000)
    cancelled = PendingTransfer(2, "withdrawal", "BTC", Decimal("2.0"), 3500)
    other = PendingTransfer(3, "withdrawal", "USD", Decimal("2.0"), 3600)
    cursor = TransfersCursor(9000, pending=(held, cancelled, other))
    query = next_query(cursor, NOW_MS, LOOKBACK_MS)
    assert query == TransfersQuery(2999, "BTC")
    cursor, outcome = apply_page(cursor, query, (row(1, 3000, "Complete"),))
    assert outcome == PageOutcome(settled=(held,), gone=(cancelled,))
    assert cursor.pending == (other,)  # another currency's is not decided by this page


def test_a_full_recheck_page_decides_nothing_older_than_its_oldest_row() -> None:
    held = PendingTransfer(1, "withdrawal", "BTC", Decimal("1.0"), 3000)
    missing_newer = PendingTransfer(2, "withdrawal", "BTC", Decimal("1.0"), 8000)
    cursor = TransfersCursor(9000, pending=(held, missing_newer))
    page = tuple(row(100 + i, 5000 + i) for i in range(TRANSFERS_PAGE_ROWS))
    cursor, outcome = apply_page(cursor, TransfersQuery(2999, "BTC"), page)
    # The page covers 5000..5049: transfer 2 (8000) would have been in it, 1 (3000) might not.
    assert outcome == PageOutcome(gone=(missing_newer,))
    assert cursor.pending == (held,)


def test_a_poll_also_settles_pending_transfers_it_lists() -> None:
    held = PendingTransfer(1, "withdrawal", "BTC", Decimal("1.0"), 5000)
    cursor = TransfersCursor(5000, frozenset({1}), (held,), last_was_recheck=True)
    cursor, outcome = apply_page(cursor, TransfersQuery(4999), (row(1, 5000, "Advanced"),))
    assert outcome == PageOutcome(settled=(held,))
    assert cursor.pending == ()


@pytest.mark.parametrize("extra", [0, 1])
def test_at_most_so_many_pending_transfers_are_tracked_the_oldest_dropped(extra: int) -> None:
    pending = tuple(PendingTransfer(i, "withdrawal", "BTC", Decimal("1.0"), 1000 + i)
                    for i in range(MAX_PENDING_TRANSFERS - 1 + extra))
    cursor = TransfersCursor(9000, pending=pending, last_was_recheck=True)
    cursor, outcome = apply_page(cursor, TransfersQuery(8999), (row(99_999, 9500, "Pending"),))
    assert len(cursor.pending) == MAX_PENDING_TRANSFERS
    assert outcome.dropped == pending[:extra]


RULES = ReplyRules(Precision({"USD": 2}, default_places=8), 300)


def test_transfer_rows_are_read_strictly() -> None:
    rows = parse_transfers(json.dumps([
        {"type": "Withdrawal", "status": "Pending", "timestampms": "1700000000123",
         "eid": 320033681, "currency": "btc", "amount": "0.123456789", "network": "bitcoin",
         "destination": "bc1q\nxyz", "txHash": "ab" * 200},
        {"type": "Fee", "status": "Settling", "timestampms": 1700000000000, "eid": "5",
         "currency": "USD", "amount": 36.009},
    ]).encode(), RULES)
    first, second = rows
    assert first == Transfer(320033681, "withdrawal", "Pending", 1_700_000_000_123, "BTC",
                             Decimal("0.12345678"), "bitcoin", "bc1qxyz", ("ab" * 200)[:200])
    assert (second.type, second.status, second.eid, second.amount) == ("other", "other", 5,
                                                                       Decimal("36.00"))


@pytest.mark.parametrize("bad", [
    {"eid": None}, {"eid": -1}, {"eid": 1.5}, {"eid": 2**63}, {"eid": "12a"},
    {"timestampms": None}, {"timestampms": "soon"}, {"amount": "-1"}, {"amount": None},
    {"amount": "1e400"}, {"currency": None},
], ids=["no eid", "negative eid", "fractional eid", "eid past int64", "eid not digits",
        "no time", "words for time", "negative amount", "no amount", "huge amount",
        "no currency"])
def test_a_page_with_a_bad_row_is_malformed(bad: dict[str, object]) -> None:
    good = {"type": "Deposit", "status": "Complete", "timestampms": 1, "eid": 1,
            "currency": "USD", "amount": "1"}
    with pytest.raises(MalformedReply):
        parse_transfers(json.dumps([{**good, **bad}]).encode(), RULES)


def test_an_eid_twice_in_a_page_is_malformed() -> None:
    good = {"timestampms": 1, "eid": 1, "currency": "USD", "amount": "1"}
    with pytest.raises(MalformedReply, match="eid 1 appears twice"):
        parse_transfers(json.dumps([good, good]).encode(), RULES)


@pytest.mark.parametrize("extra", [0, 1])
def test_at_most_so_many_ids_are_kept_for_the_newest_millisecond(extra: int) -> None:
    ids = frozenset(range(MAX_IDS_AT_NEWEST - 2 + extra))
    cursor = TransfersCursor(5000, ids)
    cursor, outcome = apply_page(cursor, TransfersQuery(4999), (
        row(100_000, 5000), row(100_001, 5000)))
    assert len(outcome.new) == 2
    # The largest ids are kept: Gemini's ids grow, so the newest rows are those still to come.
    assert len(cursor.at_newest) == MAX_IDS_AT_NEWEST
    assert {100_000, 100_001} <= cursor.at_newest
    assert (0 in cursor.at_newest) is (extra == 0)
