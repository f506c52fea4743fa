from dataclasses import replace

from balance_exporter.gemini.replies import (
    BalanceReply,
    CurrencyBalance,
    KeyRoles,
    NotionalBalance,
    ParsedReply,
)
from balance_exporter.ledger import MAX_ABSENT_STAMP_OWNERS, STAMP_RETENTION_SECONDS, SavedAccount
from balance_exporter.store import CONFIGURE_STEP, AccountSnapshot, BalanceStore, ReplyVerdict
from balance_exporter.targets import AccountTarget, Endpoint, ListedAccount

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
    first = BalanceReply(balances(BTC=5), 200, "exchange")
    assert store.record_reply("main", BAL, first, 0.1, 10.0) is ReplyVerdict.ACCEPTED
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


def test_a_set_adopted_in_steps_keeps_the_replies_recorded_between_them() -> None:
    """The old set serves readers and writers until the last step; an account that changed
    meanwhile is carried over as it is then, with its new settings."""
    accounts = [AccountTarget(f"a{index}", "treasury", f"a{index}", False, 30.0)
                for index in range(CONFIGURE_STEP * 2 + 1)]
    store = make_store(*accounts)
    slower = [replace(target, interval_seconds=60.0) for target in accounts]
    steps = store.configuring(slower, {"treasury"})
    next(steps)  # the first accounts prepared, a0 among them
    assert store.record_reply("a0", BAL, BalanceReply(balances(BTC=5), 1, None), 0.1, 10.0) \
        is ReplyVerdict.ACCEPTED
    assert {s.target.interval_seconds for s in store.account_snapshots()} == {30.0}
    for _ in steps:
        pass
    assert amounts(store, "a0") == {"BTC": 5}
    assert {s.target.interval_seconds for s in store.account_snapshots()} == {60.0}
    assert store.record_reply("a0", BAL, BalanceReply(balances(BTC=1), 0, None), 0.1, 11.0) \
        is ReplyVerdict.STALE


def test_ready_once_every_account_was_attempted() -> None:
    store = make_store(TARGET, AccountTarget("side", "treasury", "side", False, 30.0))
    store.record_failure("main", BAL, "Timeout", 0.1)
    assert not store.all_attempted()
    store.record_reply("side", BAL, BalanceReply((), None, None), 0.1, 1.0)
    assert store.all_attempted()


NOTIONAL_TARGET = AccountTarget("main", "treasury", "primary", False, 30.0,
                                notional_currency="USD", notional_interval_seconds=60.0,
                                staking_interval_seconds=300.0)


def notional(value: float, stamp: int | None) -> ParsedReply[NotionalBalance]:
    return ParsedReply((NotionalBalance("BTC", value, value, value),), stamp)


def test_each_endpoint_keeps_its_own_stamp_and_rows() -> None:
    store = BalanceStore()
    store.configure([NOTIONAL_TARGET], ["treasury"])
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 500, None), 0.1, 10.0)
    # Older than the balances reply, but the first notional one: accepted.
    assert store.record_reply("main", Endpoint.NOTIONAL, notional(325000, 400), 0.1, 11.0) \
        is ReplyVerdict.ACCEPTED
    assert store.record_reply("main", Endpoint.NOTIONAL, notional(1, 399), 0.1, 12.0) \
        is ReplyVerdict.STALE
    store.record_failure("main", Endpoint.NOTIONAL, "Timeout", 0.5)
    (snapshot,) = store.account_snapshots()
    assert [row.amount for row in snapshot.notional.rows] == [325000]
    assert snapshot.notional.stale_replies == 1
    assert not snapshot.notional.up
    assert snapshot.balances.up  # a notional failure is not the balances'
    assert snapshot.balances.server_timestamp_ns == 500
    assert dict(snapshot.notional.errors) == {"Timeout": 1}


