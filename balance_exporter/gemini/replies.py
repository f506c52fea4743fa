"""Parsing and validating the replies of the polled endpoints: `/v1/balances`,
`/v1/notionalbalances/{currency}`, `/v1/balances/staking`, `/v1/approvedAddresses`, `/v2/transfers`,
`/v1/roles` and `/v1/account/list`.

Amounts go JSON text -> Decimal -> floored to the currency's precision -> float, never through
float first, so a value like "0.1000000000000000055" cannot round up past what the account holds.
One bad row rejects the whole reply: a half-used reply would show a mix of old and new balances.
Whatever the body holds, the parser returns a reply or raises MalformedReply: a reply from a
broken or hostile server must cost one poll, never the poller.
"""

import calendar
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, NamedTuple, TypeVar

from balance_exporter.gemini.errors import MalformedReply
from balance_exporter.precision import Precision
from balance_exporter.targets import ListedAccount

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
NOTIONAL_FIELDS = ("amountNotional", "availableNotional", "availableForWithdrawalNotional")
STAKING_FIELDS = ("balance", "available", "availableForWithdrawal")
# Provider ids are uuid4s; a row with more providers than this is no staking row we know.
_PROVIDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}", re.ASCII)
MAX_PROVIDERS_PER_ROW = 32
# What `account` of /v1/account/list must be to become an `account` label (as config names).
_SHORT_NAME = re.compile(r"[A-Za-z0-9_.:@/-]{1,128}", re.ASCII)
MAX_DISPLAY_NAME_CHARACTERS = 64
ACCOUNT_TYPES = ("exchange", "custody")
ACCOUNT_STATUSES = ("open", "closed")


@dataclass(frozen=True)
class ReplyRules:
    """What a reply must meet beyond its shape: the precision to floor to, and how far ahead of
    this host's clock its `_timestamp` may be (0: no limit)."""

    precision: Precision
    max_timestamp_skew_seconds: float = 300.0


# Rows are named tuples, so that the store can keep them as plain tuples of their fields (see
# PollState.row_fields) and build them again from those.
class CurrencyBalance(NamedTuple):
    currency: str
    amount: float
    available: float
    available_for_withdrawal: float
    pending_withdrawal: float
    pending_deposit: float


class NotionalBalance(NamedTuple):
    """One currency's value in the quote currency (`*Notional`), floored to its precision."""

    currency: str
    amount: float
    available: float
    available_for_withdrawal: float


class StakingBalance(NamedTuple):
    currency: str
    balance: float
    available: float
    available_for_withdrawal: float
    # (provider id, staked amount), sorted by provider.
    by_provider: tuple[tuple[str, float], ...] = ()


class AllowListCount(NamedTuple):
    """How many entries of a withdrawal allow-list have a scope and status (label values)."""

    scope: str
    status: str
    entries: int


class TransferTotals(NamedTuple):
    """An account's transfers of one currency and type: those counted (and their amount), and
    those pending now (their amount, and when the oldest began)."""

    currency: str
    type: str
    transfers: int = 0
    amount: Decimal = Decimal(0)
    pending: int = 0
    pending_amount: Decimal = Decimal(0)
    oldest_pending_ms: int | None = None


RowT = TypeVar("RowT", CurrencyBalance, NotionalBalance, StakingBalance, AllowListCount,
               TransferTotals)
# The rows of the per-currency endpoints.
CurrencyRowT = TypeVar("CurrencyRowT", CurrencyBalance, NotionalBalance, StakingBalance)


# No slots: a slotted generic dataclass cannot be built through its alias (BalanceReply).
@dataclass(frozen=True)
class ParsedReply(Generic[RowT]):
    """A reply's rows, one per currency, replacing the account's previous rows of the endpoint."""

    rows: tuple[RowT, ...]
    # The largest `_timestamp` among the rows, in nanoseconds; None when no row carries one.
    server_timestamp_ns: int | None
    account_type: str | None = None
    # Parts of rows that could not be read and were left out (staking providers).
    skipped_entries: int = 0


BalanceReply = ParsedReply[CurrencyBalance]


