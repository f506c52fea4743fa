import json
from decimal import Decimal

import pytest

from balance_exporter.gemini.errors import MalformedReply
from balance_exporter.gemini.replies import (
    BalanceReply,
    CurrencyBalance,
    ReplyRules,
    RowCache,
    _parse_rows,
    parse_balances_reply,
    parse_timestamp_ns,
)
from balance_exporter.precision import Precision

PRECISION = Precision({"USD": 2, "BTC": 8}, default_places=8)
RULES = ReplyRules(PRECISION, max_timestamp_skew_seconds=300)
STAMP_NS = 1_710_547_200_000_000_000
# This host's clock in these tests: an hour after the replies' stamps.
NOW_NS = STAMP_NS + 3600 * 10**9


def parse(body: bytes, rules: ReplyRules = RULES, now_ns: int = NOW_NS) -> BalanceReply:
    return parse_balances_reply(body, rules, now_ns)


def reply(*rows: dict[str, object]) -> bytes:
    return json.dumps(list(rows)).encode()


def row(currency: str = "BTC", amount: object = "5.0", **extra: object) -> dict[str, object]:
    return {"type": "exchange", "currency": currency, "amount": amount, "available": amount,
            "availableForWithdrawal": amount, **extra}


def test_reference_page_example_parses() -> None:
    body = reply(
        row("BTC", "5.0", available="4.5", availableForWithdrawal="4.5", _timestamp=STAMP_NS),
        row("USD", "15000.00", available="5000.00", availableForWithdrawal="5000.00",
            _timestamp=STAMP_NS),
    )
    parsed = parse(body)
    assert parsed.server_timestamp_ns == STAMP_NS
    assert parsed.account_type == "exchange"
    btc, usd = parsed.rows
    assert (btc.currency, btc.amount, btc.available, btc.available_for_withdrawal) == (
        "BTC", 5.0, 4.5, 4.5)
    assert (usd.amount, usd.available) == (15000.0, 5000.0)
    assert (btc.pending_withdrawal, btc.pending_deposit) == (0.0, 0.0)


@pytest.mark.parametrize("amount", ["5.25", 5.25, 5, "0", "1e2", "-0.5E-3"])
def test_amounts_as_strings_or_numbers(amount: object) -> None:
    body = f'[{{"currency":"BTC","amount":{json.dumps(amount)},"available":0,' \
           f'"availableForWithdrawal":0}}]'.encode()
    assert parse(body).rows[0].amount == float(Decimal(
        str(amount).strip()))


def test_number_literals_are_read_as_decimal_not_float() -> None:
    # Through float this would round up to 1.0, more than the account holds.
    body = b'[{"currency":"BTC","amount":0.999999999999999999,"available":0,' \
           b'"availableForWithdrawal":0}]'
    assert parse(body).rows[0].amount == 0.99999999


@pytest.mark.parametrize(("currency", "raw", "expected"), [
    ("USD", "15000.009999999999999", 15000.0),      # fiat truncated to 15 places, floored to 2
    ("BTC", "1.1234567899999999999999", 1.12345678),  # crypto with 19+ places, floored to 8
    ("BTC", "-0.000000015", -0.00000002),            # floor goes down for negatives too
    ("XYZ", "1.123456789", 1.12345678),              # unknown currency: the default places
    ("usd", "1.999", 1.99),                          # precision matched case-insensitively
    ("BTC", "123456789012.1234567890123456789", 123456789012.12345678),  # > 28 digits
])
def test_values_are_floored_to_the_currency_precision(
    currency: str, raw: str, expected: float
) -> None:
    parsed = parse(reply(row(currency, raw)))
    assert parsed.rows[0].amount == expected


def test_negative_amounts_are_values_not_errors() -> None:
    assert parse(reply(row("USD", "-12.50"))).rows[0].amount == -12.5


def test_pending_fields_are_read_when_present() -> None:
    parsed = parse(reply(row("BTC", "1", pendingWithdrawal="0.25", pendingDeposit=0.5)))
    assert (parsed.rows[0].pending_withdrawal, parsed.rows[0].pending_deposit) == (
        0.25, 0.5)


def test_empty_reply_means_no_balances() -> None:
    parsed = parse(b"[]")
    assert parsed.rows == ()
    assert parsed.server_timestamp_ns is None


@pytest.mark.parametrize(("raw", "expected_ns"), [
    (1_710_547_200_000_000_000, 1_710_547_200_000_000_000),
    ("1710547200000000001", 1_710_547_200_000_000_001),
    ("2024-03-16T00:00:00.000000Z", 1_710_547_200_000_000_000),
    ("2024-03-16T00:00:00Z", 1_710_547_200_000_000_000),
    ("2024-03-16T00:00:00.123456789Z", 1_710_547_200_123_456_789),
    ("2024-03-16T00:00:00.5Z", 1_710_547_200_500_000_000),
    ("2024-03-16T01:30:00.000+01:30", 1_710_547_200_000_000_000),
    ("2024-03-15T19:00:00-0500", 1_710_547_200_000_000_000),
])
def test_both_timestamp_forms_become_integer_nanoseconds(raw: object, expected_ns: int) -> None:
    assert parse_timestamp_ns(raw) == expected_ns


