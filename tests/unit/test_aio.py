"""services.common.aio: stream helpers (pure asyncio, no servers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.common.aio import completion_order, prefetch


async def stream(items, gap: float = 0.0, fail_after: int | None = None) -> AsyncIterator:
    for index, item in enumerate(items):
        if fail_after is not None and index == fail_after:
            raise ValueError("stream broke")
        yield item
        await asyncio.sleep(gap)


async def test_completion_order_yields_each_result_when_ready_and_waits_for_all():
    async def slow_echo(delay: float) -> float:
        await asyncio.sleep(delay)
        return delay

    got = [result async for result in completion_order(stream([0.3, 0.1, 0.2]), slow_echo)]
    assert got == [0.1, 0.2, 0.3]  # not arrival order: each as soon as it is done


async def test_completion_order_runs_requests_concurrently():
    running = 0
    peak = 0

    async def handle(item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return item

    got = [result async for result in completion_order(stream(range(10)), handle)]
    assert sorted(got) == list(range(10)) and peak == 10


async def test_completion_order_raises_errors_of_the_handler_and_of_the_stream():
    async def handle(item: int) -> int:
        if item == 2:
            raise KeyError("bad item")
        return item

    with pytest.raises(KeyError, match="bad item"):
        [result async for result in completion_order(stream(range(4)), handle)]

    async def echo(item: int) -> int:
        return item

    with pytest.raises(ValueError, match="stream broke"):
        [result async for result in completion_order(stream(range(4), fail_after=2), echo)]


async def test_closing_the_consumer_cancels_running_handlers():
    cancelled = asyncio.Event()
    waiting = asyncio.Event()

    async def handle(item: int) -> int:
        if item == 0:
            await waiting.wait()
            return item
        waiting.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return item

    results = completion_order(stream(range(3)), handle)
    assert await anext(results) == 0
    await results.aclose()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_prefetch_keeps_order_and_reraises():
    assert [item async for item in prefetch(stream(range(5)), depth=2)] == list(range(5))
    with pytest.raises(ValueError, match="stream broke"):
        [item async for item in prefetch(stream(range(5), fail_after=3), depth=2)]
