"""The balance store: what the pollers last learned about each account, as immutable snapshots.

Pollers write, the collector and the landing page read. Every update swaps in a new frozen
snapshot, so a reader always sees one consistent state of an account without locks.
The staleness rule lives here because the store owns each account's last accepted `_timestamp`,
one per endpoint: a notional reply is never compared with a balances reply's stamp.
"""

import asyncio
import enum
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Generic

from balance_exporter.gemini.replies import (
    AllowListCount,
    AllowListReply,
    ApprovedAddress,
    CurrencyBalance,
    KeyRoles,
    NotionalBalance,
    ParsedReply,
    RowT,
    StakingBalance,
    Transfer,
    TransferTotals,
)
from balance_exporter.ledger import (
    AccountLedger,
    AllowListMemory,
    KnownEntry,
    PlannedStreams,
    SavedAccount,
    StampOwner,
    entry_digest,
)
from balance_exporter.targets import (
    AccountStream,
    AccountTarget,
    AllowList,
    Endpoint,
    ListedAccount,
    Movements,
)
from balance_exporter.transfers import (
    PageOutcome,
    PendingTransfer,
    TransfersQuery,
    apply_page,
    next_query,
)

DEFAULT_ACCOUNT_TYPE = "exchange"
# How many accounts `BalanceStore.configuring` prepares between two pauses.
CONFIGURE_STEP = 250


def _no_errors() -> Mapping[str, int]:
    return MappingProxyType({})


def _counted(errors: Mapping[str, int], reason: str) -> Mapping[str, int]:
    counts = dict(errors)
    counts[reason] = counts.get(reason, 0) + 1
    return MappingProxyType(counts)


class ReplyVerdict(enum.Enum):
    ACCEPTED = "accepted"
    STALE = "stale"
    # The job that sent the request is no longer planned as it was (another key, account,
    # label or quote currency now): the reply is not this account's and changes nothing.
    NOT_PLANNED = "not_planned"


# No slots: a slotted generic dataclass cannot be built through a subscripted alias.
@dataclass(frozen=True)
class PollState(Generic[RowT]):
    """What one endpoint's polls of an account gave: its rows and their health."""

    # The rows as plain tuples of their fields, and the row type they are of. The cyclic
    # garbage collector leaves a plain tuple of strings and numbers out of its walks (a named
    # tuple it does not): the store holds hundreds of thousands of rows, which every full
    # collection would otherwise walk while the event loop waits.
    row_fields: tuple[tuple[Any, ...], ...] = ()
    row_type: type[RowT] | None = None
    attempted: bool = False
    up: bool = False
    # Wall-clock time of the last accepted (fresh) reply: data age is measured from it.
    last_success_seconds: float | None = None
    server_timestamp_ns: int | None = None
    polls: int = 0
    errors: Mapping[str, int] = field(default_factory=_no_errors)
    last_error: str | None = None
    stale_replies: int = 0
    unstamped_replies: int = 0
    # Parts of accepted rows that could not be read (staking providers).
    skipped_entries: int = 0
    last_poll_duration_seconds: float | None = None

    @property
    def rows(self) -> tuple[RowT, ...]:
        """The rows, one per currency (built again from their fields on every call)."""
        row_type = self.row_type
        return () if row_type is None else tuple(map(row_type._make, self.row_fields))

    def with_reply(
        self, reply: ParsedReply[RowT], duration_seconds: float, wall_seconds: float,
        last_stamp: int | None,
    ) -> "tuple[PollState[RowT], ReplyVerdict]":
        """The reply's rows, unless the reply is older than `last_stamp`, the last accepted
        stamp of its (key, Gemini account, endpoint), which may be older than this state."""
        polled = replace(self, attempted=True, up=True, polls=self.polls + 1, last_error=None,
                         last_poll_duration_seconds=duration_seconds)
        stamp = reply.server_timestamp_ns
        if stamp is not None and last_stamp is not None and stamp < last_stamp:
            return replace(polled, stale_replies=self.stale_replies + 1), ReplyVerdict.STALE
        return replace(
            polled,
            row_fields=tuple(map(tuple, reply.rows)),
            row_type=type(reply.rows[0]) if reply.rows else self.row_type,
            last_success_seconds=wall_seconds,
            server_timestamp_ns=stamp if stamp is not None else self.server_timestamp_ns,
            unstamped_replies=self.unstamped_replies + (stamp is None),
            skipped_entries=self.skipped_entries + reply.skipped_entries,
        ), ReplyVerdict.ACCEPTED

    def with_failure(self, reason: str, duration_seconds: float) -> "PollState[RowT]":
        """A poll that gave no usable reply: counted, while the last good rows stay."""
        return replace(self, attempted=True, up=False, polls=self.polls + 1,
                       errors=_counted(self.errors, reason), last_error=reason,
                       last_poll_duration_seconds=duration_seconds)


