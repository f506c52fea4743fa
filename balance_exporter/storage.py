"""`--storage.path`: what the ledger remembers of each (key, Gemini account), kept across
restarts: the last accepted `_timestamp` per stream, and a digest of each entry of each network's
last good withdrawal allow-list, and where its transfers were read up to with those pending.

Without it, the first reply after a restart is accepted whatever its stamp, so a stale server
could win once, and the first allow-list (or transfers poll) after a restart is a baseline, so
an address added (or money moved) while the exporter was stopped would never count. The file
holds everything the store's ledger keeps, accounts that are not planned right now included (a
discovering key that has not listed since the start, an account that left the plan a while
ago): a save made before the first listing must not forget them. Allow-list entries are kept
as a digest of (scope, address) with their scope and status, never their addresses or labels;
pending transfers by id, type, currency, amount and time, never their destinations.

It is written atomically (a new temporary file, fsync, rename) whenever the ledger moved, at
most every few seconds and at stop; it is read at start. An unreadable, odd or corrupt file is
a warning and a clean start, never a reason not to start.
"""

import asyncio
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import structlog

from balance_exporter.files import read_regular_file, write_private_file
from balance_exporter.gemini.replies import (
    APPROVED_ADDRESS_SCOPES,
    APPROVED_ADDRESS_STATUSES,
    MAX_EID,
    OTHER,
    TRANSFER_TYPES,
)
from balance_exporter.ledger import SavedAccount
from balance_exporter.store import BalanceStore
from balance_exporter.targets import AllowList, Endpoint
from balance_exporter.transfers import (
    MAX_IDS_AT_NEWEST,
    MAX_PENDING_TRANSFERS,
    PendingTransfer,
    TransfersCursor,
)

log = structlog.get_logger("balance_exporter.storage")

STATE_FILE_NAME = "state.json"
# Version 1 kept the balances stamp per account label, version 2 every endpoint's, version 3
# them per (key, account) with when an account left the plan; all are still read. Version 4
# adds the allow-lists' digests.
STATE_VERSION = 4
SAVE_EVERY_SECONDS = 5.0
# A state file of a million accounts is no state file of ours.
MAX_STATE_BYTES = 64 * 1024 * 1024
ENDPOINTS = frozenset(endpoint.value for endpoint in Endpoint)
_ALLOW_LIST_STREAM = re.compile(rf"{AllowList.value}/[a-z0-9]{{1,32}}", re.ASCII)
_NETWORK = re.compile(r"[a-z0-9]{1,32}", re.ASCII)
_DIGEST = re.compile(r"[0-9a-f]{32}", re.ASCII)
_SCOPES = frozenset((*APPROVED_ADDRESS_SCOPES, OTHER))
_STATUSES = frozenset((*APPROVED_ADDRESS_STATUSES.values(), OTHER))
_TRANSFER_TYPES = frozenset((*TRANSFER_TYPES.values(), OTHER))
_CURRENCY = re.compile(r"[A-Z0-9][A-Z0-9._-]{0,15}", re.ASCII)
_AMOUNT = re.compile(r"[0-9]{1,30}(?:\.[0-9]{1,30})?", re.ASCII)
# Nanoseconds since 1970 fit in a signed 64-bit integer until 2262: a larger stamp is no stamp.
MAX_STAMP_NS = 2**63 - 1