@dataclass(frozen=True, slots=True)
class KeyRoles:
    """What /v1/roles says the calling key may do."""

    auditor: bool
    fund_manager: bool
    trader: bool
    # Master keys only; None when the reply leaves it out (account-scoped keys).
    account_admin: bool | None = None

    def held(self) -> dict[str, bool]:
        """Each role the reply named, by the name of the `role` label."""
        roles = {"auditor": self.auditor, "fund_manager": self.fund_manager,
                 "trader": self.trader}
        if self.account_admin is not None:
            roles["account_admin"] = self.account_admin
        return roles

    @property
    def beyond_auditor(self) -> list[str]:
        """The roles held that can trade or move funds (any but Auditor)."""
        return [role for role, held in self.held().items() if held and role != "auditor"]


# An allow-list entry's scope and status as label values: Gemini's, or "other".
APPROVED_ADDRESS_SCOPES = ("account", "group")
APPROVED_ADDRESS_STATUSES = {"active": "active", "pending-time": "pending_time",
                             "pending-mua": "pending_mua"}
OTHER = "other"
# Far above any real allow-list; a longer one is no list of ours.
MAX_APPROVED_ADDRESSES = 10_000


class ApprovedAddress(NamedTuple):
    """One entry of a withdrawal allow-list. The address and label are kept for the audit log
    and never become label values."""

    scope: str  # account, group or other
    status: str  # active, pending_time, pending_mua or other
    address: str
    label: str
    created_ms: int | None  # None when the entry has no createdAt

    @property
    def identity(self) -> tuple[str, str]:
        """What makes an entry the same one in the next list: Gemini lists an address once
        per scope."""
        return (self.scope, self.address)


@dataclass(frozen=True, slots=True)
class AllowListReply:
    """A network's withdrawal allow-list, as one reply gave it, in the order sent."""

    entries: tuple[ApprovedAddress, ...]
    # A top-level `_timestamp`, if the reply has one (Gemini documents none here).
    server_timestamp_ns: int | None = None


# A transfer's `type` as a label value: Gemini's five, or "other".
TRANSFER_TYPES = {"Deposit": "deposit", "Withdrawal": "withdrawal", "Reward": "reward",
                  "AdminDebit": "admin_debit", "AdminCredit": "admin_credit"}
TRANSFER_STATUSES = ("Complete", "Pending", "Advanced")
# What a transfer row's free text may be in the log (an address, a tx hash, a network).
MAX_TRANSFER_TEXT_CHARACTERS = 200
MAX_EID = 2**63 - 1


class Transfer(NamedTuple):
    """One row of /v2/transfers. Its id, destination and tx hash are for the log: never label
    values."""

    eid: int
    type: str  # deposit, withdrawal, reward, admin_debit, admin_credit or other
    status: str  # Complete, Pending, Advanced or other
    timestamp_ms: int
    currency: str
    amount: Decimal  # floored to the currency's precision: sums of them stay exact
    network: str = ""
    destination: str = ""
    tx_hash: str = ""

    @property
    def pending(self) -> bool:
        return self.status == "Pending"


@dataclass(frozen=True, slots=True)
class AccountListing:
    """One page of a key's /v1/account/list."""

    accounts: tuple[ListedAccount, ...]
    # The oldest `created` (ms) of the page's rows, where the next page starts; None when no
    # row has a usable one (so no next page can be asked for).
    oldest_created_ms: int | None = None


def _shown(value: object) -> str:
    """A value from the reply as it may appear in a message: short, whatever was sent."""
    text = ascii(value)
    return text if len(text) <= _SHOWN_CHARACTERS else text[:_SHOWN_CHARACTERS] + "…"


def _reject_constant(name: str) -> Decimal:
    raise MalformedReply(f"JSON constant {name} is not a number Gemini sends")


# A listing row's `created` past this (the year 5138) is not a time.
MAX_CREATED_MS = 10**14


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
    # bool is an int in Python, and True is no balance.
    if isinstance(raw, bool) or not isinstance(raw, str | Decimal):
        raise MalformedReply(f"{_where(index, field)}: expected a number or numeric string, "
                             f"got {_shown(raw)}")
    if isinstance(raw, str):
        if len(raw) > MAX_NUMBER_CHARACTERS or not _JSON_NUMBER.fullmatch(raw):
            raise MalformedReply(f"{_where(index, field)}: {_shown(raw)} is not a JSON number")
        raw = Decimal(raw)
    if raw.is_zero():
        return Decimal(0)
    if raw.adjusted() > MAX_AMOUNT_ADJUSTED_EXPONENT:
        raise MalformedReply(f"{_where(index, field)}: {_shown(str(raw))} is out of range for "
                             "a balance")
    return raw


