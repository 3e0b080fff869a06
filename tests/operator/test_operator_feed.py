"""An IngestionPipeline with a live feed source on the real apiserver: the operator runs `k2 ingest
feed` as a one-pod Deployment (never a Job), whose liveness probe is feed progress; the apiserver
refuses a feed source without its settings, or with channels the pipeline has no topics for."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kubernetes.client.rest import ApiException

pytestmark = [pytest.mark.operator, pytest.mark.timeout(180)]


def _pipeline(name: str, ex: str, asset_class: str, source: dict[str, Any],
              kinds: tuple[str, ...] = ("trades", "quotes")) -> dict[str, Any]:
    """An ASX pipeline whose topics are its own: `ex` makes its asset class private."""
    return {"apiVersion": "k2.io/v1alpha1", "kind": "IngestionPipeline", "metadata": {"name": name},
            "spec": {"exchange": "asx", "assetClass": f"{asset_class}{ex}", "topics": {"kinds": list(kinds)},
                     "source": source}}


def test_a_feed_source_runs_as_a_deployment_not_a_job(cluster: Any, namespace: str, operator: Any,
                                                       asset_class: str) -> None:
    ex = f"x{uuid.uuid4().hex[:6]}"
    name = f"f-{ex}"
    feed = {"url": "ws://feed.market.svc:8765", "channels": ["trades"], "symbols": ["BHP", "BTC-USD"]}
    cluster.create(namespace, _pipeline(name, ex, asset_class, {"type": "feed", "feed": feed}))
    cluster.wait_condition(namespace, "IngestionPipeline", name, timeout=90)

    deployment = cluster.deployment(namespace, f"{name}-feed")
    assert deployment is not None and deployment.spec.replicas == 1
    assert deployment.spec.strategy.type == "Recreate"
    box = deployment.spec.template.spec.containers[0]
    assert box.args[:3] == ["ingest", "feed", "ws://feed.market.svc:8765"]
    assert "BHP,BTC-USD" in box.args
    assert box.liveness_probe.http_get.path == "/livez"
    jobs = cluster.kubectl("get", "jobs", "-n", namespace, "-o", "name").stdout.split()
    assert not [j for j in jobs if name in j], jobs
    status = cluster.get(namespace, "IngestionPipeline", name)["status"]
    assert not status.get("ingest"), "no ingest Job is tracked for a feed"


@pytest.mark.parametrize(("source", "kinds", "message"), [
    ({"type": "feed"}, ("trades",), "source.feed (url) is required"),
    ({"type": "feed", "feed": {"url": "ws://f:1", "channels": ["quotes"]}}, ("trades",),
     "topics.kinds must list them"),
    ({"type": "synthetic", "feed": {"url": "ws://f:1"}}, ("trades", "quotes", "reference"),
     "source.feed is only allowed with type feed"),
    ({"type": "feed", "feed": {"url": "http://f:1"}}, ("trades", "quotes"), "should match"),
])
def test_the_apiserver_refuses_a_feed_source_it_cannot_run(cluster: Any, namespace: str, crds: list[str],
                                                           source: dict[str, Any], kinds: tuple[str, ...],
                                                           message: str) -> None:
    ex = f"x{uuid.uuid4().hex[:6]}"
    with pytest.raises(ApiException) as refused:
        cluster.create(namespace, _pipeline(f"f-{ex}", ex, "equities", source, kinds))
    assert refused.value.status == 422 and message in refused.value.body


def test_the_feed_pod_starts_before_its_tables_resolve_and_stays(cluster: Any, namespace: str, operator: Any,
                                                                  asset_class: str, k2op: Any) -> None:
    """A live venue's ticks sent while no feed pod runs are lost. The feed writes only to Kafka, so
    it starts once its topics and schemas exist, and its pod is not replaced when the tables
    resolve (its template depended on them, and on kind 6 quotes were lost)."""
    ex = f"x{uuid.uuid4().hex[:6]}"
    name = f"f-{ex}"
    feed = {"url": "ws://feed.market.svc:8765", "channels": ["trades"]}
    body = _pipeline(name, ex, asset_class, {"type": "feed", "feed": feed}, kinds=("trades",))
    body["spec"]["tables"] = [{"name": f"t-{ex}"}]
    cluster.create(namespace, body)
    cluster.wait_condition(namespace, "IngestionPipeline", name, "TablesResolved", "False", timeout=90)
    k2op.wait_for(lambda: cluster.deployment(namespace, f"{name}-feed"), "the feed Deployment", 60)
    before = cluster.deployment(namespace, f"{name}-feed").spec.template

    cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable", "metadata": {"name": f"t-{ex}"},
                               "spec": {"namespace": f"ns_{ex}", "name": "trades",
                                        "schema": {"fromSubject": f"market.{asset_class}{ex}.trades.asx-value"}}})
    cluster.wait_condition(namespace, "IngestionPipeline", name, "TablesResolved", timeout=120)
    k2op.wait_for(lambda: cluster.deployment(namespace, f"{name}-consumer"), "the consumer Deployment", 60)

    assert cluster.deployment(namespace, f"{name}-feed").spec.template == before, "the feed pod was replaced"
