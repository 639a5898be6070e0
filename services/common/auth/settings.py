"""Auth settings, a block of the gateway's (and the monitor dashboard's) settings, e.g.
`AIMAAS_GATEWAY__AUTH__ENABLED=false` or `AIMAAS_GATEWAY__AUTH__BOOTSTRAP_ADMIN_TOKEN=...`."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, SecretStr, field_validator

# A guessable bootstrap token would be a back door with admin rights.
MIN_BOOTSTRAP_TOKEN_CHARS = 32


class AuthSettings(BaseModel):
    # False: every caller is an anonymous admin (local development only).
    enabled: bool = True
    # Pre-shared admin token (mounted from a secret) so the first admin can create API keys; it is
    # never stored in etcd. Unset: only stored API keys authenticate.
    bootstrap_admin_token: SecretStr | None = None
    # Longest lifetime a new API key may have; 0 allows keys that never expire.
    max_key_ttl_seconds: Annotated[int, Field(ge=0)] = 0

    @field_validator("bootstrap_admin_token")
    @classmethod
    def _check_bootstrap_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # an empty variable means "not configured"
        secret = value.get_secret_value()
        if len(secret) < MIN_BOOTSTRAP_TOKEN_CHARS or secret != secret.strip():
            raise ValueError(
                f"bootstrap admin token must have at least {MIN_BOOTSTRAP_TOKEN_CHARS} characters and no "
                "surrounding whitespace (e.g. `openssl rand -hex 32`)"
            )
        return value
