"""Reading an account's money movements from /v2/transfers: which page to ask for next, and what
a page means. Plain values in, plain values out, so the rules are tested with plain numbers.

Gemini lists transfers newest first, at most 50 a page, filtered to those *after* a time; there
is no cursor, and a pending transfer is only seen again by asking from before it. So:
- a poll asks from the newest transfer time seen (minus 1 ms: transfers of that millisecond come
  again, and the ids seen at it tell them apart). A transfer counts once, when first seen, in any
  status: a withdrawal counts when it starts. A full page that does not reach back to the time
  asked may have missed transfers: a gap.
- each currency with pending transfers is re-checked in turn with the polls, from its oldest
  pending one. A pending transfer found settled stops being pending; one missing from a page
  that was not full (or newer than a full page's oldest row) is gone: Gemini no longer lists a
  cancelled advance or a returned wire.
- the first poll with nothing known looks back `lookback` for pending transfers; the settled
  ones it finds are the baseline and count nothing.
"""

from collections.abc import Iterable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import NamedTuple

from balance_exporter.gemini.replies import Transfer
from balance_exporter.targets import TRANSFERS_PAGE_ROWS

# The most pending transfers tracked per account: past it the oldest is dropped (and counted).
MAX_PENDING_TRANSFERS = 1000
# The most transfer ids kept for the newest millisecond seen (a page holds 50).
MAX_IDS_AT_NEWEST = 1000


class PendingTransfer(NamedTuple):
    eid: int
    type: str
    currency: str
    amount: Decimal
    timestamp_ms: int


def pending_of(transfer: Transfer) -> PendingTransfer:
    return PendingTransfer(transfer.eid, transfer.type, transfer.currency, transfer.amount,
                           transfer.timestamp_ms)


@dataclass(frozen=True, slots=True)
class TransfersQuery:
    """One request of an account's transfers stream."""

    after_ms: int  # transfers after this time (Gemini's `timestamp`)
    currency: str | None = None  # a re-check's currency
    baseline: bool = False  # the first poll, with nothing known

    @property
    def recheck(self) -> bool:
        return self.currency is not None


@dataclass(frozen=True, slots=True)
class TransfersCursor:
    """What is known of an account's transfers: where the next poll starts, and what is
    pending. Kept per (API key, Gemini account) by the ledger, and across restarts."""

    newest_ms: int  # transfers after newest_ms - 1 may be new
    at_newest: frozenset[int] = frozenset()  # ids already seen at newest_ms
    pending: tuple[PendingTransfer, ...] = ()  # oldest first
    # Re-checks come in turn with the polls, round the pending currencies.
    rechecks: int = 0
    last_was_recheck: bool = False


@dataclass(frozen=True, slots=True)
class PageOutcome:
    """What a page changed, for the counters and the log."""

    new: tuple[Transfer, ...] = ()  # counted now
    settled: tuple[PendingTransfer, ...] = ()  # pending before, found Complete or Advanced
    gone: tuple[PendingTransfer, ...] = ()  # pending before, no longer listed
    dropped: tuple[PendingTransfer, ...] = ()  # pending, dropped past MAX_PENDING_TRANSFERS
    gap: bool = False


def next_query(cursor: TransfersCursor | None, now_ms: int, lookback_ms: int) -> TransfersQuery:
    if cursor is None:
        return TransfersQuery(max(0, now_ms - lookback_ms), baseline=True)
    if cursor.pending and not cursor.last_was_recheck:
        currencies = sorted({transfer.currency for transfer in cursor.pending})
        currency = currencies[cursor.rechecks % len(currencies)]
        oldest = min(transfer.timestamp_ms for transfer in cursor.pending
                     if transfer.currency == currency)
        return TransfersQuery(max(0, oldest - 1), currency)
    return TransfersQuery(max(0, cursor.newest_ms - 1))


def apply_page(cursor: TransfersCursor | None, query: TransfersQuery,
               rows: tuple[Transfer, ...]) -> tuple[TransfersCursor, PageOutcome]:
    """The cursor after a good page of `query`, and what the page changed."""
    full = len(rows) >= TRANSFERS_PAGE_ROWS
    if query.recheck:
        assert cursor is not None  # a re-check is asked for only with pending transfers
        return _rechecked(cursor, query, rows, full)
    if cursor is None or query.baseline:
        # Settled transfers of the look-back are the baseline; pending ones count, as they
        # would have had the exporter been running when they started.
        new = tuple(row for row in rows if row.pending)
        start = TransfersCursor(newest_ms=query.after_ms + 1)
        return _polled(start, rows, new, gap=full)
    known = cursor.at_newest | {transfer.eid for transfer in cursor.pending}
    new = tuple(row for row in rows
                if row.eid not in known and row.timestamp_ms >= cursor.newest_ms)
    oldest = min((row.timestamp_ms for row in rows), default=None)
    gap = full and oldest is not None and oldest > cursor.newest_ms
    return _polled(cursor, rows, new, gap)


def _polled(cursor: TransfersCursor, rows: tuple[Transfer, ...], new: tuple[Transfer, ...],
            gap: bool) -> tuple[TransfersCursor, PageOutcome]:
    settled = _settled(cursor.pending, rows)
    kept, dropped = _bounded([*(transfer for transfer in cursor.pending
                                if transfer not in settled),
                              *(pending_of(row) for row in new if row.pending)])
    newest = max([cursor.newest_ms, *(row.timestamp_ms for row in rows)])
    at_newest = {row.eid for row in rows if row.timestamp_ms == newest}
    if newest == cursor.newest_ms:
        at_newest |= cursor.at_newest
    return (replace(cursor, newest_ms=newest, at_newest=_bounded_ids(at_newest),
                    pending=kept, last_was_recheck=False),
            PageOutcome(new=new, settled=settled, dropped=dropped, gap=gap))


def _rechecked(cursor: TransfersCursor, query: TransfersQuery, rows: tuple[Transfer, ...],
               full: bool) -> tuple[TransfersCursor, PageOutcome]:
    listed = {row.eid for row in rows}
    oldest = min((row.timestamp_ms for row in rows), default=None)
    settled = _settled(cursor.pending, rows)
    gone = tuple(transfer for transfer in cursor.pending
                 if transfer.currency == query.currency and transfer.eid not in listed
                 and transfer.timestamp_ms > query.after_ms
                 and (not full or (oldest is not None and transfer.timestamp_ms > oldest)))
    pending = tuple(transfer for transfer in cursor.pending
                    if transfer not in settled and transfer not in gone)
    return (replace(cursor, pending=pending, rechecks=cursor.rechecks + 1,
                    last_was_recheck=True),
            PageOutcome(settled=settled, gone=gone))


def _settled(pending: Iterable[PendingTransfer],
             rows: tuple[Transfer, ...]) -> tuple[PendingTransfer, ...]:
    settled_ids = {row.eid for row in rows if not row.pending}
    return tuple(transfer for transfer in pending if transfer.eid in settled_ids)


def _bounded(pending: list[PendingTransfer]) -> tuple[tuple[PendingTransfer, ...],
                                                      tuple[PendingTransfer, ...]]:
    """The pending transfers oldest first, at most MAX_PENDING_TRANSFERS, and those dropped."""
    ordered = sorted(pending, key=lambda transfer: (transfer.timestamp_ms, transfer.eid))
    cut = max(0, len(ordered) - MAX_PENDING_TRANSFERS)
    return tuple(ordered[cut:]), tuple(ordered[:cut])


def _bounded_ids(ids: set[int]) -> frozenset[int]:
    return frozenset(sorted(ids)[-MAX_IDS_AT_NEWEST:])
