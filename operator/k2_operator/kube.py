"""The operator's few Kubernetes API calls, on the official client, in one place.

Children are written with server-side apply (field manager `k2-operator`, forced), which makes
every apply idempotent and puts back any field the operator owns that someone changed by hand,
while fields set by others (HPA replicas aside) are left alone. Paths come from a fixed table of
the kinds the operator renders, so no discovery round-trips are needed; `rbac.py` declares the
same list of kinds.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from k2_operator.models import GROUP, VERSION

FIELD_MANAGER = "k2-operator"
SERVICE_MONITOR_CRD = "servicemonitors.monitoring.coreos.com"


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0] if "/" in self.api_version else ""

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        prefix = f"/api/{self.api_version}" if "/" not in self.api_version else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


CHILD_KINDS: dict[str, Kind] = {k.kind: k for k in (
    Kind("v1", "ConfigMap", "configmaps"),
    Kind("v1", "Service", "services"),
    Kind("apps/v1", "Deployment", "deployments"),
    Kind("batch/v1", "Job", "jobs"),
    Kind("batch/v1", "CronJob", "cronjobs"),
    Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets"),
    Kind("networking.k8s.io/v1", "Ingress", "ingresses"),
    Kind("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors"),
)}
SECRET = Kind("v1", "Secret", "secrets")
EVENT = Kind("v1", "Event", "events")
LEASE = Kind("coordination.k8s.io/v1", "Lease", "leases")
CRD = Kind("apiextensions.k8s.io/v1", "CustomResourceDefinition", "customresourcedefinitions", namespaced=False)


def custom_kind(kind: str, plural: str) -> Kind:
    return Kind(f"{GROUP}/{VERSION}", kind, plural)


@dataclass(frozen=True)
class Applied:
    body: dict[str, Any]
    created: bool
    changed: bool

    @property
    def ref(self) -> str:
        return f"{self.body['kind']}/{self.body['metadata']['name']}"


class Kube:
    """Thin, synchronous access to the API (the handlers run in kopf's thread pool)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    @classmethod
    def connect(cls) -> Kube:
        """In-cluster when a ServiceAccount is mounted, else the kubeconfig (KUBECONFIG honoured)."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            # Read KUBECONFIG now: the client's default path is fixed when `kubernetes` is imported.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
        configuration.connection_pool_maxsize = 32
        return cls(client.ApiClient(configuration))

    # raw REST ----------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, query: list[tuple[str, Any]] | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        request = self.api_client.param_serialize(method.upper(), path, query_params=query or [],
                                                  header_params=headers, body=body, auth_settings=["BearerToken"])
        response = self.api_client.call_api(*request, _request_timeout=30)
        if not 200 <= response.status <= 299:
            response.read()
            self.api_client.response_deserialize(response, {})  # raises ApiException
        data = response.read()
        return json.loads(data) if data else {}

    def get(self, kind: Kind, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", kind.path(namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: Kind, namespace: str | None, label_selector: str | None = None) -> list[dict[str, Any]]:
        query = [("labelSelector", label_selector)] if label_selector else []
        try:
            return self.request("GET", kind.path(namespace), query=query).get("items", [])
        except ApiException as exc:
            if exc.status == 404:  # the kind itself is gone (a CRD removed): nothing to list
                return []
            raise

    def create(self, kind: Kind, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", kind.path(namespace), body=body)

    def replace(self, kind: Kind, namespace: str | None, body: dict[str, Any]) -> dict[str, Any]:
        """PUT: fails with 409 when `metadata.resourceVersion` is no longer current."""
        return self.request("PUT", kind.path(namespace, body["metadata"]["name"]), body=body)

    def delete(self, kind: Kind, namespace: str | None, name: str) -> bool:
        try:
            self.request("DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"})
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def apply(self, body: dict[str, Any]) -> Applied:
        """Server-side apply; reports whether the object was created or changed."""
        kind = CHILD_KINDS[body["kind"]]
        meta = body["metadata"]
        before = self.get(kind, meta.get("namespace"), meta["name"])
        after = self.request("PATCH", kind.path(meta.get("namespace"), meta["name"]), body=body,
                             query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
                             content_type="application/apply-patch+yaml")
        version = after["metadata"].get("resourceVersion")
        changed = before is None or before["metadata"].get("resourceVersion") != version
        return Applied(after, created=before is None, changed=changed)

    def patch_status(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> bool:
        try:
            self.request("PATCH", kind.path(namespace, name, "status"), body={"status": status},
                         content_type="application/merge-patch+json")
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    # helpers -----------------------------------------------------------------------------------
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        secret = self.get(SECRET, namespace, name)
        if secret is None:
            return None
        decoded = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        decoded.update(secret.get("stringData") or {})
        return decoded

    def crd_exists(self, name: str) -> bool:
        try:
            return self.get(CRD, None, name) is not None
        except ApiException as exc:
            if exc.status == 403:  # not allowed to look: behave as if absent
                return False
            raise