@dataclass(frozen=True, slots=True)
class AllowListState:
    """What the polls of one network's withdrawal allow-list of an account gave. Its rows are
    the entries' counts by scope and status, a pair seen in an earlier good list counted 0
    once it is gone."""

    poll: PollState[AllowListCount] = PollState()
    # The newest `createdAt` of the last good list, in milliseconds.
    newest_created_ms: int | None = None
    # Entries (scope, address) that were not in the list before, since the account's state
    # began (the baseline list counts none).
    added: int = 0


@dataclass(frozen=True, slots=True)
class AllowListChange:
    """How a good allow-list differs from the one before, for the audit log."""

    baseline: bool  # no list was known before: nothing counts as added
    added: tuple[KnownEntry, ...] = ()
    removed: tuple[KnownEntry, ...] = ()
    # (before, after) of each entry whose status changed.
    status_changed: tuple[tuple[KnownEntry, KnownEntry], ...] = ()


def _allow_list_change(before: AllowListMemory | None,
                       after: AllowListMemory) -> AllowListChange:
    if before is None:
        return AllowListChange(baseline=True)
    return AllowListChange(
        baseline=False,
        added=tuple(entry for digest, entry in after.items() if digest not in before),
        removed=tuple(entry for digest, entry in before.items() if digest not in after),
        status_changed=tuple((before[digest], entry) for digest, entry in after.items()
                             if digest in before and before[digest].status != entry.status))


def _remembered(entries: tuple[ApprovedAddress, ...]) -> dict[str, KnownEntry]:
    """The list by entry digest; an entry Gemini sends twice is the first of them."""
    remembered: dict[str, KnownEntry] = {}
    for entry in entries:
        remembered.setdefault(entry_digest(entry.scope, entry.address),
                              KnownEntry(entry.scope, entry.status, entry.label, entry.address))
    return remembered


def _counts(entries: tuple[ApprovedAddress, ...],
            before: tuple[AllowListCount, ...]) -> tuple[AllowListCount, ...]:
    """The entries by (scope, status), as sent, with every pair of `before` kept (at 0 if it
    is gone): a series that vanished would read as "no data", not as "none left"."""
    counts = dict.fromkeys(((row.scope, row.status) for row in before), 0)
    for entry in entries:
        pair = (entry.scope, entry.status)
        counts[pair] = counts.get(pair, 0) + 1
    return tuple(AllowListCount(scope, status, count)
                 for (scope, status), count in sorted(counts.items()))


@dataclass(frozen=True, slots=True)
class TransfersState:
    """What the account's transfers polls gave: its rows are the totals per (currency, type),
    a pair seen once staying (its pending fields at 0 once nothing is pending)."""

    poll: PollState[TransferTotals] = PollState()
    gaps: int = 0  # pages that may have missed transfers
    dropped: int = 0  # pending transfers no longer tracked past MAX_PENDING_TRANSFERS


