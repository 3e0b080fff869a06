"""One operator acts at a time: two `k2 operator` processes against one apiserver elect a leader
on a Lease; the other reconciles nothing until the leader stops, then takes over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.operator, pytest.mark.timeout(180)]

FIELDS = [{"name": "pair", "type": "string", "required": True}]


def start(namespace: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(Path(sys.executable).parent / "k2"), "operator", "--namespace", namespace],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=dict(os.environ))


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def holder(cluster: Any, operator_env: dict) -> str:
    from kubernetes import client

    try:
        lease = client.CoordinationV1Api(cluster.api).read_namespaced_lease(operator_env["K2_OPERATOR_LEASE_NAME"],
                                                                            "default")
    except client.ApiException:
        return ""
    return lease.spec.holder_identity or ""


def test_a_second_operator_waits_and_takes_over_when_the_leader_stops(
        cluster: Any, namespace: str, operator_env: dict, tmp_path: Path, k2op: Any) -> None:
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start(namespace, first_log)
    second = None
    try:
        k2op.wait_for(lambda: f"_{first.pid}_" in holder(cluster, operator_env), "the first operator to lead", 60)
        second = start(namespace, second_log)
        k2op.wait_for(lambda: "leadership.waiting" in second_log.read_text(), "the second operator to wait", 60)

        ns = f"l_{uuid.uuid4().hex[:6]}"
        cluster.create(namespace, {"apiVersion": "k2.io/v1alpha1", "kind": "IcebergTable",
                                   "metadata": {"name": "led"},
                                   "spec": {"namespace": ns, "name": "led", "schema": {"fields": FIELDS}}})
        cluster.wait_condition(namespace, "IcebergTable", "led", timeout=60)
        assert "icebergtable.reconciled" in first_log.read_text()
        assert "icebergtable.reconciled" not in second_log.read_text(), "the standby must not act"

        stop(first)
        k2op.wait_for(lambda: f"_{second.pid}_" in holder(cluster, operator_env),
                      "the second operator to take the Lease over", 30)
        cluster.patch(namespace, "IcebergTable", "led", {"spec": {"schema": {"fields": [
            *FIELDS, {"name": "venue", "type": "string"}]}}})
        obj = cluster.wait_condition(namespace, "IcebergTable", "led", timeout=60)
        assert obj["status"]["columns"] == 2
        assert "icebergtable.reconciled" in second_log.read_text()
    finally:
        stop(first)
        if second is not None:
            stop(second)
        cluster.delete(namespace, "IcebergTable", "led")
