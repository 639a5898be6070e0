"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Future], *, retry_seconds: float = 0.5) -> None:
    """Cancel `tasks` and wait until every one has finished.

    Cancellation is repeated while a task is still running: on Python 3.11, `asyncio.wait_for` can
    swallow a cancellation that arrives as its inner call completes, and a task that lost its
    cancellation that way would otherwise keep its caller waiting forever.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=retry_seconds)
