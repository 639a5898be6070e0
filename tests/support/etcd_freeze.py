"""Freeze a test's private etcd with SIGSTOP, as a stalled VM or a stop-the-world pause would: its
sockets stay open but nothing answers. Leases run on etcd's monotonic clock, so the ones whose TTL
passed during the freeze are revoked at once when it resumes (SIGCONT), all together.

`EtcdLink` is a TCP forwarder to etcd whose traffic can be held both ways, for processes whose
link to etcd should come back later than etcd itself (their re-registration then reliably comes
after their leases' expiry and after a new scheduler term has looked at the cluster)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

from tests.support.servers import EtcdProcess


@contextlib.contextmanager
def frozen(server: EtcdProcess) -> Iterator[None]:
    """SIGSTOP `server` for the body; SIGCONT however the body ends (a stopped etcd would hang the
    rest of the test session)."""
    process = server.process
    if process is None or process.poll() is not None:
        raise RuntimeError("etcd is not running: nothing to freeze")
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(process.pid, signal.SIGCONT)


class _Side(asyncio.Protocol):
    """One connection of a forwarded pair; what it reads goes to its peer."""

    def __init__(self, link: EtcdLink) -> None:
        self._link = link
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self._early: list[bytes] = []  # read before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._link.sides.add(self)
        if self._link.held:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self._early.append(data)

    def pair(self, peer: _Side) -> None:
        self.peer, peer.peer = peer, self
        assert peer.transport is not None
        for data in self._early:
            peer.transport.write(data)
        self._early.clear()

    def connection_lost(self, exc: Exception | None) -> None:
        self._link.sides.discard(self)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class EtcdLink:
    """`address` forwards to etcd at `target` (host:port) on the running loop; `hold()` stops the
    traffic both ways (connections stay open, as over a stalled network), `release()` lets it flow."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self.sides: set[_Side] = set()
        self.held = False
        self._server: asyncio.Server | None = None
        self._connecting: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def start(self) -> EtcdLink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._accepted, "127.0.0.1", 0)
        return self

    def _accepted(self) -> _Side:
        client = _Side(self)
        task = asyncio.get_running_loop().create_task(self._connect(client))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return client

    async def _connect(self, client: _Side) -> None:
        try:
            _, upstream = await asyncio.get_running_loop().create_connection(lambda: _Side(self), *self._target)
        except OSError:
            if client.transport is not None:
                client.transport.close()
            return
        client.pair(upstream)

    def hold(self) -> None:
        self.held = True
        for side in list(self.sides):
            if side.transport is not None:
                side.transport.pause_reading()

    def release(self) -> None:
        self.held = False
        for side in list(self.sides):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.resume_reading()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connecting):
            task.cancel()
        for side in list(self.sides):
            if side.transport is not None:
                side.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
