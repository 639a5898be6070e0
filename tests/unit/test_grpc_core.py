"""gRPC core's I/O choice, made before grpcio is imported (services.common.grpc_core)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from services.common.grpc_core import EPOLL_IO_EXPERIMENTS, GRPC_EXPERIMENTS_VARIABLE, prefer_epoll_io
from tests.support.scheduler import REPO


def test_defaults_a_child_environment():
    env = {"PATH": "/bin"}
    assert prefer_epoll_io(env) is True
    assert env[GRPC_EXPERIMENTS_VARIABLE] == EPOLL_IO_EXPERIMENTS


def test_an_operator_choice_wins_even_when_empty():
    for chosen in ("", "-event_engine_client"):
        env = {GRPC_EXPERIMENTS_VARIABLE: chosen}
        assert prefer_epoll_io(env) is False
        assert env[GRPC_EXPERIMENTS_VARIABLE] == chosen


def test_too_late_once_grpc_is_imported(monkeypatch):
    import grpc  # noqa: F401 - the test process has it imported already

    # setenv first, so that the undo also removes what prefer_epoll_io sets.
    monkeypatch.setenv(GRPC_EXPERIMENTS_VARIABLE, "placeholder")
    monkeypatch.delenv(GRPC_EXPERIMENTS_VARIABLE)
    assert prefer_epoll_io() is False
    # Still set, for the child processes this one starts.
    assert os.environ[GRPC_EXPERIMENTS_VARIABLE] == EPOLL_IO_EXPERIMENTS


_ROUND_TRIP = textwrap.dedent("""
    import asyncio, sys
    from services.common.grpc_core import prefer_epoll_io
    applied = prefer_epoll_io()
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    async def main():
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        await server.stop(None)
        print(applied, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    asyncio.run(main())
""")


def test_a_service_process_serves_and_calls_with_it_and_grpc_knows_the_experiments():
    # A future grpcio without these experiments would log "Unknown experiment" (and ignore them):
    # this is the guard that the pinned grpcio still has the epoll iomgr to fall back to.
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _ROUND_TRIP], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "SERVING"]
    assert "Unknown experiment" not in done.stderr, done.stderr
