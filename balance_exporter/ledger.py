"""What the exporter remembers of each (API key, Gemini account), planned or not: the last
accepted `_timestamp` of every stream (the staleness rule's memory), each network's last good
withdrawal allow-list (what the next list is compared with, so that an added address counts)
and where its transfers were read up to, with those still pending (so that each counts once).

It outlives an account's absence from the plan, a change of its settings or label, and (through
`storage`) a restart: a stale server's reply is refused, and an address added or a transfer made
meanwhile counts once, whether the account was away from the plan or the exporter was stopped.
The store keeps what is shown per account label; this keeps what belongs to the account itself.
"""

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from balance_exporter.transfers import TransfersCursor

# Who a stamp belongs to: (API key identity, Gemini account). Stamps are Gemini's, of one
# account as seen through one API key, so they depend on no plan, label, setting or name.
StampOwner = tuple[str, str | None]
# An account that left the plan keeps its stamps this long after its leaving was confirmed (by
# the config, or by a successful listing of its key): a reply of a stale server that comes
# back with it is still refused.
STAMP_RETENTION_SECONDS = 7 * 86400.0
# At most this many accounts that left the plan keep their stamps (those gone longest are
# forgotten first): a listing that churns accounts cannot grow the ledger without bound.
MAX_ABSENT_STAMP_OWNERS = 10_000


class KnownEntry(NamedTuple):
    """An allow-list entry as remembered: its scope and status (label values), and its label and
    address, which are None for an entry restored from the state file (it keeps digests only:
    a copy of every withdrawal address on disk is not the exporter's to make)."""

    scope: str
    status: str
    label: str | None
    address: str | None


# An allow-list by entry digest (`entry_digest`).
AllowListMemory = Mapping[str, KnownEntry]


