"""Blocking route work (queries, exports) on worker threads, at the cost of one cheap hop.

FastAPI runs a `def` route through anyio's worker threads, and validates a returned model through
a second hop; each of those hops measured about 1 ms on this project's 2-core machine, against
0.2-0.3 ms for `loop.run_in_executor` (`benchmarks/bench_query.py` and `docs/benchmarks.md`, "Query").
A route decorated with `offloaded` is a coroutine to FastAPI: its body runs in `ROUTE_THREADS`
under a copy of the request's context (correlation id, structlog's bound values), and a model it
returns is validated on the event loop, without a hop.

A route decorated with `memory_first` is first run on the event loop under
`k2.query.engine.memory_only()`: most point queries are answered from what the process holds
(rollups, held ticks, cached plans and results) in well under a millisecond, less than the hop
itself costs. Where the engine would wait on anything it raises `WouldBlock` and the route is run
again on a worker thread, as `offloaded` runs it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar, cast

from k2.query.engine import WouldBlock, memory_only

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


def memory_first(route: Callable[P, R]) -> Callable[P, Awaitable[R]]:
    """`route`, run on the event loop when the engine can answer from memory, else on a worker thread."""
    on_thread = offloaded(route)

    @functools.wraps(route)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with memory_only():
                return route(*args, **kwargs)
        except WouldBlock:
            return await on_thread(*args, **kwargs)

    return run


async def offloaded_iter(items: Iterator[T], *, ready: Iterable[T] = ()) -> AsyncIterator[T]:
    """The items already produced (`ready`), then each further item of a blocking iterator (an
    export's chunks), produced on a worker thread."""
    for produced in ready:
        yield produced
    loop, step = asyncio.get_running_loop(), functools.partial(contextvars.copy_context().run, _next, items)
    while (item := await loop.run_in_executor(ROUTE_THREADS, step)) is not _DONE:
        yield cast(T, item)


def _next(items: Iterator[T]) -> T | object:
    return next(items, _DONE)