def load_state(
    directory: Path, now_ns: int, max_skew_seconds: float, key_ids: Mapping[str, str],
) -> list[SavedAccount]:
    """The stamps saved in `directory`; [] (and a warning) if there are none that can be used.
    Files of versions 1 and 2 name keys by their entries' names: `key_ids` (name to API key
    identity) translates them, and a stamp of a key no longer configured is dropped.
    A file that is not a regular file (a FIFO, a device, a directory) or is larger than
    MAX_STATE_BYTES is not read. Entries that cannot be read, and stamps further in the future
    than the skew allows (as a reply with them would be), are dropped with a warning."""
    path = directory / STATE_FILE_NAME
    try:
        document = json.loads(read_regular_file(path, MAX_STATE_BYTES))
        entries = _entries(document, key_ids)
    except FileNotFoundError:
        log.info("no saved state yet, starting clean", path=str(path))
        return []
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as error:
        log.warning("saved state unreadable, starting clean", path=str(path),
                    error=f"{type(error).__name__}: {str(error)[:200]}")
        return []
    limit = now_ns + int(max_skew_seconds * 1e9) if max_skew_seconds > 0 else MAX_STAMP_NS
    usable = []
    for entry in entries:
        saved = _saved_account(entry)
        if saved is not None and max(saved.stamps.values(), default=0) <= limit:
            usable.append(saved)
    if len(usable) < len(entries):
        log.warning("saved accounts ignored (stamps from the future, or malformed)",
                    ignored=len(entries) - len(usable), path=str(path))
    return usable


def _entries(document: Any, key_ids: Mapping[str, str]) -> list[Any]:
    """The file's entries, each a mapping with `key` (an API key identity), `account` and stamps
    (not yet checked)."""
    version = document.get("version") if isinstance(document, dict) else None
    if version in (3, STATE_VERSION):
        entries = document["stamps"]
        if isinstance(entries, list):
            return entries
    elif version in (1, 2):
        accounts = document["accounts"]
        if isinstance(accounts, dict):
            return [_by_key_id(entry, key_ids) for entry in accounts.values()]
    raise ValueError(f"not a version {STATE_VERSION} (or 1, 2, 3) state file")


def _by_key_id(entry: object, key_ids: Mapping[str, str]) -> object:
    """A version 1 or 2 entry with its key's name replaced by the key's identity (None, which
    drops the entry, for a key no longer configured)."""
    if not isinstance(entry, dict):
        return entry
    name = entry.get("key")
    return {**entry, "key": key_ids.get(name) if isinstance(name, str) else None}


def _stamp(value: object) -> int | None:
    # JSON integers only: 1e400 reads as a float infinity, true as 1.
    if type(value) is int and 0 <= value <= MAX_STAMP_NS:
        return value
    return None


def _stream_name(name: object) -> bool:
    return name in ENDPOINTS or (isinstance(name, str)
                                 and _ALLOW_LIST_STREAM.fullmatch(name) is not None)


def _allow_lists(raw: object) -> dict[str, dict[str, tuple[str, str]]] | None:
    """An entry's `approved_addresses`: network to entry digest to [scope, status]; None when
    any part of it is not what this exporter writes."""
    if not isinstance(raw, dict):
        return None
    allow_lists: dict[str, dict[str, tuple[str, str]]] = {}
    for network, entries in raw.items():
        if not _NETWORK.fullmatch(network) or not isinstance(entries, dict):
            return None
        known: dict[str, tuple[str, str]] = {}
        for digest, pair in entries.items():
            if not (_DIGEST.fullmatch(digest) and isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(part, str) for part in pair)
                    and pair[0] in _SCOPES and pair[1] in _STATUSES):
                return None
            known[digest] = (pair[0], pair[1])
        allow_lists[network] = known
    return allow_lists


def _whole(value: object, most: int) -> bool:
    return type(value) is int and 0 <= value <= most


def _pending(raw: object) -> PendingTransfer | None:
    if not (isinstance(raw, list) and len(raw) == 5):
        return None
    eid, kind, currency, amount, timestamp = raw
    if not (_whole(eid, MAX_EID) and kind in _TRANSFER_TYPES and isinstance(currency, str)
            and _CURRENCY.fullmatch(currency) and isinstance(amount, str)
            and _AMOUNT.fullmatch(amount) and _whole(timestamp, MAX_STAMP_NS)):
        return None
    return PendingTransfer(eid, kind, currency, Decimal(amount), timestamp)