def test_a_new_quote_currency_or_a_poll_turned_off_drops_that_endpoints_rows() -> None:
    store = BalanceStore()
    store.configure([NOTIONAL_TARGET], ["treasury"])
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 500, None), 0.1, 10.0)
    store.record_reply("main", Endpoint.NOTIONAL, notional(325000, 400), 0.1, 11.0)
    store.configure([replace(NOTIONAL_TARGET, notional_currency="EUR")], ["treasury"])
    (snapshot,) = store.account_snapshots()
    assert snapshot.notional.rows == ()  # dollars are no euros
    assert snapshot.balances.rows  # the balances did not change meaning
    store.configure([replace(NOTIONAL_TARGET, notional_interval_seconds=None)], ["treasury"])
    assert store.account_snapshots()[0].notional.rows == ()


def test_readiness_waits_for_every_accounts_balances_and_every_first_listing() -> None:
    store = BalanceStore()
    store.configure([NOTIONAL_TARGET], ["treasury"], discovering={"treasury": 900.0})
    store.record_reply("main", BAL, BalanceReply((), 1, None), 0.1, 1.0)
    assert not store.all_attempted()  # the listing not tried yet
    store.record_listing_failure("treasury", "Timeout")
    assert store.all_attempted()  # notional and staking polls come in their own time


def test_restored_wait_for_their_account_to_be_planned() -> None:
    saved = [SavedAccount("treasury", "desk", {"balances": 900, "staking": 800})]
    store = BalanceStore(saved)
    store.configure([TARGET], ["treasury"], discovering={"treasury": 900.0})  # not listed yet
    assert store.saved_accounts() == saved  # a save before the first listing keeps them
    desk = AccountTarget("desk", "treasury", "desk", False, 30.0, staking_interval_seconds=60.0)
    store.record_listing("treasury", (ListedAccount("desk", "", "exchange", "open"),), False, 1.0)
    store.configure([TARGET, desk], ["treasury"], discovering={"treasury": 900.0})
    assert store.record_reply("desk", BAL, BalanceReply((), 899, None), 0.1, 1.0) \
        is ReplyVerdict.STALE
    assert store.saved_accounts() == saved


class WallClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def stale_after(store: BalanceStore, label: str = "main") -> bool:
    """Whether a reply older than the account's last accepted one is still refused."""
    return store.record_reply(label, BAL, BalanceReply(balances(BTC=999), 100, None), 0.1, 5.0) \
        is ReplyVerdict.STALE


def test_an_account_that_leaves_the_plan_and_comes_back_keeps_its_stamps() -> None:
    store = make_store()
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 200, None), 0.1, 1.0)
    store.configure([], ["treasury"])
    store.configure([TARGET], ["treasury"])
    assert stale_after(store)
    assert amounts(store) == {}  # a returning account shows nothing until a fresh reply


def test_new_settings_or_a_new_label_start_new_rows_but_keep_the_stamps() -> None:
    store = make_store()
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 200, None), 0.1, 1.0)
    pending = replace(TARGET, show_pending_balances=True)
    store.configure([pending], ["treasury"])
    assert amounts(store) == {}
    assert stale_after(store)
    store.configure([replace(pending, label="renamed")], ["treasury"])
    assert stale_after(store, "renamed")


def test_a_discovered_account_listed_closed_then_open_keeps_its_stamps() -> None:
    store = BalanceStore()
    discovered = replace(TARGET, discovered=True)
    listed = ListedAccount("primary", "", "exchange", "open")
    store.configure([], ["treasury"], discovering={"treasury": 900.0})
    store.record_listing("treasury", (listed,), False, 1.0)
    store.configure([discovered], ["treasury"], discovering={"treasury": 900.0})
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 200, None), 0.1, 1.0)
    store.record_listing("treasury", (replace(listed, status="closed"),), False, 2.0)
    store.configure([], ["treasury"], discovering={"treasury": 900.0})
    store.record_listing("treasury", (listed,), False, 3.0)
    store.configure([discovered], ["treasury"], discovering={"treasury": 900.0})
    assert stale_after(store)