def _transfer_totals(before: tuple[TransferTotals, ...], new: tuple[Transfer, ...],
                     pending: tuple[PendingTransfer, ...]) -> tuple[TransferTotals, ...]:
    """The totals after a page: the counts and amounts of `before` with the `new` transfers
    added, and the pending ones as they are now."""
    totals = {(row.currency, row.type): row._replace(pending=0, pending_amount=Decimal(0),
                                                     oldest_pending_ms=None)
              for row in before}
    for transfer in new:
        pair = (transfer.currency, transfer.type)
        row = totals.get(pair) or TransferTotals(*pair)
        totals[pair] = row._replace(transfers=row.transfers + 1,
                                    amount=row.amount + transfer.amount)
    for held in pending:
        pair = (held.currency, held.type)
        row = totals.get(pair) or TransferTotals(*pair)
        oldest = row.oldest_pending_ms
        totals[pair] = row._replace(
            pending=row.pending + 1, pending_amount=row.pending_amount + held.amount,
            oldest_pending_ms=held.timestamp_ms if oldest is None else min(oldest,
                                                                           held.timestamp_ms))
    return tuple(totals[pair] for pair in sorted(totals))


def _no_allow_lists() -> Mapping[str, AllowListState]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    target: AccountTarget
    balances: PollState[CurrencyBalance] = PollState()
    notional: PollState[NotionalBalance] = PollState()
    staking: PollState[StakingBalance] = PollState()
    account_type: str = DEFAULT_ACCOUNT_TYPE
    # By network, for the networks whose lists were polled (see `allow_list`).
    allow_lists: Mapping[str, AllowListState] = field(default_factory=_no_allow_lists)
    transfers: TransfersState = TransfersState()
    # Gemini's `u` of the account's last balanceUpdate frame (never backwards); None before one.
    last_update_ns: int | None = None
    # While its key's stream is up: the least interval of its regular balances polls.
    reconcile_seconds: float | None = None

    @property
    def balances_interval_seconds(self) -> float:
        """The interval its balances are polled at now (the reconcile one while a stream
        says when they change)."""
        interval = self.target.interval_seconds
        return interval if self.reconcile_seconds is None else max(interval,
                                                                   self.reconcile_seconds)

    def poll(self, endpoint: Endpoint) -> PollState[Any]:
        state: PollState[Any] = getattr(self, endpoint.value)
        return state

    def allow_list(self, network: str) -> AllowListState:
        """The state of a network's allow-list (empty before its first poll)."""
        return self.allow_lists.get(network) or _NO_ALLOW_LIST

    def stream(self, stream: AccountStream) -> PollState[Any]:
        """The health of any of the account's request streams."""
        if isinstance(stream, Endpoint):
            return self.poll(stream)
        if isinstance(stream, AllowList):
            return self.allow_list(stream.network).poll
        return self.transfers.poll


_NO_ALLOW_LIST = AllowListState()


def _carried_allow_lists(previous: AccountSnapshot,
                         target: AccountTarget) -> Mapping[str, AllowListState]:
    """The allow-lists' states that are still `target`'s: none if they are another account's
    (or label's) now, else those of the networks it still reads."""
    if previous.target.allow_list_identity != target.allow_list_identity:
        return _no_allow_lists()
    networks = set(target.allow_list_networks)
    if previous.allow_lists.keys() <= networks:
        return previous.allow_lists
    return MappingProxyType({network: state for network, state in previous.allow_lists.items()
                             if network in networks})


def _carried(previous: AccountSnapshot | None, target: AccountTarget) -> AccountSnapshot:
    """`target`'s snapshot in a new plan, keeping what `previous` (its label's snapshot in the
    last plan) knows that is still this target's."""
    if previous is None:
        return AccountSnapshot(target)
    old = previous.target
    if old is target or old == target:
        return previous  # unchanged: nothing to render again
    # Made directly (dataclasses.replace takes twice as long): a reload of 10,000 accounts
    # does this for each of them.
    old_ids, new_ids = old.identities, target.identities
    return AccountSnapshot(
        target,
        # Each endpoint's rows stay unless they are another account's, label's or currency's
        # now, or the poll was turned off.
        previous.balances if old_ids[0] == new_ids[0] else PollState(),
        previous.notional if old_ids[1] == new_ids[1] else PollState(),
        previous.staking if old_ids[2] == new_ids[2] else PollState(),
        previous.account_type if old.owner == target.owner else DEFAULT_ACCOUNT_TYPE,
        _carried_allow_lists(previous, target) if previous.allow_lists else previous.allow_lists,
        previous.transfers if old.transfers_identity == target.transfers_identity
        else TransfersState(),
        previous.last_update_ns if old_ids[0] == new_ids[0] else None,
        previous.reconcile_seconds if old.key_name == target.key_name else None,
    )


