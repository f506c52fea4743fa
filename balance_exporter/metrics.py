"""The metric families: what a snapshot of the balance store means as Prometheus metrics.

It never does I/O: values were fetched by the background pollers. `exposition` renders these
families per account for /metrics (and counts an account that fails to render in
`gemini_exporter_collect_errors_total`); `BalanceCollector` renders them all through
prometheus_client's generic path, the reference the fast path is held to byte for byte and the
benchmarks' baseline.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from balance_exporter import __version__
from balance_exporter.gemini.replies import TransferTotals
from balance_exporter.store import (
    AccountSnapshot,
    AllowListState,
    BalanceStore,
    DiscoveryState,
    KeyCounters,
    PollState,
)
from balance_exporter.targets import AccountTarget, Endpoint, Movements

_POLLED = (
    "Polled in the background from Gemini's /v1/balances every "
    "gemini_account_poll_interval_seconds, not fetched at scrape time."
)


@dataclass(frozen=True)
class BalanceGauge:
    name: str
    field: str
    help: str
    pending: bool  # only for accounts that ask for pending balances


BALANCE_GAUGES = (
    BalanceGauge("gemini_balance_amount", "amount",
                 "Confirmed balance (Gemini `amount`) in units of the currency.", False),
    BalanceGauge("gemini_balance_available", "available",
                 "Balance available for trading (Gemini `available`), in units of the currency.",
                 False),
    BalanceGauge("gemini_balance_available_for_withdrawal", "available_for_withdrawal",
                 "Balance available for withdrawal (Gemini `availableForWithdrawal`).", False),
    BalanceGauge("gemini_balance_pending_withdrawal", "pending_withdrawal",
                 "Amount in withdrawals not yet confirmed (Gemini `pendingWithdrawal`).", True),
    BalanceGauge("gemini_balance_pending_deposit", "pending_deposit",
                 "Amount in deposits not yet credited (Gemini `pendingDeposit`).", True),
)
_NOTIONAL = ("Gemini's value in the quote currency (notional_currency), floored to its "
             "precision; polled in the background from /v1/notionalbalances every "
             "gemini_notional_poll_interval_seconds.")
NOTIONAL_GAUGES = (
    BalanceGauge("gemini_balance_amount_notional", "amount",
                 "Value of the confirmed balance (Gemini `amountNotional`).", False),
    BalanceGauge("gemini_balance_available_notional", "available",
                 "Value of the balance available for trading (Gemini `availableNotional`).",
                 False),
    BalanceGauge("gemini_balance_available_for_withdrawal_notional", "available_for_withdrawal",
                 "Value of the balance available for withdrawal (Gemini "
                 "`availableForWithdrawalNotional`).", False),
)
_STAKING = ("In units of the currency; polled in the background from /v1/balances/staking "
            "every gemini_staking_poll_interval_seconds.")
STAKING_GAUGES = (
    BalanceGauge("gemini_staking_balance", "balance", "Staked balance (Gemini `balance`).",
                 False),
    BalanceGauge("gemini_staking_available", "available",
                 "Staked balance available to trade (Gemini `available`).", False),
    BalanceGauge("gemini_staking_available_for_withdrawal", "available_for_withdrawal",
                 "Staked balance available to redeem to the exchange account (Gemini "
                 "`availableForWithdrawal`).", False),
)
ACCOUNT_LABELS = ["account"]
BALANCE_LABELS = ["account", "currency"]
NOTIONAL_LABELS = ["account", "currency", "notional_currency"]


@dataclass(frozen=True, slots=True)
class GaugeSamples:
    """A gauge family's samples, without the family: `exposition` writes their lines directly
    (prometheus_client's family for the rows of a poll took a third of its rendering)."""

    name: str
    help: str
    label_names: tuple[str, ...]
    samples: Iterable[tuple[Sequence[str], float]]

    def family(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.name, self.help, labels=self.label_names)
        for label_values, value in self.samples:
            family.add_metric(label_values, value)
        return family


def _row_samples(
    rows: list[tuple[AccountSnapshot, tuple[Any, ...]]], gauge: BalanceGauge, quoted: bool,
) -> Iterator[tuple[Sequence[str], float]]:
    for snapshot, account_rows in rows:
        if gauge.pending and not snapshot.target.show_pending_balances:
            continue
        extra = (snapshot.target.notional_currency or "",) if quoted else ()
        for row in account_rows:
            yield (snapshot.target.label, row.currency, *extra), getattr(row, gauge.field)


def _row_gauges(
    accounts: tuple[AccountSnapshot, ...], endpoint: Endpoint, gauges: tuple[BalanceGauge, ...],
    suffix: str, labels: list[str],
) -> Iterator[GaugeSamples]:
    """One gauge per field of an endpoint's rows, one sample per account and currency."""
    quoted = "notional_currency" in labels
    # The rows once for all the gauges: a state makes them from its fields on every call.
    rows = [(snapshot, snapshot.poll(endpoint).rows) for snapshot in accounts]
    for gauge in gauges:
        yield GaugeSamples(gauge.name, f"{gauge.help} {suffix}", tuple(labels),
                           list(_row_samples(rows, gauge, quoted)))


def _provider_samples(
    accounts: tuple[AccountSnapshot, ...],
) -> Iterator[tuple[Sequence[str], float]]:
    for snapshot in accounts:
        for row in snapshot.staking.rows:
            for provider, amount in row.by_provider:
                yield (snapshot.target.label, row.currency, provider), amount


def balance_gauges(accounts: tuple[AccountSnapshot, ...]) -> Iterator[GaugeSamples]:
    """The balance families' samples (`ACCOUNT_FAMILY_GROUPS`' first group)."""
    yield from _row_gauges(accounts, Endpoint.BALANCES, BALANCE_GAUGES, _POLLED, BALANCE_LABELS)
    yield from _row_gauges(accounts, Endpoint.NOTIONAL, NOTIONAL_GAUGES, _NOTIONAL,
                           NOTIONAL_LABELS)
    yield from _row_gauges(accounts, Endpoint.STAKING, STAKING_GAUGES, _STAKING, BALANCE_LABELS)
    yield GaugeSamples(
        "gemini_staking_balance_by_provider",
        f"Staked balance per staking provider (Gemini `balanceByProvider`). {_STAKING}",
        ("account", "currency", "provider"), list(_provider_samples(accounts)))


def _balance_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    for gauge in balance_gauges(accounts):
        yield gauge.family()


def _threshold_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    minimum = GaugeMetricFamily(
        "gemini_balance_min_available",
        "Configured minimum of gemini_balance_available (`min_available`); alert rules compare "
        "against it.", labels=BALANCE_LABELS)
    for snapshot in accounts:
        for currency, value in snapshot.target.min_available:
            minimum.add_metric([snapshot.target.label, currency], value)
    yield minimum
    yield _account_gauge(
        "gemini_account_max_available_drop_ratio",
        "Configured largest fraction of an available balance that may go within an hour "
        "(`max_available_drop_ratio`); alert rules compare against it.",
        accounts, lambda s: s.target.max_available_drop_ratio)
    yield _account_gauge(
        "gemini_account_min_available_notional",
        "Configured minimum of the account's available value in the quote currency, the sum of "
        "gemini_balance_available_notional (`min_available_notional`); alert rules compare "
        "against it.", accounts, lambda s: s.target.min_available_notional)


def _account_gauge(
    name: str,
    help_text: str,
    accounts: Iterable[AccountSnapshot],
    value: Callable[[AccountSnapshot], float | None],
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=ACCOUNT_LABELS)
    for snapshot in accounts:
        sample = value(snapshot)
        if sample is not None:
            family.add_metric([snapshot.target.label], sample)
    return family


def _account_counter(
    name: str, help_text: str, accounts: Iterable[AccountSnapshot],
    value: Callable[[AccountSnapshot], int],
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, help_text, labels=ACCOUNT_LABELS)
    for snapshot in accounts:
        family.add_metric([snapshot.target.label], value(snapshot))
    return family


def _errors_family(
    name: str, help_text: str, accounts: Iterable[AccountSnapshot],
    state: Callable[[AccountSnapshot], PollState[Any]],
) -> CounterMetricFamily:
    errors = CounterMetricFamily(name, help_text, labels=["account", "reason"])
    for snapshot in accounts:
        for reason, count in sorted(state(snapshot).errors.items()):
            errors.add_metric([snapshot.target.label, reason], count)
    return errors


_REASONS = ("by Gemini's reason or the local failure (Timeout, ConnectionError, MalformedReply, "
            "HTTP<status>)")


def _endpoint_health_families(
    accounts: Sequence[AccountSnapshot], endpoint: Endpoint | Movements, path: str,
    state: Callable[[AccountSnapshot], PollState[Any]], stamped: bool = True,
) -> Iterator[Metric]:
    """The health of a further endpoint's polls, for the accounts that poll it (`stamped`: its
    replies carry `_timestamp`, so some may be stale)."""
    polled = [s for s in accounts if s.target.interval_for(endpoint) is not None]
    prefix = f"gemini_{endpoint.value}"
    yield _account_gauge(
        f"{prefix}_up", f"1 if the last background poll of {path} gave a usable reply (a stale "
        "one counts), else 0 (also before the first poll).",
        polled, lambda s: float(state(s).up))
    yield _account_gauge(
        f"{prefix}_last_success_timestamp_seconds",
        f"Unix time of the last accepted (fresh) {path} reply: data age is now minus this.",
        polled, lambda s: state(s).last_success_seconds)
    yield _account_gauge(
        f"{prefix}_poll_interval_seconds",
        f"Interval between polls of {path}: the configured one, stretched to fit the key's "
        "request budget.", polled, lambda s: s.target.interval_for(endpoint))
    yield _errors_family(f"{prefix}_poll_errors",
                         f"Polls of {path} that gave no usable reply, {_REASONS}.",
                         polled, state)
    if stamped:
        yield _account_counter(
            f"{prefix}_stale_replies",
            f"{path} replies ignored because their `_timestamp` was older than the last "
            "accepted one.", polled, lambda s: state(s).stale_replies)


def _health_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    yield _account_gauge(
        "gemini_account_up",
        "1 if the last background poll of the account gave a usable reply (a stale one "
        "counts), else 0 (also before the first poll).",
        accounts, lambda s: float(s.balances.up))
    yield _account_gauge(
        "gemini_account_last_success_timestamp_seconds",
        "Unix time of the last accepted (fresh) /v1/balances reply: data age is now minus this.",
        accounts, lambda s: s.balances.last_success_seconds)
    yield _account_gauge(
        "gemini_account_server_timestamp_seconds",
        "Gemini's `_timestamp` of the last accepted reply, in seconds.",
        accounts,
        lambda s: _seconds(s.balances.server_timestamp_ns))
    yield _account_gauge(
        "gemini_account_poll_duration_seconds",
        "Duration of the account's last background poll of /v1/balances.",
        accounts, lambda s: s.balances.last_poll_duration_seconds)
    yield _account_gauge(
        "gemini_account_poll_interval_seconds",
        "Interval between polls of the account: the configured one, stretched to fit the "
        "key's request budget (while its key's stream is up, at least the stream's "
        "reconcile_interval_seconds).",
        accounts, lambda s: s.balances_interval_seconds)
    yield _account_counter(
        "gemini_account_polls",
        "Background polls of the account's /v1/balances, successful or not.",
        accounts, lambda s: s.balances.polls)
    yield _errors_family("gemini_account_poll_errors",
                         f"Polls that gave no usable reply, {_REASONS}.", accounts,
                         lambda s: s.balances)
    yield _account_counter(
        "gemini_account_stale_replies",
        "Replies ignored because their `_timestamp` was older than the last accepted one.",
        accounts, lambda s: s.balances.stale_replies)
    yield _account_counter(
        "gemini_account_unstamped_replies",
        "Replies accepted without a `_timestamp` (staleness could not be checked).",
        accounts, lambda s: s.balances.unstamped_replies)
    info = InfoMetricFamily(
        "gemini_account", "The polled account, the key that polls it, its type, its display "
        "name (from the key's account listing; empty without one) and whether it was "
        "discovered (1) or configured (0).",
        labels=["account", "key", "account_type", "display_name", "discovered"])
    for snapshot in accounts:
        target = snapshot.target
        info.add_metric([target.label, target.key_name, snapshot.account_type,
                         target.display_name, str(int(target.discovered))], {})
    yield info
    yield from _endpoint_health_families(accounts, Endpoint.NOTIONAL, "/v1/notionalbalances",
                                         lambda s: s.notional)
    yield from _endpoint_health_families(accounts, Endpoint.STAKING, "/v1/balances/staking",
                                         lambda s: s.staking)
    yield _account_counter(
        "gemini_staking_unreadable_provider_entries",
        "Entries of `balanceByProvider` that could not be read and were left out (the row's "
        "totals were kept).",
        [s for s in accounts if s.target.staking_interval_seconds is not None],
        lambda s: s.staking.skipped_entries)


_ALLOW_LIST = ("Polled in the background from /v1/approvedAddresses/account/{network} every "
               "gemini_approved_addresses_poll_interval_seconds.")
ALLOW_LIST_LABELS = ["account", "network"]


def _allow_list_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    """The withdrawal allow-lists, one sample set per (account, network) read. Addresses and
    labels are unbounded values: they are logged, never label values."""
    lists = [(snapshot.target.label, allow_list.network,
              snapshot.allow_list(allow_list.network), snapshot.target)
             for snapshot in accounts for allow_list in snapshot.target.allow_lists]
    entries = GaugeMetricFamily(
        "gemini_approved_addresses",
        "Entries of the account's withdrawal allow-list of the network, by scope (account, "
        "group, other) and status (active; pending_time: the 7-day hold after an address is "
        "requested; pending_mua: waiting for a second administrator; other). A pair seen in an "
        f"earlier good list shows 0 once it is gone. {_ALLOW_LIST}",
        labels=["account", "network", "scope", "status"])
    for label, network, state, _ in lists:
        for row in state.poll.rows:
            entries.add_metric([label, network, row.scope, row.status], row.entries)
    yield entries

    def gauge(name: str, help_text: str,
              value: Callable[[AllowListState, AccountTarget], float | None]) -> Metric:
        family = GaugeMetricFamily(name, help_text, labels=ALLOW_LIST_LABELS)
        for label, network, state, target in lists:
            sample = value(state, target)
            if sample is not None:
                family.add_metric([label, network], sample)
        return family

    def counter(name: str, help_text: str, value: Callable[[AllowListState], int]) -> Metric:
        family = CounterMetricFamily(name, help_text, labels=ALLOW_LIST_LABELS)
        for label, network, state, _ in lists:
            family.add_metric([label, network], value(state))
        return family
    yield gauge(
        "gemini_approved_address_newest_created_timestamp_seconds",
        "Unix time the newest entry of the allow-list was created (Gemini `createdAt`).",
        lambda state, _: _seconds_of_ms(state.newest_created_ms))
    yield counter(
        "gemini_approved_addresses_added",
        "Entries (scope, address) of the allow-list that were not in its previous good list "
        "(each logged as a warning). The first list read is the baseline; with --storage.path, "
        "an entry added while the exporter was stopped counts after the restart.",
        lambda state: state.added)
    yield gauge(
        "gemini_approved_addresses_last_success_timestamp_seconds",
        "Unix time of the last accepted allow-list of the network: data age is now minus this.",
        lambda state, _: state.poll.last_success_seconds)
    yield gauge(
        "gemini_approved_addresses_up",
        "1 if the last background poll of the allow-list gave a usable list (a stale one "
        "counts), else 0 (also before the first poll); the last good list stays shown.",
        lambda state, _: float(state.poll.up))
    yield gauge(
        "gemini_approved_addresses_poll_interval_seconds",
        "Interval between polls of each network's allow-list: the configured one, stretched to "
        "fit the key's request budget.", lambda _, target: target.allow_list_interval_seconds)
    errors = CounterMetricFamily(
        "gemini_approved_addresses_poll_errors",
        f"Polls of the allow-list that gave no usable list, {_REASONS}.",
        labels=["account", "network", "reason"])
    for label, network, state, _ in lists:
        for reason, count in sorted(state.poll.errors.items()):
            errors.add_metric([label, network, reason], count)
    yield errors
    yield counter(
        "gemini_approved_addresses_stale_replies",
        "Allow-list replies ignored because their `_timestamp` was older than the last "
        "accepted one.", lambda state: state.poll.stale_replies)


TRANSFER_LABELS = ["account", "currency", "type"]


def _transfers_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    """The money movements of the accounts that read them: one sample set per (currency,
    type). Transfer ids, destinations and tx hashes go to the log, never into a label."""
    reading = [s for s in accounts if s.target.transfers_interval_seconds is not None]
    totals = [(snapshot.target.label, row) for snapshot in reading
              for row in snapshot.transfers.poll.rows]

    def by_pair(family: GaugeMetricFamily | CounterMetricFamily,
                value: Callable[[TransferTotals], float | None]) -> Metric:
        for label, row in totals:
            sample = value(row)
            if sample is not None:
                family.add_metric([label, row.currency, row.type], sample)
        return family
    yield by_pair(CounterMetricFamily(
        "gemini_transfers", "Transfers seen in the account's /v2/transfers (each counted once, "
        "when first seen, in any status: a withdrawal counts when it starts), by currency and "
        "type. The first poll after start counts only the pending ones it finds; with "
        "--storage.path, those made while the exporter was stopped count after the restart.",
        labels=TRANSFER_LABELS), lambda row: row.transfers)
    yield by_pair(CounterMetricFamily(
        "gemini_transferred_amount", "The amounts of the transfers counted in "
        "gemini_transfers_total, in units of the currency (floored to its precision).",
        labels=TRANSFER_LABELS), lambda row: float(row.amount))
    yield by_pair(GaugeMetricFamily(
        "gemini_transfers_pending", "Transfers of the account still Pending, by currency and "
        "type (0 once none is).", labels=TRANSFER_LABELS), lambda row: row.pending)
    yield by_pair(GaugeMetricFamily(
        "gemini_transfers_pending_amount", "The amount of the transfers still Pending.",
        labels=TRANSFER_LABELS), lambda row: float(row.pending_amount))
    yield by_pair(GaugeMetricFamily(
        "gemini_transfer_oldest_pending_timestamp_seconds", "When the oldest transfer still "
        "Pending began (Gemini `timestampms`): its age is now minus this.",
        labels=TRANSFER_LABELS), lambda row: _seconds_of_ms(row.oldest_pending_ms))
    yield _account_counter(
        "gemini_transfers_gaps", "Transfers pages that were full before the time asked: "
        "transfers between them may have been missed (logged).", reading,
        lambda s: s.transfers.gaps)
    yield _account_counter(
        "gemini_transfers_pending_dropped", "Pending transfers no longer tracked because more "
        "than 1,000 were pending (the oldest go first, logged).", reading,
        lambda s: s.transfers.dropped)
    yield from _endpoint_health_families(reading, Movements.TRANSFERS, "/v2/transfers",
                                         lambda s: s.transfers.poll, stamped=False)
    yield _account_gauge(
        "gemini_account_max_withdrawal_pending_seconds",
        "Configured longest a withdrawal may stay pending (`max_withdrawal_pending_seconds`); "
        "alert rules compare against it.", accounts,
        lambda s: s.target.max_withdrawal_pending_seconds)
    most = GaugeMetricFamily(
        "gemini_account_max_withdrawn_per_hour", "Configured most that may be withdrawn within "
        "an hour, per currency (`max_withdrawn_per_hour`); alert rules compare against it.",
        labels=BALANCE_LABELS)
    for snapshot in accounts:
        for currency, value in snapshot.target.max_withdrawn_per_hour:
            most.add_metric([snapshot.target.label, currency], value)
    yield most


def _seconds_of_ms(milliseconds: int | None) -> float | None:
    return None if milliseconds is None else milliseconds / 1e3


def _seconds(nanoseconds: int | None) -> float | None:
    return None if nanoseconds is None else nanoseconds / 1e9


def _last_update_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    yield _account_gauge(
        "gemini_account_last_update_timestamp_seconds", "When Gemini last changed the account's "
        "balances, by `u` of its stream's last balanceUpdate frame (absent before the first; "
        "never goes back; not compared with the REST replies' `_timestamp`).", accounts,
        lambda s: _seconds(s.last_update_ns))


@dataclass(frozen=True)
class FamilyGroup:
    """Families made from the same parts of an account's snapshot: an account whose parts of a
    group are equal to those its lines were made from has the same lines (`exposition` keeps
    them instead of making them again: a poll that moved no balance makes the health lines
    only)."""

    parts: Callable[[AccountSnapshot], tuple[object, ...]]
    families: Callable[[tuple[AccountSnapshot, ...]], Iterator[Metric]]
    # The same families as plain gauge samples, where they are all gauges (the fast path).
    gauges: Callable[[tuple[AccountSnapshot, ...]], Iterator[GaugeSamples]] | None = None


ACCOUNT_FAMILY_GROUPS = (
    FamilyGroup(lambda s: (s.target, s.balances.row_fields, s.notional.row_fields,
                           s.staking.row_fields), _balance_families, balance_gauges),
    FamilyGroup(lambda s: (s.target,), _threshold_families),
    FamilyGroup(lambda s: (s.target, s.balances, s.notional, s.staking, s.account_type,
                           s.reconcile_seconds), _health_families),
    FamilyGroup(lambda s: (s.target, s.allow_lists), _allow_list_families),
    FamilyGroup(lambda s: (s.target, s.transfers), _transfers_families),
    FamilyGroup(lambda s: (s.last_update_ns,), _last_update_families),
)


def account_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    """The families with one sample set per account, always the same families in one order."""
    for group in ACCOUNT_FAMILY_GROUPS:
        yield from group.families(accounts)


@dataclass
class ExporterCounters:
    """The exporter's own troubles that are not an account's or a key's: each is logged (once
    per interval where it can flood) and counted here."""

    collect_errors: int = 0  # rendering or compacting the /metrics body failed
    http_bad_requests: int = 0  # malformed requests, answered 400
    http_accept_errors: int = 0  # accept() failed (out of descriptors)
    http_connections_closed: int = 0  # closed to make room under the connection cap
    state_save_errors: int = 0  # saving the --storage.path state failed

    def count_state_save_error(self) -> None:
        self.state_save_errors += 1


_EXPORTER_COUNTERS = (
    ("gemini_exporter_collect_errors", "collect_errors",
     "Times an account's samples could not be rendered for /metrics (its previously rendered "
     "samples, or none, were served instead), the gzip body could not be compacted (its "
     "uncompacted members were served), or rendering changed accounts in the background failed "
     "(scrapes rendered them)."),
    ("gemini_exporter_http_bad_requests", "http_bad_requests",
     "Malformed HTTP requests answered 400 (bad headers, oversized lines; a garbled request "
     "line, as from port scanners, is answered without being counted)."),
    ("gemini_exporter_http_accept_errors", "http_accept_errors",
     "Times accepting an HTTP connection failed (out of file descriptors, say)."),
    ("gemini_exporter_http_connections_closed", "http_connections_closed",
     "HTTP connections closed to make room under the connection cap (a flood, or slow "
     "clients)."),
    ("gemini_exporter_state_save_errors", "state_save_errors",
     "Times saving the --storage.path state failed (it is saved again later)."),
)


def _key_gauge(
    name: str, help_text: str, keys: Iterable[KeyCounters],
    value: Callable[[KeyCounters], float | None],
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, help_text, labels=["key"])
    for key in keys:
        sample = value(key)
        if sample is not None:
            family.add_metric([key.name], sample)
    return family


def _discovery_families(keys: tuple[KeyCounters, ...]) -> Iterator[Metric]:
    discovering = [key for key in keys if key.discovery is not None]

    def of(key: KeyCounters) -> DiscoveryState:
        assert key.discovery is not None
        return key.discovery
    listed = GaugeMetricFamily(
        "gemini_key_discovered_accounts",
        "Accounts in the key's last successful /v1/account/list, by type and status (only open "
        "exchange accounts are polled).", labels=["key", "type", "status"])
    for key in discovering:
        counts: dict[tuple[str, str], int] = {}
        for row in of(key).listed:
            kind = (row.account_type, row.status)
            counts[kind] = counts.get(kind, 0) + 1
        for (account_type, status), count in sorted(counts.items()):
            listed.add_metric([key.name, account_type, status], count)
    yield listed
    yield _key_gauge(
        "gemini_key_discovery_polled_accounts",
        "Discovered accounts the key polls: open exchange accounts that match the patterns, "
        "whose label no other account has.", discovering, lambda k: of(k).polled)
    yield _key_gauge(
        "gemini_key_discovery_label_conflicts",
        "Listed accounts the key would poll but does not, because another account already has "
        "their label (logged).", discovering, lambda k: of(k).label_conflicts)
    yield _key_gauge(
        "gemini_key_discovery_up",
        "1 if the key's last account listing succeeded, else 0 (also before the first one).",
        discovering, lambda k: float(of(k).up))
    yield _key_gauge(
        "gemini_key_discovery_last_success_timestamp_seconds",
        "Unix time of the key's last successful account listing.",
        discovering, lambda k: of(k).last_success_seconds)
    yield _key_gauge(
        "gemini_key_discovery_refresh_interval_seconds",
        "Interval between the key's account listings, stretched to fit its request budget.",
        discovering, lambda k: of(k).refresh_seconds)
    yield _key_gauge(
        "gemini_key_discovery_listing_full",
        "1 if the key's last listing was cut short (it filled discover.max_pages pages of 500, "
        "or a full page could not be paged past): accounts past them are not polled.",
        discovering, lambda k: float(of(k).full))
    errors = CounterMetricFamily(
        "gemini_key_discovery_errors",
        f"Account listings that failed, {_REASONS}; the last good listing stays in use.",
        labels=["key", "reason"])
    for key in discovering:
        for reason, count in sorted(of(key).errors.items()):
            errors.add_metric([key.name, reason], count)
    yield errors


def _roles_families(keys: tuple[KeyCounters, ...]) -> Iterator[Metric]:
    read = [key for key in keys if key.roles.roles is not None]
    role = GaugeMetricFamily(
        "gemini_key_role",
        "1 if the API key holds the role, by Gemini's /v1/roles (account_admin: master keys "
        "only); a monitoring key needs auditor only: any other role can trade or move funds.",
        labels=["key", "role"])
    for key in read:
        assert key.roles.roles is not None
        for name, held in key.roles.roles.held().items():
            role.add_metric([key.name, name], float(held))
    yield role
    yield _key_gauge(
        "gemini_key_roles_up",
        "1 if the key's last ask for its roles succeeded, else 0 (also before the first one); "
        "the last roles read stay shown.", keys, lambda k: float(k.roles.up))
    yield _key_gauge(
        "gemini_key_roles_last_success_timestamp_seconds",
        "Unix time of the key's last successful ask for its roles.",
        keys, lambda k: k.roles.last_success_seconds)
    errors = CounterMetricFamily(
        "gemini_key_roles_errors",
        f"Asks for the key's roles that failed, {_REASONS}.", labels=["key", "reason"])
    for key in keys:
        for reason, count in sorted(key.roles.errors.items()):
            errors.add_metric([key.name, reason], count)
    yield errors


def _stream_families(keys: tuple[KeyCounters, ...]) -> Iterator[Metric]:
    streaming = [(key, key.stream) for key in keys if key.stream is not None]
    yield _key_gauge(
        "gemini_stream_up", "1 while the key's balances@account stream is connected and "
        "subscribed, else 0 (its account's balances are then polled at their planned "
        "interval).", [key for key, _ in streaming],
        lambda k: float(k.stream.up) if k.stream else None)
    yield _key_gauge(
        "gemini_stream_last_frame_timestamp_seconds", "Unix time the key's last balanceUpdate "
        "frame came.", [key for key, _ in streaming],
        lambda k: k.stream.last_frame_seconds if k.stream else None)
    for name, help_text, field in (
        ("gemini_stream_connects", "Stream connections that were opened and subscribed.",
         "connects"),
        ("gemini_stream_frames", "balanceUpdate frames the stream brought.", "frames"),
        ("gemini_stream_triggered_polls", "Balances polls a frame made due (frames that came "
         "while one was due already made none).", "triggered_polls"),
    ):
        family = CounterMetricFamily(name, help_text, labels=["key"])
        for key, stream in streaming:
            family.add_metric([key.name], getattr(stream, field))
        yield family
    errors = CounterMetricFamily(
        "gemini_stream_errors", "Stream troubles by reason: rejected (401/403 on the upgrade), "
        "connect_failed, upgrade_failed, subscribe_failed, subscribe_timeout, pong_timeout, "
        "idle_timeout, frame_too_large, closed, malformed_frame (ignored) and future_update (a "
        "`u` too far ahead of this clock, ignored).", labels=["key", "reason"])
    for key, stream in streaming:
        for reason, count in sorted(stream.errors.items()):
            errors.add_metric([key.name, reason], count)
    yield errors


def exporter_families(store: BalanceStore, counters: ExporterCounters) -> Iterator[Metric]:
    """The families that are not per account: keys, build, and the collector's own errors."""
    keys = store.key_counters()
    for name, help_text, field in (
        ("gemini_key_requests", "Requests sent to Gemini with the key.", "requests"),
        ("gemini_key_rate_limited", "Replies that said the key was rate limited (429).",
         "rate_limited"),
        ("gemini_key_worker_restarts", "Times the key's poll worker crashed (a bug, logged "
         "with its traceback) and was started again.", "worker_restarts"),
    ):
        family = CounterMetricFamily(name, help_text, labels=["key"])
        for key in keys:
            family.add_metric([key.name], getattr(key, field))
        yield family
    yield _key_gauge(
        "gemini_key_worker_running",
        "1 while the key's poll worker runs, 0 while it is down (between a crash and its "
        "restart, or for good): nothing is polled with the key then.",
        keys, lambda k: float(k.worker_running))
    yield _key_gauge(
        "gemini_key_poll_lag_seconds", "How late the key's last request started after it was "
        "due: above its spacing, the key is behind its plan (its data ages, and the staleness "
        "alerts follow).", keys, lambda k: k.poll_lag_seconds)
    yield from _discovery_families(keys)
    yield from _roles_families(keys)
    yield from _stream_families(keys)
    build = InfoMetricFamily("gemini_exporter_build", "The exporter's version.", labels=["version"])
    build.add_metric([__version__], {})
    yield build
    for name, field, help_text in _EXPORTER_COUNTERS:
        yield CounterMetricFamily(name, help_text, value=getattr(counters, field))
    yield CounterMetricFamily(
        "gemini_exporter_plan_errors", "Times a new plan after an account listing could not be "
        "made (a bug, logged with its traceback); the last plan stayed in use.",
        value=store.plan_errors)


class BalanceCollector(Collector):
    """Every family from the store, through prometheus_client's generic rendering path. It
    renders no account on its own, so it has no render errors to count."""

    def __init__(self, store: BalanceStore) -> None:
        self._store = store

    def describe(self) -> Iterable[Metric]:
        # Describing nothing keeps the registry from running collect() at registration.
        return []

    def collect(self) -> Iterable[Metric]:
        yield from account_families(self._store.account_snapshots())
        yield from exporter_families(self._store, ExporterCounters())


def register_process_collectors(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


def build_registry(store: BalanceStore, process_metrics: bool = True) -> CollectorRegistry:
    """A registry of our own (never the global one) with prometheus_client's generic path: the
    reference the fast path in `exposition` is held to, byte for byte."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BalanceCollector(store))
    if process_metrics:
        register_process_collectors(registry)
    return registry
