"""The Grafana dashboard "Gemini balances", built with Grafana's typed builders
(grafana-foundation-sdk), so that every panel, option and query is one Grafana's own model of a
dashboard knows.

    python deploy/grafana/dashboard.py            # writes the JSON the chart and deploy/ ship
    python deploy/grafana/dashboard.py --check    # exit 1 if the committed JSON differs

It writes `helm/balance-exporter/files/dashboard.json`, which
`deploy/grafana/dashboards/gemini-balances.json` links to. The exporter package does not depend
on the SDK: it is a test dependency (`pip install -e .[test]`).
"""

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from grafana_foundation_sdk.builders import bargauge, common, dashboard, prometheus, stat, table
from grafana_foundation_sdk.builders import timeseries as timeseries_panel
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as common_model
from grafana_foundation_sdk.models import dashboard as dashboard_model
from grafana_foundation_sdk.models import prometheus as prometheus_model

OUTPUT = Path(__file__).resolve().parents[2] / "helm/balance-exporter/files/dashboard.json"

DATASOURCE = dashboard_model.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The two filters of every account query, written once: the dashboard's variables.
ACCOUNT = 'account=~"$account"'
CURRENCY = 'currency=~"$currency"'
PENDING_TIME = 'status="pending_time"'
# Columns of a table of instant series that say nothing about the account.
TABLE_NOISE = {"Time": True, "__name__": True, "job": True, "instance": True}


def of_accounts(metric: str, *matchers: str) -> str:
    """`metric` of the selected accounts (and `matchers`)."""
    return f"{metric}{{{', '.join((ACCOUNT, *matchers))}}}"


def of_balances(metric: str, *matchers: str) -> str:
    """`metric` of the selected accounts and currencies (and `matchers`)."""
    return f"{metric}{{{', '.join((ACCOUNT, CURRENCY, *matchers))}}}"


def query(expr: str, legend: str, *, instant: bool = False,
          as_table: bool = False) -> prometheus.Dataquery:
    built = prometheus.Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)
    if instant:
        built = built.instant()
    if as_table:
        built = built.format(prometheus_model.PromQueryFormat.TABLE)
    return built


PanelT = TypeVar("PanelT", stat.Panel, timeseries_panel.Panel, bargauge.Panel, table.Panel)
AnyPanel = stat.Panel | timeseries_panel.Panel | bargauge.Panel | table.Panel


def _with_queries(
    panel: PanelT, title: str, description: str, unit: str, queries: Sequence[prometheus.Dataquery],
) -> PanelT:
    panel.title(title).description(description).unit(unit).datasource(DATASOURCE)
    for ref_id, built in zip("ABCDEFGH", queries, strict=False):
        panel.with_target(built.ref_id(ref_id))
    return panel


def _last_value() -> common.ReduceDataOptions:
    return common.ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)


def big_number(title: str, description: str, unit: str, *queries: prometheus.Dataquery,
               graph: bool = False, height: int = 4) -> stat.Panel:
    panel = (stat.Panel().span(6).height(height).reduce_options(_last_value())
             .color_mode(common_model.BigValueColorMode.VALUE)
             .graph_mode(common_model.BigValueGraphMode.AREA if graph
                         else common_model.BigValueGraphMode.NONE)
             .text_mode(common_model.BigValueTextMode.AUTO))
    return _with_queries(panel, title, description, unit, queries)


def over_time(title: str, description: str, unit: str, *queries: prometheus.Dataquery,
              width: int = 12, height: int = 8) -> timeseries_panel.Panel:
    panel = (timeseries_panel.Panel().span(width).height(height)
             .legend(common.VizLegendOptions().show_legend(True)
                     .display_mode(common_model.LegendDisplayMode.TABLE)
                     .placement(common_model.LegendPlacement.BOTTOM)
                     .calcs(["lastNotNull"]))
             .tooltip(common.VizTooltipOptions()
                      .mode(common_model.TooltipDisplayMode.MULTI)
                      .sort(common_model.SortOrder.DESCENDING)))
    return _with_queries(panel, title, description, unit, queries)


def bars(title: str, description: str, expr: str, legend: str) -> bargauge.Panel:
    panel = (bargauge.Panel().span(12).height(8).reduce_options(_last_value())
             .orientation(common_model.VizOrientation.HORIZONTAL)
             .display_mode(common_model.BarGaugeDisplayMode.GRADIENT)
             .show_unfilled(True))
    return _with_queries(panel, title, description, "short",
                         [query(expr, legend, instant=True)])


