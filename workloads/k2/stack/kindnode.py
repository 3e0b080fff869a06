"""kind, and a kind node image for the local stack's Kubernetes version, built on this machine.

No image registry is needed: everything comes from Debian packages and the Go module proxy.

- `kind_binary()`: `sigs.k8s.io/kind` (KIND_VERSION) built with `go install` into the cache.
- `node_image()`: `k2.local/kind-node:<kubernetes version>-<key>`, laid out like kind's own node
  images (kind's `images/base` and `pkg/build/nodeimage`, read from the kind module):
  - a Debian root filesystem (`k2.stack.docker.debian_image`) with systemd, containerd, runc
    and the CNI plugins from Debian, plus kind's `images/base/files` (entrypoint, systemd units,
    containerd config) taken from the kind module, adapted to Debian's containerd 1.6;
  - kubelet, kubeadm and kubectl from the same `k8s.io/kubernetes` build (wrapper module
    `kube/kubernetes`, same Go build cache) as the local stack's kube-apiserver; crictl from
    `sigs.k8s.io/cri-tools`;
  - the images `kubeadm config images list` names (apiserver, controller-manager, scheduler,
    kube-proxy, etcd, CoreDNS, pause), each built here from its module (pause from the C source
    in the kubernetes module, static) and tagged exactly as kubeadm expects, plus the default CNI
    and storage add-ons of /kind/manifests; all preloaded into the node's containerd store the
    way kind's node-image builder does it (containerd inside a build container, `ctr import`).

Two deviations from kind's images, both because the source is not on the module proxy: etcd is
the local stack's etcd build (same minor as kubeadm's, a newer patch) tagged with kubeadm's etcd
tag; and the default CNI is K2's small route agent (`kindnode/kindnet-routes.sh`: ptp +
host-local per node, routes to the other nodes' podCIDRs) instead of kindnetd, which is a nested
module of kind's repository that the proxy does not serve.

Binaries are cached under `cache_dir()/kind-node-<kubernetes version>/`; images live in the
Docker engine (k2.stack.docker). `python -m k2.stack.kindnode` builds what is missing and prints
the node image.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

from . import docker, kube
from .base import StackError, cache_dir, run, run_logged
from .images import module_dir

log = structlog.get_logger("k2.stack.kindnode")

KIND_VERSION = os.environ.get("K2_KIND_VERSION", "v0.30.0")
CRICTL = ("sigs.k8s.io/cri-tools/cmd/crictl", "v1.34.0")
LOCAL_PATH_PROVISIONER = ("github.com/rancher/local-path-provisioner", "v0.0.30")
COREDNS_MODULE = "github.com/coredns/coredns"
NODE_BINARIES = ("kubelet", "kubeadm", "kubectl")
KUBE_IMAGES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy")
FILES = Path(__file__).with_name("kindnode")
BUILD_TIMEOUT = 3600.0
# Bump when the node image is assembled differently from the same inputs.
NODE_FORMAT = 1
LABEL = "k2.kindnode.key"

# What kind's images/base installs, minus what only rootless/NFS/iSCSI setups use; plus Debian's
# containerd, runc and CNI plugins where kind builds its own.
NODE_PACKAGES = [
    "systemd", "dbus", "conntrack", "iptables", "nftables", "iproute2", "ethtool", "util-linux", "mount",
    "kmod", "libseccomp2", "pigz", "bash", "ca-certificates", "curl", "jq", "procps",
    "containerd", "runc", "containernetworking-plugins",
]
# The base of the component images: a shell, iptables/conntrack for kube-proxy and the CNI agent,
# busybox (wget, httpd, nc) for probes and tests.
RUNTIME_PACKAGES = ["iptables", "conntrack", "iproute2", "ca-certificates", "busybox"]
PATH_ENV = "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _go() -> str:
    go = shutil.which("go", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/local/go/bin")
    if not go:
        raise StackError("`go` is not on PATH: install Go >= 1.26 (K2 builds kind and its node image from Go modules)")
    return go


def _go_env() -> dict[str, str]:
    return {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": f"{os.environ.get('GOFLAGS', '')} -trimpath".strip(),
            "HOME": os.environ.get("HOME", str(Path.home()))}


def go_installed(version: str, binary: str) -> Path:
    return cache_dir() / f"{binary}-{version.removeprefix('v')}" / "bin" / binary


def go_install(package: str, version: str, binary: str) -> Path:
    """`go install package@version` into cache_dir()/<binary>-<version>/bin once; returns the binary."""
    target = go_installed(version, binary)
    bin_dir = target.parent
    if target.exists():
        return target
    bin_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(bin_dir.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=bin_dir.parent) as out:
            started = time.monotonic()
            run_logged(["nice", _go(), "install", "-v", "-ldflags=-s -w", f"{package}@{version}"], cwd=out,
                       env={**_go_env(), "GOBIN": out}, log_path=bin_dir.parent / "build.log",
                       what=f"go install {package}@{version}", timeout=BUILD_TIMEOUT)
            bin_dir.mkdir(exist_ok=True)
            built = Path(out) / Path(package).name
            os.replace(built if built.exists() else Path(out) / binary, target)
        log.info("kindnode.built", package=package, version=version, seconds=round(time.monotonic() - started))
    return target


def kind_binary() -> Path:
    """kind from PATH if it is there, else built from the module proxy."""
    return kind_if_present() or go_install("sigs.k8s.io/kind", KIND_VERSION, "kind")


def kind_if_present() -> Path | None:
    found = shutil.which("kind")
    cached = go_installed(KIND_VERSION, "kind")
    return Path(found) if found else cached if cached.exists() else None


# binaries ----------------------------------------------------------------------------------
def kube_binaries() -> Path:
    """kubelet, kubeadm, kubectl, kube-scheduler and kube-proxy beside the stack's apiserver."""
    kube.install_kubernetes(("kube-apiserver", "kube-controller-manager"))
    return kube.install_kubernetes((*NODE_BINARIES, "kube-scheduler", "kube-proxy"))


