"""Leader election, etcd style (as etcd's concurrency.Election).

Each candidate writes `<leader(name)>/<lease-id-hex>` bound to its session lease; the key with the
lowest create revision leads. A candidate waits for the deletion of the key just before its own
(no herd, no polling). Leadership ends with `resign()`, the session's end, or the key's deletion.

The leader must guard its writes with `fence()` in the same transaction: a leader that was paused or
partitioned past its TTL then cannot overwrite the new leader's work (no split brain).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

import aetcd.rpc as rpc
import structlog

from services.common.aio import Backoff
from services.common.etcd.client import (
    Compare,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    NotLeader,
    Op,
    SessionLost,
    _b,
    _prefix_end,
)
from services.common.etcd.session import Session

T = TypeVar("T")


class Election:
    def __init__(self, client: EtcdClient, session: Session, name: str) -> None:
        self._client = client
        self._session = session
        self.name = name
        self._prefix = client.keys.leader(name) + "/"
        self._key: str | None = None
        self._revision = 0
        self._leading = False
        self._monitor: asyncio.Task[None] | None = None
        # Set when leadership we held ends (resign, lost session, key deleted); cleared by campaign().
        self.leadership_lost = asyncio.Event()
        self._log = structlog.get_logger(__name__)

    @property
    def is_leader(self) -> bool:
        return self._leading and not self._session.lost.is_set()

    @property
    def leader_revision(self) -> int:
        """Create revision of our key while we lead (0 otherwise): a fencing token that only grows."""
        return self._revision if self._leading else 0

    @property
    def key(self) -> str | None:
        """Our candidate key, while campaigning or leading."""
        return self._key

    def fence(self) -> Compare:
        """A transaction guard that holds only while we still lead; include it in every leader write."""
        if not self.is_leader or self._key is None:
            raise NotLeader(f"not the leader of {self.name!r}")
        return Compare.create_revision(self._key, "==", self._revision)

    async def campaign(self, value: bytes) -> None:
        """Block until we lead. Rides out etcd outages while the session lives; raises SessionLost
        when it does not. Cancelling withdraws the candidacy."""
        if self.is_leader:
            await self.proclaim(value)
            return
        backoff = Backoff(0.1, 1.0)
        try:
            while True:
                self._session.ensure_alive()
                try:
                    self._key, self._revision = await self._register(value)
                    revision = await self._until_lost(self._wait_predecessors(self._revision))
                    # Our key may have expired or been deleted while we waited.
                    current = await self._client._range(_b(self._key))
                    if current.kvs and current.kvs[0].create_revision == self._revision:
                        break
                    self._log.warning("election key vanished while waiting; registering again", election=self.name)
                except EtcdUnavailable as exc:
                    self._log.info("etcd unavailable during campaign, retrying", election=self.name, error=str(exc))
                    await asyncio.sleep(backoff.next())
        except BaseException:
            await self._withdraw()
            raise
        self._leading = True
        self.leadership_lost.clear()
        self._monitor = asyncio.get_running_loop().create_task(self._watch_leadership(self._key, revision + 1))
        self._log.info("elected leader", election=self.name, revision=self._revision)

    async def proclaim(self, value: bytes) -> None:
        """Change the value followers see via `leader()`, only while we lead."""
        if self._key is None:
            raise NotLeader(f"not the leader of {self.name!r}")
        result = await self._client.transaction(
            [self.fence()], [Op.put(self._key, value, lease=self._session.lease_id)]
        )
        if not result.succeeded:
            raise NotLeader(f"leadership of {self.name!r} was lost")

    async def resign(self) -> None:
        """Give up leadership (or candidacy) so the next candidate takes over. Best effort: if etcd is
        unreachable, the key expires with the session."""
        await self._stop_monitor()
        was_leading = self._leading
        await self._withdraw()
        if was_leading:
            self._log.info("resigned leadership", election=self.name)
        self.leadership_lost.set()

    async def leader(self) -> bytes | None:
        """The current leader's value, or None when nobody leads."""
        start = _b(self._prefix)
        response = await self._client._range(
            start,
            _prefix_end(start),
            limit=1,
            sort_target=rpc.RangeRequest.CREATE,
            sort_order=rpc.RangeRequest.ASCEND,
        )
        return response.kvs[0].value if response.kvs else None

    # -- internals -------------------------------------------------------------------------------

    async def _register(self, value: bytes) -> tuple[str, int]:
        """Create (or find, after a retried call) our candidate key; returns (key, create revision)."""
        lease = self._session.lease_id
        key = f"{self._prefix}{lease:x}"
        while True:
            result = await self._client.transaction(
                [Compare.create_revision(key, "==", 0)], [Op.put(key, value, lease=lease)], [Op.get(key)]
            )
            if result.succeeded:
                return key, result.revision
            kvs = result.responses[0].kvs
            if not kvs:
                continue  # deleted between compare and get (lease expired): try again
            existing = kvs[0]
            if existing.value != value:
                await self._client.transaction(
                    [Compare.create_revision(key, "==", existing.create_revision)], [Op.put(key, value, lease=lease)]
                )
            return key, existing.create_revision

    async def _wait_predecessors(self, revision: int) -> int:
        """Wait until no candidate key older than ours exists; returns the revision that was checked."""
        start = _b(self._prefix)
        while True:
            response = await self._client._range(
                start,
                _prefix_end(start),
                limit=1,
                max_create_revision=revision - 1,
                sort_target=rpc.RangeRequest.CREATE,
                sort_order=rpc.RangeRequest.DESCEND,
            )
            if not response.kvs:
                return response.header.revision
            # Wait only for our direct predecessor: when it goes, re-check (an older one may remain).
            predecessor = response.kvs[0].key.decode("utf-8", "surrogateescape")
            watch = self._client.watch_key(predecessor, start_revision=response.header.revision + 1)
            async with contextlib.aclosing(watch) as events:
                async for event in events:
                    if event.kind != "put":
                        break

    async def _watch_leadership(self, key: str, start_revision: int) -> None:
        """Notice losing leadership without resigning: session lost, or our key deleted."""
        try:
            await self._until_lost(self._wait_key_deleted(key, start_revision))
            reason = "election key deleted"
        except SessionLost:
            reason = "session lost"
        self._leading = False
        self.leadership_lost.set()
        self._log.warning("leadership lost", election=self.name, reason=reason)

    async def _wait_key_deleted(self, key: str, start_revision: int) -> None:
        async with contextlib.aclosing(self._client.watch_key(key, start_revision=start_revision)) as events:
            async for event in events:
                if event.kind == "delete":
                    return
                if event.kind == "reset":
                    # History lost: look at the key itself instead.
                    with contextlib.suppress(EtcdError):
                        current = await self._client._range(_b(key))
                        if not current.kvs or current.kvs[0].create_revision != self._revision:
                            return

    async def _until_lost(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, abandoning it with SessionLost as soon as the session is lost."""
        work = asyncio.ensure_future(awaitable)
        lost = asyncio.ensure_future(self._session.lost.wait())
        try:
            await asyncio.wait({work, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, lost):
                task.cancel()
            await asyncio.wait({work, lost})
        if self._session.lost.is_set():
            raise SessionLost(f"session lost during election {self.name!r}")
        return work.result()

    async def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.wait([self._monitor])
            self._monitor = None

    async def _withdraw(self) -> None:
        """Delete our candidate key if it is still the one we created."""
        key, revision = self._key, self._revision
        self._key, self._revision, self._leading = None, 0, False
        if key is None or revision == 0:
            return
        try:
            await self._client.transaction([Compare.create_revision(key, "==", revision)], [Op.delete(key)])
        except EtcdError as exc:
            self._log.info(
                "could not delete election key; it expires with the session", election=self.name, error=str(exc)
            )
