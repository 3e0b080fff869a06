"""The Grafana dashboard and the PrometheusRule query only what K2 really exports.

Every PromQL expression (dashboard panels and variables, alert rules) is parsed; each metric it
selects must be a sample name of `k2.observability.REGISTRY` (`exported_metric_names()`), each
label it matches or aggregates by must be a label of those metrics (or one Prometheus adds to
every target), and the label values the rules depend on must be values the code emits. The other
way round, every metric family K2 declares has a panel. The process, platform and GC collectors'
series (`process_*`, `python_*`) count as K2's: every K2 process serves them.

promtool (built from the Prometheus release the kind add-ons run) checks that the rendered rules
load, and its rule unit tests feed series to the newer alerts and require each to stay quiet, then
fire with exactly the expected labels and summary.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from k2 import observability
from k2.quality import Severity
from k2.stack import helm

pytestmark = [pytest.mark.unit, pytest.mark.helm]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "k2"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
# Labels Prometheus attaches to every scraped series (kube-prometheus target relabelling).
TARGET_LABELS = {"namespace", "pod", "container", "service", "endpoint", "job", "instance"}
# Not exported by K2 but by Prometheus itself for every target: allowed, and only this.
PROMETHEUS_SERIES = {"up": set()}
# Grafana's variables, replaced by something PromQL parses to the same shape.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                     "${namespace}": ".*", "$namespace": ".*", "${table}": ".*", "$table": ".*"}


# --- what K2 exports ----------------------------------------------------------------------------
def declared_metrics() -> dict[str, MetricWrapperBase]:
    return {m._name: m for m in vars(observability).values() if isinstance(m, MetricWrapperBase)}


def collected_labels() -> dict[str, set[str]]:
    """Sample name → label names of the process, platform and GC collectors' series (they
    have samples from the start, unlike a labelled `k2_*` family nobody has used yet)."""
    out: dict[str, set[str]] = {}
    for family in observability.REGISTRY.collect():
        if not family.name.startswith("k2_"):
            for sample in family.samples:
                out.setdefault(sample.name, set()).update(sample.labels)
    return out


def sample_labels() -> dict[str, set[str]]:
    """Sample name → its label names, for every sample a scrape of K2 can show."""
    out: dict[str, set[str]] = collected_labels()
    for name, metric in declared_metrics().items():
        labels = set(metric._labelnames)
        if metric._type == "counter":
            out.update({f"{name}_total": labels, f"{name}_created": labels})
        elif metric._type == "histogram":
            out.update({f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels, f"{name}_count": labels,
                        f"{name}_created": labels})
        else:
            out[name] = labels
    return out


def emitted_literal_values() -> dict[tuple[str, int], set[str]]:
    """(metric constant, label position) → string literals passed to `.labels()` in K2's source."""
    constants = {const for const, m in vars(observability).items() if isinstance(m, MetricWrapperBase)}
    found: dict[tuple[str, int], set[str]] = {}
    for source in [*(REPO / "workloads").rglob("*.py"), *(REPO / "operator").rglob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "labels"):
                continue
            owner = node.func.value  # COMMITS.labels(…) or observability.COMMITS.labels(…)
            const = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
            if const in constants:
                for position, arg in enumerate(node.args):
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        found.setdefault((const, position), set()).add(arg.value)
    return found


# --- what the chart queries ---------------------------------------------------------------------
def dashboard_queries(path: Path) -> Iterator[tuple[str, str]]:
    dashboard = json.loads(path.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"{path.name} panel {panel['title']!r}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: unexpected query {query}"
            yield f"{path.name} variable {variable['name']}", match.group(1)


@pytest.fixture(scope="module")
def alert_rules() -> list[dict[str, Any]]:
    objects = helm.template(CHART, set_values={"monitoring.prometheusRule.enabled": "true",
                                               "monitoring.serviceMonitor.enabled": "true"})
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


@pytest.fixture(scope="module")
def queries(alert_rules: list[dict[str, Any]]) -> list[tuple[str, str]]:
    found = [q for path in DASHBOARDS for q in dashboard_queries(path)]
    found += [(f"alert {r['alert']}", r["expr"]) for r in alert_rules]
    return found


def promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


# --- PromQL walking (promql-parser, the Rust parser Prometheus-compatible tools use) ------------
def parse(expr: str) -> Any:
    parser = pytest.importorskip("promql_parser", reason="PromQL checks need the promql-parser package "
                                                         "(pip install promql-parser)")
    try:
        return parser.parse(promql(expr))
    except ValueError as exc:
        pytest.fail(f"invalid PromQL ({exc}): {expr}")


def walk(node: Any) -> Iterator[Any]:
    yield node
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (str, int, float)):
            yield from walk(child)
    for arg in getattr(node, "args", None) or []:
        yield from walk(arg)


