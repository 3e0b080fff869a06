"""The floor of answering over HTTP in Python: uvicorn (the API's server, with its uvloop and
httptools) replying with bytes recorded beforehand, doing no other work. `bench_peers.py` times it
beside K2's API and QuestDB's /exec on the same questions, with K2's own answers as the bytes: what
any Python server pays per request before it has parsed a parameter or read a row.

    K2_HTTP_FLOOR_ANSWERS=answers.json python -m uvicorn --factory http_floor:create_app

`answers.json` maps "METHOD path?query" to the answer's text; /ready answers 200 once loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ANSWERS_ENV = "K2_HTTP_FLOOR_ANSWERS"
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def create_app() -> ASGIApp:
    answers = {key: text.encode() for key, text in json.loads(Path(os.environ[ANSWERS_ENV]).read_text()).items()}
    answers["GET /ready"] = b"{}"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):  # a POST's body is read, as any server must
            pass
        query = scope["query_string"].decode()
        body = answers.get(f"{scope['method']} {scope['path']}{'?' + query if query else ''}")
        body, status = (body, 200) if body is not None else (b"", 404)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app
