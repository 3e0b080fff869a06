"""What the query layer refuses, named by cause; the API maps each class to one HTTP status."""

from __future__ import annotations


class QueryError(Exception):
    """A request the engine cannot answer as asked."""


class InvalidQuery(QueryError):
    """Input that is well-formed but unusable (unknown field, range too large…); `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class NotFound(QueryError):
    """The symbol, date or snapshot asked for does not exist (or has been expired)."""


class Conflict(QueryError):
    """The table's history does not allow the request (e.g. catching up across a rewrite)."""


class Unavailable(QueryError):
    """The catalog or the storage behind it cannot be reached."""
