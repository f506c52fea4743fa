"""The Grafana dashboard: its structure, and every PromQL expression parsed by promtool."""

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.deploy.tools import DEPLOY, exported_metric_names, metric_names_in, run, tool

DASHBOARD_FILE = DEPLOY / "grafana/dashboards/gemini-balances.json"
DASHBOARD = json.loads(DASHBOARD_FILE.read_text())
PANELS = [panel for panel in DASHBOARD["panels"] if panel["type"] != "row"]
# Grafana's variables, as a query would see them after substitution.
SUBSTITUTIONS = {"$__rate_interval": "1m", "$account": ".*", "$currency": ".*"}


def expressions() -> list[str]:
    exprs = [target["expr"] for panel in PANELS for target in panel["targets"]]
    exprs += [variable["query"]["query"] for variable in DASHBOARD["templating"]["list"]
              if variable["type"] == "query"]
    return exprs


def substituted(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def generator() -> ModuleType:
    """deploy/grafana/dashboard.py, which is a script of the deploy kit, not a package."""
    spec = importlib.util.spec_from_file_location("dashboard", DEPLOY / "grafana/dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboard_is_what_its_code_builds() -> None:
    built = generator()
    assert built.OUTPUT.resolve() == DASHBOARD_FILE.resolve()
    assert DASHBOARD_FILE.read_text() == built.rendered(), (
        "run: python deploy/grafana/dashboard.py")
    assert built.main(["--check"]) == 0


def test_the_check_fails_when_the_committed_file_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = generator()
    edited = tmp_path / "dashboard.json"
    edited.write_text(DASHBOARD_FILE.read_text().replace("Accounts up", "Accounts upp"))
    monkeypatch.setattr(built, "OUTPUT", edited)
    assert built.main(["--check"]) == 1


def test_grafanas_model_of_a_dashboard_reads_every_field_back() -> None:
    """Read into the SDK's model of a Grafana dashboard and written out again, the file is the
    same: it has no field that Grafana's model does not know (the model drops those)."""
    again = json.loads(json.dumps(Dashboard.from_json(DASHBOARD), cls=JSONEncoder))
    assert again == DASHBOARD


def test_timeseries_legends_are_shown() -> None:
    # The builders' legend hides itself unless told (showLegend false).
    legends = [panel["options"]["legend"] for panel in PANELS if panel["type"] == "timeseries"]
    assert legends
    assert all(legend["showLegend"] for legend in legends)


def test_dashboard_is_current_and_has_the_variables() -> None:
    assert DASHBOARD["schemaVersion"] >= 36
    assert DASHBOARD["uid"]
    variables = {variable["name"]: variable for variable in DASHBOARD["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("account", "currency"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"]
        assert variables[name]["multi"]


@pytest.mark.parametrize("panel", PANELS, ids=lambda panel: panel["title"])
def test_every_panel_has_title_description_unit_and_the_datasource_variable(
    panel: dict[str, Any],
) -> None:
    assert panel["title"]
    assert panel["description"]
    assert panel["fieldConfig"]["defaults"]["unit"]
    assert panel["datasource"]["uid"] == "${datasource}"
    assert panel["targets"]
    assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])


def test_the_required_panels_are_there() -> None:
    all_exprs = " ".join(expressions())
    for metric in ("gemini_balance_amount", "gemini_balance_available",
                   "gemini_balance_pending_deposit", "gemini_balance_pending_withdrawal",
                   "gemini_account_last_success_timestamp_seconds",
                   "gemini_account_poll_errors_total", "gemini_key_rate_limited_total",
                   # The treasury picture: value now and over time, per account and currency,
                   # staking, and discovery health.
                   "sum by (notional_currency) (gemini_balance_amount_notional",
                   "sum by (account, notional_currency) (gemini_balance_amount_notional",
                   "sum by (currency, notional_currency) (gemini_balance_amount_notional",
                   "gemini_account_min_available_notional", "gemini_staking_balance{",
                   "gemini_staking_balance_by_provider", "gemini_key_discovery_up",
                   "gemini_key_discovery_last_success_timestamp_seconds",
                   "gemini_key_discovered_accounts", "gemini_key_discovery_errors_total"):
        assert metric in all_exprs
    # The holds panel: amount minus available.
    assert " - gemini_balance_available{" in all_exprs


def test_every_expression_uses_only_exported_metrics() -> None:
    for expr in expressions():
        assert metric_names_in(expr) <= exported_metric_names(), expr


def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    # label_values(<selector>, label): the selector is the PromQL part.
    queries = [expr.removeprefix("label_values(").rsplit(",", 1)[0]
               if expr.startswith("label_values(") else expr for expr in expressions()]
    # As recording rules, each expression is parsed by Prometheus' own parser.
    rules = [{"record": f"dashboard:expr{index}", "expr": substituted(query)}
             for index, query in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(queries)} rules found" in result.stdout
