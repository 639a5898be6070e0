"""Small asyncio helpers shared by services."""

from __future__ import annotations

import asyncio
import random
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_END = object()


async def prefetch(source: AsyncIterable[T], depth: int) -> AsyncIterator[T]:
    """Iterate `source` while reading up to `depth` items ahead in a background task.

    Overlaps the producer (e.g. receiving the next network chunk) with the consumer (e.g. hashing
    and writing the current one); memory stays bounded by `depth` items. Errors of the source are
    re-raised in order; closing or cancelling the consumer stops the reader.
    """
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=depth)

    async def read() -> None:
        try:
            async for item in source:
                await queue.put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)
            return
        await queue.put(_END)

    reader = asyncio.create_task(read())
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


async def completion_order(requests: AsyncIterable[T], handle: Callable[[T], Awaitable[R]]) -> AsyncIterator[R]:
    """Run `handle` on every item of a request stream concurrently and yield each result as soon as
    it is ready (completion order, not arrival order); once the stream ends, wait for the rest.

    For bidirectional streams whose requests are independent (Open Inference Protocol streaming:
    responses are matched by id, and concurrent requests can share a batch). An exception of
    `handle` or of the stream ends the iteration with it; closing the consumer cancels everything.
    """
    results: asyncio.Queue[object] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def run(request: T) -> None:
        # put_nowait: the queue is unbounded (the stream's own flow control bounds the requests).
        try:
            results.put_nowait(await handle(request))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            results.put_nowait(exc)

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(run(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(set(tasks))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await results.put(exc)
        await results.put(_END)

    reader = asyncio.create_task(read())
    try:
        while (item := await results.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        for task in (reader, *tasks):
            task.cancel()


class Backoff:
    """Exponential backoff with jitter, so many clients do not retry a recovering server in lockstep."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial, self._maximum = initial, max(initial, maximum)
        self._next = initial

    def reset(self) -> None:
        self._next = self._initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        return delay * random.uniform(0.8, 1.2)


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a service process's main coroutine, on uvloop where it is installed.

    uvloop makes grpcio's asyncio server ~25% faster per request here (a bare unary server: ~1,450
    → ~1,850 req/s); asyncio's own loop remains the fallback.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
