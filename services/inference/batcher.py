"""Dynamic batching of one model version.

Requests queue on the event loop; batches run on the model's own executor thread, one at a time, so
the loop stays free while the model computes. The batcher is driven by callbacks rather than a worker
task (a request arriving, a batch finishing, the queue delay expiring), which spares a task switch per
batch on the hot path.

Small models skip the thread: once a model's measured execution time (moving average) is below
`inline_below_s`, a request that finds nothing running or waiting executes at once on the loop, and
batches formed while holding for `max_queue_delay` run on the loop at the end of the iteration. Two
thread hand-offs cost more than such a model computes; a model that gets slower moves back.

While a batch runs, new requests accumulate, which is where most merging comes from under load;
`max_queue_delay` additionally holds the oldest request back until enough rows arrive (0: merge
only what is already waiting, never wait).

Merging rules: requests merge only when their inputs agree on every non-batch dimension (`key`),
in arrival order, up to `max_batch_size` rows. A request with more rows than that runs alone, unless
the backend cannot execute that many rows at once (`max_rows`), in which case it is rejected. Each
caller gets exactly its own rows back: outputs are sliced by row counts.

Timeouts: a request fails with DEADLINE_EXCEEDED when it waits longer than the queue timeout, or
when the caller's deadline passes (queued or executing: its result is then dropped). A cancelled
caller leaves the queue at once.

Tracing: requests that arrive traced (their parent span is recording) get a "queue wait" span; each
batch with traced requests gets a "batch execution" span, child of the first traced request and
linked to every traced request's span. Untraced requests cost no spans.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Status, StatusCode

from services.common.errors import AimaasError, DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.inference.backends.base import Backend
from services.inference.stats import ModelStats

# Builds one caller's response from its slice of the outputs; runs on the model thread.
Finish = Callable[[dict[str, np.ndarray]], Any]


class ExecutionFailed(AimaasError):
    """The backend failed to execute a batch; the message carries the backend's reason."""

    code = grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class BatchPolicy:
    # False: every request executes alone (still on the model thread, still queued and bounded).
    merge: bool
    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    # Longest wait in the queue; None: only the caller's deadline applies.
    queue_timeout_s: float | None
    # Most rows one execution accepts (the backend's limit); None: any.
    max_rows: int | None = None
    # Batches whose measured execution time (moving average) is below this run on the event loop
    # itself, at the end of the current loop iteration, instead of on the model thread: for small
    # models the two thread hand-offs cost more than the computation. 0: always the model thread.
    inline_below_s: float = 0.0


class _Work:
    """One queued request."""

    __slots__ = (
        "inputs", "rows", "key", "outputs", "finish", "future", "enqueued", "enqueued_ns",
        "deadline", "queued", "timer", "timer_for_deadline", "span", "parent",
    )

    def __init__(self, inputs, rows, key, outputs, finish, future, enqueued, deadline) -> None:
        self.inputs: Sequence[np.ndarray] = inputs
        self.rows: int = rows
        self.key: Hashable = key
        self.outputs: tuple[str, ...] = outputs
        self.finish: Finish = finish
        self.future: asyncio.Future[Any] = future
        self.enqueued: float = enqueued
        self.enqueued_ns: int = time.perf_counter_ns()
        self.deadline: float | None = deadline
        self.queued = True
        self.timer: asyncio.TimerHandle | None = None
        self.timer_for_deadline = False
        # Set only for traced requests: the queue-wait span and the request's span.
        self.span: trace.Span | None = None
        self.parent: trace.Span | None = None


