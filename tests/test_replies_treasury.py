"""The notional, staking, account-list and allow-list parsers: the balances rules hold for each
(strict numbers, one bad row rejects the reply, stamps in both forms, future stamps refused)."""

import json
from decimal import Decimal

import pytest

from balance_exporter.gemini.errors import MalformedReply
from balance_exporter.gemini.replies import (
    MAX_APPROVED_ADDRESSES,
    MAX_PROVIDERS_PER_ROW,
    MAX_ROWS,
    ApprovedAddress,
    ReplyRules,
    parse_account_list,
    parse_approved_addresses,
    parse_notional_reply,
    parse_staking_reply,
)
from balance_exporter.precision import Precision
from balance_exporter.targets import ListedAccount

RULES = ReplyRules(Precision({"USD": 2, "ETH": 18}, default_places=8), 300)
STAMP_NS = 1_710_547_200_000_000_000
NOW_NS = STAMP_NS + 3600 * 10**9
ISO_STAMP = "2024-03-16T00:00:00.000000Z"
PROVIDER = "5d3c9a0e-8f0b-4c8e-9a52-0e6f1f6d2a11"


def body(*rows: object) -> bytes:
    return json.dumps(list(rows)).encode()


def notional_row(currency: str = "BTC", value: object = "325000.123456", **extra: object
                 ) -> dict[str, object]:
    return {"currency": currency, "amount": "5", "amountNotional": value, "available": "4.5",
            "availableNotional": value, "availableForWithdrawal": "4.5",
            "availableForWithdrawalNotional": value, **extra}


def staking_row(currency: str = "ETH", providers: object = None, **extra: object
                ) -> dict[str, object]:
    row: dict[str, object] = {"type": "Staking", "currency": currency, "balance": "32.5",
                              "available": "32", "availableForWithdrawal": "30", **extra}
    if providers is not None:
        row["balanceByProvider"] = providers
    return row


def test_notional_values_are_floored_to_the_quote_currencys_precision() -> None:
    reply = parse_notional_reply(body(notional_row("BTC", "325000.129"),
                                      notional_row("ETH", 9600.999)), RULES, NOW_NS, "USD")
    btc, eth = reply.rows
    assert (btc.currency, btc.amount, btc.available, btc.available_for_withdrawal) == (
        "BTC", 325000.12, 325000.12, 325000.12)
    assert eth.amount == 9600.99  # floored to USD's 2 places, not ETH's 18


@pytest.mark.parametrize("stamp", [STAMP_NS, ISO_STAMP])
def test_notional_and_staking_stamps_take_both_forms(stamp: object) -> None:
    notional = parse_notional_reply(body(notional_row(_timestamp=stamp)), RULES, NOW_NS, "USD")
    staking = parse_staking_reply(body(staking_row(_timestamp=stamp)), RULES, NOW_NS)
    assert notional.server_timestamp_ns == staking.server_timestamp_ns == STAMP_NS


@pytest.mark.parametrize("bad", [
    notional_row(value="1_000"), notional_row(value=True), notional_row(value="Infinity"),
    {"currency": "BTC", "amountNotional": "1", "availableNotional": "1"},
    notional_row(currency="b t c"), "BTC",
])
def test_one_bad_notional_row_makes_the_reply_malformed(bad: object) -> None:
    with pytest.raises(MalformedReply):
        parse_notional_reply(body(notional_row("USD", "1"), bad), RULES, NOW_NS, "USD")


def test_a_notional_stamp_from_the_future_is_malformed() -> None:
    future = NOW_NS + 3600 * 10**9
    with pytest.raises(MalformedReply) as raised:
        parse_notional_reply(body(notional_row(_timestamp=future)), RULES, NOW_NS, "USD")
    assert raised.value.reason == "FutureTimestamp"


def test_staking_rows_with_providers_as_amounts_or_objects() -> None:
    reply = parse_staking_reply(body(
        staking_row("ETH", {PROVIDER: "20.5", "b" + PROVIDER[1:]: 12}),
        staking_row("SOL", {PROVIDER: {"balance": "100.25"}}),
    ), RULES, NOW_NS)
    eth, sol = reply.rows
    assert (eth.balance, eth.available, eth.available_for_withdrawal) == (32.5, 32.0, 30.0)
    assert eth.by_provider == ((PROVIDER, 20.5), ("b" + PROVIDER[1:], 12.0))
    assert sol.by_provider == ((PROVIDER, 100.25),)
    assert reply.skipped_entries == 0
    assert reply.account_type is None  # "Staking" is a row type, not the account's


