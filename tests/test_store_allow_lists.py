"""The store's withdrawal allow-lists: counts by scope and status (gone pairs at 0), the baseline,
additions counted once, the diff for the audit log, staleness, and what carries over a new plan,
an account's absence and a restart (the ledger's digests)."""

from dataclasses import replace

from balance_exporter.gemini.replies import AllowListReply, ApprovedAddress
from balance_exporter.ledger import KnownEntry, SavedAccount, entry_digest
from balance_exporter.store import AllowListChange, BalanceStore, ReplyVerdict
from balance_exporter.targets import AccountTarget, AllowList

BITCOIN = AllowList("bitcoin")
ETHEREUM = AllowList("ethereum")
TARGET = AccountTarget("main", "treasury", "primary", False, 30.0,
                       allow_list_networks=("bitcoin", "ethereum"),
                       allow_list_interval_seconds=900.0)
COLD = ApprovedAddress("account", "active", "bc1qcold", "Cold", 1_700_000_000_000)
GROUP = ApprovedAddress("group", "active", "bc1qgroup", "Group", 1_700_000_100_000)
NEW = ApprovedAddress("account", "pending_time", "bc1qnew", "", 1_700_000_200_000)


def store_of(*targets: AccountTarget, saved: list[SavedAccount] | None = None) -> BalanceStore:
    store = BalanceStore(saved or [])
    store.configure(targets or [TARGET], ["treasury"])
    return store


def read(store: BalanceStore, *entries: ApprovedAddress, stamp: int | None = None,
         allow_list: AllowList = BITCOIN, label: str = "main",
         ) -> tuple[ReplyVerdict, AllowListChange | None]:
    return store.record_allow_list(label, allow_list, AllowListReply(entries, stamp), 0.1, 5.0)


def counts(store: BalanceStore, network: str = "bitcoin") -> dict[tuple[str, str], int]:
    (snapshot,) = store.account_snapshots()
    return {(row.scope, row.status): row.entries
            for row in snapshot.allow_list(network).poll.rows}


def added(store: BalanceStore, network: str = "bitcoin") -> int:
    (snapshot,) = store.account_snapshots()
    return snapshot.allow_list(network).added


def test_the_first_list_is_the_baseline_and_counts_entries_by_scope_and_status() -> None:
    store = store_of()
    verdict, change = read(store, COLD, GROUP, NEW, NEW._replace(address="bc1qnew2"))
    assert verdict is ReplyVerdict.ACCEPTED
    assert change == AllowListChange(baseline=True)
    assert counts(store) == {("account", "active"): 1, ("account", "pending_time"): 2,
                             ("group", "active"): 1}
    assert added(store) == 0
    (snapshot,) = store.account_snapshots()
    assert snapshot.allow_list("bitcoin").newest_created_ms == 1_700_000_200_000
    assert snapshot.allow_list("ethereum").poll.attempted is False  # each network on its own


def test_an_addition_counts_once_and_the_diff_names_every_change() -> None:
    store = store_of()
    read(store, COLD, GROUP)
    _, change = read(store, COLD, GROUP, NEW)
    assert change == AllowListChange(False, added=(KnownEntry("account", "pending_time", "",
                                                              "bc1qnew"),))
    _, change = read(store, COLD, GROUP, NEW)
    assert change == AllowListChange(False)
    assert added(store) == 1
    approved = NEW._replace(status="active")
    _, change = read(store, GROUP, approved)
    assert change == AllowListChange(
        False, removed=(KnownEntry("account", "active", "Cold", "bc1qcold"),),
        status_changed=((KnownEntry("account", "pending_time", "", "bc1qnew"),
                         KnownEntry("account", "active", "", "bc1qnew")),))
    assert added(store) == 1
    # The pending pair is gone: it shows 0 rather than vanishing.
    assert counts(store) == {("account", "active"): 1, ("account", "pending_time"): 0,
                             ("group", "active"): 1}