def test_a_stamp_is_kept_for_its_retention_after_its_account_left_then_forgotten() -> None:
    clock = WallClock()
    store = BalanceStore(wall_clock=clock)
    store.configure([TARGET], ["treasury"])
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 200, None), 0.1, 1.0)
    store.configure([], ["treasury"])
    (gone,) = store.saved_accounts()
    assert gone.gone_since == clock.now
    clock.now += STAMP_RETENTION_SECONDS
    store.configure([], ["treasury"])
    assert store.saved_accounts() == [gone]  # at the bound: kept
    clock.now += 0.001
    store.configure([], ["treasury"])
    assert store.saved_accounts() == []


def test_an_absence_not_confirmed_by_a_listing_does_not_start_the_retention() -> None:
    clock = WallClock()
    saved = [SavedAccount("treasury", "desk", {"balances": 900})]
    store = BalanceStore(saved, wall_clock=clock)
    store.configure([], ["treasury"], discovering={"treasury": 900.0})
    clock.now += 10 * STAMP_RETENTION_SECONDS  # a listing that fails for weeks
    store.configure([], ["treasury"], discovering={"treasury": 900.0})
    assert store.saved_accounts() == saved
    store.record_listing("treasury", (), False, clock.now)  # listed: really gone from now on
    store.configure([], ["treasury"], discovering={"treasury": 900.0})
    assert store.saved_accounts()[0].gone_since == clock.now


def test_at_most_so_many_absent_accounts_keep_stamps_those_gone_longest_go_first() -> None:
    clock = WallClock()
    store = BalanceStore(wall_clock=clock)
    many = [AccountTarget(f"a{i}", "treasury", f"a{i}", False, 30.0)
            for i in range(MAX_ABSENT_STAMP_OWNERS)]
    store.configure(many, ["treasury"])
    for target in many:
        store.record_reply(target.label, BAL, BalanceReply((), 200, None), 0.1, 1.0)
    store.configure(many[1:], ["treasury"])  # a0 leaves first
    clock.now += 1
    store.configure([], ["treasury"])  # at the bound: every one kept
    assert len(store.saved_accounts()) == MAX_ABSENT_STAMP_OWNERS
    other = AccountTarget("b", "treasury", "b", False, 30.0)
    store.configure([other], ["treasury"])
    store.record_reply("b", BAL, BalanceReply((), 200, None), 0.1, 1.0)
    clock.now += 1
    store.configure([], ["treasury"])  # one past the bound: a0, gone longest, is forgotten
    owners = {stamp.gemini_account for stamp in store.saved_accounts()}
    assert len(owners) == MAX_ABSENT_STAMP_OWNERS
    assert "a0" not in owners
    assert {"a1", "b"} <= owners


def test_a_reply_is_stored_only_for_the_target_that_sent_it() -> None:
    """A label that passed to another key, account or quote currency while a request was in
    flight: the late reply (or failure) is not the new owner's."""
    store = make_store()
    other_key = replace(TARGET, key_name="group-b", key_id="group-b")
    store.configure([other_key], ["treasury", "group-b"])
    reply = BalanceReply(balances(BTC=5), 200, None)
    assert store.record_reply("main", BAL, reply, 0.1, 1.0, sent=TARGET) \
        is ReplyVerdict.NOT_PLANNED
    store.record_failure("main", BAL, "Timeout", 0.1, sent=TARGET)
    (snapshot,) = store.account_snapshots()
    assert (snapshot.balances.rows, snapshot.balances.polls) == ((), 0)
    assert store.saved_accounts() == []
    euros = replace(NOTIONAL_TARGET, notional_currency="EUR")
    store.configure([euros], ["treasury"])
    assert store.record_reply("main", Endpoint.NOTIONAL, notional(1, 300), 0.1, 1.0,
                              sent=NOTIONAL_TARGET) is ReplyVerdict.NOT_PLANNED
    assert store.record_reply("main", Endpoint.NOTIONAL, notional(1, 300), 0.1, 1.0,
                              sent=euros) is ReplyVerdict.ACCEPTED
    assert store.record_reply("gone", BAL, reply, 0.1, 1.0, sent=TARGET) \
        is ReplyVerdict.NOT_PLANNED


