"""versitygw, built from the Go module proxy: the S3 object store under the Iceberg warehouse.

The Versity S3 Gateway serves S3 over a plain directory (its posix backend: one folder per
bucket, one file per object, object metadata in extended attributes). It replaces MinIO, whose
repository upstream declared unmaintained and archived: versitygw is actively maintained by
Versity and licensed Apache-2.0. It runs here only as a separate dev/test server, no K2 code
links it, and the S3 surface K2 uses (path-style buckets, SigV4 for one region) is only what any
S3 server offers. It is pinned by release tag and built once per version into cache_dir(), where
fresh checkouts reuse it.

It binds only the S3 port: no console, no admin API and no WebUI are enabled. The only account
is its root account, whose keys are K2_S3_ACCESS_KEY/K2_S3_SECRET_KEY.
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

from .base import Service, StackError, cache_dir, run

log = structlog.get_logger("k2.stack.s3")

VERSITYGW_MODULE = "github.com/versity/versitygw"
VERSITYGW_VERSION = "v1.8.0"
VERSITYGW_PACKAGE = f"{VERSITYGW_MODULE}/cmd/versitygw"
BUILD_TIMEOUT = 30 * 60  # a cold build (downloads + compile) took under 3 minutes on 2 cores

# Readiness probes must fail fast: botocore would otherwise retry a refused connection with backoff.
_PROBE = Config(connect_timeout=1, read_timeout=3, retries={"total_max_attempts": 1})


def _go() -> str:
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        raise StackError("Go is needed to build versitygw: install Go >= 1.25 and put `go` on PATH")
    return go


@dataclass
class S3(Service):
    name: str = "s3"
    port_env: str = "K2_S3_PORT"
    default_port: int = 9000
    start_timeout: float = 60.0

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
        return cache_dir() / f"versitygw-{VERSITYGW_VERSION}" / "bin" / "versitygw"

    @property
    def data_dir(self) -> Path:
        """The gateway root: each subfolder is a bucket, each file below it an object."""
        return self.home / "buckets"

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
        log.info("s3.build", module=VERSITYGW_MODULE, version=VERSITYGW_VERSION,
                 into=str(self.binary.parent))
        started = time.monotonic()
        # Build into a scratch GOBIN and move the result in, so an interrupted build never
        # leaves a binary that install() would take for a finished one. The version is stamped
        # the way upstream's Makefile does, so `versitygw --version` names it.
        with tempfile.TemporaryDirectory(dir=self.binary.parent.parent) as gobin:
            run([_go(), "install", f"-ldflags=-s -w -X=main.Version={VERSITYGW_VERSION}",
                 f"{VERSITYGW_PACKAGE}@{VERSITYGW_VERSION}"],
                env={"GOBIN": gobin, "GOFLAGS": "-trimpath", "CGO_ENABLED": "0"},
                what=f"go install {VERSITYGW_PACKAGE}@{VERSITYGW_VERSION}", timeout=BUILD_TIMEOUT)
            os.replace(Path(gobin) / "versitygw", self.binary)
        log.info("s3.built", seconds=round(time.monotonic() - started), binary=str(self.binary))

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The posix backend keeps ETags, content types and user metadata in user.* xattrs:
        # fail here, by name, rather than on every PUT.
        probe = self.data_dir / ".k2-xattr-probe"
        try:
            probe.touch()
            os.setxattr(probe, "user.k2.probe", b"1")
        except OSError as exc:
            raise StackError(f"the S3 server needs user extended attributes, which the filesystem "
                             f"of {self.data_dir} does not support ({exc}); point K2_STATE_DIR "
                             f"at a folder on ext4, xfs, btrfs or similar") from exc
        finally:
            probe.unlink(missing_ok=True)
        minio_data = self.home / "data"
        if (minio_data / ".minio.sys").exists():
            log.warning("s3.minio_data_unused", path=str(minio_data),
                        hint="left by the former MinIO server; versitygw does not read it, delete it")

    def command(self) -> list[str]:
        # --quiet: no line per request in the log. Credentials go in environment(), not argv.
        return [str(self.binary), "--port", f"127.0.0.1:{self.port}", "--quiet",
                "posix", str(self.data_dir)]

    def environment(self) -> dict[str, str]:
        # versitygw checks request signatures against its region: make it the one clients sign
        # for. Each root-key flag reads two env vars (the first set wins): set both, so an
        # unrelated ROOT_ACCESS_KEY_ID in the caller's environment cannot take over.
        return {"ROOT_ACCESS_KEY_ID": self.access_key, "ROOT_ACCESS_KEY": self.access_key,
                "ROOT_SECRET_ACCESS_KEY": self.secret_key, "ROOT_SECRET_KEY": self.secret_key,
                "VGW_REGION": self.region}

    def ready(self) -> bool:
        self.client(_PROBE).list_buckets()
        return True

    def after_ready(self) -> None:
        # State the region outside us-east-1, as AWS requires (versitygw accepts it either way
        # but rejects a constraint other than its own region).
        where = {} if self.region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": self.region}}
        try:
            self.client().create_bucket(Bucket=self.bucket, **where)
            log.info("s3.bucket_created", bucket=self.bucket)
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "BucketAlreadyOwnedByYou":
                raise StackError(f"cannot create bucket {self.bucket!r} (K2_S3_BUCKET): {exc}") from exc
