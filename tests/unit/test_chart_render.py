"""The Helm chart renders, lints and keeps its promises for every values file in charts/k2/ci/:
restricted Pod Security, resources and probes on every container, a PodDisruptionBudget and a
NetworkPolicy for every long-running pod, pinned images, and a values.schema.json that turns a
bad values file away with a message naming the field.

helm is built from the Go module proxy into the cache on first use (k2.stack.helm)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.stack import helm
from k2.stack.kafka import KAFKA_JVM_PERFORMANCE_OPTS

pytestmark = [pytest.mark.unit, pytest.mark.helm, pytest.mark.timeout(900, func_only=False)]

CHART = Path(__file__).resolve().parents[2] / "charts" / "k2"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
LONG_RUNNING = {"Deployment", "StatefulSet", "DaemonSet"}


def render(values: Path | None = None, **set_values: str) -> list[dict[str, Any]]:
    return helm.template(CHART, values=[values] if values else [], set_values=set_values)


@pytest.fixture(scope="module", params=CI_VALUES, ids=lambda p: p.stem)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload object, its pod template spec) for every workload kind."""
    for obj in objects:
        if obj["kind"] == "CronJob":
            yield obj, obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif obj["kind"] in WORKLOAD_KINDS:
            yield obj, obj["spec"]["template"]["spec"]


def ref(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector evaluated against labels (matchLabels + matchExpressions)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


# --- lint and render ------------------------------------------------------------------------
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_helm_lint_strict_passes(values: Path) -> None:
    proc = helm.lint(CHART, values=[values])

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[ERROR]" not in proc.stdout and "[WARNING]" not in proc.stdout, proc.stdout


def test_ci_values_cover_default_production_and_all_toggles() -> None:
    assert {p.stem for p in CI_VALUES} >= {"default-values", "production-values", "all-on-values"}


def test_every_object_is_namespaced_to_the_release_and_labelled(rendered: list[dict[str, Any]]) -> None:
    for obj in rendered:
        meta = obj["metadata"]
        labels = meta.get("labels", {})
        if obj["kind"] in ("IngestionPipeline", "IcebergTable", "QueryService"):
            continue  # custom resources keep the labels the operator's samples give them
        assert labels.get("app.kubernetes.io/part-of") == "k2", ref(obj)
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", ref(obj)
        assert labels.get("app.kubernetes.io/instance") == "k2", ref(obj)
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert meta.get("namespace"), f"{ref(obj)} has no namespace"


def test_object_names_are_unique_per_kind(rendered: list[dict[str, Any]]) -> None:
    seen = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in rendered]
    assert len(seen) == len(set(seen))


# --- security -------------------------------------------------------------------------------
def test_pods_and_containers_meet_restricted_pod_security(rendered: list[dict[str, Any]]) -> None:
    for obj, spec in pod_specs(rendered):
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, ref(obj)
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", ref(obj)
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), ref(obj)
        assert all("hostPath" not in v for v in spec.get("volumes", [])), ref(obj)
        for box in spec.get("initContainers", []) + spec["containers"]:
            ctx = box.get("securityContext", {})
            where = f"{ref(obj)} container {box['name']}"
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not ctx.get("capabilities", {}).get("add"), where
            assert not ctx.get("privileged"), where
            assert ctx.get("runAsNonRoot") is True, where
            assert ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault", where