@dataclass(frozen=True, slots=True)
class DiscoveryState:
    """A discovering key's last listing and how its listings went."""

    listed: tuple[ListedAccount, ...] = ()
    attempted: bool = False
    up: bool = False
    last_success_seconds: float | None = None
    errors: Mapping[str, int] = field(default_factory=_no_errors)
    # The last listing had as many rows as one call can list: there may be more accounts.
    full: bool = False
    # How many of the listed accounts the key polls (after patterns and label clashes), and
    # how many it does not poll because another account has their label.
    polled: int = 0
    label_conflicts: int = 0
    refresh_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class RolesState:
    """What the key's /v1/roles said last, and how its asks went."""

    roles: KeyRoles | None = None  # None: never read
    attempted: bool = False
    up: bool = False
    last_success_seconds: float | None = None
    errors: Mapping[str, int] = field(default_factory=_no_errors)


@dataclass(frozen=True, slots=True)
class StreamState:
    """How a key's balances@account stream goes."""

    up: bool = False  # connected and subscribed
    connects: int = 0
    frames: int = 0
    # By a bounded set of reasons (see gemini.stream and streaming).
    errors: Mapping[str, int] = field(default_factory=_no_errors)
    triggered_polls: int = 0
    last_frame_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class KeyCounters:
    """What was sent with one key, for the `gemini_key_*` counters."""

    name: str
    requests: int = 0
    rate_limited: int = 0
    # The API key's identity (Credentials.key_id), or its name where none was given.
    key_id: str = ""
    # Whether the key's poll worker is running (False between a crash and its restart).
    worker_running: bool = False
    worker_restarts: int = 0
    # None: the key does not discover its accounts.
    discovery: DiscoveryState | None = None
    roles: RolesState = RolesState()
    # None: the key does not stream.
    stream: StreamState | None = None
    # How late the key's last request started after it was due (None before the first).
    poll_lag_seconds: float | None = None


