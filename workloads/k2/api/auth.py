"""API keys: `X-API-Key` on every /v1 route, checked against SHA-256 digests only.

One key store, a YAML (or JSON) document, from `K2_API_KEYS` (a Secret's key in the environment)
or `K2_API_KEYS_FILE` (a mounted Secret, as the operator renders a QueryService's
`auth.apiKeysSecret`; re-read when it changes, so a rotated Secret takes effect without a restart):

    keys:
      - id: desk-rio              # how the key appears in logs, errors and rate-limit buckets
        sha256: 5e88…             # hex digest of the key: `k2 api-key --id desk-rio` makes both
        exchanges: [ASX]          # omitted: every exchange
        symbols: [RIO, "BH*"]     # exact symbols or prefixes ending in *; omitted: every symbol
        tables: [trades, quotes]  # omitted: every table
        stream: true              # may use /v1/stream/*; default false

A key never stored can never leak from a Secret, a backup or `kubectl get -o yaml`: anything that
is not a digest (the old comma-separated plain keys, a `key:` field) is refused, naming the fix.
The built-in dev key is accepted only in dev mode with no key configured (it is public, in the
source); prod mode without keys refuses to start. Presented keys are compared in constant time
against every digest and never logged: requests are attributed to the entry's id.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated, Any, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from k2.api.watched import WatchedFile
from k2.exchanges import EXCHANGES
from k2.query.scope import Scope
from k2.settings import DEV_API_KEY, TABLE_KINDS, Settings

SymbolPattern = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9.\-]{0,15}\*?$|^\*$")]
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
DEV_KEY_ID = "dev"
FIX = ("store only digests: `k2 api-key --id NAME` prints a new key once, and the entry (id and sha256) "
       "to put in the Secret")


class ApiKeyConfigError(RuntimeError):
    """The configured keys are unusable: the API must not start (or keeps the last good ones)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Entitlement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    sha256: Annotated[str, StringConstraints(pattern=SHA256_HEX.pattern)]
    exchanges: list[str] | None = None
    symbols: list[SymbolPattern] | None = None
    tables: list[str] | None = None
    stream: bool = False

    @classmethod
    def of(cls, key_id: str, key: str, **scopes: Any) -> Self:
        """The entry of `key`: its digest, never the key."""
        return cls(id=key_id, sha256=digest(key), **scopes)

    def scope(self) -> Scope | None:
        """What the key may read; None when it may do everything (no query carries a filter for it)."""
        unknown = sorted(set(self.exchanges or ()) - set(EXCHANGES)) + sorted(set(self.tables or ()) - set(TABLE_KINDS))
        if unknown:
            raise ApiKeyConfigError(f"key {self.id}: unknown exchanges or tables {unknown}")
        symbols = None if self.symbols is None or "*" in self.symbols else tuple(sorted(self.symbols))
        if symbols is None and self.exchanges is None and self.tables is None and self.stream:
            return None
        return Scope(self.id, frozenset(self.exchanges) if self.exchanges is not None else None, symbols,
                     frozenset(self.tables) if self.tables is not None else None, self.stream)


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[Entitlement] = Field(default_factory=list)


def document(entries: list[Entitlement]) -> str:
    """The YAML a Secret stores for these entries."""
    return yaml.safe_dump({"keys": [e.model_dump(exclude_none=True) for e in entries]}, sort_keys=False)


@dataclass(frozen=True)
class StoredKey:
    digest: bytes
    key_id: str
    scope: Scope | None


def _errors(exc: ValidationError) -> str:
    # Never str(exc): pydantic quotes the input, and the input may be a plain key.
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


_FIELDS = frozenset({"keys", *Entitlement.model_fields})


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML keeps the last of two equal mapping keys: an appended second `keys:` block would
    silently revoke every key of the first. Refused instead."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        names = [self.construct_object(key, deep=True) for key, _ in node.value]
        repeated = {n for n in names if names.count(n) > 1}
        if repeated:  # named only if a field's name: an unknown name could be a pasted key
            said = ", ".join(sorted(repr(n) if n in _FIELDS else "a name" for n in repeated))
            raise ApiKeyConfigError(f"API keys: {said} more than once in one mapping; put every entry in one "
                                    "`keys:` list")
        return super().construct_mapping(node, deep)


def parse(text: str) -> list[StoredKey]:
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        raise ApiKeyConfigError(f"API keys are not valid YAML ({type(exc).__name__}); {FIX}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ApiKeyConfigError(f"API keys must be a document of digests (`keys:` with id and sha256 per key), "
                                f"not plain keys; {FIX}")
    entries = (loaded or {}).get("keys") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ApiKeyConfigError(f"API keys: each entry of `keys` is a mapping with id and sha256, not a plain key; "
                                f"{FIX}")
    if any("key" in e or ("sha256" in e and not SHA256_HEX.fullmatch(str(e["sha256"]))) for e in entries):
        raise ApiKeyConfigError(f"API keys: a plain key is stored (a `key` field, or a sha256 that is not 64 "
                                f"lowercase hex digits); {FIX}")
    try:
        keys = Document.model_validate(loaded or {}).keys
    except ValidationError as exc:
        raise ApiKeyConfigError(f"API keys are not valid: {_errors(exc)}") from None
    ids = [k.id for k in keys]
    if len(set(ids)) != len(ids):
        raise ApiKeyConfigError("API keys: ids must be unique")
    return [StoredKey(bytes.fromhex(k.sha256), k.id, k.scope()) for k in keys]


class ApiKeys:
    def __init__(self, settings: Settings) -> None:
        inline = settings.api_keys.get_secret_value() if settings.api_keys else ""
        try:
            self._inline = parse(inline)
        except ApiKeyConfigError as exc:
            raise ApiKeyConfigError(f"K2_API_KEYS: {exc}") from None
        self._file: WatchedFile[list[StoredKey]] | None = None
        if settings.api_keys_file is not None:
            try:
                self._file = WatchedFile(settings.api_keys_file, parse, "api keys")
            except OSError as exc:
                raise ApiKeyConfigError(f"K2_API_KEYS_FILE {settings.api_keys_file} is not readable: {exc}") from exc
            except ApiKeyConfigError as exc:
                raise ApiKeyConfigError(f"K2_API_KEYS_FILE {settings.api_keys_file}: {exc}") from None
        self._dev = [StoredKey(hashlib.sha256(DEV_API_KEY.encode()).digest(), DEV_KEY_ID, None)] \
            if settings.mode == "dev" else []
        if not self._stored() and settings.mode == "prod":
            raise ApiKeyConfigError("K2_MODE=prod needs API keys: set K2_API_KEYS_FILE (a mounted Secret) or "
                                    f"K2_API_KEYS; {FIX}")

    def _stored(self) -> list[StoredKey]:
        if self._file is not None:
            self._file.refresh()
        return [*self._inline, *(self._file.value if self._file else [])]

    def identify(self, presented: str | None) -> tuple[str, Scope | None] | None:
        """The key's id and scope (None: unrestricted) when `presented` is a valid key, else None."""
        if not presented:
            return None
        candidates = self._stored() or self._dev
        presented_digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for candidate in candidates:  # no early exit: timing does not tell which key matched
            if hmac.compare_digest(presented_digest, candidate.digest):
                found = candidate
        return (found.key_id, found.scope) if found else None