def test_discovery_state_survives_a_new_plan_and_goes_when_the_key_stops_discovering() -> None:
    store = BalanceStore()
    store.configure([TARGET], ["treasury"], discovering={"treasury": 900.0})
    listed = (ListedAccount("primary", "Primary", "exchange", "open"),)
    store.record_listing("treasury", listed, False, 5.0)
    store.record_listing_failure("treasury", "System")
    store.configure([TARGET], ["treasury"], discovering={"treasury": 1800.0})
    (key,) = store.key_counters()
    assert key.discovery is not None
    assert (key.discovery.listed, key.discovery.last_success_seconds) == (listed, 5.0)
    assert dict(key.discovery.errors) == {"System": 1}
    assert key.discovery.refresh_seconds == 1800.0
    store.configure([TARGET], ["treasury"])
    assert store.key_counters()[0].discovery is None


def labels(snapshots: tuple[AccountSnapshot, ...] | None) -> list[str] | None:
    return None if snapshots is None else [snapshot.target.label for snapshot in snapshots]


def test_changes_since_a_version_are_listed_once_each_in_the_order_of_their_last_change() -> None:
    other = replace(TARGET, label="other", gemini_account="second")
    store = make_store(TARGET, other)
    seen = store.accounts_version
    assert labels(store.changed_since(seen)) == []
    store.record_reply("main", BAL, BalanceReply(balances(BTC=1), 1, None), 0.1, 1.0)
    store.record_failure("other", BAL, "Timeout", 0.1)
    store.record_reply("main", BAL, BalanceReply(balances(BTC=2), 2, None), 0.1, 2.0)
    assert labels(store.changed_since(seen)) == ["other", "main"]
    assert labels(store.changed_since(store.accounts_version - 1)) == ["main"]
    assert labels(store.changed_since(store.accounts_version)) == []
    # A reader that saw the accounts before they were configured again looks at every one.
    last = store.accounts_version
    store.configure([other], ["treasury"])
    assert store.changed_since(last) is None
    assert labels(store.changed_since(store.accounts_version)) == []


def test_stamps_follow_the_api_key_not_its_entrys_name() -> None:
    """A reload that renames a key keeps its accounts' stamps; one that gives the name to
    another API key (another group) neither shows the old rows nor carries their stamps."""
    store = BalanceStore()
    store.configure([replace(TARGET, key_id="group-a")], ["treasury"])
    store.record_reply("main", BAL, BalanceReply(balances(BTC=5), 200, None), 0.1, 1.0)
    renamed = replace(TARGET, key_name="desk", key_id="group-a")
    store.configure([renamed], ["desk"])
    assert amounts(store) == {"BTC": 5}  # the same key and account: its rows stay
    assert stale_after(store)
    other_group = replace(TARGET, key_id="group-b")
    store.configure([other_group], ["treasury"])
    assert amounts(store) == {}
    assert store.record_reply("main", BAL, BalanceReply(balances(BTC=7), 150, None), 0.1,
                              2.0) is ReplyVerdict.ACCEPTED


def test_a_keys_roles_stay_across_a_new_plan_and_go_when_its_name_is_another_api_keys() -> None:
    store = BalanceStore()
    store.configure([TARGET], ["treasury"], key_ids={"treasury": "group-a"})
    store.record_roles("treasury", KeyRoles(False, True, True), 1.0)
    store.configure([TARGET], ["treasury"], key_ids={"treasury": "group-a"})
    (key,) = store.key_counters()
    assert key.roles.roles == KeyRoles(False, True, True)
    # The name now holds another API key: the old key's roles are not shown for it.
    store.configure([TARGET], ["treasury"], key_ids={"treasury": "group-b"})
    (key,) = store.key_counters()
    assert key.roles.roles is None
    assert not key.roles.attempted
