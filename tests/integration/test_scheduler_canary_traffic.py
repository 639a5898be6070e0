"""The canary acceptance with real traffic and the real monitor: etcd, registry, scheduler, the
monitor (`python -m services.monitor`) and two inference node processes that stream their statistics
to it. A traffic generator routes requests the way the gateway does (a version chosen by the
effective weights in the deployment's status, then one of its READY replicas) and keeps its own
ground truth per version.

- Candidate version 3 expects 5 features while the traffic sends 4: every request it gets fails
  (INVALID_ARGUMENT), the nodes report the failures, the monitor's error rate exceeds the bound and
  the scheduler rolls the canary back by itself, with the measured rate in the Canary condition.
- Candidate version 2 is healthy: it walks the steps and is promoted to 100%.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import grpc
import pytest

from aimaas.cli.health import grpc_serving
from aimaas.scheduler.v1 import scheduler_pb2 as spb
from aimaas.scheduler.v1 import scheduler_pb2_grpc
from aimaas.types.v1 import types_pb2 as tpb
from inference import grpc_predict_v2_pb2 as ipb
from inference import grpc_predict_v2_pb2_grpc as ipb_grpc
from services.scheduler.app import SchedulerApp
from tests.support.models import mlp_bytes
from tests.support.registry import registry_settings, running_registry, upload
from tests.support.scheduler import Process, base_env, condition, eventually, inference_node, scheduler_settings
from tests.support.servers import free_port

READY = tpb.REPLICA_STATE_READY


async def wait_serving(process: Process, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.process is not None and process.process.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log_tail()}")
        if await asyncio.to_thread(grpc_serving, process.address, 1.0):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{process.name} did not become SERVING:\n{process.log_tail()}")


def monitor_process(etcd, store, tmp_path) -> Process:
    port = free_port()
    env = base_env(etcd, store)
    env.update(
        {
            "AIMAAS_MONITOR__HOST": "127.0.0.1",
            "AIMAAS_MONITOR__GRPC_PORT": str(port),
            "AIMAAS_MONITOR__METRICS_PORT": "-1",
            "AIMAAS_MONITOR__DASHBOARD_PORT": "-1",
            "AIMAAS_MONITOR__AUTH__ENABLED": "false",
            # Time shrunk tenfold: the "1m" window the canary reads is 6 s, so a verdict is about
            # the candidate's recent traffic.
            "AIMAAS_MONITOR__WINDOW_SCALE": "0.1",
            "AIMAAS_MONITOR__FINE_BUCKET_SECONDS": "0.5",
            "AIMAAS_MONITOR__SHUTDOWN_GRACE_SECONDS": "1",
        }
    )
    return Process("monitor", "services.monitor", env, tmp_path, port)


class Traffic:
    """Routes like the gateway (effective weights, READY replicas) and counts outcomes per version."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerServiceStub, rate: float = 60.0) -> None:
        self.ok: Counter[int] = Counter()
        self.failed: Counter[int] = Counter()
        self._stub = stub
        self._interval = 1.0 / rate
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._routes: list[tuple[int, int, list[str]]] = []
        self._tasks = [asyncio.create_task(self._refresh()), asyncio.create_task(self._send())]

    async def _refresh(self) -> None:
        while True:
            status = (await self._stub.GetDeployment(spb.GetDeploymentRequest(name="d"))).deployment.status
            self._routes = [
                (vs.version, vs.weight, [r.address for r in vs.replicas if r.state == READY and r.address])
                for vs in status.versions
                if vs.weight > 0
            ]
            await asyncio.sleep(0.1)

    async def _send(self) -> None:
        rng = random.Random(7)
        while True:
            await asyncio.sleep(self._interval)
            routes = [r for r in self._routes if r[2]]
            if not routes:
                continue
            version, _, addresses = rng.choices(routes, weights=[w for _, w, _ in routes])[0]
            address = rng.choice(addresses)
            channel = self._channels.get(address) or self._channels.setdefault(address, grpc.aio.insecure_channel(address))
            request = ipb.ModelInferRequest(
                model_name="m",
                model_version=str(version),
                inputs=[
                    ipb.ModelInferRequest.InferInputTensor(
                        name="x", datatype="FP32", shape=[1, 4],
                        contents=ipb.InferTensorContents(fp32_contents=[0.1, 0.2, 0.3, 0.4]),
                    )  # fmt: skip
                ],
            )
            try:
                await ipb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
                self.ok[version] += 1
            except grpc.aio.AioRpcError:
                self.failed[version] += 1

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        for channel in self._channels.values():
            await channel.close()


