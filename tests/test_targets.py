"""Planning targets from the config: every account polled, its interval stretched to fit the
key's (and the shared) request budget."""

import pytest

from balance_exporter.config import Config, build_config
from balance_exporter.targets import (
    PLANNED_SHARE,
    Endpoint,
    ListedAccount,
    listing_pages,
    matches,
    plan,
    plan_targets,
    planning,
)

SECRET = "TOPSECRET-targets"
# What each key's roles ask for: once an hour by default.
ROLES = 1 / 3600


def test_interval_is_stretched_to_fit_the_key_budget() -> None:
    config = build_config({
        "keys": [{"name": "k", "api_key": "master-k", "api_secret": SECRET,
                  "requests_per_second": 2},
                 {"name": "j", "api_key": "master-j", "api_secret": SECRET,
                  "requests_per_second": 5}],
        "accounts": [{"key": "k", "account": f"a{i}", "interval_seconds": 10} for i in range(50)]
        + [{"key": "j", "account": "b", "interval_seconds": 10}],
    }, {})
    planned = {target.label: target.interval_seconds for target in plan_targets(config)}
    # 50 accounts and the key's roles (hourly) in 97 % of 2 requests a second (the rest is
    # kept for retries).
    assert planned["a0"] == pytest.approx(10 * (5 + ROLES) / (2 * PLANNED_SHARE))
    assert planned["b"] == 10.0


def test_a_global_budget_stretches_every_account() -> None:
    config = build_config({
        "gemini": {"requests_per_second": 1},
        "keys": [{"name": "k", "api_key": "master-k", "api_secret": SECRET,
                  "requests_per_second": 5}],
        "accounts": [{"key": "k", "account": f"a{i}", "interval_seconds": 5} for i in range(20)],
    }, {})
    intervals = [target.interval_seconds for target in plan_targets(config)]
    assert intervals == [pytest.approx(5 * (4 + ROLES) / PLANNED_SHARE)] * 20


def test_targets_keep_the_gemini_account_label_and_thresholds() -> None:
    config = build_config({
        "keys": [{"name": "k", "api_key": "master-k", "api_secret": SECRET},
                 {"name": "solo", "api_key": "account-s", "api_secret": SECRET}],
        "accounts": [{"key": "k", "account": "primary", "name": "treasury",
                      "min_available": {"USD": 10, "BTC": 1}, "max_available_drop_ratio": 0.5},
                     {"key": "solo"}],
    }, {})
    treasury, solo = plan_targets(config)
    assert (treasury.label, treasury.key_name, treasury.gemini_account) == (
        "treasury", "k", "primary")
    assert treasury.min_available == (("BTC", 1.0), ("USD", 10.0))
    assert treasury.max_available_drop_ratio == 0.5
    assert (solo.label, solo.gemini_account, solo.min_available) == ("solo", None, ())


def listed(short_name: str, account_type: str = "exchange", status: str = "open") -> ListedAccount:
    return ListedAccount(short_name, short_name.title(), account_type, status)


TREASURY = {
    "notional": {"currency": "usd", "interval_seconds": 300},
    "keys": [{"name": "t", "api_key": "master-t", "api_secret": SECRET,
              "requests_per_second": 5,
              "discover": {"include": ["*"], "exclude": ["test-*"], "refresh_seconds": 900,
                           "defaults": {"interval_seconds": 30, "show_pending_balances": True,
                                        "staking_interval_seconds": 300}}}],
    "accounts": [{"key": "t", "account": "primary", "notional_interval_seconds": 60,
                  "min_available_notional": 250000}],
}


def test_discovery_polls_open_exchange_accounts_that_match_the_patterns() -> None:
    config = build_config(TREASURY, {})
    current = plan(config, {"t": [listed("primary"), listed("ops"), listed("test-1"),
                                  listed("vault", account_type="custody"),
                                  listed("old", status="closed"),
                                  listed("odd", status="other")]})
    assert [target.label for target in current.targets] == ["primary", "ops"]
    ops = current.targets[1]
    assert (ops.discovered, ops.gemini_account, ops.display_name) == (True, "ops", "Ops")
    assert ops.show_pending_balances
    assert ops.interval_seconds == 30
    assert ops.staking_interval_seconds == 300
    assert (ops.notional_currency, ops.notional_interval_seconds) == ("USD", 300)


