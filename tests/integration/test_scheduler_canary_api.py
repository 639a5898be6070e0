"""ApplyDeployment with a canary policy against a real etcd, registry and scheduler: every malformed
policy gets a precise error, a candidate must resolve to a version the stable traffic does not serve,
and a scheduler without a metrics source (no monitor configured) refuses canaries."""

from __future__ import annotations

import math

import grpc
import pytest

from aimaas.registry.v1 import registry_pb2 as rpb
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from services.common.etcd import EtcdClient
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload
from tests.support.scheduler import running_scheduler, scheduler_settings

INVALID, NOT_FOUND, PRECONDITION = (
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
)  # fmt: skip


@pytest.fixture
async def registry(etcd_settings, local_store_settings):
    """Model `fraud`: versions 1, 2, 3 (3 archived), alias prod → 1, alias next → 2."""
    async with running_registry(registry_settings(etcd_settings, local_store_settings)) as (_, stub):
        for seed in range(3):
            await upload(stub, "fraud", mlp_bytes(seed=seed))
        await stub.SetAlias(rpb.SetAliasRequest(model="fraud", alias="prod", version=1))
        await stub.SetAlias(rpb.SetAliasRequest(model="fraud", alias="next", version=2))
        await stub.ArchiveVersion(rpb.ArchiveVersionRequest(model="fraud", version=3))
        yield stub


@pytest.fixture
async def scheduler(etcd_settings, registry):
    # A monitor address makes canaries available; nothing listens there (no canary runs here).
    settings = scheduler_settings(etcd_settings, monitor_address="127.0.0.1:9")
    async with running_scheduler(settings) as (_, stub):
        yield stub


def spec(canary: spb.CanaryPolicy, traffic=None) -> spb.DeploymentSpec:
    return spb.DeploymentSpec(
        name="web", model="fraud", min_replicas=1, max_replicas=2, canary=canary,
        traffic=traffic or [spb.TrafficTarget(version=1, weight=100)],
    )  # fmt: skip


def policy(candidate=None, steps=(10, 50, 100), step_seconds=30, max_error_rate=0.05, max_p99=0.0, **fields):
    if candidate is None:
        candidate = spb.TrafficTarget(version=2)
    return spb.CanaryPolicy(
        candidate=candidate, steps=list(steps), step_seconds=step_seconds, max_error_rate=max_error_rate,
        max_p99_latency_ms=max_p99, **fields,
    )  # fmt: skip


no_candidate = spb.CanaryPolicy(steps=[10, 100], step_seconds=30, max_error_rate=0.05)


@pytest.mark.parametrize(
    ("canary", "code", "fragment"),
    [
        (no_candidate, INVALID, "canary.candidate needs a version or an alias"),
        (policy(spb.TrafficTarget(version=0)), INVALID, "canary.candidate version must be a positive number"),
        (policy(spb.TrafficTarget(alias="Bad Alias")), INVALID, "invalid alias name"),
        (policy(spb.TrafficTarget(version=2, weight=10)), INVALID, "canary.candidate.weight must be 0"),
        (policy(steps=()), INVALID, "canary.steps must list at least one weight"),
        (policy(steps=(0, 50)), INVALID, "canary.steps must be between 1 and 100, got 0"),
        (policy(steps=(50, 101)), INVALID, "canary.steps must be between 1 and 100, got 101"),
        (policy(steps=(50, 50)), INVALID, "strictly increasing, got 50 after 50"),
        (policy(steps=(50, 20, 100)), INVALID, "strictly increasing, got 20 after 50"),
        (policy(step_seconds=0), INVALID, "canary.step_seconds must be between 1 and 86400, got 0"),
        (policy(step_seconds=86401), INVALID, "canary.step_seconds must be between 1 and 86400, got 86401"),
        (policy(max_error_rate=1.5), INVALID, "canary.max_error_rate must be between 0 and 1"),
        (policy(max_error_rate=-0.1), INVALID, "canary.max_error_rate must be between 0 and 1"),
        (policy(max_error_rate=math.nan), INVALID, "canary.max_error_rate must be between 0 and 1"),
        (policy(max_p99=-1.0), INVALID, "canary.max_p99_latency_ms must be a non-negative number"),
        (policy(max_p99=math.inf), INVALID, "canary.max_p99_latency_ms must be a non-negative number"),
        (policy(max_error_rate=0.0, max_p99=0.0), INVALID, "at least one bound"),
        (policy(spb.TrafficTarget(version=9)), NOT_FOUND, "version 9 of model 'fraud' not found"),
        (policy(spb.TrafficTarget(alias="nope")), NOT_FOUND, "alias 'nope' of model 'fraud' not found"),
        (policy(spb.TrafficTarget(version=3)), PRECONDITION, "version 3 of model 'fraud' is archived"),
        (
            policy(spb.TrafficTarget(version=1)),
            INVALID,
            "canary candidate version 1 is already in the traffic split",
        ),
        (
            policy(spb.TrafficTarget(alias="prod")),
            INVALID,
            "canary candidate version 1 (alias 'prod') is already in the traffic split",
        ),
    ],
)
async def test_bad_canary_policies_are_rejected_with_precise_errors(scheduler, etcd_settings, canary, code, fragment):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(canary)))
    assert info.value.code() == code, info.value.details()
    assert fragment in info.value.details()
    etcd = EtcdClient(etcd_settings)
    try:
        assert await etcd.get_prefix(etcd.keys.deployments_prefix()) == []
    finally:
        await etcd.close()


async def test_a_valid_canary_is_accepted_and_stored(scheduler):
    good = spec(policy(spb.TrafficTarget(alias="next"), steps=(5, 25, 100), max_p99=250.0))
    applied = await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=good))
    assert applied.changed
    stored = (await scheduler.GetDeployment(spb.GetDeploymentRequest(name="web"))).deployment.spec
    assert stored.canary == good.canary
    # An empty canary message is no canary (as before canaries existed).
    plain = spec(spb.CanaryPolicy())
    assert (await scheduler.ApplyDeployment(spb.ApplyDeploymentRequest(spec=plain))).changed


async def test_a_scheduler_without_a_monitor_refuses_canaries(etcd_settings, registry):
    async with running_scheduler(scheduler_settings(etcd_settings)) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=spec(policy())))
        assert info.value.code() == PRECONDITION
        assert "canary needs the monitor's metrics" in info.value.details()
        assert "AIMAAS_SCHEDULER__MONITOR_ADDRESS" in info.value.details()
