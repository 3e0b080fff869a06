"""Entitlements: API keys with scopes, stored only as SHA-256 digests.

A YAML (or JSON) document, from `K2_API_ENTITLEMENTS` (a Secret's key in the environment, as the
operator renders a QueryService's `auth.entitlementsSecret`) or `K2_API_ENTITLEMENTS_FILE` (a
mounted Secret, re-read when it changes):

    keys:
      - id: desk-rio              # how the key appears in logs and errors
        sha256: 5e88…             # hex digest of the key: `k2 api-key new` makes both
        exchanges: [ASX]          # omitted: every exchange
        symbols: [RIO, "BH*"]     # exact symbols or prefixes ending in *; omitted: every symbol
        tables: [trades, quotes]  # omitted: every table
        stream: true              # may use /v1/stream/*; default false

Keys from `K2_API_KEYS`/`K2_API_KEYS_FILE` remain unrestricted. The scope of the caller's key is
bound to the request (`k2.query.scope`) and applied inside every query.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from k2.api.watched import WatchedFile
from k2.exchanges import EXCHANGES
from k2.query.scope import Scope
from k2.settings import TABLE_KINDS, Settings

SymbolPattern = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9][A-Z0-9.\-]{0,15}\*?$|^\*$")]


class EntitlementsError(RuntimeError):
    """The entitlements cannot be read: the API must not start (or keeps the last good ones)."""


class Entitlement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    exchanges: list[str] | None = None
    symbols: list[SymbolPattern] | None = None
    tables: list[str] | None = None
    stream: bool = False

    def scope(self) -> Scope:
        unknown = sorted(set(self.exchanges or ()) - set(EXCHANGES)) + sorted(set(self.tables or ()) - set(TABLE_KINDS))
        if unknown:
            raise EntitlementsError(f"key {self.id}: unknown exchanges or tables {unknown}")
        symbols = None if self.symbols is None or "*" in self.symbols else tuple(sorted(self.symbols))
        return Scope(self.id, frozenset(self.exchanges) if self.exchanges is not None else None, symbols,
                     frozenset(self.tables) if self.tables is not None else None, self.stream)


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[Entitlement] = Field(default_factory=list)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse(text: str) -> list[tuple[bytes, Scope]]:
    try:
        document = Document.model_validate(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise EntitlementsError(f"entitlements are not valid: {exc}") from exc
    ids = [k.id for k in document.keys]
    if len(set(ids)) != len(ids):
        raise EntitlementsError("entitlements: key ids must be unique")
    return [(bytes.fromhex(k.sha256), k.scope()) for k in document.keys]


class Entitlements:
    def __init__(self, settings: Settings) -> None:
        inline = settings.api_entitlements.get_secret_value() if settings.api_entitlements else ""
        self._inline = parse(inline) if inline else []
        self._file: WatchedFile[list[tuple[bytes, Scope]]] | None = None
        if settings.api_entitlements_file is not None:
            try:
                self._file = WatchedFile(settings.api_entitlements_file, parse, "entitlements")
            except OSError as exc:
                raise EntitlementsError(f"K2_API_ENTITLEMENTS_FILE {settings.api_entitlements_file} is not "
                                        f"readable: {exc}") from exc

    def scope(self, presented: str | None) -> Scope | None:
        """The scope of an entitled key, else None (constant time over every entry)."""
        if not presented:
            return None
        if self._file is not None:
            self._file.refresh()
        presented_digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for candidate, scope in [*self._inline, *(self._file.value if self._file else [])]:
            if hmac.compare_digest(presented_digest, candidate):
                found = scope
        return found
