"""QueryService → settings ConfigMap, API Deployment (`k2 api`), Service, PodDisruptionBudget,
and optionally an Ingress and a ServiceMonitor."""

from __future__ import annotations

from typing import Any

from k2_operator.models import QUERY, QueryServiceSpec
from k2_operator.render import common
from k2_operator.render.common import RenderContext, SecretEnv, WorkloadConfig

KIND = QUERY.kind
SERVICE_PORT = 80


def names(name: str) -> dict[str, str]:
    return {"settings": f"{name}-settings", "api": name}


def workload_config(spec: QueryServiceSpec, namespace: str, catalog_secret: str,
                    ctx: RenderContext) -> WorkloadConfig:
    settings = common.workload_settings(ctx, namespace=namespace, rate_limit=spec.rate_limit,
                                        max_rows=spec.max_rows, query_cache_mb=spec.query_cache_mb,
                                        query_threads=spec.query_threads)
    keys = spec.auth.api_keys_secret
    secrets = (*common.catalog_secret_env(catalog_secret), SecretEnv("api_keys", keys.name, keys.key))
    return WorkloadConfig(settings, secrets)


def url(name: str, namespace: str, spec: QueryServiceSpec) -> str:
    if spec.ingress:
        scheme = "https" if spec.ingress.tls_secret else "http"
        return f"{scheme}://{spec.ingress.host}{spec.ingress.path.rstrip('/')}"
    return f"http://{names(name)['api']}.{namespace}.svc:{SERVICE_PORT}"


def api_deployment(name: str, namespace: str, spec: QueryServiceSpec, workload: WorkloadConfig,
                   ctx: RenderContext) -> dict[str, Any]:
    n = names(name)
    box = common.container(
        name="api", ctx=ctx, args=["api", "--host", "0.0.0.0", "--port", str(ctx.api_port)],
        config_map=n["settings"], workload=workload, resources=spec.resources, ports=[("http", ctx.api_port)],
        liveness=common.http_probe("/health", "http", period=10, failure=3, initial=5),
        readiness=common.http_probe("/ready", "http", period=5, failure=2, initial=5),
        startup=common.http_probe("/health", "http", period=2, failure=30, initial=2))
    template = common.pod_template(name, "query", KIND, common.pod_spec([box], ctx), workload,
                                   metrics_port=ctx.api_port)
    template["spec"]["terminationGracePeriodSeconds"] = 30
    return common.deployment(n["api"], namespace, name, "query", KIND, replicas=spec.replicas, template=template)


def ingress(name: str, namespace: str, spec: QueryServiceSpec) -> dict[str, Any]:
    assert spec.ingress is not None
    rule = {"host": spec.ingress.host, "http": {"paths": [{
        "path": spec.ingress.path, "pathType": "Prefix",
        "backend": {"service": {"name": names(name)["api"], "port": {"name": "http"}}}}]}}
    body: dict[str, Any] = {"rules": [rule]}
    if spec.ingress.class_name:
        body["ingressClassName"] = spec.ingress.class_name
    if spec.ingress.tls_secret:
        body["tls"] = [{"hosts": [spec.ingress.host], "secretName": spec.ingress.tls_secret}]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": common.metadata(names(name)["api"], namespace, name, "query", KIND), "spec": body}


def render_query(name: str, namespace: str, spec: QueryServiceSpec, *, table_namespace: str,
                 catalog_secret: str, ctx: RenderContext) -> list[dict[str, Any]]:
    n = names(name)
    workload = workload_config(spec, table_namespace, catalog_secret, ctx)
    objects = [
        common.config_map(n["settings"], namespace, name, "query", KIND, workload),
        api_deployment(name, namespace, spec, workload, ctx),
        common.service(n["api"], namespace, name, "query", KIND, service_type=spec.service_type, ports=[
            {"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}]),
        common.pod_disruption_budget(n["api"], namespace, name, "query", KIND),
    ]
    if spec.ingress:
        objects.append(ingress(name, namespace, spec))
    if ctx.service_monitor:
        objects.append(common.service_monitor(n["api"], namespace, name, "query", KIND, port="http"))
    return objects