def _where(index: int, field: str) -> str:
    return f"row {index} field {field!r}"


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
    return float(_floored_decimal(value, currency, precision))


def _floored_decimal(value: Decimal, currency: str, precision: Precision) -> Decimal:
    try:
        return precision.floor(value, currency)
    except InvalidOperation:  # unreachable within the range checked above; never a crash
        raise MalformedReply(f"{currency}: {_shown(str(value))} cannot be floored") from None


def _row_currency(row: object, index: int) -> tuple[dict[str, Any], str]:
    if not isinstance(row, dict):
        raise MalformedReply(f"row {index} is {type(row).__name__}, expected an object")
    currency = row.get("currency")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        raise MalformedReply(f"row {index}: currency {_shown(currency)} is not a currency code")
    return row, currency


def _floored_fields(
    row: Mapping[str, Any], index: int, fields: tuple[str, ...], currency: str,
    precision: Precision,
) -> list[float]:
    return [_floored(_decimal_field(row, field, index), currency, precision) for field in fields]


RowParser = Callable[[object, int], tuple[CurrencyRowT, int]]


def _balance_row(precision: Precision) -> RowParser[CurrencyBalance]:
    def parse(raw: object, index: int) -> tuple[CurrencyBalance, int]:
        row, currency = _row_currency(raw, index)
        amount, available, withdrawable = _floored_fields(row, index, REQUIRED_FIELDS, currency,
                                                          precision)
        pending = [_floored(_decimal_field(row, field, index), currency, precision)
                   if row.get(field) is not None else 0.0 for field in PENDING_FIELDS]
        return CurrencyBalance(currency, amount, available, withdrawable, *pending), 0
    return parse


def _notional_row(precision: Precision, quote: str) -> RowParser[NotionalBalance]:
    def parse(raw: object, index: int) -> tuple[NotionalBalance, int]:
        row, currency = _row_currency(raw, index)
        # Values in the quote currency: floored to its precision, not the row currency's.
        amount, available, withdrawable = _floored_fields(row, index, NOTIONAL_FIELDS, quote,
                                                          precision)
        return NotionalBalance(currency, amount, available, withdrawable), 0
    return parse


def _provider_amount(value: object) -> Decimal | None:
    """A provider's staked amount: the value itself, or an object's `balance` (or `amount`)."""
    if isinstance(value, dict):
        value = value.get("balance", value.get("amount"))
    if isinstance(value, str) and len(value) <= MAX_NUMBER_CHARACTERS and _JSON_NUMBER.fullmatch(
            value):
        value = Decimal(value)
    if isinstance(value, Decimal) and value.is_finite() and (
            value.is_zero() or value.adjusted() <= MAX_AMOUNT_ADJUSTED_EXPONENT):
        return value
    return None


def _staking_row(precision: Precision) -> RowParser[StakingBalance]:
    def parse(raw: object, index: int) -> tuple[StakingBalance, int]:
        row, currency = _row_currency(raw, index)
        balance, available, withdrawable = _floored_fields(row, index, STAKING_FIELDS, currency,
                                                           precision)
        # Its shape is not documented: what cannot be read is left out and counted, and the
        # row's totals stand.
        providers = row.get("balanceByProvider")
        entries = providers.items() if isinstance(providers, dict) else ()
        skipped = 0 if providers is None or isinstance(providers, dict) else 1
        by_provider: dict[str, float] = {}
        for provider, value in entries:
            amount = _provider_amount(value)
            if (amount is None or not _PROVIDER.fullmatch(provider)
                    or len(by_provider) >= MAX_PROVIDERS_PER_ROW):
                skipped += 1
                continue
            by_provider[provider] = _floored(amount, currency, precision)
        return StakingBalance(currency, balance, available, withdrawable,
                              tuple(sorted(by_provider.items()))), skipped
    return parse


