"""The packaging, checked by a real Kubernetes API server (the local stack's kube-apiserver with
etcd and kube-controller-manager, RBAC and Pod Security admission on):

* every object `helm template` renders (default, production-style, all-on and namespace-scope
  values), every `kubectl kustomize manifests/…` target and every file of manifests/samples/ is
  accepted by a server-side dry-run, after the CRDs (K2's, and minimal monitoring.coreos.com ones
  for ServiceMonitor/PodMonitor/PrometheusRule) are installed for real;
* applied for real in a namespace that enforces the restricted Pod Security Standard, every pod
  the chart runs is admitted (the controllers create them; without nodes they stay Pending);
* impersonating the operator's ServiceAccount, `kubectl auth can-i` allows every rule of
  `k2_operator.rbac` and refuses Secrets elsewhere and everything unrelated;
* `helm install --dry-run=server` renders NOTES.txt against the live cluster.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.stack import helm
from k2_operator import rbac

pytestmark = [pytest.mark.operator, pytest.mark.timeout(180, func_only=True)]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "k2"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUSTOMIZE_TARGETS = ["manifests/base", "manifests/overlays/dev", "manifests/overlays/kind"]
RUN = uuid.uuid4().hex[:6]
RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}

# Minimal Prometheus Operator CRDs: right group, kinds and scope, any spec accepted.
MONITORING_KINDS = {"ServiceMonitor": "servicemonitors", "PodMonitor": "podmonitors",
                    "PrometheusRule": "prometheusrules"}


def monitoring_crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                 "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                     "type": "object", "properties": {"spec": {"type": "object",
                                                               "x-kubernetes-preserve-unknown-fields": True}}}}}]},
    }


# --- helpers --------------------------------------------------------------------------------------
class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def __call__(self, *args: str, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=stdin,
                              capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        proc = self(*args, stdin=stdin)
        assert proc.returncode == 0, f"kubectl {' '.join(args)}:\n{proc.stderr}"
        return proc.stdout

    def dry_run(self, objects: list[dict[str, Any]]) -> subprocess.CompletedProcess:
        """Server-side dry run of all objects at once (kubectl reports each object's verdict)."""
        return self("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(objects), timeout=120)

    def can_i(self, verb: str, resource: str, *, namespace: str | None, as_user: str) -> bool:
        """`resource` is `plural[/subresource][.group]` (kubectl itself would read `a/b` as TYPE/NAME)."""
        scope = ["--all-namespaces"] if namespace == "*" else ["-n", namespace] if namespace else []
        plural, _, group = resource.partition(".")
        plural, _, subresource = plural.partition("/")
        target = f"{plural}.{group}" if group else plural
        extra = [f"--subresource={subresource}"] if subresource else []
        proc = self("auth", "can-i", verb, target, *extra, *scope, f"--as={as_user}")
        answer = proc.stdout.strip()
        assert answer in ("yes", "no"), f"can-i {verb} {resource}: {proc.stdout}{proc.stderr}"
        return answer == "yes"


def namespaces_of(objects: list[dict[str, Any]]) -> set[str]:
    return {o["metadata"]["namespace"] for o in objects if o["metadata"].get("namespace")}


def resource_name(api_group: str, resource: str) -> str:
    return f"{resource}.{api_group}" if api_group else resource


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kubectl(kube: Path) -> Kubectl:
    return Kubectl(kube)


@pytest.fixture(scope="module")
def crds(kubectl: Kubectl) -> None:
    """K2's CRDs from the chart, plus the minimal monitoring CRDs, installed and Established."""
    monitoring = [monitoring_crd(kind, plural) for kind, plural in MONITORING_KINDS.items()]
    kubectl.ok("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    kubectl.ok("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(monitoring))
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted((CHART / "crds").glob("*.yaml"))]
    names += [c["metadata"]["name"] for c in monitoring]
    kubectl.ok("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))


@pytest.fixture(scope="module")
def namespaces(kubectl: Kubectl, k2op: Any) -> Iterator[Callable[..., str]]:
    """Create namespaces on demand (restricted Pod Security), delete them at the end."""
    created: list[str] = []

    def phase(name: str) -> str | None:
        proc = kubectl("get", "namespace", name, "-o", "jsonpath={.status.phase}")
        return proc.stdout.strip() if proc.returncode == 0 else None

    def ensure(name: str, labels: dict[str, str] | None = None) -> str:
        # A fixed name (k2-system) may still be terminating from an earlier run: let it go first.
        k2op.wait_for(lambda: phase(name) != "Terminating", f"namespace {name} to finish terminating", timeout=120)
        if phase(name) is None:
            body = {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": {**RESTRICTED, **(labels or {})}}}
            kubectl.ok("create", "-f", "-", stdin=json.dumps(body))
            created.append(name)
        return name

    yield ensure
    for name in created:
        kubectl("delete", "namespace", name, "--wait=false")


def chart_cases() -> list[tuple[str, list[Path], dict[str, str]]]:
    # Namespaces a values file names outside the release (the dashboard's) get this run's name.
    cases = [(p.stem, [p], {"monitoring.grafanaDashboard.namespace": f"k2t-{RUN}-monitoring"}) for p in CI_VALUES]
    cases.append(("namespace-scope", [CHART / "ci" / "all-on-values.yaml"],
                  {"rbac.scope": "namespace", "operator.watchNamespaces[0]": f"k2t-{RUN}-desk"}))
    return cases


# --- server-side dry runs -------------------------------------------------------------------------
@pytest.mark.parametrize(("case", "values", "set_values"), chart_cases(), ids=[c[0] for c in chart_cases()])
def test_every_rendered_object_passes_a_server_side_dry_run(
        kubectl: Kubectl, crds: None, namespaces: Callable[..., str], case: str, values: list[Path],
        set_values: dict[str, str]) -> None:
    release_ns = f"k2t-{RUN}-{case}"[:63]
    objects = helm.template(CHART, release=f"r{RUN}", namespace=release_ns, values=values, set_values=set_values)
    for name in namespaces_of(objects):
        namespaces(name)

    proc = kubectl.dry_run(objects)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(objects), proc.stdout
    assert "would violate PodSecurity" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_kustomize_targets_pass_a_server_side_dry_run(kubectl: Kubectl, crds: None,
                                                      namespaces: Callable[..., str], target: str) -> None:
    objects = [d for d in yaml.safe_load_all(kubectl.ok("kustomize", str(REPO / target))) if d]
    namespace = next(o for o in objects if o["kind"] == "Namespace")
    # The Namespace is part of the target; a dry run cannot create it for the objects inside it.
    namespaces(namespace["metadata"]["name"], namespace["metadata"].get("labels"))

    proc = kubectl.dry_run(objects)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(server dry run)") == len(objects), proc.stdout
    assert "would violate PodSecurity" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("sample", sorted((REPO / "manifests" / "samples").glob("*.yaml")), ids=lambda p: p.name)
def test_samples_pass_a_server_side_dry_run(kubectl: Kubectl, crds: None, namespaces: Callable[..., str],
                                            sample: Path) -> None:
    namespace = namespaces(f"k2t-{RUN}-samples")

    proc = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(sample))

    assert proc.returncode == 0, proc.stderr


def test_server_rejects_an_invalid_sample(kubectl: Kubectl, crds: None, namespaces: Callable[..., str]) -> None:
    """The dry runs above are meaningful: the CRD schemas do reject bad specs."""
    namespace = namespaces(f"k2t-{RUN}-samples")
    bad = next(d for d in yaml.safe_load_all((REPO / "manifests/samples/k2_v1alpha1_queryservice.yaml").read_text())
               if d)
    bad["spec"]["replicas"] = -1

    proc = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(bad))

    assert proc.returncode != 0
    assert "spec.replicas" in proc.stderr


# --- restricted Pod Security, for real ------------------------------------------------------------
def test_restricted_pod_security_admits_every_pod_the_chart_runs(kubectl: Kubectl, crds: None,
                                                                  namespaces: Callable[..., str], k2op: Any) -> None:
    namespace = namespaces(f"k2t-{RUN}-psa")
    objects = helm.template(CHART, release=f"p{RUN}", namespace=namespace,
                            values=[CHART / "ci" / "all-on-values.yaml"])
    workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "Job")]
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(objects))

    def pods_created() -> bool:
        pods = json.loads(kubectl.ok("get", "pods", "-n", namespace, "-o", "json"))["items"]
        components = {p["metadata"]["labels"].get("app.kubernetes.io/component") for p in pods}
        return all(w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] in components
                   for w in workloads)

    try:
        k2op.wait_for(pods_created, "the controllers to create a pod of every workload", timeout=90)
    except AssertionError:
        events = kubectl.ok("get", "events", "-n", namespace, "--field-selector", "type=Warning")
        raise AssertionError(f"some pods were not admitted:\n{events}") from None
    events = kubectl.ok("get", "events", "-n", namespace, "-o", "json")
    refused = [e["message"] for e in json.loads(events)["items"] if "violates PodSecurity" in e.get("message", "")]
    assert not refused, refused


