"""High availability: every scheduler process campaigns in the `scheduler` election; the leader
reconciles, the others only serve the API (reads and spec writes are plain etcd operations).

The election value is the leader's gRPC address, so a follower forwards EnsureReplicas (which acts
on the leader's in-memory autoscaler) to it. Leadership ends on the session's loss, on the deletion
of our election key, or on shutdown (resign, so a follower takes over at once instead of after the
TTL); reconciling stops immediately, and every leader write is fenced anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import structlog

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from services.common.errors import NotFound, Unavailable
from services.common.etcd import Election, EtcdClient, EtcdError, Session, SessionLost
from services.scheduler.autoscaler import Autoscaler
from services.scheduler.reconciler import Reconciler
from services.scheduler.tasks import cancel_and_wait

ELECTION = "scheduler"
# Metadata marking a call forwarded by a follower (never forwarded again).
FORWARDED = "x-aimaas-forwarded"


class Leadership:
    def __init__(
        self,
        etcd: EtcdClient,
        reconciler: Reconciler,
        autoscaler: Autoscaler,
        *,
        ttl_seconds: int,
        logger: Any = None,
        on_change: Any = None,
    ) -> None:
        self._etcd = etcd
        self._reconciler = reconciler
        self._autoscaler = autoscaler
        self._ttl = ttl_seconds
        self._log = (logger or structlog.get_logger("scheduler")).bind(component="leadership")
        self._on_change = on_change or (lambda leading: None)
        self.address = ""
        self._election: Election | None = None
        self._task: asyncio.Task[None] | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.terms = 0
        self.elected_at: float | None = None

    @property
    def is_leader(self) -> bool:
        return self._election is not None and self._election.is_leader

    def start(self, address: str) -> None:
        self.address = address
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler-leadership")

    async def stop(self) -> None:
        """Stop reconciling and resign (the session's lease is revoked: a follower leads at once)."""
        if self._task is not None:
            await cancel_and_wait([self._task], retry_seconds=3.0)
            self._task = None
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            session = Session(self._etcd, self._ttl)
            try:
                await session.start()
            except EtcdError as exc:
                self._log.info("cannot open an etcd session; retrying", error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.1
            election = Election(self._etcd, session, ELECTION)
            try:
                await election.campaign(self.address.encode())
                await self._lead(election, session)
            except (SessionLost, EtcdError) as exc:
                self._log.warning("leadership or candidacy ended", error=str(exc))
            except Exception:  # noqa: BLE001 - a bug must not end this process's candidacy for good
                self._log.exception("leadership failed unexpectedly; campaigning again")
                await asyncio.sleep(1.0)
            finally:
                self._election = None
                self._on_change(False)
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._retire(election, session))

    async def _retire(self, election: Election, session: Session) -> None:
        await election.resign()
        await session.close()

    async def _lead(self, election: Election, session: Session) -> None:
        self._election = election
        self.terms += 1
        self.elected_at = time.monotonic()
        self._on_change(True)
        self._log.info("leading: reconciling", revision=election.leader_revision, address=self.address)
        work = asyncio.create_task(self._reconciler.lead(election), name="scheduler-reconcile")
        lost = asyncio.create_task(election.leadership_lost.wait())
        gone = asyncio.create_task(session.lost.wait())
        try:
            await asyncio.wait([work, lost, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_and_wait([work, lost, gone])
        if work.done() and not work.cancelled() and work.exception() is not None:
            self._log.error("reconciler stopped", error=repr(work.exception()))
        self._log.warning("not leading any more: reconciling stopped")

    async def leader_address(self) -> str | None:
        """The current leader's advertised address (None when nobody leads)."""
        prefix = self._etcd.keys.leader(ELECTION) + "/"
        candidates = await self._etcd.get_prefix(prefix)
        if not candidates:
            return None
        return min(candidates, key=lambda kv: kv.create_revision).value.decode() or None

    async def ensure_replicas(self, name: str, *, forwarded: bool = False) -> None:
        if self.is_leader:
            self._autoscaler.activate(name)
            self._reconciler.poke()
            return
        if forwarded:
            raise Unavailable("this scheduler is not the leader any more; retry")
        address = await self.leader_address()
        if address is None or address == self.address:
            raise Unavailable("no scheduler leads right now; retry shortly")
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        try:
            await stub.EnsureReplicas(
                spb.EnsureReplicasRequest(deployment=name), timeout=5.0, metadata=((FORWARDED, "1"),)
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(exc.details() or f"deployment {name!r} not found") from exc
            raise Unavailable(f"the scheduler leader at {address} did not answer: {exc.details()}") from exc
