"""The Dockerfile and its build context keep the promises the chart relies on: a pinned slim
Python base, multi-stage, the one `k2` distribution, a numeric non-root UID equal to the pods'
runAsUser, no HEALTHCHECK, and a .dockerignore that lets in exactly what the wheel needs."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from k2_operator.render.common import APP_UID

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()
# Instructions with line continuations joined, comments dropped.
INSTRUCTIONS = [line.strip() for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def stages() -> list[tuple[str, str]]:
    """(base, name) of every FROM, in order."""
    found = []
    for line in INSTRUCTIONS:
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if match:
            found.append((match.group(1), match.group(2) or ""))
    return found


def arg_default(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE, re.MULTILINE)
    assert match, f"ARG {name} has no default"
    return match.group(1)


# --- Dockerfile -----------------------------------------------------------------------------------
def test_base_is_a_slim_python_311_pinned_to_a_patch_release() -> None:
    image = arg_default("PYTHON_IMAGE")

    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    assert all(base in ("${PYTHON_IMAGE}",) or base in {name for _, name in stages()} for base, _ in stages())


def test_multi_stage_with_the_runtime_last() -> None:
    names = [name for _, name in stages()]

    assert names[0] == "build" and names[-1] == "runtime"
    assert "dev" in names, "Tilt builds the dev target"
    assert any(line.startswith("COPY --from=build /opt/k2") for line in INSTRUCTIONS)


def test_runs_as_a_numeric_non_root_uid_matching_the_pods() -> None:
    users = [line.split()[1] for line in INSTRUCTIONS if line.startswith("USER ")]
    uid = int(arg_default("K2_UID"))
    values = yaml.safe_load((REPO / "charts/k2/values.yaml").read_text())

    assert users[-1] == "${K2_UID}:${K2_UID}" and uid != 0
    assert uid == APP_UID == values["podSecurityContext"]["runAsUser"], "image, operator and chart must agree"


def test_no_healthcheck_and_a_real_pid_1() -> None:
    assert not any(line.upper().startswith("HEALTHCHECK") for line in INSTRUCTIONS)
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "k2"]' in INSTRUCTIONS


def test_read_only_root_filesystem_friendly() -> None:
    env = " ".join(line for line in INSTRUCTIONS if line.startswith("ENV "))

    for variable in ("PYTHONDONTWRITEBYTECODE=1", "HOME=/tmp", "MPLCONFIGDIR=/tmp", "XDG_CACHE_HOME=/tmp"):
        assert variable in env, variable
    assert not any("--no-compile" in line for line in INSTRUCTIONS), "pip must byte-compile at build time"
    assert "WORKDIR /var/lib/k2" in INSTRUCTIONS


def test_installs_the_one_k2_distribution() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    copies = [line.split()[1] for line in INSTRUCTIONS if line.startswith("COPY ") and "--from" not in line]

    assert project["project"]["name"] == "k2"
    assert sorted(packages) == sorted(c for c in copies if c not in ("pyproject.toml",))
    assert "pyproject.toml" in copies and "README.md" in DOCKERFILE


def test_site_packages_paths_used_by_the_chart_and_tilt_match_the_python_minor() -> None:
    minor = re.match(r"python:(3\.\d+)", arg_default("PYTHON_IMAGE")).group(1)
    for path in ("Tiltfile", "charts/k2/templates/operator/deployment.yaml", "Dockerfile"):
        for found in re.findall(r"/opt/k2/lib/python(\d\.\d+)/site-packages", (REPO / path).read_text()):
            assert found == minor, path


# --- .dockerignore --------------------------------------------------------------------------------
def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per line, Docker's semantics: last match wins, `!` re-includes, `**` spans dirs."""
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((not include, re.compile(regex)))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for exclude, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = exclude
    return not excluded


def repo_files() -> list[str]:
    skip = {".git", ".venv", ".k2", ".pytest_cache", ".ruff_cache", ".hypothesis", ".pytest-kind", "node_modules"}
    out = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip]
        out += [str(Path(root, f).relative_to(REPO)) for f in files]
    return out


def test_context_holds_what_the_wheel_needs_and_nothing_else() -> None:
    rules = dockerignore_rules()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    included = {f for f in repo_files() if in_context(f, rules)}

    needed = {f for f in repo_files() if any(f.startswith(p + "/") for p in packages)
              and "__pycache__" not in f and not f.endswith(".pyc")}
    assert needed, "no package files found"
    assert needed | {"pyproject.toml", "README.md"} == included


def test_dockerignore_rules_behave_like_docker() -> None:
    rules = dockerignore_rules()

    assert in_context("workloads/k2/settings.py", rules)
    assert in_context("workloads/k2/schemas/avro/trade.avsc", rules)
    assert not in_context("workloads/k2/__pycache__/settings.cpython-311.pyc", rules)
    assert not in_context("tests/unit/test_chart_image.py", rules)
    assert not in_context("charts/k2/values.yaml", rules)


def test_any_builder_builds_it_without_a_registry() -> None:
    """Debian's docker.io has no buildx (its legacy builder knows no RUN --mount), and a
    `# syntax=` line would make BuildKit pull its frontend from a registry."""
    assert not re.search(r"^#\s*syntax=", DOCKERFILE, re.MULTILINE | re.IGNORECASE)
    assert not any("--mount=" in line for line in INSTRUCTIONS)
