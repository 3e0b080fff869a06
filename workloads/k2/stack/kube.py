"""A real Kubernetes control plane for tests, the envtest way: etcd, kube-apiserver and
kube-controller-manager as local processes, with no kubelet, scheduler or container runtime
(Pods stay Pending; everything that only needs the API and controllers works).

The programs are built from the Go module proxy by the wrapper modules beside this file
(`kube/kubernetes`, `kube/etcd`; their go.mod pins the versions) into
`cache_dir()/kube-<version>/bin` and `cache_dir()/etcd-<version>/bin`, once per version; the
`go build -v` output is kept in `build.log` next to `bin/`. With empty Go caches the build
takes about seven minutes on two cores (etcd under two of them); after that the three
processes start in about five seconds.

Clients use the kubeconfig at `state_dir()/kube/kubeconfig` (`kubeconfig_path()`), e.g.
`kubectl --kubeconfig .k2/state/kube/kubeconfig get ns`: a system:masters user authenticated
by a static token, the server checked against the CA generated beside it. RBAC is enforced
for everyone else, so impersonating a ServiceAccount shows its real permissions.

Ports: K2_ETCD_PORT (2379), K2_ETCD_PEER_PORT (2380), K2_KUBE_APISERVER_PORT (6443),
K2_KUBE_CONTROLLER_MANAGER_PORT (10257), all on 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import structlog
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .base import Service, StackError, cache_dir, free_port, port_from_env, port_in_use, run_logged, state_dir

log = structlog.get_logger("k2.stack.kube")

GO_MODULES = Path(__file__).with_name("kube")
BUILD_TIMEOUT = 3600.0
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_USER = "k2-admin"


def kubeconfig_path() -> Path:
    """Admin kubeconfig of the local cluster, written when kube-apiserver starts."""
    return cluster_dir() / "kubeconfig"


def cluster_dir() -> Path:
    """PKI, token file and kubeconfig shared by kube-apiserver, its clients and the controllers."""
    path = state_dir() / "kube"
    path.mkdir(parents=True, exist_ok=True)
    return path


# build -------------------------------------------------------------------------------------
def module_version(module_dir: Path, module: str) -> str:
    """The version of `module` that the wrapper's go.mod requires: it names the cache folder."""
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(module)}\s+(v\S+)",
                      (module_dir / "go.mod").read_text(), re.MULTILINE)
    if not match:
        raise StackError(f"{module_dir / 'go.mod'} does not require {module}")
    return match.group(1)


def kube_bin_dir() -> Path:
    version = kubernetes_version()
    return cache_dir() / f"kube-{version.removeprefix('v')}" / "bin"


