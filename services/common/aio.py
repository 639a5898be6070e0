"""Small asyncio helpers shared by services."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import random
import sys
import time
import types
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

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


def start_eagerly(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """Run `coro` at once up to its first suspension, the rest as a task: Python 3.12's eager tasks.

    Work that completes without waiting (a small model executed inline, a message handed to gRPC)
    then costs no task and no trip through the event loop (~25 µs on a busy 2-core host). As in a
    task, the coroutine runs in its own copy of the current context, so whatever it sets there (an
    attached trace span) never leaks into the caller's. Before 3.12, `asyncio.current_task()`
    during the first step is still the caller's task: code that cancels "the current task" (such
    as `asyncio.timeout`) must not run before the coroutine's first suspension.
    """
    loop = asyncio.get_running_loop()
    if sys.version_info >= (3, 12):
        return asyncio.Task(coro, loop=loop, eager_start=True)  # type: ignore[call-arg]
    context = contextvars.copy_context()
    try:
        awaited = context.run(coro.send, None)
    except StopIteration as done:
        future = loop.create_future()
        future.set_result(done.value)
        return future
    except asyncio.CancelledError:
        future = loop.create_future()
        future.cancel()
        return future
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - kept in the future, as a task would
        future = loop.create_future()
        future.set_exception(exc)
        return future
    return loop.create_task(_resumed(coro, awaited), context=context)


@types.coroutine
def _resumed(coro: Coroutine[Any, Any, T], awaited: Any) -> Any:
    # The task waits on what `coro` awaits; each resumption (a send, or a throw such as a
    # cancellation) goes on to `coro` where it is suspended.
    while True:
        try:
            value = yield awaited
        except BaseException as exc:  # noqa: BLE001 - thrown in by the task, handed to the coroutine
            try:
                awaited = coro.throw(exc)
            except StopIteration as done:
                return done.value
            continue
        try:
            awaited = coro.send(value)
        except StopIteration as done:
            return done.value


class SerialWriter(Generic[T]):
    """Writes items with `write` one at a time and in order, never in a sender's task.

    gRPC allows one write in flight per call, and cancelling a write cancels the whole call: senders
    hand items over with `send` and do not wait. An item sent while nothing is being written starts
    at once (`start_eagerly`); the rest of that write and the items sent meanwhile go on in one
    writer task. A failed write goes to `on_error` and the items still waiting are dropped.
    """

    def __init__(self, write: Callable[[T], Awaitable[Any]], on_error: Callable[[Exception], None]) -> None:
        self._write = write
        self._on_error = on_error
        self._waiting: collections.deque[T] = collections.deque()
        self._writer: asyncio.Future[None] | None = None

    def send(self, item: T) -> None:
        self._waiting.append(item)
        if self._writer is None or self._writer.done():
            self._writer = start_eagerly(self._drain())
        # else: the writer takes it after the write in flight.

    async def _drain(self) -> None:
        try:
            while self._waiting:
                await self._write(self._waiting.popleft())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the owner, who ends the stream
            self._waiting.clear()
            self._on_error(exc)

    async def flush(self) -> None:
        """Return when everything sent so far is written (or dropped after a failed write)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.wait({self._writer})  # never cancels the write, even if we are cancelled

    async def close(self) -> None:
        """Drop what is waiting and cancel the write in flight."""
        self._waiting.clear()
        writer = self._writer
        if writer is not None and not writer.done():
            writer.cancel()
            await asyncio.wait({writer})


async def answer_concurrently(
    requests: AsyncIterable[T], handle: Callable[[T], Awaitable[R]], write: Callable[[R], Awaitable[Any]]
) -> None:
    """Run `handle` on every item of a request stream concurrently and `write` each result as soon
    as it is ready (completion order, one write at a time); once the stream ends, wait for the rest.

    For bidirectional streams whose requests are independent (Open Inference Protocol streaming:
    responses are matched by id, and concurrent requests can share a batch); `write` is the call's
    `context.write`. Each handler starts eagerly: one that needs no waiting (a small model executed
    inline) has its answer on the wire before the next request is read, with no task and no trip
    through the event loop on the way. An exception of `handle`, of `write` or of the stream ends
    the call with it; cancelling the call cancels every handler.
    """
    failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def fail(exc: BaseException) -> None:
        if not failure.done():
            failure.set_exception(exc)

    writer: SerialWriter[R] = SerialWriter(write, fail)
    handlers: set[asyncio.Future[None]] = set()

    async def run(request: T) -> None:
        try:
            writer.send(await handle(request))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - ends the call, see below
            fail(exc)

    def start(request: T) -> None:
        handler = start_eagerly(run(request))
        if not handler.done():
            handlers.add(handler)
            handler.add_done_callback(handlers.discard)

    async def read() -> None:
        dispatch = getattr(requests, "dispatch", None)
        if dispatch is not None:  # a request stream that pushes (services.common.h2grpc): no loop trip per request
            await dispatch(start)
        else:
            async for request in requests:
                start(request)
        while handlers:
            await asyncio.wait(set(handlers))
        await writer.flush()

    reader = asyncio.ensure_future(read())
    try:
        await asyncio.wait((reader, failure), return_when=asyncio.FIRST_COMPLETED)
        if failure.done():
            failure.result()
        reader.result()
    finally:
        for future in (reader, *handlers):
            future.cancel()
        await writer.close()
        if failure.done():
            failure.exception()  # retrieved: a failure after the reader's own error is not logged as lost
        else:
            failure.cancel()


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


def poll_while_pending(future: asyncio.Future[Any], seconds: float) -> None:
    """Keep the event loop polling its sockets (a zero-timeout wait) instead of sleeping, until
    `future` is done or `seconds` have passed, whichever comes first.

    An answer expected within microseconds (a small model on a nearby node) is then read by a
    running process: a sleeping one must be woken by the kernel first, which costs the sender a
    wake-up and the receiver its scheduling latency, tens of µs on the critical path and most in
    VMs, where an idle vCPU halts. It is the idle poll of reactors such as Seastar's. The price is
    CPU while nothing else runs: one short callback per loop iteration, for at most `seconds` per
    call. Other work on the loop goes on as usual meanwhile.
    """
    loop = future.get_loop()
    until = time.monotonic() + seconds  # not loop.time(): uvloop's is cached per iteration, in ms

    def again() -> None:
        if not future.done() and time.monotonic() < until:
            loop.call_soon(again)

    loop.call_soon(again)


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
