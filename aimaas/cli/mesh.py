"""`aimaas up / down / status`: the local mesh (etcd, object store, every service) on loopback."""

from __future__ import annotations

import datetime
import importlib.util
import os
import pathlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import psutil
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aimaas.cli.environment import CliEnvironment
from aimaas.cli.health import etcd_healthy, grpc_serving
from aimaas.cli.output import CliError
from aimaas.cli.ports import (
    LOOPBACK,
    SERVICE_NAMES,
    base_service,
    busy_ports,
    inference_node_names,
    plan_ports,
    port_env_var,
)
from aimaas.cli.state import (
    MeshState,
    ProcessRecord,
    StateError,
    admin_token_path,
    load_state,
    remove_state,
    save_state,
    write_admin_token,
)

ETCD_INSTALL_HINT = "apt-get install etcd-server"
_LOG_TAIL_LINES = 40
_POLL_INTERVAL_S = 0.2
_KILL_WAIT_S = 5.0


@dataclass(frozen=True)
class UpOptions:
    state_dir: pathlib.Path
    etcd_endpoint: str | None = None
    s3_endpoint: str | None = None
    s3_bucket: str | None = None
    port_offset: int = 0
    # Seconds each process may take to become healthy.
    timeout: float = 60.0
    # Inference node processes (replicas of one version go to distinct nodes).
    inference_nodes: int = 1
    # Gateway auth: off for local development unless asked for.
    auth: bool = False
    # Services not to start even though they exist.
    without: frozenset[str] = frozenset()


class LaunchFailed(Exception):
    def __init__(self, message: str, log: pathlib.Path | None = None, log_offset: int = 0) -> None:
        super().__init__(message)
        self.log = log
        self.log_offset = log_offset


def services_root() -> pathlib.Path | None:
    """Directory of the `services` package, located without importing it."""
    spec = importlib.util.find_spec("services")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def discover_services(root: pathlib.Path | None) -> list[str]:
    """Services that exist (have a `__main__.py`), in start order; later services join automatically."""
    if root is None:
        return []
    return [name for name in SERVICE_NAMES if (root / name / "__main__.py").is_file()]


def etcd_command(binary: str, data_dir: pathlib.Path, client_port: int, peer_port: int) -> list[str]:
    client_url = f"http://{LOOPBACK}:{client_port}"
    peer_url = f"http://{LOOPBACK}:{peer_port}"
    return [
        binary,
        "--name", "aimaas",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"aimaas={peer_url}",
        # A long-lived dev mesh would otherwise keep every revision forever.
        "--auto-compaction-mode", "periodic",
        "--auto-compaction-retention", "1h",
        "--logger", "zap",
        "--log-outputs", "stderr",
    ]  # fmt: skip


def service_settings(
    name: str, ports: dict[str, int], state_dir: pathlib.Path | None = None, node: str | None = None
) -> dict[str, str]:
    """AIMAAS_<NAME>__HOST and __<KIND>_PORT of one service (DESIGN.md "Configuration"), plus the
    local data folders a service keeps inside the mesh's state directory."""
    settings = {f"AIMAAS_{name.upper()}__HOST": LOOPBACK}
    settings.update({port_env_var(name, kind): str(port) for kind, port in ports.items()})
    if name == "inference" and state_dir is not None:
        settings["AIMAAS_INFERENCE__CACHE_DIR"] = str(state_dir / "cache" / (node or "inference"))
    return settings


def wiring_settings(
    name: str, plan: dict[str, dict[str, int]], *, auth: bool = False, admin_token: str | None = None
) -> dict[str, str]:
    """Addresses a service needs of the others in the plan (gateway upstreams, the monitor), and the
    gateway's auth switch with the bootstrap admin token."""
    address = {service: f"{LOOPBACK}:{ports['grpc']}" for service, ports in plan.items() if "grpc" in ports}
    settings: dict[str, str] = {}
    monitor = address.get("monitor")
    if name == "gateway":
        settings["AIMAAS_GATEWAY__REGISTRY_ADDRESS"] = address.get("registry", "")
        settings["AIMAAS_GATEWAY__SCHEDULER_ADDRESS"] = address.get("scheduler", "")
        settings["AIMAAS_GATEWAY__MONITOR_ADDRESS"] = monitor or ""
        settings["AIMAAS_GATEWAY__AUTH__ENABLED"] = "true" if auth else "false"
        if auth and admin_token:
            settings["AIMAAS_GATEWAY__AUTH__BOOTSTRAP_ADMIN_TOKEN"] = admin_token
    elif name == "monitor":
        # The monitor calls its HTTP port the dashboard port; its dashboard checks the same API keys.
        settings["AIMAAS_MONITOR__DASHBOARD_PORT"] = str(plan["monitor"]["http"])
        settings["AIMAAS_MONITOR__AUTH__ENABLED"] = "true" if auth else "false"
        if auth and admin_token:
            settings["AIMAAS_MONITOR__AUTH__BOOTSTRAP_ADMIN_TOKEN"] = admin_token
    elif name in ("inference", "scheduler") and monitor:
        settings[f"AIMAAS_{name.upper()}__MONITOR_ADDRESS"] = monitor
    return {key: value for key, value in settings.items() if value or key.endswith("MONITOR_ADDRESS")}


