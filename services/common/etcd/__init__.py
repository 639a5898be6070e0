"""The etcd layer: key schema, client, sessions (leases), leader election and value codec."""

from services.common.etcd.client import (
    Compare,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    NotLeader,
    Op,
    OpResponse,
    SessionLost,
    TxnResult,
    WatchEvent,
)
from services.common.etcd.codec import CodecError, from_json, to_json
from services.common.etcd.election import Election
from services.common.etcd.keys import KeyBuilder
from services.common.etcd.session import Session

__all__ = [
    "CodecError",
    "Compare",
    "Election",
    "EtcdClient",
    "EtcdError",
    "EtcdUnavailable",
    "KeyBuilder",
    "KeyValue",
    "NotLeader",
    "Op",
    "OpResponse",
    "Session",
    "SessionLost",
    "TxnResult",
    "WatchEvent",
    "from_json",
    "to_json",
]