def latest_table(title: str, description: str, *queries: prometheus.Dataquery,
                 merged: bool = False) -> table.Panel:
    panel = table.Panel().span(12).height(8)
    if merged:
        panel.with_transformation(dashboard_model.DataTransformerConfig(id_val="merge",
                                                                        options={}))
    panel.with_transformation(dashboard_model.DataTransformerConfig(
        id_val="organize", options={"excludeByName": TABLE_NOISE}))
    return _with_queries(panel, title, description, "short", queries)


def variables() -> list[cogbuilder.Builder[dashboard_model.VariableModel]]:
    def label_values(name: str, label: str, selector: str) -> dashboard.QueryVariable:
        expr = f"label_values({selector}, {name})"
        return (dashboard.QueryVariable(name).label(label).datasource(DATASOURCE)
                .query({"query": expr, "refId": name})
                .multi(True).include_all(True).all_value(".*")
                .refresh(dashboard_model.VariableRefresh.ON_TIME_RANGE_CHANGED)
                .sort(dashboard_model.VariableSort.ALPHABETICAL_ASC))
    return [
        dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"),
        label_values("account", "Account", "gemini_account_info"),
        label_values("currency", "Currency", of_accounts("gemini_balance_amount")),
    ]


def health_row() -> list[AnyPanel]:
    return [
        big_number("Accounts up", "Accounts whose last poll gave a usable reply, out of all "
                   "configured accounts.", "none",
                   query(f"sum({of_accounts('gemini_account_up')})", "up"),
                   query(f"count({of_accounts('gemini_account_up')})", "configured")),
        big_number("Oldest data", "Age of the oldest account's last accepted (fresh) balances. "
                   "Alerts fire past three poll intervals.", "s",
                   query(f"max(time() - "
                         f"{of_accounts('gemini_account_last_success_timestamp_seconds')})",
                         "oldest")),
        big_number("Poll errors (last hour)", "Failed polls of the selected accounts over the "
                   "last hour, all reasons.", "none",
                   query(f"sum(increase({of_accounts('gemini_account_poll_errors_total')}[1h]))",
                         "errors")),
        big_number("Stale replies (last hour)", "Replies ignored because Gemini's _timestamp "
                   "was older than the last accepted one.", "none",
                   query("sum(increase("
                         f"{of_accounts('gemini_account_stale_replies_total')}[1h]))", "stale")),
    ]


def treasury_row() -> list[AnyPanel]:
    total = f"sum by (notional_currency) ({of_accounts('gemini_balance_amount_notional')})"
    return [
        big_number("Total value", "What the selected accounts hold, valued in the quote "
                   "currency (gemini_balance_amount_notional, from /v1/notionalbalances).",
                   "short", query(total, "{{notional_currency}}"), graph=True, height=5),
        over_time("Total value over time", "The selected accounts' total value in the quote "
                  "currency, over time.", "short", query(total, "total {{notional_currency}}"),
                  width=18, height=5),
        bars("Value per account", "Each account's total value in the quote currency.",
             "sort_desc(sum by (account, notional_currency) "
             f"({of_accounts('gemini_balance_amount_notional')}))",
             "{{account}} ({{notional_currency}})"),
        bars("Value per currency", "The value of each currency across the selected accounts, "
             "in the quote currency.",
             "sort_desc(sum by (currency, notional_currency) "
             f"({of_balances('gemini_balance_amount_notional')}))",
             "{{currency}} ({{notional_currency}})"),
        over_time("Available value vs minimum", "Each account's available value (sum of "
                  "gemini_balance_available_notional) and its configured "
                  "min_available_notional, which GeminiBalanceNotionalBelowMinimum compares.",
                  "short",
                  query(f"sum by (account) ({of_accounts('gemini_balance_available_notional')})",
                        "{{account}} available"),
                  query(of_accounts("gemini_account_min_available_notional"),
                        "{{account}} minimum")),
        over_time("Staked balances", "Staked balances per account and currency "
                  "(gemini_staking_balance, from /v1/balances/staking), with what can be "
                  "redeemed to the exchange account.", "short",
                  query(of_balances("gemini_staking_balance"), "{{account}} {{currency}} staked"),
                  query(of_balances("gemini_staking_available_for_withdrawal"),
                        "{{account}} {{currency}} redeemable")),
        latest_table("Staked per provider", "The latest staked balance per staking provider.",
                     query(of_balances("gemini_staking_balance_by_provider"), "staked",
                           instant=True, as_table=True)),
        over_time("Discovery health", "Per discovering key: accounts polled from its listing, "
                  "the listing's age and whether the last one worked.", "short",
                  query("gemini_key_discovery_polled_accounts", "{{key}} accounts polled"),
                  query("sum by (key, type, status) (gemini_key_discovered_accounts)",
                        "{{key}} listed {{type}} {{status}}"),
                  query("time() - gemini_key_discovery_last_success_timestamp_seconds",
                        "{{key}} listing age (s)"),
                  query("gemini_key_discovery_up", "{{key}} last listing worked"),
                  query("sum by (key, reason) "
                        "(rate(gemini_key_discovery_errors_total[$__rate_interval]))",
                        "{{key}} errors/s {{reason}}")),
    ]