def endpoints_of(ports: dict[str, int]) -> dict[str, str]:
    return {kind: f"{LOOPBACK}:{port}" for kind, port in ports.items()}


def probe(record: ProcessRecord, timeout: float = 2.0) -> bool:
    """Readiness of one recorded process: etcd /health, or grpc.health.v1 SERVING for a service."""
    if record.name == "etcd":
        return etcd_healthy(record.endpoints["client"], timeout)
    address = record.endpoints.get("grpc")
    return address is not None and grpc_serving(address, timeout)


def process_status(state: MeshState, timeout: float = 2.0) -> list[dict[str, Any]]:
    """`status --json` entries of every recorded process, probed concurrently."""

    def one(record: ProcessRecord) -> dict[str, Any]:
        alive = record.is_alive() if record.managed else None
        healthy = probe(record, timeout) if alive or not record.managed else False
        return {
            "name": record.name,
            "pid": record.pid,
            # A process we do not own counts as alive while it answers.
            "alive": alive if alive is not None else healthy,
            "healthy": healthy,
            "managed": record.managed,
            "endpoints": dict(record.endpoints),
            "log": record.log,
        }

    with ThreadPoolExecutor(max_workers=max(1, len(state.processes))) as pool:
        return list(pool.map(one, state.processes))


def status_document(state_dir: pathlib.Path, state: MeshState | None, timeout: float = 2.0) -> dict[str, Any]:
    if state is None:
        return {"state_dir": str(state_dir), "running": False, "processes": []}
    processes = process_status(state, timeout)
    return {
        "state_dir": state.state_dir,
        "running": any(entry["alive"] for entry in processes if entry["managed"]),
        "etcd_endpoint": state.etcd_endpoint,
        "object_store": dict(state.object_store),
        "processes": processes,
    }


def status_table(document: dict[str, Any]) -> Table:
    table = Table()
    table.add_column("process")
    table.add_column("pid", justify="right")
    table.add_column("alive")
    table.add_column("healthy")
    table.add_column("endpoints", overflow="fold")
    table.add_column("log", overflow="fold")
    for entry in document["processes"]:
        pid = str(entry["pid"]) if entry["managed"] else "external"
        table.add_row(
            entry["name"],
            pid,
            _yes_no(entry["alive"]),
            _yes_no(entry["healthy"]),
            escape("\n".join(f"{kind} {address}" for kind, address in entry["endpoints"].items())),
            escape(entry["log"] or ""),
        )
    return table


def _yes_no(value: bool) -> str:
    return "[green]yes[/]" if value else "[red]no[/]"


def signal_process(process: psutil.Process, sig: signal.Signals) -> None:
    """Signal a launched process and its helpers: each leads its own process group (start_new_session)."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, sig)
        else:
            process.send_signal(sig)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass


def _running(process: psutil.Process) -> bool:
    try:
        # A zombie has exited; it only waits for a parent that may never reap it.
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_processes(records: Iterable[ProcessRecord], grace: float) -> dict[str, str]:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns name -> what happened."""
    outcome: dict[str, str] = {}
    pending: dict[str, psutil.Process] = {}
    for record in records:
        process = record.process()
        if process is None or not _running(process):
            outcome[record.name] = "was not running"
            continue
        signal_process(process, signal.SIGTERM)
        pending[record.name] = process
    _wait_gone(pending, grace, outcome, "stopped")
    for process in pending.values():
        signal_process(process, signal.SIGKILL)
    _wait_gone(pending, _KILL_WAIT_S, outcome, f"killed after {grace:.0f}s")
    for name in pending:
        outcome[name] = "still running after SIGKILL"
    return outcome


