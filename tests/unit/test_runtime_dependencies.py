"""The runtime image installs `k2` without extras (`pip install .`): every module it runs must import
with only the distributions that set pulls in, and none of them may need the local dev stack.

The check runs in a fresh interpreter whose imports of anything outside the runtime set fail, as
they would in the image: a module of a distribution only `[stack]`/`[dev]` (or nothing) installs,
or `k2.stack` itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.unit
OWN = ("k2", "k2_operator", "k2_synthetic")


def _closure(extras: tuple[str, ...] = ()) -> set[str]:
    """Normalised names of the distributions `k2[extras]` installs, k2 included."""
    seen: set[str] = set()
    todo = [Requirement(f"k2[{','.join(extras)}]" if extras else "k2")]
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # a marker-guarded dependency of another platform
        for raw in dist.requires or []:
            dep = Requirement(raw)
            wanted = {""} | set(req.extras)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(dep)
    return {k.split("[")[0] for k in seen}


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _blocked_top_levels(allowed: set[str]) -> set[str]:
    """Top-level modules that only distributions outside `allowed` provide."""
    blocked = set()
    for module, dists in metadata.packages_distributions().items():
        if module not in OWN and not any(_norm(d) in allowed for d in dists):
            blocked.add(module)
    return blocked


_PROBE = textwrap.dedent("""
    import importlib, importlib.abc, json, pkgutil, sys, traceback

    blocked = set(json.loads(sys.argv[1]))

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in blocked or name == "k2.stack" or name.startswith("k2.stack."):
                raise ModuleNotFoundError(f"No module named {name!r} (not in the runtime set)", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    failures = {}
    for package in ("k2", "k2_operator", "k2_synthetic"):
        pkg = importlib.import_module(package)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            if info.name == "k2.stack" or info.name.startswith("k2.stack."):
                continue
            try:
                importlib.import_module(info.name)
            except Exception:
                failures[info.name] = traceback.format_exc(limit=-3)
    print(json.dumps(failures))
""")


def test_the_runtime_set_leaves_out_the_dev_stack_and_test_tooling() -> None:
    runtime, everything = _closure(), _closure(("dev",))
    for dist in ("pytest", "hypothesis", "ruff", "boto3"):
        assert dist in everything, f"{dist} should come with k2[dev]"
        assert dist not in runtime, f"{dist} is dev/stack tooling, yet the runtime set installs it"


def test_every_runtime_module_imports_with_the_runtime_set_alone() -> None:
    blocked = _blocked_top_levels(_closure())
    assert {"pytest", "boto3"} <= blocked  # the probe below can fail
    proc = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(sorted(blocked))],
                          capture_output=True, text=True, timeout=300, check=True)
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())


def test_k2_stack_says_how_to_get_it_where_it_is_not_installed() -> None:
    probe = textwrap.dedent("""
        import importlib.abc, sys
        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "k2.stack" or name.startswith("k2.stack."):
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Absent())
        from k2.cli import app
        app(["stack", "status"])
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "make install" in proc.stderr and "Traceback" not in proc.stderr
