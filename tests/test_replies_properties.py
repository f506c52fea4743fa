"""Property-based tests of the reply parser: whatever bytes or JSON arrive, it returns a reply or
raises MalformedReply, and never shows more than was sent."""

import contextlib
import json
from collections.abc import Callable
from decimal import Decimal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from balance_exporter.gemini.errors import MalformedReply
from balance_exporter.gemini.replies import (
    MAX_CREATED_MS,
    MAX_NUMBER_CHARACTERS,
    BalanceReply,
    ReplyRules,
    RowCache,
    parse_account_list,
    parse_approved_addresses,
    parse_balances_reply,
    parse_notional_reply,
    parse_roles,
    parse_staking_reply,
    parse_transfers,
)
from balance_exporter.precision import Precision

RULES = ReplyRules(Precision({"USD": 2}, default_places=8), max_timestamp_skew_seconds=300)
NOW_NS = 1_800_000_000 * 10**9

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# Rows that look like Gemini's, with any value in any field.
fields = st.sampled_from(["currency", "amount", "available", "availableForWithdrawal",
                          "pendingWithdrawal", "pendingDeposit", "_timestamp", "type"])
row_like = st.dictionaries(fields, json_values | st.sampled_from(["BTC", "USD", "1.5", "-2"]),
                           max_size=8)


def parse_or_malformed(body: bytes) -> BalanceReply | None:
    try:
        return parse_balances_reply(body, RULES, NOW_NS)
    except MalformedReply:
        return None


@given(st.binary(max_size=300))
def test_any_bytes_give_a_reply_or_malformed(body: bytes) -> None:
    parse_or_malformed(body)


@given(json_values)
def test_any_json_gives_a_reply_or_malformed(document: object) -> None:
    parse_or_malformed(json.dumps(document).encode())


@given(st.lists(row_like, max_size=5))
def test_rows_of_any_content_give_a_reply_or_malformed(rows: list[dict[str, object]]) -> None:
    parse_or_malformed(json.dumps(rows).encode())


# Any precision, as long as the number's text is one the parser reads at all (a longer one is
# malformed by design, MAX_NUMBER_CHARACTERS): hypothesis found 101-character ones.
amounts = st.decimals(allow_nan=False, allow_infinity=False, min_value=Decimal("-1e25"),
                      max_value=Decimal("1e25"), places=None).filter(
    lambda value: len(format(value, "f")) <= MAX_NUMBER_CHARACTERS)


@settings(max_examples=300)
@given(amounts, st.sampled_from(["USD", "BTC", "XYZ"]), st.booleans())
def test_a_value_is_never_above_what_was_sent(
    amount: Decimal, currency: str, as_string: bool
) -> None:
    text = format(amount, "f") if as_string else None
    raw = f'"{text}"' if text is not None else format(amount, "f")
    body = (f'[{{"currency":"{currency}","amount":{raw},"available":{raw},'
            f'"availableForWithdrawal":{raw}}}]').encode()
    parsed = parse_or_malformed(body)
    assert parsed is not None, body
    (balance,) = parsed.rows
    # Float rounding is monotonic, so floor(x) <= x holds after both become floats.
    assert balance.amount <= float(amount)
    assert balance.available == balance.amount == balance.available_for_withdrawal


def _reply_or_malformed(parse: Callable[[bytes], object], body: bytes) -> None:
    with contextlib.suppress(MalformedReply):
        parse(body)


TREASURY_PARSERS: dict[str, Callable[[bytes], object]] = {
    "notional": lambda body: parse_notional_reply(body, RULES, NOW_NS, "USD"),
    "staking": lambda body: parse_staking_reply(body, RULES, NOW_NS),
    "account_list": parse_account_list,
    "approved_addresses": lambda body: parse_approved_addresses(body, RULES, NOW_NS),
    "transfers": lambda body: parse_transfers(body, RULES),
}
treasury_fields = st.sampled_from([
    "currency", "amountNotional", "availableNotional", "availableForWithdrawalNotional",
    "balance", "available", "availableForWithdrawal", "balanceByProvider", "_timestamp", "type",
    "account", "name", "status"])
