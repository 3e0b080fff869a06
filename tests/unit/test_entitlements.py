"""Keys with scopes from a mounted file: digests only, scopes as written, rotation without a
restart, and a bad edit never loses the keys that worked."""

from __future__ import annotations

import os

import pytest

from k2.api.auth import ApiKeyConfigError, ApiKeys, digest
from k2.settings import Settings

pytestmark = pytest.mark.unit


def _write(path, text: str, bump: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(10**18 + bump, 10**18 + bump))  # a distinct mtime, as the kubelet's swap gives


def test_scopes_are_read_rotated_and_kept_through_a_bad_edit(tmp_path):
    path = tmp_path / "api-keys.yaml"
    _write(path, f"keys:\n  - id: desk-rio\n    sha256: {digest('key-1')}\n    symbols: [RIO, 'BH*']\n"
                 f"    stream: true\n  - id: ops\n    sha256: {digest('key-0')}\n    stream: true\n", 1)
    keys = ApiKeys(Settings(mode="prod", api_keys_file=path))
    key_id, scope = keys.identify("key-1")
    assert key_id == "desk-rio" and scope is not None and scope.key_id == "desk-rio" and scope.stream
    assert scope.allows_symbol("RIO") and scope.allows_symbol("BHP") and not scope.allows_symbol("CBA")
    assert keys.identify("key-0") == ("ops", None), "no restriction: unrestricted, like the dev key"
    assert keys.identify("key-2") is None and keys.identify(None) is None
    assert "key-1" not in path.read_text(), "only the digest is stored"

    _write(path, f"keys:\n  - id: desk-cba\n    sha256: {digest('key-2')}\n    symbols: [CBA]\n", 2)
    assert keys.identify("key-1") is None, "rotated out"
    assert keys.identify("key-2")[1].symbols == ("CBA",)

    _write(path, "keys: [{id: broken}]\n", 3)
    assert keys.identify("key-2")[1].symbols == ("CBA",), "the last good keys still serve"
    _write(path, "key-2\n", 4)
    assert keys.identify("key-2")[1].symbols == ("CBA",), "a plain key written later is refused too"


def test_a_key_that_may_not_stream_keeps_a_scope(tmp_path):
    path = tmp_path / "api-keys.yaml"
    path.write_text(f"keys: [{{id: batch, sha256: {digest('key-3')}}}]")
    key_id, scope = ApiKeys(Settings(mode="prod", api_keys_file=path)).identify("key-3")
    assert key_id == "batch" and scope is not None and not scope.stream and not scope.restricts_rows


@pytest.mark.parametrize("text", [
    "keys: [{id: a, sha256: nothex}]",
    "keys: [{id: a, sha256: " + "0" * 64 + ", exchanges: [LSE]}]",
    "keys: [{id: a, sha256: " + "0" * 64 + ", tables: [orders]}]",
    "keys: [{id: a, sha256: " + "0" * 64 + "}, {id: a, sha256: " + "1" * 64 + "}]",
    "keys: [{id: a, key: plain-text-key}]",
    "keys: [{id: a, sha256: " + "0" * 64 + ", tier: gold}]",
])
def test_unusable_keys_stop_the_api_from_starting(tmp_path, text):
    path = tmp_path / "api-keys.yaml"
    path.write_text(text)
    with pytest.raises(ApiKeyConfigError):
        ApiKeys(Settings(api_keys_file=path))