@contextlib.contextmanager
def port_forward(target: str, remote_port: int, *, namespace: str, kubectl_args: Sequence[str] = (),
                 timeout: float = 60) -> Iterator[str]:
    """`kubectl port-forward` of `target` (e.g. `svc/live-api`) on a free loopback port; yields
    its base URL once kubectl listens there. kubectl binds a moment after it starts, and a client
    that connects first is refused. `kubectl_args` picks the cluster (`--context`, `--kubeconfig`)."""
    port = free_port()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([str(kube_bin_dir() / "kubectl"), *kubectl_args, "-n", namespace,
                                 "port-forward", target, f"{port}:{remote_port}"],
                                stdout=subprocess.DEVNULL, stderr=errors)
        try:
            wait_listening(proc, port, errors, f"port-forward of {namespace}/{target}", timeout)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def wait_listening(proc: subprocess.Popen, port: int, errors: IO[bytes], what: str, timeout: float) -> None:
    """Until `proc` listens on the loopback `port`; a StackError with its stderr (the open file
    `errors`) if it exits first or does not listen within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not port_in_use(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            errors.seek(0)
            why = errors.read().decode(errors="replace").strip()[-2000:]
            exited = proc.returncode is not None
            state = f"exited {proc.returncode}" if exited else f"not listening after {timeout:.0f}s"
            raise StackError(f"{what} {state} (port {port}): {why or 'no output'}")
        time.sleep(0.1)


def etcd_bin_dir() -> Path:
    version = module_version(GO_MODULES / "etcd", "go.etcd.io/etcd/server/v3")
    return cache_dir() / f"etcd-{version.removeprefix('v')}" / "bin"


def go_build(module_dir: Path, packages: list[str], bin_dir: Path, binaries: list[str],
             ldflags: tuple[str, ...] = (), tags: tuple[str, ...] = ()) -> None:
    """Build `packages` of a wrapper module (with build `tags`) into `bin_dir` unless all
    `binaries` are there."""
    if all((bin_dir / b).exists() for b in binaries):
        return
    go = shutil.which("go", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/local/go/bin")
    if not go:
        raise StackError("`go` is not on PATH: install Go >= 1.26 (building etcd and Kubernetes needs it)")
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    # Two test sessions starting at once must not both spend half an hour on the same build.
    with open(bin_dir.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all((bin_dir / b).exists() for b in binaries):
            return
        build_log = bin_dir.parent / "build.log"
        env = {
            **os.environ,
            # Static binaries like upstream's releases: no C toolchain needed, nothing to link.
            "CGO_ENABLED": "0",
            "GOFLAGS": f"{os.environ.get('GOFLAGS', '')} -trimpath".strip(),
            # Go finds its module and build caches through $HOME; where a CI or service
            # environment has none it would fail instead of reusing the user's caches.
            "HOME": os.environ.get("HOME", str(Path.home())),
        }
        with tempfile.TemporaryDirectory(dir=bin_dir.parent) as out:
            # -s -w: no symbol tables or DWARF, a third of the size; nobody debugs these here.
            cmd = [go, "build", "-v", "-ldflags=" + " ".join(("-s", "-w", *ldflags)), f"-tags={','.join(tags)}",
                   "-o", f"{out}/", *packages]
            log.info("kube.build", module=module_dir.name, packages=packages, log=str(build_log))
            started = time.monotonic()
            run_logged(cmd, cwd=module_dir, env=env, log_path=build_log, what=f"go build of {module_dir.name}",
                       timeout=BUILD_TIMEOUT)
            bin_dir.mkdir(exist_ok=True)
            for binary in binaries:  # each appears whole or not at all
                os.replace(Path(out) / binary, bin_dir / binary)
        log.info("kube.built", module=module_dir.name, seconds=round(time.monotonic() - started),
                 bin_dir=str(bin_dir))


def kubernetes_version() -> str:
    return module_version(GO_MODULES / "kubernetes", "k8s.io/kubernetes")


def version_stamp() -> tuple[str, ...]:
    """What upstream's release build stamps in; unset, /version says v0.0.0-master and clients
    that compare server versions (kubectl's skew check among them) misread it."""
    version = kubernetes_version()
    major, minor, _ = version.removeprefix("v").split(".", 2)
    return tuple(f"-X {pkg}.{var}={value}"
                 for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version")
                 for var, value in (("gitVersion", version), ("gitMajor", major), ("gitMinor", minor),
                                    ("gitTreeState", "clean")))


def install_kubernetes(commands: tuple[str, ...] = ("kube-apiserver", "kube-controller-manager")) -> Path:
    """Build `commands` of k8s.io/kubernetes (cmd/<name>) into kube_bin_dir(), which is returned."""
    go_build(GO_MODULES / "kubernetes", [f"k8s.io/kubernetes/cmd/{c}" for c in commands], kube_bin_dir(),
             list(commands), version_stamp())
    return kube_bin_dir()


# PKI and credentials -----------------------------------------------------------------------
def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
                 issuer_key: ec.EllipticCurvePrivateKey, extensions: list[tuple[x509.ExtensionType, bool]]
                 ) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               # A local test cluster: the PKI lives and dies with its state folder.
               .not_valid_after(now + dt.timedelta(days=3650))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                              False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical)
    return builder.sign(issuer_key, hashes.SHA256())


def ensure_pki() -> None:
    """CA, serving certificate (also used by the controller manager) and ServiceAccount key."""
    d = cluster_dir()
    if not (d / "ca.crt").exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("k2-local-ca", ca_key, None, ca_key, [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                           content_commitment=False, key_encipherment=False, data_encipherment=False,
                           key_agreement=False, encipher_only=False, decipher_only=False), True),
        ])
        serving_key = ec.generate_private_key(ec.SECP256R1())
        service_ip = next(ipaddress.IPv4Network(SERVICE_CLUSTER_IP_RANGE).hosts())
        serving = _certificate("kube-apiserver", serving_key, ca, ca_key, [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                           crl_sign=False, content_commitment=False, data_encipherment=False,
                           key_agreement=False, encipher_only=False, decipher_only=False), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.DNSName("kubernetes"),
                x509.DNSName("kubernetes.default"), x509.DNSName("kubernetes.default.svc"),
                x509.DNSName("kubernetes.default.svc.cluster.local"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(service_ip),
            ]), False),
        ])
        _write_private(d / "serving.key", _pem_key(serving_key))
        (d / "serving.crt").write_bytes(serving.public_bytes(serialization.Encoding.PEM))
        _write_private(d / "ca.key", _pem_key(ca_key))
        # Written last: its presence means the whole set is there.
        (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    if not (d / "sa.pub").exists():
        sa_key = ec.generate_private_key(ec.SECP256R1())
        _write_private(d / "sa.key", _pem_key(sa_key))
        (d / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def admin_token() -> str:
    """The static bearer token of the system:masters user, created once per state folder."""
    tokens = cluster_dir() / "tokens.csv"
    if not tokens.exists():
        _write_private(tokens, f'{secrets.token_hex(32)},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
                       .encode())
    return tokens.read_text().split(",", 1)[0]


def write_kubeconfig(port: int) -> Path:
    ca = base64.b64encode((cluster_dir() / "ca.crt").read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "k2-local", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                      "certificate-authority-data": ca}}],
        "users": [{"name": ADMIN_USER, "user": {"token": admin_token()}}],
        "contexts": [{"name": "k2-local", "context": {"cluster": "k2-local", "user": ADMIN_USER}}],
        "current-context": "k2-local",
    }
    path = kubeconfig_path()
    _write_private(path, yaml.safe_dump(config, sort_keys=False).encode())
    return path