treasury_rows = st.dictionaries(
    treasury_fields, json_values | st.sampled_from(["ETH", "1.5", "open", "exchange", "desk"])
    | st.dictionaries(st.text(max_size=40), json_values, max_size=4), max_size=10)


@pytest.mark.parametrize("endpoint", TREASURY_PARSERS)
@given(body=st.binary(max_size=300) | st.builds(lambda v: json.dumps(v).encode(), json_values)
       | st.builds(lambda rows: json.dumps(rows).encode(), st.lists(treasury_rows, max_size=5)))
def test_treasury_replies_of_any_content_give_a_reply_or_malformed(
    endpoint: str, body: bytes
) -> None:
    _reply_or_malformed(TREASURY_PARSERS[endpoint], body)


@settings(max_examples=200)
@given(amounts, st.dictionaries(st.uuids().map(str), amounts, max_size=5), st.booleans())
def test_staked_amounts_are_never_above_what_was_sent(
    balance: Decimal, providers: dict[str, Decimal], as_string: bool
) -> None:
    def sent(value: Decimal) -> str:
        # As JSON text: a string of the decimal, or the decimal as a bare JSON number.
        return f'"{value:f}"' if as_string else format(value, "f")
    by_provider = ",".join(f'"{provider}":{sent(amount)}' for provider, amount in providers.items())
    body = (f'[{{"type":"Staking","currency":"ETH","balance":{sent(balance)},'
            f'"available":{sent(balance)},"availableForWithdrawal":{sent(balance)},'
            f'"balanceByProvider":{{{by_provider}}}}}]').encode()
    (parsed,) = parse_staking_reply(body, RULES, NOW_NS).rows
    # Float rounding is monotonic, so floor(x) <= x holds after both become floats.
    assert parsed.balance <= float(balance)
    assert len(parsed.by_provider) == len(providers)
    for provider, amount in parsed.by_provider:
        assert amount <= float(providers[provider])


created_values = (st.integers(min_value=-5, max_value=MAX_CREATED_MS + 5)
                  | st.floats(allow_nan=False, allow_infinity=False)
                  | st.text(max_size=12) | st.integers(0, 10**16).map(str)
                  | st.none() | st.booleans())


@given(st.lists(created_values, max_size=8))
def test_a_listing_pages_from_the_oldest_whole_millisecond_it_was_sent(
    created: list[object],
) -> None:
    rows = [{"account": f"a{index}", "type": "exchange", "status": "open", "created": value}
            for index, value in enumerate(created)]
    listing = parse_account_list(json.dumps(rows).encode())
    def as_time(value: object) -> int | None:
        if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 15:
            value = int(value)
        if (isinstance(value, int | float) and not isinstance(value, bool)
                and float(value).is_integer() and 0 <= value <= MAX_CREATED_MS):
            return int(value)
        return None
    times = [time for value in created if (time := as_time(value)) is not None]
    assert listing.oldest_created_ms == (min(times) if times else None)
    assert len(listing.accounts) == len(created)


ROLE_FIELDS = ("isAuditor", "isFundManager", "isTrader", "isAccountAdmin")


@given(st.dictionaries(st.sampled_from([*ROLE_FIELDS, "counterparty_id", "other"]),
                       json_values, max_size=6))
def test_a_role_is_held_only_when_the_reply_says_true(reply: dict[str, object]) -> None:
    """Never more read than sent: a role counts as held only for a JSON `true`, a required
    field that is not a boolean makes the reply malformed, and isAccountAdmin may be absent."""
    try:
        body = json.dumps(reply, allow_nan=False).encode()
    except ValueError:  # an infinity: not JSON at all, and malformed for that alone
        assume(False)
    required_ok = all(isinstance(reply.get(name), bool) for name in ROLE_FIELDS[:3])
    admin = reply.get("isAccountAdmin")
    if not required_ok or not (admin is None or isinstance(admin, bool)):
        with pytest.raises(MalformedReply):
            parse_roles(body)
        return
    roles = parse_roles(body)
    assert roles.held() == {
        "auditor": reply["isAuditor"], "fund_manager": reply["isFundManager"],
        "trader": reply["isTrader"], **({} if admin is None else {"account_admin": admin})}
    assert set(roles.beyond_auditor) == {role for role, held in roles.held().items()
                                         if held and role != "auditor"}