def pause_binary() -> Path:
    """pause from build/pause/linux/pause.c of the kubernetes module, static, as upstream builds it."""
    version = kube.kubernetes_version()
    target = cache_dir() / f"kind-node-{version.removeprefix('v')}" / "bin" / "pause"
    if target.exists():
        return target
    source = module_dir("k8s.io/kubernetes", version) / "build" / "pause" / "linux" / "pause.c"
    gcc = shutil.which("gcc")
    if not gcc:
        raise StackError("`gcc` is not on PATH: install gcc (the pause image is built from its C source)")
    target.parent.mkdir(parents=True, exist_ok=True)
    pause_version = required_images()["pause"].rsplit(":", 1)[1]
    run([gcc, "-Os", "-Wall", "-Werror", "-static", f'-DVERSION=v{pause_version}-k2', "-o", f"{target}.tmp",
         str(source)], what="gcc pause.c", timeout=300)
    run(["strip", f"{target}.tmp"], what="strip pause", timeout=60)
    os.replace(f"{target}.tmp", target)
    return target


def required_images() -> dict[str, str]:
    """What kubeadm of this version pulls, by short name: {"kube-apiserver": "registry.k8s.io/…:v1.34.4", …}."""
    kubeadm = kube_binaries() / "kubeadm"
    proc = run([str(kubeadm), "config", "images", "list", "--kubernetes-version", kube.kubernetes_version()],
               what="kubeadm config images list", timeout=120)
    images = {}
    for line in proc.stdout.split():
        name = line.rsplit(":", 1)[0].rsplit("/", 1)[1]
        images[name] = line
    missing = {*KUBE_IMAGES, "etcd", "coredns", "pause"} - set(images)
    if missing:
        raise StackError(f"kubeadm config images list did not name {sorted(missing)}: {proc.stdout}")
    return images


