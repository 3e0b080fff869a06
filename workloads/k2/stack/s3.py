"""MinIO, built from the Go module proxy: the S3 object store under the Iceberg warehouse.

MinIO is AGPL: it runs here only as a separate dev/test server and no K2 code links it. It
publishes no semver tags, so it is pinned by pseudo-version and built once per version into
cache_dir(), where fresh checkouts reuse it. Upstream has declared the repository unmaintained
(README of the pinned commit); the S3 surface K2 uses is only what any S3 server offers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import structlog
from botocore.config import Config
from botocore.exceptions import ClientError

from .base import Service, StackError, cache_dir, port_from_env, run

log = structlog.get_logger("k2.stack.s3")

MINIO_MODULE = "github.com/minio/minio"
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"  # master of 2026-02-12
BUILD_TIMEOUT = 45 * 60  # a cold build (downloads + compile) took 4-6 minutes on 2 busy cores

# Readiness probes must fail fast: botocore would otherwise retry a refused connection with backoff.
_PROBE = Config(connect_timeout=1, read_timeout=3, retries={"total_max_attempts": 1})


def _go() -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        raise StackError("Go is needed to build MinIO: install Go >= 1.24 and put `go` on PATH")
    return go


@dataclass
class S3(Service):
    name: str = "s3"
    port_env: str = "K2_S3_PORT"
    default_port: int = 9000
    start_timeout: float = 60.0

    @property
    def console_port(self) -> int:
        return port_from_env("K2_S3_CONSOLE_PORT", 9001)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def access_key(self) -> str:
        return os.environ.get("K2_S3_ACCESS_KEY", "k2admin")

    @property
    def secret_key(self) -> str:
        return os.environ.get("K2_S3_SECRET_KEY", "k2-secret-key")

    @property
    def region(self) -> str:
        return os.environ.get("K2_S3_REGION", "us-east-1")

    @property
    def bucket(self) -> str:
        return os.environ.get("K2_S3_BUCKET", "k2-warehouse")

    @property
    def binary(self) -> Path:
        return cache_dir() / f"minio-{MINIO_VERSION}" / "bin" / "minio"

    def client(self, config: Config | None = None):
        """A boto3 S3 client for this server (path-style: bucket names are not resolvable hosts)."""
        base = Config(signature_version="s3v4", s3={"addressing_style": "path"})
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=base.merge(config) if config else base)

    # hooks -------------------------------------------------------------------------------
    def install(self) -> None:
        if self.binary.exists():
            return
        self.binary.parent.mkdir(parents=True, exist_ok=True)
        log.info("s3.build", module=MINIO_MODULE, version=MINIO_VERSION, into=str(self.binary.parent))
        started = time.monotonic()
        # Build into a scratch GOBIN and move the result in, so an interrupted build never
        # leaves a binary that install() would take for a finished one.
        with tempfile.TemporaryDirectory(dir=self.binary.parent.parent) as gobin:
            run([_go(), "install", "-ldflags=-s -w", f"{MINIO_MODULE}@{MINIO_VERSION}"],
                env={"GOBIN": gobin, "GOFLAGS": "-trimpath", "CGO_ENABLED": "0"},
                what=f"go install {MINIO_MODULE}@{MINIO_VERSION}", timeout=BUILD_TIMEOUT)
            os.replace(Path(gobin) / "minio", self.binary)
        log.info("s3.built", seconds=round(time.monotonic() - started), binary=str(self.binary))

    def command(self) -> list[str]:
        return [str(self.binary), "server", str(self.home / "data"),
                "--address", f"127.0.0.1:{self.port}",
                "--console-address", f"127.0.0.1:{self.console_port}"]

    def environment(self) -> dict[str, str]:
        # MinIO checks request signatures against its site region: make it the one clients sign for.
        return {"MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key,
                "MINIO_SITE_REGION": self.region}

    def extra_ports(self) -> dict[str, int]:
        return {"K2_S3_CONSOLE_PORT": self.console_port}

    def ready(self) -> bool:
        self.client(_PROBE).list_buckets()
        return True

    def after_ready(self) -> None:
        try:
            self.client().create_bucket(Bucket=self.bucket)
            log.info("s3.bucket_created", bucket=self.bucket)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
                raise StackError(f"cannot create bucket {self.bucket!r} (K2_S3_BUCKET): {exc}") from exc