def controls_row() -> list[AnyPanel]:
    return [
        big_number("Keys beyond Auditor", "API keys of the exporter that Gemini says hold a role "
                   "beyond Auditor (gemini_key_role): they can trade or move funds, and "
                   "GeminiBalanceKeyOverprivileged fires for them.", "none",
                   query('count(max by (key) (gemini_key_role{role!="auditor"}) == 1) '
                         "or vector(0)", "keys")),
        latest_table("Key roles", "The roles each API key holds, by Gemini's /v1/roles (a "
                     "monitoring key needs auditor only).",
                     query("gemini_key_role == 1", "held", instant=True, as_table=True)),
        big_number("Addresses in the 7-day hold", "Withdrawal allow-list entries in Gemini's "
                   "pending-time hold, over the selected accounts: each is a requested address "
                   "to check with the team (GeminiBalanceApprovedAddressPending pages for it).",
                   "none",
                   query(f"sum({of_accounts('gemini_approved_addresses', PENDING_TIME)}) "
                         "or vector(0)", "entries")),
        latest_table("Allow-list entries by status", "Entries of each account's withdrawal "
                     "allow-list per network, by scope and status (approved_addresses.networks).",
                     query(of_accounts("gemini_approved_addresses") + " > 0", "entries",
                           instant=True, as_table=True)),
        big_number("Streams down", "Streaming keys whose balances@account stream is not "
                   "connected and subscribed (their balances are polled at their planned "
                   "interval meanwhile; GeminiBalanceStreamDown).", "none",
                   query("count(gemini_stream_up == 0) or vector(0)", "keys")),
        over_time("Stream frames per minute", "balanceUpdate frames per minute per streaming "
                  "key, and the balances polls they made due.", "short",
                  query("sum by (key) (rate(gemini_stream_frames_total[$__rate_interval])) * 60",
                        "{{key}} frames"),
                  query("sum by (key) (rate(gemini_stream_triggered_polls_total"
                        "[$__rate_interval])) * 60", "{{key}} polls")),
        over_time("Allow-list additions", "Entries added to each account's allow-lists per "
                  "hour (the exporter logs each one as `approved withdrawal address added`).",
                  "short",
                  query("sum by (account, network) (increase("
                        f"{of_accounts('gemini_approved_addresses_added_total')}[1h]))",
                        "{{account}} {{network}}")),
    ]


def movements_row() -> list[AnyPanel]:
    withdrawals = 'type="withdrawal"'
    return [
        over_time("Deposits and withdrawals per hour", "Amounts moved in and out of each "
                  "account per hour, by currency, from its /v2/transfers (each transfer counted "
                  "once, when it starts).", "short",
                  query("sum by (account, currency, type) (increase("
                        f"{of_balances('gemini_transferred_amount_total')}[1h]))",
                        "{{account}} {{currency}} {{type}}")),
        over_time("Oldest pending withdrawal", "How long the oldest withdrawal still pending has "
                  "been, per account and currency, against the account's threshold "
                  "(GeminiBalanceWithdrawalPendingTooLong).", "s",
                  query("time() - "
                        f"{of_balances('gemini_transfer_oldest_pending_timestamp_seconds')}",
                        "{{account}} {{currency}} {{type}}"),
                  query(of_accounts("gemini_account_max_withdrawal_pending_seconds"),
                        "{{account}} threshold")),
        latest_table("Pending transfers", "Transfers still pending, with their amount, per "
                     "account, currency and type.",
                     query(of_balances("gemini_transfers_pending") + " > 0", "pending",
                           instant=True, as_table=True),
                     query(of_balances("gemini_transfers_pending_amount") + " > 0", "amount",
                           instant=True, as_table=True),
                     merged=True),
        big_number("Transfer gaps (1h)", "Transfers pages that were full before the time asked "
                   "in the last hour: transfers may have been missed (GeminiBalanceTransfersGap).",
                   "none",
                   query(f"sum(increase({of_accounts('gemini_transfers_gaps_total')}[1h])) "
                         "or vector(0)", "gaps")),
        big_number("Withdrawn in the last hour", "Withdrawals started in the last hour over the "
                   "selected accounts, per currency.", "short",
                   query(f"sum by (currency) (increase("
                         f"{of_balances('gemini_transferred_amount_total', withdrawals)}[1h]))",
                         "{{currency}}")),
    ]