def _wait_gone(pending: dict[str, psutil.Process], timeout: float, outcome: dict[str, str], label: str) -> None:
    deadline = time.monotonic() + timeout
    while pending:
        for name, process in list(pending.items()):
            if not _running(process):
                outcome[name] = label
                del pending[name]
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(0.1)


def read_log_tail(log: pathlib.Path, offset: int = 0, lines: int = _LOG_TAIL_LINES) -> list[str]:
    try:
        with log.open("rb") as stream:
            stream.seek(offset)
            text = stream.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


class Mesh:
    """Starts, stops and inspects the processes recorded in one state directory."""

    def __init__(self, env: CliEnvironment, out: Console, err: Console) -> None:
        self.env = env
        self.out = out
        self.err = err

    # --- up ---------------------------------------------------------------------------------

    def up(self, options: UpOptions) -> None:
        state_dir = options.state_dir.resolve()
        existing = self._load(state_dir)
        if existing is not None and self._already_running(state_dir, existing):
            return

        external_etcd = options.etcd_endpoint or self.env.etcd_endpoints()
        if external_etcd is not None and "://" in external_etcd:
            raise CliError(f"etcd endpoint {external_etcd!r} must be HOST:PORT, without a scheme")
        etcd_binary = None
        if external_etcd is None:
            etcd_binary = self.env.which("etcd")
            if etcd_binary is None:
                raise CliError(
                    "etcd is not installed (no `etcd` on PATH). Install it with:\n"
                    f"    {ETCD_INSTALL_HINT}\n"
                    "or pass --etcd-endpoint HOST:PORT of a running etcd"
                )
        services = [name for name in discover_services(services_root()) if name not in options.without]
        if "inference" in services:
            # Extra nodes start right after the first, before the services that call them.
            at = services.index("inference")
            services[at : at + 1] = inference_node_names(options.inference_nodes)
        try:
            plan = plan_ports(
                (["etcd"] if etcd_binary else []) + services, options.port_offset, self.env.port_overrides()
            )
        except ValueError as exc:
            raise CliError(str(exc)) from None
        busy = busy_ports(plan)
        if busy:
            lines = [entry.describe() for entry in busy]
            lines.append("stop that process, or start the mesh on other ports with --base-port-offset N")
            raise CliError("\n".join(lines))

        (state_dir / "logs").mkdir(parents=True, exist_ok=True)
        common, object_store = self._store_settings(state_dir, options)
        etcd_endpoint = external_etcd or f"{LOOPBACK}:{plan['etcd']['client']}"
        common["AIMAAS_ETCD__ENDPOINTS"] = etcd_endpoint
        # Logs reach the files as they happen, not when a buffer fills.
        common["PYTHONUNBUFFERED"] = "1"

        admin_token = None
        if options.auth and "gateway" in services:
            # A given token wins; else a fresh one, kept (0600) in the state dir for later commands.
            admin_token = self.env.get("AIMAAS_GATEWAY__AUTH__BOOTSTRAP_ADMIN_TOKEN") or secrets.token_urlsafe(32)
            write_admin_token(state_dir, admin_token)
        else:
            admin_token_path(state_dir).unlink(missing_ok=True)
        state = MeshState(
            state_dir=str(state_dir),
            etcd_endpoint=etcd_endpoint,
            object_store=object_store,
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            auth=admin_token is not None,
        )
        if etcd_binary is None:
            # Recorded without a pid: status probes it, down leaves it alone.
            first = etcd_endpoint.split(",")[0].strip()
            state.processes.append(ProcessRecord("etcd", None, None, {"client": first}))
        save_state(state_dir, state)

        self.err.print(f"starting the aimaas mesh in {state_dir}", markup=False)
        started: list[tuple[ProcessRecord, subprocess.Popen[bytes]]] = []
        try:
            if etcd_binary is None:
                self._wait_external_etcd(state.processes[0], options.timeout)
            else:
                ports = plan["etcd"]
                self._launch(
                    state, "etcd",
                    etcd_command(etcd_binary, state_dir / "etcd", ports["client"], ports["peer"]),
                    {}, endpoints_of(ports), options.timeout, started,
                )  # fmt: skip
            for index, name in enumerate(services, start=1):
                service = base_service(name)
                command = [sys.executable, "-m", f"services.{service}"]
                settings = common | service_settings(service, plan[name], state_dir, node=name)
                settings |= wiring_settings(service, plan, auth=options.auth, admin_token=admin_token)
                self.err.print(f"[{index}/{len(services)}] starting {name}", markup=False)
                self._launch(state, name, command, settings, endpoints_of(plan[name]), options.timeout, started)
        except (LaunchFailed, KeyboardInterrupt) as exc:
            self._abort_start(state_dir, started, exc)
        self.out.print(f"aimaas mesh in {state_dir}", markup=False)
        self.out.print(status_table(status_document(state_dir, state)))
        self.out.print(f"object store: {_describe_store(object_store)}", markup=False)
        gateway = state.find("gateway")
        if gateway is not None:
            self.out.print(
                f"gateway: gRPC {gateway.endpoints['grpc']}, REST http://{gateway.endpoints.get('http', '')} "
                f"(docs at /docs); auth {'on' if state.auth else 'off'}",
                markup=False,
            )
        if admin_token is not None:
            self.out.print(
                f"admin token (stored in {admin_token_path(state_dir)}, used by this CLI): {admin_token}", markup=False
            )
        self.out.print(f"stop with: aimaas down --state-dir {_shell_path(state_dir)}", markup=False)

    def _load(self, state_dir: pathlib.Path) -> MeshState | None:
        try:
            return load_state(state_dir)
        except StateError as exc:
            raise CliError(str(exc)) from None

    def _already_running(self, state_dir: pathlib.Path, state: MeshState) -> bool:
        managed = state.managed_processes()
        alive = [record for record in managed if record.is_alive()]
        if managed and len(alive) == len(managed):
            self.err.print(f"the mesh is already running (state in {state_dir})", markup=False)
            self.out.print(status_table(status_document(state_dir, state)))
            return True
        if alive:
            dead = ", ".join(record.name for record in managed if record not in alive)
            raise CliError(
                f"the mesh in {state_dir} is partly running ({dead} stopped); "
                f"run `aimaas down --state-dir {_shell_path(state_dir)}` first"
            )
        # Every recorded process is gone (a reboot, a kill): the state is stale.
        remove_state(state_dir)
        return False

    def _store_settings(self, state_dir: pathlib.Path, options: UpOptions) -> tuple[dict[str, str], dict[str, str]]:
        """Object store settings of the services, and the record of them (never the credentials)."""
        s3_endpoint = options.s3_endpoint or self.env.s3_endpoint()
        if s3_endpoint:
            bucket = options.s3_bucket or self.env.s3_bucket() or "aimaas"
            settings = {
                "AIMAAS_OBJECT_STORE__KIND": "s3",
                "AIMAAS_OBJECT_STORE__ENDPOINT": s3_endpoint,
                "AIMAAS_OBJECT_STORE__BUCKET": bucket,
            }
            return settings, {"kind": "s3", "endpoint": s3_endpoint, "bucket": bucket}
        path = state_dir / "objects"
        path.mkdir(parents=True, exist_ok=True)
        settings = {"AIMAAS_OBJECT_STORE__KIND": "local", "AIMAAS_OBJECT_STORE__PATH": str(path)}
        return settings, {"kind": "local", "path": str(path)}

    def _launch(
        self,
        state: MeshState,
        name: str,
        command: list[str],
        settings: dict[str, str],
        endpoints: dict[str, str],
        timeout: float,
        started: list[tuple[ProcessRecord, subprocess.Popen[bytes]]],
    ) -> ProcessRecord:
        state_dir = pathlib.Path(state.state_dir)
        log = state_dir / "logs" / f"{name}.log"
        with log.open("ab") as stream:
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            stream.write(f"--- aimaas up {stamp}: {' '.join(command)}\n".encode())
            stream.flush()
            log_offset = stream.tell()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=self.env.child_environment(settings),
                cwd=state_dir,
                # Detached: survives this command and the terminal; its own group for `down`.
                start_new_session=True,
            )
        try:
            create_time: float | None = psutil.Process(process.pid).create_time()
        except psutil.Error:
            create_time = None
        record = ProcessRecord(name, process.pid, create_time, endpoints, str(log), command)
        started.append((record, process))
        state.processes.append(record)
        # Recorded before waiting, so `aimaas down` can clean up even if this command dies now.
        save_state(state_dir, state)
        self._wait_healthy(record, process, timeout, log, log_offset)
        return record

    def _wait_healthy(
        self,
        record: ProcessRecord,
        process: subprocess.Popen[bytes],
        timeout: float,
        log: pathlib.Path,
        log_offset: int,
    ) -> None:
        main_endpoint = record.endpoints.get("grpc") or record.endpoints.get("client", "")
        began = time.monotonic()
        with self.err.status(f"waiting for {record.name} at {main_endpoint} to become healthy"):
            while True:
                code = process.poll()
                if code is not None:
                    raise LaunchFailed(f"{record.name} exited with code {code} while starting", log, log_offset)
                if probe(record, timeout=1.0):
                    break
                if time.monotonic() - began > timeout:
                    raise LaunchFailed(
                        f"{record.name} did not become healthy within {timeout:.0f}s", log, log_offset
                    )
                time.sleep(_POLL_INTERVAL_S)
        self.err.print(
            f"[green]ok[/] {record.name:<12} pid {record.pid:<8} healthy at {main_endpoint} "
            f"in {time.monotonic() - began:.1f}s"
        )

    def _wait_external_etcd(self, record: ProcessRecord, timeout: float) -> None:
        began = time.monotonic()
        endpoint = record.endpoints["client"]
        with self.err.status(f"checking etcd at {endpoint}"):
            while not etcd_healthy(endpoint, timeout=1.0):
                if time.monotonic() - began > min(timeout, 10.0):
                    raise LaunchFailed(f"etcd at {endpoint} is not healthy (its /health is not \"true\")")
                time.sleep(_POLL_INTERVAL_S)
        self.err.print(f"[green]ok[/] {'etcd':<12} external   healthy at {endpoint}")

    def _abort_start(
        self,
        state_dir: pathlib.Path,
        started: list[tuple[ProcessRecord, subprocess.Popen[bytes]]],
        exc: BaseException,
    ) -> NoReturn:
        if isinstance(exc, LaunchFailed) and exc.log is not None:
            tail = read_log_tail(exc.log, exc.log_offset)
            self.err.print(f"--- last {len(tail)} lines of {exc.log} ---", markup=False)
            for line in tail:
                click.echo(line, err=True)
            self.err.print("---", markup=False)
        if started:
            self.err.print("stopping what was started")
            stop_processes([record for record, _ in reversed(started)], grace=10.0)
            for _, process in started:
                # Reap our children; the others' parent reaps them.
                process.poll()
        remove_state(state_dir)
        if isinstance(exc, KeyboardInterrupt):
            raise click.Abort()
        raise CliError(str(exc))

    # --- down -------------------------------------------------------------------------------

    def down(self, state_dir: pathlib.Path, grace: float = 15.0) -> None:
        state_dir = state_dir.resolve()
        state = self._load(state_dir)
        if state is None:
            self.err.print(f"nothing to stop: no mesh state in {state_dir}", markup=False)
            return
        managed = state.managed_processes()
        # Services before etcd, so they shut down cleanly (revoking leases) while it is still there.
        services = [record for record in reversed(managed) if record.name != "etcd"]
        etcd = [record for record in managed if record.name == "etcd"]
        for group in (services, etcd):
            for name, outcome in stop_processes(group, grace).items():
                pid = next(record.pid for record in group if record.name == name)
                self.err.print(f"{name:<10} pid {pid:<8} {outcome}", markup=False)
        remove_state(state_dir)
        # The bootstrap token lived only in the stopped gateway's environment.
        admin_token_path(state_dir).unlink(missing_ok=True)
        self.out.print(f"the mesh is stopped; its data stays in {state_dir}", markup=False)

    # --- status -----------------------------------------------------------------------------

    def status(self, state_dir: pathlib.Path, timeout: float) -> dict[str, Any]:
        state_dir = state_dir.resolve()
        return status_document(state_dir, self._load(state_dir), timeout)


def _describe_store(record: dict[str, str]) -> str:
    if record.get("kind") == "s3":
        return f"s3 {record['endpoint']} bucket {record['bucket']}"
    return f"local directory {record['path']}"


def _shell_path(path: pathlib.Path) -> str:
    try:
        return str(path.relative_to(pathlib.Path.cwd()))
    except ValueError:
        return str(path)