def selectors(node: Any) -> list[Any]:
    return [n for n in walk(node) if type(n).__name__ == "VectorSelector"]


def matchers(selector: Any) -> list[Any]:
    return [m for m in selector.matchers.matchers if m.name != "__name__"]


def grouping_labels(node: Any) -> Iterator[tuple[list[str], Any]]:
    """(labels, the sub-expression they group) for `by (…)`/`on (…)`/`ignoring (…)` clauses."""
    for n in walk(node):
        modifier = getattr(n, "modifier", None)
        if modifier is None:
            continue
        labels = getattr(modifier, "labels", None)
        if labels is None:
            matching = getattr(modifier, "matching", None)
            labels = getattr(matching, "labels", None) if matching is not None else None
        if labels:
            yield list(labels), n


# --- tests ------------------------------------------------------------------------------------------
def test_dashboard_has_at_least_15_panels_and_is_valid_grafana_json() -> None:
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert len(panels) >= 15, f"{path.name}: {len(panels)} panels"
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"]), "panel ids must be unique"
        assert dashboard["uid"] and dashboard["title"]
        for panel in panels:
            assert panel["targets"], f"panel {panel['title']!r} queries nothing"
            assert panel["datasource"]["uid"] == "${datasource}", "panels must follow the datasource variable"
            assert panel.get("description"), f"panel {panel['title']!r} has no description"


def test_every_metric_name_in_panels_and_alerts_is_exported(queries: list[tuple[str, str]]) -> None:
    """Plain-text check (no parser needed): any k2_*, process_* or python_* token must be a sample
    K2 exports."""
    exported = observability.exported_metric_names()
    for where, expr in queries:
        for name in re.findall(r"\b(?:k2|process|python)_[a-z0-9_]+\b", expr):
            assert name in exported, f"{where}: {name} is not exported by k2.observability"


def test_every_selector_and_label_is_one_k2_exports(queries: list[tuple[str, str]]) -> None:
    labels_of = {**sample_labels(), **PROMETHEUS_SERIES}
    assert set(sample_labels()) <= observability.exported_metric_names()
    for where, expr in queries:
        tree = parse(expr)
        used = selectors(tree)
        assert used, f"{where}: selects no series"
        for selector in used:
            name = selector.name or next((m.value for m in selector.matchers.matchers if m.name == "__name__"), None)
            if name is None or not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", name):
                assert name and name.startswith("k2_"), f"{where}: selector without a K2 metric"
                continue  # a regex over K2's names (the namespace variable)
            assert name in labels_of, f"{where}: {name} is not exported by k2.observability"
            for matcher in matchers(selector):
                assert matcher.name in labels_of[name] | TARGET_LABELS, f"{where}: {name} has no label {matcher.name}"
        for labels, sub in grouping_labels(tree):
            available = set(TARGET_LABELS)
            for selector in selectors(sub):
                available |= labels_of.get(selector.name or "", set())
            assert set(labels) <= available, f"{where}: grouping by {set(labels) - available} that no series has"


def test_label_values_the_queries_rely_on_are_values_the_code_emits(queries: list[tuple[str, str]]) -> None:
    literals = emitted_literal_values()
    known = {
        ("k2_sequence_gaps_total", "severity"): {s.value for s in Severity},
        ("k2_commits_total", "outcome"): literals[("COMMITS", 1)],
        ("k2_operator_resources", "ready"): literals[("MANAGED_RESOURCES", 1)],
    }
    checked = 0
    for where, expr in queries:
        for selector in selectors(parse(expr)):
            for matcher in matchers(selector):
                values = known.get((selector.name, matcher.name))
                if values is None or "Re" in str(matcher.op):
                    continue
                checked += 1
                assert matcher.value in values, (f"{where}: {selector.name}{{{matcher.name}={matcher.value!r}}} "
                                                 f"never matches: the code emits {sorted(values)}")
    assert checked >= 4


def test_every_declared_metric_family_has_a_panel() -> None:
    text = "\n".join(expr for path in DASHBOARDS for _, expr in dashboard_queries(path))
    for name in declared_metrics():
        assert re.search(rf"\b{name}(_total|_bucket|_sum|_count)?\b", text), f"no panel shows {name}"


REQUIRED_ALERTS = {
    "consumer lag": ("k2_consumer_lag", None),
    "sequence-gap alerts": ("k2_sequence_gaps_total", 'severity="alert"'),
    "sequence-gap halts": ("k2_sequence_gaps_total", 'severity="halt"'),
    "DLQ growth": ("k2_rows_rejected_total", None),
    "API 5xx ratio": ("k2_http_requests_total", 'status=~"5.."'),
    "API p99 latency": ("k2_http_request_duration_seconds_bucket", "histogram_quantile(0.99"),
    "reconcile errors": ("k2_operator_reconcile_errors_total", None),
    "dependency retries": ("k2_dependency_retry_seconds_total", None),
    "data freshness": ("k2_table_newest_tick_timestamp_seconds", "time() -"),
    "process restarts": ("process_start_time_seconds", "changes("),
    "file descriptors": ("process_open_fds", "process_max_fds"),
}


