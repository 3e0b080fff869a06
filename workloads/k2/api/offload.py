"""Blocking route work (queries, exports) on worker threads, at the cost of one cheap hop.

FastAPI runs a `def` route through anyio's worker threads, and validates a returned model through
a second hop; each of those hops measured about 1 ms on this project's 2-core machine, against
0.2-0.3 ms for `loop.run_in_executor` (`benchmarks/bench_query.py` and `docs/benchmarks.md`, "Query").
A route decorated with `offloaded` is a coroutine to FastAPI: its body runs in `ROUTE_THREADS`
under a copy of the request's context (correlation id, structlog's bound values), and a model it
returns is validated on the event loop, without a hop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar, cast

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

# As many as anyio's default limit for `def` routes, which these replace: requests past it queue.
ROUTE_THREADS = ThreadPoolExecutor(max_workers=40, thread_name_prefix="k2-route")
_DONE = object()  # the end of an offloaded iterator


def offloaded(route: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`route`, run on a worker thread; FastAPI reads its parameters through `functools.wraps`."""

    @functools.wraps(route)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        call = functools.partial(contextvars.copy_context().run, route, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(ROUTE_THREADS, call)

    return run


async def offloaded_iter(items: Iterator[T]) -> AsyncIterator[T]:
    """Each item of a blocking iterator (an export's chunks), produced on a worker thread."""
    loop, step = asyncio.get_running_loop(), functools.partial(contextvars.copy_context().run, _next, items)
    while (item := await loop.run_in_executor(ROUTE_THREADS, step)) is not _DONE:
        yield cast(T, item)


def _next(items: Iterator[T]) -> T | object:
    return next(items, _DONE)
