"""services.common.aio: stream helpers (pure asyncio, no servers)."""

from __future__ import annotations

import asyncio
import contextvars
import selectors
import socket
import time
from collections.abc import AsyncIterator

import pytest

from services.common.aio import SerialWriter, answer_concurrently, poll_while_pending, prefetch, start_eagerly


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


# ------------------------------------------------------------------------------ poll_while_pending


class RecordingSelector(selectors.DefaultSelector):
    """The loop's selector, keeping the timeout of every select(): 0 is a poll, > 0 a sleep."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float | None] = []

    def select(self, timeout=None):
        self.timeouts.append(timeout)
        return super().select(timeout)


def on_recording_loop(main):
    """Run `main(loop, selector)` to completion on a fresh selector loop of its own."""
    selector = RecordingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        return loop.run_until_complete(main(loop, selector))
    finally:
        loop.close()


async def timeouts_during(selector: RecordingSelector, awaitable) -> list:
    """The select() timeouts while `awaitable` runs."""
    selector.timeouts.clear()
    await awaitable
    return list(selector.timeouts)


def polls(timeouts: list) -> int:
    return sum(1 for t in timeouts if t == 0)


def sleeps(timeouts: list, at_least: float = 0.01) -> int:
    return sum(1 for t in timeouts if t is None or t >= at_least)


def test_the_loop_polls_while_the_future_is_pending_and_sleeps_again_once_it_is_done():
    async def main(loop, selector):
        # Without polling, a sleep is one blocking select() of about its length.
        quiet = await timeouts_during(selector, asyncio.sleep(0.05))
        assert sleeps(quiet, 0.02) >= 1 and polls(quiet) <= 2
        future = loop.create_future()
        poll_while_pending(future, 10.0)
        polling = await timeouts_during(selector, asyncio.sleep(0.05))
        assert len(polling) >= 20 and all(t == 0 for t in polling), sorted(set(polling))[-3:]
        future.set_result(None)
        await asyncio.sleep(0)  # the poll's callback sees the future done
        await asyncio.sleep(0)
        after = await timeouts_during(selector, asyncio.sleep(0.05))
        assert sleeps(after, 0.02) >= 1 and polls(after) <= 2, after

    on_recording_loop(main)


def test_polling_stops_when_the_future_completes_meanwhile():
    async def main(loop, selector):
        future = loop.create_future()
        loop.call_later(0.03, future.set_result, "done")
        poll_while_pending(future, 10.0)
        timeouts = await timeouts_during(selector, asyncio.sleep(0.15))
        assert future.result() == "done"
        assert polls(timeouts) >= 10  # polling up to ~30 ms...
        assert sleeps(timeouts, 0.05) >= 1  # ...then sleeping for the rest (~120 ms)
        assert timeouts[-1] != 0 or sleeps(timeouts[-5:], 0.05) >= 1

    on_recording_loop(main)


def test_polling_stops_by_itself_after_the_given_seconds():
    async def main(loop, selector):
        future = loop.create_future()  # never done
        started = time.monotonic()
        poll_while_pending(future, 0.02)
        timeouts = await timeouts_during(selector, asyncio.sleep(0.15))
        assert polls(timeouts) >= 5 and sleeps(timeouts, 0.05) >= 1
        first_sleep = next(i for i, t in enumerate(timeouts) if t is None or t > 0)
        assert polls(timeouts[first_sleep:]) <= 2  # no polling once it stopped
        later = await timeouts_during(selector, asyncio.sleep(0.05))
        assert sleeps(later, 0.02) >= 1 and polls(later) <= 2, later
        assert not future.done() and time.monotonic() - started >= 0.2
        future.cancel()

    on_recording_loop(main)


def test_a_future_already_done_is_not_polled_for():
    async def main(loop, selector):
        future = loop.create_future()
        future.set_result(1)
        poll_while_pending(future, 10.0)
        timeouts = await timeouts_during(selector, asyncio.sleep(0.05))
        assert sleeps(timeouts, 0.02) >= 1 and polls(timeouts) <= 2, timeouts

    on_recording_loop(main)


def test_other_callbacks_timers_and_sockets_go_on_while_polling():
    async def main(loop, selector):
        future = loop.create_future()
        poll_while_pending(future, 10.0)
        events: list[str] = []
        loop.call_soon(events.append, "soon")
        loop.call_later(0.01, events.append, "timer")
        left, right = socket.socketpair()
        left.setblocking(False)
        right.setblocking(False)
        try:
            received = loop.create_future()
            loop.add_reader(left, lambda: received.done() or received.set_result(left.recv(100)))
            loop.call_later(0.005, right.send, b"ping")
            selector.timeouts.clear()
            assert await asyncio.wait_for(received, 2.0) == b"ping"  # the poll still reads sockets
            loop.remove_reader(left)
            await asyncio.sleep(0.02)
            assert polls(selector.timeouts) >= 10 and sleeps(selector.timeouts) == 0  # polling all along
            assert events == ["soon", "timer"]
            ticks = 0

            async def ticker() -> None:  # a task that yields at every step still gets its turns
                nonlocal ticks
                while not future.done():
                    ticks += 1
                    await asyncio.sleep(0)

            task = loop.create_task(ticker())
            await asyncio.sleep(0.01)
            future.set_result(None)
            await asyncio.wait_for(task, 1.0)
            assert ticks >= 10
        finally:
            left.close()
            right.close()

    on_recording_loop(main)