def _check_not_from_the_future(stamp_ns: int, now_ns: int, rules: ReplyRules) -> None:
    skew_ns = int(rules.max_timestamp_skew_seconds * _NS_PER_SECOND)
    if skew_ns > 0 and stamp_ns > now_ns + skew_ns:
        ahead = (stamp_ns - now_ns) / _NS_PER_SECOND
        raise MalformedReply(
            f"_timestamp is {ahead:.0f}s ahead of this host's clock (more than "
            f"gemini.max_timestamp_skew_seconds, {rules.max_timestamp_skew_seconds:g}s)",
            reason="FutureTimestamp")


def _array(body: bytes, what: str) -> list[object]:
    document = _load_json(body)
    if not isinstance(document, list):
        raise MalformedReply(f"expected a JSON array of {what}, got {type(document).__name__}")
    if len(document) > MAX_ROWS:
        raise MalformedReply(f"{len(document)} rows, more than the {MAX_ROWS} a reply may have")
    return document


class RowCache:
    """The rows of one account's last reply of an endpoint, by their fields but the stamp. A row
    whose fields are what they were is the row parsed then, not parsed again: a reply that
    changed nothing costs its JSON, not 60 decimals through the regex, `Decimal` and the floor.
    Rows are made by the same rules from the same fields, so the result is the same; anything
    else (other rules, another quote currency) starts the cache afresh. It holds one reply."""

    def __init__(self) -> None:
        self._under: object = None
        self._rows: dict[tuple[object, ...], tuple[Any, int]] = {}
        self._used: dict[tuple[object, ...], tuple[Any, int]] = {}

    def start(self, under: object) -> None:
        if under != self._under:
            self._under, self._rows = under, {}
        self._used = {}

    def parse(self, raw: object, index: int,
              parse_row: "RowParser[CurrencyRowT]") -> tuple[CurrencyRowT, int]:
        key = _row_key(raw)
        parsed = self._rows.get(key) if key is not None else None
        if parsed is None:
            parsed = parse_row(raw, index)
        if key is not None:
            self._used[key] = parsed
        return parsed

    def finish(self) -> None:
        """Keep this (good) reply's rows only."""
        self._rows, self._used = self._used, {}


def _row_key(raw: object) -> tuple[object, ...] | None:
    """A row's fields but its stamp, as a key; None for a row that cannot be one (not an object,
    or one with nested values)."""
    if not isinstance(raw, dict):
        return None
    if "_timestamp" in raw:
        raw = raw.copy()
        del raw["_timestamp"]
    # Its names, then its values: one flat tuple (a tuple of pairs made seven a row).
    key = (*raw.keys(), *raw.values())
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _parse_rows(
    body: bytes, rules: ReplyRules, now_ns: int, what: str, parse_row: RowParser[CurrencyRowT],
    cache: RowCache | None = None, under: object = None,
) -> ParsedReply[CurrencyRowT]:
    """The rules every per-account reply meets: an array of one row per currency, any bad row
    makes it malformed, its stamp is the largest `_timestamp` and may not be from the future.
    With a `cache`, rows whose fields did not change since its last reply are not parsed again
    (`under`: what else the rows depend on)."""
    rows: list[CurrencyRowT] = []
    stamps: list[int] = []
    seen: set[str] = set()
    account_types: set[str] = set()
    skipped = 0
    if cache is not None:
        cache.start((rules, what, under))
    for index, raw in enumerate(_array(body, what)):
        row, row_skipped = (cache.parse(raw, index, parse_row) if cache is not None
                            else parse_row(raw, index))
        # Precision matches currencies case-insensitively; so does "the same currency twice".
        if row.currency.upper() in seen:
            raise MalformedReply(f"row {index}: currency {row.currency!r} appears twice")
        seen.add(row.currency.upper())
        rows.append(row)
        skipped += row_skipped
        assert isinstance(raw, dict)  # parse_row checked it
        if "_timestamp" in raw:
            stamps.append(parse_timestamp_ns(raw["_timestamp"]))
        kind = raw.get("type")
        if isinstance(kind, str) and _ACCOUNT_TYPE.fullmatch(kind):
            account_types.add(kind)
    server_timestamp_ns = max(stamps) if stamps else None
    if server_timestamp_ns is not None:
        _check_not_from_the_future(server_timestamp_ns, now_ns, rules)
    if cache is not None:  # only a good reply's rows are kept
        cache.finish()
    return ParsedReply(
        rows=tuple(rows),
        server_timestamp_ns=server_timestamp_ns,
        account_type=min(account_types) if account_types else None,
        skipped_entries=skipped,
    )


