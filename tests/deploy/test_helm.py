"""The Helm chart, checked with Helm's own Go SDK (helm-python-sdk), kubernetes-validate and
promtool."""

import json
import typing
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel

from balance_exporter.config import ExporterSettings, build_config
from balance_exporter.targets import plan
from tests.deploy.tools import CHART, run, tool

CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
KUBERNETES_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]


def values_of(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict)
    return values


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(CHART)
    chart.validate_schema(values)
    rendered = chart.render(values, name="treasury", namespace="monitoring", is_install=True)
    return [document for path, text in sorted(rendered.items()) if path.endswith(".yaml")
            for document in yaml.safe_load_all(text) if document]


def by_kind(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (manifest,) = [m for m in manifests if m["kind"] == kind]
    return manifest


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda path: path.stem)
def test_lint_is_clean_in_strict_mode(path: Path) -> None:
    report = helm_python.lint(CHART, values_of(path), strict=True)
    assert report["errors"] == []
    # Severity 1 is "info" (e.g. "icon is recommended"); warnings and errors fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("path", CI_VALUES, ids=lambda path: path.stem)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_manifests_pass_kubernetes_validate_strict(path: Path, version: str) -> None:
    manifests = render(values_of(path))
    core = [m for m in manifests if m["kind"] not in CRD_KINDS]
    assert {m["kind"] for m in core} >= {"Deployment", "Service", "ServiceAccount"}
    for manifest in core:
        kubernetes_validate.validate(manifest, version, strict=True)


