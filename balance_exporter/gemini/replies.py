"""Parsing and validating a `/v1/balances` reply.

Amounts go JSON text -> Decimal -> floored to the currency's precision -> float, never through
float first, so a value like "0.1000000000000000055" cannot round up past what the account holds.
One bad row rejects the whole reply: a half-used reply would show a mix of old and new balances.
Whatever the body holds, the parser returns a reply or raises MalformedReply: a reply from a
broken or hostile server must cost one poll, never the poller.
"""

import calendar
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from balance_exporter.gemini.errors import MalformedReply
from balance_exporter.precision import Precision

_ISO_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d{2}:?\d{2})$", re.ASCII
)
# JSON's own number grammar, for amounts sent as strings: Python's Decimal would also take
# "1_000_000", " 5", "١٢٣" or "Infinity".
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", re.ASCII)
# Gemini's currency codes are short upper-case tickers (BTC, USD, 1INCH); anything else would
# become a label value.
_CURRENCY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}", re.ASCII)
_ACCOUNT_TYPE = re.compile(r"[a-z][a-z_]{0,31}", re.ASCII)
_NS_PER_SECOND = 1_000_000_000
# Far above any real reply (Gemini lists a few hundred currencies, amounts have ~30 digits), far
# below what could hold the event loop.
MAX_ROWS = 2000
MAX_NUMBER_CHARACTERS = 100
# |amount| below 10**30 of any currency: more is no balance, and it keeps flooring exact.
MAX_AMOUNT_ADJUSTED_EXPONENT = 29
MAX_TIMESTAMP_DIGITS = 25
_SHOWN_CHARACTERS = 40
REQUIRED_FIELDS = ("amount", "available", "availableForWithdrawal")
PENDING_FIELDS = ("pendingWithdrawal", "pendingDeposit")


@dataclass(frozen=True)
class ReplyRules:
    """What a reply must meet beyond its shape: the precision to floor to, and how far ahead of
    this host's clock its `_timestamp` may be (0: no limit)."""

    precision: Precision
    max_timestamp_skew_seconds: float = 300.0


@dataclass(frozen=True, slots=True)
class CurrencyBalance:
    currency: str
    amount: float
    available: float
    available_for_withdrawal: float
    pending_withdrawal: float
    pending_deposit: float


@dataclass(frozen=True, slots=True)
class BalanceReply:
    balances: tuple[CurrencyBalance, ...]
    # The largest `_timestamp` among the rows, in nanoseconds; None when no row carries one.
    server_timestamp_ns: int | None
    account_type: str | None


def _shown(value: object) -> str:
    """A value from the reply as it may appear in a message: short, whatever was sent."""
    text = ascii(value)
    return text if len(text) <= _SHOWN_CHARACTERS else text[:_SHOWN_CHARACTERS] + "…"


def _reject_constant(name: str) -> Decimal:
    raise MalformedReply(f"JSON constant {name} is not a number Gemini sends")


