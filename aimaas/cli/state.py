"""`<state-dir>/state.json`: what `aimaas up` started, so `down`, `status` and `models` need no guessing."""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from aimaas.cli.ports import DEFAULT_PORTS, LOOPBACK

STATE_FILE = "state.json"
STATE_VERSION = 1
# psutil derives create_time from clock ticks; allow for rounding between two reads.
_CREATE_TIME_TOLERANCE_S = 0.5


class StateError(ValueError):
    """The state file exists but cannot be used."""


@dataclass
class ProcessRecord:
    name: str
    # None for an external process the mesh uses but does not own (an existing etcd).
    pid: int | None
    # Start time of pid, so a recycled pid is never mistaken for (or signalled as) ours.
    create_time: float | None
    endpoints: dict[str, str]
    log: str | None = None
    command: list[str] = field(default_factory=list)

    @property
    def managed(self) -> bool:
        return self.pid is not None

    def is_alive(self) -> bool:
        """True while the recorded process (same pid, same start time) runs and is not a zombie."""
        process = self.process()
        if process is None:
            return False
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def process(self) -> psutil.Process | None:
        """The recorded process, or None when it is gone or its pid now belongs to another one."""
        if self.pid is None:
            return None
        try:
            process = psutil.Process(self.pid)
            if self.create_time is not None and abs(process.create_time() - self.create_time) > _CREATE_TIME_TOLERANCE_S:
                return None
            return process
        except psutil.Error:
            return None


@dataclass
class MeshState:
    state_dir: str
    etcd_endpoint: str
    # kind plus path (local) or endpoint and bucket (s3); never credentials.
    object_store: dict[str, str]
    processes: list[ProcessRecord] = field(default_factory=list)
    created: str = ""
    version: int = STATE_VERSION
    # The gateway checks API keys (`aimaas up --auth`); the bootstrap admin token is in ADMIN_TOKEN_FILE.
    auth: bool = False

    def find(self, name: str) -> ProcessRecord | None:
        return next((record for record in self.processes if record.name == name), None)

    def managed_processes(self) -> list[ProcessRecord]:
        return [record for record in self.processes if record.managed]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> MeshState:
        data: dict[str, Any] = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise StateError(f"unsupported state version {data.get('version')!r}")
        processes = [ProcessRecord(**record) for record in data.pop("processes", [])]
        return cls(processes=processes, **data)


ADMIN_TOKEN_FILE = "admin-token"


def admin_token_path(state_dir: pathlib.Path) -> pathlib.Path:
    return state_dir / ADMIN_TOKEN_FILE


def write_admin_token(state_dir: pathlib.Path, token: str) -> None:
    """Owner-only from the first byte: the token has admin rights."""
    path = admin_token_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(token + "\n")


def read_admin_token(state_dir: pathlib.Path) -> str | None:
    try:
        return admin_token_path(state_dir).read_text().strip() or None
    except OSError:
        return None


def state_path(state_dir: pathlib.Path) -> pathlib.Path:
    return state_dir / STATE_FILE


def load_state(state_dir: pathlib.Path) -> MeshState | None:
    """The recorded mesh, or None when there is no state file."""
    path = state_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return MeshState.from_json(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise StateError(f"state file {path} is unreadable ({exc}); stop its processes and delete it") from exc


def save_state(state_dir: pathlib.Path, state: MeshState) -> None:
    """Write atomically, so a reader never sees half a file."""
    path = state_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(state.to_json())
    os.replace(temporary, path)


def remove_state(state_dir: pathlib.Path) -> None:
    state_path(state_dir).unlink(missing_ok=True)


def service_address(name: str, explicit: str | None, state_dir: pathlib.Path) -> str:
    """An explicit HOST:PORT, else the gRPC address `aimaas up` recorded for `name`, else its default port."""
    if explicit:
        return explicit
    try:
        state = load_state(state_dir.resolve())
    except StateError:
        state = None
    record = state.find(name) if state is not None else None
    if record is not None and "grpc" in record.endpoints:
        return record.endpoints["grpc"]
    return f"{LOOPBACK}:{DEFAULT_PORTS[name]['grpc']}"