# images ------------------------------------------------------------------------------------
def runtime_base() -> str:
    return docker.debian_image("k2.local/kind/runtime-base:bookworm", RUNTIME_PACKAGES, changes=[PATH_ENV])


def build_image(tag: str, binaries: dict[str, Path], entrypoint: list[str] | None = None,
                base: str | None = None) -> str:
    """An image FROM the runtime base with `binaries` ({path in image: file}); built unless `tag`
    already holds exactly these files."""
    base = base or runtime_base()
    with tempfile.TemporaryDirectory() as context:
        lines = [f"FROM {base}"]
        for index, (inside, source) in enumerate(sorted(binaries.items())):
            shutil.copy(source, Path(context) / f"f{index}")
            (Path(context) / f"f{index}").chmod(0o755)  # all of them are programs
            lines.append(f"COPY f{index} {inside}")
        if entrypoint:
            lines.append(f"ENTRYPOINT {json.dumps(entrypoint)}")
        (Path(context) / "Dockerfile").write_text("\n".join(lines) + "\n")
        run(["docker", "build", "-q", "-t", tag, context], env={"DOCKER_BUILDKIT": "0"},
            what=f"docker build {tag}", timeout=900)
    return tag


def programs() -> dict[str, Path]:
    """Every program of the node and its images, compiled here (no engine needed): {name: binary}."""
    required = required_images()
    bins = kube_binaries()
    kube.go_build(kube.GO_MODULES / "etcd", ["."], kube.etcd_bin_dir(), ["etcd"])
    return {**{name: bins / name for name in (*KUBE_IMAGES, *NODE_BINARIES)},
            "etcd": kube.etcd_bin_dir() / "etcd",
            "coredns": go_install(COREDNS_MODULE, required["coredns"].rsplit(":", 1)[1], "coredns"),
            "pause": pause_binary(),
            "local-path-provisioner": go_install(*LOCAL_PATH_PROVISIONER, "local-path-provisioner"),
            "crictl": go_install(*CRICTL, "crictl"),
            "kind": kind_binary()}


def component_images(binary: dict[str, Path]) -> dict[str, str]:
    """Build every image the node preloads from `binary` (programs()); returns {short name: tag}."""
    required = required_images()
    tags = {name: build_image(required[name], {f"/usr/local/bin/{name}": binary[name]}) for name in KUBE_IMAGES}
    tags["etcd"] = build_image(required["etcd"], {"/usr/local/bin/etcd": binary["etcd"]})
    tags["coredns"] = build_image(required["coredns"], {"/coredns": binary["coredns"]}, ["/coredns"])
    tags["pause"] = build_image(required["pause"], {"/pause": binary["pause"]}, ["/pause"])
    tags["local-path-provisioner"] = build_image(
        f"k2.local/kind/local-path-provisioner:{LOCAL_PATH_PROVISIONER[1]}",
        {"/usr/local/bin/local-path-provisioner": binary["local-path-provisioner"]})
    tags["local-path-helper"] = runtime_base()
    tags["kindnet"] = build_image(f"k2.local/kind/kindnet-routes:{kube.kubernetes_version()}-{NODE_FORMAT}",
                                  {"/usr/local/bin/kubectl": binary["kubectl"],
                                   "/usr/local/bin/kindnet-routes": FILES / "kindnet-routes.sh"})
    return tags


def manifests(tags: dict[str, str]) -> dict[str, str]:
    cni = (FILES / "default-cni.yaml").read_text().replace("@IMAGE@", tags["kindnet"])
    storage = ((FILES / "default-storage.yaml").read_text()
               .replace("@PROVISIONER_IMAGE@", tags["local-path-provisioner"])
               .replace("@HELPER_IMAGE@", tags["local-path-helper"]))
    return {"default-cni.yaml": cni, "default-storage.yaml": storage}


