"""The Grafana dashboard and the Prometheus alert rules against the metrics the code defines:
PromQL checked and alerts unit-tested by promtool, labels checked against the collectors.
(That every name shows up in a live /metrics: test_live.py.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Final

import yaml
from prometheus_client.metrics import MetricWrapperBase

from ingester.errors import IngesterError
from ingester.metrics import Metrics
from tests.deploy.files import (
    ALERT_TESTS,
    ALERTS,
    DASHBOARD,
    METRIC_RE,
    alert_rules,
    dashboard_queries,
    iter_panels,
    load_json,
    promql_for_promtool,
    promtool,
)

# Labels every scraped series gets, and the histogram's own.
SCRAPE_LABELS: Final = {"job", "instance"}
SUFFIXES: Final = ("_total", "_created", "_bucket", "_count", "_sum")
REQUIRED_ALERTS: Final = {
    "IngesterNoWritableStorageElement": "ingester_storage_element_up",
    "IngesterCircuitBreakerOpen": "ingester_breaker_state",
    "IngesterCompensationBacklog": "ingester_compensation_backlog",
    "IngesterRegistryStale": "ingester_registry_age_seconds",
}
REQUIRED_ON_DASHBOARD: Final = {
    "ingester_uploads_total",  # uploads by outcome
    "ingester_upload_received_bytes_total",  # throughput
    "ingester_upload_duration_seconds_bucket",  # latency percentiles
    "ingester_uploads_in_flight",
    "ingester_breaker_state",
    "ingester_failovers_total",
    "ingester_compensations_total",
    "ingester_compensation_backlog",
    "ingester_registry_age_seconds",
}
# Server-side failures that are not load shedding or draining (those have their own panels).
NOT_FAILURES: Final = {"SERVICE_BUSY", "SHUTTING_DOWN"}
# Answers given before an upload reaches the pipeline, never its outcome
# (`ingester_uploads_total` counts what went through the pipeline): the tus store or an
# Idempotency-Key's store being away, a tus store still running, no token signing key yet.
TUS_ROUTE_ONLY: Final = {
    "TUS_STORE_UNAVAILABLE",
    "UPLOAD_COMPLETING",
    "IDEMPOTENCY_STORE_UNAVAILABLE",
    "AUTH_UNAVAILABLE",
}


def collectors() -> dict[str, tuple[str, ...]]:
    """Metric family name (no suffix) -> its label names, from the code's collectors."""
    found = {}
    for value in vars(Metrics()).values():
        if isinstance(value, MetricWrapperBase):
            found[value._name] = tuple(value._labelnames)
    return found


def family_of(sample_name: str) -> str:
    known = collectors()
    if sample_name in known:
        return sample_name
    for suffix in SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in known:
            return sample_name[: -len(suffix)]
    raise AssertionError(f"{sample_name}: no such metric in ingester/metrics.py")


def all_expressions() -> list[str]:
    return dashboard_queries() + [rule["expr"] for rule in alert_rules()]


def test_every_expression_uses_labels_its_metrics_have() -> None:
    known = collectors()
    for expr in all_expressions():
        metrics = set(METRIC_RE.findall(expr))
        assert metrics, f"no ingester metric in {expr!r}"
        labels_here = set(SCRAPE_LABELS)
        for name in metrics:
            family = family_of(name)
            labels_here |= set(known[family]) | ({"le"} if name.endswith("_bucket") else set())
        for name, matchers in re.findall(r"(ingester_[a-z0-9_]+)\s*\{([^}]*)\}", expr):
            allowed = SCRAPE_LABELS | set(known[family_of(name)])
            allowed |= {"le"} if name.endswith("_bucket") else set()
            for label in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                assert label in allowed, f"{name} has no label {label!r}: {expr}"
        for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            for label in filter(None, (part.strip() for part in clause.split(","))):
                assert label in labels_here, f"no metric here has label {label!r}: {expr}"


def test_counters_are_named_with_total_and_histograms_by_their_series() -> None:
    kinds = {
        value._name: value._type
        for value in vars(Metrics()).values()
        if isinstance(value, MetricWrapperBase)
    }
    for expr in all_expressions():
        for name in METRIC_RE.findall(expr):
            family = family_of(name)
            kind = kinds[family]
            if kind == "counter":
                assert name == f"{family}_total", f"{name}: a counter is queried as _total"
            elif kind == "histogram":
                assert name in {f"{family}_bucket", f"{family}_count", f"{family}_sum"}, name


def test_dashboard_covers_the_operations_view() -> None:
    dashboard = load_json(DASHBOARD)
    used = {name for expr in dashboard_queries() for name in METRIC_RE.findall(expr)}
    assert used >= REQUIRED_ON_DASHBOARD, sorted(REQUIRED_ON_DASHBOARD - used)
    assert dashboard["uid"] == "artstore-ingester"
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    panels = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    latency = [
        target["expr"]
        for panel in panels
        for target in panel.get("targets", [])
        if "ingester_upload_duration_seconds_bucket" in target["expr"]
    ]
    assert any("histogram_quantile(0.99" in expr for expr in latency)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # Every query follows the job / replica pickers.
            assert 'job=~"$job"' in target["expr"], target["expr"]
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses them, as recording rules with the Grafana variables filled in."""
    rules = []
    for index, expr in enumerate(dashboard_queries()):
        label_values = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr)
        query = label_values[1] if label_values else expr
        rules.append({"record": f"dashboard:query_{index}", "expr": promql_for_promtool(query)})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    for argv in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        result = subprocess.run(
            [promtool(), *argv],
            cwd=ALERTS.parent,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_required_alerts_exist_with_severity_and_text() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name, metric in REQUIRED_ALERTS.items():
        assert metric in rules[name]["expr"], name
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
    tested = {
        test["alertname"]
        for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for test in case["alert_rule_test"]
    }
    assert tested == set(rules), f"alerts without a unit test: {set(rules) - tested}"


def error_codes() -> dict[str, int]:
    """Every error code the ingester answers with, and its (highest) status."""
    import ingester.http.app  # noqa: F401  (every module, so every error class, is loaded)

    codes: dict[str, int] = {}
    pending: list[type[IngesterError]] = [IngesterError]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__module__.startswith("ingester.storage_element"):
            continue  # the reference Storage Element's own answers
        if cls.__module__.startswith("ingester.finalize"):
            continue  # finalization's: never an upload's outcome (ingester_finalizations_total)
        codes[cls.code] = max(codes.get(cls.code, 0), cls.status)
    return codes


def test_server_side_failure_regex_names_every_5xx_code() -> None:
    """The failure-ratio alert and the dashboard's stat list the 5xx codes: all of them."""
    server_side = {code for code, status in error_codes().items() if status >= 500}
    server_side -= NOT_FAILURES | TUS_ROUTE_ONLY
    expressions: list[Any] = [
        rule["expr"] for rule in alert_rules() if rule["alert"] == "IngesterUploadFailureRatioHigh"
    ]
    expressions += [expr for expr in dashboard_queries() if "STORAGE_ELEMENT_" in expr]
    assert len(expressions) == 2
    for expr in expressions:
        match = re.search(r'outcome=~"([^"]+)"', expr)
        assert match is not None
        pattern = re.compile(match[1])
        named = {code for code in error_codes() if pattern.fullmatch(code)} - TUS_ROUTE_ONLY
        assert named == server_side, (
            f"missing: {sorted(server_side - named)}, extra: {sorted(named - server_side)}"
        )