def parse_balances_reply(body: bytes, rules: ReplyRules, now_ns: int,
                         cache: RowCache | None = None) -> BalanceReply:
    """The reply's balances; `now_ns` is this host's wall clock, for the future-stamp check."""
    return _parse_rows(body, rules, now_ns, "balances", _balance_row(rules.precision), cache)


def parse_notional_reply(
    body: bytes, rules: ReplyRules, now_ns: int, quote_currency: str,
    cache: RowCache | None = None,
) -> ParsedReply[NotionalBalance]:
    """A /v1/notionalbalances/{quote_currency} reply: each currency's value in the quote."""
    return _parse_rows(body, rules, now_ns, "notional balances",
                       _notional_row(rules.precision, quote_currency), cache, quote_currency)


def parse_staking_reply(body: bytes, rules: ReplyRules, now_ns: int) -> ParsedReply[
        StakingBalance]:
    """A /v1/balances/staking reply. Its rows' `type` is "Staking", never an account type."""
    reply = _parse_rows(body, rules, now_ns, "staking balances", _staking_row(rules.precision))
    return ParsedReply(reply.rows, reply.server_timestamp_ns, None, reply.skipped_entries)


def parse_approved_addresses(body: bytes, rules: ReplyRules, now_ns: int) -> AllowListReply:
    """A /v1/approvedAddresses/account/{network} reply: an object whose `approvedAddresses` is
    a list of at most MAX_APPROVED_ADDRESSES entries, each with an `address` and, if it has
    one, a readable `createdAt` (milliseconds, a string as Gemini sends it, or a number). A
    list is used whole or not at all: an entry read wrongly could hide an added address."""
    document = _load_json(body)
    if not isinstance(document, dict):
        raise MalformedReply(f"expected a JSON object with approvedAddresses, got "
                             f"{type(document).__name__}")
    listed = document.get("approvedAddresses")
    if not isinstance(listed, list):
        raise MalformedReply(f"approvedAddresses is {_shown(listed)}, expected a list")
    if len(listed) > MAX_APPROVED_ADDRESSES:
        raise MalformedReply(f"{len(listed)} approved addresses, more than the "
                             f"{MAX_APPROVED_ADDRESSES} a list may have")
    entries = tuple(_approved_address(entry, index) for index, entry in enumerate(listed))
    stamp = None
    if "_timestamp" in document:
        stamp = parse_timestamp_ns(document["_timestamp"])
        _check_not_from_the_future(stamp, now_ns, rules)
    return AllowListReply(entries, stamp)


def _approved_address(entry: object, index: int) -> ApprovedAddress:
    if not isinstance(entry, dict):
        raise MalformedReply(f"entry {index} is {type(entry).__name__}, expected an object")
    address = entry.get("address")
    if not isinstance(address, str) or not address:
        raise MalformedReply(f"entry {index}: address {_shown(address)} is not an address")
    created = entry.get("createdAt")
    created_ms = None if created is None else _created_ms(created)
    if created is not None and created_ms is None:
        raise MalformedReply(f"entry {index}: createdAt {_shown(created)} is not milliseconds")
    scope, status, label = entry.get("scope"), entry.get("status"), entry.get("label")
    return ApprovedAddress(
        scope=scope if scope in APPROVED_ADDRESS_SCOPES else OTHER,
        status=APPROVED_ADDRESS_STATUSES.get(status, OTHER) if isinstance(status, str) else OTHER,
        address=address,
        label=label if isinstance(label, str) else "",
        created_ms=created_ms,
    )