@pytest.mark.parametrize(("providers", "skipped"), [
    ({PROVIDER: "lots"}, 1),
    ({PROVIDER: {"stake": "1"}}, 1),
    ({PROVIDER: [1, 2]}, 1),
    ({"not a provider id!": "1"}, 1),
    ({PROVIDER: "1e999"}, 1),
    ("a string", 1),
    ([PROVIDER], 1),
    ({f"p{i}": "1" for i in range(MAX_PROVIDERS_PER_ROW + 3)}, 3),
])
def test_unreadable_provider_entries_are_skipped_and_counted_and_totals_stay(
    providers: object, skipped: int
) -> None:
    reply = parse_staking_reply(body(staking_row("ETH", providers)), RULES, NOW_NS)
    (eth,) = reply.rows
    assert eth.balance == 32.5
    assert reply.skipped_entries == skipped


def test_a_bad_staking_total_makes_the_reply_malformed() -> None:
    with pytest.raises(MalformedReply):
        parse_staking_reply(body(staking_row(), staking_row("SOL", balance="1e99")), RULES,
                            NOW_NS)


def test_staking_amounts_never_go_through_float() -> None:
    reply = parse_staking_reply(body(staking_row("ETH", {PROVIDER: "0.1000000000000000055"},
                                                 balance="0.1000000000000000055")), RULES, NOW_NS)
    (eth,) = reply.rows
    assert eth.balance == float(Decimal("0.100000000000000005"))


LISTING = [
    {"name": "Primary", "account": "primary", "type": "exchange",
     "counterparty_id": "EMONNYXH0000", "created": 1589310000000, "status": "open"},
    {"name": "Cold storage", "account": "vault", "type": "custody", "status": "open"},
    {"name": "Old desk", "account": "old-desk", "type": "exchange", "status": "closed"},
    {"name": "Legacy", "account": "legacy"},
    {"name": "Odd\nname" + "x" * 100, "account": "odd", "type": "margin", "status": "frozen"},
]


def test_account_listing_rows_become_listed_accounts() -> None:
    listing = parse_account_list(json.dumps(LISTING).encode())
    assert listing.accounts[:4] == (
        ListedAccount("primary", "Primary", "exchange", "open"),
        ListedAccount("vault", "Cold storage", "custody", "open"),
        ListedAccount("old-desk", "Old desk", "exchange", "closed"),
        ListedAccount("legacy", "Legacy", "exchange", "open"),  # older listings: no status
    )
    odd = listing.accounts[4]
    assert (odd.account_type, odd.status) == ("other", "other")
    assert odd.display_name == ("Oddname" + "x" * 100)[:64]
    assert [account.pollable for account in listing.accounts] == [True, False, False, True,
                                                                  False]


@pytest.mark.parametrize("bad", [
    {"listing": []}, [{"account": 7}], [{"account": "has space"}], [{"account": ""}],
    [{"account": "a"}, {"account": "a"}], ["primary"], [{"name": "no short name"}],
])
def test_a_listing_with_a_bad_row_is_malformed(bad: object) -> None:
    with pytest.raises(MalformedReply):
        parse_account_list(json.dumps(bad).encode())


def test_provider_limits_hold_at_and_just_past_the_bound() -> None:
    at_bound = {f"p{i}": "1" for i in range(MAX_PROVIDERS_PER_ROW)}
    assert parse_staking_reply(body(staking_row("ETH", at_bound)), RULES, NOW_NS
                               ).skipped_entries == 0
    longest, too_long = "p" * 64, "p" * 65
    reply = parse_staking_reply(body(staking_row("ETH", {longest: "1", too_long: "2"})), RULES,
                                NOW_NS)
    assert [provider for provider, _ in reply.rows[0].by_provider] == [longest]
    assert reply.skipped_entries == 1


