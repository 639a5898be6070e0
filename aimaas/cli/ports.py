"""The one table of default ports of the local mesh (DESIGN.md "Default ports") and the port plan.

Every other part of the CLI asks this module for ports; nothing else writes a port number.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import psutil

LOOPBACK = "127.0.0.1"

# Services in start order: each one starts after the services it talks to (DESIGN.md "Services").
SERVICE_NAMES: tuple[str, ...] = ("registry", "monitor", "scheduler", "inference", "gateway")

# process -> endpoint kind -> port. Service kinds map to AIMAAS_<SERVICE>__<KIND>_PORT.
DEFAULT_PORTS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        "etcd": MappingProxyType({"client": 2379, "peer": 2380}),
        "gateway": MappingProxyType({"grpc": 8001, "http": 8000, "metrics": 8002}),
        "registry": MappingProxyType({"grpc": 8101, "metrics": 8102}),
        "scheduler": MappingProxyType({"grpc": 8201, "metrics": 8202}),
        "inference": MappingProxyType({"grpc": 8301, "metrics": 8302}),
        "monitor": MappingProxyType({"grpc": 8401, "metrics": 8402, "http": 8403}),
    }
)

# (process, kind) -> port
PortOverrides = Mapping[tuple[str, str], int]

# Extra inference nodes of `aimaas up --inference-nodes N` are processes inference-2, inference-3, ...
# on the next ports after the first node (8303/8304, 8305/8306, ...).
_NODE_PORT_STEP = 2
MAX_INFERENCE_NODES = 40


def inference_node_names(count: int) -> list[str]:
    return ["inference"] + [f"inference-{index}" for index in range(2, count + 1)]


def base_service(name: str) -> str:
    """The service a process runs: inference-2 -> inference."""
    base, sep, index = name.rpartition("-")
    return base if sep and index.isdigit() and base in DEFAULT_PORTS else name


def default_ports(name: str) -> Mapping[str, int]:
    base = base_service(name)
    if base == name:
        return DEFAULT_PORTS[name]
    shift = (int(name.rpartition("-")[2]) - 1) * _NODE_PORT_STEP
    return {kind: port + shift for kind, port in DEFAULT_PORTS[base].items()}


def port_env_var(service: str, kind: str) -> str:
    """Settings variable a service reads this port from, e.g. AIMAAS_REGISTRY__GRPC_PORT."""
    return f"AIMAAS_{service.upper()}__{kind.upper()}_PORT"


def plan_ports(
    names: Iterable[str], offset: int = 0, overrides: PortOverrides | None = None
) -> dict[str, dict[str, int]]:
    """Ports of the given processes: table default + offset, unless overridden explicitly.

    Raises ValueError when a port falls outside 1..65535 or two endpoints share a port.
    """
    overrides = overrides or {}
    plan: dict[str, dict[str, int]] = {}
    owners: dict[int, str] = {}
    for name in names:
        plan[name] = {}
        for kind, default in default_ports(name).items():
            port = overrides.get((name, kind), default + offset)
            if not 0 < port < 65536:
                raise ValueError(f"port of {name} {kind} would be {port}, outside 1..65535 (check the offset)")
            if port in owners:
                raise ValueError(f"{name} {kind} and {owners[port]} would both use port {port}")
            owners[port] = f"{name} {kind}"
            plan[name][kind] = port
    return plan


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when a server could bind host:port now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        # Servers set SO_REUSEADDR too, so a port left in TIME_WAIT does not count as taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_owner(port: int) -> str | None:
    """'pid N (command line)' of the process listening on a TCP port, when the OS tells us."""
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                command = " ".join(psutil.Process(conn.pid).cmdline()) or psutil.Process(conn.pid).name()
            except psutil.Error:
                command = "?"
            return f"pid {conn.pid} ({_shorten(command)})"
    return None


@dataclass(frozen=True)
class BusyPort:
    process: str
    kind: str
    port: int
    owner: str | None

    def describe(self) -> str:
        owner = f"by {self.owner}" if self.owner else "by another process"
        return f"port {self.port} ({self.process} {self.kind}) is already in use {owner}"


def busy_ports(plan: Mapping[str, Mapping[str, int]], host: str = LOOPBACK) -> list[BusyPort]:
    return [
        BusyPort(name, kind, port, port_owner(port))
        for name, ports in plan.items()
        for kind, port in ports.items()
        if not port_is_free(port, host)
    ]


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
