"""The chart configures K2 only through fields that exist, with values the models accept.

Every `K2_*` variable the chart (or the kustomize base) gives the operator is a field of
`k2.settings.Settings` (K2_<NAME>) or of `k2_operator.config.OperatorConfig` (K2_OPERATOR_<NAME>),
and each rendered environment loads into both models; the other way round, every field the chart
claims to configure (the `settings` and `operator.config` blocks of values.schema.json) is a model
field with the model's own type and bounds, and reaches the operator's env. The catalog Secret's
keys are the setting names the operator maps to env (`CATALOG_SECRET_FIELDS`)."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from k2.settings import Settings
from k2.stack import helm
from k2_operator.config import OperatorConfig
from k2_operator.render.common import CATALOG_REQUIRED_FIELDS, CATALOG_SECRET_FIELDS

pytestmark = [pytest.mark.unit, pytest.mark.helm]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "k2"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
SCHEMA = yaml.safe_load((CHART / "values.schema.json").read_text())
BLOCKS = {"settings": (SCHEMA["properties"]["settings"], Settings, "K2_"),
          "operator.config": (SCHEMA["properties"]["operator"]["properties"]["config"], OperatorConfig, "K2_OPERATOR_")}


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = next(o for o in objects if o["kind"] == "Deployment"
                      and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def k2_env(container: dict[str, Any]) -> dict[str, str]:
    """K2_* variables; those from Secrets get a placeholder of the right shape."""
    placeholders = {"K2_REGISTRY_URL": "https://user:secret@registry.example.com"}
    return {e["name"]: e.get("value", placeholders.get(e["name"], "from-a-secret"))
            for e in container["env"] if e["name"].startswith("K2_")}


def field_of(env_name: str) -> tuple[type, str]:
    if env_name.startswith("K2_OPERATOR_"):
        return OperatorConfig, env_name.removeprefix("K2_OPERATOR_").lower()
    return Settings, env_name.removeprefix("K2_").lower()


@pytest.fixture(params=CI_VALUES, ids=lambda p: p.stem)
def operator_env(request: pytest.FixtureRequest) -> dict[str, str]:
    container = operator_container(helm.template(CHART, values=[request.param]))
    return {**k2_env(container), "image": container["image"]}


def test_every_k2_variable_names_a_model_field(operator_env: dict[str, str]) -> None:
    operator_env.pop("image")
    for name in operator_env:
        model, field = field_of(name)
        assert field in model.model_fields, f"{name}: {model.__name__} has no field {field!r}"


def test_the_rendered_environment_loads_into_settings_and_operator_config(
        operator_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    image = operator_env.pop("image")
    for name in [n for n in os.environ if n.startswith("K2_")]:
        monkeypatch.delenv(name)
    for name, value in operator_env.items():
        monkeypatch.setenv(name, value)

    settings, config = Settings(), OperatorConfig()

    for name, value in operator_env.items():
        model, field = field_of(name)
        loaded = getattr(settings if model is Settings else config, field)
        if hasattr(loaded, "get_secret_value"):
            loaded = loaded.get_secret_value()
        assert str(loaded) in (value, str(type(loaded)(value))), name
    assert config.image == image, "the workloads must run the operator's own image"


@pytest.mark.parametrize("block", BLOCKS)
def test_configured_fields_have_the_models_type_and_bounds(block: str) -> None:
    schema, model, _ = BLOCKS[block]
    model_schema = model.model_json_schema()["properties"]
    for name, prop in schema["properties"].items():
        assert name in model.model_fields, f"{block}.{name} is not a {model.__name__} field"
        expected = model_schema[name]
        types = {o["type"] for o in expected.get("anyOf", [])} - {"null"} or {expected["type"]}
        assert prop["type"] in types, f"{block}.{name}: {prop['type']} vs {types}"
        for bound in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern", "enum"):
            if bound in expected:
                assert prop.get(bound) == expected[bound], f"{block}.{name}.{bound}"
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("block", BLOCKS)
def test_every_configured_field_reaches_the_operator(block: str, tmp_path: Path) -> None:
    schema, model, prefix = BLOCKS[block]
    fields = {name: model.model_fields[name].default for name in schema["properties"]}
    fields = {name: "k2-workloads" if value is None else value for name, value in fields.items()}
    values = {"settings": fields} if block == "settings" else {"operator": {"config": fields}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))

    env = k2_env(operator_container(helm.template(CHART, values=[tmp_path / "values.yaml"])))

    for name in schema["properties"]:
        assert f"{prefix}{name.upper()}" in env, f"{block}.{name} does not reach the operator"


def test_derived_variables_are_the_documented_ones() -> None:
    env = k2_env(operator_container(helm.template(CHART)))
    derived = set(env) - {f"K2_{n.upper()}" for n in BLOCKS["settings"][0]["properties"]} \
        - {f"K2_OPERATOR_{n.upper()}" for n in BLOCKS["operator.config"][0]["properties"]}

    assert derived == {"K2_KAFKA_BOOTSTRAP", "K2_REGISTRY_URL", "K2_OPERATOR_IMAGE", "K2_OPERATOR_IMAGE_PULL_POLICY",
                       "K2_OPERATOR_METRICS_PORT", "K2_OPERATOR_LIVENESS"}
    assert env["K2_OPERATOR_LIVENESS"] == "http://0.0.0.0:8080/healthz"
    assert env["K2_REGISTRY_URL"].endswith("/apis/ccompat/v7")


def test_catalog_secret_keys_are_the_settings_the_operator_maps() -> None:
    objects = helm.template(CHART)
    secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == "k2-catalog")
    data = secret["stringData"]

    assert set(data) == set(CATALOG_SECRET_FIELDS)
    assert set(CATALOG_REQUIRED_FIELDS) <= set(data)
    settings = Settings(**data)
    assert settings.warehouse.startswith("s3://") and settings.catalog_uri.startswith("postgresql+psycopg2://")


def test_chart_version_follows_the_k2_distribution() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    default_image = OperatorConfig.model_fields["image"].default

    assert chart["appVersion"] == project["version"]
    assert default_image.rsplit(":", 1)[0] == yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]


@pytest.mark.parametrize("overlay", ["manifests/base", "manifests/overlays/dev", "manifests/overlays/kind"])
def test_kustomize_operator_environment_names_model_fields(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.run(["kubectl", "kustomize", str(REPO / overlay)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objects = [d for d in yaml.safe_load_all(proc.stdout) if d]
    container = operator_container(objects)
    env = k2_env(container)
    for ref in container.get("envFrom", []):
        name = ref["configMapRef"]["name"]
        env.update(next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name)["data"])

    for name in env:
        model, field = field_of(name)
        assert field in model.model_fields, f"{overlay}: {name} is not a {model.__name__} field"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    Settings(), OperatorConfig()
