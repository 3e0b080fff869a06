"""The chart's sample resources are manifests/samples/ for a release: the same specs, except the
fields the chart takes from values (source, replication, catalog, replicas, Ingress), and every
spec is valid for the operator's models."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.api.auth import digest, parse
from k2.sources import SOURCES
from k2.sources.base import FolderSource
from k2.stack import helm
from k2_operator.models import KINDS

pytestmark = [pytest.mark.unit, pytest.mark.helm]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "k2"
SAMPLE_KEY = "k2_the-samples-key"
SPECS = {info.kind: info.spec for info in KINDS}
FOLDER_SOURCES = [name for name, source in SOURCES.items() if isinstance(source, FolderSource)]
# What the chart sets from values instead of copying: (kind, dotted path).
FROM_VALUES = {
    ("IngestionPipeline", "source"), ("IngestionPipeline", "topics.replicationFactor"),
    ("QueryService", "replicas"), ("QueryService", "ingress"),
    ("IcebergTable", "catalogRef"),
}


def chart_samples(**set_values: str) -> dict[tuple[str, str], dict[str, Any]]:
    objects = helm.template(CHART, set_values={"samples.enabled": "true", **set_values})
    return {(o["kind"], o["metadata"]["name"]): o for o in objects if o["apiVersion"].startswith("k2.io/")}


def manifest_samples() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for path in sorted((REPO / "manifests" / "samples").glob("*.yaml"))
            for d in yaml.safe_load_all(path.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def without(spec: dict[str, Any], kind: str) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    for owner, path in FROM_VALUES:
        if owner != kind:
            continue
        *parents, leaf = path.split(".")
        node = spec
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return spec


def test_chart_samples_are_the_manifest_samples() -> None:
    chart, manifests = chart_samples(), manifest_samples()

    assert {k for k, _ in chart} == {"IngestionPipeline", "IcebergTable", "QueryService"}
    for key, obj in chart.items():
        assert key in manifests, f"{key} is not in manifests/samples/"
        assert without(obj["spec"], key[0]) == without(manifests[key]["spec"], key[0]), key


@pytest.mark.parametrize("set_values", [
    {}, {"samples.source.type": "asx-csv", "samples.source.asxCsv.claimName": "asx-data"},
    {"kafka.replicas": "3", "samples.ingress.className": "nginx", "samples.ingress.tlsSecret": "tls"},
], ids=["synthetic", "asx-csv", "tls"])
def test_chart_samples_are_valid_for_the_operator_models(set_values: dict[str, str]) -> None:
    for (kind, _), obj in chart_samples(**set_values).items():
        SPECS[kind].model_validate(obj["spec"])


def test_samples_wire_the_catalog_and_api_key_secrets_of_the_release() -> None:
    objects = helm.template(CHART, set_values={"samples.enabled": "true", "catalog.secretName": "desk-catalog",
                                               "samples.api.keyDigest": digest(SAMPLE_KEY)})
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    samples = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["apiVersion"].startswith("k2.io/")}

    for (kind, _), obj in samples.items():
        if kind == "IcebergTable":
            assert obj["spec"]["catalogRef"] == {"name": "desk-catalog"}
    keys = samples[("QueryService", "k2-api")]["spec"]["auth"]["apiKeysSecret"]
    (stored,) = parse(secrets[keys["name"]]["stringData"][keys["key"]])  # as the API reads it: digests only
    assert stored.digest == bytes.fromhex(digest(SAMPLE_KEY)) and stored.scope is None, "unrestricted, may stream"
    assert "desk-catalog" in secrets


@pytest.mark.parametrize("set_values", [{}, {"samples.api.keyDigest": digest(SAMPLE_KEY)}],
                         ids=["existing-secret", "digest"])
def test_the_chart_stores_no_api_key(set_values: dict[str, str]) -> None:
    """Only digests: without one the chart creates no key Secret at all (the operator of the
    cluster makes the key and stores its digest), and every key Secret it renders parses as the
    API reads keys, which refuses anything that is not a digest."""
    objects = helm.template(CHART, set_values={"samples.enabled": "true", **set_values})
    rendered = [o for o in objects if o["kind"] == "Secret" and "api_keys" in o.get("stringData", {})]

    assert len(rendered) == len(set_values)
    for secret in rendered:
        assert [k.key_id for k in parse(secret["stringData"]["api_keys"])] == ["samples"]
    assert SAMPLE_KEY not in yaml.safe_dump_all(objects)


def test_asx_csv_source_needs_a_claim() -> None:
    with pytest.raises(helm.StackError, match=r"samples\.source\.asxCsv\.claimName"):
        chart_samples(**{"samples.source.type": "asx-csv"})


def sample_source(**set_values: str) -> dict[str, Any]:
    return chart_samples(**set_values)[("IngestionPipeline", "asx")]["spec"]["source"]


def test_the_sample_source_types_are_the_registered_folder_sources() -> None:
    """values.schema.json's samples.source.type enum is the registry's folder sources
    (`k2.sources.SOURCES`), as the CRD's source.type enum is: a new one is offered, a removed one
    is not."""
    schema = yaml.safe_load((CHART / "values.schema.json").read_text())
    offered = schema["properties"]["samples"]["properties"]["source"]["properties"]["type"]["enum"]

    assert sorted(offered) == sorted(FOLDER_SOURCES)


@pytest.mark.parametrize("name", [n for n in FOLDER_SOURCES if n != "synthetic"])
def test_every_registered_folder_source_is_a_sample_source_read_from_its_claim(name: str) -> None:
    source = sample_source(**{"samples.source.type": name, "samples.source.folder.claimName": "ticks",
                              "samples.source.folder.path": "/data/day-1"})

    assert source == {"type": name, "folder": {"claimName": "ticks", "path": "/data/day-1"}}
    SPECS["IngestionPipeline"].model_validate({"exchange": "asx", "source": source})


def test_a_folder_sample_source_needs_a_claim() -> None:
    with pytest.raises(helm.StackError, match=r"samples\.source\.folder\.claimName"):
        chart_samples(**{"samples.source.type": "asx-csv"})


def test_asx_csv_keeps_its_own_spelling_but_not_beside_folder() -> None:
    """Existing values (samples.source.asxCsv) render as before; given with folder too, the chart
    refuses them as the CRD would (two spellings of one input)."""
    assert sample_source(**{"samples.source.type": "asx-csv", "samples.source.asxCsv.claimName": "asx-data"}) == {
        "type": "asx-csv", "asxCsv": {"claimName": "asx-data", "path": "/data/asx-2014-03"}}
    with pytest.raises(helm.StackError, match="give one"):
        chart_samples(**{"samples.source.type": "asx-csv", "samples.source.asxCsv.claimName": "asx-data",
                         "samples.source.folder.claimName": "ticks"})
