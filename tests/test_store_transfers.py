"""The store's transfers: totals per (currency, type) as pages come, and what carries over a new
plan, an account's absence, a stream turned off and on, and a restart (the ledger's cursor)."""

from dataclasses import replace
from decimal import Decimal

from balance_exporter.gemini.replies import Transfer
from balance_exporter.store import BalanceStore
from balance_exporter.targets import AccountTarget
from balance_exporter.transfers import TransfersQuery

TARGET = AccountTarget("main", "treasury", "primary", False, 30.0,
                       transfers_interval_seconds=60.0, transfers_lookback_seconds=3600.0)
NOW_MS = 1_800_000_000_000


def withdrawal(eid: int, at: int, amount: str = "1", status: str = "Complete") -> Transfer:
    return Transfer(eid, "withdrawal", status, at, "BTC", Decimal(amount))


def poll(store: BalanceStore, *rows: Transfer, at_ms: int = NOW_MS) -> None:
    query = store.transfers_query("main", at_ms)
    assert query is not None
    store.record_transfers("main", query, rows, 0.1, at_ms / 1000)


def totals(store: BalanceStore) -> dict[tuple[str, str], tuple[int, Decimal, int]]:
    (snapshot,) = store.account_snapshots()
    return {(row.currency, row.type): (row.transfers, row.amount, row.pending)
            for row in snapshot.transfers.poll.rows}


def store_of(target: AccountTarget = TARGET) -> BalanceStore:
    store = BalanceStore()
    store.configure([target], ["treasury"])
    return store


def test_the_first_poll_is_a_baseline_then_each_transfer_counts_once() -> None:
    store = store_of()
    assert store.transfers_query("main", NOW_MS) == TransfersQuery(NOW_MS - 3_600_000,
                                                                   baseline=True)
    poll(store, withdrawal(1, NOW_MS - 1000), withdrawal(2, NOW_MS - 500, "2", "Pending"))
    assert totals(store) == {("BTC", "withdrawal"): (1, Decimal(2), 1)}
    poll(store, withdrawal(3, NOW_MS + 100, "0.5"), withdrawal(2, NOW_MS - 500, "2", "Pending"))
    poll(store, withdrawal(3, NOW_MS + 100, "0.5"))
    assert totals(store) == {("BTC", "withdrawal"): (2, Decimal("2.5"), 1)}


def test_an_account_that_leaves_and_comes_back_counts_what_moved_meanwhile_once() -> None:
    store = store_of()
    poll(store, withdrawal(1, NOW_MS - 1000))
    store.configure([], ["treasury"])
    store.configure([TARGET], ["treasury"])
    # Not a new baseline: the cursor is the account's, and it was kept.
    query = store.transfers_query("main", NOW_MS + 60_000)
    assert query is not None
    assert not query.baseline
    poll(store, withdrawal(1, NOW_MS - 1000), withdrawal(4, NOW_MS + 30_000, "3"))
    assert totals(store) == {("BTC", "withdrawal"): (1, Decimal(3), 0)}


def test_a_new_plan_keeps_the_totals_and_a_stream_turned_off_and_on_is_a_new_baseline() -> None:
    store = store_of()
    poll(store, withdrawal(1, NOW_MS - 1000, "1", "Pending"))
    store.configure([replace(TARGET, interval_seconds=10.0)], ["treasury"])
    assert totals(store) == {("BTC", "withdrawal"): (1, Decimal(1), 1)}
    store.configure([replace(TARGET, transfers_interval_seconds=None)], ["treasury"])
    store.configure([TARGET], ["treasury"])
    assert totals(store) == {}
    query = store.transfers_query("main", NOW_MS)
    assert query is not None
    assert query.baseline


def test_a_restart_from_the_ledger_counts_only_what_is_newer_than_the_cursor() -> None:
    store = store_of()
    poll(store, withdrawal(1, NOW_MS - 1000), withdrawal(2, NOW_MS - 500, "2", "Pending"))
    restarted = BalanceStore(store.saved_accounts())
    restarted.configure([TARGET], ["treasury"])
    moved = (withdrawal(5, NOW_MS + 10, "7"), withdrawal(2, NOW_MS - 500, "2", "Complete"))
    # The pending one is re-checked first, in turn: it settles without counting again.
    poll(restarted, *moved, at_ms=NOW_MS + 60_000)
    assert totals(restarted) == {}
    poll(restarted, *moved, at_ms=NOW_MS + 65_000)
    assert totals(restarted) == {("BTC", "withdrawal"): (1, Decimal(7), 0)}