def test_deployment_is_hardened_and_single() -> None:
    manifests = render(values_of(CHART / "ci/default-values.yaml"))
    deployment = by_kind(manifests, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    assert container["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
    assert container["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert by_kind(manifests, "ServiceAccount")["automountServiceAccountToken"] is False


def test_config_gets_secret_files_and_rolls_the_pod_when_it_changes() -> None:
    values = values_of(CHART / "ci/default-values.yaml")
    manifests = render(values)
    config = yaml.safe_load(by_kind(manifests, "ConfigMap")["data"]["config.yml"])
    assert config["keys"] == [{"name": "treasury", "api_key": "master-example",
                               "api_secret_file": "/etc/balance-exporter/secrets/treasury"}]
    secret = by_kind(manifests, "Secret")
    assert secret["data"] == {"treasury": "bm90LWEtcmVhbC1zZWNyZXQ="}
    checksum = by_kind(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"][
        "checksum/config"]
    values["config"]["accounts"][0]["interval_seconds"] = 60
    changed = by_kind(render(values), "Deployment")["spec"]["template"]["metadata"][
        "annotations"]["checksum/config"]
    assert changed != checksum


def test_existing_secret_is_mounted_and_no_secret_is_made() -> None:
    manifests = render(values_of(CHART / "ci/existing-secret-values.yaml"))
    assert "Secret" not in {m["kind"] for m in manifests}
    volumes = by_kind(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "secrets", "secret": {"secretName": "gemini-api-secrets",
                                          "defaultMode": 0o440}} in volumes


def test_everything_enabled_renders_monitor_rules_and_dashboard(tmp_path: Path) -> None:
    manifests = render(values_of(CHART / "ci/all-enabled-values.yaml"))
    monitor = by_kind(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    service = by_kind(manifests, "Service")
    assert service["metadata"]["labels"]["app.kubernetes.io/name"] == "balance-exporter"
    rule = by_kind(manifests, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load((CHART / "files/alerts.yml").read_text())
    rules_file = tmp_path / "rendered_rules.yml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    result = run(tool("promtool"), "check", "rules", str(rules_file))
    assert result.returncode == 0, result.stdout + result.stderr
    (dashboard,) = [m for m in manifests if m["kind"] == "ConfigMap"
                    and m["metadata"]["name"].endswith("-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["data"]["gemini-balances.json"] == (
        CHART / "files/dashboard.json").read_text().rstrip("\n")


def test_runbook_base_url_is_configurable() -> None:
    values = values_of(CHART / "ci/all-enabled-values.yaml")
    values["prometheusRule"]["runbookBaseUrl"] = "https://wiki.example.com/runbook"
    rule = by_kind(render(values), "PrometheusRule")
    urls = {r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert all(url.startswith("https://wiki.example.com/runbook#") for url in urls)


def test_demo_mode_needs_no_config_or_secret() -> None:
    manifests = render({"demo": True})
    assert {m["kind"] for m in manifests} == {"Deployment", "Service", "ServiceAccount"}
    (container,) = by_kind(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "demo"


@pytest.mark.parametrize(("values", "problem"), [
    ({"replicaCount": 2}, "replicaCount"),
    ({"replicaCount": "one"}, "replicaCount"),
    ({"unknownKey": True}, "unknownKey"),
    ({"serviceMonitor": {"enabled": "yes"}}, "enabled"),
    ({"config": {"keys": [{"name": "k", "requests_per_second": 20}]}}, "requests_per_second"),
    ({"config": {"accounts": [{"key": "k", "interval": 5}]}}, "interval"),
    ({"logLevel": "verbose"}, "logLevel"),
])
def test_schema_rejects_bad_values(values: dict[str, Any], problem: str) -> None:
    chart = helm_python.Chart.load(CHART)
    with pytest.raises(helm_python.HelmValuesError, match=problem):
        chart.validate_schema(values)


# What the chart's schema leaves out of the exporter's config on purpose: the chart passes
# secrets through a Kubernetes Secret, never inline.
NOT_IN_THE_CHART = {"config.keys.api_secret"}


def _model_of(annotation: object) -> type[BaseModel] | None:
    """The settings model a field holds (through Annotated, Optional and list), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        model = _model_of(argument)
        if model is not None:
            return model
    return None


def _fields_missing_from_schema(model: type[BaseModel], node: dict[str, Any],
                                path: str) -> set[str]:
    properties = node.get("items", node).get("properties", {})
    missing = {f"{path}.{name}" for name in model.model_fields if name not in properties}
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        if inner is not None and name in properties:
            missing |= _fields_missing_from_schema(inner, properties[name], f"{path}.{name}")
    return missing


def test_the_schema_takes_every_setting_of_the_exporters_config() -> None:
    # A field the config has and the schema (additionalProperties false) lacks is a setting a
    # chart user cannot make.
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = _fields_missing_from_schema(ExporterSettings, schema["properties"]["config"],
                                          "config")
    assert missing == NOT_IN_THE_CHART


@pytest.mark.parametrize(("values", "problem"), [
    ({}, "config.accounts neither unless a key has discover"),
    ({"config": {"keys": [{"name": "k", "api_key": "account-k"}], "accounts": [{"key": "k"}]}},
     "set secrets"),
])
def test_render_fails_without_the_required_values(values: dict[str, Any], problem: str) -> None:
    chart = helm_python.Chart.load(CHART)
    with pytest.raises(helm_python.HelmRenderError, match=problem):
        chart.render(values, name="treasury", namespace="monitoring")


def test_a_discovering_key_needs_no_accounts_and_renders_a_config_the_exporter_takes(
    tmp_path: Path,
) -> None:
    manifests = render(values_of(CHART / "ci/treasury-values.yaml"))
    config = yaml.safe_load(by_kind(manifests, "ConfigMap")["data"]["config.yml"])
    assert "accounts" not in config or not config["accounts"]
    secret = tmp_path / "treasury"
    secret.write_text("not-a-real-secret")
    config["keys"][0]["api_secret_file"] = str(secret)
    loaded = build_config(config, {})
    assert loaded.settings.notional is not None
    assert loaded.settings.keys[0].discover is not None
    assert plan(loaded).keys["treasury"].listing_interval_seconds == 900
