"""A process's liveness in etcd: one lease, kept alive in the background (like etcd's concurrency.Session).

Keys written with `lease=session.lease_id` vanish when the process dies, shuts down or loses etcd for
longer than the TTL. `lost` is the signal to stop acting on anything bound to the lease (leadership,
registrations): it is set once the lease may be gone, and stays set. A lost session cannot recover;
close it and start a new one.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from services.common.etcd.client import EtcdClient, EtcdError, SessionLost

# Pause between keep-alive retries while etcd is unreachable (bounded by the TTL left).
_RETRY_SECONDS = 0.25


class Session:
    def __init__(self, client: EtcdClient, ttl_seconds: int | None = None) -> None:
        self._client = client
        self._requested_ttl = ttl_seconds if ttl_seconds is not None else client.settings.session_ttl_seconds
        if self._requested_ttl <= 0:
            raise ValueError("session ttl must be positive")
        self._lease_id: int | None = None
        self._ttl = 0
        # Monotonic time after which the lease may have expired on the server.
        self._expires_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.lost = asyncio.Event()
        self._log = structlog.get_logger(__name__)

    @property
    def lease_id(self) -> int:
        if self._lease_id is None:
            raise RuntimeError("session not started")
        return self._lease_id

    @property
    def ttl(self) -> int:
        """TTL granted by etcd (it may raise a requested TTL below its minimum)."""
        return self._ttl

    @property
    def client(self) -> EtcdClient:
        return self._client

    async def start(self) -> Session:
        """Grant the lease and start keep-alive; raises EtcdUnavailable when etcd is unreachable."""
        if self._lease_id is not None:
            raise RuntimeError("session already started")
        granted_at = time.monotonic()
        self._lease_id, self._ttl = await self._client._grant_lease(self._requested_ttl)
        self._expires_at = granted_at + self._ttl
        self._task = asyncio.get_running_loop().create_task(self._keep_alive(), name=f"etcd-lease-{self._lease_id:x}")
        return self

    def ensure_alive(self) -> None:
        """Raise SessionLost if the lease may be gone."""
        if self.lost.is_set():
            raise SessionLost(f"etcd session lease {self._lease_id or 0:x} lost")

    async def _keep_alive(self) -> None:
        assert self._lease_id is not None
        interval = self._ttl / 3
        delay = self._next_refresh(interval)
        while True:
            await asyncio.sleep(delay)
            remaining = self._expires_at - time.monotonic()
            if remaining <= 0:
                self._mark_lost("lease not refreshed within its ttl")
                return
            sent_at = time.monotonic()
            try:
                # Waiting past the expiry is pointless: the lease is gone by then.
                ttl = await asyncio.wait_for(self._client.refresh_lease(self._lease_id), timeout=remaining)
            except (EtcdError, TimeoutError) as exc:
                self._log.info("etcd lease keep-alive failed, retrying", lease=f"{self._lease_id:x}", error=str(exc))
                delay = min(_RETRY_SECONDS, interval)
                continue
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Python 3.11's wait_for can swallow a cancellation that arrives as the call completes.
                raise asyncio.CancelledError
            if ttl <= 0:
                self._mark_lost("lease expired on the server")
                return
            self._expires_at = sent_at + ttl
            delay = self._next_refresh(interval)

    def _next_refresh(self, interval: float) -> float:
        # Normally a third of the TTL. A grant answered late (etcd paused while it was on the way)
        # leaves less of the TTL we may count on: refresh in time rather than call the lease lost.
        return min(interval, max(0.0, self._expires_at - time.monotonic()) / 2)

    def _mark_lost(self, reason: str) -> None:
        if not self.lost.is_set():
            self._log.warning("etcd session lost", lease=f"{self._lease_id or 0:x}", reason=reason)
            self.lost.set()

    async def close(self, *, revoke: bool = True) -> None:
        """Stop keep-alive and revoke the lease (deleting its keys). Best effort; never raises.
        `revoke=False` leaves the lease to its TTL (or to a later revoke by id)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            # asyncio.wait neither raises the task's CancelledError nor swallows our own cancellation.
            await asyncio.wait([self._task])
        if self._lease_id is not None and revoke:
            # Revoke even when lost: after an outage the lease may still exist and hold keys.
            try:
                await self._client.revoke_lease(self._lease_id)
            except Exception as exc:
                self._log.info(
                    "etcd lease revoke failed; it expires by ttl", lease=f"{self._lease_id:x}", error=str(exc)
                )
        self.lost.set()

    async def __aenter__(self) -> Session:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
