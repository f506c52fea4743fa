"""What is polled: every configured and discovered account, each endpoint at the interval its
key's budget allows.

The plan is made from the config and what each discovering key last listed, before anything is
polled, so `--config.check` can show it and the scheduler, the store and the exposition all work
from the same targets. It is made again whenever a listing changes what a key polls.

The budget rule: a key's requests per second are the sum, over every request stream it has (each
account's balances, notional and staking polls, each of its networks' withdrawal allow-lists,
its transfers, and the key's listing and roles), of 1 / interval. When
that is more than the key's `requests_per_second`, every interval of the key is multiplied by
the same factor, demand / requests_per_second; a shared `gemini.requests_per_second` stretches
every key by total demand / shared rate when that is larger.
"""

import enum
import fnmatch
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # types only: the store and exposition import targets, not pydantic
    from balance_exporter.config import AccountOptions, AccountSettings, Config, DiscoverSettings


class Endpoint(enum.Enum):
    """The per-account endpoints polled; each has its own rows, stamps and health."""

    BALANCES = "balances"
    NOTIONAL = "notional"
    STAKING = "staking"


_ENDPOINT_INDEX = {endpoint: index for index, endpoint in enumerate(Endpoint)}


@dataclass(frozen=True, slots=True)
class AllowList:
    """One network's withdrawal allow-list of an account (/v1/approvedAddresses): a request
    stream of its own for each (account, network)."""

    network: str
    # What the stream is called in logs, stamps and scheduling, as Endpoint's values are.
    value: ClassVar[str] = "approved_addresses"

    @property
    def stamp_name(self) -> str:
        """Its stamps' name: each network's replies are compared with their own."""
        return f"{self.value}/{self.network}"


class Movements(enum.Enum):
    """An account's money movements (/v2/transfers): a stream whose next request follows what
    is known (see `transfers`), not a fixed one."""

    TRANSFERS = "transfers"


# A request stream of one account.
AccountStream = Endpoint | AllowList | Movements

# The share of a budget the plan fills. The rest absorbs what no plan foresees (retries after
# failures, a listing that adds accounts, requests that had to wait for a slow one), so that
# waits drain instead of piling up behind a schedule with no slack.
PLANNED_SHARE = 0.97
# Gemini's /v1/account/list gives at most this many accounts a page (`limit_accounts`).
LISTING_PAGE_ROWS = 500
# Gemini's /v2/transfers gives at most this many transfers a page (`limit_transfers`).
TRANSFERS_PAGE_ROWS = 50


@dataclass(frozen=True, slots=True)
class ListedAccount:
    """One row of a key's /v1/account/list."""

    short_name: str  # what `account` takes, and a discovered account's label
    display_name: str
    account_type: str  # "exchange", "custody", or "other" for anything unknown
    status: str  # "open", "closed", or "other"

    @property
    def pollable(self) -> bool:
        # Custody accounts have no /v1/balances; closed ones have nothing to poll.
        return self.account_type == "exchange" and self.status == "open"


