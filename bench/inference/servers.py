"""Server processes under test: an AIMaaS inference node, MLServer and the bare grpc.aio ceiling
servicer (bench/inference/ceiling_server.py), each on free loopback ports.

Every process is started in its own session (process group) and stopped with SIGTERM, then
SIGKILL after a grace period, so nothing outlives the bench (use as context managers).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil

from services.common.grpc_core import prefer_epoll_io
from tests.support.servers import free_port

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_MLSERVER_VENV = REPO_ROOT / "bench" / ".venv-mlserver"


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], grpc_port: int,
                 log_path: pathlib.Path, cwd: pathlib.Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.grpc_port = grpc_port
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, model: str, version: str, timeout: float = 90.0) -> float:
        """Block until gRPC says server and model are ready; returns seconds waited."""
        import tritonclient.grpc as grpcclient

        started = time.monotonic()
        deadline = started + timeout
        last_error = "no answer yet"
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    code = None if self.process is None else self.process.returncode
                    raise ServerStartError(f"{self.name} exited with {code} before ready:\n{self.log_tail()}")
                try:
                    if client.is_server_ready(client_timeout=2) and client.is_model_ready(model, version, client_timeout=2):
                        return time.monotonic() - started
                    last_error = "server or model not ready"
                except Exception as error:  # noqa: BLE001 - any transport error means "not yet"
                    last_error = str(error).splitlines()[0][:200]
                time.sleep(0.2)
        finally:
            client.close()
        raise ServerStartError(f"{self.name} not ready after {timeout:.0f}s ({last_error}):\n{self.log_tail()}")

    def cpu_seconds(self) -> float | None:
        """User+system CPU of the server process and its children so far (None if gone)."""
        if self.process is None:
            return None
        try:
            proc = psutil.Process(self.process.pid)
            total = sum(proc.cpu_times()[:2])
            for child in proc.children(recursive=True):
                try:
                    total += sum(child.cpu_times()[:2])
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None

    def stop(self, grace: float = 15.0) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None:
                try:
                    os.killpg(self.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(self.process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    self.process.wait(10)
            else:
                # The leader is gone; reap any stragglers left in its group.
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def aimaas_server(name: str, repository: pathlib.Path, workdir: pathlib.Path, *, batching: bool,
                  max_batch_size: int, max_queue_delay_us: int, frontend: str = "h2") -> ServerProcess:
    """`frontend`: the node's gRPC front end (services.inference.settings: "h2", the default, or "grpcio")."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")}
    env.update({
        "AIMAAS_INFERENCE__MODEL_REPOSITORY": str(repository),
        "AIMAAS_INFERENCE__HOST": "127.0.0.1",
        "AIMAAS_INFERENCE__GRPC_PORT": str(port),
        "AIMAAS_INFERENCE__METRICS_PORT": "-1",
        "AIMAAS_INFERENCE__GRPC_FRONTEND": frontend,
        "AIMAAS_INFERENCE__CACHE_DIR": str(workdir / f"{name}-cache"),
        "AIMAAS_INFERENCE__BATCHING__ENABLED": "true" if batching else "false",
        "AIMAAS_INFERENCE__BATCHING__MAX_BATCH_SIZE": str(max_batch_size),
        "AIMAAS_INFERENCE__BATCHING__MAX_QUEUE_DELAY_US": str(max_queue_delay_us),
        "AIMAAS_LOG__LEVEL": "WARNING",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")])),
    })
    argv = [sys.executable, "-m", "services.inference", "--model-repository", str(repository)]
    return ServerProcess(name, argv, env, port, workdir / f"{name}.log", cwd=REPO_ROOT)


def ceiling_server(workdir: pathlib.Path, name: str = "grpc-aio-ceiling") -> ServerProcess:
    """The bare grpc.aio servicer with a prepared response: what the Python stack allows at best
    (with gRPC core's I/O chosen as the node's entry point chooses it)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIMAAS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    prefer_epoll_io(env)
    argv = [sys.executable, "-m", "bench.inference.ceiling_server", "--host", "127.0.0.1", "--port", str(port)]
    return ServerProcess(name, argv, env, port, workdir / f"{name}.log", cwd=REPO_ROOT)


def mlserver_executable(venv: pathlib.Path) -> pathlib.Path:
    return venv / "bin" / "mlserver"


def mlserver_server(repository: pathlib.Path, workdir: pathlib.Path, venv: pathlib.Path,
                    grpc_port: int) -> ServerProcess:
    executable = mlserver_executable(venv)
    if not executable.exists():
        raise ServerStartError(
            f"MLServer is not installed at {venv}: python3 -m venv {venv} && "
            f"{venv}/bin/pip install mlserver==1.7.1 onnxruntime numpy")
    # A clean environment: nothing of the AIMaaS interpreter (PYTHONPATH, virtualenv) leaks in.
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"} and not k.startswith(("AIMAAS_", "MLSERVER_"))}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env["VIRTUAL_ENV"] = str(venv)
    return ServerProcess("mlserver", [str(executable), "start", str(repository)], env, grpc_port,
                         workdir / "mlserver.log", cwd=repository)


def mlserver_version(venv: pathlib.Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    try:
        out = subprocess.run([str(python), "-c", "import mlserver, onnxruntime; print(mlserver.__version__, onnxruntime.__version__)"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None
