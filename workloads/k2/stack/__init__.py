"""The local stack: real services on loopback for `make dev-up`, the tests and the demo.

`services()` lists them in start order; `settings_env()` is the `K2_*` environment that points
the workloads at them. Embedded mode (the demo's default) runs only Kafka and the registry and
keeps Iceberg in SQLite + local files.
"""

from __future__ import annotations

from k2.stack.base import Service, StackError, cache_dir, state_dir

__all__ = ["Service", "StackError", "cache_dir", "connection_summary", "peers", "services", "settings_env",
           "state_dir"]


def services(*, kube: bool = False, embedded: bool = False) -> list[Service]:
    from k2.stack.kafka import Kafka
    from k2.stack.registry import SchemaRegistry

    chosen: list[Service] = [Kafka(), SchemaRegistry()]
    if not embedded:
        from k2.stack.postgres import Postgres
        from k2.stack.s3 import S3

        chosen += [Postgres(), S3()]
    if kube:
        from k2.stack.kube import kube_services

        chosen += kube_services()
    return chosen


def peers() -> list[Service]:
    """Systems the benchmarks compare K2 with: never started by `k2 stack up`, stopped by `down`."""
    from k2.stack.iceberg_connect import IcebergConnect
    from k2.stack.questdb import QuestDB

    return [QuestDB(), IcebergConnect()]


def settings_env(*, kube: bool = False, embedded: bool = False) -> dict[str, str]:
    from k2.stack.kafka import Kafka
    from k2.stack.registry import SchemaRegistry

    env = {"K2_KAFKA_BOOTSTRAP": Kafka().bootstrap, "K2_REGISTRY_URL": SchemaRegistry().url}
    if not embedded:
        from k2.stack.postgres import Postgres
        from k2.stack.s3 import S3

        s3 = S3()
        env.update({
            "K2_CATALOG_URI": Postgres().sqlalchemy_url,
            "K2_WAREHOUSE": f"s3://{s3.bucket}/warehouse",
            "K2_S3_ENDPOINT": s3.endpoint,
            "K2_S3_ACCESS_KEY": s3.access_key,
            "K2_S3_SECRET_KEY": s3.secret_key,
            "K2_S3_REGION": s3.region,
        })
    if kube:
        from k2.stack.kube import kubeconfig_path

        env["KUBECONFIG"] = str(kubeconfig_path())
    return env


def connection_summary(*, kube: bool = False, embedded: bool = False) -> str:
    lines = ["", "Point K2 at this stack with:  eval \"$(k2 stack env" + (" --kube" if kube else "")
             + (" --embedded" if embedded else "") + ")\""]
    lines += [f"  {k}={v}" for k, v in settings_env(kube=kube, embedded=embedded).items() if "SECRET" not in k]
    lines.append(f"  logs: {state_dir() / 'logs'}")
    return "\n".join(lines)