@dataclass(frozen=True, slots=True)
class AccountTarget:
    """What is polled for one account, and the thresholds its alerts compare with."""

    # The `account` label value.
    label: str
    key_name: str
    # Gemini's short name for the account; None for an account-scoped key.
    gemini_account: str | None
    show_pending_balances: bool
    # The intervals the scheduler can keep, which may be longer than the configured ones; None:
    # the endpoint is not polled for this account.
    interval_seconds: float
    min_available: tuple[tuple[str, float], ...] = ()
    max_available_drop_ratio: float | None = None
    notional_currency: str | None = None
    notional_interval_seconds: float | None = None
    staking_interval_seconds: float | None = None
    min_available_notional: float | None = None
    # The networks whose withdrawal allow-lists are read, and how often (None: none are).
    allow_list_networks: tuple[str, ...] = ()
    allow_list_interval_seconds: float | None = None
    transfers_interval_seconds: float | None = None
    # How far back the first transfers poll looks (transfers.lookback_seconds).
    transfers_lookback_seconds: float = 0.0
    max_withdrawal_pending_seconds: float | None = None
    max_withdrawn_per_hour: tuple[tuple[str, float], ...] = ()
    # From the key's listing, when it has one that shows the account.
    display_name: str = ""
    discovered: bool = False
    # The API key's identity (`Credentials.key_id`); the key's name where none is given.
    key_id: str = ""
    # identity(endpoint) for each endpoint, in Endpoint's order: made with the target, while
    # planning, so that adopting a plan of 10,000 accounts compares, not computes.
    identities: tuple[tuple[object, ...] | None, ...] = field(
        init=False, compare=False, repr=False, default=())

    def __post_init__(self) -> None:
        if not self.key_id:
            object.__setattr__(self, "key_id", self.key_name)
        object.__setattr__(self, "identities", tuple(
            self._identity(endpoint) for endpoint in Endpoint))

    def interval_for(self, endpoint: AccountStream) -> float | None:
        if endpoint is Endpoint.BALANCES:
            return self.interval_seconds
        if endpoint is Endpoint.NOTIONAL:
            return self.notional_interval_seconds
        if endpoint is Endpoint.STAKING:
            return self.staking_interval_seconds
        if endpoint is Movements.TRANSFERS:
            return self.transfers_interval_seconds
        return self.allow_list_interval_seconds if endpoint in self.allow_lists else None

    @property
    def allow_lists(self) -> tuple[AllowList, ...]:
        """The allow-list streams read for the account."""
        if self.allow_list_interval_seconds is None:
            return ()
        return tuple(AllowList(network) for network in self.allow_list_networks)

    def streams(self) -> Iterator[tuple[AccountStream, float]]:
        """Every request stream polled for the account, with its interval."""
        for endpoint in Endpoint:
            interval = self.interval_for(endpoint)
            if interval is not None:
                yield endpoint, interval
        if self.allow_list_interval_seconds is not None:
            for allow_list in self.allow_lists:
                yield allow_list, self.allow_list_interval_seconds
        if self.transfers_interval_seconds is not None:
            yield Movements.TRANSFERS, self.transfers_interval_seconds

    def stream_identity(self, stream: AccountStream) -> tuple[object, ...] | None:
        """What must stay the same for a stream's state to carry over a new plan, and for a
        reply to be this target's; None when the stream is not polled."""
        if isinstance(stream, Endpoint):
            return self.identity(stream)
        if isinstance(stream, AllowList):
            return (self.allow_list_identity if stream.network in self.allow_list_networks
                    else None)
        return self.transfers_identity

    @property
    def transfers_identity(self) -> tuple[object, ...] | None:
        """What must stay the same for the transfers' state to carry over a new plan; None when
        they are not read."""
        if self.transfers_interval_seconds is None:
            return None
        return (self.label, self.key_id, self.gemini_account)

    @property
    def allow_list_identity(self) -> tuple[object, ...] | None:
        """What must stay the same for the allow-lists' state to carry over a new plan (each
        network's on its own: a network that stays keeps its state); None when none is read."""
        if self.allow_list_interval_seconds is None:
            return None
        return (self.label, self.key_id, self.gemini_account)

    @property
    def owner(self) -> tuple[str, str | None]:
        """Whose stamps the account's replies carry: (API key identity, Gemini account)."""
        return (self.key_id, self.gemini_account)

    def identity(self, endpoint: Endpoint) -> tuple[object, ...] | None:
        """What must stay the same for an endpoint's rows to carry over a new plan; None when
        the endpoint is not polled."""
        return self.identities[_ENDPOINT_INDEX[endpoint]]

    def _identity(self, endpoint: Endpoint) -> tuple[object, ...] | None:
        if self.interval_for(endpoint) is None:
            return None
        # The API key's identity, not its entry's name: the same name may stand for another
        # key (another group) after a reload, and its rows are then not this account's.
        account = (self.label, self.key_id, self.gemini_account)
        if endpoint is Endpoint.BALANCES:
            return (*account, self.show_pending_balances)
        if endpoint is Endpoint.NOTIONAL:
            return (*account, self.notional_currency)
        return account


@dataclass(frozen=True, slots=True)
class SkippedAccount:
    """A listed account that is not polled because its label is taken."""

    key_name: str
    short_name: str
    taken_by: str


@dataclass(frozen=True, slots=True)
class KeyPlan:
    key_name: str
    targets: tuple[AccountTarget, ...]
    # None: the key does not discover its accounts.
    listing_interval_seconds: float | None
    # What every configured interval of the key was multiplied by (1: none stretched).
    stretch: float
    # How many pages of its listing the key reads at most (see LISTING_PAGE_ROWS).
    listing_max_pages: int = 1
    # How often the key asks for its roles; None: never (plans made by hand in tests).
    roles_interval_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    keys: Mapping[str, KeyPlan]
    skipped: tuple[SkippedAccount, ...] = field(default=())

    @property
    def targets(self) -> list[AccountTarget]:
        return [target for key in self.keys.values() for target in key.targets]


