"""Scheduler API logic: validate and store deployment specs, and read deployments, statuses and nodes.

Every method here is plain etcd reads and writes, so any scheduler replica (leader or follower)
serves it: writes store the desired state (DeploymentSpec JSON at keys.deployment(name), where the
registry's DeleteModel also looks), and the leader's reconciler acts on them. Statuses are read from
the records the leader writes at keys.deployment_status(name).

Validation decisions:
- unknown model, version or alias → NOT_FOUND; archived version (directly or through an alias) →
  FAILED_PRECONDITION; malformed names, weights not summing to 100, duplicate targets, weight 0,
  min > max, max 0, a TensorRT plan on CPU, a malformed canary policy (see `_validate_canary`), a
  canary candidate that resolves to a version of the stable traffic, changing the model of an
  existing deployment → INVALID_ARGUMENT; a canary while the scheduler has no metrics source (no
  monitor configured) → FAILED_PRECONDITION;
  a model already deployed by another deployment → FAILED_PRECONDITION (one deployment per model:
  assignments are keyed by node/model/version).
- A GPU requested while no GPU node is registered is ACCEPTED (nodes may join later) and marked by the
  leader with the condition Unschedulable=True, reason NoGpuNodes; it is placed when one registers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from services.common.errors import (
    Conflict,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.common.etcd import Compare, EtcdClient, Op, from_json, to_json
from services.common.names import validate_labels, validate_name
from services.scheduler.canary import has_canary
from services.scheduler.planner import COND_READY
from services.scheduler.settings import DEFAULT_INSTANCE_TYPES, InstanceType
from services.scheduler.tasks import cancel_and_wait

_DEFAULT_PAGE_SIZE = 100
_MAX_PAGE_SIZE = 1000
_MAX_APPLY_ATTEMPTS = 16
_TXN_GETS = 100
_MAX_ENSURE_WAIT_SECONDS = 600
_MAX_CANARY_STEP_SECONDS = 86400


class LeaderLink(Protocol):
    """What the API needs from the HA machinery: EnsureReplicas goes to the leader."""

    async def ensure_replicas(self, name: str, *, forwarded: bool = False) -> None: ...


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _user_fields(spec: spb.DeploymentSpec) -> spb.DeploymentSpec:
    """The spec without the fields the scheduler manages (for the idempotency comparison)."""
    copy = spb.DeploymentSpec()
    copy.CopyFrom(spec)
    for name in ("generation", "created", "updated"):
        copy.ClearField(name)
    return copy


def _encode_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode()


def _decode_token(token: str) -> str | None:
    if not token:
        return None
    try:
        cursor = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
        validate_name("deployment", cursor)
    except (ValueError, UnicodeDecodeError, InvalidArgument) as exc:
        raise InvalidArgument("invalid page_token: pass next_page_token from a previous response") from exc
    return cursor


def ready_replicas(status: spb.DeploymentStatus) -> int:
    """READY replicas of the versions that receive traffic."""
    return sum(vs.ready_replicas for vs in status.versions if vs.weight > 0)


class DeploymentService:
    def __init__(
        self,
        etcd: EtcdClient,
        leader: LeaderLink,
        *,
        max_replicas_limit: int = 1000,
        canary_enabled: bool = True,
        instance_types: Mapping[str, InstanceType] | None = None,
        logger: Any = None,
    ) -> None:
        """`canary_enabled`: whether the leader can measure a canary (a metrics source is configured).
        `instance_types`: the named replica sizes specs may ask for (default: the settings' defaults)."""
        self._instance_types = dict(DEFAULT_INSTANCE_TYPES if instance_types is None else instance_types)
        self._etcd = etcd
        self._canary_enabled = canary_enabled
        self._keys = etcd.keys
        self._leader = leader
        self._max_replicas = max_replicas_limit
        self._log = logger

    # -- validation -------------------------------------------------------------------------------

    def _validate_shape(self, spec: spb.DeploymentSpec) -> None:
        validate_name("deployment", spec.name)
        validate_name("model", spec.model)
        validate_labels(dict(spec.labels))
        if not spec.traffic:
            raise InvalidArgument("traffic must name at least one version or alias (e.g. [{version: 1, weight: 100}])")
        seen_versions: set[int] = set()
        seen_aliases: set[str] = set()
        for entry in spec.traffic:
            which = entry.WhichOneof("target")
            if which is None:
                raise InvalidArgument("every traffic entry needs a version or an alias")
            if which == "version":
                if entry.version == 0:
                    raise InvalidArgument("traffic version must be a positive number")
                if entry.version in seen_versions:
                    raise InvalidArgument(f"duplicate traffic target: version {entry.version} appears twice")
                seen_versions.add(entry.version)
            else:
                validate_name("alias", entry.alias)
                if entry.alias in seen_aliases:
                    raise InvalidArgument(f"duplicate traffic target: alias {entry.alias!r} appears twice")
                seen_aliases.add(entry.alias)
            if not 1 <= entry.weight <= 100:
                raise InvalidArgument(f"traffic weight must be between 1 and 100, got {entry.weight}")
        total = sum(entry.weight for entry in spec.traffic)
        if total != 100:
            raise InvalidArgument(f"traffic weights must sum to 100, got {total}")
        if spec.max_replicas == 0:
            raise InvalidArgument("max_replicas must be at least 1")
        if spec.max_replicas > self._max_replicas:
            raise InvalidArgument(f"max_replicas must be at most {self._max_replicas}, got {spec.max_replicas}")
        if spec.min_replicas > spec.max_replicas:
            raise InvalidArgument(
                f"min_replicas ({spec.min_replicas}) must not exceed max_replicas ({spec.max_replicas})"
            )
        if spec.accelerator not in tpb.Accelerator.values():
            raise InvalidArgument(f"unknown accelerator {spec.accelerator}")
        if spec.precision not in tpb.Precision.values():
            raise InvalidArgument(f"unknown precision {spec.precision}")
        if spec.precision in (tpb.PRECISION_FP16, tpb.PRECISION_INT8) and spec.accelerator == tpb.ACCELERATOR_CPU:
            raise InvalidArgument("precision FP16/INT8 needs a GPU (TensorRT); use accelerator GPU or precision FP32")
        policy = spec.autoscaling
        if policy.target_in_flight_per_replica < 0:
            raise InvalidArgument("autoscaling.target_in_flight_per_replica must not be negative")
        if has_canary(spec):
            self._validate_canary(spec.canary)

    @staticmethod
    def _validate_canary(policy: spb.CanaryPolicy) -> None:
        candidate = policy.candidate
        which = candidate.WhichOneof("target") if policy.HasField("candidate") else None
        if which is None:
            raise InvalidArgument("canary.candidate needs a version or an alias")
        if which == "version" and candidate.version == 0:
            raise InvalidArgument("canary.candidate version must be a positive number")
        if which == "alias":
            validate_name("alias", candidate.alias)
        if candidate.weight != 0:
            raise InvalidArgument(
                f"canary.candidate.weight must be 0 (the steps set the candidate's weight), got {candidate.weight}"
            )
        steps = list(policy.steps)
        if not steps:
            raise InvalidArgument("canary.steps must list at least one weight (percent), e.g. [10, 50, 100]")
        for step in steps:
            if not 1 <= step <= 100:
                raise InvalidArgument(f"canary.steps must be between 1 and 100, got {step}")
        for before, after in zip(steps, steps[1:]):
            if after <= before:
                raise InvalidArgument(f"canary.steps must be strictly increasing, got {after} after {before}")
        if not 1 <= policy.step_seconds <= _MAX_CANARY_STEP_SECONDS:
            raise InvalidArgument(
                f"canary.step_seconds must be between 1 and {_MAX_CANARY_STEP_SECONDS}, got {policy.step_seconds}"
            )
        error_rate, p99 = policy.max_error_rate, policy.max_p99_latency_ms
        if math.isnan(error_rate) or not 0 <= error_rate <= 1:
            raise InvalidArgument(f"canary.max_error_rate must be between 0 and 1 (0: not checked), got {error_rate}")
        if math.isnan(p99) or math.isinf(p99) or p99 < 0:
            raise InvalidArgument(f"canary.max_p99_latency_ms must be a non-negative number (0: not checked), got {p99}")
        if error_rate == 0 and p99 == 0:
            raise InvalidArgument("canary needs at least one bound: max_error_rate or max_p99_latency_ms")

    async def _validate_targets(self, spec: spb.DeploymentSpec) -> None:
        """Every version/alias exists in the registry and may be deployed; a canary candidate is not
        one of the stable traffic's versions."""
        model = spec.model
        keys = [self._keys.model(model)]
        entries = list(spec.traffic)
        if has_canary(spec):
            entries.append(spec.canary.candidate)
        for entry in entries:
            if entry.WhichOneof("target") == "version":
                keys.append(self._keys.version(model, entry.version))
            else:
                keys.append(self._keys.alias(model, entry.alias))
        result = await self._etcd.transaction([], [Op.get(key) for key in keys])
        records = [response.kvs[0] if response.kvs else None for response in result.responses]
        if records[0] is None:
            raise NotFound(f"model {model!r} not found in the registry")
        versions: list[int] = []
        for entry, record in zip(entries, records[1:], strict=True):
            if entry.WhichOneof("target") == "version":
                if record is None:
                    raise NotFound(f"version {entry.version} of model {model!r} not found")
                versions.append(entry.version)
            else:
                if record is None:
                    raise NotFound(f"alias {entry.alias!r} of model {model!r} not found")
                versions.append(from_json(record.value, rpb.Alias).version)
        result = await self._etcd.transaction([], [Op.get(self._keys.version(model, v)) for v in versions])
        if has_canary(spec) and versions[-1] in versions[:-1]:
            candidate = spec.canary.candidate
            via = f" (alias {candidate.alias!r})" if candidate.WhichOneof("target") == "alias" else ""
            raise InvalidArgument(
                f"canary candidate version {versions[-1]}{via} is already in the traffic split; "
                "the candidate must be a version the stable traffic does not serve"
            )
        for entry, version, response in zip(entries, versions, result.responses, strict=True):
            via = f" (alias {entry.alias!r})" if entry.WhichOneof("target") == "alias" else ""
            if not response.kvs:
                raise NotFound(f"version {version}{via} of model {model!r} not found")
            record = from_json(response.kvs[0].value, rpb.ModelVersion)
            if record.state == rpb.VERSION_STATE_ARCHIVED:
                raise FailedPrecondition(f"version {version}{via} of model {model!r} is archived and cannot be deployed")
            if record.format == tpb.MODEL_FORMAT_TENSORRT_PLAN and spec.accelerator == tpb.ACCELERATOR_CPU:
                raise InvalidArgument(
                    f"version {version}{via} of model {model!r} is a TensorRT plan: it needs accelerator GPU, not CPU"
                )

    async def _other_user(self, spec: spb.DeploymentSpec) -> str | None:
        for record in await self._etcd.get_prefix(self._keys.deployments_prefix()):
            other = from_json(record.value, spb.DeploymentSpec)
            if other.model == spec.model and other.name != spec.name:
                return other.name
        return None

    # -- API ----------------------------------------------------------------------------------------

    def _apply_instance_type(self, spec: spb.DeploymentSpec) -> None:
        """Set the accelerator and per-replica memory of the spec's instance type (in place)."""
        if not spec.instance_type:
            return
        found = self._instance_types.get(spec.instance_type)
        if found is None:
            known = "; ".join(f"{name} ({kind.describe()})" for name, kind in sorted(self._instance_types.items()))
            raise InvalidArgument(f"unknown instance type {spec.instance_type!r} (known: {known or 'none configured'})")
        accelerator = tpb.ACCELERATOR_GPU if found.accelerator == "gpu" else tpb.ACCELERATOR_CPU
        if spec.accelerator not in (tpb.ACCELERATOR_UNSPECIFIED, accelerator):
            raise InvalidArgument(
                f"instance type {spec.instance_type!r} runs on a {found.accelerator.upper()}, but the spec asks for "
                f"accelerator {tpb.Accelerator.Name(spec.accelerator).removeprefix('ACCELERATOR_')}"
            )
        spec.accelerator, spec.memory_bytes = accelerator, found.memory_bytes

    async def apply(self, spec: spb.DeploymentSpec) -> tuple[spb.Deployment, bool]:
        self._apply_instance_type(spec)
        self._validate_shape(spec)
        if has_canary(spec) and not self._canary_enabled:
            raise FailedPrecondition(
                "canary needs the monitor's metrics: configure the scheduler's monitor address "
                "(AIMAAS_SCHEDULER__MONITOR_ADDRESS), or shift traffic with weights instead"
            )
        await self._validate_targets(spec)
        other = await self._other_user(spec)
        if other is not None:
            raise FailedPrecondition(
                f"model {spec.model!r} is already deployed by deployment {other!r}; change that one's traffic instead"
            )
        key = self._keys.deployment(spec.name)
        for _ in range(_MAX_APPLY_ATTEMPTS):
            current = await self._etcd.get(key)
            stored = from_json(current.value, spb.DeploymentSpec) if current is not None else None
            if stored is not None and _user_fields(stored) == _user_fields(spec):
                return await self._deployment(stored), False
            if stored is not None and stored.model != spec.model:
                raise InvalidArgument(
                    f"deployment {spec.name!r} serves model {stored.model!r}; its model cannot change "
                    "(create another deployment, or delete this one first)"
                )
            new = spb.DeploymentSpec()
            new.CopyFrom(spec)
            now = _now()
            new.generation = (stored.generation if stored is not None else 0) + 1
            new.created.CopyFrom(stored.created if stored is not None else now)
            new.updated.CopyFrom(now)
            guard = (
                Compare.mod_revision(key, "==", current.mod_revision)
                if current is not None
                else Compare.create_revision(key, "==", 0)
            )
            result = await self._etcd.transaction([guard], [Op.put(key, to_json(new))])
            if result.succeeded:
                if self._log is not None:
                    self._log.info("deployment applied", deployment=spec.name, generation=new.generation)
                return await self._deployment(new), True
        raise Conflict(f"deployment {spec.name!r} is being changed concurrently; retry")

    async def _deployment(self, spec: spb.DeploymentSpec) -> spb.Deployment:
        status_kv = await self._etcd.get(self._keys.deployment_status(spec.name))
        status = from_json(status_kv.value, spb.DeploymentStatus) if status_kv is not None else spb.DeploymentStatus()
        return spb.Deployment(spec=spec, status=status)

    async def get(self, name: str) -> spb.Deployment:
        validate_name("deployment", name)
        result = await self._etcd.transaction(
            [], [Op.get(self._keys.deployment(name)), Op.get(self._keys.deployment_status(name))]
        )
        spec_kvs, status_kvs = result.responses[0].kvs, result.responses[1].kvs
        if not spec_kvs:
            raise NotFound(f"deployment {name!r} not found")
        status = from_json(status_kvs[0].value, spb.DeploymentStatus) if status_kvs else spb.DeploymentStatus()
        return spb.Deployment(spec=from_json(spec_kvs[0].value, spb.DeploymentSpec), status=status)

    async def list(self, page: tpb.PageRequest, model: str = "") -> tuple[list[spb.Deployment], str]:
        if model:
            validate_name("model", model)
        size = min(page.page_size or _DEFAULT_PAGE_SIZE, _MAX_PAGE_SIZE)
        cursor = _decode_token(page.page_token)
        start_after = self._keys.deployment(cursor) if cursor else None
        prefix = self._keys.deployments_prefix()
        specs: list[spb.DeploymentSpec] = []
        more = False
        batch_size = size + 1 if not model else max(4 * size, 256)
        while True:
            batch = await self._etcd.get_prefix(prefix, limit=batch_size, start_after=start_after)
            for record in batch:
                start_after = record.key
                if self._keys.parse_deployment_key(record.key) is None:
                    continue
                spec = from_json(record.value, spb.DeploymentSpec)
                if model and spec.model != model:
                    continue
                if len(specs) == size:
                    more = True
                    break
                specs.append(spec)
            if more or len(batch) < batch_size:
                break
        statuses: dict[str, spb.DeploymentStatus] = {}
        for start in range(0, len(specs), _TXN_GETS):
            chunk = specs[start : start + _TXN_GETS]
            result = await self._etcd.transaction([], [Op.get(self._keys.deployment_status(s.name)) for s in chunk])
            for spec, response in zip(chunk, result.responses, strict=True):
                if response.kvs:
                    statuses[spec.name] = from_json(response.kvs[0].value, spb.DeploymentStatus)
        deployments = [spb.Deployment(spec=s, status=statuses.get(s.name, spb.DeploymentStatus())) for s in specs]
        token = _encode_token(specs[-1].name) if more and specs else ""
        return deployments, token

    async def delete(self, name: str) -> None:
        validate_name("deployment", name)
        key = self._keys.deployment(name)
        result = await self._etcd.transaction(
            [Compare.create_revision(key, ">", 0)],
            [Op.delete(key), Op.delete(self._keys.deployment_status(name))],
        )
        if not result.succeeded:
            raise NotFound(f"deployment {name!r} not found")
        if self._log is not None:
            self._log.info("deployment deleted; its replicas are unloaded", deployment=name)

    async def watch(self, name: str) -> AsyncIterator[spb.Deployment]:
        """The deployment now, then after every change of its spec or status, until it is deleted."""
        validate_name("deployment", name)
        spec_key, status_key = self._keys.deployment(name), self._keys.deployment_status(name)
        result = await self._etcd.transaction([], [Op.get(spec_key), Op.get(status_key)])
        spec_kvs, status_kvs = result.responses[0].kvs, result.responses[1].kvs
        if not spec_kvs:
            raise NotFound(f"deployment {name!r} not found")
        spec = from_json(spec_kvs[0].value, spb.DeploymentSpec)
        status = from_json(status_kvs[0].value, spb.DeploymentStatus) if status_kvs else spb.DeploymentStatus()
        yield spb.Deployment(spec=spec, status=status)

        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def pump(key: str) -> None:
            watch = self._etcd.watch_key(key, start_revision=result.revision + 1)
            async with contextlib.aclosing(watch) as events:
                async for event in events:
                    if event.kind == "reset":
                        current = await self._etcd.get(key)
                        await queue.put((key, current.value if current is not None else None))
                    else:
                        await queue.put((key, event.value if event.kind == "put" else None))

        tasks = [asyncio.create_task(pump(spec_key)), asyncio.create_task(pump(status_key))]
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait([getter, *tasks], return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    for task in tasks:
                        if task.done():
                            task.result()
                    continue
                key, value = getter.result()
                if key == spec_key:
                    if value is None:
                        return  # deleted: the stream ends
                    spec = from_json(value, spb.DeploymentSpec)
                else:
                    status = from_json(value, spb.DeploymentStatus) if value is not None else spb.DeploymentStatus()
                if not queue.empty():
                    continue  # coalesce a burst: send the latest state once
                yield spb.Deployment(spec=spec, status=status)
        finally:
            await cancel_and_wait(tasks)

    async def list_nodes(self) -> list[spb.NodeInfo]:
        result = await self._etcd.transaction(
            [], [Op.get_prefix(self._keys.nodes_prefix()), Op.get_prefix(self._keys.statuses_prefix())]
        )
        replicas: dict[str, list[spb.ReplicaStatus]] = {}
        for kv in result.responses[1].kvs:
            parsed = self._keys.parse_status_key(kv.key)
            if parsed is not None:
                replicas.setdefault(parsed[0], []).append(from_json(kv.value, spb.ReplicaStatus))
        nodes = []
        for kv in result.responses[0].kvs:
            node_id = self._keys.parse_node_key(kv.key)
            if node_id is None:
                continue
            mine = replicas.get(node_id, [])
            used = sum(r.memory_bytes + r.gpu_memory_bytes for r in mine)
            nodes.append(
                spb.NodeInfo(node=from_json(kv.value, spb.Node), replicas=mine, memory_used_bytes=used)
            )
        return nodes

    async def ensure_replicas(self, name: str, wait_seconds: int, *, forwarded: bool = False) -> spb.Deployment:
        deployment = await self.get(name)
        await self._leader.ensure_replicas(name, forwarded=forwarded)
        wait_seconds = min(wait_seconds, _MAX_ENSURE_WAIT_SECONDS)
        if wait_seconds <= 0 or ready_replicas(deployment.status) > 0:
            return deployment
        try:
            async with asyncio.timeout(wait_seconds):
                async for deployment in self.watch(name):
                    if ready_replicas(deployment.status) > 0:
                        return deployment
        except TimeoutError:
            ready = next((c for c in deployment.status.conditions if c.type == COND_READY), None)
            detail = f": {ready.reason}: {ready.message}" if ready is not None else ""
            raise DeadlineExceeded(f"deployment {name!r} has no READY replica after {wait_seconds}s{detail}") from None
        raise NotFound(f"deployment {name!r} was deleted while waiting for a READY replica")