def test_iso_and_integer_stamps_compare_on_one_scale() -> None:
    iso = parse_timestamp_ns("2024-03-16T00:00:00.000000001Z")
    assert iso > parse_timestamp_ns(1_710_547_200_000_000_000)


@pytest.mark.parametrize("raw", [
    "yesterday", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z", "2024-03-16T00:00:00",
    "2024-03-16T00:00:00.1234567890Z", True, None, [], -5, 0, Decimal("1.5"),
])
def test_bad_timestamps_are_malformed(raw: object) -> None:
    with pytest.raises(MalformedReply):
        parse_timestamp_ns(raw)


def test_reply_stamp_is_the_largest_row_stamp() -> None:
    parsed = parse(reply(
        row("BTC", _timestamp=STAMP_NS), row("USD", _timestamp=STAMP_NS + 7), row("ETH")))
    assert parsed.server_timestamp_ns == STAMP_NS + 7


@pytest.mark.parametrize(("body", "complaint"), [
    (b"<html><body>502 Bad Gateway</body></html>", "not JSON"),
    (b'{"currency": "BTC"}', "expected a JSON array"),
    (b"[1]", "expected an object"),
    (b'[{"amount": "1", "available": "1", "availableForWithdrawal": "1"}]', "not a currency"),
    (b'[{"currency": "", "amount": "1", "available": "1", "availableForWithdrawal": "1"}]',
     "not a currency"),
    (b'[{"currency": "BTC", "amount": "NaN", "available": "1", "availableForWithdrawal": "1"}]',
     "not a JSON number"),
    (b'[{"currency": "BTC", "amount": NaN, "available": "1", "availableForWithdrawal": "1"}]',
     "NaN"),
    (b'[{"currency": "BTC", "amount": "Infinity", "available": "1",'
     b' "availableForWithdrawal": "1"}]', "not a JSON number"),
    (b'[{"currency": "BTC", "amount": Infinity, "available": "1",'
     b' "availableForWithdrawal": "1"}]', "Infinity"),
    (b'[{"currency": "BTC", "amount": "5,0", "available": "1", "availableForWithdrawal": "1"}]',
     "is not a JSON number"),
    (b'[{"currency": "BTC", "amount": true, "available": "1", "availableForWithdrawal": "1"}]',
     "expected a number"),
    (b'[{"currency": "BTC", "amount": "1", "available": "1"}]', "availableForWithdrawal"),
    (b'[{"currency": "BTC", "amount": "1", "available": "1", "availableForWithdrawal": "1",'
     b' "pendingDeposit": "lots"}]', "pendingDeposit"),
    (b'[{"currency": "BTC", "amount": "1", "available": "1", "availableForWithdrawal": "1"},'
     b' {"currency": "BTC", "amount": "2", "available": "2", "availableForWithdrawal": "2"}]',
     "appears twice"),
    (b'[{"currency": "BTC", "amount": "1", "available": "1", "availableForWithdrawal": "1",'
     b' "_timestamp": "soon"}]', "_timestamp"),
    (b"\xff\xfe", "not JSON"),
])
def test_one_bad_row_makes_the_whole_reply_malformed(body: bytes, complaint: str) -> None:
    good_row = b'{"currency": "USD", "amount": "1", "available": "1", ' \
               b'"availableForWithdrawal": "1"}'
    if body.startswith(b"[{"):
        body = b"[" + good_row + b", " + body[1:]
    with pytest.raises(MalformedReply, match=complaint):
        parse(body)


def test_a_stamp_too_far_ahead_of_this_clock_is_malformed_and_says_why() -> None:
    ahead = NOW_NS + 301 * 10**9
    with pytest.raises(MalformedReply, match="ahead of this host's clock") as caught:
        parse(reply(row("BTC", _timestamp=ahead)))
    assert caught.value.reason == "FutureTimestamp"
    # Within the skew it is fine, and 0 turns the check off.
    assert parse(reply(row("BTC", _timestamp=NOW_NS + 299 * 10**9))).rows
    year_2100 = "2100-01-01T00:00:00Z"
    assert parse(reply(row("BTC", _timestamp=year_2100)),
                 ReplyRules(PRECISION, max_timestamp_skew_seconds=0)).server_timestamp_ns


def test_stamps_far_in_the_past_are_legal() -> None:
    assert parse(reply(row("BTC", _timestamp="1990-01-01T00:00:00Z"))).server_timestamp_ns


