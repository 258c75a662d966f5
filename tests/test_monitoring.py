"""The monitoring kit: deploy/prometheus/rules.yaml (alerts), deploy/grafana/model-gateway.json
(the dashboard), and the Helm chart's copies of both.

promtool (scripts/install puts it in .venv/bin) checks the rules and runs their unit tests
(rules.test.yaml); without it those two tests skip and the schema tests still run. Every
series, label and fixed label value the rules' and the dashboard's PromQL name is one the
gateway exports: checked against in-process metrics that watch a pool and have seen one
event of each kind, and against a real gateway's /metrics after one prediction (slow).
The chart renders the PrometheusRule and the dashboard's ConfigMap only when asked.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from runners import EndpointSpec, PoolSpec, RunnerPool, State
from tests.test_follow import X
from tests.test_helm import (
    BIN,
    CHART,
    FULL,
    FULLNAME,
    K8S_VERSION,
    NAMESPACE,
    RELEASE,
    SERVICE_MONITOR,
    Docs,
    render,
    run_helm,
    sets,
)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "rules.test.yaml"
RUNBOOK = ROOT / "deploy" / "prometheus" / "README.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "model-gateway.json"
PROMETHEUS_RULE = "monitoring.coreos.com/v1/PrometheusRule"

# Series the rules read that are not the gateway's: Prometheus' own `up`, the kubelet's
# cAdvisor and kube-state-metrics, as kube-prometheus-stack scrapes them.
EXTERNAL = {"up", "container_memory_working_set_bytes", "kube_pod_container_resource_limits"}
# Labels Prometheus (prometheus-operator) gives every series it scrapes from a pod.
TARGET_LABELS = {"namespace", "pod", "job", "instance", "container", "service", "endpoint"}
# Labels whose values gateway/metrics.py itself derives: a value the PromQL matches must be
# one it produces (reasons and results are the callers' words, and are not checked).
FIXED_VALUES = ("state", "status_class", "outcome")
SEVERITIES = {"critical", "warning", "info"}


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text(encoding="utf-8"))


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def alerts() -> list[dict[str, Any]]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"]]


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """The PromQL of every panel target, annotation and query variable (its metric part)."""
    exprs = [t["expr"] for p in all_panels(dashboard["panels"]) for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert found, f"variable {var['name']}: {query}"
            exprs.append(f"group by ({found[2]}) ({found[1]})")
    return exprs


# -- a small reading of PromQL: which series, labels and values an expression names --------
Uses = dict[str, dict[str, set[str]]]  # metric -> label -> values matched (regexes split on |)

SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
BARE = re.compile(r"(?<![\w$.:])([A-Za-z_:][\w:]*)\b(?!\s*\()")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "offset", "bool", "inf", "nan"}


def promql_uses(expr: str) -> tuple[Uses, set[str]]:
    """The series an expression reads with the labels (and values) it matches on them, and
    the labels it groups or joins by."""
    uses: Uses = {}
    for name, matchers in SELECTOR.findall(expr):
        assert name, f"a selector without a metric name: {{{matchers}}} in {expr}"
        labels = uses.setdefault(name, {})
        for label, op, value in MATCHER.findall(matchers):
            labels.setdefault(label, set()).update(value.split("|") if "~" in op else [value])
    grouping = {label.strip() for found in GROUPING.findall(expr)
                for label in found.split(",") if label.strip()}
    rest = SELECTOR.sub(lambda m: m[1] or "", expr)
    rest = GROUPING.sub("", re.sub(r"\[[^\]]*\]", "", rest))
    rest = re.sub(r"\boffset\s+\$?\w+", "", re.sub(r'"[^"]*"', "", rest))
    for name in BARE.findall(rest):
        if name not in KEYWORDS:
            uses.setdefault(name, {})
    return uses, grouping


Samples = dict[str, dict[str, set[str]]]  # series with samples -> label -> values seen


def exported(text: str) -> tuple[set[str], Samples]:
    """Every series name an exposition defines (families without samples too, by their
    type's suffixes), and the labels and values of the series that have samples."""
    names: set[str] = set()
    samples: Samples = {}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        for sample in family.samples:
            names.add(sample.name)
            labels = samples.setdefault(sample.name, {})
            for label, value in sample.labels.items():
                labels.setdefault(label, set()).add(value)
    return names, samples


def driven_metrics() -> tuple[set[str], Samples]:
    """In-process GatewayMetrics that watch a pool (not started: no runner, so no runner
    memory) and have seen one event of each kind, with every outcome."""
    metrics = GatewayMetrics()
    pool = RunnerPool(PoolSpec(), [EndpointSpec("const", "a", "models:/const/1")], "test")
    metrics.watch(pool)
    (ep,) = pool.endpoints.values()
    for status in (200, 404, 503):
        metrics.observe_request("const", "a", status, 0.01)
    for ok in (True, False):
        metrics.cold_start(ep, 1.0, ok)
        metrics.cutover(ep, ok)
    metrics.rolled_back(ep)
    for reason in ("capacity", "memory", "idle"):
        metrics.eviction(ep, reason)
    metrics.restart(ep)
    metrics.poll_failure(ep)
    metrics.client_error("connection_limit")
    metrics.webhooks.labels("rejected").inc()
    return exported(metrics.render().decode())


def promql_sources() -> dict[str, str]:
    """Every PromQL expression of the rules and the dashboard, by where it is."""
    sources = {f"alert {rule['alert']}": rule["expr"] for rule in alerts()}
    for i, expr in enumerate(dashboard_exprs(load_dashboard())):
        sources[f"dashboard query {i}: {expr[:60]}"] = expr
    return sources


def unknown_names(known: set[str]) -> list[str]:
    problems = []
    for where, expr in promql_sources().items():
        uses, _ = promql_uses(expr)
        problems += [f"{where}: {name}" for name in uses
                     if name not in known and name not in EXTERNAL]
    return problems


def unknown_labels(known: Samples) -> list[str]:
    """Labels (and fixed values) the PromQL matches or groups by that the series it reads
    do not have. Expressions that read a series without samples in ``known`` are not
    checked, nor those that read other exporters' series (EXTERNAL)."""
    problems = []
    for where, expr in promql_sources().items():
        uses, grouping = promql_uses(expr)
        if any(name not in known for name in uses):
            continue
        available = set(TARGET_LABELS)
        for name, matched in uses.items():
            labels = known[name]
            available |= set(labels)
            for label, values in matched.items():
                if label not in labels and label not in TARGET_LABELS:
                    problems.append(f"{where}: {name} has no label {label}")
                elif label in FIXED_VALUES and not values <= labels[label]:
                    problems.append(f"{where}: {name}{{{label}}} is never "
                                    f"{sorted(values - labels[label])}")
        problems += [f"{where}: grouped by {label}, which none of {sorted(uses)} has"
                     for label in grouping - available]
    return problems


def test_the_promql_reader() -> None:
    uses, grouping = promql_uses(
        'sum by (name, alias) (rate(a_total{namespace=~"$namespace", outcome=~"x|y"}'
        '[$__rate_interval])) / on (pod) b offset 5m and c{state="ready"} unless d offset $__range')
    assert uses == {"a_total": {"namespace": {"$namespace"}, "outcome": {"x", "y"}}, "b": {},
                    "c": {"state": {"ready"}}, "d": {}}
    assert grouping == {"name", "alias", "pod"}


def test_promql_names_only_series_labels_and_values_the_gateway_exports() -> None:
    names, samples = driven_metrics()
    assert unknown_names(names) == []
    assert unknown_labels(samples) == []  # all but the runner memory's: the slow test's
    assert samples["model_gateway_runner_state"]["state"] == {s.value for s in State}


@pytest.mark.slow
def test_every_series_the_promql_reads_is_on_a_real_gateways_metrics(
        start_gateway: Any) -> None:
    gw = start_gateway([{"name": "const", "alias": "a", "model_uri": "models:/const/1"}])
    assert gw.predict("const", "a", X).status_code == 200
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP\r\n\r\n")  # a client error: its counter gets a series
        sock.recv(4096)
    names, real = exported(gw.client.get("/metrics").text)
    assert names >= driven_metrics()[0]
    assert unknown_names(names) == []
    # Labels the real series carry, with those of the series that have no samples here
    # (no cutover, eviction, restart, webhook) and the values no event here produced (5xx,
    # a failed cold start) from the in-process metrics: every expression is checked.
    both = driven_metrics()[1]
    for name, labels in real.items():
        for label, values in labels.items():
            both.setdefault(name, {}).setdefault(label, set()).update(values)
    used = {name for expr in promql_sources().values() for name in promql_uses(expr)[0]}
    assert used - EXTERNAL <= set(both)
    assert unknown_labels(both) == []
    assert real["model_gateway_runner_memory_bytes"]["version"] == {"1"}


# -- the rules ------------------------------------------------------------------------------
@cache
def promtool() -> str | None:
    local = BIN / "promtool"
    return str(local) if local.exists() else shutil.which("promtool")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = promtool()
    if tool is None:
        pytest.skip("promtool is not installed (scripts/install puts it in .venv/bin)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120,
                          cwd=RULES.parent)


def test_promtool_check_rules() -> None:
    proc = run_promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in proc.stdout


def test_promtool_rule_unit_tests() -> None:
    proc = run_promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rules_schema() -> None:
    """What promtool checks, and what it does not: a severity, a summary, a description
    and a runbook section for every alert."""
    rules = load_rules()
    assert set(rules) == {"groups"}
    names = []
    for group in rules["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"ModelGateway[A-Z]\w+", rule["alert"]), rule["alert"]
            names.append(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
            assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
            assert set(rule["annotations"]) == {"summary", "description", "runbook"}
            assert rule["annotations"]["runbook"] == \
                f"deploy/prometheus/README.md#{rule['alert'].lower()}"
    assert len(names) == len(set(names)), "alert names repeat"


def test_every_alert_has_a_runbook_section() -> None:
    sections = re.findall(r"^## (\S+)$", RUNBOOK.read_text(encoding="utf-8"), re.MULTILINE)
    assert sections == [rule["alert"] for rule in alerts()]


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
             for case in test.get("alert_rule_test", [])]
    for rule in alerts():
        mine = [case for case in cases if case["alertname"] == rule["alert"]]
        assert any(case["exp_alerts"] for case in mine), f"{rule['alert']} never fires"
        assert any(not case["exp_alerts"] for case in mine), f"{rule['alert']} never quiet"


def test_rules_that_join_on_live_runners_are_fed_it_in_their_tests() -> None:
    """A counter's first event makes a series; the rules count it only on a pod that was
    scraped before (model_gateway_live_runners offset W), so their tests must feed it."""
    tests = yaml.safe_load(RULE_TESTS.read_text(encoding="utf-8"))["tests"]
    for rule in alerts():
        if "model_gateway_live_runners offset" not in rule["expr"]:
            continue
        fed = [test for test in tests
               if any(case["alertname"] == rule["alert"] for case in test["alert_rule_test"])
               and any(s["series"].startswith("model_gateway_live_runners{")
                       for s in test["input_series"])]
        assert len(fed) >= 2, f"{rule['alert']}: a firing test and the gap test"


# -- the dashboard --------------------------------------------------------------------------
def test_dashboard_is_grafana_dashboard_json() -> None:
    dashboard = load_dashboard()
    for key in ["uid", "title", "panels", "templating", "schemaVersion", "time", "refresh"]:
        assert key in dashboard, key
    assert re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert dashboard.get("id") is None  # Grafana assigns it; a fixed one clashes on import
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert panel["type"] in {"row", "stat", "timeseries", "heatmap", "table",
                                 "state-timeline", "text", "bargauge", "gauge"}, where
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert target["refId"] and target["expr"].strip(), where


def test_dashboard_variables() -> None:
    """namespace, pod and endpoint (the model name), each narrowing the next; every query
    of the gateway's series filters by them."""
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ["namespace", "pod", "endpoint"]:
        var = variables[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"], name
        assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
    assert '$namespace' in variables["pod"]["query"]
    assert '$pod' in variables["endpoint"]["query"]
    for panel in all_panels(load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            where = f"{panel['title']}: {target['expr']}"
            for labels in promql_uses(target["expr"])[0].values():
                assert labels.get("namespace") == {"$namespace"}, where
                assert labels.get("pod") == {"$pod"}, where
                if "name" in labels:
                    assert labels["name"] == {"$endpoint"}, where


def panels_reading(pattern: str) -> list[str]:
    """Titles of the panels with a query that matches ``pattern``."""
    return [p["title"] for p in all_panels(load_dashboard()["panels"])
            if any(re.search(pattern, t["expr"]) for t in p.get("targets", []))]


@pytest.mark.parametrize(("what", "pattern"), [
    ("request rate per endpoint", r"sum by \(name, alias\) \(rate\(model_gateway_requests_total"),
    ("latency p50", r"histogram_quantile\(0\.5, sum by \(name, alias, le\).*"
                    r"model_gateway_request_duration_seconds_bucket"),
    ("latency p95", r"histogram_quantile\(0\.95, .*model_gateway_request_duration_seconds_bucket"),
    ("latency p99", r"histogram_quantile\(0\.99, .*model_gateway_request_duration_seconds_bucket"),
    ("5xx ratio per endpoint", r'(?s)by \(name, alias\).*status_class="5xx".*/'),
    ("cold starts", r"model_gateway_cold_starts_total"),
    ("cold start duration", r"model_gateway_cold_start_duration_seconds_bucket"),
    ("cutovers by outcome", r"sum by \(name, alias, outcome\) \(\s*\(\s*\(model_gateway_cutovers"),
    ("failed cutovers", r'model_gateway_cutovers_total\{[^}]*outcome="failed"'),
    ("pool memory", r"model_gateway_pool_memory_bytes"),
    ("runner memory", r"model_gateway_runner_memory_bytes"),
    ("live runners", r"model_gateway_live_runners\{[^}]*\}\)"),
    ("endpoint states", r"model_gateway_runner_state"),
    ("evictions", r"model_gateway_evictions_total"),
    ("runner restarts", r"model_gateway_runner_restarts_total"),
    ("registry poll failures", r"model_gateway_registry_poll_failures_total"),
])
def test_dashboard_has_a_panel_for(what: str, pattern: str) -> None:
    assert panels_reading(pattern), f"no panel shows {what}"


# -- the Helm chart -------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "copy"), [
    (DASHBOARD, CHART / "files" / "model-gateway.json"),
    (RULES, CHART / "files" / "rules.yaml"),
])
def test_the_chart_ships_the_files_unchanged(source: Path, copy: Path) -> None:
    assert copy.read_bytes() == source.read_bytes(), \
        f"{copy.relative_to(ROOT)} differs from {source.relative_to(ROOT)}, its source: " \
        f"cp {source.relative_to(ROOT)} {copy.relative_to(ROOT)}"


def monitoring(docs: Docs) -> list[tuple[str, str]]:
    return [(d["kind"], d["metadata"]["name"]) for d in docs
            if d["kind"] == "PrometheusRule" or d["metadata"]["name"].endswith("-dashboard")]


@pytest.mark.parametrize("args", [
    (),
    ("--api-versions", PROMETHEUS_RULE),  # the CRD, but not enabled
    sets(**{"metrics.prometheusRule.enabled": True}),  # enabled, but no CRD
], ids=["default", "crd-only", "enabled-without-crd"])
def test_nothing_rendered_unless_enabled(args: tuple[str, ...]) -> None:
    assert monitoring(render(*args)) == []


def test_notes_warn_of_a_rule_without_its_crd() -> None:
    proc = run_helm("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                    *sets(**{"metrics.prometheusRule.enabled": True}))
    assert proc.returncode == 0, proc.stderr
    assert "no PrometheusRule CRD" in proc.stdout.partition("\nNOTES:\n")[2]


def test_prometheus_rule_carries_rules_yaml() -> None:
    docs = render(*sets(**{"metrics.prometheusRule.enabled": True,
                           "metrics.prometheusRule.labels": {"release": "kps"}}),
                  "--api-versions", PROMETHEUS_RULE)
    assert monitoring(docs) == [("PrometheusRule", FULLNAME)]
    (rule,) = (d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"]["groups"] == load_rules()["groups"]


def test_prometheus_rule_adds_alert_labels_and_runbook_urls() -> None:
    base = "https://git.example.com/ml/mlflow-model-gateway/blob/main/deploy/prometheus/README.md"
    docs = render(*sets(**{"metrics.prometheusRule.enabled": True,
                           "metrics.prometheusRule.namespace": "monitoring",
                           "metrics.prometheusRule.alertLabels": {"team": "ml",
                                                                  "severity": "page"},
                           "metrics.prometheusRule.runbookBaseUrl": base}),
                  "--api-versions", PROMETHEUS_RULE)
    (rule,) = (d for d in docs if d["kind"] == "PrometheusRule")
    assert rule["metadata"]["namespace"] == "monitoring"
    expected = load_rules()["groups"]
    for group in expected:
        for alert in group["rules"]:
            alert["labels"] = {"team": "ml", **alert["labels"]}  # the alert's severity wins
            alert["annotations"]["runbook_url"] = f"{base}#{alert['alert'].lower()}"
    assert rule["spec"]["groups"] == expected


def test_dashboard_config_map_for_grafanas_sidecar() -> None:
    docs = render(*sets(**{"grafana.dashboard.enabled": True,
                           "grafana.dashboard.annotations": {"grafana_folder": "Models"}}))
    assert monitoring(docs) == [("ConfigMap", f"{FULLNAME}-dashboard")]
    (config_map,) = (d for d in docs if d["metadata"]["name"] == f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"]["grafana_folder"] == "Models"
    assert json.loads(config_map["data"]["model-gateway.json"]) == load_dashboard()
    kubernetes_validate.validate(config_map, K8S_VERSION, strict=True)
    # Under kubectl apply's last-applied annotation limit, should anyone apply it so.
    assert len(json.dumps(config_map)) < 256 * 1024


def test_full_values_with_both_crds_render_both() -> None:
    docs = render("--values", str(FULL), "--api-versions", SERVICE_MONITOR,
                  "--api-versions", PROMETHEUS_RULE,
                  *sets(**{"grafana.dashboard.enabled": True}))
    assert sorted(monitoring(docs)) == [("ConfigMap", "model-gateway-dashboard"),
                                        ("PrometheusRule", "model-gateway")]
    (rule,) = (d for d in docs if d["kind"] == "PrometheusRule")
    assert all(alert["labels"]["team"] == "team-registry"
               for group in rule["spec"]["groups"] for alert in group["rules"])


@pytest.mark.parametrize(("values", "path"), [
    ({"metrics.prometheusRule.runbookBaseUrl": "not a url"}, "runbookBaseUrl"),
    ({"metrics.prometheusRule.alertLabels": {"team": 1}}, "alertLabels"),
    ({"metrics.prometheusRule.enable": True}, "enable"),
    ({"grafana.dashboard.labels": ["grafana_dashboard"]}, "labels"),
    ({"grafana.dashboards": {}}, "dashboards"),
])
def test_schema_refuses_wrong_monitoring_values(values: dict[str, Any], path: str) -> None:
    proc = run_helm("template", RELEASE, str(CHART), *sets(**values))
    assert proc.returncode != 0, proc.stdout
    assert path in proc.stderr