def balances_row() -> list[AnyPanel]:
    amount, available = of_balances("gemini_balance_amount"), of_balances(
        "gemini_balance_available")
    return [
        over_time("Amount vs available", "Confirmed balance (amount) and the part available "
                  "for trading, per account and currency.", "short",
                  query(amount, "{{account}} {{currency}} amount"),
                  query(available, "{{account}} {{currency}} available")),
        over_time("Holds (amount \u2212 available)", "Funds held by open orders or withdrawals "
                  "being processed: amount minus available.", "short",
                  query(f"{amount} - {available}", "{{account}} {{currency}}")),
        over_time("Pending deposits and withdrawals", "In-flight deposits and withdrawals "
                  "(accounts polled with show_pending_balances).", "short",
                  query(of_balances("gemini_balance_pending_deposit"),
                        "{{account}} {{currency}} deposit"),
                  query(of_balances("gemini_balance_pending_withdrawal"),
                        "{{account}} {{currency}} withdrawal")),
        latest_table("Current balances", "The latest balances with their configured minimums, "
                     "as a table.",
                     query(available, "available", instant=True, as_table=True),
                     query(of_balances("gemini_balance_min_available"), "minimum",
                           instant=True, as_table=True),
                     merged=True),
    ]


def polling_row() -> list[AnyPanel]:
    return [
        over_time("Data age per account", "Seconds since each account's last accepted (fresh) "
                  "reply.", "s",
                  query(f"time() - "
                        f"{of_accounts('gemini_account_last_success_timestamp_seconds')}",
                        "{{account}}")),
        over_time("Poll errors by reason", "Failed polls per second, by account and reason "
                  "(Gemini's reason, Timeout, ConnectionError, MalformedReply, HTTP<status>).",
                  "reqps",
                  query("sum by (account, reason) (rate("
                        f"{of_accounts('gemini_account_poll_errors_total')}[$__rate_interval]))",
                        "{{account}} {{reason}}")),
        over_time("Rate limiting per key", "429 replies and all requests per second, per API "
                  "key.", "reqps",
                  query("sum by (key) (rate(gemini_key_rate_limited_total[$__rate_interval]))",
                        "{{key}} rate limited"),
                  query("sum by (key) (rate(gemini_key_requests_total[$__rate_interval]))",
                        "{{key}} requests")),
        over_time("Poll duration", "How long each account's last poll took.", "s",
                  query(of_accounts("gemini_account_poll_duration_seconds"), "{{account}}")),
        over_time("Poll lag per key", "How late each key's last request started after it was "
                  "due: a key at its budget starts late by its queue; a lag that stays is the "
                  "exporter short of CPU or of a shared budget (GeminiBalancePollingBehind).",
                  "s",
                  query("max by (key) (gemini_key_poll_lag_seconds)", "{{key}}")),
        over_time("Exporter CPU", "The exporter's CPU in cores: at 1 it is saturated, and the "
                  "keys' poll lag grows (a scrape still answers).", "none",
                  # This exporter's processes, whatever their job is called.
                  query("rate(process_cpu_seconds_total[$__rate_interval]) "
                        "and on (job, instance) gemini_exporter_build_info", "{{instance}}")),
    ]


def build() -> dashboard.Dashboard:
    built = (dashboard.Dashboard("Gemini balances").uid("gemini-balances")
             .description("Balances and polling health from balance-exporter.")
             .tags(["gemini", "balances", "balance-exporter"])
             .timezone("browser").editable().refresh("30s").time("now-6h", "now")
             .tooltip(dashboard_model.DashboardCursorSync.CROSSHAIR)
             .variables(variables()))
    rows: list[tuple[str, Sequence[AnyPanel]]] = [
        ("Health", health_row()), ("Treasury", treasury_row()), ("Controls", controls_row()),
        ("Movements", movements_row()),
        ("Balances", balances_row()), ("Polling", polling_row())]
    ids = itertools.count(1)
    for title, panels in rows:
        built.with_row(dashboard.Row(title).id(next(ids)))
        for panel in panels:
            built.with_panel(panel.id(next(ids)))
    return built


def rendered() -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if {OUTPUT.name} differs from what this code builds")
    args = parser.parse_args(argv)
    text = rendered()
    if args.check:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is not what {Path(__file__).name} builds: run it", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
