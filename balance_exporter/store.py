"""The balance store: what the pollers last learned about each account, as immutable snapshots.

Pollers write, the collector and the landing page read. Every update swaps in a new frozen
snapshot, so a reader always sees one consistent state of an account without locks.
The staleness rule lives here because the store owns each account's last accepted `_timestamp`.
"""

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from balance_exporter.gemini.replies import BalanceReply, CurrencyBalance
from balance_exporter.targets import AccountTarget

DEFAULT_ACCOUNT_TYPE = "exchange"


@dataclass(frozen=True, slots=True)
class AccountSnapshot:
    target: AccountTarget
    balances: tuple[CurrencyBalance, ...] = ()
    account_type: str = DEFAULT_ACCOUNT_TYPE
    attempted: bool = False
    up: bool = False
    # Wall-clock time of the last accepted (fresh) reply: data age is measured from it.
    last_success_seconds: float | None = None
    server_timestamp_ns: int | None = None
    polls: int = 0
    errors: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    last_error: str | None = None
    stale_replies: int = 0
    unstamped_replies: int = 0
    last_poll_duration_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class KeyCounters:
    """What was sent with one key, for the `gemini_key_*` counters."""

    name: str
    requests: int = 0
    rate_limited: int = 0
    # Whether the key's poll worker is running (False between a crash and its restart).
    worker_running: bool = False
    worker_restarts: int = 0


@dataclass(frozen=True, slots=True)
class SavedStamp:
    """An account's last accepted `_timestamp`, as kept across restarts (`storage`)."""

    key_name: str
    gemini_account: str | None
    server_timestamp_ns: int


class ReplyVerdict(enum.Enum):
    ACCEPTED = "accepted"
    STALE = "stale"


class BalanceStore:
    def __init__(self, restored_stamps: Mapping[str, SavedStamp] | None = None) -> None:
        self._accounts: dict[str, AccountSnapshot] = {}
        self._keys: dict[str, KeyCounters] = {}
        # Stamps from before a restart, for the first configure only: a reply older than its
        # account's is stale, as it would have been had the process not restarted.
        self._restored = dict(restored_stamps or {})

    def configure(self, targets: Iterable[AccountTarget], key_names: Iterable[str]) -> None:
        """Adopt a (new) set of accounts, keeping what is known of those that did not change."""
        old_accounts = self._accounts
        self._accounts = {}
        for target in targets:
            previous = old_accounts.get(target.label)
            keep = previous is not None and previous.target.identity == target.identity
            self._accounts[target.label] = (
                replace(previous, target=target) if keep and previous
                else AccountSnapshot(target, server_timestamp_ns=self._restored_stamp(target))
            )
        self._restored = {}
        self._keys = {name: self._keys.get(name, KeyCounters(name)) for name in key_names}

    def _restored_stamp(self, target: AccountTarget) -> int | None:
        saved = self._restored.get(target.label)
        if saved is None or (saved.key_name, saved.gemini_account) != (
                target.key_name, target.gemini_account):
            return None  # another account under this label now: its stamps are not ours
        return saved.server_timestamp_ns

    def saved_stamps(self) -> dict[str, SavedStamp]:
        """Every account's last accepted stamp, to keep across a restart."""
        return {label: SavedStamp(snapshot.target.key_name, snapshot.target.gemini_account,
                                  snapshot.server_timestamp_ns)
                for label, snapshot in self._accounts.items()
                if snapshot.server_timestamp_ns is not None}

    def record_reply(
        self, label: str, reply: BalanceReply, duration_seconds: float, wall_seconds: float
    ) -> ReplyVerdict:
        """Store a parsed reply unless it is older than the last accepted one."""
        current = self._accounts[label]
        polled = replace(
            current,
            attempted=True,
            up=True,
            polls=current.polls + 1,
            last_error=None,
            last_poll_duration_seconds=duration_seconds,
        )
        stamp, last_stamp = reply.server_timestamp_ns, current.server_timestamp_ns
        if stamp is not None and last_stamp is not None and stamp < last_stamp:
            self._accounts[label] = replace(polled, stale_replies=current.stale_replies + 1)
            return ReplyVerdict.STALE
        self._accounts[label] = replace(
            polled,
            balances=reply.balances,
            account_type=reply.account_type or current.account_type,
            last_success_seconds=wall_seconds,
            server_timestamp_ns=stamp if stamp is not None else last_stamp,
            unstamped_replies=current.unstamped_replies + (stamp is None),
        )
        return ReplyVerdict.ACCEPTED

    def record_failure(self, label: str, reason: str, duration_seconds: float) -> None:
        """A poll that gave no usable reply: counted, while the last good balances stay."""
        current = self._accounts[label]
        errors = dict(current.errors)
        errors[reason] = errors.get(reason, 0) + 1
        self._accounts[label] = replace(
            current,
            attempted=True,
            up=False,
            polls=current.polls + 1,
            errors=MappingProxyType(errors),
            last_error=reason,
            last_poll_duration_seconds=duration_seconds,
        )

    def record_request(self, key_name: str) -> None:
        current = self._keys[key_name]
        self._keys[key_name] = replace(current, requests=current.requests + 1)

    def record_rate_limited(self, key_name: str) -> None:
        current = self._keys[key_name]
        self._keys[key_name] = replace(current, rate_limited=current.rate_limited + 1)

    def record_worker_running(self, key_name: str, running: bool) -> None:
        if key_name in self._keys:  # a key dropped by a reload has no counters any more
            self._keys[key_name] = replace(self._keys[key_name], worker_running=running)

    def record_worker_restart(self, key_name: str) -> None:
        if key_name in self._keys:
            current = self._keys[key_name]
            self._keys[key_name] = replace(current, worker_restarts=current.worker_restarts + 1)

    def stopped_workers(self) -> list[str]:
        """Keys whose poll worker is not running: nothing is polled with them right now."""
        return [key.name for key in self._keys.values() if not key.worker_running]

    def account_snapshots(self) -> tuple[AccountSnapshot, ...]:
        return tuple(self._accounts.values())

    def key_counters(self) -> tuple[KeyCounters, ...]:
        return tuple(self._keys.values())

    def all_attempted(self) -> bool:
        return all(snapshot.attempted for snapshot in self._accounts.values())
