"""The etcd layer against real etcd servers: KV, transactions, leases, sessions, watches, elections."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from services.common.etcd import (
    Compare,
    Election,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    NotLeader,
    Op,
    Session,
    SessionLost,
    WatchEvent,
)
from services.common.settings import EtcdSettings
from tests.support.servers import EtcdProcess, free_port


@pytest.fixture
async def client(etcd_settings: EtcdSettings) -> AsyncIterator[EtcdClient]:
    async with EtcdClient(etcd_settings) as etcd:
        yield etcd


@pytest.fixture
async def private_client(restartable_etcd: EtcdProcess, etcd_settings: EtcdSettings) -> AsyncIterator[EtcdClient]:
    """A client of the private etcd that tests stop, kill and restart."""
    settings = etcd_settings.model_copy(update={"endpoints": restartable_etcd.endpoint, "timeout_seconds": 1.0})
    async with EtcdClient(settings) as etcd:
        yield etcd


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


class Collector:
    """Runs a watch in the background and hands its events to the test."""

    def __init__(self, client: EtcdClient, prefix: str, start_revision: int | None) -> None:
        self.queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._task = asyncio.create_task(self._run(client, prefix, start_revision))

    async def _run(self, client: EtcdClient, prefix: str, start_revision: int | None) -> None:
        async with contextlib.aclosing(client.watch_prefix(prefix, start_revision=start_revision)) as events:
            async for event in events:
                await self.queue.put(event)

    async def next(self, timeout: float = 5.0) -> WatchEvent:
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])


# -- key-value -----------------------------------------------------------------------------------------


async def test_put_get_delete(client: EtcdClient) -> None:
    key = client.keys.node("n1")
    assert await client.get(key) is None
    revision = await client.put(key, b"v1")
    kv = await client.get(key)
    assert kv is not None
    assert (kv.key, kv.value, kv.version, kv.lease) == (key, b"v1", 1, 0)
    assert kv.create_revision == kv.mod_revision == revision
    assert await client.put(key, b"v2") > revision
    kv2 = await client.get(key)
    assert kv2 is not None and (kv2.value, kv2.version, kv2.create_revision) == (b"v2", 2, revision)
    assert await client.current_revision() == kv2.mod_revision
    assert await client.delete(key) is True
    assert await client.delete(key) is False
    assert await client.get(key) is None


async def test_get_prefix_sorts_paginates_and_reads_at_revision(client: EtcdClient) -> None:
    keys = client.keys
    for version in (10, 2, 1, 30, 3):
        await client.put(keys.version("m", version), str(version).encode())
    await client.put(keys.model("m"), b"model")
    await client.put(keys.model("m2"), b"other model")  # shares the string prefix ".../m"

    versions = await client.get_prefix(keys.versions_prefix("m"))
    assert [keys.parse_version_key(kv.key) for kv in versions] == [("m", n) for n in (1, 2, 3, 10, 30)]

    pages: list[list[int]] = []
    last: str | None = None
    while True:
        page = await client.get_prefix(keys.versions_prefix("m"), limit=2, start_after=last)
        if not page:
            break
        pages.append([keys.parse_version_key(kv.key)[1] for kv in page])  # type: ignore[index]
        last = page[-1].key
    assert pages == [[1, 2], [3, 10], [30]]

    # The models prefix also holds versions: parse_model_key picks the bare model records.
    everything = await client.get_prefix(keys.models_prefix(), keys_only=True)
    assert len(everything) == 7
    assert all(kv.value == b"" for kv in everything)
    assert [keys.parse_model_key(kv.key) for kv in everything if keys.parse_model_key(kv.key)] == ["m", "m2"]

    snapshot = await client.current_revision()
    await client.put(keys.version("m", 40), b"40")
    assert len(await client.get_prefix(keys.versions_prefix("m"), revision=snapshot)) == 5
    assert len(await client.get_prefix(keys.versions_prefix("m"))) == 6

    assert await client.delete_prefix(keys.versions_prefix("m")) == 6
    assert await client.get_prefix(keys.versions_prefix("m")) == []
    assert await client.get(keys.model("m")) is not None
    with pytest.raises(ValueError):
        await client.get_prefix("")


async def test_create_cas_and_compare_and_delete_conflicts(client: EtcdClient) -> None:
    key = client.keys.alias("m", "production")
    assert await client.create(key, b"1") is True
    assert await client.create(key, b"2") is False
    kv = await client.get(key)
    assert kv is not None and kv.value == b"1"

    assert await client.compare_and_swap(key, b"2", expected_mod_revision=kv.mod_revision - 1) is False
    assert await client.compare_and_swap(key, b"2", expected_mod_revision=0) is False  # exists
    assert await client.compare_and_swap(key, b"2", expected_mod_revision=kv.mod_revision) is True
    # The loser of a race: its read is now stale.
    assert await client.compare_and_swap(key, b"3", expected_mod_revision=kv.mod_revision) is False
    kv2 = await client.get(key)
    assert kv2 is not None and kv2.value == b"2"

    assert await client.compare_and_delete(key, expected_mod_revision=kv.mod_revision) is False
    assert await client.compare_and_delete(key, expected_mod_revision=kv2.mod_revision) is True
    assert await client.get(key) is None
    assert await client.compare_and_swap(key, b"4", expected_mod_revision=0) is True  # absent


async def test_multi_key_transaction_guarded_by_mod_revision(client: EtcdClient) -> None:
    keys = client.keys
    await client.put(keys.model("m"), b'{"latest":0}')
    model = await client.get(keys.model("m"))
    assert model is not None

    # Allocate version 1: write the version record AND bump the model, only if the model is unchanged.
    result = await client.transaction(
        [Compare.mod_revision(keys.model("m"), "==", model.mod_revision)],
        [Op.put(keys.version("m", 1), b"v1"), Op.put(keys.model("m"), b'{"latest":1}')],
        [Op.get(keys.model("m"))],
    )
    assert result.succeeded
    assert [r.kind for r in result.responses] == ["put", "put"]
    version = await client.get(keys.version("m", 1))
    assert version is not None and version.mod_revision == result.revision

    # A concurrent allocator with the stale read loses, writes nothing, and sees the winner's record.
    stale = await client.transaction(
        [Compare.mod_revision(keys.model("m"), "==", model.mod_revision)],
        [Op.put(keys.version("m", 1), b"other"), Op.put(keys.model("m"), b'{"latest":1}')],
        [Op.get(keys.model("m"))],
    )
    assert not stale.succeeded
    assert [kv.value for kv in stale.responses[0].kvs] == [b'{"latest":1}']
    assert (await client.get(keys.version("m", 1))).value == b"v1"  # type: ignore[union-attr]

    # Value compares, prefix ops.
    deleted = await client.transaction(
        [Compare.value(keys.model("m"), "==", b'{"latest":1}'), Compare.version(keys.model("m"), ">", 1)],
        [Op.delete_prefix(keys.versions_prefix("m")), Op.delete(keys.model("m")), Op.get_prefix(keys.models_prefix())],
    )
    assert deleted.succeeded
    assert [r.deleted for r in deleted.responses[:2]] == [1, 1]
    assert deleted.responses[2].kvs == ()
    with pytest.raises(ValueError):
        Compare.value("k", "=", b"x")  # type: ignore[arg-type]


async def test_unreachable_etcd_raises_etcd_unavailable(etcd_settings: EtcdSettings) -> None:
    settings = etcd_settings.model_copy(update={"endpoints": f"127.0.0.1:{free_port()}", "timeout_seconds": 0.5})
    async with EtcdClient(settings) as etcd:  # connecting does not need etcd
        assert await etcd.ping() is False
        for call in (lambda: etcd.get("/k"), lambda: etcd.put("/k", b""), lambda: etcd.grant_lease(5)):
            with pytest.raises(EtcdUnavailable) as raised:
                await call()
            assert not isinstance(raised.value, grpc.RpcError)


async def test_second_endpoint_is_used_when_first_is_down(
    etcd_server: EtcdProcess, etcd_settings: EtcdSettings
) -> None:
    endpoints = f"127.0.0.1:{free_port()},{etcd_server.endpoint}"
    settings = etcd_settings.model_copy(update={"endpoints": endpoints, "timeout_seconds": 0.5})
    async with EtcdClient(settings) as etcd:
        with contextlib.suppress(EtcdUnavailable):
            await etcd.put("/failover", b"x")
        await eventually(etcd.ping)
        await etcd.put(etcd.keys.node("n"), b"x")


# -- leases and sessions -------------------------------------------------------------------------------


async def test_lease_bound_key_disappears_when_session_closes(client: EtcdClient) -> None:
    key = client.keys.node("n1")
    async with Session(client, ttl_seconds=5) as session:
        await client.put(key, b"alive", lease=session.lease_id)
        kv = await client.get(key)
        assert kv is not None and kv.lease == session.lease_id
        assert 0 < await client.lease_time_to_live(session.lease_id) <= 5
    assert session.lost.is_set()  # closed sessions report lost, so bound work stops
    assert await client.get(key) is None
    assert await client.lease_time_to_live(session.lease_id) == -1
    await session.close()  # idempotent
    await client.revoke_lease(session.lease_id)  # a gone lease is not an error


async def test_keep_alive_holds_lease_past_ttl_and_unrefreshed_lease_expires(client: EtcdClient) -> None:
    session = await Session(client, ttl_seconds=2).start()
    bare_lease = await client.grant_lease(2)
    await client.put(client.keys.node("kept"), b"", lease=session.lease_id)
    await client.put(client.keys.node("dropped"), b"", lease=bare_lease)
    assert await client.refresh_lease(bare_lease) > 0
    await asyncio.sleep(4.5)
    assert await client.get(client.keys.node("kept")) is not None
    assert await client.get(client.keys.node("dropped")) is None
    assert await client.refresh_lease(bare_lease) <= 0
    assert not session.lost.is_set()
    await session.close()
    assert await client.get(client.keys.node("kept")) is None


async def test_session_lost_when_etcd_down_longer_than_ttl(
    restartable_etcd: EtcdProcess, private_client: EtcdClient
) -> None:
    session = await Session(private_client, ttl_seconds=2).start()
    assert session.ttl == 2
    restartable_etcd.kill()
    killed_at = time.monotonic()
    with pytest.raises(EtcdUnavailable):
        await private_client.get("/k")
    await asyncio.wait_for(session.lost.wait(), timeout=5)
    # Lost only once the lease may really be gone, not at the first failed refresh.
    assert time.monotonic() - killed_at > 1.0
    with pytest.raises(SessionLost):
        session.ensure_alive()

    await asyncio.to_thread(restartable_etcd.start)
    await eventually(private_client.ping)  # the client reconnects by itself
    await session.close()


async def test_keep_alive_survives_short_restart(restartable_etcd: EtcdProcess, private_client: EtcdClient) -> None:
    async with Session(private_client, ttl_seconds=6) as session:
        key = private_client.keys.node("n1")
        await private_client.put(key, b"", lease=session.lease_id)
        await asyncio.to_thread(restartable_etcd.stop)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(restartable_etcd.start)
        # Past a full TTL after the restart: only refreshes made after it keep the key.
        await asyncio.sleep(6.5)
        assert not session.lost.is_set()
        assert await private_client.get(key) is not None
        assert await private_client.lease_time_to_live(session.lease_id) > 3


# -- watches ---------------------------------------------------------------------------------------------


async def test_watch_delivers_puts_and_deletes_in_order(client: EtcdClient) -> None:
    prefix = client.keys.nodes_prefix()
    start = await client.current_revision() + 1
    collector = Collector(client, prefix, start)
    try:
        a, b = client.keys.node("a"), client.keys.node("b")
        await client.put(a, b"1")
        await client.put(b, b"2")
        await client.put(client.keys.deployment("outside"), b"not watched")
        await client.delete(a)
        await client.put(a, b"3")
        events = [await collector.next() for _ in range(4)]
        assert [(e.kind, e.key, e.value) for e in events] == [
            ("put", a, b"1"),
            ("put", b, b"2"),
            ("delete", a, b""),
            ("put", a, b"3"),
        ]
        revisions = [e.mod_revision for e in events]
        assert revisions == sorted(revisions) and revisions[0] == start
    finally:
        await collector.stop()

    # Replaying from an old revision delivers the same history.
    replay = Collector(client, prefix, start)
    try:
        assert [(await replay.next()).mod_revision for _ in range(4)] == revisions
    finally:
        await replay.stop()


async def test_watch_resumes_after_etcd_restart(
    restartable_etcd: EtcdProcess, private_client: EtcdClient, etcd_settings: EtcdSettings
) -> None:
    prefix = private_client.keys.nodes_prefix()
    collector = Collector(private_client, prefix, None)
    try:
        # Without start_revision the watch starts "now": make sure it is established first.
        await eventually(lambda: _put_and_see(private_client, collector, "before"))
        await asyncio.to_thread(restartable_etcd.stop)
        await asyncio.to_thread(restartable_etcd.start)
        # Another process writes right after the restart, likely before the watch is back.
        writer_settings = etcd_settings.model_copy(update={"endpoints": restartable_etcd.endpoint})
        async with EtcdClient(writer_settings) as writer:
            await eventually(writer.ping)
            for name in ("after-1", "after-2"):
                await writer.put(writer.keys.node(name), name.encode())
            await writer.delete(writer.keys.node("after-1"))
        events = [await collector.next(timeout=10) for _ in range(3)]
        assert [(e.kind, e.key) for e in events] == [
            ("put", private_client.keys.node("after-1")),
            ("put", private_client.keys.node("after-2")),
            ("delete", private_client.keys.node("after-1")),
        ]
        assert collector.queue.empty()  # no duplicates of events seen before the restart
    finally:
        await collector.stop()


async def _put_and_see(client: EtcdClient, collector: Collector, name: str) -> bool:
    await client.put(client.keys.node(name), b"")
    try:
        event = await collector.next(timeout=0.5)
    except TimeoutError:
        return False
    while not collector.queue.empty():  # drop repeats of earlier probes
        event = collector.queue.get_nowait()
    return event.key == client.keys.node(name)


async def test_watch_resets_when_history_was_compacted(private_client: EtcdClient) -> None:
    prefix = private_client.keys.nodes_prefix()
    first = await private_client.put(private_client.keys.node("a"), b"1")
    await private_client.put(private_client.keys.node("a"), b"2")
    latest = await private_client.put(private_client.keys.node("b"), b"3")
    await private_client.compact(latest)
    collector = Collector(private_client, prefix, first)
    try:
        reset = await collector.next()
        assert (reset.kind, reset.key) == ("reset", prefix)
        assert reset.mod_revision >= latest
        listed = await private_client.get_prefix(prefix, revision=reset.mod_revision)
        assert [kv.value for kv in listed] == [b"2", b"3"]
        await private_client.put(private_client.keys.node("c"), b"4")
        event = await collector.next()
        assert (event.kind, event.key, event.value) == ("put", private_client.keys.node("c"), b"4")
    finally:
        await collector.stop()


async def test_closing_the_client_ends_watches(etcd_settings: EtcdSettings) -> None:
    etcd = EtcdClient(etcd_settings)
    await etcd.connect()
    events = etcd.watch_prefix(etcd.keys.nodes_prefix())
    consumer = asyncio.create_task(anext(events, None))
    await asyncio.sleep(0.3)
    await etcd.close()
    assert await asyncio.wait_for(consumer, 5) is None
    with pytest.raises(EtcdError):
        await etcd.get("/k")


# -- elections -------------------------------------------------------------------------------------------


async def test_election_one_leader_and_handover(client: EtcdClient) -> None:
    async with Session(client, ttl_seconds=5) as session_a, Session(client, ttl_seconds=5) as session_b:
        a = Election(client, session_a, "scheduler")
        b = Election(client, session_b, "scheduler")
        assert await a.leader() is None
        await asyncio.wait_for(a.campaign(b"a"), 5)
        b_campaign = asyncio.create_task(b.campaign(b"b"))
        await asyncio.sleep(0.5)
        assert not b_campaign.done()
        assert a.is_leader and not b.is_leader
        assert await b.leader() == b"a"
        with pytest.raises(NotLeader):
            b.fence()

        await a.resign()
        await asyncio.wait_for(b_campaign, 5)
        assert b.is_leader and not a.is_leader
        assert a.leadership_lost.is_set() and not b.leadership_lost.is_set()
        assert await a.leader() == b"b"
        await b.proclaim(b"b2")
        assert await a.leader() == b"b2"

        # A queues again; B's session ending (process exit) hands leadership back.
        a_campaign = asyncio.create_task(a.campaign(b"a2"))
        await asyncio.sleep(0.3)
        assert not a_campaign.done()
        await session_b.close()
        await asyncio.wait_for(a_campaign, 5)
        assert a.is_leader
        await asyncio.wait_for(b.leadership_lost.wait(), 5)
        assert not b.is_leader
        assert await b.leader() == b"a2"
        assert a.leader_revision > 0


async def test_stale_leader_fenced_write_fails(client: EtcdClient) -> None:
    target = client.keys.assignment("n1", "m", 1)
    async with Session(client, ttl_seconds=5) as session_a, Session(client, ttl_seconds=5) as session_b:
        a = Election(client, session_a, "scheduler")
        b = Election(client, session_b, "scheduler")
        await a.campaign(b"a")
        stale_fence = a.fence()
        assert (await client.transaction([stale_fence], [Op.put(target, b"from a")])).succeeded
        b_campaign = asyncio.create_task(b.campaign(b"b"))

        # A's lease vanishes behind its back (a long GC pause or partition); B takes over.
        await client.revoke_lease(session_a.lease_id)
        await asyncio.wait_for(b_campaign, 5)
        assert b.leader_revision > 0

        late = await client.transaction([stale_fence], [Op.put(target, b"late write from a")])
        assert not late.succeeded
        assert (await client.transaction([b.fence()], [Op.put(target, b"from b")])).succeeded
        assert (await client.get(target)).value == b"from b"  # type: ignore[union-attr]
        # A notices too: its key was deleted and the session cannot refresh a revoked lease.
        await asyncio.wait_for(a.leadership_lost.wait(), 5)
        assert not a.is_leader
        with pytest.raises(NotLeader):
            a.fence()


async def test_cancelled_campaign_withdraws_and_lost_session_aborts_campaign(client: EtcdClient) -> None:
    async with Session(client, ttl_seconds=5) as session_a, Session(client, ttl_seconds=2) as session_b:
        a = Election(client, session_a, "scheduler")
        await a.campaign(b"a")
        prefix = client.keys.leader("scheduler") + "/"

        b = Election(client, session_b, "scheduler")
        b_campaign = asyncio.create_task(b.campaign(b"b"))
        await eventually(lambda: _count(client, prefix, 2))
        b_campaign.cancel()
        await asyncio.wait([b_campaign])
        assert len(await client.get_prefix(prefix)) == 1  # the cancelled candidate left no key

        b_campaign = asyncio.create_task(b.campaign(b"b"))
        await eventually(lambda: _count(client, prefix, 2))
        await client.revoke_lease(session_b.lease_id)
        with pytest.raises(SessionLost):
            await asyncio.wait_for(b_campaign, 5)
        assert a.is_leader


async def _count(client: EtcdClient, prefix: str, expected: int) -> bool:
    return len(await client.get_prefix(prefix)) == expected