def parse_transfers(body: bytes, rules: ReplyRules) -> tuple[Transfer, ...]:
    """A /v2/transfers page: an array of rows, each with an `eid` (an integer, how a transfer is
    told apart), `timestampms` (milliseconds, a number or a string), a currency code and a
    non-negative decimal `amount`, floored to the currency's precision. A page is used whole or
    not at all: a movement read wrongly is worse than one read later."""
    rows = []
    seen: set[int] = set()
    for index, row in enumerate(_array(body, "transfers")):
        transfer = _transfer(row, index, rules.precision)
        if transfer.eid in seen:
            raise MalformedReply(f"row {index}: eid {transfer.eid} appears twice")
        seen.add(transfer.eid)
        rows.append(transfer)
    return tuple(rows)


def _transfer(raw: object, index: int, precision: Precision) -> Transfer:
    row, currency = _row_currency(raw, index)
    eid = row.get("eid")
    if isinstance(eid, str) and eid.isascii() and eid.isdigit() and len(eid) <= 19:
        eid = Decimal(eid)
    if not (isinstance(eid, Decimal) and eid.is_finite() and eid == eid.to_integral_value()
            and 0 <= eid <= MAX_EID):
        raise MalformedReply(f"row {index}: eid {_shown(row.get('eid'))} is not a transfer id")
    timestamp = _created_ms(row.get("timestampms"))
    if timestamp is None:
        raise MalformedReply(f"row {index}: timestampms {_shown(row.get('timestampms'))} is not "
                             "milliseconds")
    amount = _decimal_field(row, "amount", index)
    if amount < 0:
        raise MalformedReply(f"row {index}: amount {_shown(str(amount))} is negative")
    kind, status = row.get("type"), row.get("status")
    return Transfer(
        eid=int(eid),
        type=TRANSFER_TYPES.get(kind, OTHER) if isinstance(kind, str) else OTHER,
        status=status if status in TRANSFER_STATUSES else OTHER,
        timestamp_ms=timestamp,
        currency=currency.upper(),
        amount=_floored_decimal(amount, currency, precision),
        network=_text(row.get("network")),
        destination=_text(row.get("destination")),
        tx_hash=_text(row.get("txHash")),
    )


def _text(value: object) -> str:
    """A free-text field of a row as the log shows it: printable, short."""
    text = "".join(c for c in value if c.isprintable()) if isinstance(value, str) else ""
    return text[:MAX_TRANSFER_TEXT_CHARACTERS]


# `u` below this is milliseconds; at or above STREAM_NS_FROM, nanoseconds; between, neither.
STREAM_MS_BELOW = 10**14
STREAM_NS_FROM = 10**17
MAX_STREAM_ASSETS = 2000


@dataclass(frozen=True, slots=True)
class BalanceUpdate:
    """A balances@account frame: when Gemini last changed the account, and which assets."""

    update_ns: int  # `u`, in nanoseconds whatever unit it came in
    currencies: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    """An answer to one of our requests (`{"id", "status"}`)."""

    id: object
    status: int | None


# What else a stream may send (other events, our own pings' answers): ignored.
IGNORED = None
StreamMessage = BalanceUpdate | StreamAnswer | None


def parse_stream_message(text: str | bytes) -> StreamMessage:
    """A WebSocket message, as strictly as a reply: a balanceUpdate frame of the documented
    shape (at most MAX_STREAM_ASSETS assets, each with a currency code and `f` and `c` as
    decimals), an answer to a request, or None for anything else that is an object."""
    document = _load_json(text.encode() if isinstance(text, str) else text)
    if not isinstance(document, dict):
        raise MalformedReply(f"expected a JSON object, got {type(document).__name__}")
    if "id" in document and ("status" in document or "result" in document
                             or "error" in document):
        status = document.get("status")
        return StreamAnswer(document["id"], int(status) if isinstance(status, Decimal)
                            and status == status.to_integral_value() else None)
    if document.get("e") != "balanceUpdate":
        return IGNORED
    assets = document.get("B")
    if not isinstance(assets, list) or len(assets) > MAX_STREAM_ASSETS:
        raise MalformedReply(f"B is {_shown(assets)}, expected a list of at most "
                             f"{MAX_STREAM_ASSETS} assets")
    currencies = []
    for index, asset in enumerate(assets):
        if not isinstance(asset, dict):
            raise MalformedReply(f"asset {index} is {type(asset).__name__}, expected an object")
        currency = asset.get("a")
        if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
            raise MalformedReply(f"asset {index}: {_shown(currency)} is not a currency code")
        for field in ("f", "c"):
            _decimal_field(asset, field, index)
        currencies.append(currency.upper())
    return BalanceUpdate(_update_ns(document.get("u")), tuple(currencies))


