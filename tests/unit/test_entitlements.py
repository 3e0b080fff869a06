"""Scoped keys from a mounted file: digests only, scopes as written, rotation without a restart,
and a bad edit never loses the keys that worked."""

from __future__ import annotations

import os

import pytest

from k2.api.entitlements import Entitlements, EntitlementsError, digest
from k2.settings import Settings

pytestmark = pytest.mark.unit


def _write(path, text: str, bump: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(10**18 + bump, 10**18 + bump))  # a distinct mtime, as the kubelet's swap gives


def test_scopes_are_read_rotated_and_kept_through_a_bad_edit(tmp_path):
    path = tmp_path / "entitlements.yaml"
    _write(path, f"keys:\n  - id: desk-rio\n    sha256: {digest('key-1')}\n    symbols: [RIO, 'BH*']\n"
                 f"    stream: true\n", 1)
    entitlements = Entitlements(Settings(api_entitlements_file=path))
    scope = entitlements.scope("key-1")
    assert scope is not None and scope.key_id == "desk-rio" and scope.stream
    assert scope.allows_symbol("RIO") and scope.allows_symbol("BHP") and not scope.allows_symbol("CBA")
    assert entitlements.scope("key-2") is None and entitlements.scope(None) is None
    assert "key-1" not in path.read_text(), "only the digest is stored"

    _write(path, f"keys:\n  - id: desk-cba\n    sha256: {digest('key-2')}\n    symbols: [CBA]\n", 2)
    assert entitlements.scope("key-1") is None, "rotated out"
    assert entitlements.scope("key-2").symbols == ("CBA",)

    _write(path, "keys: [{id: broken}]\n", 3)
    assert entitlements.scope("key-2").symbols == ("CBA",), "the last good entitlements still serve"


@pytest.mark.parametrize("text", [
    "keys: [{id: a, sha256: nothex}]",
    "keys: [{id: a, sha256: " + "0" * 64 + ", exchanges: [LSE]}]",
    "keys: [{id: a, sha256: " + "0" * 64 + ", tables: [orders]}]",
    "keys: [{id: a, sha256: " + "0" * 64 + "}, {id: a, sha256: " + "1" * 64 + "}]",
    "keys: [{id: a, key: plain-text-key}]",
])
def test_unusable_entitlements_stop_the_api_from_starting(tmp_path, text):
    path = tmp_path / "entitlements.yaml"
    path.write_text(text)
    with pytest.raises(EntitlementsError):
        Entitlements(Settings(api_entitlements_file=path))
