"""The operator's own knobs (`K2_OPERATOR_*`), apart from the workloads' `k2.settings.Settings`.

Workload configuration is *not* here: the operator reads `Settings` from its environment for the
defaults it hands to workloads (Kafka bootstrap, the default registry URL, log level) and renders
everything else from the custom resources. What lives here only makes sense for the operator
process: which image the workloads run, how often drift is checked, how long deletion retries.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

try:
    K2_VERSION = version("k2")
except PackageNotFoundError:  # running from a source tree without an install
    K2_VERSION = "0.0.0"


class OperatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="K2_OPERATOR_", extra="ignore", frozen=True)

    image: str = Field(f"ghcr.io/k2-lakehouse/k2:{K2_VERSION}", description="Image of the workload containers")
    image_pull_policy: str = Field("IfNotPresent", pattern="^(Always|IfNotPresent|Never)$")
    drift_interval: float = Field(60.0, gt=0, description="Seconds between drift checks of external state")
    drift_initial_delay: float = Field(10.0, ge=0, description="Seconds before the first drift check")
    retry_delay: float = Field(10.0, gt=0, description="Base delay when an external system is unavailable")
    cleanup_attempts: int = Field(
        8, ge=1, description="Deletion attempts (with backoff) before external cleanup is abandoned "
                             "and the resource released with a Warning event")
    workers: int = Field(8, ge=1, le=64, description="Threads running synchronous handlers")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus port (0: none)")
    liveness: str | None = Field("http://0.0.0.0:8080/healthz", description="kopf liveness endpoint")
    workload_metrics_port: int = Field(9090, ge=1, le=65535, description="Metrics port of stream/ingest pods")
    api_port: int = Field(8000, ge=1, le=65535, description="Port of `k2 api` in query pods")
    service_account: str | None = Field(None, description="ServiceAccount of workload pods (default: none)")
    registry_secret_name: str | None = Field(
        None, description="Secret holding the default registry URL (credentials included): workloads read it with "
                          "secretKeyRef from a Secret of this name in their own namespace, never from a ConfigMap")
    registry_secret_key: str = Field("url", description="Key of the URL in registry_secret_name")
    lease_namespace: str | None = Field(
        None, description="Namespace of the leader-election Lease (default: POD_NAMESPACE, else `default`)")
    lease_name: str = Field("k2-operator", description="Leader-election Lease: one operator acts at a time")
    lease_duration: float = Field(
        15.0, ge=2, le=300, description="Seconds a leader's Lease lasts without renewal before another takes over")


@cache
def load() -> OperatorConfig:
    return OperatorConfig()