@pytest.mark.parametrize("concern", REQUIRED_ALERTS)
def test_alerts_cover_each_operational_concern(alert_rules: list[dict[str, Any]], concern: str) -> None:
    metric, detail = REQUIRED_ALERTS[concern]
    assert any(metric in r["expr"] and (detail is None or detail in r["expr"]) for r in alert_rules), concern


def test_alerts_are_actionable(alert_rules: list[dict[str, Any]]) -> None:
    operations = (REPO / "docs" / "operations.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).strip().replace(" ", "-")
               for h in re.findall(r"^#+\s+(.*)$", operations, re.MULTILINE)}
    for rule in alert_rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert {"summary", "description", "runbook_url"} <= rule["annotations"].keys(), rule["alert"]
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[-1]
        assert anchor in anchors, f"{rule['alert']}: docs/operations.md has no section #{anchor}"


def test_thresholds_come_from_values() -> None:
    objects = helm.template(CHART, set_values={"monitoring.prometheusRule.enabled": "true",
                                               "monitoring.prometheusRule.thresholds.consumerLag": "1234"})
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    lag = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "K2ConsumerLagHigh")

    assert lag["expr"].endswith("> 1234")


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    objects = helm.template(CHART, set_values={"monitoring.grafanaDashboard.namespace": "monitoring"})
    maps = [o for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]]

    assert len(maps) == len(DASHBOARDS)
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["namespace"] == "monitoring"
        (name, body), = cm["data"].items()
        assert json.loads(body) == json.loads((CHART / "dashboards" / name).read_text())


def test_monitors_select_the_pods_and_ports_the_operator_renders() -> None:
    """The chart's PodMonitor and NetworkPolicies must match the labels and port names of the
    workloads rendered by k2_operator.render (consumers, ingest Jobs, feed pods, API pods)."""
    from k2_operator.models import IngestionPipelineSpec, QueryServiceSpec
    from k2_operator.render import Owner, RenderContext, TableBinding, render_pipeline, render_query

    ctx = RenderContext()
    pipeline = IngestionPipelineSpec.model_validate({"exchange": "asx", "source": {"type": "synthetic"}})
    children = render_pipeline(Owner(kind="IngestionPipeline", name="asx", namespace="k2"), pipeline,
                               binding=TableBinding(("trades",), "market", "k2-catalog"), ctx=ctx)
    feed = IngestionPipelineSpec.model_validate(
        {"exchange": "asx", "source": {"type": "feed", "feed": {"url": "ws://venue:8765"}}})
    children += render_pipeline(Owner(kind="IngestionPipeline", name="live", namespace="k2"), feed,
                                binding=None, ctx=ctx)
    children += render_query(Owner(kind="QueryService", name="api", namespace="k2"),
                             QueryServiceSpec.model_validate({"tables": [{"name": "t"}]}),
                             table_namespace="market", catalog_secret="k2-catalog", ctx=ctx)
    pods = []
    for child in children:
        if child["kind"] in ("Deployment", "Job"):
            template = child["spec"]["template"]
            ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c["ports"]}
            pods.append((template["metadata"]["labels"], ports))
    objects = helm.template(CHART, set_values={"monitoring.podMonitor.enabled": "true"})
    monitor = next(o for o in objects if o["kind"] == "PodMonitor")
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]

    components = {labels["app.kubernetes.io/component"] for labels, _ in pods}
    assert components == {"consumer", "ingest", "feed", "query"}
    for labels, ports in pods:
        expressions = monitor["spec"]["selector"]["matchExpressions"]
        assert all(labels.get(e["key"]) in e["values"] for e in expressions), labels
        assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} & ports.keys(), labels
        policy = next((p for p in policies if all(labels.get(e["key"]) in e["values"]
                                                  for e in p["podSelector"].get("matchExpressions", []))
                       and all(labels.get(k) == v for k, v in p["podSelector"].get("matchLabels", {}).items())
                       and p["podSelector"]), None)
        assert policy, f"no NetworkPolicy selects {labels['app.kubernetes.io/component']} pods"
        assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} <= set(ports.values())


# --- promtool: the rules load in Prometheus, and the alerts fire when they should ------------------
@pytest.fixture(scope="module")
def promtool() -> Path:
    from k2.stack.images import PROMETHEUS

    return PROMETHEUS.install() / "promtool"  # built from the Prometheus release the kind add-ons run