class Batcher:
    """The queue and executor of one model version; see the module docstring."""

    def __init__(
        self,
        *,
        label: str,
        backend: Backend,
        input_names: Sequence[str],
        output_names: Sequence[str],
        policy: BatchPolicy,
        executor: Executor,
        stats: ModelStats,
        tracer: trace.Tracer,
        logger: structlog.stdlib.BoundLogger,
    ) -> None:
        self.label = label
        self.policy = policy
        self._backend = backend
        self._input_names = tuple(input_names)
        self._output_names = tuple(output_names)
        self._executor = executor
        self._stats = stats
        self._tracer = tracer
        self._log = logger
        self._queue: collections.deque[_Work] = collections.deque()
        self._rows_by_key: dict[Hashable, int] = {}
        self._hold = policy.merge and policy.max_queue_delay_s > 0
        self._hold_timer: asyncio.TimerHandle | None = None
        self._running = False
        self._accepting = True
        self._draining = False
        self._drained: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._span_attributes = {"aimaas.model": label}
        # Moving average of batch execution time (ns); None until the first batch ran on the thread.
        self._execution_ns: float | None = None
        self._slow_before = False  # the last run took over 4x the estimate
        self._inline_below_ns = policy.inline_below_s * 1e9

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._drained = asyncio.Event()

    # ----------------------------------------------------------------------------------- callers

    async def submit(
        self,
        inputs: Sequence[np.ndarray],
        rows: int,
        key: Hashable,
        outputs: tuple[str, ...],
        finish: Finish,
        *,
        deadline: float | None = None,
        parent: otel_context.Context | None = None,
    ) -> Any:
        """Queue one validated request (inputs in model order) and wait for its response.

        `deadline` is absolute, on the event loop's clock (`loop.time()`); `parent` is the request's
        trace context (default: the current one).
        """
        if not self._accepting:
            raise Unavailable(f"{self.label} is unloading")
        policy = self.policy
        if policy.max_rows is not None and rows > policy.max_rows:
            raise InvalidArgument(
                f"the request has {rows} rows but {self.label} executes at most {policy.max_rows} rows at once"
            )
        if len(self._queue) >= policy.max_queue_size:
            raise ResourceExhausted(
                f"the queue of {self.label} is full ({policy.max_queue_size} requests waiting); retry later"
            )
        loop = self._loop
        assert loop is not None, "Batcher.start() was not called"
        now = loop.time()
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded(f"the deadline passed before the request reached the queue of {self.label}")
        work = _Work(inputs, rows, key, outputs, finish, loop.create_future(), now, deadline)
        request_span = trace.get_current_span(parent)
        if request_span.is_recording():
            work.parent = request_span
            work.span = self._tracer.start_span("queue wait", context=parent)
        if self._inline_now():
            return self._run_now(work)
        expire_at = deadline
        if policy.queue_timeout_s is not None:
            queue_deadline = now + policy.queue_timeout_s
            if expire_at is None or queue_deadline < expire_at:
                expire_at = queue_deadline
        if expire_at is not None:
            work.timer = loop.call_at(expire_at, self._expire, work)
            work.timer_for_deadline = expire_at == deadline
        self._queue.append(work)
        self._rows_by_key[key] = self._rows_by_key.get(key, 0) + rows
        self._schedule()
        try:
            return await work.future
        except asyncio.CancelledError:
            if work.queued:
                self._remove(work)
                self._end_span(work, "cancelled while queued")
            raise
        finally:
            if work.timer is not None:
                work.timer.cancel()

    def _remove(self, work: _Work) -> None:
        try:
            self._queue.remove(work)
        except ValueError:
            return
        work.queued = False
        self._forget_rows(work)
        if self._draining:
            self._schedule()  # the queue may be empty now

    def _forget_rows(self, work: _Work) -> None:
        left = self._rows_by_key[work.key] - work.rows
        if left:
            self._rows_by_key[work.key] = left
        else:
            del self._rows_by_key[work.key]

    @staticmethod
    def _end_span(work: _Work, error: str | None = None) -> None:
        if work.span is not None:
            if error is not None:
                work.span.set_status(Status(StatusCode.ERROR, error))
            work.span.end()

    def _expire(self, work: _Work) -> None:
        work.timer = None
        if work.future.done():
            return
        loop = self._loop
        assert loop is not None
        if work.queued:
            self._remove(work)
            waited_ms = (loop.time() - work.enqueued) * 1000
            if work.timer_for_deadline:
                message = f"deadline exceeded after {waited_ms:.0f} ms waiting in the queue of {self.label}"
            else:
                message = (
                    f"the request waited more than the {self.policy.queue_timeout_s * 1000:.0f} ms queue timeout "
                    f"of {self.label}"
                )
            self._end_span(work, message)
            work.future.set_exception(DeadlineExceeded(message))
            self._schedule()  # the head may have changed
        elif work.deadline is not None:
            if work.timer_for_deadline or loop.time() >= work.deadline:
                work.future.set_exception(
                    DeadlineExceeded(f"deadline exceeded while {self.label} was executing the request")
                )
            else:  # the queue timeout no longer applies once executing; the caller's deadline does
                work.timer = loop.call_at(work.deadline, self._expire, work)
                work.timer_for_deadline = True

    # ----------------------------------------------------------------------------------- batches

    def _schedule(self) -> None:
        """Start the next batch if the model thread is free and a batch is due."""
        if self._running:
            return  # the running batch's completion calls back here
        queue = self._queue
        if not queue:
            if self._draining and self._drained is not None:
                self._drained.set()
            return
        loop = self._loop
        assert loop is not None
        if self._hold and not self._draining:
            head = queue[0]
            if self._rows_by_key[head.key] < self.policy.max_batch_size:
                release = head.enqueued + self.policy.max_queue_delay_s
                if release > loop.time():
                    if self._hold_timer is None or self._hold_timer.when() != release:
                        if self._hold_timer is not None:
                            self._hold_timer.cancel()
                        self._hold_timer = loop.call_at(release, self._release)
                    return
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._running = True
        if self._execution_ns is not None and self._execution_ns < self._inline_below_ns:
            # Deferred to the end of this loop iteration so requests arriving meanwhile still merge.
            loop.call_soon(self._run_inline)
            return
        batch = self._take()
        try:
            self._start(batch)
        except Exception:  # noqa: BLE001 - never leave the batcher stuck in "running"
            self._log.exception("batch dispatch failed", model=self.label)
            self._fail(batch, ExecutionFailed(f"{self.label} failed to start the batch"))
            self._running = False
            loop.call_soon(self._schedule)

    def _inline_now(self) -> bool:
        """A fast model with nothing running or waiting (and no queue delay to honour): nothing could
        merge with this request, so it runs at once, sparing the queue's two loop iterations."""
        return (
            not self._running
            and not self._queue
            and not self._hold
            and self._accepting
            and self._execution_ns is not None
            and self._execution_ns < self._inline_below_ns
        )

    def _run_now(self, work: _Work) -> Any:
        work.queued = False
        batch = [work]
        self._running = True
        try:
            rows, span = self._begin(batch)
            # The outcome goes straight to _deliver: a concurrent.futures.Future here (a Condition
            # per request) would only carry it across a thread boundary that the inline path lacks.
            outcome, error = None, None
            try:
                outcome = self._execute(batch, work.rows)
            except Exception as exc:  # noqa: BLE001 - delivered to the caller like a thread failure
                error = exc
            self._running = False
            self._deliver(batch, rows, span, outcome, error)
        finally:
            self._running = False
            if self._queue:  # nothing can queue meanwhile (no await above), but stay safe
                self._schedule()
        return work.future.result()

    def _run_inline(self) -> None:
        batch = self._take() if self._queue else []
        if not batch:  # everything waiting left (cancelled, expired) before its turn
            self._running = False
            self._schedule()
            return
        rows, span = self._begin(batch)
        # As in _run_now: no concurrent.futures.Future, the outcome goes straight to _deliver.
        outcome, error = None, None
        try:
            outcome = self._execute(batch, rows)
        except Exception as exc:  # noqa: BLE001 - delivered to the batch's callers like a thread failure
            error = exc
        self._running = False
        try:
            self._deliver(batch, rows, span, outcome, error)
        finally:
            self._schedule()

    def _release(self) -> None:
        self._hold_timer = None
        self._schedule()

    def _take(self) -> list[_Work]:
        queue = self._queue
        if not self.policy.merge:
            batch = [queue.popleft()]
        else:
            limit = self.policy.max_batch_size
            key = queue[0].key
            if len(self._rows_by_key) == 1 and self._rows_by_key[key] <= limit:
                batch = list(queue)  # everything waiting is compatible and fits
                queue.clear()
            else:
                batch, keep, rows, taking = [], collections.deque(), 0, True
                for work in queue:
                    if taking and work.key == key:
                        if not batch or rows + work.rows <= limit:
                            batch.append(work)
                            rows += work.rows
                            continue
                        taking = False  # the first in line that does not fit: keep arrival order
                    keep.append(work)
                self._queue = keep
        for work in batch:
            work.queued = False
            self._forget_rows(work)
        return batch

    def _start(self, batch: list[_Work]) -> None:
        rows, span = self._begin(batch)
        loop = self._loop
        assert loop is not None
        # Straight to the executor and back with one call_soon_threadsafe: cheaper than
        # run_in_executor's chained asyncio future.
        future = self._executor.submit(self._execute, batch, rows)
        future.add_done_callback(
            lambda done: loop.call_soon_threadsafe(self._finished, batch, rows, span, done)
        )

    def _begin(self, batch: list[_Work]) -> tuple[int, trace.Span | None]:
        """Queue-time statistics and the batch span, as a batch leaves the queue."""
        now_ns = time.perf_counter_ns()
        stats = self._stats
        traced = []
        for work in batch:
            stats.record_queue(now_ns - work.enqueued_ns)
            if work.span is not None:
                work.span.end()
                traced.append(work)
        # Single requests (most of them, and every inline one) skip the generator.
        rows = batch[0].rows if len(batch) == 1 else sum(work.rows for work in batch)
        span = None
        if traced:
            span = self._tracer.start_span(
                "batch execution",
                context=trace.set_span_in_context(traced[0].parent),
                links=[Link(work.parent.get_span_context()) for work in traced],
                attributes={**self._span_attributes, "aimaas.batch.rows": rows, "aimaas.batch.requests": len(batch)},
            )
        return rows, span

    def _finished(self, batch: list[_Work], rows: int, span: trace.Span | None, future: concurrent.futures.Future) -> None:
        """A batch came back from the model thread: unwrap its future for _deliver."""
        self._running = False
        try:
            if future.cancelled():
                self._deliver(batch, rows, span, None, None, cancelled=True)
            elif (exc := future.exception()) is not None:
                self._deliver(batch, rows, span, None, exc)
            else:
                self._deliver(batch, rows, span, future.result())
        finally:
            self._schedule()

    def _deliver(
        self,
        batch: list[_Work],
        rows: int,
        span: trace.Span | None,
        outcome: tuple[list[Any], int, int, int] | None,
        exc: BaseException | None = None,
        *,
        cancelled: bool = False,
    ) -> None:
        """Hand a batch's outcome (what _execute returned), or its failure, to its callers."""
        if cancelled or exc is not None:
            message = f"{self.label} failed to execute: {exc or 'cancelled'}"
            self._log.warning("batch execution failed", model=self.label, error=str(exc), requests=len(batch))
            if span is not None:
                if exc is not None:
                    span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, message))
                span.end()
            self._fail(batch, exc if isinstance(exc, AimaasError) else ExecutionFailed(message))
            return
        assert outcome is not None
        results, input_ns, infer_ns, output_ns = outcome
        if span is not None:
            span.set_attributes(
                {"aimaas.compute_input_ns": input_ns, "aimaas.compute_infer_ns": infer_ns, "aimaas.compute_output_ns": output_ns}
            )
            span.end()
        self._stats.record_execution(rows, len(batch), input_ns, infer_ns, output_ns)
        took = input_ns + infer_ns + output_ns
        estimate = self._execution_ns
        slow = estimate is not None and took > 4 * estimate
        if slow and not self._slow_before:
            # One run far slower than usual is most likely a preempted thread (a busy host stalls
            # any thread for a millisecond now and then): it counts as 4x until the next run agrees.
            took = 4 * estimate
        self._slow_before = slow
        # Weighted towards the past so one fast batch does not move a slow model onto the loop.
        self._execution_ns = took if estimate is None else 0.9 * estimate + 0.1 * took
        for work, result in zip(batch, results):
            if work.future.done():  # deadline passed or caller gone while executing
                continue
            if isinstance(result, BaseException):
                work.future.set_exception(result)
            else:
                work.future.set_result(result)

    @staticmethod
    def _fail(batch: list[_Work], error: BaseException) -> None:
        for work in batch:
            if not work.future.done():
                work.future.set_exception(error)

    def _execute(self, batch: list[_Work], rows: int) -> tuple[list[Any], int, int, int]:
        """Runs on the model thread: merge inputs, run the model, split and encode outputs."""
        started = time.perf_counter_ns()
        single = len(batch) == 1
        if single:
            first = batch[0]
            inputs = dict(zip(self._input_names, first.inputs))
            wanted = first.outputs
        else:
            inputs = {
                name: np.concatenate([work.inputs[index] for work in batch])
                for index, name in enumerate(self._input_names)
            }
            wanted = batch[0].outputs
            if any(work.outputs != wanted for work in batch):
                wanted = tuple(n for n in self._output_names if any(n in work.outputs for work in batch))
        merged = time.perf_counter_ns()
        outputs = self._backend.infer(inputs, list(wanted))
        computed = time.perf_counter_ns()
        results: list[Any] = []
        if single:
            results.append(self._finish(first, outputs))
        else:
            for name in wanted:
                produced = outputs[name]
                if not produced.shape or produced.shape[0] != rows:
                    raise ExecutionFailed(
                        f"{self.label} returned output '{name}' of shape {list(produced.shape)} for a batch "
                        f"of {rows} rows; it cannot be split per request"
                    )
            offset = 0
            for work in batch:
                end = offset + work.rows
                results.append(self._finish(work, {name: outputs[name][offset:end] for name in work.outputs}))
                offset = end
        return results, merged - started, computed - merged, time.perf_counter_ns() - computed

    @staticmethod
    def _finish(work: _Work, outputs: dict[str, np.ndarray]) -> Any:
        try:
            return work.finish(outputs)
        except Exception as exc:  # noqa: BLE001 - one bad response fails its own request only
            return exc

    # ----------------------------------------------------------------------------------- closing

    async def close(self) -> None:
        """Stop accepting requests, run everything already queued, return when the last batch is done."""
        self._accepting = False
        self._draining = True
        if self._drained is None:
            return
        self._schedule()
        if self._queue or self._running:
            await self._drained.wait()

    def abort(self, error: AimaasError) -> None:
        """Stop accepting and fail every queued request with `error` (after a drain timed out)."""
        self._accepting = False
        while self._queue:
            work = self._queue.popleft()
            work.queued = False
            self._forget_rows(work)
            self._end_span(work, error.message)
            if not work.future.done():
                work.future.set_exception(error)
