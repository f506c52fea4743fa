"""The metric families: what a snapshot of the balance store means as Prometheus metrics.

It never does I/O: values were fetched by the background pollers. `exposition` renders these
families per account for /metrics (and counts an account that fails to render in
`gemini_exporter_collect_errors_total`); `BalanceCollector` renders them all through
prometheus_client's generic path, the reference the fast path is held to byte for byte and the
benchmarks' baseline.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from balance_exporter import __version__
from balance_exporter.gemini.replies import CurrencyBalance
from balance_exporter.store import AccountSnapshot, BalanceStore

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
ACCOUNT_LABELS = ["account"]
BALANCE_LABELS = ["account", "currency"]


def _balance_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    for gauge in BALANCE_GAUGES:
        family = GaugeMetricFamily(gauge.name, f"{gauge.help} {_POLLED}", labels=BALANCE_LABELS)
        for snapshot in accounts:
            if gauge.pending and not snapshot.target.show_pending_balances:
                continue
            balance: CurrencyBalance
            for balance in snapshot.balances:
                family.add_metric(
                    [snapshot.target.label, balance.currency], getattr(balance, gauge.field)
                )
        yield family


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


def _health_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    yield _account_gauge(
        "gemini_account_up",
        "1 if the last background poll of the account gave a usable reply (a stale one "
        "counts), else 0 (also before the first poll).",
        accounts, lambda s: float(s.up))
    yield _account_gauge(
        "gemini_account_last_success_timestamp_seconds",
        "Unix time of the last accepted (fresh) /v1/balances reply: data age is now minus this.",
        accounts, lambda s: s.last_success_seconds)
    yield _account_gauge(
        "gemini_account_server_timestamp_seconds",
        "Gemini's `_timestamp` of the last accepted reply, in seconds.",
        accounts,
        lambda s: None if s.server_timestamp_ns is None else s.server_timestamp_ns / 1e9)
    yield _account_gauge(
        "gemini_account_poll_duration_seconds",
        "Duration of the account's last background poll of /v1/balances.",
        accounts, lambda s: s.last_poll_duration_seconds)
    yield _account_gauge(
        "gemini_account_poll_interval_seconds",
        "Interval between polls of the account: the configured one, stretched to fit the "
        "key's request budget.",
        accounts, lambda s: s.target.interval_seconds)
    yield _account_counter(
        "gemini_account_polls",
        "Background polls of the account's /v1/balances, successful or not.",
        accounts, lambda s: s.polls)
    errors = CounterMetricFamily(
        "gemini_account_poll_errors",
        "Polls that gave no usable reply, by Gemini's reason or the local failure "
        "(Timeout, ConnectionError, MalformedReply, HTTP<status>).",
        labels=["account", "reason"])
    for snapshot in accounts:
        for reason, count in sorted(snapshot.errors.items()):
            errors.add_metric([snapshot.target.label, reason], count)
    yield errors
    yield _account_counter(
        "gemini_account_stale_replies",
        "Replies ignored because their `_timestamp` was older than the last accepted one.",
        accounts, lambda s: s.stale_replies)
    yield _account_counter(
        "gemini_account_unstamped_replies",
        "Replies accepted without a `_timestamp` (staleness could not be checked).",
        accounts, lambda s: s.unstamped_replies)
    info = InfoMetricFamily(
        "gemini_account", "The configured account and the key that polls it.",
        labels=["account", "key", "account_type"])
    for snapshot in accounts:
        info.add_metric(
            [snapshot.target.label, snapshot.target.key_name, snapshot.account_type], {})
    yield info


def account_families(accounts: tuple[AccountSnapshot, ...]) -> Iterator[Metric]:
    """The families with one sample set per account, always the same families in one order."""
    yield from _balance_families(accounts)
    yield from _threshold_families(accounts)
    yield from _health_families(accounts)


@dataclass
class ExporterCounters:
    """The exporter's own troubles that are not an account's or a key's: each is logged (once
    per interval where it can flood) and counted here."""

    collect_errors: int = 0  # an account's samples failed to render
    http_bad_requests: int = 0  # malformed requests, answered 400
    http_accept_errors: int = 0  # accept() failed (out of descriptors)
    http_connections_closed: int = 0  # closed to make room under the connection cap
    state_save_errors: int = 0  # saving the --storage.path state failed

    def count_state_save_error(self) -> None:
        self.state_save_errors += 1


_EXPORTER_COUNTERS = (
    ("gemini_exporter_collect_errors", "collect_errors",
     "Times an account's samples could not be rendered for /metrics (its previously rendered "
     "samples, or none, were served instead)."),
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
    running = GaugeMetricFamily(
        "gemini_key_worker_running",
        "1 while the key's poll worker runs, 0 while it is down (between a crash and its "
        "restart, or for good): nothing is polled with the key then.", labels=["key"])
    for key in keys:
        running.add_metric([key.name], float(key.worker_running))
    yield running
    build = InfoMetricFamily("gemini_exporter_build", "The exporter's version.", labels=["version"])
    build.add_metric([__version__], {})
    yield build
    for name, field, help_text in _EXPORTER_COUNTERS:
        yield CounterMetricFamily(name, help_text, value=getattr(counters, field))


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
