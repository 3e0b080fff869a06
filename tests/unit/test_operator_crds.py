"""The CRDs are generated from the Pydantic models: committed files match, the schemas are
structural, and the defaults, bounds, enums and CEL rules the models declare are really in them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.settings import Settings
from k2_operator import crds
from k2_operator.models import KINDS, IcebergTableSpec, IngestionPipelineSpec, QueryServiceSpec

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def spec_schema(plural: str) -> dict[str, Any]:
    body = next(c for c in crds.all_crds() if c["spec"]["names"]["plural"] == plural)
    return body["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every schema node (not every dict: a property may be called `properties`)."""
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += walk(node["additionalProperties"], f"{path}{{}}")
    for i, option in enumerate(node.get("anyOf", [])):
        found += walk(option, f"{path}|{i}")
    return found


def root_schema(body: dict[str, Any]) -> dict[str, Any]:
    return body["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crds_are_the_generated_ones() -> None:
    stale = crds.differences(REPO)
    assert not stale, f"regenerate with `python -m k2_operator.crds --write`: {stale}"


def test_check_mode_reports_a_hand_edit(tmp_path: Path) -> None:
    crds.write(tmp_path)
    edited = tmp_path / "charts/k2/crds/k2.io_queryservices.yaml"
    edited.write_text(edited.read_text().replace("default: 2", "default: 3"))

    assert crds.main(["--check", "--root", str(tmp_path)]) == 1
    assert crds.differences(tmp_path) == ["charts/k2/crds/k2.io_queryservices.yaml"]


def test_one_crd_per_file_with_names_status_and_printer_columns() -> None:
    files = sorted((REPO / "manifests/base/crds").glob("*.yaml"))
    assert [f.name for f in files] == ["k2.io_icebergtables.yaml", "k2.io_ingestionpipelines.yaml",
                                       "k2.io_queryservices.yaml"]
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 1
        crd = docs[0]
        version = crd["spec"]["versions"][0]
        assert crd["spec"]["group"] == "k2.io" and version["name"] == "v1alpha1"
        assert version["subresources"]["status"] == {}
        assert crd["spec"]["names"]["shortNames"] and crd["spec"]["names"]["categories"] == ["k2"]
        columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
        assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
        assert columns["Age"]["type"] == "date"


def test_schemas_are_structural() -> None:
    """No refs, no nullable unions, every node typed (or int-or-string), no additionalProperties: false."""
    for body in crds.all_crds():
        for path, node in walk(root_schema(body)):
            assert "$ref" not in node and "$defs" not in node and "title" not in node, path
            assert node.get("additionalProperties") is not False, path
            if "anyOf" in node:
                assert node.get("x-kubernetes-int-or-string") is True, path
            elif path != ".metadata" and not path.count("|"):
                assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
            if "properties" in node:
                assert node["type"] == "object", path


def test_defaults_and_bounds_come_from_the_workload_settings() -> None:
    consumer = spec_schema("ingestionpipelines")["properties"]["consumer"]["properties"]
    assert consumer["batchRows"]["default"] == Settings.model_fields["batch_rows"].default
    assert consumer["gapHalt"]["default"] == Settings.model_fields["gap_halt"].default
    assert consumer["batchSeconds"]["minimum"] == 0 and consumer["batchSeconds"]["exclusiveMinimum"] is True
    topics = spec_schema("ingestionpipelines")["properties"]["topics"]["properties"]
    assert topics["partitions"]["default"] == Settings.model_fields["topic_partitions"].default
    assert (topics["partitions"]["minimum"], topics["partitions"]["maximum"]) == (1, 1000)
    compat = spec_schema("ingestionpipelines")["properties"]["compatibility"]
    assert compat["enum"][0] == "BACKWARD" and "FULL_TRANSITIVE" in compat["enum"]
    assert "Defaults to BACKWARD" in compat["description"]


def test_required_fields_and_enums() -> None:
    assert spec_schema("ingestionpipelines")["required"] == ["exchange"]
    assert set(spec_schema("icebergtables")["required"]) == {"name", "schema"}
    assert spec_schema("queryservices")["required"] == ["tables"]
    table = spec_schema("icebergtables")["properties"]
    assert table["deletionPolicy"]["enum"] == ["Retain", "Delete"] and table["deletionPolicy"]["default"] == "Retain"
    assert spec_schema("queryservices")["properties"]["serviceType"]["enum"] == ["ClusterIP", "NodePort",
                                                                                  "LoadBalancer"]


def rules(node: dict[str, Any]) -> list[str]:
    return [r["rule"] for r in node.get("x-kubernetes-validations", [])]


def test_cel_rules_guard_identity_and_partition_growth() -> None:
    pipeline = spec_schema("ingestionpipelines")["properties"]
    assert "self == oldSelf" in rules(pipeline["exchange"])
    assert "self == oldSelf" in rules(pipeline["assetClass"])
    grow = pipeline["topics"]["properties"]["partitions"]["x-kubernetes-validations"][0]
    assert grow["rule"] == "self >= oldSelf"
    assert grow["message"].startswith("partitions may only grow")
    table = spec_schema("icebergtables")["properties"]
    assert "self == oldSelf" in rules(table["namespace"]) and "self == oldSelf" in rules(table["name"])
    assert any("oldSelf.all" in r for r in rules(table["schema"]["properties"]["fields"]))
    for crd in crds.all_crds():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert "size(self.metadata.name)" in root["x-kubernetes-validations"][0]["rule"]


def test_every_rule_has_a_message_for_people() -> None:
    for body in crds.all_crds():
        for path, node in walk(root_schema(body)):
            for rule in node.get("x-kubernetes-validations", []):
                assert rule.get("message") or rule.get("messageExpression"), (path, rule)


@pytest.mark.parametrize("info", KINDS, ids=lambda i: i.kind)
def test_every_spec_field_is_described(info) -> None:
    for path, node in walk(crds.model_schema(info.spec)):
        if path and not path.endswith(("[]", "{}")) and "|" not in path:
            assert node.get("description"), f"{info.kind}{path}"


def test_samples_validate_against_the_models() -> None:
    models = {"IngestionPipeline": IngestionPipelineSpec, "IcebergTable": IcebergTableSpec,
              "QueryService": QueryServiceSpec}
    seen = set()
    for path in sorted((REPO / "manifests/samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] == "k2.io/v1alpha1"
            models[doc["kind"]].model_validate(doc["spec"])
            seen.add(doc["kind"])
    assert seen == set(models)
