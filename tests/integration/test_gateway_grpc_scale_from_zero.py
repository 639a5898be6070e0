"""Requests for a deployment scaled to zero: held while the scheduler brings a replica back
(EnsureReplicas), bounded in time and queue, with precise errors otherwise.

The end-to-end case uses a real registry and scheduler (in-process; the scheduler's load signal is a
test double standing in for the monitor, as in test_scheduler_autoscaling) and a real inference node
process; the error cases need only etcd.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.types.v1 import types_pb2 as tpb
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from services.common.etcd import EtcdClient, to_json
from services.scheduler.autoscaler import LoadSample
from services.gateway.settings import LimitSettings
from tests.support.gateway import deploy, gateway_settings, running_gateway, wait_serving
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry
from tests.support.scheduler import (
    eventually,
    inference_node,
    replica_states,
    running_scheduler,
    scheduler_settings,
)


class Source:
    """The scheduler's pluggable load signal, driven by the test."""

    def __init__(self) -> None:
        self.current: LoadSample | None = None

    async def sample(self, model, version, replicas):
        return self.current

    async def close(self) -> None:
        pass


def _request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return request


async def test_a_request_brings_a_deployment_back_from_zero(etcd_settings, local_store_settings, tmp_path):
    source = Source()
    node = inference_node("node-z", etcd_settings, local_store_settings, tmp_path).start()
    try:
        await asyncio.to_thread(wait_serving, node)
        async with (
            running_registry(registry_settings(etcd_settings, local_store_settings)) as (registry_app, _),
            running_scheduler(
                scheduler_settings(etcd_settings, autoscale_interval_seconds=0.1, scale_down_stabilization_seconds=0.5),
                load_signal=source,
            ) as (scheduler_app, _),
            running_gateway(
                gateway_settings(
                    etcd_settings,
                    registry=registry_app.grpc.address,
                    scheduler=scheduler_app.grpc.address,
                    scale_from_zero_hold_seconds=60,
                )
            ) as gateway,
        ):
            await deploy(
                gateway, "sleepy", [mlp_bytes(seed=41)], min_replicas=0, max_replicas=1, ready_replicas=1,
                autoscaling=spb.AutoscalingPolicy(scale_to_zero_after_seconds=1),
            )  # fmt: skip
            # Idle: scaled to zero, and the routing table follows.
            source.current = LoadSample(in_flight=0.0, qps=0.0, replicas=1)
            await eventually(lambda: not gateway.routing.table.lookup("sleepy").ready, 30, "scaled to zero")
            source.current = None  # no signal from now on: nothing scales to zero again
            etcd = EtcdClient(etcd_settings)
            try:  # unloaded on the node, not only marked
                await eventually(lambda: _no_replica(etcd, "sleepy"), 30, "the replica unloaded")
            finally:
                await etcd.close()

            async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                assert not (await stub.ModelReady(pb.ModelReadyRequest(name="sleepy"), timeout=5)).ready
                started = time.monotonic()
                responses = await asyncio.gather(*(stub.ModelInfer(_request("sleepy"), timeout=60) for _ in range(5)))
                held = time.monotonic() - started
                assert [r.model_name for r in responses] == ["sleepy"] * 5
                # One call for the burst (a second one only if the load took longer than the repeat interval).
                assert gateway.scaler.waiting == 0 and 1 <= gateway.scaler.ensure_calls <= 2
                print(f"\nscale from zero: 5 held requests answered after {held:.2f}s")
                assert (await stub.ModelReady(pb.ModelReadyRequest(name="sleepy"), timeout=5)).ready
    finally:
        node.stop()


async def _no_replica(etcd: EtcdClient, model: str) -> bool:
    return not await replica_states(etcd, model)


async def _put_spec(etcd: EtcdClient, name: str, min_replicas: int, accelerator=tpb.ACCELERATOR_CPU) -> None:
    spec = spb.DeploymentSpec(
        name=name, model=name, traffic=[spb.TrafficTarget(version=1, weight=100)],
        min_replicas=min_replicas, max_replicas=1, accelerator=accelerator,
    )  # fmt: skip
    await etcd.put(etcd.keys.deployment(name), to_json(spec))


