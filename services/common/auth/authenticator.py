"""Authentication (who: 401 Unauthenticated) and authorization (may they: 403 PermissionDenied)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

from services.common.auth.roles import ANONYMOUS_ADMIN, BOOTSTRAP_ADMIN, Permission, Principal
from services.common.auth.settings import AuthSettings
from services.common.auth.store import ApiKeyStore
from services.common.auth.tokens import MalformedToken, parse_token, verify_secret
from services.common.errors import PermissionDenied, Unauthenticated, Unavailable

BEARER_HINT = "send the header 'Authorization: Bearer <api-key>'"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header value; Unauthenticated otherwise."""
    if authorization is None or not authorization.strip():
        raise Unauthenticated(f"missing API key: {BEARER_HINT}")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        # Never echo the header: it may hold a credential.
        raise Unauthenticated(f"unsupported authorization scheme: {BEARER_HINT}")
    token = token.strip()
    if not token:
        raise Unauthenticated(f"empty bearer token: {BEARER_HINT}")
    return token


class Authenticator:
    """`store` None: only the bootstrap token authenticates (e.g. a process without etcd)."""

    def __init__(self, store: ApiKeyStore | None, settings: AuthSettings) -> None:
        self._store = store
        self.settings = settings
        token = settings.bootstrap_admin_token
        # Compare digests, so the comparison is constant-time whatever the presented length.
        self._bootstrap = hashlib.sha256(token.get_secret_value().encode()).digest() if token else None

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    async def authenticate(self, authorization_header: str | None) -> Principal:
        """The principal of an `Authorization` header value (gRPC: the `authorization` metadata)."""
        if not self.settings.enabled:
            return ANONYMOUS_ADMIN
        return self.authenticate_token(bearer_token(authorization_header))

    def authenticate_token(self, token: str) -> Principal:
        if not self.settings.enabled:
            return ANONYMOUS_ADMIN
        if self._bootstrap is not None and hmac.compare_digest(
            hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest(), self._bootstrap
        ):
            return BOOTSTRAP_ADMIN
        try:
            key_id, secret = parse_token(token)
        except MalformedToken as exc:
            raise Unauthenticated(f"malformed API key: {exc}") from None
        stored = self._store.lookup(key_id) if self._store is not None else None
        if stored is None:
            if self._store is not None and not self._store.loaded:
                raise Unavailable("API keys are not loaded yet (metadata store unreachable); retry shortly")
            raise Unauthenticated(f"unknown API key {key_id}")
        if not verify_secret(secret, stored.salt, stored.digest):
            raise Unauthenticated(f"invalid secret for API key {key_id}")
        if stored.revoked_at is not None:
            raise Unauthenticated(f"API key {key_id} was revoked at {_when(stored.revoked_at)}")
        if stored.expires_at is not None and self._store.now() >= stored.expires_at:
            raise Unauthenticated(f"API key {key_id} expired at {_when(stored.expires_at)}")
        return stored.principal

    def authorize(self, principal: Principal, permission: Permission, model: str | None = None) -> None:
        """PermissionDenied unless the principal's role grants `permission` and `model` (if any) is in
        its scope."""
        if not principal.has(permission):
            raise PermissionDenied(
                f"API key {principal.key_id} has role {principal.role_name}, which lacks the "
                f"{permission.value} permission"
            )
        if model is not None and not principal.in_scope(model):
            raise PermissionDenied(f"API key {principal.key_id} is not scoped to model {model!r}")

    async def check(
        self, authorization_header: str | None, permission: Permission, model: str | None = None
    ) -> Principal:
        """authenticate + authorize in one call."""
        principal = await self.authenticate(authorization_header)
        self.authorize(principal, permission, model)
        return principal