def canary_spec(candidate: int, *, steps=(50, 100), step_seconds=2) -> spb.DeploymentSpec:
    return spb.DeploymentSpec(
        name="d", model="m", traffic=[spb.TrafficTarget(version=1, weight=100)], min_replicas=1, max_replicas=2,
        accelerator=tpb.ACCELERATOR_CPU,
        canary=spb.CanaryPolicy(
            candidate=spb.TrafficTarget(version=candidate), steps=list(steps), step_seconds=step_seconds,
            max_error_rate=0.05, max_p99_latency_ms=2000.0,
        ),
    )  # fmt: skip


async def deployment(stub) -> spb.Deployment:
    return (await stub.GetDeployment(spb.GetDeploymentRequest(name="d"))).deployment


def effective(d: spb.Deployment) -> dict[int, int]:
    return {vs.version: vs.weight for vs in d.status.versions if vs.weight > 0}


@pytest.mark.timeout(120)
async def test_real_traffic_errors_roll_back_and_a_healthy_candidate_is_promoted(
    etcd_settings, local_store_settings, tmp_path
):
    monitor = monitor_process(etcd_settings, local_store_settings, tmp_path)
    reporting = {
        "AIMAAS_INFERENCE__MONITOR_ADDRESS": monitor.address,
        "AIMAAS_INFERENCE__STATS_INTERVAL_SECONDS": "0.25",
    }
    nodes = [inference_node(f"node-{i}", etcd_settings, local_store_settings, tmp_path, **reporting) for i in range(2)]
    processes = [monitor, *nodes]
    traffic: Traffic | None = None
    try:
        for process in processes:
            process.start()
        async with running_registry(registry_settings(etcd_settings, local_store_settings)) as (_, registry):
            await upload(registry, "m", mlp_bytes(seed=1))  # 1: stable
            await upload(registry, "m", mlp_bytes(seed=2))  # 2: healthy candidate
            await upload(registry, "m", mlp_bytes(inputs=5, seed=3))  # 3: fails for this traffic
            await asyncio.gather(*(wait_serving(p) for p in processes))
            settings = scheduler_settings(
                etcd_settings, monitor_address=monitor.address, canary_check_interval_seconds=0.25,
                canary_min_requests=20, canary_max_hold_seconds=30,
            )  # fmt: skip
            app = SchedulerApp(settings)
            await app.start()
            channel = grpc.aio.insecure_channel(app.grpc.address)
            try:
                stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
                stable = canary_spec(3)
                stable.ClearField("canary")
                await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=stable))

                async def serving_v1():
                    d = await deployment(stub)
                    return effective(d) == {1: 100} and d.status.versions[0].ready_replicas == 1

                await eventually(serving_v1, 30, "version 1 serving")
                traffic = Traffic(stub)
                await eventually(lambda: traffic.ok[1] >= 20, 15, "traffic flowing to version 1")

                # -- a candidate that fails for the traffic sent: rolled back by itself
                await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=canary_spec(3)))

                async def rolled_back():
                    found = condition(await deployment(stub), "Canary")
                    return found if found is not None and found.reason == "RolledBack" else None

                applied = time.monotonic()
                rolled = await eventually(rolled_back, 40, f"the failing canary rolled back {dict(traffic.failed)}")
                print(f"rolled back {time.monotonic() - applied:.1f}s after the canary was applied: {rolled.message}")
                assert "ErrorRateExceeded at step 50%" in rolled.message, rolled.message
                d = await deployment(stub)
                assert d.status.canary.error_rate > 0.05 and d.status.canary.request_count >= 20
                assert effective(d) == {1: 100}
                # Ground truth: version 3 did get traffic, and all of it failed.
                assert traffic.failed[3] >= 20 and traffic.ok[3] == 0
                sent_to_v3 = traffic.failed[3]
                await asyncio.sleep(1.0)
                assert traffic.failed[3] <= sent_to_v3 + 10  # (requests already routed may still land)

                # -- a healthy candidate: promoted to 100%
                await stub.ApplyDeployment(spb.ApplyDeploymentRequest(spec=canary_spec(2)))

                async def promoted():
                    found = condition(await deployment(stub), "Canary")
                    return found if found is not None and found.reason == "Promoted" else None

                applied = time.monotonic()
                done = await eventually(promoted, 60, f"the healthy canary promoted {dict(traffic.ok)}")
                print(f"promoted {time.monotonic() - applied:.1f}s after the canary was applied: {done.message}")
                assert "version 2 promoted to 100%" in done.message
                assert effective(await deployment(stub)) == {2: 100}
                before = traffic.ok[2]
                await eventually(lambda: traffic.ok[2] >= before + 20, 15, "traffic served by version 2")
                assert traffic.failed[2] == 0
            finally:
                if traffic is not None:
                    await traffic.close()
                await channel.close()
                await app.stop()
    finally:
        for process in processes:
            process.stop()