@pytest.fixture(scope="module")
def rule_file(alert_rules: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    objects = helm.template(CHART, set_values={"monitoring.prometheusRule.enabled": "true",
                                               "monitoring.serviceMonitor.enabled": "true"})
    rule = next(o for o in objects if o["kind"] == "PrometheusRule")
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


@pytest.mark.parametrize(("discovery", "loads"), [("kubernetes_sd_configs", True), ("ec2_sd_configs", False)])
def test_the_prometheus_built_here_has_the_discovery_the_operator_writes_and_no_other(
        promtool: Path, tmp_path: Path, discovery: str, loads: bool) -> None:
    """Built with Kubernetes discovery only (the other clouds' SDKs would double its compile time):
    ServiceMonitors become `kubernetes_sd_configs`, which must load; another cloud's must not."""
    config = tmp_path / "prometheus.yaml"
    config.write_text(yaml.safe_dump({"scrape_configs": [{"job_name": "k2", discovery: [
        {"role": "endpoints"} if discovery == "kubernetes_sd_configs" else {"region": "ap-southeast-2"}]}]}))
    proc = subprocess.run([promtool, "check", "config", "--syntax-only", config], capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode == 0) == loads, proc.stdout + proc.stderr


def test_promtool_accepts_every_rule(promtool: Path, rule_file: Path, alert_rules: list[dict[str, Any]]) -> None:
    proc = subprocess.run([promtool, "check", "rules", rule_file], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alert_rules)} rules found" in proc.stdout


K2_POD = 'k2_feed_lag_seconds{namespace="k2",pod="%s"}'  # any k2_* series marks a pod as K2's
# alert → (input series, a time it must stay quiet, a time it must fire, the firing alert's labels and summary)
ALERT_CASES: dict[str, tuple[dict[str, str], str, str, dict[str, str], str]] = {
    "K2TableStale": (
        {'k2_table_newest_tick_timestamp_seconds{namespace="k2",pod="w-1",table="market.trades"}':
         "0+60x30 1800x60"},  # ticks as fresh as the clock for 30 minutes, then none newer
        "40m", "60m", {"namespace": "k2", "table": "market.trades"},
        "The newest tick in k2/market.trades is 30m 0s old"),
    "K2DeadLetterQueueGrowing": (
        {'k2_rows_rejected_total{namespace="k2",pod="w-1",stage="stream",reason="undecodable"}': "0+120x40",
         'k2_rows_rejected_total{namespace="k2",pod="w-1",stage="stream",reason="out_of_range"}': "0+30x40"},
        "5m", "30m", {"namespace": "k2", "stage": "stream", "reason": "undecodable"},
        "2 rows/s go to the DLQ in k2 (stream: undecodable)"),
    "K2ProcessRestarting": (
        {'process_start_time_seconds{namespace="k2",pod="api-1"}': "100 100 400 400 700 700 1000x30",
         K2_POD % "api-1": "0x36",
         'process_start_time_seconds{namespace="k2",pod="not-k2"}': "100 200 300 400 500 600 700x30"},
        "5m", "10m", {"namespace": "k2", "pod": "api-1"},
        "K2 process in k2/api-1 restarted 3 times in 30 minutes"),
    "K2ProcessFileDescriptorsExhausted": (
        {'process_open_fds{namespace="k2",pod="w-1"}': "950x30", 'process_max_fds{namespace="k2",pod="w-1"}': "1000x30",
         K2_POD % "w-1": "0x30",
         'process_open_fds{namespace="k2",pod="not-k2"}': "999x30",
         'process_max_fds{namespace="k2",pod="not-k2"}': "1000x30"},
        "5m", "15m", {"namespace": "k2", "pod": "w-1"},
        "k2/w-1 uses 95% of its file descriptors"),
}


@pytest.mark.parametrize("alert", ALERT_CASES)
def test_alert_fires_when_it_should_and_only_then(promtool: Path, rule_file: Path, alert: str,
                                                  alert_rules: list[dict[str, Any]]) -> None:
    """promtool's rule unit tests: a firing alert carries exactly these labels and its summary."""
    series, quiet_at, fire_at, labels, summary = ALERT_CASES[alert]
    rule = next(r for r in alert_rules if r["alert"] == alert)
    expected = {"exp_labels": {**labels, **rule["labels"]},
                "exp_annotations": {**rule["annotations"], "summary": summary}}
    tests = {"rule_files": [str(rule_file)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [{"eval_time": quiet_at, "alertname": alert, "exp_alerts": []},
                            {"eval_time": fire_at, "alertname": alert, "exp_alerts": [expected]}],
    }]}
    path = rule_file.with_name(f"{alert}.test.yaml")
    path.write_text(yaml.safe_dump(tests))
    proc = subprocess.run([promtool, "test", "rules", path], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