def test_the_same_address_in_another_scope_is_another_entry_and_a_repeat_counts_as_sent() -> None:
    store = store_of()
    read(store, COLD)
    _, change = read(store, COLD, COLD._replace(scope="group"), COLD._replace(scope="group"))
    assert change is not None
    assert len(change.added) == 1
    assert added(store) == 1
    assert counts(store) == {("account", "active"): 1, ("group", "active"): 2}


def test_a_failed_poll_keeps_the_last_good_list_and_no_new_baseline_follows() -> None:
    store = store_of()
    read(store, COLD)
    store.record_allow_list_failure("main", BITCOIN, "MalformedReply", 0.1)
    (snapshot,) = store.account_snapshots()
    state = snapshot.allow_list("bitcoin")
    assert (state.poll.up, dict(state.poll.errors)) == (False, {"MalformedReply": 1})
    assert counts(store) == {("account", "active"): 1}
    _, change = read(store, COLD, NEW)
    assert change is not None
    assert not change.baseline
    assert added(store) == 1


def test_a_stamped_list_older_than_the_last_is_stale_and_changes_nothing() -> None:
    store = store_of()
    read(store, COLD, stamp=200)
    verdict, change = read(store, COLD, NEW, stamp=100)
    assert (verdict, change) == (ReplyVerdict.STALE, None)
    assert counts(store) == {("account", "active"): 1}
    assert added(store) == 0
    # Each network's stamps are its own.
    assert read(store, COLD, stamp=100, allow_list=ETHEREUM)[0] is ReplyVerdict.ACCEPTED


def test_a_list_for_a_network_or_target_no_longer_planned_is_dropped() -> None:
    store = store_of()
    assert read(store, COLD, allow_list=AllowList("solana")) == (ReplyVerdict.NOT_PLANNED, None)
    sent = TARGET
    store.configure([replace(TARGET, key_id="another-key")], ["treasury"])
    assert store.record_allow_list("main", BITCOIN, AllowListReply((COLD,)), 0.1, 5.0,
                                   sent=sent) == (ReplyVerdict.NOT_PLANNED, None)


def test_a_new_plan_keeps_the_networks_that_stay_and_a_network_read_again_is_a_baseline() -> None:
    store = store_of()
    read(store, COLD)
    read(store, COLD, NEW)
    store.configure([replace(TARGET, interval_seconds=10.0)], ["treasury"])
    assert added(store) == 1  # another balances interval changes nothing here
    store.configure([replace(TARGET, allow_list_networks=("ethereum",))], ["treasury"])
    store.configure([TARGET], ["treasury"])
    assert added(store) == 0
    assert counts(store) == {}
    assert read(store, COLD, NEW, GROUP)[1] == AllowListChange(baseline=True)


def test_an_account_that_leaves_and_comes_back_counts_what_was_added_meanwhile() -> None:
    store = store_of()
    read(store, COLD)
    store.configure([], ["treasury"])
    store.configure([TARGET], ["treasury"])
    assert added(store) == 0
    assert counts(store) == {}
    _, change = read(store, COLD, NEW)
    assert change is not None
    assert not change.baseline
    assert added(store) == 1


def test_the_ledger_saves_digests_and_a_restart_diffs_against_them() -> None:
    store = store_of()
    read(store, COLD, GROUP)
    (saved,) = store.saved_accounts()
    assert saved.allow_lists == {"bitcoin": {
        entry_digest("account", "bc1qcold"): ("account", "active"),
        entry_digest("group", "bc1qgroup"): ("group", "active")}}
    assert "bc1qcold" not in repr(saved)  # digests only: no address goes to the state file
    restarted = store_of(saved=[saved])
    _, change = read(restarted, COLD, NEW)
    assert change == AllowListChange(
        False, added=(KnownEntry("account", "pending_time", "", "bc1qnew"),),
        removed=(KnownEntry("group", "active", None, None),))
    assert added(restarted) == 1