def test_listing_limits_hold_at_and_just_past_the_bound() -> None:
    longest_name = "a" * 128
    listing = parse_account_list(json.dumps([
        {"account": longest_name, "name": "n" * 64},
        {"account": "b", "name": "n" * 65}]).encode())
    assert listing.accounts[0].short_name == longest_name
    assert [account.display_name for account in listing.accounts] == ["n" * 64, "n" * 64]
    with pytest.raises(MalformedReply):
        parse_account_list(json.dumps([{"account": "a" * 129}]).encode())
    rows = [{"account": f"a{i}"} for i in range(MAX_ROWS)]
    assert len(parse_account_list(json.dumps(rows).encode()).accounts) == MAX_ROWS
    with pytest.raises(MalformedReply):
        parse_account_list(json.dumps([*rows, {"account": "one-more"}]).encode())


def allow_list(*entries: object, **extra: object) -> bytes:
    return json.dumps({"approvedAddresses": list(entries), **extra}).encode()


def entry(address: object = "bc1qcold", **fields: object) -> dict[str, object]:
    return {"network": "bitcoin", "scope": "account", "label": "Cold", "status": "active",
            "createdAt": "1700000000000", "address": address, **fields}


def test_allow_list_entries_keep_scope_status_label_address_and_creation() -> None:
    reply = parse_approved_addresses(allow_list(
        entry(),
        entry("0xgroup", scope="group", status="pending-time", label="Desk",
              createdAt=1_700_000_100_000),
        entry("held", status="pending-mua", createdAt=None),
        entry("odd", scope="team", status="frozen", label=7),
        {"address": "bare"},  # every field but the address may be left out
    ), RULES, NOW_NS)
    assert reply.entries == (
        ApprovedAddress("account", "active", "bc1qcold", "Cold", 1_700_000_000_000),
        ApprovedAddress("group", "pending_time", "0xgroup", "Desk", 1_700_000_100_000),
        ApprovedAddress("account", "pending_mua", "held", "Cold", None),
        ApprovedAddress("other", "other", "odd", "", 1_700_000_000_000),
        ApprovedAddress("other", "other", "bare", "", None),
    )
    assert reply.server_timestamp_ns is None


@pytest.mark.parametrize("bad", [
    [entry()],  # not the documented object
    {"addresses": [entry()]}, {"approvedAddresses": {"0": entry()}},
    {"approvedAddresses": [entry(address="")]}, {"approvedAddresses": [entry(address=None)]},
    {"approvedAddresses": [{"label": "no address"}]}, {"approvedAddresses": ["bc1q"]},
    {"approvedAddresses": [entry(createdAt="yesterday")]},
    {"approvedAddresses": [entry(createdAt=-1)]},
    {"approvedAddresses": [entry(createdAt=1.5)]},
    {"approvedAddresses": [entry(createdAt=str(10**15))]},
], ids=["a list", "no approvedAddresses", "a mapping", "empty address", "null address",
        "no address", "a string entry", "words for createdAt", "negative createdAt",
        "fractional createdAt", "createdAt past any time"])
def test_a_malformed_allow_list_is_refused_whole(bad: object) -> None:
    with pytest.raises(MalformedReply):
        parse_approved_addresses(json.dumps(bad).encode(), RULES, NOW_NS)


def test_allow_list_limits_hold_at_and_just_past_the_bound() -> None:
    entries = [entry(f"a{i}") for i in range(MAX_APPROVED_ADDRESSES)]
    assert len(parse_approved_addresses(allow_list(*entries), RULES, NOW_NS).entries) == (
        MAX_APPROVED_ADDRESSES)
    with pytest.raises(MalformedReply, match="more than the 10000"):
        parse_approved_addresses(allow_list(*entries, entry("one-more")), RULES, NOW_NS)


def test_an_allow_list_stamp_is_read_and_one_from_the_future_refused() -> None:
    assert parse_approved_addresses(allow_list(entry(), _timestamp=ISO_STAMP), RULES, NOW_NS
                                    ).server_timestamp_ns == STAMP_NS
    with pytest.raises(MalformedReply, match="ahead of this host's clock"):
        parse_approved_addresses(allow_list(_timestamp=NOW_NS + 3600 * 10**9), RULES, NOW_NS)