# node image --------------------------------------------------------------------------------
def _containerd_config(kind_files: Path, pause_image: str) -> str:
    """kind's containerd config for Debian's containerd 1.6: no fuse-overlayfs proxy plugin
    (rootless only), and the sandbox image kubeadm of this version expects."""
    config = (kind_files / "etc/containerd/config.toml").read_text()
    config = re.sub(r'\[proxy_plugins\][^\[]*\[proxy_plugins\."fuse-overlayfs"\][^\[]*', "", config)
    return re.sub(r'sandbox_image = "[^"]*"', f'sandbox_image = "{pause_image}"', config)


def _node_base_dockerfile(rootfs_image: str) -> str:
    # The same steps as kind's images/base Dockerfile, on Debian's containerd/runc/CNI plugins.
    return f"""FROM {rootfs_image}
COPY files/ /
COPY bin/ /usr/bin/
RUN chmod 755 /kind/bin /kind/bin/* /usr/local/bin/* /usr/bin/kube* /usr/bin/crictl \\
 && find /lib/systemd/system/sysinit.target.wants/ -name systemd-tmpfiles-setup.service -delete \\
 && rm -f /lib/systemd/system/multi-user.target.wants/* /etc/systemd/system/*.wants/* \\
    /lib/systemd/system/local-fs.target.wants/* /lib/systemd/system/sockets.target.wants/*udev* \\
    /lib/systemd/system/sockets.target.wants/*initctl* /lib/systemd/system/basic.target.wants/* \\
 && echo ReadKMsg=no >> /etc/systemd/journald.conf \\
 && ln -sf "$(command -v systemd || echo /lib/systemd/systemd)" /sbin/init \\
 && ln -sf /usr/bin/containerd /usr/local/bin/containerd \\
 && mkdir -p /opt/cni/bin /etc/kubernetes/manifests && ln -sf /usr/lib/cni/* /opt/cni/bin/ \\
 && systemctl enable kubelet.service containerd.service undo-mount-hacks.service \\
 && systemctl mask systemd-binfmt.service \\
 && ctr oci spec \\
    | jq '.hooks.createContainer += [{{"path": "/kind/bin/mount-product-files.sh"}}]' \\
    | jq 'del(.process.rlimits)' > /etc/containerd/cri-base.json
ENV container=docker
STOPSIGNAL SIGRTMIN+3
ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]
"""


def node_image_tag() -> str:
    version = kube.kubernetes_version()
    return f"k2.local/kind-node:{version}-k{NODE_FORMAT}-kind{KIND_VERSION.removeprefix('v')}"


