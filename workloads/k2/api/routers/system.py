"""Unauthenticated system routes: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from k2.api.deps import EngineDep
from k2.api.models import Health
from k2.api.offload import offloaded
from k2.observability import REGISTRY
from k2.query.errors import Unavailable

router = APIRouter(tags=["system"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process serves requests (liveness)."""
    return Health(status="ok")


@router.get("/ready", response_model=Health, responses={503: {"model": Health, "description": "Not ready"}})
@offloaded
def ready(engine: EngineDep) -> Health | JSONResponse:
    """The catalog and the query engine answer (readiness)."""
    try:
        engine.check()
    except Unavailable as exc:
        return JSONResponse(Health(status="unavailable", detail=str(exc)).model_dump(), status_code=503)
    return Health(status="ok")


@router.get("/metrics", response_class=PlainTextResponse)
def metrics() -> Response:
    """The k2_* metrics in the Prometheus text format."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
