"""K2 on a real kind cluster, end to end, as a user installs it: the add-ons (Traefik, the
Prometheus Operator with a Prometheus, metrics-server), then `helm install` of charts/k2 with the
kind values (every image built here, in-cluster Kafka, registry, PostgreSQL and S3) and the
samples reading the real ASX sample from the nodes' mount (a hostPath PersistentVolume). Then:
the custom resources become Ready, the ingest Job completes, the stream pods commit Iceberg to the
in-cluster S3 with the Postgres catalog, and through the Ingress every daily summary and 5-minute
bar equals the oracle's plain-Python figures from the CSVs. A live feed (manifests/kind-data/
live-feed.yaml) flows while a stream pod is force-deleted, the stream Deployment restarted, the
operator pod deleted in the middle of a reconcile and the QueryService scaled through its scale
subresource and an HPA: the day ends stored exactly. A rotated catalog Secret rolls the pods that
read it and not the feed; a frozen stream container is restarted by its liveness probe. Prometheus
has every K2 target up (the feed pod's too), K2's alert rules loaded, and every dashboard panel
query answers with a series."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from websockets.sync.client import connect

from k2.api.auth import digest
from k2.stack import addons, helm, kube

pytestmark = [pytest.mark.kind, pytest.mark.asx, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "k2"
DASHBOARD = CHART / "dashboards" / "k2-overview.json"
NAMESPACE = "k2"
HOST = "k2.localtest.me"
SYDNEY = ZoneInfo("Australia/Sydney")
ASX_ROWS = {"market.trades": 200_545, "market.quotes": 169_629}
READY = ["ingestionpipeline/asx", "icebergtable/market-trades", "icebergtable/market-quotes",
         "icebergtable/market-reference", "queryservice/k2-api"]
# The samples read the ASX sample through this volume, with these values on top of the kind ones.
ASX_VOLUME = REPO / "manifests" / "kind-data" / "asx-sample.yaml"
ASX_VALUES = CHART / "ci" / "kind-asx-values.yaml"
LIVE_FEED = REPO / "manifests" / "kind-data" / "live-feed.yaml"
LIVE_TABLES = {"live.trades": "trades", "live.quotes": "quotes"}
# The samples' key: the chart stores only its digest (samples.api.keyDigest), the tests hold the key.
API_KEY = "k2_" + secrets.token_urlsafe(32)
# Grafana's variables, as the dashboard's namespace selector would set them for this release.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "${namespace}": NAMESPACE, "$namespace": NAMESPACE,
                     "${table}": ".*", "$table": ".*"}


def wait_for(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
            if result:
                return result
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(5)


@contextlib.contextmanager
def port_forward(cluster: Any, target: str, remote_port: int, namespace: str) -> Iterator[str]:
    with kube.port_forward(target, remote_port, namespace=namespace,
                           kubectl_args=[f"--kubeconfig={cluster.kubeconfig_path}"]) as url:
        yield url


@pytest.fixture(scope="module")
def deployed(cluster: Any, asx_root: Path) -> Any:
    """Add-ons, the release namespace (restricted Pod Security from the start), the ASX volume,
    then the chart with the kind values and the samples on the ASX sample."""
    addons.install(kubeconfig=cluster.kubeconfig_path)
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    cluster.kubectl("apply", "-f", str(ASX_VOLUME))
    proc = helm.run_helm(
        "upgrade", "--install", "k2", str(CHART), "--namespace", NAMESPACE,
        "--kubeconfig", str(cluster.kubeconfig_path), "--values", str(CHART / "ci/kind-values.yaml"),
        "--values", str(ASX_VALUES), "--set", f"samples.api.keyDigest={digest(API_KEY)}",
        "--wait", "--timeout", "15m", timeout=1200)
    assert proc.returncode == 0, proc.stderr
    return cluster


@pytest.fixture(scope="module")
def api(deployed: Any) -> Iterator[httpx.Client]:
    """The API through Traefik's Ingress on the host port kind maps to the node's port 80."""
    with httpx.Client(base_url=f"http://127.0.0.1:{deployed.http_port}", timeout=60,
                      headers={"Host": HOST, "X-API-Key": API_KEY}) as client:
        yield client


def kubectl_json(cluster: Any, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-n", NAMESPACE, "-o", "json"))


@pytest.fixture(scope="module")
def live(deployed: Any) -> Iterator[httpx.Client]:
    """The live feed of manifests/kind-data/live-feed.yaml flowing (its first ticks committed);
    yields a client of its QueryService (through a port-forward: it has no Ingress)."""
    # All at once: the tables wait for the subjects the pipeline registers; the feed pod starts
    # once the topics and schemas exist and is not replaced when the tables resolve.
    deployed.kubectl("apply", "-f", str(LIVE_FEED))
    deployed.kubectl("wait", "-n", NAMESPACE, "--for=condition=Ready", "ingestionpipeline/live",
                     "icebergtable/live-trades", "icebergtable/live-quotes", "queryservice/live-api",
                     "--timeout=10m", timeout=700)
    with live_api(deployed) as client:
        wait_for(lambda: _stored(client).get("live.trades", 0) > 0, "the first live trades committed", 300)
        yield client


@contextlib.contextmanager
def live_api(cluster: Any) -> Iterator[httpx.Client]:
    """A client of the live QueryService through a port-forward of its own: a port-forward stays
    on the pod it picked, so tests that replace the API pods open a new one."""
    with port_forward(cluster, "svc/live-api", 80, NAMESPACE) as url, httpx.Client(
            base_url=url, timeout=60, headers={"X-API-Key": API_KEY}) as client:
        yield client


def test_samples_become_ready_and_the_ingest_job_completes(deployed: Any) -> None:
    deployed.kubectl("wait", "-n", NAMESPACE, "--for=condition=Ready", *READY, "--timeout=20m", timeout=1300)

    pods = json.loads(deployed.kubectl("get", "pods", "-n", NAMESPACE, "-o", "json"))["items"]
    phases = {p["metadata"]["name"]: p["status"]["phase"] for p in pods}
    assert any(name.startswith("asx-ingest") and phase == "Succeeded" for name, phase in phases.items()), phases


def _stored(api: httpx.Client) -> dict[str, int]:
    response = api.get("/v1/stats")
    return {t["table"]: t["rows"] for t in response.json()["data"]} if response.status_code == 200 else {}


def test_every_summary_and_five_minute_bar_through_the_ingress_is_exact(api: httpx.Client, asx_oracle: Any) -> None:
    stored = wait_for(lambda: (s := _stored(api)) and all(s.get(t) == n for t, n in ASX_ROWS.items()) and s,
                      "the stream pods to commit the whole ASX sample", timeout=1200)
    assert {t: stored[t] for t in ASX_ROWS} == ASX_ROWS
    assert api.get("/v1/symbols", headers={"X-API-Key": ""}).status_code == 401

    checked = 0
    for symbol, day in asx_oracle.symbol_days():
        summary = api.get(f"/v1/summary/{symbol}/{day.isoformat()}")
        assert summary.status_code == 200, summary.text
        assert summary.json() == asx_oracle.summary(symbol, day), (symbol, day)
        start = dt.datetime(day.year, day.month, day.day, tzinfo=SYDNEY)
        bars = api.post("/v1/aggregations", json={
            "metric": "ohlcv", "symbols": [symbol], "interval": "5m", "start": start.isoformat(),
            "end": (start + dt.timedelta(days=1)).isoformat()})
        assert bars.status_code == 200, bars.text
        expected = [{k: b[k] for k in ("symbol", "bucket_start", "bucket_end", "open", "high", "low", "close",
                                       "volume", "trade_count", "vwap")} for b in asx_oracle.bars(symbol, day, 5)]
        assert bars.json()["data"] == expected, (symbol, day)
        checked += len(expected)
    assert checked > 100


def _live_expected(tmp_path: Path, file_records: Callable[..., dict]) -> dict[str, int]:
    """The simulator's day, from the same generator: rows per live table."""
    from k2_synthetic import generate

    records = file_records(generate(tmp_path / "live", symbols=4, days=1, seed=42))
    return {table: sum(1 for key in records if key[0] == kind) for table, kind in LIVE_TABLES.items()}


