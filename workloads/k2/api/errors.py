"""One JSON error shape (`models.ErrorResponse`) for every failure, and the handlers producing it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import structlog
from asgi_correlation_id import correlation_id
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2.api.models import ErrorBody, ErrorDetail, ErrorResponse
from k2.query.errors import Conflict, InvalidQuery, NotFound, QueryError, Unavailable
from k2.query.scope import Forbidden

log = structlog.get_logger("k2.api")
_QUERY_ERRORS: dict[type[QueryError], tuple[int, str]] = {
    InvalidQuery: (422, "invalid_query"),
    Forbidden: (403, "forbidden"),
    NotFound: (404, "not_found"),
    Conflict: (409, "conflict"),
    Unavailable: (503, "unavailable"),
}
_LOCATIONS = {"query", "path", "body", "header", "cookie"}


class ApiError(StarletteHTTPException):
    """An HTTP-level refusal (authentication, rate limit, body too large) raised from dependencies or
    from a request's `receive`: an HTTPException, so FastAPI lets it through the body parsing."""

    def __init__(self, status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status, message, headers=dict(headers or {}))
        self.status, self.code, self.message = status, code, message


def error_response(status: int, code: str, message: str, *, details: Sequence[ErrorDetail] = (),
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(status=status, code=code, message=message,
                                         correlation_id=correlation_id.get(), details=list(details)))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


def _validation_detail(error: Mapping[str, Any]) -> ErrorDetail:
    loc = [str(part) for part in error.get("loc", ())]
    location = loc.pop(0) if loc and loc[0] in _LOCATIONS else None
    return ErrorDetail(field=".".join(loc) or None, location=location, message=error.get("msg", "invalid"),
                       type=error.get("type"))


async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    details = [_validation_detail(e) for e in exc.errors()]
    fields = ", ".join(d.field or d.location or "request" for d in details)
    return error_response(422, "validation_error", f"invalid input: {fields}", details=details)


async def _on_query_error(_: Request, exc: QueryError) -> JSONResponse:
    status, code = next(v for cls, v in _QUERY_ERRORS.items() if isinstance(exc, cls))
    if isinstance(exc, Forbidden):
        context = structlog.contextvars.get_contextvars()
        log.warning("api.forbidden", reason=str(exc), correlation_id=correlation_id.get(),
                    api_key_id=context.get("api_key_id"))
    details = [ErrorDetail(field=exc.field, location=None, message=str(exc), type=code)] \
        if isinstance(exc, InvalidQuery) else []
    return error_response(status, code, str(exc), details=details)


async def _on_api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, headers=exc.headers)


async def _on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    phrase = HTTPStatus(exc.status_code).phrase
    return error_response(exc.status_code, phrase.lower().replace(" ", "_").replace("-", "_"),
                          str(exc.detail) if exc.detail else phrase, headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)  # type: ignore[arg-type]
    app.add_exception_handler(QueryError, _on_query_error)  # type: ignore[arg-type]
    app.add_exception_handler(ApiError, _on_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _on_http_error)  # type: ignore[arg-type]


# The errors every /v1 route can answer with, for the OpenAPI document.
V1_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or invalid X-API-Key"},
    404: {"model": ErrorResponse, "description": "Not found"},
    409: {"model": ErrorResponse, "description": "The table's history does not allow this request"},
    422: {"model": ErrorResponse, "description": "Invalid input; `details` names the offending fields"},
    429: {"model": ErrorResponse, "description": "Rate limit, or requests in progress per key, exceeded",
          "headers": {"Retry-After": {"description": "seconds until a request will be accepted again",
                                      "schema": {"type": "integer"}, "required": True}}},
    413: {"model": ErrorResponse, "description": "Request body larger than K2_MAX_BODY_BYTES"},
    503: {"model": ErrorResponse, "description": "Catalog or storage unavailable"},
}
