"""Parsing and validating a `/v1/balances` reply.

Amounts go JSON text -> Decimal -> floored to the currency's precision -> float, never through
float first, so a value like "0.1000000000000000055" cannot round up past what the account holds.
One bad row rejects the whole reply: a half-used reply would show a mix of old and new balances.
"""

import calendar
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from balance_exporter.config import Precision
from balance_exporter.gemini.errors import MalformedReply

_ISO_TIMESTAMP = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(Z|[+-]\d{2}:?\d{2})$"
)
_NS_PER_SECOND = 1_000_000_000
REQUIRED_FIELDS = ("amount", "available", "availableForWithdrawal")
PENDING_FIELDS = ("pendingWithdrawal", "pendingDeposit")


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


def _reject_constant(name: str) -> Decimal:
    raise MalformedReply(f"JSON constant {name} is not a number Gemini sends")


def _decimal_field(row: Mapping[str, Any], field: str, index: int) -> Decimal:
    raw = row.get(field)
    where = f"row {index} ({row.get('currency')!r}) field {field!r}"
    # bool is an int in Python, and True is no balance.
    if isinstance(raw, bool) or not isinstance(raw, str | int | Decimal):
        raise MalformedReply(f"{where}: expected a number or numeric string, got {raw!r}")
    try:
        value = Decimal(raw.strip()) if isinstance(raw, str) else Decimal(raw)
    except InvalidOperation:
        raise MalformedReply(f"{where}: {raw!r} is not a number") from None
    if not value.is_finite():
        raise MalformedReply(f"{where}: {raw!r} is not a finite number")
    return value


def parse_timestamp_ns(raw: object) -> int:
    """`_timestamp` as integer nanoseconds, from the integer form or the ISO-8601 form."""
    if isinstance(raw, bool):
        raise MalformedReply(f"_timestamp {raw!r} is not a timestamp")
    stamp: int
    if isinstance(raw, int):
        stamp = raw
    elif isinstance(raw, Decimal) and raw == raw.to_integral_value():
        stamp = int(raw)
    elif isinstance(raw, str) and raw.isascii() and raw.isdigit():
        stamp = int(raw)
    elif isinstance(raw, str) and (match := _ISO_TIMESTAMP.match(raw)):
        stamp = _iso_to_ns(match)
    else:
        raise MalformedReply(f"_timestamp {raw!r} is neither integer nanoseconds nor ISO-8601")
    if stamp <= 0:
        raise MalformedReply(f"_timestamp {raw!r} is not after the epoch")
    return stamp


def _iso_to_ns(match: re.Match[str]) -> int:
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction, zone = match.group(7) or "", match.group(8)
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise MalformedReply(f"_timestamp {match.string!r} is not a valid date") from None
    seconds = calendar.timegm(moment.timetuple())
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    return seconds * _NS_PER_SECOND + int(fraction.ljust(9, "0") or 0)


def _parse_row(row: object, index: int, precision: Precision) -> tuple[CurrencyBalance, int | None]:
    if not isinstance(row, dict):
        raise MalformedReply(f"row {index} is {type(row).__name__}, expected an object")
    currency = row.get("currency")
    if not isinstance(currency, str) or not currency.strip():
        raise MalformedReply(f"row {index} has no currency")
    values = {
        field: precision.floor(_decimal_field(row, field, index), currency)
        for field in REQUIRED_FIELDS
    }
    for field in PENDING_FIELDS:
        present = field in row and row[field] is not None
        values[field] = (
            precision.floor(_decimal_field(row, field, index), currency) if present else Decimal(0)
        )
    stamp = parse_timestamp_ns(row["_timestamp"]) if "_timestamp" in row else None
    balance = CurrencyBalance(
        currency=currency.strip(),
        amount=float(values["amount"]),
        available=float(values["available"]),
        available_for_withdrawal=float(values["availableForWithdrawal"]),
        pending_withdrawal=float(values["pendingWithdrawal"]),
        pending_deposit=float(values["pendingDeposit"]),
    )
    return balance, stamp


def parse_balances_reply(body: bytes, precision: Precision) -> BalanceReply:
    try:
        document = json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MalformedReply(f"reply is not JSON: {error}; starts with {body[:60]!r}") from None
    if not isinstance(document, list):
        raise MalformedReply(f"expected a JSON array of balances, got {type(document).__name__}")
    balances: list[CurrencyBalance] = []
    stamps: list[int] = []
    seen: set[str] = set()
    account_types: set[str] = set()
    for index, row in enumerate(document):
        balance, stamp = _parse_row(row, index, precision)
        if balance.currency in seen:
            raise MalformedReply(f"row {index}: currency {balance.currency!r} appears twice")
        seen.add(balance.currency)
        balances.append(balance)
        if stamp is not None:
            stamps.append(stamp)
        if isinstance(row.get("type"), str):
            account_types.add(row["type"])
    return BalanceReply(
        balances=tuple(balances),
        server_timestamp_ns=max(stamps) if stamps else None,
        account_type=min(account_types) if account_types else None,
    )