class BalanceStore:
    def __init__(self, restored: Iterable[SavedAccount] = (),
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._accounts: dict[str, AccountSnapshot] = {}
        self._keys: dict[str, KeyCounters] = {}
        # Moves on every change of an account snapshot (or of which accounts there are): a
        # reader that saw this version has seen every snapshot as it is.
        self.accounts_version = 0
        # Likewise for the keys' counters.
        self.keys_version = 0
        # Set whenever either version moves on: a reader waits on it instead of looking again
        # and again (an idle exporter wakes for nothing).
        self.changed = asyncio.Event()
        # Plans after a listing that could not be made (a bug): the last plan stayed in use.
        self.plan_errors = 0
        # The accounts_version of each account's last change, oldest first, since the last
        # configure (at _layout_version), which may have changed which accounts there are.
        self._changes: dict[str, int] = {}
        self._layout_version = 0
        # Every account's stamps, with those from before a restart: a reply older than its
        # account's is stale, as it would have been had the process not restarted.
        self.ledger = AccountLedger(restored, wall_clock)

    def configure(
        self, targets: Iterable[AccountTarget], key_names: Iterable[str],
        discovering: Mapping[str, float] | None = None,
        key_ids: Mapping[str, str] | None = None, streaming: Iterable[str] = (),
    ) -> None:
        """`configuring` all at once."""
        for _ in self.configuring(targets, key_names, discovering, key_ids, streaming):
            pass

    def configuring(
        self, targets: Iterable[AccountTarget], key_names: Iterable[str],
        discovering: Mapping[str, float] | None = None,
        key_ids: Mapping[str, str] | None = None, streaming: Iterable[str] = (),
    ) -> Iterator[None]:
        """Adopt a (new) set of accounts, keeping what is known of those that did not change;
        `discovering` gives each discovering key's listing interval, `key_ids` each key's API
        key identity (by default its name).

        A generator that pauses every CONFIGURE_STEP accounts while it prepares the new set (at
        10,000 accounts that takes tens of milliseconds), so that its caller can give the event
        loop a turn. Readers and writers see the old set meanwhile; at the end the set is
        adopted at once, each account from its snapshot as it is then."""
        prepared: dict[str, tuple[AccountSnapshot | None, AccountSnapshot]] = {}
        for count, target in enumerate(targets, start=1):
            previous = self._accounts.get(target.label)
            prepared[target.label] = (previous, _carried(previous, target))
            if count % CONFIGURE_STEP == 0:
                yield
        accounts = {}
        for label, (previous, snapshot) in prepared.items():
            current = self._accounts.get(label)
            # Changed while the rest was prepared: made again from what it is now.
            accounts[label] = snapshot if current is previous else _carried(current,
                                                                           snapshot.target)
        self._accounts = accounts
        self._accounts_moved_on()
        self._layout_version = self.accounts_version
        self._changes = {}
        discovering = discovering or {}
        streaming_keys = set(streaming)
        keys = {}
        for name in key_names:
            counters = self._keys.get(name, KeyCounters(name))
            if name not in discovering:
                discovery = None
            else:
                discovery = replace(counters.discovery or DiscoveryState(),
                                    refresh_seconds=discovering[name])
            key_id = (key_ids or {}).get(name, name)
            # Roles are the API key's: a name given to another API key shows none until that
            # key has been asked.
            roles = counters.roles if counters.key_id == key_id else RolesState()
            stream = ((counters.stream if counters.key_id == key_id else None) or StreamState()
                      if name in streaming_keys else None)
            keys[name] = replace(counters, discovery=discovery, key_id=key_id, roles=roles,
                                 stream=stream)
        self._keys = keys
        self._keys_moved_on()

        names = {key_id: name for name, key_id in (key_ids or {}).items()}

        def confirms_absence(key_id: str) -> bool:
            # A key that is gone, or whose plan is its config alone, shows every account it
            # has; a discovering key only once it has listed (not yet after a restart).
            key = self._keys.get(names.get(key_id, key_id))
            return (key is None or key.discovery is None
                    or key.discovery.last_success_seconds is not None)
        planned: dict[StampOwner, PlannedStreams] = {}
        for snapshot in self._accounts.values():
            target = snapshot.target
            streams = planned.get(target.owner, PlannedStreams())
            planned[target.owner] = PlannedStreams(
                streams.networks | {allow_list.network for allow_list in target.allow_lists},
                streams.transfers or target.transfers_interval_seconds is not None)
        self.ledger.replan(planned, confirms_absence)

    def saved_accounts(self) -> list[SavedAccount]:
        """Every account's last accepted stamps, planned or not, to keep across a restart."""
        return self.ledger.saved()

    def _planned(
        self, label: str, stream: AccountStream, sent: AccountTarget | None
    ) -> AccountSnapshot | None:
        """The account's snapshot if it polls the stream, and the job that sent the request
        (`sent`; None: the account as planned now) is still planned as it was."""
        current = self._accounts.get(label)
        if current is None:
            return None
        identity = current.target.stream_identity(stream)
        if identity is None or (sent is not None and sent.stream_identity(stream) != identity):
            return None
        return current

    def record_reply(
        self, label: str, endpoint: Endpoint, reply: ParsedReply[Any], duration_seconds: float,
        wall_seconds: float, sent: AccountTarget | None = None,
    ) -> ReplyVerdict:
        """Store a parsed reply unless it is older than the last accepted one of its key,
        account and endpoint, or the job that sent it (`sent`) is no longer planned so."""
        current = self._planned(label, endpoint, sent)
        if current is None:
            return ReplyVerdict.NOT_PLANNED
        owner = current.target.owner
        state, verdict = current.poll(endpoint).with_reply(
            reply, duration_seconds, wall_seconds, self.ledger.last(owner, endpoint.value))
        changes: dict[str, Any] = {endpoint.value: state}
        if verdict is ReplyVerdict.ACCEPTED:
            if reply.server_timestamp_ns is not None:
                self.ledger.accept(owner, endpoint.value, reply.server_timestamp_ns)
            if endpoint is Endpoint.BALANCES:
                changes["account_type"] = reply.account_type or current.account_type
        self._replace_account(label, replace(current, **changes))
        return verdict

    def record_failure(
        self, label: str, endpoint: Endpoint, reason: str, duration_seconds: float,
        sent: AccountTarget | None = None,
    ) -> None:
        current = self._planned(label, endpoint, sent)
        if current is None:
            return
        changes: dict[str, Any] = {
            endpoint.value: current.poll(endpoint).with_failure(reason, duration_seconds)}
        self._replace_account(label, replace(current, **changes))

    def record_allow_list(
        self, label: str, allow_list: AllowList, reply: AllowListReply,
        duration_seconds: float, wall_seconds: float, sent: AccountTarget | None = None,
    ) -> tuple[ReplyVerdict, AllowListChange | None]:
        """Store a network's allow-list, unless it is stale or no longer planned (as
        `record_reply`), and say how it differs from the account's last good one."""
        current = self._planned(label, allow_list, sent)
        if current is None:
            return ReplyVerdict.NOT_PLANNED, None
        owner = current.target.owner
        network, stream = allow_list.network, allow_list.stamp_name
        state = current.allow_list(network)
        counted = ParsedReply(_counts(reply.entries, state.poll.rows), reply.server_timestamp_ns)
        poll, verdict = state.poll.with_reply(counted, duration_seconds, wall_seconds,
                                              self.ledger.last(owner, stream))
        change = None
        if verdict is ReplyVerdict.ACCEPTED:
            if reply.server_timestamp_ns is not None:
                self.ledger.accept(owner, stream, reply.server_timestamp_ns)
            entries = _remembered(reply.entries)
            change = _allow_list_change(self.ledger.allow_list(owner, network), entries)
            self.ledger.remember_allow_list(owner, network, entries)
            created = [entry.created_ms for entry in reply.entries
                       if entry.created_ms is not None]
            state = AllowListState(poll, max(created, default=None),
                                   state.added + len(change.added))
        else:
            state = replace(state, poll=poll)
        self._replace_allow_list(label, current, network, state)
        return verdict, change

    def record_allow_list_failure(
        self, label: str, allow_list: AllowList, reason: str, duration_seconds: float,
        sent: AccountTarget | None = None,
    ) -> None:
        """A poll of a network's allow-list that gave no usable list: the last good one stays."""
        current = self._planned(label, allow_list, sent)
        if current is None:
            return
        state = current.allow_list(allow_list.network)
        self._replace_allow_list(label, current, allow_list.network, replace(
            state, poll=state.poll.with_failure(reason, duration_seconds)))

    def _replace_allow_list(self, label: str, current: AccountSnapshot, network: str,
                            state: AllowListState) -> None:
        allow_lists = MappingProxyType({**current.allow_lists, network: state})
        self._replace_account(label, replace(current, allow_lists=allow_lists))

    def transfers_query(self, label: str, now_ms: int) -> TransfersQuery | None:
        """The next request of the account's transfers stream; None if it reads none."""
        current = self._planned(label, Movements.TRANSFERS, None)
        if current is None:
            return None
        lookback_ms = int(current.target.transfers_lookback_seconds * 1000)
        return next_query(self.ledger.transfers(current.target.owner), now_ms, lookback_ms)

    def record_transfers(
        self, label: str, query: TransfersQuery, rows: tuple[Transfer, ...],
        duration_seconds: float, wall_seconds: float, sent: AccountTarget | None = None,
    ) -> PageOutcome | None:
        """Apply a good page of `query` to the account's transfers (see `transfers`); None when
        the account no longer reads them as it did when the request was sent."""
        current = self._planned(label, Movements.TRANSFERS, sent)
        if current is None:
            return None
        owner = current.target.owner
        cursor = self.ledger.transfers(owner)
        if cursor is None and not query.baseline:
            return None  # the transfers were forgotten meanwhile: the next poll is a baseline
        cursor, outcome = apply_page(cursor, query, rows)
        self.ledger.remember_transfers(owner, cursor)
        state = current.transfers
        totals = _transfer_totals(state.poll.rows, outcome.new, cursor.pending)
        poll, _ = state.poll.with_reply(ParsedReply(totals, None), duration_seconds,
                                        wall_seconds, None)
        self._replace_account(label, replace(current, transfers=TransfersState(
            poll, state.gaps + outcome.gap, state.dropped + len(outcome.dropped))))
        return outcome

    def record_transfers_failure(self, label: str, reason: str, duration_seconds: float,
                                 sent: AccountTarget | None = None) -> None:
        current = self._planned(label, Movements.TRANSFERS, sent)
        if current is not None:
            state = current.transfers
            self._replace_account(label, replace(current, transfers=replace(
                state, poll=state.poll.with_failure(reason, duration_seconds))))

    def _replace_account(self, label: str, snapshot: AccountSnapshot) -> None:
        self._accounts[label] = snapshot
        self._accounts_moved_on()
        self._changes.pop(label, None)  # to the end: the log stays in the order of changes
        self._changes[label] = self.accounts_version

    def _accounts_moved_on(self) -> None:
        self.accounts_version += 1
        self.changed.set()

    def _keys_moved_on(self) -> None:
        self.keys_version += 1
        self.changed.set()

    def changed_since(self, version: int) -> tuple[AccountSnapshot, ...] | None:
        """The snapshots that changed after accounts_version `version`, in the order of their
        last changes; None if which accounts there are (or their order) may have changed
        since, so that every snapshot is to be looked at."""
        if version < self._layout_version:
            return None
        changed = []
        for label, changed_at in reversed(self._changes.items()):
            if changed_at <= version:
                break
            changed.append(self._accounts[label])
        return tuple(reversed(changed))

    def _update_key(self, key_name: str, **changes: Any) -> None:
        if key_name in self._keys:  # a key dropped by a reload has no counters any more
            self._keys[key_name] = replace(self._keys[key_name], **changes)
            self._keys_moved_on()

    def _update_discovery(self, key_name: str, **changes: Any) -> None:
        key = self._keys.get(key_name)
        if key is not None and key.discovery is not None:
            self._update_key(key_name, discovery=replace(key.discovery, **changes))

    def record_listing(
        self, key_name: str, listed: tuple[ListedAccount, ...], full: bool, wall_seconds: float
    ) -> None:
        self._update_discovery(key_name, listed=listed, attempted=True, up=True,
                               last_success_seconds=wall_seconds, full=full)

    def record_listing_failure(self, key_name: str, reason: str) -> None:
        key = self._keys.get(key_name)
        if key is not None and key.discovery is not None:
            self._update_discovery(key_name, attempted=True, up=False,
                                   errors=_counted(key.discovery.errors, reason))

    def record_roles(self, key_name: str, roles: KeyRoles, wall_seconds: float) -> None:
        key = self._keys.get(key_name)
        if key is not None:
            self._update_key(key_name, roles=replace(
                key.roles, roles=roles, attempted=True, up=True,
                last_success_seconds=wall_seconds))

    def record_roles_failure(self, key_name: str, reason: str) -> None:
        """The last roles read stay: a failed ask does not make a key harmless."""
        key = self._keys.get(key_name)
        if key is not None:
            self._update_key(key_name, roles=replace(
                key.roles, attempted=True, up=False, errors=_counted(key.roles.errors, reason)))

    def _update_stream(self, key_name: str, **changes: Any) -> None:
        key = self._keys.get(key_name)
        if key is not None and key.stream is not None:
            self._update_key(key_name, stream=replace(key.stream, **changes))

    def record_stream_up(self, key_name: str, up: bool, connected: bool = False,
                         reconcile_seconds: float | None = None) -> None:
        """The stream is subscribed (up), or no longer; `connected`: a new connection. While it
        is up, the key's accounts' balances are polled every `reconcile_seconds` at most."""
        key = self._keys.get(key_name)
        if key is not None and key.stream is not None:
            self._update_stream(key_name, up=up, connects=key.stream.connects + connected)
        # Also for a key whose stream a reload turned off: its accounts' interval is the
        # planned one again.
        floor = reconcile_seconds if up else None
        for label, snapshot in list(self._accounts.items()):
            if snapshot.target.key_name == key_name and snapshot.reconcile_seconds != floor:
                self._replace_account(label, replace(snapshot, reconcile_seconds=floor))

    def record_stream_error(self, key_name: str, reason: str) -> None:
        key = self._keys.get(key_name)
        if key is not None and key.stream is not None:
            self._update_stream(key_name, errors=_counted(key.stream.errors, reason))

    def record_stream_frame(self, key_name: str, wall_seconds: float, triggered: bool) -> None:
        key = self._keys.get(key_name)
        if key is not None and key.stream is not None:
            self._update_stream(key_name, frames=key.stream.frames + 1,
                                last_frame_seconds=wall_seconds,
                                triggered_polls=key.stream.triggered_polls + triggered)

    def record_account_update(self, label: str, update_ns: int) -> None:
        """Gemini's `u` of a frame for the account: kept only if newer (it never goes back)."""
        current = self._accounts.get(label)
        if current is not None and (current.last_update_ns is None
                                    or update_ns > current.last_update_ns):
            self._replace_account(label, replace(current, last_update_ns=update_ns))

    def record_discovered_polled(self, key_name: str, polled: int, label_conflicts: int) -> None:
        key = self._keys.get(key_name)
        if key is not None and key.discovery is not None and (
                key.discovery.polled, key.discovery.label_conflicts) != (polled, label_conflicts):
            self._update_discovery(key_name, polled=polled, label_conflicts=label_conflicts)

    def record_poll_lag(self, key_name: str, seconds: float) -> None:
        if key_name in self._keys:
            self._keys[key_name] = replace(self._keys[key_name], poll_lag_seconds=seconds)
            # The keys' version stays: a lag alone does not make the tail render again (it is
            # rendered at most every second anyway), or every poll would.

    def record_request(self, key_name: str) -> None:
        self._update_key(key_name, requests=self._keys[key_name].requests + 1)

    def record_rate_limited(self, key_name: str) -> None:
        self._update_key(key_name, rate_limited=self._keys[key_name].rate_limited + 1)

    def record_worker_running(self, key_name: str, running: bool) -> None:
        self._update_key(key_name, worker_running=running)

    def record_worker_restart(self, key_name: str) -> None:
        if key_name in self._keys:
            self._update_key(key_name, worker_restarts=self._keys[key_name].worker_restarts + 1)

    def record_plan_error(self) -> None:
        self.plan_errors += 1
        self._keys_moved_on()  # shown with the keys' counters

    def stopped_workers(self) -> list[str]:
        """Keys whose poll worker is not running: nothing is polled with them right now."""
        return [key.name for key in self._keys.values() if not key.worker_running]

    def account_snapshots(self) -> tuple[AccountSnapshot, ...]:
        return tuple(self._accounts.values())

    def key_counters(self) -> tuple[KeyCounters, ...]:
        return tuple(self._keys.values())

    def all_attempted(self) -> bool:
        """Every account's balances and every discovering key's listing tried once: what
        readiness waits for. Notional and staking polls come on their own, spread over their
        (often long) intervals, and do not hold it up."""
        return all(snapshot.balances.attempted for snapshot in self._accounts.values()) and all(
            key.discovery.attempted for key in self._keys.values() if key.discovery is not None)
