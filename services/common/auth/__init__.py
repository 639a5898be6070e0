"""API-key authentication and role-based authorization for the gateway and the monitor dashboard.

Tokens `aimaas_<key-id>_<secret>` are Bearer credentials; keys live hashed in etcd (ApiKeyStore),
are verified from a watched in-memory cache (Authenticator), and are enforced on gRPC by
GrpcAuthInterceptor and on HTTP by the `require(permission)` FastAPI dependency.
"""

from services.common.auth.authenticator import Authenticator, bearer_token
from services.common.auth.fastapi_auth import principal_dependency, require
from services.common.auth.grpc_auth import (
    AUTH_SERVICE_NAME,
    METHOD_PERMISSIONS,
    AuthServicer,
    GrpcAuthInterceptor,
    current_principal,
    method_permission,
    register,
)
from services.common.auth.roles import (
    ANONYMOUS_ADMIN,
    BOOTSTRAP_ADMIN,
    ROLE_PERMISSIONS,
    Permission,
    Principal,
    parse_role,
    role_name,
)
from services.common.auth.settings import AuthSettings
from services.common.auth.store import ApiKeyStore, StoredKey, public
from services.common.auth.tokens import format_token, hash_secret, parse_token, verify_secret

__all__ = [
    "ANONYMOUS_ADMIN",
    "AUTH_SERVICE_NAME",
    "ApiKeyStore",
    "AuthServicer",
    "AuthSettings",
    "Authenticator",
    "BOOTSTRAP_ADMIN",
    "GrpcAuthInterceptor",
    "METHOD_PERMISSIONS",
    "Permission",
    "Principal",
    "ROLE_PERMISSIONS",
    "StoredKey",
    "bearer_token",
    "current_principal",
    "format_token",
    "hash_secret",
    "method_permission",
    "parse_role",
    "parse_token",
    "principal_dependency",
    "public",
    "register",
    "require",
    "role_name",
    "verify_secret",
]