async def test_hold_is_bounded_and_errors_are_precise(etcd_settings, local_store_settings):
    etcd = EtcdClient(etcd_settings)
    try:
        await _put_spec(etcd, "waiting", 0)
        await _put_spec(etcd, "pinned-up", 1)
        # No scheduler reachable at first: EnsureReplicas fails and the held request says why.
        settings = gateway_settings(etcd_settings, scale_from_zero_hold_seconds=1.5, scale_from_zero_queue_size=2)
        async with running_gateway(settings) as gateway:
            await eventually(lambda: gateway.routing.table.find("pinned-up"), 10, "routes")
            async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ModelInfer(_request("waiting"), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "cannot scale model 'waiting' from zero: scheduler:" in info.value.details()
                # min_replicas > 0 without a READY replica: not a scale-from-zero case, no hold.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.ModelInfer(_request("pinned-up"), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "no READY replica (1 wanted)" in info.value.details()

        # A scheduler that accepts EnsureReplicas but cannot place (a GPU deployment, no GPU node):
        # requests wait at most the hold time, and at most queue_size of them wait.
        async with (
            running_registry(registry_settings(etcd_settings, local_store_settings)) as (registry_app, _),
            running_scheduler(scheduler_settings(etcd_settings)) as (scheduler_app, _),
        ):
            await _put_spec(etcd, "nogpu", 0, accelerator=tpb.ACCELERATOR_GPU)
            settings = gateway_settings(
                etcd_settings,
                registry=registry_app.grpc.address,
                scheduler=scheduler_app.grpc.address,
                scale_from_zero_hold_seconds=1.5,
                scale_from_zero_queue_size=2,
            )
            async with running_gateway(settings) as gateway:
                await eventually(lambda: gateway.routing.table.find("nogpu"), 10, "route")
                async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                    stub = pb_grpc.GRPCInferenceServiceStub(channel)
                    results = await asyncio.gather(
                        *(stub.ModelInfer(_request("nogpu"), timeout=10) for _ in range(3)), return_exceptions=True
                    )
                    codes = sorted(r.code().name for r in results)  # type: ignore[union-attr]
                    assert codes == ["RESOURCE_EXHAUSTED", "UNAVAILABLE", "UNAVAILABLE"], results
                    unavailable = next(r for r in results if r.code() == grpc.StatusCode.UNAVAILABLE)  # type: ignore[union-attr]
                    assert "no replica became READY within 1.5s" in unavailable.details()  # type: ignore[union-attr]
                    # A caller's deadline shorter than the hold ends the wait first.
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.ModelInfer(_request("nogpu"), timeout=0.5)
                    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

            # Concurrency limits of the gRPC port (a held request occupies its slot): overall and per key.
            for limits, message in (
                ({"max_concurrency": 1}, "too many concurrent requests (limit 1)"),
                ({"max_concurrency_per_key": 1}, "too many concurrent requests for this API key (limit 1)"),
            ):
                limited = settings.model_copy(
                    update={"gateway": settings.gateway.model_copy(update={"limits": LimitSettings(**limits)})}
                )
                async with running_gateway(limited) as gateway:
                    await eventually(lambda: gateway.routing.table.find("nogpu"), 10, "route")
                    async with grpc.aio.insecure_channel(gateway.grpc_address) as channel:
                        stub = pb_grpc.GRPCInferenceServiceStub(channel)
                        held = asyncio.ensure_future(stub.ModelInfer(_request("nogpu"), timeout=10))
                        await eventually(lambda: gateway.scaler.waiting == 1, 10, "one request held")
                        with pytest.raises(grpc.aio.AioRpcError) as info:
                            await stub.ModelInfer(_request("nogpu"), timeout=10)
                        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        assert message in info.value.details() and "retry after 1s" in info.value.details()
                        with pytest.raises(grpc.aio.AioRpcError):
                            await held
    finally:
        await etcd.close()
