"""What k2.stack.images and k2.stack.addons promise without an engine: kind-values.yaml and the
add-on manifests name exactly images that are built here, every add-on container starts by an
explicit command as a non-root user, and the K2 image's cache key follows its build context (a
changed source rebuilds, bytecode does not)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from k2.stack import addons, images

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_kind_values_name_the_k2_and_infrastructure_images_built_here() -> None:
    values = yaml.safe_load((REPO / "charts/k2/ci/kind-values.yaml").read_text())
    blocks = [values["image"], *(values[key]["image"] for key in ("kafka", "schemaRegistry", "postgresql", "s3"))]
    named = {f"{block['repository']}:{block['tag']}" for block in blocks}

    assert named == {image.tag for image in [images.K2, *images.infra_images()]}


def test_addon_manifests_run_exactly_the_addon_images_built_here() -> None:
    assert addons.images() == sorted(image.tag for image in images.ADDON_IMAGES)


def test_addon_containers_start_by_explicit_command_as_non_root() -> None:
    checked = 0
    for doc in addons.manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        for box in spec["containers"]:
            checked += 1
            where = f"{doc['kind']}/{doc['metadata']['name']} {box['name']}"
            assert box["command"], where
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0, where
            assert box["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert box["securityContext"]["allowPrivilegeEscalation"] is False, where
    assert checked == 3


def test_image_names_are_unique_and_every_key_names_its_tarball() -> None:
    built = images.all_images()

    assert len({i.name for i in built}) == len(built) and len({i.tag for i in built}) == len(built)
    assert all(i.tarball.name == f"{i.name}-{i.key()}.tar" for i in built)


def test_k2_image_key_follows_the_build_context_but_not_bytecode(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for entry in (*images.K2_CONTEXT, "Dockerfile"):
        source = REPO / entry
        if source.is_dir():
            shutil.copytree(source, tmp_path / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, tmp_path / entry)
    monkeypatch.setattr(images, "REPO", tmp_path)
    before = images.K2.key()

    cache = tmp_path / "workloads/k2/__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "x.cpython-311.pyc").write_bytes(b"bytecode")
    assert images.K2.key() == before

    module = tmp_path / "workloads/k2/__init__.py"
    module.write_text(module.read_text() + "\n# changed\n")
    assert images.K2.key() != before


def test_every_go_built_addon_image_is_compiled_ahead_by_make_test() -> None:
    """scripts/test.sh's prebuild (kindcluster.prebuild) compiles images.GO_PROGRAMS beside the
    other tests; an add-on missing there would be compiled on the image tests' clock instead."""
    built = {image.inputs[:2] for image in images.ADDON_IMAGES}
    ahead = {(program.module, program.version) for program in images.GO_PROGRAMS}

    assert built and built <= ahead
