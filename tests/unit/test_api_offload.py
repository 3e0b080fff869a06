"""Blocking routes run on K2's route threads, with the request's context and FastAPI's parameters."""

from __future__ import annotations

import contextvars
import threading
from typing import Annotated

import httpx
from fastapi import Depends, FastAPI, HTTPException, Query

from k2.api.offload import offloaded, offloaded_iter

request_tag: contextvars.ContextVar[str] = contextvars.ContextVar("request_tag", default="unset")


async def _tag() -> str:
    request_tag.set("tagged")  # what a middleware binds (correlation id, structlog's values)
    return "dependency"


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/where/{name}")
    @offloaded
    def where(name: str, dep: Annotated[str, Depends(_tag)], times: Annotated[int, Query(ge=1)] = 1) -> dict:
        if name == "missing":
            raise HTTPException(404, "no such name")
        return {"name": name * times, "dep": dep, "thread": threading.current_thread().name,
                "tag": request_tag.get()}

    return app


async def _get(app: FastAPI, path: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://k2") as client:
        return await client.get(path)


async def test_an_offloaded_route_runs_on_a_route_thread_with_its_parameters_and_context():
    response = await _get(_app(), "/where/ab?times=2")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "abab" and body["dep"] == "dependency"
    assert body["thread"].startswith("k2-route") and body["thread"] != threading.current_thread().name
    assert body["tag"] == "tagged"


async def test_an_offloaded_route_keeps_validation_and_errors():
    app = _app()
    assert (await _get(app, "/where/ab?times=0")).status_code == 422
    missing = await _get(app, "/where/missing")
    assert missing.status_code == 404 and missing.json()["detail"] == "no such name"


async def test_an_offloaded_iterator_yields_every_item_in_order_from_route_threads():
    request_tag.set("exporting")
    seen: list[tuple[str, str]] = []

    def chunks():
        for i in range(5):
            seen.append((threading.current_thread().name, request_tag.get()))
            yield i

    assert [item async for item in offloaded_iter(chunks())] == [0, 1, 2, 3, 4]
    assert all(name.startswith("k2-route") and tag == "exporting" for name, tag in seen)


async def test_items_already_produced_come_first_without_a_thread():
    seen: list[str] = []

    def more():
        seen.append(threading.current_thread().name)
        yield "later"

    assert [item async for item in offloaded_iter(more(), ready=("first", "second"))] == ["first", "second", "later"]
    assert len(seen) == 1 and seen[0].startswith("k2-route")