HOSTILE_BODIES = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "huge exponent literal": b'[{"currency":"BTC","amount":1e999999,"available":0,'
                             b'"availableForWithdrawal":0}]',
    "huge exponent string": b'[{"currency":"BTC","amount":"1e999999","available":"0",'
                            b'"availableForWithdrawal":"0"}]',
    "100k digits": b'[{"currency":"BTC","amount":' + b"9" * 100_000
                   + b',"available":0,"availableForWithdrawal":0}]',
    "100k digit string": b'[{"currency":"BTC","amount":"' + b"9" * 100_000
                         + b'","available":"0","availableForWithdrawal":"0"}]',
    "underscores": b'[{"currency":"BTC","amount":"1_000_000","available":"0",'
                   b'"availableForWithdrawal":"0"}]',
    "arabic digits": '[{"currency":"BTC","amount":"١٢٣","available":"0",'
                     '"availableForWithdrawal":"0"}]'.encode(),
    "padded number": b'[{"currency":"BTC","amount":" 5","available":"0",'
                     b'"availableForWithdrawal":"0"}]',
    "duplicate keys": b'[{"currency":"BTC","amount":"1","amount":"999","available":"0",'
                      b'"availableForWithdrawal":"0"}]',
    "surrogate currency": b'[{"currency":"\\ud800","amount":"1","available":"0",'
                          b'"availableForWithdrawal":"0"}]',
    "long currency": b'[{"currency":"' + b"A" * 200 + b'","amount":"1","available":"0",'
                     b'"availableForWithdrawal":"0"}]',
    "currency with a quote": b'[{"currency":"B\\"TC","amount":"1","available":"0",'
                             b'"availableForWithdrawal":"0"}]',
    "one currency twice, in two cases": b'[{"currency":"BTC","amount":"1","available":"0",'
                                        b'"availableForWithdrawal":"0"},{"currency":"btc",'
                                        b'"amount":"999","available":"0",'
                                        b'"availableForWithdrawal":"0"}]',
    "absurd row count": json.dumps([row(f"C{index}") for index in range(2001)]).encode(),
    "huge timestamp": b'[{"currency":"BTC","amount":"1","available":"0",'
                      b'"availableForWithdrawal":"0","_timestamp":' + b"9" * 40 + b"}]",
}


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES)
def test_hostile_bodies_are_malformed_replies_not_crashes(body: bytes) -> None:
    with pytest.raises(MalformedReply) as caught:
        parse(body, ReplyRules(PRECISION, max_timestamp_skew_seconds=0))
    assert len(str(caught.value)) < 500  # what is logged stays short whatever was sent


def test_the_row_limit_is_inclusive() -> None:
    assert len(parse(json.dumps([row(f"C{index}") for index in range(2000)]).encode())
               .rows) == 2000


def test_an_odd_account_type_is_ignored_not_made_a_label() -> None:
    assert parse(reply(row("BTC", type="Exchange <script>"))).account_type is None


def amount_row(amount: str) -> bytes:
    return (f'[{{"currency":"BTC","amount":{amount},"available":0,'
            f'"availableForWithdrawal":0}}]').encode()


def test_number_length_is_bounded_at_100_characters() -> None:
    at_bound = "1." + "1" * 98  # 100 characters
    assert parse(amount_row(at_bound)).rows[0].amount == 1.11111111
    with pytest.raises(MalformedReply, match="101 characters"):
        parse(amount_row(at_bound + "1"))
    with pytest.raises(MalformedReply, match="not a JSON number"):
        parse(amount_row(f'"{at_bound}1"'))


def test_amounts_are_bounded_below_10_to_the_30() -> None:
    assert parse(amount_row("9.99e29")).rows[0].amount == 9.99e29
    with pytest.raises(MalformedReply, match="out of range"):
        parse(amount_row("1e30"))
    with pytest.raises(MalformedReply, match="out of range"):
        parse(amount_row('"-1e30"'))


def test_timestamps_are_bounded_at_25_digits() -> None:
    assert parse_timestamp_ns("9" * 25) == int("9" * 25)
    with pytest.raises(MalformedReply):
        parse_timestamp_ns("9" * 26)


def test_a_row_whose_fields_did_not_change_is_not_parsed_again() -> None:
    calls = []

    def counted(raw: object, index: int) -> tuple[CurrencyBalance, int]:
        calls.append(index)
        assert isinstance(raw, dict)
        return CurrencyBalance(str(raw["currency"]), 1.0, 1.0, 1.0, 0.0, 0.0), 0
    cache = RowCache()
    rows = [{"currency": "BTC", "amount": "1", "_timestamp": 5},
            {"currency": "USD", "amount": "2", "_timestamp": 5}]
    first = _parse_rows(json.dumps(rows).encode(), RULES, NOW_NS, "balances", counted, cache)
    rows[0]["_timestamp"] = rows[1]["_timestamp"] = 6  # a newer reply, the same values
    rows[1]["amount"] = "3"  # but USD moved
    again = _parse_rows(json.dumps(rows).encode(), RULES, NOW_NS, "balances", counted, cache)
    assert calls == [0, 1, 1]  # only USD parsed again
    assert again.rows == first.rows
    assert again.server_timestamp_ns == 6
    # Other rules: everything parsed again.
    other = ReplyRules(RULES.precision, RULES.max_timestamp_skew_seconds + 1)
    _parse_rows(json.dumps(rows).encode(), other, NOW_NS, "balances", counted, cache)
    assert calls == [0, 1, 1, 0, 1]
