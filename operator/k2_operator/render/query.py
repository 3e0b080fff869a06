"""QueryService → settings ConfigMap, API Deployment (`k2 api`), Service, PodDisruptionBudget,
and optionally an Ingress and a ServiceMonitor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k2_operator.models import ObjectMetadata, QueryServiceSpec, SchemaRegistryRef
from k2_operator.render import common
from k2_operator.render.common import Owner, RenderContext, SecretFile, WorkloadConfig

SERVICE_PORT = 80


@dataclass(frozen=True)
class Names:
    """The names of a QueryService's children."""

    settings: str
    api: str

    @classmethod
    def of(cls, name: str) -> Names:
        return cls(settings=f"{name}-settings", api=name)


@dataclass(frozen=True)
class StreamTopics:
    """Where the served tables' ticks are produced: the live stream reads those topics."""

    asset_class: str
    exchange: str
    registry: SchemaRegistryRef | None = None  # the pipeline's; None: the operator's default


def workload_config(spec: QueryServiceSpec, *, namespace: str, catalog_secret: str,
                    ctx: RenderContext, topics: StreamTopics | None = None) -> WorkloadConfig:
    keys = spec.auth.api_keys_secret
    # Keys as a mounted file: `k2 api` re-reads it when the kubelet updates it, so a rotation or a
    # changed scope needs no restart.
    api_keys = SecretFile("api_keys_file", keys.name, keys.key)
    streamed = {"asset_class": topics.asset_class, "exchange": topics.exchange} if topics else {}
    # The live stream's hub decodes the pipeline's Avro: it reads writer schemas from its registry.
    registry, registry_secrets = common.registry_settings(topics.registry if topics else None, ctx)
    settings = common.workload_settings(ctx, namespace=namespace, **streamed, **registry, rate_limit=spec.rate_limit,
                                        max_rows=spec.max_rows, query_cache_mb=spec.query_cache_mb,
                                        query_rollup_mb=spec.query_rollup_mb,
                                        query_tick_cache_mb=spec.query_tick_cache_mb,
                                        live_tail_rows=spec.live_tail_rows,
                                        query_threads=spec.query_threads, query_memory_mb=spec.query_memory_mb,
                                        max_body_bytes=spec.max_body_bytes,
                                        request_timeout_seconds=spec.request_timeout_seconds,
                                        write_timeout_seconds=spec.write_timeout_seconds,
                                        key_concurrency=spec.key_concurrency,
                                        api_keys_file=api_keys.path)
    return WorkloadConfig(settings, (*registry_secrets, *common.catalog_secret_env(catalog_secret)),
                          files=(api_keys,))


def url(owner: Owner, spec: QueryServiceSpec) -> str:
    if spec.ingress:
        scheme = "https" if spec.ingress.tls_secret else "http"
        return f"{scheme}://{spec.ingress.host}{spec.ingress.path.rstrip('/')}"
    return f"http://{Names.of(owner.name).api}.{owner.namespace}.svc:{SERVICE_PORT}"


def api_deployment(owner: Owner, spec: QueryServiceSpec, *, workload: WorkloadConfig,
                   ctx: RenderContext) -> dict[str, Any]:
    n = Names.of(owner.name)
    box = common.container(
        name="api", ctx=ctx, args=["api", "--host", "0.0.0.0", "--port", str(ctx.api_port)],
        config_map=n.settings, workload=workload, resources=spec.resources, ports=[("http", ctx.api_port)],
        liveness=common.http_probe("/health", "http", period=10, failure=3, initial=5),
        readiness=common.http_probe("/ready", "http", period=5, failure=2, initial=5),
        startup=common.http_probe("/health", "http", period=2, failure=30, initial=2))
    template = common.pod_template(owner=owner, component="query", spec=common.pod_spec([box], ctx),
                                   workload=workload, ctx=ctx, metrics_port=ctx.api_port, pod=spec.pod,
                                   default_affinity=common.spread_over_nodes(owner, "query"))
    template["spec"]["terminationGracePeriodSeconds"] = 30
    return common.deployment(owner=owner, name=n.api, component="query", replicas=spec.replicas, template=template)


def ingress(owner: Owner, spec: QueryServiceSpec) -> dict[str, Any]:
    assert spec.ingress is not None
    api = Names.of(owner.name).api
    rule = {"host": spec.ingress.host, "http": {"paths": [{
        "path": spec.ingress.path, "pathType": "Prefix",
        "backend": {"service": {"name": api, "port": {"name": "http"}}}}]}}
    body: dict[str, Any] = {"rules": [rule]}
    if spec.ingress.class_name:
        body["ingressClassName"] = spec.ingress.class_name
    if spec.ingress.tls_secret:
        body["tls"] = [{"hosts": [spec.ingress.host], "secretName": spec.ingress.tls_secret}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": owner.metadata(name=api, component="query", extra=ObjectMetadata(
                labels=spec.ingress.labels, annotations=spec.ingress.annotations)), "spec": body}


def render_query(owner: Owner, spec: QueryServiceSpec, *, table_namespace: str, catalog_secret: str,
                 ctx: RenderContext, topics: StreamTopics | None = None) -> list[dict[str, Any]]:
    n = Names.of(owner.name)
    workload = workload_config(spec, namespace=table_namespace, catalog_secret=catalog_secret, ctx=ctx,
                               topics=topics)
    objects = [
        common.config_map(owner=owner, name=n.settings, component="query", workload=workload),
        api_deployment(owner, spec, workload=workload, ctx=ctx),
        common.service(owner=owner, name=n.api, component="query", service_type=spec.service_type,
                       meta=spec.service, ports=[
            {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}]),
        common.pod_disruption_budget(owner=owner, name=n.api, component="query"),
    ]
    if spec.ingress:
        objects.append(ingress(owner, spec))
    if ctx.service_monitor:
        objects.append(common.service_monitor(owner=owner, name=n.api, component="query", port="http",
                                              meta=spec.service_monitor))
    return objects
