"""gRPC core choices that must be made before grpcio is first imported in a process.

gRPC core reads `GRPC_EXPERIMENTS` once, when grpcio is imported. Since grpcio 1.6x its default I/O
for client channels and listeners is the EventEngine; the epoll-based iomgr it replaced is still
built in (grpcio 1.85.1, pinned) and, measured on a 2-core VM, costs far less per message on both
ends of a call: a grpc.aio stream round trip p50 ~250-300 µs -> ~150-170 µs, client CPU per message
~190 -> ~130 µs; a service process ~10-15% less CPU per request. Service entry points call
`prefer_epoll_io()` first thing; an operator's own `GRPC_EXPERIMENTS` (even an empty one) wins.
This module must not import grpc.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

GRPC_EXPERIMENTS_VARIABLE = "GRPC_EXPERIMENTS"
EPOLL_IO_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def prefer_epoll_io(environ: MutableMapping[str, str] | None = None) -> bool:
    """Default `GRPC_EXPERIMENTS` so that gRPC core uses its epoll iomgr for channels and listeners.

    `environ` is this process's environment by default (or a child process's environment to be).
    Returns whether this process will use the setting: False when grpcio is imported already (too
    late for this process; the variable still reaches its children) or the operator chose otherwise.
    """
    target = os.environ if environ is None else environ
    target.setdefault(GRPC_EXPERIMENTS_VARIABLE, EPOLL_IO_EXPERIMENTS)
    if environ is not None:
        return target[GRPC_EXPERIMENTS_VARIABLE] == EPOLL_IO_EXPERIMENTS
    return "grpc" not in sys.modules and target[GRPC_EXPERIMENTS_VARIABLE] == EPOLL_IO_EXPERIMENTS