def test_a_configured_entry_overrides_the_discovered_one_field_by_field() -> None:
    config = build_config(TREASURY, {})
    (primary,) = plan(config, {"t": [listed("primary")]}).targets
    assert not primary.discovered
    assert primary.display_name == "Primary"  # the listing still names it
    assert primary.notional_interval_seconds == 60  # its own
    assert primary.staking_interval_seconds == 300  # the discover defaults'
    assert primary.show_pending_balances
    assert primary.min_available_notional == 250000


def test_zero_turns_notional_and_staking_polls_off() -> None:
    document = {**TREASURY, "accounts": [{"key": "t", "account": "primary",
                                          "notional_interval_seconds": 0,
                                          "staking_interval_seconds": 0}]}
    (primary,) = plan_targets(build_config(document, {}))
    assert primary.notional_interval_seconds is None
    assert primary.staking_interval_seconds is None


def test_a_discovered_account_whose_label_is_taken_is_skipped() -> None:
    document = {**TREASURY,
                "keys": [*TREASURY["keys"],
                         {"name": "solo", "api_key": "account-s", "api_secret": SECRET}],
                "accounts": [{"key": "solo", "name": "ops"}]}
    current = plan(build_config(document, {}), {"t": [listed("ops"), listed("desk")]})
    assert [(target.key_name, target.label) for target in current.targets] == [
        ("t", "desk"), ("solo", "ops")]
    assert [(skipped.short_name, skipped.taken_by) for skipped in current.skipped] == [
        ("ops", "solo")]


@pytest.mark.parametrize(("accounts", "max_pages", "pages"), [
    (0, 20, 1), (499, 20, 1), (500, 20, 2), (1200, 20, 3), (1200, 2, 2), (10_000, 20, 20)])
def test_a_listing_takes_a_page_per_500_accounts_and_one_after_a_full_page(
    accounts: int, max_pages: int, pages: int,
) -> None:
    assert listing_pages(accounts, max_pages) == pages


def test_each_page_of_a_long_listing_counts_against_the_budget() -> None:
    # 1,200 accounts listed every second take three requests a second of the 2 a key may
    # send; discovery polls none of them here.
    document = {"keys": [{"name": "t", "api_key": "master-t", "api_secret": SECRET,
                          "requests_per_second": 2,
                          "discover": {"include": ["nothing-*"], "refresh_seconds": 1}}]}
    config = build_config(document, {})
    key_plan = plan(config, {"t": [listed(f"a{i:04d}") for i in range(1200)]}).keys["t"]
    assert key_plan.listing_max_pages == 20
    assert key_plan.stretch == pytest.approx((3 + ROLES) / (2 * PLANNED_SHARE))


def test_every_request_stream_of_a_key_counts_against_its_budget() -> None:
    # Per account 1/30 + 1/300 + 1/300 requests a second (primary's notional every 60 s), plus
    # the listing's 1/900: 201 accounts ask for about 8 a second of a key that may send 5.
    config = build_config(TREASURY, {})
    current = plan(config, {"t": [listed(f"a{i:03d}") for i in range(200)]})
    key_plan = current.keys["t"]
    demand = 201 * (1 / 30 + 2 / 300) + (1 / 60 - 1 / 300) + 1 / 900 + ROLES
    budget = 5 * PLANNED_SHARE
    assert key_plan.stretch == pytest.approx(demand / budget)
    target = current.targets[1]
    assert target.interval_seconds == pytest.approx(30 * demand / budget)
    assert target.staking_interval_seconds == pytest.approx(300 * demand / budget)
    assert key_plan.listing_interval_seconds == pytest.approx(900 * demand / budget)
    assert key_plan.listing_interval_seconds is not None
    assert key_plan.roles_interval_seconds == pytest.approx(3600 * demand / budget)
    used = sum(1 / interval for t in current.targets
               for interval in (t.interval_seconds, t.notional_interval_seconds,
                                t.staking_interval_seconds) if interval)
    assert used + 1 / key_plan.listing_interval_seconds + (
        1 / (3600 * demand / budget)) == pytest.approx(budget, rel=1e-5)


ALLOW_LISTS = {**TREASURY, "approved_addresses": {"networks": ["bitcoin", "ethereum", "solana"]}}