def _pods(cluster: Any, prefix: str) -> list[str]:
    return [p["metadata"]["name"] for p in kubectl_json(cluster, "get", "pods")["items"]
            if p["metadata"]["name"].startswith(prefix) and not p["metadata"].get("deletionTimestamp")]


def _converged(cluster: Any, kind: str, name: str) -> bool:
    obj = kubectl_json(cluster, "get", kind, name)
    ready = next((c for c in obj["status"].get("conditions", []) if c["type"] == "Ready"), {})
    return obj["status"].get("observedGeneration") == obj["metadata"]["generation"] and ready.get("status") == "True"


def test_faults_while_the_live_feed_flows_end_with_the_day_stored_exactly(
        deployed: Any, live: httpx.Client, tmp_path: Path, file_records: Callable[..., dict]) -> None:
    expected = _live_expected(tmp_path, file_records)

    # a stream pod killed outright, then the stream Deployment rolled, both mid-day
    [victim] = _pods(deployed, "live-consumer-")
    deployed.kubectl("delete", "pod", victim, "-n", NAMESPACE, "--force", "--grace-period=0")
    assert _stored(live)["live.trades"] < expected["live.trades"], "the day ended before the faults"
    wait_for(lambda: [p for p in _pods(deployed, "live-consumer-") if p != victim], "a new stream pod", 300)
    deployed.kubectl("rollout", "restart", "deployment/live-consumer", "-n", NAMESPACE)
    deployed.kubectl("rollout", "status", "deployment/live-consumer", "-n", NAMESPACE, "--timeout=5m", timeout=400)
    assert _stored(live)["live.trades"] < expected["live.trades"], "the day ended before the faults"

    # the pipeline scaled through its scale subresource, and the operator deleted right after,
    # with that change still to reconcile: its successor converges
    deployed.kubectl("scale", "ingestionpipeline/live", "-n", NAMESPACE, "--replicas=2")
    deployed.kubectl("delete", "pod", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=operator", "--wait=false")
    wait_for(lambda: _converged(deployed, "ingestionpipeline", "live") and kubectl_json(
        deployed, "get", "deployment", "live-consumer")["status"].get("readyReplicas") == 2,
        "the new operator to converge on two stream pods", 600)

    # the QueryService scaled through its scale subresource
    deployed.kubectl("scale", "queryservice/live-api", "-n", NAMESPACE, "--replicas=2")
    wait_for(lambda: kubectl_json(deployed, "get", "deployment", "live-api")["status"].get("readyReplicas") == 2,
             "two API pods", 600)
    stored = wait_for(lambda: (s := _stored(live)) and all(s.get(t, 0) >= n for t, n in expected.items()) and s,
                      "the simulator's whole day stored", 900)
    time.sleep(10)  # nothing more may arrive: a late duplicate would show here
    assert {t: _stored(live)[t] for t in expected} == expected == {t: stored[t] for t in expected}
    feed_sets = [r for r in kubectl_json(deployed, "get", "replicasets")["items"]
                 if r["metadata"]["name"].startswith("live-feed-")]
    assert len(feed_sets) == 1, "the feed pod was replaced: the venue's ticks meanwhile are lost"


def test_an_hpa_scales_the_query_service_on_its_pods_cpu(deployed: Any, live: httpx.Client) -> None:
    """An HPA aimed at a QueryService (its scale subresource and selector) reads the API pods' CPU
    from metrics-server: able to scale, and scaling active."""
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
           "metadata": {"name": "live-api", "namespace": NAMESPACE},
           "spec": {"scaleTargetRef": {"apiVersion": "k2.io/v1alpha1", "kind": "QueryService", "name": "live-api"},
                    "minReplicas": 1, "maxReplicas": 3, "metrics": [{"type": "Resource", "resource": {
                        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}]}}
    deployed.kubectl("apply", "-f", "-", input=json.dumps(hpa))

    def conditions() -> dict[str, str]:
        status = kubectl_json(deployed, "get", "hpa", "live-api")["status"]
        return {c["type"]: c["status"] for c in status.get("conditions", [])}
    try:
        with contextlib.suppress(AssertionError):
            wait_for(lambda: conditions().get("ScalingActive") == "True", "the HPA to read the pods' CPU", 600)
        found = conditions()
        assert found.get("AbleToScale") == "True" and found.get("ScalingActive") == "True", \
            kubectl_json(deployed, "get", "hpa", "live-api")["status"]
    finally:  # left in place it would scale the API down under the next tests' port-forwards
        deployed.kubectl("delete", "hpa", "live-api", "-n", NAMESPACE)


def _template_annotation(cluster: Any, deployment: str, key: str) -> str | None:
    template = kubectl_json(cluster, "get", "deployment", deployment)["spec"]["template"]
    return (template["metadata"].get("annotations") or {}).get(key)


def test_a_rotated_catalog_secret_rolls_its_readers_and_never_the_feed(deployed: Any, live: httpx.Client) -> None:
    """The consumers and the API read the catalog Secret through env, so a rotation rolls them;
    the feed does not read it, and a replaced feed pod would lose the venue's ticks."""
    readers = ("live-consumer", "live-api")
    hashes = {d: _template_annotation(deployed, d, "k2.io/secrets-hash") for d in readers}
    pods = {d: set(_pods(deployed, f"{d}-")) for d in readers}
    feed = _pods(deployed, "live-feed-")
    deployed.kubectl("patch", "secret", "k2-catalog", "-n", NAMESPACE, "--type=merge",
                     "-p", json.dumps({"stringData": {"rotated": uuid.uuid4().hex}}))

    for deployment in readers:
        wait_for(lambda d=deployment: _template_annotation(deployed, d, "k2.io/secrets-hash") != hashes[d],
                 f"{deployment}'s pod template to follow the Secret", 300)
        deployed.kubectl("rollout", "status", f"deployment/{deployment}", "-n", NAMESPACE, "--timeout=5m",
                         timeout=400)
        assert not set(_pods(deployed, f"{deployment}-")) & pods[deployment], f"{deployment} was not rolled"
    assert _pods(deployed, "live-feed-") == feed, "the feed pod was replaced"
    with live_api(deployed) as rolled:
        assert wait_for(lambda: rolled.get("/v1/stats").status_code == 200, "the rolled API to answer", 120)


# Freezes `k2 stream run` in its container (every thread, the metrics server's too).
FREEZE_STREAM = """
import os, signal
for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        if b"stream" in cmdline.read():
            os.kill(pid, signal.SIGSTOP)
"""


def test_a_stream_pod_that_makes_no_progress_is_restarted_by_its_liveness_probe(deployed: Any,
                                                                               live: httpx.Client) -> None:
    """Liveness is `/livez` (the poll loop's progress; tests/unit/test_stream_liveness.py shows it
    fails while the metrics thread still serves): the kubelet restarts a stuck stream container."""
    pod = _pods(deployed, "live-consumer-")[0]

    def restarts() -> int:
        status = kubectl_json(deployed, "get", "pod", pod)["status"]
        return sum(c["restartCount"] for c in status.get("containerStatuses", []))

    before = restarts()
    deployed.kubectl("exec", pod, "-n", NAMESPACE, "-c", "stream", "--", "python", "-c", FREEZE_STREAM)
    wait_for(lambda: restarts() > before, "the kubelet to restart the stuck stream container", 300)
    deployed.kubectl("wait", "-n", NAMESPACE, "--for=condition=Ready", f"pod/{pod}", "--timeout=5m", timeout=400)
    events = kubectl_json(deployed, "get", "events", "--field-selector", f"involvedObject.name={pod}")["items"]
    assert [e for e in events if e["reason"] == "Unhealthy" and "Liveness probe failed" in e["message"]], \
        "restarted, but not by its liveness probe"


def _prometheus(url: str, path: str, **params: str) -> Any:
    response = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()["data"]


def _panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def test_prometheus_scrapes_every_k2_target_loads_the_rules_and_answers_every_panel(
        deployed: Any, api: httpx.Client, live: httpx.Client, asx_oracle: Any) -> None:
    wait_for(lambda: all(_stored(api).get(t) == n for t, n in ASX_ROWS.items()), "the sample stored", 1200)
    # The venue restarts and replays its day (the stream drops the copies), so ticks are produced,
    # fed and pushed while the panels are read, whatever ran before.
    deployed.kubectl("rollout", "restart", "deployment/feed-simulator", "-n", NAMESPACE)
    deployed.kubectl("rollout", "status", "deployment/feed-simulator", "-n", NAMESPACE, "--timeout=5m", timeout=400)
    # No `from`: the first message is a tick the API's hub read from Kafka, not a stored one. Quotes:
    # the replayed day opens with three exchange hours (three minutes here) of quotes only.
    with live_api(deployed) as client, connect(
            str(client.base_url).replace("http", "ws") + "/v1/stream/quotes",
            additional_headers={"X-API-Key": client.headers["X-API-Key"]}) as subscriber:
        assert json.loads(subscriber.recv(timeout=300))["symbol"], "a live tick pushed"
    # The query panels' series: the API pods may have been replaced (a Secret rotation rolls them)
    # since the last question; each of these twice on tables that do not change. A summary reads
    # rollups, a page of one symbol held ticks (a file computed or read, then held), and TWAP bars
    # SQL through the result cache (a miss, then a hit).
    symbol, day = next(iter(asx_oracle.symbol_days()))
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).isoformat()
    twap = {"symbols": [symbol], "interval": "1h", "metric": "twap", "start": start,
            "end": (dt.datetime.fromisoformat(start) + dt.timedelta(days=1)).isoformat()}
    for _ in range(2):
        assert api.get(f"/v1/summary/{symbol}/{day.isoformat()}").status_code == 200
        assert api.get("/v1/trades", params={"symbol": symbol, "limit": 10}).status_code == 200
        assert api.post("/v1/aggregations", json=twap).status_code == 200
    with port_forward(deployed, "svc/prometheus-operated", 9090, "monitoring") as url:
        def k2_targets() -> list[dict]:
            active = _prometheus(url, "targets", state="active")["activeTargets"]
            mine = [t for t in active if t["labels"].get("namespace") == NAMESPACE]
            components = {t["labels"].get("job", "") + " " + t["labels"].get("pod", "") for t in mine}
            wanted = ("operator", "consumer", "api", "live-feed")
            return mine if all(any(w in c for c in components) for w in wanted) and all(
                t["health"] == "up" for t in mine) else []

        targets = wait_for(k2_targets, "every K2 target (operator, stream consumers, feed, API) up", timeout=600)
        groups = _prometheus(url, "rules")["groups"]

        def empty_panels() -> list[tuple[str, str]]:
            return [(title, q) for title, q in _panel_queries() if not _prometheus(url, "query", query=q)["result"]]
        with contextlib.suppress(AssertionError):  # rates need two scrapes in their window: wait, then report
            wait_for(lambda: not empty_panels(), "a series for every dashboard panel", timeout=420)
        empty = empty_panels()

    assert targets and all(t["health"] == "up" for t in targets)
    assert {"k2.quality"} <= {g["name"] for g in groups}
    assert not [r for g in groups for r in g["rules"] if r.get("health") not in (None, "ok")]
    assert not empty, "panels without a series:\n" + "\n".join(f"{t}: {q}" for t, q in empty)
