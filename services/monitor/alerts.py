"""Alert evaluation, state and notification.

Every monitor replica receives every report (reporters send to all of them), so every replica could
evaluate; only the leader of the `monitor` election does, so each transition is decided and notified
once. The leader keeps the alerts of each rule under `KeyBuilder.alert_state(rule_id)` (a
ListAlertsResponse in JSON), written with the election's fence. A transition is persisted with
`notified=false` before its notification is sent, and marked `notified=true` after delivery (or after
the retries are exhausted): a new leader loads the state, so it neither re-fires what already fired
nor forgets a notification the old leader had not finished; it resends only unnotified transitions
(a duplicate is possible only when a leader dies between delivering and recording it).

Every replica mirrors the state keys through an etcd watch (`AlertView`) and serves ListAlerts and
WatchAlerts from the mirror, so any replica answers with the leader's decisions.

States per (rule, subject): condition holds → PENDING (active_since) → after `for_seconds` FIRING
(notify) → condition fails → RESOLVED (notify). A PENDING alert whose condition fails is dropped
without notification. Resolved alerts stay as history for `resolved_retention_seconds`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from google.protobuf import json_format

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from services.common.aio import Backoff
from services.common.etcd import (
    CodecError,
    Election,
    EtcdClient,
    EtcdError,
    NotLeader,
    Op,
    Session,
    SessionLost,
    from_json,
    to_json,
)
from services.monitor.aggregation import WINDOW_NAMES, MetricsStore, preferred
from services.monitor.rules import RuleStore

ELECTION = "monitor"
_METRIC_NAMES = {v: k.removeprefix("ALERT_METRIC_").lower() for k, v in mpb.AlertMetric.items()}
_STATE_NAMES = {v: k.removeprefix("ALERT_STATE_").lower() for k, v in mpb.AlertState.items()}


def subject_of(*, model: str = "", version: int = 0, node: str = "", deployment: str = "") -> str:
    parts = [("model", model), ("version", str(version) if version else ""), ("node", node), ("deployment", deployment)]
    return ",".join(f"{k}={v}" for k, v in parts if v) or "all"


@dataclass
class Cluster:
    """What etcd says about nodes and deployments (for node-down, replicas-below-min, the dashboard)."""

    nodes: dict[str, spb.Node] = field(default_factory=dict)
    deployments: dict[str, spb.DeploymentSpec] = field(default_factory=dict)
    statuses: dict[str, spb.DeploymentStatus] = field(default_factory=dict)


class ClusterView:
    """Reads the cluster records from etcd, at most once per `max_age_seconds` (cheap to ask often)."""

    def __init__(self, etcd: EtcdClient, *, max_age_seconds: float = 1.0) -> None:
        self._etcd = etcd
        self._max_age = max_age_seconds
        self._cached: Cluster | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def snapshot(self) -> Cluster:
        async with self._lock:
            if self._cached is not None and time.monotonic() - self._at < self._max_age:
                return self._cached
            keys = self._etcd.keys
            cluster = Cluster()
            for kv in await self._etcd.get_prefix(keys.nodes_prefix()):
                node_id = keys.parse_node_key(kv.key)
                if node_id:
                    with contextlib.suppress(CodecError):
                        cluster.nodes[node_id] = from_json(kv.value, spb.Node)
            for kv in await self._etcd.get_prefix(keys.deployments_prefix()):
                name = keys.parse_deployment_key(kv.key)
                if name:
                    with contextlib.suppress(CodecError):
                        cluster.deployments[name] = from_json(kv.value, spb.DeploymentSpec)
            for kv in await self._etcd.get_prefix(keys.deployment_statuses_prefix()):
                name = keys.parse_deployment_status_key(kv.key)
                if name:
                    with contextlib.suppress(CodecError):
                        cluster.statuses[name] = from_json(kv.value, spb.DeploymentStatus)
            self._cached, self._at = cluster, time.monotonic()
            return cluster


@dataclass
class Observation:
    subject: str
    value: float
    active: bool
    summary: str


def _compare(value: float, rule: mpb.AlertRule) -> bool:
    if rule.comparison == mpb.COMPARISON_LESS_THAN:
        return value < rule.threshold
    return value > rule.threshold


class Evaluator:
    """Turns a rule into observations per subject, from the metrics store and the cluster records."""

    def __init__(self, store: MetricsStore, *, window_seconds: dict[int, float], node_stale_seconds: float) -> None:
        self._store = store
        self._windows = window_seconds
        self._stale = node_stale_seconds

    def evaluate(self, rule: mpb.AlertRule, cluster: Cluster, now: float) -> list[Observation]:
        metric = rule.metric
        window = self._windows[rule.window or mpb.WINDOW_1M]
        label = WINDOW_NAMES.get(rule.window or mpb.WINDOW_1M, "")
        if metric in (mpb.ALERT_METRIC_ERROR_RATE, mpb.ALERT_METRIC_P99_LATENCY_MS, mpb.ALERT_METRIC_NO_TRAFFIC):
            groups: dict[tuple[str, int, str], list] = {}
            for series in self._store.select(rule.model, rule.version, rule.node_id):
                groups.setdefault((series.model, series.version, series.node if rule.node_id else ""), []).append(series)
            result = []
            for (model, version, node), members in sorted(groups.items()):
                subject = subject_of(model=model, version=version, node=node)
                aggregate = self._store.aggregate(members if node else preferred(members), window)
                if metric == mpb.ALERT_METRIC_ERROR_RATE:
                    value = aggregate.error_rate
                    active = aggregate.requests > 0 and _compare(value, rule)
                    summary = f"error rate {value:.1%} over {label} on {subject} (threshold {rule.threshold:.1%})"
                elif metric == mpb.ALERT_METRIC_P99_LATENCY_MS:
                    value = aggregate.latency_ms(0.99)
                    active = aggregate.latency.count > 0 and _compare(value, rule)
                    summary = f"p99 latency {value:.1f} ms over {label} on {subject} (threshold {rule.threshold:g} ms)"
                else:
                    # Only versions still reported (loaded somewhere) can be "without traffic".
                    if all(now - s.last_report > self._stale for s in members):
                        continue
                    value = aggregate.qps
                    active = aggregate.requests == 0 if rule.threshold == 0 else value < rule.threshold
                    summary = f"{value:.2f} requests/s over {label} on {subject}"
                result.append(Observation(subject, value, active, summary))
            if metric == mpb.ALERT_METRIC_NO_TRAFFIC and rule.model and not groups:
                subject = subject_of(model=rule.model, version=rule.version)
                result.append(Observation(subject, 0.0, True, f"no statistics at all for {subject}"))
            return result
        if metric == mpb.ALERT_METRIC_NODE_DOWN:
            candidates = set(cluster.nodes)
            candidates.update(
                node for node, res in self._store.nodes().items() if res.kind != mpb.REPORTER_KIND_GATEWAY
            )
            if rule.node_id:
                candidates = {rule.node_id}
            result = []
            for node in sorted(candidates):
                resources = self._store.resources(node)
                silent = now - resources.last_report if resources is not None else float("inf")
                # Up while its lease-bound record exists, or (standalone nodes) while it reports.
                down = node not in cluster.nodes and silent > self._stale
                value = silent if silent != float("inf") else -1.0
                summary = (
                    f"node {node} is down (no node record, last report {value:.0f}s ago)" if down else f"node {node} is up"
                )
                result.append(Observation(subject_of(node=node), value, down, summary))
            return result
        if metric == mpb.ALERT_METRIC_REPLICAS_BELOW_MIN:
            result = []
            for name, spec in sorted(cluster.deployments.items()):
                if rule.model and spec.model != rule.model and name != rule.model:
                    continue
                status = cluster.statuses.get(name)
                ready = sum(v.ready_replicas for v in status.versions) if status is not None else 0
                active = ready < spec.min_replicas
                summary = f"deployment {name}: {ready} ready replica(s), min_replicas {spec.min_replicas}"
                result.append(Observation(subject_of(deployment=name), float(ready), active, summary))
            return result
        return []


class Notifier:
    """Sends one notification to every webhook of its rule (JSON POST, retried with backoff) and logs it."""

    def __init__(
        self,
        *,
        logger: Any,
        timeout_seconds: float = 5.0,
        max_attempts: int = 5,
        retry_initial_seconds: float = 0.2,
        retry_max_seconds: float = 5.0,
        source: str = "",
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._log = logger.bind(component="notifier")
        self._attempts = max_attempts
        self._retry = (retry_initial_seconds, retry_max_seconds)
        self._source = source
        self._client = httpx.AsyncClient(timeout=timeout_seconds, transport=transport, follow_redirects=False)
        self.delivered = 0
        self.failed = 0

    async def close(self) -> None:
        await self._client.aclose()

    @staticmethod
    def payload(rule: mpb.AlertRule, alert: mpb.Alert, source: str = "") -> dict[str, Any]:
        return {
            "status": _STATE_NAMES.get(alert.state, "unknown"),
            "rule": {
                "id": rule.id,
                "name": rule.name,
                "metric": _METRIC_NAMES.get(rule.metric, "unknown"),
                "threshold": rule.threshold,
                "window": WINDOW_NAMES.get(rule.window, ""),
                "for_seconds": rule.for_seconds,
                "labels": dict(rule.labels),
            },
            "alert": json_format.MessageToDict(alert, preserving_proto_field_name=True),
            "source": source,
        }

    async def notify(self, rule: mpb.AlertRule, alert: mpb.Alert) -> None:
        status = _STATE_NAMES.get(alert.state, "unknown")
        self._log.warning(
            "alert " + status, rule_id=rule.id, rule=rule.name, subject=alert.subject, value=alert.value,
            summary=alert.summary,
        )
        if not rule.webhook_urls:
            return
        body = json.dumps(self.payload(rule, alert, self._source)).encode()
        await asyncio.gather(*(self._post(url, body, rule, alert) for url in rule.webhook_urls))

    async def _post(self, url: str, body: bytes, rule: mpb.AlertRule, alert: mpb.Alert) -> None:
        backoff = Backoff(*self._retry)
        error = ""
        for attempt in range(1, self._attempts + 1):
            try:
                response = await self._client.post(url, content=body, headers={"content-type": "application/json"})
                if response.status_code < 300:
                    self.delivered += 1
                    return
                error = f"HTTP {response.status_code}"
                if 400 <= response.status_code < 500 and response.status_code not in (408, 429):
                    break  # the receiver rejects this payload; retrying cannot help
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            if attempt < self._attempts:
                await asyncio.sleep(backoff.next())
        self.failed += 1
        self._log.error(
            "webhook notification failed", url=url, rule_id=rule.id, subject=alert.subject, error=error,
            attempts=self._attempts,
        )


class AlertEngine:
    """The leader's alert state and its transitions (see the module docstring)."""

    def __init__(
        self,
        etcd: EtcdClient,
        rules: RuleStore,
        evaluator: Evaluator,
        cluster: ClusterView,
        notifier: Notifier,
        *,
        logger: Any,
        resolved_retention_seconds: float = 3600.0,
        max_resolved_per_rule: int = 100,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._etcd = etcd
        self._rules = rules
        self._evaluator = evaluator
        self._cluster = cluster
        self._notifier = notifier
        self._log = logger.bind(component="alerts")
        self._retention = resolved_retention_seconds
        self._max_resolved = max_resolved_per_rule
        self._clock = clock
        self.state: dict[str, dict[str, mpb.Alert]] = {}
        self._election: Election | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self, election: Election) -> None:
        """Start a term: take over the persisted state, resend unfinished notifications."""
        self._election = election
        self.state = {}
        for kv in await self._etcd.get_prefix(self._etcd.keys.alert_states_prefix()):
            rule_id = kv.key.rsplit("/", 1)[-1]
            with contextlib.suppress(CodecError):
                record = from_json(kv.value, mpb.ListAlertsResponse)
                self.state[rule_id] = {a.subject: a for a in record.alerts}
        rules = {r.id: r for r in await self._rules.list()}
        for rule_id, alerts in self.state.items():
            rule = rules.get(rule_id)
            for alert in alerts.values():
                if rule is not None and not alert.notified and alert.state in (
                    mpb.ALERT_STATE_FIRING, mpb.ALERT_STATE_RESOLVED
                ):
                    self._log.info("resending an unfinished notification", rule_id=rule_id, subject=alert.subject)
                    self._send(rule, alert)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        self._election = None

    async def step(self) -> None:
        """One evaluation of every enabled rule; persists the rules whose alerts changed."""
        now = self._clock()
        rules = {r.id: r for r in await self._rules.list()}
        cluster = await self._cluster.snapshot()
        for rule_id in [r for r in self.state if r not in rules]:
            # A deleted rule takes its alerts with it.
            del self.state[rule_id]
            await self._write(rule_id, None)
        for rule in rules.values():
            alerts = self.state.setdefault(rule.id, {})
            changed, notify = self._advance(rule, alerts, [] if not rule.enabled else
                                            self._evaluator.evaluate(rule, cluster, now), now)
            if changed:
                await self._write(rule.id, alerts)
            for alert in notify:
                self._send(rule, alert)

    def _advance(
        self, rule: mpb.AlertRule, alerts: dict[str, mpb.Alert], observations: list[Observation], now: float
    ) -> tuple[bool, list[mpb.Alert]]:
        changed = False
        notify: list[mpb.Alert] = []
        seen = set()
        for obs in observations:
            seen.add(obs.subject)
            alert = alerts.get(obs.subject)
            live = alert is not None and alert.state in (mpb.ALERT_STATE_PENDING, mpb.ALERT_STATE_FIRING)
            if obs.active:
                if not live:
                    alert = mpb.Alert(rule_id=rule.id, subject=obs.subject, state=mpb.ALERT_STATE_PENDING)
                    alert.active_since.FromNanoseconds(int(now * 1e9))
                    alerts[obs.subject] = alert
                    changed = True
                assert alert is not None
                alert.value, alert.summary = obs.value, obs.summary
                since = alert.active_since.ToNanoseconds() / 1e9
                if alert.state == mpb.ALERT_STATE_PENDING and now - since >= rule.for_seconds:
                    alert.state = mpb.ALERT_STATE_FIRING
                    alert.fired_at.FromNanoseconds(int(now * 1e9))
                    alert.notified = False
                    changed = True
                    notify.append(alert)
            elif live:
                assert alert is not None
                changed |= self._end(alert, obs.value, obs.summary, now, alerts, notify)
        for subject, alert in list(alerts.items()):
            if subject not in seen and alert.state in (mpb.ALERT_STATE_PENDING, mpb.ALERT_STATE_FIRING):
                changed |= self._end(alert, alert.value, alert.summary, now, alerts, notify)
        # Bounded history of resolved alerts.
        resolved = sorted(
            (a for a in alerts.values() if a.state == mpb.ALERT_STATE_RESOLVED and a.notified),
            key=lambda a: a.resolved_at.ToNanoseconds(),
        )
        for index, alert in enumerate(resolved):
            too_many = len(resolved) - index > self._max_resolved
            if too_many or now - alert.resolved_at.ToNanoseconds() / 1e9 > self._retention:
                del alerts[alert.subject]
                changed = True
        return changed, notify

    @staticmethod
    def _end(alert: mpb.Alert, value: float, summary: str, now: float, alerts: dict, notify: list) -> bool:
        if alert.state == mpb.ALERT_STATE_PENDING:
            del alerts[alert.subject]
            return True
        alert.state = mpb.ALERT_STATE_RESOLVED
        alert.resolved_at.FromNanoseconds(int(now * 1e9))
        alert.value, alert.summary = value, "resolved: " + summary
        alert.notified = False
        notify.append(alert)
        return True

    async def _write(self, rule_id: str, alerts: dict[str, mpb.Alert] | None) -> None:
        if self._election is None:
            raise NotLeader("alert state is written only by the leading monitor")
        key = self._etcd.keys.alert_state(rule_id)
        if alerts:
            record = mpb.ListAlertsResponse(alerts=sorted(alerts.values(), key=lambda a: a.subject))
            op = Op.put(key, to_json(record))
        else:
            op = Op.delete(key)
        result = await self._etcd.transaction([self._election.fence()], [op])
        if not result.succeeded:
            raise NotLeader("leadership of the monitor election was lost")

    def _send(self, rule: mpb.AlertRule, alert: mpb.Alert) -> None:
        snapshot = mpb.Alert()
        snapshot.CopyFrom(alert)
        task = asyncio.get_running_loop().create_task(self._deliver(rule, snapshot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, rule: mpb.AlertRule, sent: mpb.Alert) -> None:
        await self._notifier.notify(rule, sent)
        current = self.state.get(rule.id, {}).get(sent.subject)
        # Mark only if the alert is still in the state we notified about.
        if current is None or current.state != sent.state or current.notified:
            return
        if sent.state == mpb.ALERT_STATE_RESOLVED and current.resolved_at != sent.resolved_at:
            return
        if sent.state == mpb.ALERT_STATE_FIRING and current.fired_at != sent.fired_at:
            return
        current.notified = True
        backoff = Backoff(0.1, 2.0)
        while self._election is not None:
            try:
                await self._write(rule.id, self.state.get(rule.id))
                return
            except NotLeader:
                return
            except EtcdError as exc:
                self._log.info("recording a notification failed; retrying", error=str(exc))
                await asyncio.sleep(backoff.next())


class AlertLeadership:
    """Campaigns in the `monitor` election; while leading, runs the alert engine every interval."""

    def __init__(
        self, etcd: EtcdClient, engine: AlertEngine, *, interval_seconds: float, ttl_seconds: int, logger: Any
    ) -> None:
        self._etcd = etcd
        self._engine = engine
        self._interval = interval_seconds
        self._ttl = ttl_seconds
        self._log = logger.bind(component="alert-leadership")
        self._task: asyncio.Task[None] | None = None
        self._election: Election | None = None
        self.terms = 0
        self.identity = ""

    @property
    def is_leader(self) -> bool:
        return self._election is not None and self._election.is_leader

    def start(self, identity: str) -> None:
        self.identity = identity
        self._task = asyncio.get_running_loop().create_task(self._run(), name="monitor-leadership")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    async def _run(self) -> None:
        backoff = Backoff(0.1, 2.0)
        while True:
            session = Session(self._etcd, self._ttl)
            try:
                await session.start()
            except EtcdError as exc:
                self._log.info("cannot open an etcd session; retrying", error=str(exc))
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            election = Election(self._etcd, session, ELECTION)
            try:
                await election.campaign(self.identity.encode())
                self._election = election
                self.terms += 1
                self._log.info("leading: evaluating alert rules", identity=self.identity)
                await self._engine.load(election)
                await self._lead(election, session)
            except (SessionLost, NotLeader, EtcdError) as exc:
                self._log.warning("alert leadership or candidacy ended", error=str(exc))
                await asyncio.sleep(backoff.next())
            except Exception:  # noqa: BLE001 - a bug must not end this replica's candidacy for good
                self._log.exception("alert evaluation failed unexpectedly; campaigning again")
                await asyncio.sleep(1.0)
            finally:
                self._election = None
                await asyncio.shield(self._retire(election, session))

    async def _retire(self, election: Election, session: Session) -> None:
        with contextlib.suppress(Exception):
            await self._engine.stop()
            await election.resign()
            await session.close()

    async def _lead(self, election: Election, session: Session) -> None:
        while election.is_leader and not session.lost.is_set():
            started = time.monotonic()
            try:
                await self._engine.step()
            except NotLeader:
                raise
            except EtcdError as exc:
                self._log.info("alert evaluation skipped: etcd unavailable", error=str(exc))
            lost = asyncio.ensure_future(election.leadership_lost.wait())
            try:
                await asyncio.wait([lost], timeout=max(0.0, self._interval - (time.monotonic() - started)))
            finally:
                lost.cancel()


class AlertView:
    """Every replica's mirror of the alert state keys (etcd watch), and the WatchAlerts fan-out."""

    def __init__(self, etcd: EtcdClient, *, logger: Any, subscriber_queue: int = 1000) -> None:
        self._etcd = etcd
        self._log = logger.bind(component="alert-view")
        self._queue_size = subscriber_queue
        self.alerts: dict[tuple[str, str], mpb.Alert] = {}
        self._subscribers: set[asyncio.Queue[mpb.Alert | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.synced = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="alert-view")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        self.close_subscribers()

    def close_subscribers(self) -> None:
        """End every watch (each gets None, after whatever it has not read yet is dropped), and any later one."""
        self._closed = True
        for queue in list(self._subscribers):
            self._subscribers.discard(queue)
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)

    def list(self, include_resolved: bool) -> list[mpb.Alert]:
        return [
            a for _, a in sorted(self.alerts.items())
            if include_resolved or a.state != mpb.ALERT_STATE_RESOLVED
        ]

    def subscribe(self) -> asyncio.Queue[mpb.Alert | None]:
        queue: asyncio.Queue[mpb.Alert | None] = asyncio.Queue(self._queue_size)
        if self._closed:
            queue.put_nowait(None)
        else:
            self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[mpb.Alert | None]) -> None:
        self._subscribers.discard(queue)

    def _publish(self, alert: mpb.Alert) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(alert)
            except asyncio.QueueFull:
                # A subscriber that cannot keep up is ended (it re-watches and gets the current state).
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    def _apply(self, rule_id: str, record: mpb.ListAlertsResponse | None) -> None:
        fresh = {(rule_id, a.subject): a for a in (record.alerts if record is not None else [])}
        for key in [k for k in self.alerts if k[0] == rule_id and k not in fresh]:
            del self.alerts[key]
        for key, alert in fresh.items():
            old = self.alerts.get(key)
            self.alerts[key] = alert
            if old is None or (old.state, old.value, old.notified) != (alert.state, alert.value, alert.notified):
                if old is None or old.state != alert.state:
                    self._publish(alert)

    async def _run(self) -> None:
        prefix = self._etcd.keys.alert_states_prefix()
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                revision = await self._etcd.current_revision()
                kvs = await self._etcd.get_prefix(prefix, revision=revision)
                seen = set()
                for kv in kvs:
                    rule_id = kv.key.rsplit("/", 1)[-1]
                    seen.add(rule_id)
                    with contextlib.suppress(CodecError):
                        self._apply(rule_id, from_json(kv.value, mpb.ListAlertsResponse))
                for rule_id in {k[0] for k in self.alerts} - seen:
                    self._apply(rule_id, None)
                self.synced.set()
                backoff.reset()
                async with contextlib.aclosing(self._etcd.watch_prefix(prefix, start_revision=revision + 1)) as events:
                    async for event in events:
                        if event.kind == "reset":
                            break
                        rule_id = event.key.rsplit("/", 1)[-1]
                        if event.kind == "delete":
                            self._apply(rule_id, None)
                        else:
                            with contextlib.suppress(CodecError):
                                self._apply(rule_id, from_json(event.value, mpb.ListAlertsResponse))
            except EtcdError as exc:
                self._log.info("alert state watch interrupted; retrying", error=str(exc))
                await asyncio.sleep(backoff.next())