def matches(discover: "DiscoverSettings", short_name: str) -> bool:
    """Whether discovery polls an account of this short name (patterns are case-sensitive)."""
    def any_of(patterns: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(short_name, pattern) for pattern in patterns)
    return any_of(discover.include) and not any_of(discover.exclude)


def _positive(value: float | None) -> float | None:
    return value if value else None


def _target(
    label: str, key_name: str, gemini_account: str | None, options: "AccountOptions",
    config: "Config", listed: ListedAccount | None, discovered: bool,
) -> AccountTarget:
    notional = config.settings.notional
    notional_interval = None
    if notional is not None:
        configured = options.notional_interval_seconds
        notional_interval = notional.interval_seconds if configured is None else configured
    allow_lists = config.settings.approved_addresses
    allow_list_interval = None
    if allow_lists is not None:
        configured = options.approved_addresses_interval_seconds
        allow_list_interval = allow_lists.interval_seconds if configured is None else configured
    transfers = config.settings.transfers
    transfers_interval = None
    if transfers is not None:
        configured = options.transfers_interval_seconds
        transfers_interval = transfers.interval_seconds if configured is None else configured
    return AccountTarget(
        label=label,
        key_name=key_name,
        gemini_account=gemini_account,
        show_pending_balances=options.show_pending_balances,
        interval_seconds=options.interval_seconds,
        min_available=tuple(sorted(options.min_available.items())),
        max_available_drop_ratio=options.max_available_drop_ratio,
        notional_currency=notional.currency if notional is not None else None,
        notional_interval_seconds=_positive(notional_interval),
        staking_interval_seconds=_positive(options.staking_interval_seconds),
        min_available_notional=options.min_available_notional,
        allow_list_networks=tuple(allow_lists.networks) if allow_lists is not None else (),
        allow_list_interval_seconds=_positive(allow_list_interval),
        transfers_interval_seconds=_positive(transfers_interval),
        transfers_lookback_seconds=transfers.lookback_seconds if transfers is not None else 0.0,
        max_withdrawal_pending_seconds=options.max_withdrawal_pending_seconds,
        max_withdrawn_per_hour=tuple(sorted(options.max_withdrawn_per_hour.items())),
        display_name=listed.display_name if listed is not None else "",
        discovered=discovered,
        key_id=config.credentials[key_name].key_id,
    )


