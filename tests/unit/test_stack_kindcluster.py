"""k2.stack.kindcluster's pure parts: the command line the Makefile uses and the kind config it
renders from kind-config.yaml (no engine needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k2.stack import kindcluster

pytestmark = pytest.mark.unit


def test_load_takes_images_after_the_cluster_name() -> None:
    args = kindcluster.parse_args(["load", "--name", "k2", "k2:dev", "k2.local/kafka:4.4.0"])

    assert (args.action, args.name, args.images) == ("load", "k2", ["k2:dev", "k2.local/kafka:4.4.0"])


def test_config_resolves_mounts_against_the_repository_and_remaps_host_ports(tmp_path: Path) -> None:
    present = tmp_path / "asx"
    present.mkdir()
    config = tmp_path / "kind-config.yaml"
    config.write_text(yaml.safe_dump({"kind": "Cluster", "nodes": [{
        "role": "control-plane",
        "extraPortMappings": [{"containerPort": 80, "hostPort": 80}, {"containerPort": 443, "hostPort": 443}],
        "extraMounts": [{"hostPath": str(present), "containerPath": "/data/asx", "readOnly": True},
                        {"hostPath": str(tmp_path / "absent"), "containerPath": "/data/none"}]}]}))

    rendered = kindcluster.render_config("k2-x", host_ports={80: 18080}, base=config)

    node = rendered["nodes"][0]
    assert rendered["name"] == "k2-x"
    assert [(m["containerPort"], m["hostPort"]) for m in node["extraPortMappings"]] == [(80, 18080), (443, 443)]
    assert node["extraMounts"] == [{"hostPath": str(present), "containerPath": "/data/asx", "readOnly": True}]


def test_repository_config_mounts_the_asx_sample_from_beside_the_checkout() -> None:
    rendered = kindcluster.render_config("k2")

    for node in rendered["nodes"]:
        for mount in node["extraMounts"]:
            assert Path(mount["hostPath"]).is_absolute() and Path(mount["hostPath"]).is_dir()
            assert mount["readOnly"] is True