# Allow-list entries as Gemini's, with any value in any field.
allow_list_fields = st.sampled_from(["network", "scope", "label", "status", "createdAt",
                                     "address"])
allow_list_entries = st.dictionaries(
    allow_list_fields, json_values | st.sampled_from([
        "account", "group", "active", "pending-time", "pending-mua", "1700000000000", "bc1q"]),
    max_size=6)


@given(st.lists(allow_list_entries, max_size=8) | json_values)
def test_an_allow_list_of_any_entries_is_read_whole_or_refused(listed: object) -> None:
    """Never more entries counted than were sent, each one as sent, and its labels bounded."""
    body = json.dumps({"approvedAddresses": listed}).encode()
    try:
        reply = parse_approved_addresses(body, RULES, NOW_NS)
    except MalformedReply:
        return
    assert isinstance(listed, list)
    assert len(reply.entries) == len(listed)
    for entry, sent in zip(reply.entries, listed, strict=True):
        assert entry.address == sent["address"]
        assert entry.address
        assert entry.scope in ("account", "group", "other")
        assert entry.status in ("active", "pending_time", "pending_mua", "other")
        assert entry.created_ms is None or 0 <= entry.created_ms <= MAX_CREATED_MS


transfer_fields = st.sampled_from(["type", "status", "timestampms", "eid", "currency", "amount",
                                   "network", "destination", "txHash"])
transfer_rows = st.dictionaries(transfer_fields, json_values | st.sampled_from([
    "Deposit", "Withdrawal", "Pending", "Complete", "USD", "BTC", "1700000000000", "0.5"]),
    max_size=9)


@given(st.lists(transfer_rows, max_size=6))
def test_transfer_rows_of_any_content_are_read_whole_or_refused(rows: list[object]) -> None:
    try:
        transfers = parse_transfers(json.dumps(rows).encode(), RULES)
    except MalformedReply:
        return
    assert len(transfers) == len(rows)
    assert len({transfer.eid for transfer in transfers}) == len(rows)


@settings(max_examples=200)
@given(amounts, st.sampled_from(["USD", "BTC", "ETH"]))
def test_a_transfer_amount_is_never_above_what_was_sent(amount: Decimal, currency: str) -> None:
    assume(amount >= 0)
    row = {"eid": 1, "timestampms": 1, "currency": currency, "amount": str(amount)}
    (transfer,) = parse_transfers(json.dumps([row]).encode(), RULES)
    assert transfer.amount <= amount


cached_rows = st.lists(st.fixed_dictionaries({
    "currency": st.sampled_from(["BTC", "USD", "ETH"]),
    "amount": st.sampled_from(["1.5", "2", "0.123456789", "x"]),
    "available": st.sampled_from(["1", "1.25"]),
    "availableForWithdrawal": st.sampled_from(["1", "0"]),
    "_timestamp": st.integers(1, 10**12),
}), max_size=4)


@settings(max_examples=200)
@given(st.lists(cached_rows, min_size=1, max_size=6))
def test_a_row_cache_never_changes_what_a_reply_parses_to(replies: list[object]) -> None:
    """Replies one after another, through one cache and through none: the same rows, or the
    same refusal, every time."""
    cache = RowCache()
    for rows in replies:
        body = json.dumps(rows).encode()
        try:
            expected = parse_balances_reply(body, RULES, NOW_NS)
        except MalformedReply:
            with pytest.raises(MalformedReply):
                parse_balances_reply(body, RULES, NOW_NS, cache)
            continue
        assert parse_balances_reply(body, RULES, NOW_NS, cache) == expected
