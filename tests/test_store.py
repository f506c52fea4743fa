from balance_exporter.gemini.replies import BalanceReply, CurrencyBalance
from balance_exporter.store import BalanceStore, ReplyVerdict
from balance_exporter.targets import AccountTarget, Endpoint

BAL = Endpoint.BALANCES

TARGET = AccountTarget("main", "treasury", "primary", False, 30.0)


def balances(**amounts: float) -> tuple[CurrencyBalance, ...]:
    return tuple(CurrencyBalance(currency, value, value, value, 0.0, 0.0)
                 for currency, value in amounts.items())


def make_store(*targets: AccountTarget) -> BalanceStore:
    store = BalanceStore()
    store.configure(targets or (TARGET,), {"treasury"})
    return store


def amounts(store: BalanceStore, label: str = "main") -> dict[str, float]:
    (snapshot,) = [s for s in store.account_snapshots() if s.target.label == label]
    return {balance.currency: balance.amount for balance in snapshot.balances.rows}


def test_a_reply_older_than_the_last_accepted_one_is_ignored_and_counted() -> None:
    store = make_store()
    assert store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 200, "exchange"), 0.1, 10.0) \
        is ReplyVerdict.ACCEPTED
    verdict = store.record_reply("main", BAL, BalanceReply(balances(BTC=999), 199, None), 0.1, 11.0)
    assert verdict is ReplyVerdict.STALE
    (snapshot,) = store.account_snapshots()
    assert amounts(store) == {"BTC": 5}
    assert snapshot.balances.stale_replies == 1
    assert snapshot.balances.server_timestamp_ns == 200
    assert snapshot.balances.last_success_seconds == 10.0  # data age keeps growing
    assert snapshot.balances.up  # a stale reply is still a usable reply


def test_an_equal_stamp_is_accepted() -> None:
    store = make_store()
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 200, None), 0.1, 10.0)
    assert store.record_reply("main", BAL, BalanceReply(balances(BTC=6), 200, None), 0.1, 11.0) \
        is ReplyVerdict.ACCEPTED
    assert amounts(store) == {"BTC": 6}


def test_a_reply_without_stamp_is_accepted_and_counted() -> None:
    store = make_store()
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 200, None), 0.1, 10.0)
    store.record_reply("main", BAL, BalanceReply(balances(BTC=7), None, None), 0.1, 11.0)
    (snapshot,) = store.account_snapshots()
    assert amounts(store) == {"BTC": 7}
    assert snapshot.balances.unstamped_replies == 1
    assert snapshot.balances.server_timestamp_ns == 200  # the last known stamp still guards
    assert store.record_reply("main", BAL, BalanceReply(balances(BTC=1), 150, None), 0.1, 12.0) \
        is ReplyVerdict.STALE


def test_an_accepted_reply_replaces_balances_wholesale() -> None:
    store = make_store()
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5, USD=10), 1, None), 0.1, 10.0)
    store.record_reply("main", BAL, BalanceReply(balances(USD=12), 2, None), 0.1, 11.0)
    assert amounts(store) == {"USD": 12}
    store.record_reply("main", BAL, BalanceReply((), 3, None), 0.1, 12.0)
    assert amounts(store) == {}


def test_a_failed_poll_keeps_the_last_good_balances() -> None:
    store = make_store()
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 1, None), 0.1, 10.0)
    store.record_failure("main", BAL, "Timeout", 0.5)
    store.record_failure("main", BAL, "Timeout", 0.5)
    store.record_failure("main", BAL, "System", 0.5)
    (snapshot,) = store.account_snapshots()
    assert amounts(store) == {"BTC": 5}
    assert not snapshot.balances.up
    assert dict(snapshot.balances.errors) == {"Timeout": 2, "System": 1}
    assert snapshot.balances.polls == 4
    assert snapshot.balances.last_success_seconds == 10.0


def test_reconfigure_keeps_unchanged_accounts_and_drops_changed_ones() -> None:
    other = AccountTarget("side", "treasury", "side", False, 30.0)
    store = make_store(TARGET, other)
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 1, None), 0.1, 10.0)
    store.record_reply("side", BAL, BalanceReply(balances(ETH=3), 1, None), 0.1, 10.0)
    slower = AccountTarget("main", "treasury", "primary", False, 60.0)
    moved = AccountTarget("side", "treasury", "elsewhere", False, 30.0)
    store.configure([slower, moved], {"treasury"})
    assert amounts(store, "main") == {"BTC": 5}
    assert amounts(store, "side") == {}
    assert store.account_snapshots()[0].target.interval_seconds == 60.0


def test_ready_once_every_account_was_attempted() -> None:
    store = make_store(TARGET, AccountTarget("side", "treasury", "side", False, 30.0))
    store.record_failure("main", BAL, "Timeout", 0.1)
    assert not store.all_attempted()
    store.record_reply("side", BAL, BalanceReply((), None, None), 0.1, 1.0)
    assert store.all_attempted()
