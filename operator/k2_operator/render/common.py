"""Building blocks shared by every rendered child: labels, the restricted pod template, and the
settings → ConfigMap/env step.

Configuration reaches a workload in one way only: the render function builds a
`k2.settings.Settings` from the custom resource, `Settings.to_env()` turns it into `K2_*`
variables (a ConfigMap, read with `envFrom`), and fields that must stay secret are left out of it
and point at their Secret with `secretKeyRef` instead. The workload's own `Settings()` reads them
back, so the CR, the env and the typed value are one model.

Nothing here does I/O: the same inputs give the same manifests, which is what the unit tests and
the drift check rely on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic_settings import PydanticBaseSettingsSource

from k2.settings import Settings
from k2_operator.config import OperatorConfig
from k2_operator.models import Resources

MANAGED_BY = "k2-operator"
PART_OF = "k2"
SETTINGS_HASH_ANNOTATION = "k2.io/settings-hash"
TMP_MOUNT = "/tmp"
APP_UID = 10001

# Catalog connection: the keys a catalog Secret may hold (K2 setting names) and which are required.
CATALOG_SECRET_FIELDS = ("catalog_uri", "warehouse", "catalog_name", "s3_endpoint", "s3_region",
                         "s3_access_key", "s3_secret_key")
CATALOG_REQUIRED_FIELDS = ("catalog_uri",)


class DeclaredSettings(Settings):
    """`Settings` built only from what the operator passes: the operator's own `K2_*` environment
    must never leak into a rendered workload (its S3 keys, say)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type, init_settings: PydanticBaseSettingsSource,
                                   **sources: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


@dataclass(frozen=True)
class RenderContext:
    """What the render functions need beyond the custom resource (no clients, no clock)."""

    image: str = "ghcr.io/k2-lakehouse/k2:0.0.0"
    image_pull_policy: str = "IfNotPresent"
    kafka_bootstrap: str = "127.0.0.1:9092"
    registry_url: str = "http://127.0.0.1:8081"
    log_level: str = "INFO"
    workload_metrics_port: int = 9090
    api_port: int = 8000
    service_monitor: bool = False
    service_account: str | None = None

    @classmethod
    def build(cls, settings: Settings, config: OperatorConfig, *, service_monitor: bool = False) -> RenderContext:
        return cls(image=config.image, image_pull_policy=config.image_pull_policy,
                   kafka_bootstrap=settings.kafka_bootstrap, registry_url=settings.registry_url,
                   log_level=settings.log_level, workload_metrics_port=config.workload_metrics_port,
                   api_port=config.api_port, service_monitor=service_monitor,
                   service_account=config.service_account)


@dataclass(frozen=True)
class SecretEnv:
    """A setting read from a Secret key instead of the ConfigMap."""

    setting: str  # Settings field name
    secret: str
    key: str
    optional: bool = False

    @property
    def env_name(self) -> str:
        return f"K2_{self.setting.upper()}"

    def manifest(self) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": self.secret, "key": self.key}
        if self.optional:
            ref["optional"] = True
        return {"name": self.env_name, "valueFrom": {"secretKeyRef": ref}}


def catalog_secret_env(secret: str) -> list[SecretEnv]:
    """Every catalog setting from the catalog Secret (keys named like the settings)."""
    return [SecretEnv(f, secret, f, optional=f not in CATALOG_REQUIRED_FIELDS) for f in CATALOG_SECRET_FIELDS]