def _update_ns(value: object) -> int:
    """`u` in nanoseconds: milliseconds below 10^14, nanoseconds from 10^17, nothing between."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 25:
        value = Decimal(value)
    if not (isinstance(value, Decimal) and value.is_finite()
            and value == value.to_integral_value() and value > 0):
        raise MalformedReply(f"u {_shown(value)} is not a time")
    if value < STREAM_MS_BELOW:
        return int(value) * 1_000_000
    if value >= STREAM_NS_FROM and len(str(int(value))) <= MAX_TIMESTAMP_DIGITS:
        return int(value)
    raise MalformedReply(f"u {_shown(str(value))} is neither milliseconds nor nanoseconds")


def _known(value: object, known: tuple[str, ...]) -> str:
    """The value if it is one of `known` (compared in lower case); the first of them when the
    row leaves it out (older listings have no status); "other", never polled, for the rest."""
    if value is None:
        return known[0]
    return value.lower() if isinstance(value, str) and value.lower() in known else "other"


def _display_name(value: object) -> str:
    # A label value of the info metric: printable and short, whatever was sent.
    text = "".join(c for c in value if c.isprintable()) if isinstance(value, str) else ""
    return text[:MAX_DISPLAY_NAME_CHARACTERS]


def parse_roles(body: bytes) -> KeyRoles:
    """A /v1/roles reply: an object with `isAuditor`, `isFundManager` and `isTrader` as JSON
    booleans, and `isAccountAdmin` for master keys. Anything else is malformed: a role read
    wrongly would hide a key that can move funds."""
    document = _load_json(body)
    if not isinstance(document, dict):
        raise MalformedReply(f"expected a JSON object of roles, got {type(document).__name__}")
    admin = document.get("isAccountAdmin")
    return KeyRoles(_flag(document, "isAuditor"), _flag(document, "isFundManager"),
                    _flag(document, "isTrader"),
                    None if admin is None else _flag(document, "isAccountAdmin"))


def _flag(document: dict[str, object], name: str) -> bool:
    value = document.get(name)
    if not isinstance(value, bool):
        raise MalformedReply(f"{name} is {_shown(value)}, expected true or false")
    return value


def parse_account_list(body: bytes) -> AccountListing:
    """A /v1/account/list reply. A row without a usable short name makes it malformed: a
    listing is used whole or not at all, as a balances reply is."""
    accounts: list[ListedAccount] = []
    seen: set[str] = set()
    oldest: int | None = None
    for index, row in enumerate(_array(body, "accounts")):
        if not isinstance(row, dict):
            raise MalformedReply(f"row {index} is {type(row).__name__}, expected an object")
        short_name = row.get("account")
        if not isinstance(short_name, str) or not _SHORT_NAME.fullmatch(short_name):
            raise MalformedReply(f"row {index}: account {_shown(short_name)} is not an account "
                                 "short name")
        if short_name in seen:
            raise MalformedReply(f"row {index}: account {short_name!r} appears twice")
        seen.add(short_name)
        accounts.append(ListedAccount(
            short_name=short_name,
            display_name=_display_name(row.get("name")),
            account_type=_known(row.get("type"), ACCOUNT_TYPES),
            status=_known(row.get("status"), ACCOUNT_STATUSES),
        ))
        # It matters only to ask for the next page: a page without it cannot be paged past.
        created = _created_ms(row.get("created"))
        if created is not None:
            oldest = created if oldest is None else min(oldest, created)
    return AccountListing(tuple(accounts), oldest)


def _created_ms(value: object) -> int | None:
    """A creation time in whole milliseconds (a listing row's `created`, an allow-list entry's
    `createdAt`): a JSON number, or a string of digits as Gemini sends some times; None for
    anything else."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 15:
        value = Decimal(value)
    if (isinstance(value, Decimal) and value.is_finite()
            and 0 <= value <= MAX_CREATED_MS and value == value.to_integral_value()):
        return int(value)
    return None