def listing_pages(listed: int, max_pages: int) -> int:
    """The pages a listing of `listed` accounts takes to read: a full page is followed by one
    more, which may come back short or empty."""
    return min(max_pages, listed // LISTING_PAGE_ROWS + 1)


def _demand(targets: Iterable[AccountTarget], listing_interval: float | None,
            pages: int = 1, roles_interval: float | None = None) -> float:
    """Requests per second the targets (and the listing, of so many pages, and the roles) ask
    for at their intervals."""
    total = pages / listing_interval if listing_interval else 0.0
    total += 1 / roles_interval if roles_interval else 0.0
    for target in targets:
        for _, interval in target.streams():
            total += 1 / interval
    return total


def _times(interval: float, factor: float) -> float:
    # Rounded so that 50 accounts at 10 s on 2 requests a second plan 25 s, not 25.000000000004.
    return round(interval * factor, 6)


def _stretched(target: AccountTarget, factor: float) -> AccountTarget:
    if factor == 1:
        return target
    return replace(
        target,
        interval_seconds=_times(target.interval_seconds, factor),
        notional_interval_seconds=(_times(target.notional_interval_seconds, factor)
                                   if target.notional_interval_seconds else None),
        staking_interval_seconds=(_times(target.staking_interval_seconds, factor)
                                  if target.staking_interval_seconds else None),
        allow_list_interval_seconds=(_times(target.allow_list_interval_seconds, factor)
                                     if target.allow_list_interval_seconds else None),
        transfers_interval_seconds=(_times(target.transfers_interval_seconds, factor)
                                    if target.transfers_interval_seconds else None),
    )


# A planning step: `planning` yields one of these between keys, so that its caller can give the
# event loop a turn (a plan of 10,000 accounts takes a tenth of a second or more).
Step = Generator[None, None, "Plan"]


def plan(
    config: "Config", listings: Mapping[str, Sequence[ListedAccount]] | None = None,
    previous: Plan | None = None,
) -> Plan:
    """Every key's targets, stretched to fit the budgets, in one go (see `planning`)."""
    steps = planning(config, listings, previous)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def planning(
    config: "Config", listings: Mapping[str, Sequence[ListedAccount]] | None = None,
    previous: Plan | None = None,
) -> Step:
    """Every key's targets, stretched to fit the budgets; `listings` are the discovering keys'
    last successful listings (a key without one polls its configured accounts only). A
    generator that pauses after each key, and returns the plan.

    What did not change since `previous` is `previous`'s own objects, so that adopting the plan
    on the event loop can tell an unchanged key or account by identity, and skip it: a listing
    among 1,000 keys changes one of them."""
    settings = config.settings
    listings = listings or {}
    taken = {account.label: account.key for account in settings.accounts}
    unstretched: dict[str, tuple[list[AccountTarget], float | None]] = {}
    pages: dict[str, int] = {}
    skipped: list[SkippedAccount] = []
    # Each key's accounts, in one pass: planning is linear in the accounts, whatever the keys.
    accounts_of: dict[str, list[AccountSettings]] = {}
    for account in settings.accounts:
        accounts_of.setdefault(account.key, []).append(account)
    for key in settings.keys:
        yield
        discover = key.discover
        defaults = discover.defaults if discover is not None else None
        listed = {row.short_name: row for row in listings.get(key.name, ())}
        targets = []
        for account in accounts_of.get(key.name, ()):
            options = account.over(defaults) if defaults is not None else account
            row = listed.get(account.account) if account.account is not None else None
            targets.append(_target(account.label, key.name, account.account, options, config,
                                   row, discovered=False))
        configured = {account.account for account in accounts_of.get(key.name, ())}
        if discover is not None and defaults is not None:
            for row in listed.values():
                if (row.short_name in configured or not row.pollable
                        or not matches(discover, row.short_name)):
                    continue
                if row.short_name in taken:
                    skipped.append(SkippedAccount(key.name, row.short_name,
                                                  taken[row.short_name]))
                    continue
                taken[row.short_name] = key.name
                targets.append(_target(row.short_name, key.name, row.short_name, defaults,
                                       config, row, discovered=True))
        pages[key.name] = (listing_pages(len(listed), discover.max_pages) if discover
                           else 1)
        unstretched[key.name] = (targets, discover.refresh_seconds if discover else None)
    rates = {key.name: key.requests_per_second * PLANNED_SHARE for key in settings.keys}
    max_pages = {key.name: key.discover.max_pages if key.discover else 1
                 for key in settings.keys}
    roles = settings.polling.roles_refresh_seconds
    demands = {name: _demand(targets, listing, pages[name], roles)
               for name, (targets, listing) in unstretched.items()}
    shared = settings.gemini.requests_per_second
    shared_factor = (max(1.0, sum(demands.values()) / (shared * PLANNED_SHARE))
                     if shared is not None else 1.0)
    keys = {}
    for name, (targets, listing) in unstretched.items():
        yield
        factor = max(1.0, demands[name] / rates[name], shared_factor)
        key_plan = KeyPlan(
            key_name=name,
            targets=tuple(_stretched(target, factor) for target in targets),
            listing_interval_seconds=_times(listing, factor) if listing is not None else None,
            stretch=factor,
            listing_max_pages=max_pages[name],
            roles_interval_seconds=_times(roles, factor),
        )
        old = previous.keys.get(name) if previous is not None else None
        keys[name] = _reused(key_plan, old) if old is not None else key_plan
    return Plan(keys=keys, skipped=tuple(skipped))


def _reused(key_plan: KeyPlan, old: KeyPlan) -> KeyPlan:
    """`key_plan` with every target equal to one of `old` replaced by it; `old` itself if the
    two are equal."""
    old_targets = {target.label: target for target in old.targets}
    targets = tuple(old_target if (old_target := old_targets.get(target.label)) == target
                    else target for target in key_plan.targets)
    candidate = replace(key_plan, targets=targets)
    return old if candidate == old else candidate


def plan_targets(config: "Config") -> list[AccountTarget]:
    """The configured accounts' targets, before any listing."""
    return plan(config).targets