def node_key() -> str:
    """What the node image is made of: versions, packages and the files of kindnode/."""
    digest = hashlib.sha256(json.dumps([NODE_FORMAT, KIND_VERSION, kube.kubernetes_version(), CRICTL,
                                        LOCAL_PATH_PROVISIONER, NODE_PACKAGES, RUNTIME_PACKAGES]).encode())
    for path in sorted(FILES.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def node_image() -> str:
    """The node image's tag, building it (and whatever it needs) unless the engine holds it with
    the current node_key()."""
    tag = node_image_tag()
    docker.ensure_engine()
    key = node_key()
    if docker.image_label(tag, LABEL) == key:
        return tag
    started = time.monotonic()
    replaced = subprocess.run(["docker", "image", "inspect", "--format", "{{.Id}}", tag], capture_output=True,
                              text=True, timeout=60).stdout.strip()
    binary = programs()
    tags = component_images(binary)
    kind_files = module_dir("sigs.k8s.io/kind", KIND_VERSION) / "images" / "base" / "files"
    rootfs = docker.debian_image("k2.local/kind/node-rootfs:bookworm", NODE_PACKAGES, changes=[PATH_ENV])
    with tempfile.TemporaryDirectory() as context:
        files = Path(context) / "files"
        shutil.copytree(kind_files, files)
        shutil.rmtree(files / "LICENSES", ignore_errors=True)
        (files / "etc/containerd/config.toml").write_text(_containerd_config(kind_files, tags["pause"]))
        (files / "kind/version").write_text(kube.kubernetes_version())
        (files / "kind/manifests").mkdir(parents=True)
        for name, text in manifests(tags).items():
            (files / "kind/manifests" / name).write_text(text)
        (Path(context) / "bin").mkdir()
        for name in (*NODE_BINARIES, "crictl"):
            shutil.copy2(binary[name], Path(context) / "bin" / name)
        (Path(context) / "Dockerfile").write_text(_node_base_dockerfile(rootfs))
        prepared = f"{tag}-prepared"
        run(["docker", "build", "-q", "-t", prepared, context], env={"DOCKER_BUILDKIT": "0"},
            what="docker build of the node image's base", timeout=1800)
    _preload(prepared, tag, key, sorted(set(tags.values())))
    run(["docker", "rmi", prepared], what="docker rmi", timeout=300)
    if replaced:  # the node image of an older key: 1.5 GB nobody names any more (kept while a node uses it)
        subprocess.run(["docker", "rmi", replaced], capture_output=True, timeout=300)
    log.info("kindnode.image_built", tag=tag, seconds=round(time.monotonic() - started))
    return tag


def _preload(prepared: str, tag: str, key: str, images: list[str]) -> None:
    """kind's node-image builder: containerd in a container of the image, `ctr import` of every
    image, then `docker commit`."""
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        archive = Path(tmp) / "images.tar"
        run(["docker", "save", "-o", str(archive), *images], what="docker save", timeout=1800)
        name = f"k2-kind-build-{os.getpid()}"
        run(["docker", "run", "-d", "--name", name, "--entrypoint", "sleep", "--security-opt", "seccomp=unconfined",
             "-v", f"{archive}:/kind/images.tar:ro", prepared, "infinity"], what="docker run build container",
            timeout=300)
        try:
            def sh(script: str, what: str) -> None:
                run(["docker", "exec", name, "bash", "-c", script], what=what, timeout=1800)

            sh("nohup containerd > /var/log/containerd-build.log 2>&1 &", "start containerd")
            sh("for i in $(seq 60); do ctr version >/dev/null 2>&1 && exit 0; sleep 1; done; "
               "cat /var/log/containerd-build.log; exit 1", "wait for containerd")
            # (Debian's ctr 1.6 has no --label for import, and its CRI ignores the pinned label anyway)
            sh("ctr --namespace=k8s.io images import --all-platforms --no-unpack --digests /kind/images.tar",
               "ctr images import")
            listed = subprocess.run(["docker", "exec", name, "ctr", "--namespace=k8s.io", "images", "list", "-q"],
                                    capture_output=True, text=True, timeout=120).stdout.split()
            missing = [i for i in images if i not in listed and f"docker.io/{i}" not in listed]
            if missing:
                raise StackError(f"the node's containerd lacks {missing} after import; it lists {listed}")
            sh("pkill containerd; for i in $(seq 30); do ctr version >/dev/null 2>&1 || exit 0; sleep 1; done; exit 1",
               "stop containerd")
            run(["docker", "commit", "--change", f"LABEL {LABEL}={key}",
                 "--change", 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]',
                 "--change", 'ENV HTTP_PROXY="" HTTPS_PROXY="" NO_PROXY=""', name, tag], what="docker commit",
                timeout=1800)
        finally:
            subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, timeout=300)


def main(argv: list[str]) -> str:
    """`python -m k2.stack.kindnode [kind|kubectl]`: build the node image (or that binary), print it."""
    if argv == ["kind"]:
        return str(kind_binary())
    if argv == ["kubectl"]:
        return str(kube_binaries() / "kubectl")
    return node_image()


if __name__ == "__main__":
    print(main(sys.argv[1:]))