@dataclass(frozen=True)
class WorkloadConfig:
    """One workload's configuration: the settings and which of them come from Secrets."""

    settings: Settings
    secrets: tuple[SecretEnv, ...] = field(default_factory=tuple)

    def config_map_data(self) -> dict[str, str]:
        secret_vars = {s.env_name for s in self.secrets}
        return {k: v for k, v in sorted(self.settings.to_env().items()) if k not in secret_vars}

    def env(self) -> list[dict[str, Any]]:
        return [s.manifest() for s in self.secrets]

    def digest(self) -> str:
        """Changes whenever the pods must restart to see new configuration."""
        payload = json.dumps([self.config_map_data(), self.env()], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def workload_settings(ctx: RenderContext, **values: Any) -> Settings:
    """Settings for a workload: the context's defaults, then the CR's values, then validation."""
    # The operator creates the topics and tables; the workloads it deploys only check for them.
    base = {"mode": "prod", "create_resources": False, "kafka_bootstrap": ctx.kafka_bootstrap,
            "registry_url": ctx.registry_url,
            "log_level": ctx.log_level, "dlq_path": f"{TMP_MOUNT}/k2/dlq.jsonl",
            "warehouse": f"{TMP_MOUNT}/k2/warehouse"}
    return DeclaredSettings(**{**base, **values})


# --- metadata -------------------------------------------------------------------------------------
def selector_labels(instance: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "k2", "app.kubernetes.io/instance": instance,
            "app.kubernetes.io/component": component}


def labels(instance: str, component: str, owner_kind: str) -> dict[str, str]:
    return {**selector_labels(instance, component), "app.kubernetes.io/part-of": PART_OF,
            "app.kubernetes.io/managed-by": MANAGED_BY, f"k2.io/{owner_kind.lower()}": instance}


def metadata(name: str, namespace: str, instance: str, component: str, owner_kind: str,
             annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": labels(instance, component, owner_kind)}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


# --- pods -----------------------------------------------------------------------------------------
def http_probe(path: str, port: str, *, period: int = 10, failure: int = 3, initial: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "initialDelaySeconds": initial, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failure}


def container(*, name: str, ctx: RenderContext, args: list[str], config_map: str, workload: WorkloadConfig,
              resources: Resources, ports: Iterable[tuple[str, int]], liveness: dict[str, Any],
              readiness: dict[str, Any], startup: dict[str, Any] | None = None,
              extra_mounts: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "image": ctx.image,
        "imagePullPolicy": ctx.image_pull_policy,
        "command": ["k2"],
        "args": list(args),
        "workingDir": TMP_MOUNT,
        "envFrom": [{"configMapRef": {"name": config_map}}],
        "env": workload.env(),
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"} for port_name, port in ports],
        "resources": resources.as_manifest(),
        "livenessProbe": liveness,
        "readinessProbe": readiness,
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_MOUNT}, *extra_mounts],
    }
    if startup:
        body["startupProbe"] = startup
    if not body["env"]:
        del body["env"]
    return body


def pod_spec(containers: list[dict[str, Any]], ctx: RenderContext, *, restart_policy: str = "Always",
             extra_volumes: Iterable[dict[str, Any]] = (), tmp_size: str = "1Gi") -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": containers,
        "restartPolicy": restart_policy,
        # Workloads never talk to the Kubernetes API, and service links would inject env vars
        # into a process that reads its configuration from env.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": APP_UID,
            "runAsGroup": APP_UID,
            "fsGroup": APP_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": tmp_size}}, *extra_volumes],
    }
    if ctx.service_account:
        spec["serviceAccountName"] = ctx.service_account
    return spec


def pod_template(instance: str, component: str, owner_kind: str, spec: dict[str, Any],
                 workload: WorkloadConfig, *, metrics_port: int | None = None) -> dict[str, Any]:
    annotations = {SETTINGS_HASH_ANNOTATION: workload.digest()}
    if metrics_port:
        annotations.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port)})
    return {"metadata": {"labels": labels(instance, component, owner_kind), "annotations": annotations},
            "spec": spec}


# --- objects ----------------------------------------------------------------------------------------
def config_map(name: str, namespace: str, instance: str, component: str, owner_kind: str,
               workload: WorkloadConfig) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(name, namespace, instance, component, owner_kind),
            "data": workload.config_map_data()}


def deployment(name: str, namespace: str, instance: str, component: str, owner_kind: str, *, replicas: int,
               template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(name, namespace, instance, component, owner_kind),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector_labels(instance, component)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": template,
        },
    }


def service(name: str, namespace: str, instance: str, component: str, owner_kind: str, *,
            ports: list[dict[str, Any]], service_type: str = "ClusterIP", headless: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": service_type, "selector": selector_labels(instance, component), "ports": ports}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": metadata(name, namespace, instance, component, owner_kind), "spec": spec}


def pod_disruption_budget(name: str, namespace: str, instance: str, component: str,
                          owner_kind: str) -> dict[str, Any]:
    # maxUnavailable (not minAvailable) so a single replica never blocks a node drain.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": metadata(name, namespace, instance, component, owner_kind),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(instance, component)}}}


def service_monitor(name: str, namespace: str, instance: str, component: str, owner_kind: str, *,
                    port: str, path: str = "/metrics") -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": metadata(name, namespace, instance, component, owner_kind),
            "spec": {"selector": {"matchLabels": selector_labels(instance, component)},
                     "endpoints": [{"port": port, "path": path, "interval": "30s"}]}}


def short_hash(value: Any, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]