def test_each_network_of_an_account_is_a_stream_of_the_budget() -> None:
    # Per account 1/30 + 1/300 + 1/300, and three allow-lists at the default 900 s; primary
    # reads its two networks every 60 s instead.
    document = {**ALLOW_LISTS, "accounts": [
        {"key": "t", "account": "primary", "approved_addresses_interval_seconds": 60}]}
    current = plan(build_config(document, {}), {"t": [listed(f"a{i:03d}") for i in range(200)]})
    key_plan = current.keys["t"]
    demand = (201 * (1 / 30 + 2 / 300) + 200 * 3 / 900 + 3 / 60 + 1 / 900 + ROLES)
    budget = 5 * PLANNED_SHARE
    assert key_plan.stretch == pytest.approx(demand / budget)
    primary, discovered = current.targets[:2]
    assert primary.allow_list_interval_seconds == pytest.approx(60 * demand / budget)
    assert discovered.allow_list_interval_seconds == pytest.approx(900 * demand / budget)
    assert [allow_list.network for allow_list in discovered.allow_lists] == [
        "bitcoin", "ethereum", "solana"]
    assert sum(1 / interval for target in current.targets
               for _, interval in target.streams()) + 1 / 900 / (demand / budget) + (
        1 / 3600 / (demand / budget)) == pytest.approx(budget, rel=1e-5)


def test_zero_turns_an_accounts_allow_lists_off_and_without_the_section_none_are_read() -> None:
    document = {**ALLOW_LISTS, "accounts": [
        {"key": "t", "account": "primary", "approved_addresses_interval_seconds": 0}]}
    (primary,) = plan_targets(build_config(document, {}))
    assert (primary.allow_lists, primary.allow_list_identity) == ((), None)
    assert [stream for stream, _ in primary.streams()] == [
        Endpoint.BALANCES, Endpoint.NOTIONAL, Endpoint.STAKING]
    (primary,) = plan_targets(build_config(TREASURY, {}))
    assert primary.allow_lists == ()
    assert primary.allow_list_interval_seconds is None


def test_matches_uses_case_sensitive_shell_patterns() -> None:
    config = build_config(TREASURY, {})
    discover = config.settings.keys[0].discover
    assert discover is not None
    assert matches(discover, "desk-1")
    assert not matches(discover, "test-1")
    assert matches(discover, "Test-1")


def test_a_new_plan_reuses_what_did_not_change_so_adopting_it_can_skip_it() -> None:
    def config(listed_interval: float) -> Config:
        return build_config({
            "keys": [{"name": "k", "api_key": "master-k", "api_secret": SECRET,
                      "discover": {"defaults": {"interval_seconds": listed_interval}}},
                     {"name": "j", "api_key": "master-j", "api_secret": SECRET}],
            "accounts": [{"key": "j", "account": "b"}],
        }, {})
    listing = {"k": [ListedAccount("a", "", "exchange", "open"),
                     ListedAccount("c", "", "exchange", "open")]}
    first = plan(config(30), listing)
    again = plan(config(30), listing, first)
    assert again.keys["k"] is first.keys["k"]
    assert again.keys["j"] is first.keys["j"]
    fewer = plan(config(30), {"k": listing["k"][:1]}, first)
    assert fewer.keys["j"] is first.keys["j"]
    assert fewer.keys["k"] is not first.keys["k"]
    assert fewer.keys["k"].targets[0] is first.keys["k"].targets[0]  # "a" did not change
    slower = plan(config(60), listing, first)
    assert slower.keys["k"].targets[0] is not first.keys["k"].targets[0]
    assert slower.keys["k"].targets[0].interval_seconds == 60


def test_planning_pauses_after_every_key_so_a_large_plan_can_share_the_loop() -> None:
    config = build_config({
        "keys": [{"name": f"k{key}", "api_key": f"master-k{key}", "api_secret": SECRET}
                 for key in range(7)],
        "accounts": [{"key": f"k{key}", "account": f"a{key}-{index}"}
                     for key in range(7) for index in range(3)],
    }, {})
    steps = planning(config)
    pauses = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            made = done.value
            break
        pauses += 1
    assert pauses == 2 * 7  # one while making each key's targets, one while stretching them
    assert made == plan(config)