def _transfers(raw: object) -> TransfersCursor | None:
    """An entry's `transfers`: the cursor, or None when there is none. Raises ValueError when it
    is not what this exporter writes."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("transfers: not an object")
    at_newest, pending = raw.get("at_newest"), raw.get("pending")
    if not (_whole(raw.get("newest_ms"), MAX_STAMP_NS) and _whole(raw.get("rechecks"), 2**62)
            and isinstance(raw.get("last_was_recheck"), bool)
            and isinstance(at_newest, list) and len(at_newest) <= MAX_IDS_AT_NEWEST
            and all(_whole(eid, MAX_EID) for eid in at_newest)
            and isinstance(pending, list) and len(pending) <= MAX_PENDING_TRANSFERS):
        raise ValueError("transfers: a field is not what this exporter writes")
    held = [_pending(item) for item in pending]
    if None in held:
        raise ValueError("transfers: a pending transfer is not what this exporter writes")
    return TransfersCursor(raw["newest_ms"], frozenset(at_newest),
                           tuple(item for item in held if item is not None),
                           raw["rechecks"], raw["last_was_recheck"])


def _saved_account(entry: object) -> SavedAccount | None:
    """One entry, or None when any part of it is not what this exporter writes."""
    if not isinstance(entry, dict):
        return None
    key, account, gone_since = entry.get("key"), entry.get("account"), entry.get("gone_since")
    if "server_timestamp_ns" in entry:  # version 1
        raw: object = {"balances": entry["server_timestamp_ns"]}
    else:
        raw = entry.get("server_timestamps_ns")
    allow_lists = _allow_lists(entry.get("approved_addresses", {}))
    try:
        transfers = _transfers(entry.get("transfers"))
    except ValueError:
        return None
    if not isinstance(key, str) or not (account is None or isinstance(account, str)) or not (
            isinstance(raw, dict) and all(map(_stream_name, raw))) or allow_lists is None or not (
            raw or allow_lists or transfers):
        return None
    stamps = {}
    for name, value in raw.items():
        stamp = _stamp(value)
        if stamp is None:
            return None
        stamps[name] = stamp
    if gone_since is not None and not (isinstance(gone_since, int | float)
                                       and not isinstance(gone_since, bool)
                                       and math.isfinite(gone_since)):
        return None
    return SavedAccount(key, account, stamps, gone_since, allow_lists, transfers)


def save_state(directory: Path, accounts: Iterable[SavedAccount]) -> None:
    """Replace the state file atomically, readable by its owner only."""
    document = {"version": STATE_VERSION, "stamps": [
        {"key": saved.key_id, "account": saved.gemini_account,
         "server_timestamps_ns": dict(saved.stamps), "gone_since": saved.gone_since,
         "approved_addresses": {network: {digest: list(pair) for digest, pair in entries.items()}
                                for network, entries in saved.allow_lists.items()},
         "transfers": _transfers_document(saved.transfers)}
        for saved in accounts]}
    directory.mkdir(parents=True, exist_ok=True)
    write_private_file(directory / STATE_FILE_NAME, json.dumps(document, separators=(",", ":")))


def _transfers_document(cursor: TransfersCursor | None) -> dict[str, object] | None:
    if cursor is None:
        return None
    return {"newest_ms": cursor.newest_ms, "at_newest": sorted(cursor.at_newest),
            "pending": [[held.eid, held.type, held.currency, format(held.amount, "f"),
                         held.timestamp_ms]
                        for held in cursor.pending],
            "rechecks": cursor.rechecks, "last_was_recheck": cursor.last_was_recheck}


class StatePersister:
    """Saves the store's ledger whenever it moved: every few seconds, and once more at stop."""

    def __init__(
        self, store: BalanceStore, directory: Path, on_failure: Callable[[], None]
    ) -> None:
        self._store = store
        self._directory = directory
        self._on_failure = on_failure
        self._saved_version: int | None = None

    async def save_if_changed(self) -> None:
        version = self._store.ledger.version
        if version == self._saved_version:
            return
        accounts = self._store.saved_accounts()
        try:
            await asyncio.to_thread(save_state, self._directory, accounts)
        except OSError as error:
            self._on_failure()
            log.error("saving state failed; it is kept in memory and saved again later",
                      path=str(self._directory), error=str(error)[:200])
            return
        self._saved_version = version

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_SECONDS)
            await self.save_if_changed()
