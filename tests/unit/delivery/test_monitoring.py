"""Alert rules (promtool check/test) and the Grafana dashboard."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_operator.api import parse_spec
from moe_operator.children import Owner, desired_prometheus_rule
from tests.unit.delivery.support import ROOT

RULES = ROOT / "monitoring" / "rules" / "moe-router.rules.yaml"
RULE_TESTS = sorted((ROOT / "monitoring" / "rules" / "tests").glob("*.yaml"))
DASHBOARD = ROOT / "monitoring" / "dashboards" / "moe-router.json"

#: The metric names the runtime and the operator export (issue 5), plus Prometheus' own `up`.
RUNTIME_METRICS = {
    "moe_router_requests_total",
    "moe_router_request_duration_seconds",
    "moe_router_errors_total",
    "moe_router_tokens_total",
    "moe_router_experts_per_token",
    "moe_router_expert_utilization",
    "moe_router_load_cv",
    "moe_router_batch_tokens",
}
OPERATOR_METRICS = {
    "moe_operator_predicted_load",
    "moe_operator_recommended_replicas",
    "moe_operator_backtest_error",
    "moe_operator_prometheus_query_duration_seconds",
    "moe_operator_prometheus_query_failures_total",
    "moe_operator_router_condition",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
METRIC_NAME = re.compile(r"\b((?:moe_router|moe_operator)_[a-z_]+)")
#: Grafana's template variables, replaced so the panel queries can be checked as plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$namespace": ".*", "$moerouter": ".*"}

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (make system-deps)")


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert promtool is not None
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def base_metric(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and name.removesuffix(suffix) in RUNTIME_METRICS | OPERATOR_METRICS:
            return name.removesuffix(suffix)
    return name


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panel_queries(board: dict[str, Any]) -> dict[str, list[str]]:
    return {
        panel["title"]: [target["expr"] for target in panel.get("targets", [])]
        for panel in board["panels"]
        if panel["type"] != "row"
    }


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


@needs_promtool
def test_alert_rules_pass_promtool_check_rules() -> None:
    result = run_promtool("check", "rules", str(RULES), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("test_file", RULE_TESTS, ids=lambda path: path.name)
def test_alert_rules_pass_their_promtool_unit_tests(test_file: Path) -> None:
    result = run_promtool("test", "rules", test_file.name, cwd=test_file.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_cover_the_alerts_users_expect() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"]: rule for group in groups for rule in group["rules"]}
    assert {
        "MoERouterHighErrorRate",
        "MoERouterHighLatencyP95",
        "MoERouterExpertLoadImbalance",
        "MoERouterPodDown",
        "MoERouterAllPodsDown",
        "MoEOperatorDown",
        "MoEOperatorPredictionsFailing",
        "MoERouterDegraded",
    } <= set(alerts)
    assert "moe_router_load_cv" in alerts["MoERouterExpertLoadImbalance"]["expr"]
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name


def test_every_alert_is_exercised_by_a_promtool_unit_test() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    tested = {
        case["alertname"]
        for test_file in RULE_TESTS
        for test in yaml.safe_load(test_file.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == tested


def test_rules_and_dashboard_use_only_exported_metric_names() -> None:
    expressions = rule_expressions() + [expr for exprs in panel_queries(dashboard()).values() for expr in exprs]
    used = {base_metric(name) for expr in expressions for name in METRIC_NAME.findall(expr)}
    assert used - (RUNTIME_METRICS | OPERATOR_METRICS) == set()
    assert used >= {"moe_router_load_cv", "moe_operator_prometheus_query_failures_total"}


def test_dashboard_has_the_panels_operators_need() -> None:
    queries = panel_queries(dashboard())
    expected = {
        "Request rate": "moe_router_requests_total",
        "Latency percentiles": "moe_router_request_duration_seconds_bucket",
        "Error rate": 'code=~"5.."',
        "Experts per token": "moe_router_experts_per_token",
        "Expert utilisation": "moe_router_expert_utilization",
        "Replicas vs recommended vs predicted load": "moe_operator_predicted_load",
    }
    for title, needle in expected.items():
        assert any(needle in expr for expr in queries[title]), title
    scaling = " ".join(queries["Replicas vs recommended vs predicted load"])
    assert "moe_operator_recommended_replicas" in scaling and "up{" in scaling
    latency = " ".join(queries["Latency percentiles"])
    assert all(f"histogram_quantile({q}" in latency for q in ("0.5", "0.95", "0.99"))


def test_expert_utilisation_is_a_heatmap_with_one_row_per_expert() -> None:
    panel = next(panel for panel in dashboard()["panels"] if panel["title"] == "Expert utilisation")
    assert panel["type"] == "heatmap"
    assert panel["targets"][0]["legendFormat"] == "{{expert}}"
    assert "by (expert)" in panel["targets"][0]["expr"]


def test_dashboard_is_importable_with_a_data_source_variable_and_unique_ids() -> None:
    board = dashboard()
    assert board["uid"] == "moe-router"
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"namespace", "moerouter"} <= set(variables)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules: list[dict[str, str]] = []
    for title, expressions in panel_queries(dashboard()).items():
        for index, expr in enumerate(expressions):
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{title}: unknown Grafana variable in {expr}"
            rules.append({"record": f"dashboard:panel_{len(rules)}:{index}", "expr": expr})
    rule_file = tmp_path / "dashboard-queries.yaml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(rule_file), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


#: A grouping clause of a PromQL aggregation: ``by (a, b)``.
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")


def test_dashboard_never_merges_same_named_routers_of_two_namespaces() -> None:
    for title, targets in ((panel["title"], panel.get("targets", [])) for panel in dashboard()["panels"]):
        for target in targets:
            for clause in GROUPING.findall(target["expr"]):
                labels = {label.strip() for label in clause.split(",")}
                assert "moerouter" not in labels or "namespace" in labels, f"{title}: by ({clause})"
            legend = target.get("legendFormat", "")
            assert "{{moerouter}}" not in legend or "{{namespace}}/{{moerouter}}" in legend, f"{title}: {legend}"


def per_router_rule_groups(*namespaces: str, name: str = "llm-router") -> list[dict[str, Any]]:
    """The groups of the PrometheusRule the operator renders for a router ``name`` in each namespace."""
    spec = parse_spec({"monitoring": {"prometheusRule": True}})
    return [
        group
        for namespace in namespaces
        for group in desired_prometheus_rule(Owner(name, namespace, f"uid-{namespace}"), spec)["spec"]["groups"]
    ]


def test_per_router_alerts_have_the_fleet_rules_severity_and_for() -> None:
    fleet = {
        rule["alert"]: rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    }
    for rule in (rule for group in per_router_rule_groups("ml") for rule in group["rules"]):
        assert rule["labels"]["severity"] == fleet[rule["alert"]]["labels"]["severity"], rule["alert"]
        assert rule["for"] == fleet[rule["alert"]]["for"], rule["alert"]


@needs_promtool
def test_per_router_alerts_of_same_named_routers_in_two_namespaces_stay_apart(tmp_path: Path) -> None:
    groups = per_router_rule_groups("team-a", "team-b")
    (tmp_path / "per-router.rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    series = [
        {
            "series": f'{metric}{{namespace="{namespace}",moerouter="llm-router",pod="{namespace}-1"{extra}}}',
            "values": values,
        }
        for namespace in ("team-a", "team-b")
        for metric, extra, values in (
            ("moe_router_requests_total", ',code="500"', "0+60x30"),
            ("moe_router_requests_total", ',code="200"', "0+60x30"),
            ("moe_router_request_duration_seconds_bucket", ',le="0.1"', "0x30"),
            ("moe_router_request_duration_seconds_bucket", ',le="1"', "0+60x30"),
            ("moe_router_request_duration_seconds_bucket", ',le="+Inf"', "0+60x30"),
            ("moe_router_load_cv", "", "0.9x30"),
        )
    ]
    severities = {
        "MoERouterHighErrorRate": "critical",
        "MoERouterHighLatencyP95": "warning",
        "MoERouterExpertLoadImbalance": "warning",
    }
    fired: dict[str, list[dict[str, Any]]] = {alert: [] for alert in severities}
    for namespace, group in zip(("team-a", "team-b"), groups, strict=True):
        for rule in group["rules"]:
            labels = {"severity": severities[rule["alert"]], "namespace": namespace, "moerouter": "llm-router"}
            fired[rule["alert"]].append({"exp_labels": labels, "exp_annotations": rule["annotations"]})
    cases = [{"eval_time": "25m", "alertname": alert, "exp_alerts": alerts} for alert, alerts in fired.items()]
    test_file = tmp_path / "per-router.test.yaml"
    test_file.write_text(
        yaml.safe_dump(
            {
                "rule_files": ["per-router.rules.yaml"],
                "evaluation_interval": "1m",
                "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": cases}],
            },
            sort_keys=False,
        )
    )
    result = run_promtool("test", "rules", test_file.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