def test_restricted_pod_security_is_really_enforced(kubectl: Kubectl, namespaces: Callable[..., str]) -> None:
    """The two checks above are meaningful: a pod with the default (baseline) security context is
    warned about and refused."""
    namespace = namespaces(f"k2t-{RUN}-psa")
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unrestricted", "namespace": namespace},
           "spec": {"containers": [{"name": "c", "image": "busybox:1.37"}]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "unrestricted",
                                                                             "namespace": namespace},
                  "spec": {"selector": {"matchLabels": {"app": "p"}}, "template": {
                      "metadata": {"labels": {"app": "p"}}, "spec": pod["spec"]}}}

    assert "would violate PodSecurity" in kubectl.dry_run([deployment]).stderr
    refused = kubectl("apply", "-f", "-", stdin=json.dumps(pod))
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr


# --- RBAC, impersonating the operator -------------------------------------------------------------
@pytest.fixture(scope="module")
def operator_account(kubectl: Kubectl, crds: None, namespaces: Callable[..., str]) -> tuple[str, str, str]:
    """The chart's RBAC (cluster scope) applied for real; returns (namespace, user, other namespace)."""
    namespace = namespaces(f"k2t-{RUN}-rbac")
    other = namespaces(f"k2t-{RUN}-other")
    objects = helm.template(CHART, release="k2", namespace=namespace)
    rbac_objects = [o for o in objects if o["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                                        "Role", "RoleBinding")]
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac_objects))
    account = next(o for o in rbac_objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
    yield namespace, f"system:serviceaccount:{namespace}:{account}", other
    for obj in rbac_objects:
        if obj["kind"].startswith("Cluster"):
            kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--wait=false")


def check_all(kubectl: Kubectl, user: str, checks: list[tuple[str, str, str | None]]) -> dict[tuple, bool]:
    with ThreadPoolExecutor(max_workers=6) as pool:
        answers = pool.map(lambda c: kubectl.can_i(c[0], c[1], namespace=c[2], as_user=user), checks)
        return dict(zip(checks, answers, strict=True))


def test_operator_can_do_everything_reconciliation_needs(kubectl: Kubectl,
                                                         operator_account: tuple[str, str, str]) -> None:
    namespace, user, _ = operator_account
    checks = []
    for rule in rbac.NAMESPACED_RULES:
        for group in rule.api_groups:
            for resource in rule.resources:
                checks += [(verb, resource_name(group, resource), namespace) for verb in rule.verbs]
    for rule in rbac.CLUSTER_RULES:
        for group in rule.api_groups:
            for resource in rule.resources:
                checks += [(verb, resource_name(group, resource), None) for verb in rule.verbs]

    answers = check_all(kubectl, user, checks)

    assert not [c for c, allowed in answers.items() if not allowed], "denied what k2_operator.rbac needs"
    assert len(checks) > 50


def test_operator_cannot_read_secrets_elsewhere_or_touch_unrelated_resources(
        kubectl: Kubectl, operator_account: tuple[str, str, str]) -> None:
    namespace, user, other = operator_account
    forbidden = [
        ("get", "secrets", other), ("list", "secrets", namespace), ("watch", "secrets", namespace),
        ("list", "secrets", "*"), ("get", "secrets", "*"), ("create", "secrets", namespace),
        ("delete", "secrets", namespace),
        ("create", "pods", namespace), ("create", "pods/exec", namespace), ("get", "pods/log", namespace),
        ("update", "deployments.apps", namespace), ("create", "daemonsets.apps", namespace),
        ("create", "statefulsets.apps", namespace), ("create", "serviceaccounts", namespace),
        ("create", "serviceaccounts/token", namespace), ("create", "persistentvolumeclaims", namespace),
        ("create", "networkpolicies.networking.k8s.io", namespace),
        ("create", "roles.rbac.authorization.k8s.io", namespace),
        ("create", "rolebindings.rbac.authorization.k8s.io", namespace),
        ("create", "clusterroles.rbac.authorization.k8s.io", None),
        ("bind", "clusterroles.rbac.authorization.k8s.io", None),
        ("escalate", "clusterroles.rbac.authorization.k8s.io", None),
        ("impersonate", "users", None), ("impersonate", "serviceaccounts", namespace),
        ("create", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("delete", "customresourcedefinitions.apiextensions.k8s.io", None),
        ("create", "namespaces", None), ("delete", "namespaces", None), ("get", "nodes", None),
        ("create", "certificatesigningrequests.certificates.k8s.io", None),
        ("create", "mutatingwebhookconfigurations.admissionregistration.k8s.io", None),
        ("create", "prometheusrules.monitoring.coreos.com", namespace),
        ("delete", "icebergtables.k2.io", namespace), ("create", "queryservices.k2.io", namespace),
    ]

    answers = check_all(kubectl, user, forbidden)

    assert not [c for c, allowed in answers.items() if allowed], "allowed beyond k2_operator.rbac"


def test_namespace_scope_confines_the_operator_to_its_watched_namespaces(
        kubectl: Kubectl, crds: None, namespaces: Callable[..., str]) -> None:
    home = namespaces(f"k2t-{RUN}-nshome")
    watched = namespaces(f"k2t-{RUN}-nswatch")
    other = namespaces(f"k2t-{RUN}-nsother")
    objects = helm.template(CHART, release=f"n{RUN}", namespace=home,
                            set_values={"rbac.scope": "namespace", "operator.watchNamespaces[0]": watched})
    rbac_objects = [o for o in objects if o["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                                        "Role", "RoleBinding")]
    kubectl.ok("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac_objects))
    account = next(o for o in rbac_objects if o["kind"] == "ServiceAccount")["metadata"]["name"]
    user = f"system:serviceaccount:{home}:{account}"
    try:
        answers = check_all(kubectl, user, [
            ("create", "deployments.apps", watched), ("get", "secrets", watched),
            ("watch", "ingestionpipelines.k2.io", watched), ("list", "customresourcedefinitions", None),
            ("create", "deployments.apps", other), ("get", "secrets", other), ("get", "secrets", home),
            ("watch", "ingestionpipelines.k2.io", other), ("create", "deployments.apps", home),
        ])
    finally:
        for obj in rbac_objects:
            if obj["kind"].startswith("Cluster"):
                kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--wait=false")

    assert [allowed for allowed in answers.values()] == [True] * 4 + [False] * 5


# --- helm against the live cluster ----------------------------------------------------------------
def test_helm_install_dry_run_renders_the_notes(kube: Path, crds: None, namespaces: Callable[..., str]) -> None:
    namespace = namespaces(f"k2t-{RUN}-helm")

    proc = helm.run_helm("install", f"h{RUN}", str(CHART), "--namespace", namespace, "--kubeconfig", str(kube),
                         "--dry-run=server", "--set", "samples.enabled=true")

    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {namespace} rollout status deployment/h{RUN}-k2-operator" in notes
    assert "kubectl -n" in notes and "/v1/symbols" in notes
    assert "{{" not in notes and "<no value>" not in notes
    # K2 stores keys only as digests: the notes make a key and store its digest, never read a key back.
    assert "KEY=$(k2 api-key --id samples --stream 2>api-keys.yaml)" in notes
    assert f"kubectl -n {namespace} create secret generic k2-api-keys --from-file=api_keys=api-keys.yaml" in notes
    assert "get secret" not in notes
