"""services.common.aio: stream helpers (pure asyncio, no servers)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator

import pytest

from services.common.aio import SerialWriter, answer_concurrently, prefetch, start_eagerly


async def stream(items, gap: float = 0.0, fail_after: int | None = None) -> AsyncIterator:
    for index, item in enumerate(items):
        if fail_after is not None and index == fail_after:
            raise ValueError("stream broke")
        yield item
        await asyncio.sleep(gap)


async def answers(requests, handle) -> list:
    """Run answer_concurrently with a write that records what was written, in order."""
    written = []

    async def write(item) -> None:
        await asyncio.sleep(0)  # a real write waits for gRPC
        written.append(item)

    await answer_concurrently(requests, handle, write)
    return written


async def test_answers_are_written_each_when_ready_and_all_before_the_end():
    async def slow_echo(delay: float) -> float:
        await asyncio.sleep(delay)
        return delay

    assert await answers(stream([0.3, 0.1, 0.2]), slow_echo) == [0.1, 0.2, 0.3]  # not arrival order


async def test_requests_are_handled_concurrently():
    running = 0
    peak = 0

    async def handle(item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return item

    got = await answers(stream(range(10)), handle)
    assert sorted(got) == list(range(10)) and peak == 10


async def test_errors_of_the_handler_of_the_write_and_of_the_stream_end_the_call():
    async def handle(item: int) -> int:
        if item == 2:
            raise KeyError("bad item")
        return item

    with pytest.raises(KeyError, match="bad item"):
        await answers(stream(range(4)), handle)

    async def echo(item: int) -> int:
        return item

    with pytest.raises(ValueError, match="stream broke"):
        await answers(stream(range(4), fail_after=2), echo)

    async def broken_write(item: int) -> None:
        raise ConnectionError("peer gone")

    with pytest.raises(ConnectionError, match="peer gone"):
        await answer_concurrently(stream(range(3)), echo, broken_write)


async def test_cancelling_the_call_cancels_running_handlers():
    cancelled = asyncio.Event()
    first_written = asyncio.Event()

    async def handle(item: int) -> int:
        if item == 0:
            return item
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return item

    async def write(item: int) -> None:
        first_written.set()

    call = asyncio.ensure_future(answer_concurrently(stream(range(3)), handle, write))
    await asyncio.wait_for(first_written.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert cancelled.is_set()


async def test_one_write_at_a_time_in_order_never_in_the_senders_task():
    in_flight = 0
    peak = 0
    written = []
    release = asyncio.Event()

    async def write(item: int) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        written.append(item)
        in_flight -= 1

    failures = []
    writer = SerialWriter(write, failures.append)
    for item in range(5):
        writer.send(item)  # never blocks the sender
    assert in_flight == 1 and written == []  # the first write started at once
    release.set()
    await asyncio.wait_for(writer.flush(), 5)
    assert written == [0, 1, 2, 3, 4] and peak == 1 and failures == []


async def test_a_failed_write_is_reported_and_drops_what_waits():
    async def write(item: int) -> None:
        await asyncio.sleep(0)
        if item == 1:
            raise ConnectionError("stream gone")

    failures = []
    writer = SerialWriter(write, failures.append)
    for item in range(4):
        writer.send(item)
    await asyncio.wait_for(writer.flush(), 5)
    assert [str(f) for f in failures] == ["stream gone"]


async def test_prefetch_keeps_order_and_reraises():
    assert [item async for item in prefetch(stream(range(5)), depth=2)] == list(range(5))
    with pytest.raises(ValueError, match="stream broke"):
        [item async for item in prefetch(stream(range(5), fail_after=3), depth=2)]


# ------------------------------------------------------------------------------------ start_eagerly


async def test_start_eagerly_finishes_work_that_never_waits_without_a_task():
    steps = []

    async def quick() -> str:
        steps.append("ran")
        return "done"

    before = len(asyncio.all_tasks())
    future = start_eagerly(quick())
    assert steps == ["ran"]  # before the caller yields to the loop
    assert future.done() and future.result() == "done"
    assert not isinstance(future, asyncio.Task) and len(asyncio.all_tasks()) == before


async def test_start_eagerly_keeps_an_error_raised_before_any_wait():
    async def broken() -> None:
        raise ValueError("bad input")

    future = start_eagerly(broken())
    assert future.done()
    with pytest.raises(ValueError, match="bad input"):
        future.result()


async def test_start_eagerly_runs_up_to_the_first_wait_then_continues_as_a_task():
    gate = asyncio.get_running_loop().create_future()
    steps = []

    async def waits() -> int:
        steps.append("first")
        value = await gate
        steps.append("second")
        await asyncio.sleep(0)  # a bare yield to the loop works too
        return value + 1

    future = start_eagerly(waits())
    assert steps == ["first"] and not future.done()
    gate.set_result(41)
    assert await asyncio.wait_for(future, 5) == 42
    assert steps == ["first", "second"]


async def test_start_eagerly_passes_an_error_and_a_cancellation_to_the_coroutine():
    gate = asyncio.get_running_loop().create_future()

    async def fails() -> None:
        await gate

    future = start_eagerly(fails())
    gate.set_exception(KeyError("gone"))
    with pytest.raises(KeyError):
        await future

    cleaned = []
    blocker = asyncio.get_running_loop().create_future()

    async def cancellable() -> None:
        try:
            await blocker
        finally:
            cleaned.append(True)

    future = start_eagerly(cancellable())
    await asyncio.sleep(0)
    future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await future
    assert cleaned == [True] and blocker.cancelled()


async def test_start_eagerly_isolates_context_changes_from_the_caller():
    variable: contextvars.ContextVar[str] = contextvars.ContextVar("variable", default="caller")
    gate = asyncio.get_running_loop().create_future()
    seen = []

    async def sets() -> None:
        variable.set("handler")
        await gate
        seen.append(variable.get())

    future = start_eagerly(sets())
    assert variable.get() == "caller"  # the first step's change stayed in the handler's copy
    gate.set_result(None)
    await future
    assert seen == ["handler"]


async def test_a_request_that_needs_no_waiting_is_answered_before_the_next_is_read():
    events = []

    async def requests():
        for item in (1, 2):
            events.append(f"read {item}")
            yield item

    async def handle(item: int) -> int:
        events.append(f"handled {item}")
        return item * 10

    async def write(answer: int) -> None:
        events.append(f"written {answer}")
        await asyncio.sleep(0)

    await answer_concurrently(requests(), handle, write)
    # With a task per request (or a queue to a writer), request 2 would be read before 1 was answered.
    assert events == ["read 1", "handled 1", "written 10", "read 2", "handled 2", "written 20"]
