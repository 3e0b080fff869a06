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

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from k2.settings import Settings
from k2_operator.config import OperatorConfig
from k2_operator.models import ObjectMetadata, PodOverrides, Resources, SchemaRegistryRef

MANAGED_BY = "k2-operator"
PART_OF = "k2"
SETTINGS_HASH_ANNOTATION = "k2.io/settings-hash"
TMP_MOUNT = "/tmp"
SECRETS_MOUNT = "/var/run/k2"
SECRETS_HASH_ANNOTATION = "k2.io/secrets-hash"
APP_UID = 10001

# Catalog connection: the keys a catalog Secret may hold (K2 setting names) and which are required.
CATALOG_SECRET_FIELDS = ("catalog_uri", "warehouse", "catalog_name", "s3_endpoint", "s3_region",
                         "s3_access_key", "s3_secret_key")
CATALOG_REQUIRED_FIELDS = ("catalog_uri",)


class DeclaredSettings(Settings):
    """`Settings` built only from what the operator passes: the operator's own `K2_*` environment
    must never leak into a rendered workload (its S3 keys, say)."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
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
    # The default registry URL is secret: workloads get it from this Secret key, `registry_url` is unused.
    registry_secret: tuple[str, str] | None = None
    # resourceVersion of each Secret the workloads read through env: a rotation changes the pod
    # template's checksum annotation, which rolls the pods.
    secret_versions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings, config: OperatorConfig, *, service_monitor: bool = False) -> RenderContext:
        secret = (config.registry_secret_name, config.registry_secret_key) if config.registry_secret_name else None
        return cls(image=config.image, image_pull_policy=config.image_pull_policy,
                   kafka_bootstrap=settings.kafka_bootstrap,
                   registry_url=settings.registry_url if secret is None else RenderContext.registry_url,
                   log_level=settings.log_level, workload_metrics_port=config.workload_metrics_port,
                   api_port=config.api_port, service_monitor=service_monitor,
                   service_account=config.service_account, registry_secret=secret)


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
class SecretFile:
    """A Secret key mounted as a file, for settings a workload re-reads when the file changes."""

    setting: str  # Settings field holding the file's path
    secret: str
    key: str

    @property
    def volume(self) -> str:
        return self.setting.replace("_", "-")

    @property
    def path(self) -> str:
        return f"{SECRETS_MOUNT}/{self.volume}/{self.key}"

    def volume_manifest(self) -> dict[str, Any]:
        return {"name": self.volume, "secret": {"secretName": self.secret, "items": [{"key": self.key,
                                                                                       "path": self.key}]}}

    def mount_manifest(self) -> dict[str, Any]:
        return {"name": self.volume, "mountPath": f"{SECRETS_MOUNT}/{self.volume}", "readOnly": True}


@dataclass(frozen=True)
class WorkloadConfig:
    """One workload's configuration: the settings, which of them come from Secrets (env or mounted
    files), and which it does not use at all (left out of its ConfigMap)."""

    settings: Settings
    secrets: tuple[SecretEnv, ...] = field(default_factory=tuple)
    files: tuple[SecretFile, ...] = field(default_factory=tuple)
    unused: frozenset[str] = frozenset()

    def config_map_data(self) -> dict[str, str]:
        left_out = {s.env_name for s in self.secrets} | {f"K2_{name.upper()}" for name in self.unused}
        return {k: v for k, v in sorted(self.settings.to_env().items()) if k not in left_out}

    def secret_names(self) -> list[str]:
        return sorted({s.secret for s in self.secrets} | {f.secret for f in self.files})

    def env(self) -> list[dict[str, Any]]:
        return [s.manifest() for s in self.secrets]

    def digest(self) -> str:
        """Changes whenever the pods must restart to see new configuration."""
        payload = json.dumps([self.config_map_data(), self.env()], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def registry_settings(ref: SchemaRegistryRef | None, ctx: RenderContext) -> tuple[dict[str, Any], list[SecretEnv]]:
    """Where a workload finds the Schema Registry: the resource's own (a URL, or a Secret key,
    which wins), else the operator's default (its Secret key when it has one, else its URL,
    which `workload_settings` fills in). Returns settings for the ConfigMap and Secret envs."""
    if ref is not None:
        if ref.secret_ref is not None:
            return {}, [SecretEnv("registry_url", ref.secret_ref.name, ref.secret_ref.key)]
        return {"registry_url": ref.url}, []
    if ctx.registry_secret:
        return {}, [SecretEnv("registry_url", *ctx.registry_secret)]
    return {}, []


def workload_settings(ctx: RenderContext, **values: Any) -> Settings:
    """Settings for a workload: the context's defaults, then the CR's values, then validation."""
    # The operator creates the topics and tables; the workloads it deploys only check for them.
    base = {"mode": "prod", "create_resources": False, "kafka_bootstrap": ctx.kafka_bootstrap,
            "registry_url": ctx.registry_url,
            "log_level": ctx.log_level, "dlq_path": f"{TMP_MOUNT}/k2/dlq.jsonl",
            "warehouse": f"{TMP_MOUNT}/k2/warehouse"}
    return DeclaredSettings(**{**base, **values})


# --- metadata -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Owner:
    """The custom resource a child belongs to: every child's name, labels and namespace derive from it."""

    kind: str
    name: str
    namespace: str

    def selector_labels(self, component: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": "k2", "app.kubernetes.io/instance": self.name,
                "app.kubernetes.io/component": component}

    def selector(self, component: str) -> str:
        """`selector_labels` as the label selector string the scale subresource reports."""
        return ",".join(f"{k}={v}" for k, v in self.selector_labels(component).items())

    def labels(self, component: str) -> dict[str, str]:
        return {**self.selector_labels(component), "app.kubernetes.io/part-of": PART_OF,
                "app.kubernetes.io/managed-by": MANAGED_BY, f"k2.io/{self.kind.lower()}": self.name}

    def metadata(self, *, name: str, component: str, annotations: Mapping[str, str] | None = None,
                 extra: ObjectMetadata | None = None) -> dict[str, Any]:
        """`extra`: the user's labels and annotations; K2's own win a clash (selectors rely on them)."""
        meta: dict[str, Any] = {"name": name, "namespace": self.namespace,
                                "labels": {**(extra.labels if extra else {}), **self.labels(component)}}
        merged = {**(extra.annotations if extra else {}), **(annotations or {})}
        if merged:
            meta["annotations"] = merged
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
        # No `command`: the image's entrypoint (tini -- k2) reaps zombies and forwards signals.
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
        "volumeMounts": [{"name": "tmp", "mountPath": TMP_MOUNT}, *[f.mount_manifest() for f in workload.files],
                         *extra_mounts],
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