def _json_number(text: str) -> Decimal:
    # Called by json for every number literal, before Python turns it into an int (whose
    # digits are limited) or a float (which would round).
    if len(text) > MAX_NUMBER_CHARACTERS:
        raise MalformedReply(f"a number of {len(text)} characters")
    return Decimal(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = dict(pairs)
    if len(row) != len(pairs):
        names = [name for name, _ in pairs]
        twice = next(name for name in names if names.count(name) > 1)
        raise MalformedReply(f"an object has the field {_shown(twice)} twice")
    return row


def _load_json(body: bytes) -> object:
    try:
        return json.loads(body, parse_float=_json_number, parse_int=_json_number,
                          parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise MalformedReply("reply is nested too deeply") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError among them
        raise MalformedReply(f"reply is not JSON ({type(error).__name__}); starts with "
                             f"{_shown(body[:40])}") from None


def _decimal_field(row: Mapping[str, Any], field: str, index: int) -> Decimal:
    raw = row.get(field)
    where = f"row {index} field {field!r}"
    # bool is an int in Python, and True is no balance.
    if isinstance(raw, bool) or not isinstance(raw, str | Decimal):
        raise MalformedReply(f"{where}: expected a number or numeric string, got {_shown(raw)}")
    if isinstance(raw, str):
        if len(raw) > MAX_NUMBER_CHARACTERS or not _JSON_NUMBER.fullmatch(raw):
            raise MalformedReply(f"{where}: {_shown(raw)} is not a JSON number")
        raw = Decimal(raw)
    if raw.is_zero():
        return Decimal(0)
    if raw.adjusted() > MAX_AMOUNT_ADJUSTED_EXPONENT:
        raise MalformedReply(f"{where}: {_shown(str(raw))} is out of range for a balance")
    return raw


def parse_timestamp_ns(raw: object) -> int:
    """`_timestamp` as integer nanoseconds, from the integer form or the ISO-8601 form."""
    stamp: int
    if isinstance(raw, int) and not isinstance(raw, bool):
        stamp = raw
    elif isinstance(raw, Decimal) and raw.is_finite() and raw == raw.to_integral_value():
        stamp = int(raw)
    elif (isinstance(raw, str) and raw.isascii() and raw.isdigit()
          and len(raw) <= MAX_TIMESTAMP_DIGITS):
        stamp = int(raw)
    elif isinstance(raw, str) and (match := _ISO_TIMESTAMP.match(raw)):
        stamp = _iso_to_ns(match)
    else:
        raise MalformedReply(f"_timestamp {_shown(raw)} is neither integer nanoseconds nor "
                             "ISO-8601")
    if stamp <= 0 or len(str(stamp)) > MAX_TIMESTAMP_DIGITS:
        raise MalformedReply(f"_timestamp {_shown(raw)} is out of range")
    return stamp


def _iso_to_ns(match: re.Match[str]) -> int:
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction, zone = match.group(7) or "", match.group(8)
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise MalformedReply(f"_timestamp {_shown(match.string)} is not a valid date") from None
    seconds = calendar.timegm(moment.timetuple())
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds * _NS_PER_SECOND + int(fraction.ljust(9, "0") or 0)


def _floored(value: Decimal, currency: str, precision: Precision) -> float:
    try:
        return float(precision.floor(value, currency))
    except InvalidOperation:  # unreachable within the range checked above; never a crash
        raise MalformedReply(f"{currency}: {_shown(str(value))} cannot be floored") from None


def _parse_row(row: object, index: int, precision: Precision) -> tuple[CurrencyBalance, int | None]:
    if not isinstance(row, dict):
        raise MalformedReply(f"row {index} is {type(row).__name__}, expected an object")
    currency = row.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise MalformedReply(f"row {index}: currency {_shown(currency)} is not a currency code")
    values = {field: _floored(_decimal_field(row, field, index), currency, precision)
              for field in REQUIRED_FIELDS}
    for field in PENDING_FIELDS:
        present = row.get(field) is not None
        values[field] = (_floored(_decimal_field(row, field, index), currency, precision)
                         if present else 0.0)
    stamp = parse_timestamp_ns(row["_timestamp"]) if "_timestamp" in row else None
    balance = CurrencyBalance(
        currency=currency,
        amount=values["amount"],
        available=values["available"],
        available_for_withdrawal=values["availableForWithdrawal"],
        pending_withdrawal=values["pendingWithdrawal"],
        pending_deposit=values["pendingDeposit"],
    )
    return balance, stamp


def _check_not_from_the_future(stamp_ns: int, now_ns: int, rules: ReplyRules) -> None:
    skew_ns = int(rules.max_timestamp_skew_seconds * _NS_PER_SECOND)
    if skew_ns > 0 and stamp_ns > now_ns + skew_ns:
        ahead = (stamp_ns - now_ns) / _NS_PER_SECOND
        raise MalformedReply(
            f"_timestamp is {ahead:.0f}s ahead of this host's clock (more than "
            f"gemini.max_timestamp_skew_seconds, {rules.max_timestamp_skew_seconds:g}s)",
            reason="FutureTimestamp")


def parse_balances_reply(body: bytes, rules: ReplyRules, now_ns: int) -> BalanceReply:
    """The reply's balances; `now_ns` is this host's wall clock, for the future-stamp check."""
    document = _load_json(body)
    if not isinstance(document, list):
        raise MalformedReply(f"expected a JSON array of balances, got {type(document).__name__}")
    if len(document) > MAX_ROWS:
        raise MalformedReply(f"{len(document)} rows, more than the {MAX_ROWS} a reply may have")
    balances: list[CurrencyBalance] = []
    stamps: list[int] = []
    seen: set[str] = set()
    account_types: set[str] = set()
    for index, row in enumerate(document):
        balance, stamp = _parse_row(row, index, rules.precision)
        # Precision matches currencies case-insensitively; so does "the same currency twice".
        if balance.currency.upper() in seen:
            raise MalformedReply(f"row {index}: currency {balance.currency!r} appears twice")
        seen.add(balance.currency.upper())
        balances.append(balance)
        if stamp is not None:
            stamps.append(stamp)
        kind = row.get("type")
        if isinstance(kind, str) and _ACCOUNT_TYPE.fullmatch(kind):
            account_types.add(kind)
    server_timestamp_ns = max(stamps) if stamps else None
    if server_timestamp_ns is not None:
        _check_not_from_the_future(server_timestamp_ns, now_ns, rules)
    return BalanceReply(
        balances=tuple(balances),
        server_timestamp_ns=server_timestamp_ns,
        account_type=min(account_types) if account_types else None,
    )