def entry_digest(scope: str, address: str) -> str:
    """What stands for an entry (scope, address) in the state file: Gemini lists an address once
    per scope, so this tells an entry from every other of its list."""
    return hashlib.blake2b(f"{scope}\n{address}".encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class PlannedStreams:
    """What a plan reads of an account beyond its stamped replies."""

    networks: frozenset[str] = frozenset()  # whose allow-lists it reads
    transfers: bool = False


@dataclass(frozen=True, slots=True)
class SavedAccount:
    """What is remembered of one account, as kept across plan changes and restarts
    (`storage`)."""

    key_id: str  # the API key's identity (Credentials.key_id)
    gemini_account: str | None
    # By stream name ("balances", "notional", "staking", "approved_addresses/<network>").
    stamps: Mapping[str, int]
    # Wall time since when the account is known to have left the plan; None while it is
    # planned, or while its leaving is not confirmed (its key has not listed since a restart).
    gone_since: float | None = None
    # Per network, the last good allow-list: entry digest to (scope, status).
    allow_lists: Mapping[str, Mapping[str, tuple[str, str]]] = field(default_factory=dict)
    transfers: TransfersCursor | None = None

    @property
    def owner(self) -> StampOwner:
        return (self.key_id, self.gemini_account)


@dataclass(slots=True)
class _Remembered:
    stamps: dict[str, int] = field(default_factory=dict)
    allow_lists: dict[str, AllowListMemory] = field(default_factory=dict)
    transfers: TransfersCursor | None = None

    @property
    def empty(self) -> bool:
        return not self.stamps and not self.allow_lists and self.transfers is None


class AccountLedger:
    """The memory of every (API key, Gemini account); see the module's docstring."""

    def __init__(self, saved: Iterable[SavedAccount] = (),
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._owners: dict[StampOwner, _Remembered] = {}
        self._gone_since: dict[StampOwner, float] = {}
        self._wall_clock = wall_clock
        for entry in saved:
            self._owners[entry.owner] = _Remembered(dict(entry.stamps), {
                network: {digest: KnownEntry(scope, status, None, None)
                          for digest, (scope, status) in entries.items()}
                for network, entries in entry.allow_lists.items()}, entry.transfers)
            if entry.gone_since is not None:
                self._gone_since[entry.owner] = entry.gone_since
        # Moves on every change: the persister saves when it moved.
        self.version = 0

    def last(self, owner: StampOwner, stream: str) -> int | None:
        """The last accepted stamp of the owner's stream (an Endpoint's or AllowList's name)."""
        remembered = self._owners.get(owner)
        return None if remembered is None else remembered.stamps.get(stream)

    def accept(self, owner: StampOwner, stream: str, stamp: int) -> None:
        stamps = self._owners.setdefault(owner, _Remembered()).stamps
        if stamps.get(stream) != stamp:
            stamps[stream] = stamp
            self.version += 1

    def allow_list(self, owner: StampOwner, network: str) -> AllowListMemory | None:
        """The owner's last good allow-list of the network; None if none is known (the next one
        is then the baseline)."""
        remembered = self._owners.get(owner)
        return None if remembered is None else remembered.allow_lists.get(network)

    def remember_allow_list(self, owner: StampOwner, network: str,
                            entries: AllowListMemory) -> None:
        allow_lists = self._owners.setdefault(owner, _Remembered()).allow_lists
        if allow_lists.get(network) != entries:
            allow_lists[network] = entries
            self.version += 1

    def transfers(self, owner: StampOwner) -> TransfersCursor | None:
        """Where the owner's transfers were read up to; None if nothing is known (the next poll
        is then the baseline)."""
        remembered = self._owners.get(owner)
        return None if remembered is None else remembered.transfers

    def remember_transfers(self, owner: StampOwner, cursor: TransfersCursor) -> None:
        remembered = self._owners.setdefault(owner, _Remembered())
        if remembered.transfers != cursor:
            remembered.transfers = cursor
            self.version += 1

    def replan(self, planned: Mapping[StampOwner, PlannedStreams],
               confirms_absence: Callable[[str], bool]) -> None:
        """A new plan, by owner and what of it it reads: its accounts are present; an account
        that left it is gone from when `confirms_absence(key id)` says its key's plan would show
        it if it were there. A planned account forgets the allow-lists of networks no longer
        read, and its transfers if they are no longer read (read again, each starts from a
        baseline). Then forget what is past STAMP_RETENTION_SECONDS, and past
        MAX_ABSENT_STAMP_OWNERS."""
        now = self._wall_clock()
        before = (set(self._owners), dict(self._gone_since))
        changed = False
        for owner, streams in planned.items():
            self._gone_since.pop(owner, None)
            remembered = self._owners.get(owner)
            if remembered is None:
                continue
            if remembered.allow_lists.keys() - set(streams.networks):
                remembered.allow_lists = {network: entries for network, entries
                                          in remembered.allow_lists.items()
                                          if network in streams.networks}
                changed = True
            if remembered.transfers is not None and not streams.transfers:
                remembered.transfers = None
                changed = True
        for owner in self._owners.keys() - planned.keys() - self._gone_since.keys():
            if confirms_absence(owner[0]):
                self._gone_since[owner] = now
        expired = [owner for owner, since in self._gone_since.items()
                   if now - since > STAMP_RETENTION_SECONDS]
        # Unconfirmed absences last: they may be accounts a failing listing has not shown yet.
        absent = sorted(self._owners.keys() - planned.keys(),
                        key=lambda owner: self._gone_since.get(owner, math.inf))
        for owner in [*expired, *absent[:max(0, len(absent) - MAX_ABSENT_STAMP_OWNERS)]]:
            self._owners.pop(owner, None)
            self._gone_since.pop(owner, None)
        if changed or (set(self._owners), self._gone_since) != before:
            self.version += 1

    def saved(self) -> list[SavedAccount]:
        return [SavedAccount(
                    *owner, dict(remembered.stamps), self._gone_since.get(owner),
                    {network: {digest: (entry.scope, entry.status)
                               for digest, entry in entries.items()}
                     for network, entries in remembered.allow_lists.items()},
                    remembered.transfers)
                for owner, remembered in self._owners.items() if not remembered.empty]