def shaped(spec: dict[str, Any], pod: PodOverrides, *,
           default_affinity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The user's placement fields on a pod spec (only those set; K2's security settings stay)."""
    shaped = dict(spec)
    affinity = pod.affinity if pod.affinity is not None else default_affinity
    for key, value in (("affinity", affinity), ("topologySpreadConstraints", pod.topology_spread_constraints),
                       ("tolerations", pod.tolerations), ("nodeSelector", pod.node_selector),
                       ("priorityClassName", pod.priority_class_name),
                       ("imagePullSecrets", [{"name": r.name} for r in pod.image_pull_secrets]),
                       ("serviceAccountName", pod.service_account_name)):
        if value:
            shaped[key] = value
    return shaped


def spread_over_nodes(owner: Owner, component: str) -> dict[str, Any]:
    """Prefer one replica per node, so losing a node does not take every replica."""
    return {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                           "labelSelector": {"matchLabels": owner.selector_labels(component)}}}]}}


def pod_template(*, owner: Owner, component: str, spec: dict[str, Any], workload: WorkloadConfig,
                 ctx: RenderContext, metrics_port: int | None = None, pod: PodOverrides | None = None,
                 default_affinity: dict[str, Any] | None = None) -> dict[str, Any]:
    pod = pod or PodOverrides()
    spec = shaped({**spec, "volumes": [*spec["volumes"], *[f.volume_manifest() for f in workload.files]]}, pod,
                  default_affinity=default_affinity)
    annotations = {SETTINGS_HASH_ANNOTATION: workload.digest()}
    env_secrets = sorted({s.secret for s in workload.secrets})
    if env_secrets:
        annotations[SECRETS_HASH_ANNOTATION] = short_hash({n: ctx.secret_versions.get(n) for n in env_secrets}, 16)
    if metrics_port:
        annotations.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port)})
    return {"metadata": {"labels": {**pod.labels, **owner.labels(component)},
                         "annotations": {**pod.annotations, **annotations}},
            "spec": spec}


# --- objects ----------------------------------------------------------------------------------------
def config_map(*, owner: Owner, name: str, component: str, workload: WorkloadConfig) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": owner.metadata(name=name, component=component),
            "data": workload.config_map_data()}


def deployment(*, owner: Owner, name: str, component: str, replicas: int,
               template: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": owner.metadata(name=name, component=component),
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": owner.selector_labels(component)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": template,
        },
    }


def service(*, owner: Owner, name: str, component: str, ports: list[dict[str, Any]],
            service_type: str = "ClusterIP", headless: bool = False,
            meta: ObjectMetadata | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": service_type, "selector": owner.selector_labels(component), "ports": ports}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": owner.metadata(name=name, component=component, extra=meta), "spec": spec}


def pod_disruption_budget(*, owner: Owner, name: str, component: str) -> dict[str, Any]:
    # maxUnavailable (not minAvailable) so a single replica never blocks a node drain.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": owner.metadata(name=name, component=component),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": owner.selector_labels(component)}}}


def service_monitor(*, owner: Owner, name: str, component: str, port: str, path: str = "/metrics",
                    meta: ObjectMetadata | None = None) -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": owner.metadata(name=name, component=component, extra=meta),
            "spec": {"selector": {"matchLabels": owner.selector_labels(component)},
                     "endpoints": [{"port": port, "path": path, "interval": "30s"}]}}


def referenced_secrets(objects: Iterable[Mapping[str, Any]]) -> list[str]:
    """The Secrets rendered pods read through env (`secretKeyRef`)."""
    names = set()
    for obj in objects:
        template = (obj.get("spec") or {}).get("template") or \
            ((obj.get("spec") or {}).get("jobTemplate") or {}).get("spec", {}).get("template") or {}
        for box in (template.get("spec") or {}).get("containers") or []:
            names |= {e["valueFrom"]["secretKeyRef"]["name"] for e in box.get("env") or []
                      if "secretKeyRef" in (e.get("valueFrom") or {})}
    return sorted(names)


def short_hash(value: Any, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]
