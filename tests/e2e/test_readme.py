"""README.md's "Using it" block, run as written in one shell on a fresh stack of its own (its own
ports and state folder), so the README cannot drift from the code."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from k2.stack.base import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.asx]
REPO = Path(__file__).resolve().parents[2]
STACK_PORTS = ("K2_KAFKA_PORT", "K2_KAFKA_CONTROLLER_PORT", "K2_REGISTRY_PORT", "K2_REGISTRY_MANAGEMENT_PORT",
               "K2_POSTGRES_PORT", "K2_S3_PORT")
# What a person does after starting something in the background: wait until it answers.
WAIT_FOR_API = ("timeout 120 bash -c 'until python -c \"import os, urllib.request; "
                "urllib.request.urlopen(os.environ[\\\"K2_API_URL\\\"] + \\\"/health\\\")\" 2>/dev/null; "
                "do sleep 0.5; done'")


def using_it_block() -> list[str]:
    section = (REPO / "README.md").read_text().split("\n## Using it\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_using_it_block_runs_as_written(tmp_path: Path) -> None:
    lines = using_it_block()
    ingest = next(line for line in lines if line.startswith("k2 ingest asx "))
    if not (REPO / ingest.split()[3]).is_dir():
        pytest.skip(f"the README ingests {ingest.split()[3]}, which is not here")
    # a person's shell: no K2_* of the test session, K2 not on PATH until the block activates it
    env = {k: v for k, v in os.environ.items() if not k.startswith("K2_") and k not in ("VIRTUAL_ENV", "KUBECONFIG")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(REPO)))
    env.update({var: str(free_port()) for var in STACK_PORTS})
    api_port = free_port()
    env.update({"K2_STATE_DIR": str(tmp_path / "state"), "K2_API_PORT": str(api_port),
                "K2_API_URL": f"http://127.0.0.1:{api_port}", "K2_CACHE_DIR": os.environ.get(
                    "K2_CACHE_DIR", str(Path.home() / ".cache" / "k2"))})
    script = ["set -e"]
    for line in lines:
        script.append(line)
        if line.split("#", 1)[0].rstrip().endswith("&"):
            script.append(WAIT_FOR_API)
    chart = REPO / "bhp.png"
    before = chart.read_bytes() if chart.exists() else None
    try:
        proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        out = " ".join((proc.stdout + proc.stderr).split())
        assert "yes" in out  # the ingest table's "balanced" column: rows read = produced + rejected
        assert "rows committed" in out
        assert "BHP" in out and "2014-03-10" in out  # the summary and the bars
        assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        subprocess.run([str(REPO / ".venv/bin/k2"), "stack", "down"], cwd=REPO, env=env, capture_output=True,
                       timeout=300)
        if before is None:
            chart.unlink(missing_ok=True)
        else:
            chart.write_bytes(before)