def k2_image(objects: list[dict[str, Any]]) -> str:
    """The image of K2's own containers: the one the operator runs (and hands to workloads)."""
    operator = next(o for o in objects if o["kind"] == "Deployment"
                    and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")
    return operator["spec"]["template"]["spec"]["containers"][0]["image"]


def test_k2_containers_run_on_a_read_only_root_filesystem_with_writable_tmp(rendered: list[dict[str, Any]]) -> None:
    checked = 0
    for obj, spec in pod_specs(rendered):
        for box in spec["containers"]:
            if box["image"] != k2_image(rendered):
                continue
            checked += 1
            assert box["securityContext"]["readOnlyRootFilesystem"] is True, ref(obj)
            mounts = {m["mountPath"]: m["name"] for m in box.get("volumeMounts", [])}
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            assert "emptyDir" in volumes[mounts["/tmp"]], f"{ref(obj)}: /tmp must be an emptyDir"
            # The image's UID (Dockerfile: USER 10001) and the pod's must agree.
            assert spec["securityContext"]["runAsUser"] == 10001, ref(obj)
    assert checked, "no container runs the K2 image"


def test_only_the_operator_mounts_a_service_account_token(rendered: list[dict[str, Any]]) -> None:
    for obj, spec in pod_specs(rendered):
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        assert spec.get("automountServiceAccountToken") is (component == "operator"), ref(obj)


def test_every_container_has_resources_and_long_running_ones_have_probes(rendered: list[dict[str, Any]]) -> None:
    for obj, spec in pod_specs(rendered):
        for box in spec.get("initContainers", []) + spec["containers"]:
            where = f"{ref(obj)} container {box['name']}"
            resources = box.get("resources", {})
            assert {"cpu", "memory"} <= resources.get("requests", {}).keys(), where
            assert "memory" in resources.get("limits", {}), where
            if obj["kind"] in LONG_RUNNING:
                assert "livenessProbe" in box and "readinessProbe" in box, where


def test_probes_and_services_point_at_declared_ports(rendered: list[dict[str, Any]]) -> None:
    for obj, spec in pod_specs(rendered):
        for box in spec["containers"]:
            names = {p["name"] for p in box.get("ports", [])}
            numbers = {p["containerPort"] for p in box.get("ports", [])}
            for probe_name in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = box.get(probe_name, {})
                action = probe.get("httpGet") or probe.get("tcpSocket")
                if action:
                    port = action["port"]
                    assert port in names or port in numbers, f"{ref(obj)} {probe_name} port {port}"
    pods = [(obj["spec"]["template"]["metadata"]["labels"], spec) for obj, spec in pod_specs(rendered)]
    for svc in (o for o in rendered if o["kind"] == "Service"):
        backends = [spec for labels, spec in pods if selects({"matchLabels": svc["spec"]["selector"]}, labels)]
        assert backends, f"{ref(svc)} selects no pod"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert any(target in {p["name"] for c in spec["containers"] for p in c.get("ports", [])} |
                       {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
                       for spec in backends), f"{ref(svc)} port {target} is no container port"


def test_every_long_running_pod_has_a_disruption_budget(rendered: list[dict[str, Any]]) -> None:
    budgets = [o["spec"]["selector"] for o in rendered if o["kind"] == "PodDisruptionBudget"]
    for obj, _ in pod_specs(rendered):
        if obj["kind"] not in LONG_RUNNING:
            continue
        labels = obj["spec"]["template"]["metadata"]["labels"]
        single_node_store = obj["kind"] == "StatefulSet" and obj["spec"]["replicas"] == 1 and \
            labels["app.kubernetes.io/component"] in ("postgresql", "s3")
        if single_node_store:
            continue  # one-replica dev databases: a budget could only block drains, never protect
        assert any(selects(b, labels) for b in budgets), f"{ref(obj)} has no PodDisruptionBudget"
    for pdb in (o for o in rendered if o["kind"] == "PodDisruptionBudget"):
        assert "maxUnavailable" in pdb["spec"], f"{ref(pdb)}: minAvailable would block drains of one replica"


def test_every_pod_is_isolated_by_a_network_policy(rendered: list[dict[str, Any]]) -> None:
    policies = [o["spec"] for o in rendered if o["kind"] == "NetworkPolicy"]
    for obj, _ in pod_specs(rendered):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        if obj["kind"] == "Job":
            continue  # run-to-completion clients that accept no connections
        assert any("Ingress" in p["policyTypes"] and selects(p["podSelector"], labels) for p in policies), ref(obj)


def test_operator_egress_is_limited_to_dns_the_api_and_k2_services(rendered: list[dict[str, Any]]) -> None:
    operator_policy = next(o["spec"] for o in rendered if o["kind"] == "NetworkPolicy"
                           and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")

    assert "Egress" in operator_policy["policyTypes"]
    for rule in operator_policy["egress"]:
        assert rule.get("ports"), "an egress rule without ports would allow everything"


def test_images_are_pinned(rendered: list[dict[str, Any]]) -> None:
    for obj, spec in pod_specs(rendered):
        for box in spec["containers"]:
            image = box["image"]
            assert "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")), \
                f"{ref(obj)} image {image} is not pinned"


def test_workload_pods_do_not_get_service_link_variables(rendered: list[dict[str, Any]]) -> None:
    for obj, spec in pod_specs(rendered):
        assert spec.get("enableServiceLinks") is False, ref(obj)


# --- behaviour of individual values ---------------------------------------------------------------
def test_namespace_scope_passes_each_watched_namespace_to_the_operator() -> None:
    objects = render(**{"rbac.scope": "namespace", "operator.watchNamespaces[0]": "desk-a",
                        "operator.watchNamespaces[1]": "desk-b"})
    operator = next(o for o in objects if o["kind"] == "Deployment"
                    and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")

    assert {o["metadata"]["namespace"] for o in objects if o["kind"] == "RoleBinding"
            and not o["metadata"]["name"].endswith("-leader-election")} == {"desk-a", "desk-b"}
    assert operator["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "operator", "--namespace=desk-a", "--namespace=desk-b"]


def test_namespace_scope_defaults_to_the_release_namespace() -> None:
    objects = render(**{"rbac.scope": "namespace"})
    operator = next(o for o in objects if o["kind"] == "Deployment"
                    and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")

    assert operator["spec"]["template"]["spec"]["containers"][0]["args"] == ["operator", "--namespace=k2"]


def test_digest_wins_over_tag_and_reaches_the_workloads() -> None:
    digest = "sha256:" + "ab" * 32
    objects = render(**{"image.digest": digest, "image.tag": "ignored"})
    operator = next(o for o in objects if o["kind"] == "Deployment"
                    and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")
    box = operator["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in box["env"]}

    assert box["image"] == f"ghcr.io/k2-lakehouse/k2@{digest}"
    assert env["K2_OPERATOR_IMAGE"] == box["image"], "workloads must run the operator's own image"


def test_generated_credentials_agree_between_services_and_the_catalog_secret() -> None:
    objects = render()
    secrets = {o["metadata"]["name"]: o["stringData"] for o in objects if o["kind"] == "Secret"}
    catalog = secrets["k2-catalog"]

    assert f":{secrets['k2-postgresql']['password']}@" in catalog["catalog_uri"]
    assert catalog["s3_access_key"] == secrets["k2-s3"]["access-key"]
    assert catalog["s3_secret_key"] == secrets["k2-s3"]["secret-key"]


def test_kafka_quorum_lists_every_node_and_replication_follows_the_node_count() -> None:
    objects = render(**{"kafka.replicas": "3"})
    config = next(o for o in objects if o["kind"] == "ConfigMap"
                  and o["metadata"]["labels"]["app.kubernetes.io/component"] == "kafka")
    kafka = next(o for o in objects if o["kind"] == "StatefulSet"
                 and o["metadata"]["labels"]["app.kubernetes.io/component"] == "kafka")
    env = {e["name"]: e.get("value") for e in kafka["spec"]["template"]["spec"]["containers"][0]["env"]}
    properties = dict(line.split("=", 1) for line in config["data"]["server.properties"].splitlines()
                      if line and not line.startswith("#"))

    assert properties["controller.quorum.voters"] == ",".join(
        f"{i}@k2-kafka-{i}.k2-kafka-headless.k2.svc:9093" for i in range(3))
    assert properties["offsets.topic.replication.factor"] == "3"
    assert properties["transaction.state.log.min.isr"] == "2"
    assert len(env["CLUSTER_ID"]) == 22


def test_in_cluster_kafka_runs_with_the_local_stacks_gc_options() -> None:
    """The chart's broker and the local stack's (k2.stack.kafka) collect garbage alike: the
    options are given to the broker's `java`, not only declared."""
    kafka = next(o for o in render() if o["kind"] == "StatefulSet"
                 and o["metadata"]["labels"]["app.kubernetes.io/component"] == "kafka")
    box = kafka["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in box["env"]}

    assert env["KAFKA_JVM_PERFORMANCE_OPTS"].split() == list(KAFKA_JVM_PERFORMANCE_OPTS)
    broker_start = next(line for line in box["args"][0].splitlines() if "kafka.Kafka" in line)
    assert "$KAFKA_JVM_PERFORMANCE_OPTS" in broker_start


def test_third_party_containers_set_their_command_explicitly(rendered: list[dict[str, Any]]) -> None:
    """Kafka, the registry, PostgreSQL and the S3 server start by the chart's own command, so any
    image holding the program at the usual path works: upstream's by default, the images built
    on this machine (k2.stack.images) in kind-values.yaml. No image entrypoint is relied on."""
    checked = 0
    for obj, spec in pod_specs(rendered):
        for box in spec.get("initContainers", []) + spec["containers"]:
            if box["image"] == k2_image(rendered):
                assert box.get("command") or box.get("args"), f"{ref(obj)} {box['name']} says no k2 command"
                continue
            checked += 1
            assert box.get("command"), f"{ref(obj)} container {box['name']} relies on its image's entrypoint"
    assert checked or not any(o["kind"] == "StatefulSet" for o in rendered)


def test_external_registry_url_comes_from_a_secret() -> None:
    objects = render(**{"schemaRegistry.deploy": "false", "schemaRegistry.external.existingSecret": "sr",
                        "schemaRegistry.external.key": "url"})
    operator = next(o for o in objects if o["kind"] == "Deployment"
                    and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")
    env = {e["name"]: e for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}

    assert env["K2_REGISTRY_URL"]["valueFrom"]["secretKeyRef"] == {"name": "sr", "key": "url"}
    # …and tells the operator so, which then hands it to workloads by secretKeyRef, not in ConfigMaps.
    assert (env["K2_OPERATOR_REGISTRY_SECRET_NAME"]["value"], env["K2_OPERATOR_REGISTRY_SECRET_KEY"]["value"]) == (
        "sr", "url")
    assert not any(o["metadata"]["labels"]["app.kubernetes.io/component"] == "schema-registry"
                   for o in objects if o["kind"] == "Deployment")


@pytest.mark.parametrize(("set_values", "message"), [
    ({"kafka.deploy": "false"}, "kafka.deploy=false needs kafka.external.bootstrap"),
    ({"schemaRegistry.deploy": "false"}, "schemaRegistry.deploy=false needs schemaRegistry.external.url"),
    ({"s3.deploy": "false"}, "catalog.create=true builds the catalog Secret from the deployed PostgreSQL"),
], ids=["kafka", "registry", "catalog"])
def test_missing_external_endpoints_fail_with_the_value_to_set(set_values: dict[str, str], message: str) -> None:
    with pytest.raises(helm.StackError) as failed:
        render(**set_values)

    assert message in str(failed.value)


# --- values.schema.json ---------------------------------------------------------------------------
BAD_VALUES = {
    "operator": {"replicas": "two", "extraEnv": [{"name": "K2_KAFKA_BOOTSTRAP", "value": "x"}]},
    "rbac": {"scope": "everywhere"},
    "settings": {"log_level": "INFO", "kafka_bootstrap": "kafka:9092"},
    "containerSecurityContext": {"allowPrivilegeEscalation": True},
    "kafka": {"replicas": 0},
    "s3": {"bucket": "k2"},
    "monitoring": {"prometheusRule": {"thresholds": {"api5xxRatio": 5}}},
    "sampels": {"enabled": True},
}
EXPECTED_MESSAGES = [
    "at '/operator/replicas': got string, want integer",
    "at '/operator/extraEnv/0/name': 'not' failed",
    "at '/rbac/scope': value must be one of 'cluster', 'namespace'",
    "at '/settings': additional properties 'kafka_bootstrap' not allowed",
    "at '/containerSecurityContext/allowPrivilegeEscalation': value must be false",
    "at '/kafka/replicas': minimum: got 0, want 1",
    "at '/s3/bucket': 'k2' does not match pattern",
    "at '/monitoring/prometheusRule/thresholds/api5xxRatio': maximum: got 5, want 1",
    "at '': additional properties 'sampels' not allowed",
]


def test_schema_rejects_a_bad_values_file_naming_each_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text(yaml.safe_dump(BAD_VALUES))

    proc = helm.run_helm("template", "k2", str(CHART), "--values", str(bad))

    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    for message in EXPECTED_MESSAGES:
        assert message in proc.stderr, f"{message!r} not in:\n{proc.stderr}"


def test_schema_describes_every_default_value() -> None:
    """additionalProperties is false everywhere, so a value added to values.yaml without the schema
    fails to render; and every default satisfies its schema (the default render passes)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and node.get("type") == "object" and "properties" in node:
            for key, sub in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(sub, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")
    assert render()


def test_chart_description_names_the_object_store_it_deploys() -> None:
    description = yaml.safe_load((CHART / "Chart.yaml").read_text())["description"]

    assert "MinIO" not in description and "Versity S3 gateway" in description