def _https_get(url: str, token: str | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(cluster_dir() / "ca.crt"))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), context=context,
                                timeout=3) as resp:
        return resp.status, resp.read()


# services ----------------------------------------------------------------------------------
@dataclass
class Etcd(Service):
    name: str = "etcd"
    port_env: str = "K2_ETCD_PORT"
    default_port: int = 2379

    @property
    def peer_port(self) -> int:
        return port_from_env("K2_ETCD_PEER_PORT", 2380)

    def extra_ports(self) -> dict[str, int]:
        return {"K2_ETCD_PEER_PORT": self.peer_port}

    def install(self) -> None:
        go_build(GO_MODULES / "etcd", ["."], etcd_bin_dir(), ["etcd"])

    def command(self) -> list[str]:
        client = f"http://127.0.0.1:{self.port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            str(etcd_bin_dir() / "etcd"), "--name=k2", f"--data-dir={self.home / 'data'}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=k2={peer}",
            # Throwaway test data: fsync per write would make every API call wait on the disk.
            "--unsafe-no-fsync", "--log-level=warn",
        ]

    def ready(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=3) as resp:
            return json.load(resp).get("health") == "true"


@dataclass
class KubeApiserver(Service):
    name: str = "kube-apiserver"
    port_env: str = "K2_KUBE_APISERVER_PORT"
    default_port: int = 6443
    start_timeout: float = 180.0

    def install(self) -> None:
        install_kubernetes()

    def prepare(self) -> None:
        ensure_pki()
        admin_token()
        write_kubeconfig(self.port)

    def command(self) -> list[str]:
        d = cluster_dir()
        etcd = f"http://127.0.0.1:{Etcd().port}"
        return [
            str(kube_bin_dir() / "kube-apiserver"),
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={d / 'serving.crt'}", f"--tls-private-key-file={d / 'serving.key'}",
            f"--etcd-servers={etcd}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # The `kubernetes` Service cannot point at a loopback address, and nothing in a
            # node-less cluster could reach it anyway.
            "--endpoint-reconciler-type=none",
        ]

    def ready(self) -> bool:
        return _https_get(f"https://127.0.0.1:{self.port}/readyz", admin_token())[0] == 200


@dataclass
class KubeControllerManager(Service):
    name: str = "kube-controller-manager"
    port_env: str = "K2_KUBE_CONTROLLER_MANAGER_PORT"
    default_port: int = 10257

    def install(self) -> None:
        install_kubernetes()

    def command(self) -> list[str]:
        d = cluster_dir()
        kubeconfig = kubeconfig_path()
        return [
            str(kube_bin_dir() / "kube-controller-manager"),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            # Clients authenticate by token (TokenReview), so there is no client CA to look up.
            "--authentication-skip-lookup",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={d / 'serving.crt'}", f"--tls-private-key-file={d / 'serving.key'}",
            "--leader-elect=false",
            "--use-service-account-credentials=false",
            # Signs the long-lived tokens of kubernetes.io/service-account-token Secrets.
            f"--service-account-private-key-file={d / 'sa.key'}",
            f"--root-ca-file={d / 'ca.crt'}",
            # No cloud provider and no nodes: these would only report that there is nothing to do.
            "--controllers=*,-cloud-node-lifecycle-controller,-node-route-controller,-service-lb-controller,"
            "-node-ipam-controller,-node-lifecycle-controller,-taint-eviction-controller,"
            "-persistentvolume-attach-detach-controller,-ttl-controller",
        ]

    def ready(self) -> bool:
        return _https_get(f"https://127.0.0.1:{self.port}/healthz") == (200, b"ok")


def kube_services() -> list[Service]:
    """The control plane in start order (stop in reverse)."""
    return [Etcd(), KubeApiserver(), KubeControllerManager()]
