"""The simulated Gemini's money movements (/v2/transfers): each account's deposits, withdrawals,
rewards and admin credits and debits, listed newest first, at most 50 a page, after a time, and
limited to one request per 5 s per account (shared with /v1/custodyaccountfees)."""

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

TRANSFER_TYPES = ("Deposit", "Withdrawal", "Reward", "AdminDebit", "AdminCredit")
# Cancelled transfers are no longer listed (Gemini lists no cancelled advance or returned wire).
TRANSFER_STATUSES = ("Complete", "Pending", "Advanced", "Cancelled")
DEFAULT_PAGE_ROWS = 10
MAX_PAGE_ROWS = 50
# One request per this many seconds per account.
ACCOUNT_SPACING_SECONDS = 5.0

_EIDS = itertools.count(320_000_000)


@dataclass
class SimTransfer:
    eid: int
    type: str
    status: str
    timestamp_ms: int
    currency: str
    amount: Decimal
    network: str = ""
    destination: str = ""
    tx_hash: str = ""

    @classmethod
    def from_document(cls, document: object, now_ms: int) -> "SimTransfer":
        if not isinstance(document, dict):
            raise ValueError("transfer: expected an object")
        kind, status = document.get("type"), document.get("status", "Complete")
        if kind not in TRANSFER_TYPES:
            raise ValueError(f"type: expected one of {', '.join(TRANSFER_TYPES)}, got {kind!r}")
        if status not in TRANSFER_STATUSES:
            raise ValueError(f"status: expected one of {', '.join(TRANSFER_STATUSES)}, "
                             f"got {status!r}")
        currency = document.get("currency")
        if not isinstance(currency, str) or not currency:
            raise ValueError("currency: expected a currency code")
        try:
            amount = Decimal(str(document.get("amount")))
        except InvalidOperation:
            raise ValueError(f"amount: {document.get('amount')!r} is not a number") from None
        if not amount.is_finite() or amount < 0:
            raise ValueError("amount: expected a number of at least 0")
        timestamp = document.get("timestamp_ms", now_ms)
        if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 0:
            raise ValueError(f"timestamp_ms: expected milliseconds, got {timestamp!r}")
        return cls(next(_EIDS), kind, status, timestamp, currency.upper(), amount,
                   str(document.get("network", "")), str(document.get("destination", "")),
                   str(document.get("tx_hash", "")))

    def describe(self) -> dict[str, Any]:
        """As Gemini lists it."""
        row: dict[str, Any] = {"type": self.type, "status": self.status,
                               "timestampms": self.timestamp_ms, "eid": self.eid,
                               "currency": self.currency, "amount": str(self.amount)}
        for name, value in (("network", self.network), ("destination", self.destination),
                            ("txHash", self.tx_hash)):
            if value:
                row[name] = value
        return row


def transfers_page(transfers: list[SimTransfer], payload: dict[str, Any]) -> list[SimTransfer]:
    """The page a request's `timestamp`, `limit_transfers` and `currency` ask for, newest first.
    Raises ValueError for a parameter Gemini would refuse."""
    after = payload.get("timestamp")
    if after is not None and (not isinstance(after, int) or isinstance(after, bool)):
        raise ValueError(f"timestamp {after!r} is not milliseconds")
    limit = payload.get("limit_transfers", DEFAULT_PAGE_ROWS)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_ROWS:
        raise ValueError(f"limit_transfers {limit!r} is not 1 to {MAX_PAGE_ROWS}")
    currency = payload.get("currency")
    listed = [transfer for transfer in transfers if transfer.status != "Cancelled"
              and (after is None or transfer.timestamp_ms > after)
              and (currency is None or transfer.currency == str(currency).upper())]
    listed.sort(key=lambda transfer: (transfer.timestamp_ms, transfer.eid), reverse=True)
    return listed[:limit]


class AccountSpacing:
    """Gemini's limit of one /v2/transfers (or /v1/custodyaccountfees) request per 5 s per
    account: a request sooner is refused, and does not count. `clock` is replaceable, so that
    a test can step it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last: float | None = None
        self.refused = 0

    def admit(self) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < ACCOUNT_SPACING_SECONDS:
            self.refused += 1
            return False
        self.last = now
        return True
