"""Alert rules, Prometheus and Alertmanager configs, checked by promtool and amtool."""

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import DEPLOY, ROOT, exported_metric_names, metric_names_in, run, tool

RULES = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
ALERTS = [rule for group in RULES["groups"] for rule in group["rules"]]
RUNBOOK = (ROOT / "docs" / "runbook.md").read_text()


def test_promtool_checks_the_rules() -> None:
    result = run(tool("promtool"), "check", "rules", "deploy/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_tests_pass() -> None:
    result = run(tool("promtool"), "test", "rules", "tests/deploy/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_rule_test() -> None:
    tests = yaml.safe_load((ROOT / "tests" / "deploy" / "alerts_test.yml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]}
    assert tested == {alert["alert"] for alert in ALERTS}


def test_promtool_checks_the_prometheus_config() -> None:
    result = run(tool("promtool"), "check", "config", "deploy/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("alert", ALERTS, ids=lambda alert: alert["alert"])
def test_alerts_follow_the_mixin_conventions(alert: dict[str, object]) -> None:
    name = str(alert["alert"])
    assert re.fullmatch(r"GeminiBalance[A-Z][A-Za-z]+", name)
    labels, annotations = alert["labels"], alert["annotations"]
    assert isinstance(labels, dict)
    assert isinstance(annotations, dict)
    assert labels["severity"] in {"critical", "warning", "info"}
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert "{{ $labels." in annotations["description"] or name == "GeminiBalanceExporterAbsent"
    anchor = annotations["runbook_url"].split("#")[1]
    assert f"\n## {name}\n" in RUNBOOK
    assert anchor == name.lower()


@pytest.mark.parametrize("alert", ALERTS, ids=lambda alert: alert["alert"])
def test_alerts_only_use_metrics_the_exporter_exposes(alert: dict[str, object]) -> None:
    assert metric_names_in(str(alert["expr"])) <= exported_metric_names()


def test_amtool_checks_the_alertmanager_config() -> None:
    result = run(tool("amtool"), "check-config", "deploy/alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("labels", "receiver"), [
    (["alertname=GeminiBalanceDataStale", "severity=critical", "account=a"], "treasury-pager"),
    (["alertname=GeminiBalanceBelowMinimum", "severity=critical"], "treasury-pager"),
    (["alertname=GeminiBalanceRateLimited", "severity=warning", "key=k"], "treasury-chat"),
    (["alertname=GeminiBalancePendingWithdrawalStuck", "severity=warning"], "treasury-chat"),
    (["alertname=GeminiBalanceApprovedAddressPending", "severity=critical", "account=a",
      "network=bitcoin"], "treasury-pager"),
    (["alertname=SomethingElse", "severity=critical"], "default"),
])
def test_amtool_routes_each_alert_to_its_receiver(labels: list[str], receiver: str) -> None:
    result = run(tool("amtool"), "config", "routes", "test",
                 "--config.file=deploy/alertmanager.yml", f"--verify.receivers={receiver}",
                 *labels)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deploy_links_to_the_charts_single_copy() -> None:
    link = DEPLOY / "alerts.yml"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "helm/balance-exporter/files/alerts.yml").resolve()
    assert Path(DEPLOY / "grafana/dashboards/gemini-balances.json").resolve() == (
        ROOT / "helm/balance-exporter/files/dashboard.json").resolve()
