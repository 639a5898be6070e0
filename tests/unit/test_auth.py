"""Pure logic of auth: tokens and hashing, roles and permissions, scopes, header parsing, validation."""

from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from aimaas.auth.v1 import auth_pb2
from aimaas.monitor.v1 import monitor_pb2
from aimaas.registry.v1 import registry_pb2
from aimaas.scheduler.v1 import scheduler_pb2
from inference import grpc_predict_v2_pb2
from services.common.auth import (
    ANONYMOUS_ADMIN,
    BOOTSTRAP_ADMIN,
    METHOD_PERMISSIONS,
    ROLE_PERMISSIONS,
    AuthSettings,
    Authenticator,
    Permission,
    Principal,
    StoredKey,
    bearer_token,
    format_token,
    hash_secret,
    method_permission,
    parse_role,
    parse_token,
    role_name,
    verify_secret,
)
from services.common.auth.store import validate_new_key
from services.common.auth.tokens import MalformedToken, new_key_id, new_secret, parse_hash
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable

R, I, W, A = Permission.READ, Permission.INFER, Permission.WRITE, Permission.ADMIN
BOOT = "b" * 40


# -- tokens and hashing ------------------------------------------------------------------------------


def test_token_round_trip_and_entropy():
    key_id, secret = new_key_id(), new_secret()
    assert len(key_id) == 16 and len(secret) == 43  # 64-bit id, 256-bit secret (base64url)
    token = format_token(key_id, secret)
    assert token == f"aimaas_{key_id}_{secret}"
    assert parse_token(token) == (key_id, secret)
    assert len({new_secret() for _ in range(100)}) == 100


def test_secret_with_underscores_parses():
    secret = "_" * 43
    assert parse_token(f"aimaas_0123456789abcdef_{secret}") == ("0123456789abcdef", secret)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "Bearer x",
        "aimaas_",
        "aimaas_0123456789abcdef",
        "aimaas_0123456789abcdef_",
        "aimaas_0123456789ABCDEF_" + "a" * 43,  # id is lower-case hex
        "aimaas_0123456789abcde_" + "a" * 43,  # id too short
        "aimaas_0123456789abcdef_" + "a" * 42,  # secret too short
        "aimaas_0123456789abcdef_" + "a" * 44,
        "aimaas_0123456789abcdef_" + "a" * 42 + "=",
        "xaimaas_0123456789abcdef_" + "a" * 43,
    ],
)
def test_malformed_tokens_are_rejected(token):
    with pytest.raises(MalformedToken):
        parse_token(token)


def test_malformed_message_never_contains_the_secret():
    secret = "S" * 42 + "!"
    with pytest.raises(MalformedToken) as info:
        parse_token(f"aimaas_0123456789abcdef_{secret}")
    assert secret not in str(info.value)


def test_hash_is_salted_and_verifies_only_the_secret():
    secret = new_secret()
    first, second = hash_secret(secret), hash_secret(secret)
    assert first != second  # random salt per key
    assert secret not in first
    for stored in (first, second):
        salt, digest = parse_hash(stored)
        assert verify_secret(secret, salt, digest)
        assert not verify_secret(new_secret(), salt, digest)
        assert not verify_secret(secret[:-1] + ("A" if secret[-1] != "A" else "B"), salt, digest)


def test_hash_is_deterministic_for_a_given_salt():
    assert hash_secret("s", salt=b"0123456789abcdef") == hash_secret("s", salt=b"0123456789abcdef")
    assert hash_secret("s", salt=b"0123456789abcdef") != hash_secret("s", salt=b"0123456789abcdeF")


@pytest.mark.parametrize(
    "stored",
    ["", "plain", "bcrypt$abc$def", "hmac-sha256$$", "hmac-sha256$c2FsdHNhbHQ$short", "hmac-sha256$a$b$c", "hmac-sha256$!!$??"],
)
def test_corrupt_hashes_are_rejected(stored):
    with pytest.raises(ValueError):
        parse_hash(stored)


# -- roles, permissions, scope -------------------------------------------------------------------------

EXPECTED_PERMISSIONS = {
    # role: (read, infer, write, admin)
    auth_pb2.ROLE_ADMIN: (True, True, True, True),
    auth_pb2.ROLE_DEVELOPER: (True, True, True, False),
    auth_pb2.ROLE_INVOKER: (True, True, False, False),
    auth_pb2.ROLE_VIEWER: (True, False, False, False),
    auth_pb2.ROLE_UNSPECIFIED: (False, False, False, False),
    99: (False, False, False, False),
}


@pytest.mark.parametrize("role", EXPECTED_PERMISSIONS)
@pytest.mark.parametrize("index,permission", list(enumerate((R, I, W, A))))
def test_role_permission_matrix(role, index, permission):
    principal = Principal("k", "n", role)
    allowed = EXPECTED_PERMISSIONS[role][index]
    assert principal.has(permission) is allowed
    auth = Authenticator(None, AuthSettings())
    if allowed:
        auth.authorize(principal, permission)
    else:
        with pytest.raises(PermissionDenied, match=f"lacks the {permission.value} permission"):
            auth.authorize(principal, permission)


def test_role_names_round_trip():
    assert [role_name(r) for r in ROLE_PERMISSIONS] == ["admin", "developer", "invoker", "viewer"]
    for role in ROLE_PERMISSIONS:
        assert parse_role(role_name(role)) == role
        assert parse_role(auth_pb2.Role.Name(role)) == role
    assert parse_role(" Invoker ") == auth_pb2.ROLE_INVOKER
    assert role_name(42) == "unknown(42)"
    for bad in ("", "root", "unspecified", "ROLE_UNSPECIFIED"):
        with pytest.raises(ValueError, match="unknown role"):
            parse_role(bad)


def test_model_scope():
    auth = Authenticator(None, AuthSettings())
    scoped = Principal("k1", "n", auth_pb2.ROLE_DEVELOPER, frozenset({"resnet", "bert"}))
    auth.authorize(scoped, I, "resnet")
    auth.authorize(scoped, W, "bert")
    auth.authorize(scoped, R)  # no model named: listings are filtered by the handler instead
    assert scoped.in_scope("bert") and not scoped.in_scope("gpt")
    with pytest.raises(PermissionDenied, match="not scoped to model 'gpt'"):
        auth.authorize(scoped, I, "gpt")
    # The role is checked first: a viewer gets the permission message even for an in-scope model.
    viewer = Principal("k2", "n", auth_pb2.ROLE_VIEWER, frozenset({"resnet"}))
    with pytest.raises(PermissionDenied, match="lacks the infer permission"):
        auth.authorize(viewer, I, "resnet")
    unscoped = Principal("k3", "n", auth_pb2.ROLE_INVOKER)
    auth.authorize(unscoped, I, "anything")


# -- header parsing and authentication ---------------------------------------------------------------


@pytest.mark.parametrize(
    "header,message",
    [
        (None, "missing API key"),
        ("", "missing API key"),
        ("   ", "missing API key"),
        ("Basic dXNlcjpwYXNz", "unsupported authorization scheme"),
        ("aimaas_0123456789abcdef_" + "a" * 43, "unsupported authorization scheme"),  # no scheme
        ("Bearer", "empty bearer token"),
        ("Bearer    ", "empty bearer token"),
    ],
)
def test_bearer_header_errors(header, message):
    with pytest.raises(Unauthenticated, match=message) as info:
        bearer_token(header)
    if header:
        assert "dXNlcjpwYXNz" not in str(info.value) and "aaaa" not in str(info.value)


def test_bearer_scheme_is_case_insensitive():
    assert bearer_token("bearer tok") == "tok"
    assert bearer_token("  BEARER   tok  ") == "tok"


class _Store:
    """Stands in for ApiKeyStore's cache (the lookup interface only)."""

    def __init__(self, keys: dict[str, StoredKey], loaded: bool = True, now: float = 1_000.0) -> None:
        self._keys, self.loaded, self._now = keys, loaded, now

    def lookup(self, key_id: str) -> StoredKey | None:
        return self._keys.get(key_id)

    def now(self) -> float:
        return self._now


def _stored(key_id: str, secret: str, role=auth_pb2.ROLE_INVOKER, expires=None, revoked=None, scope=()) -> StoredKey:
    salt, digest = parse_hash(hash_secret(secret))
    record = auth_pb2.ApiKey(id=key_id, name=f"key-{key_id}", role=role, model_scope=scope)
    return StoredKey(record, salt, digest, Principal(key_id, record.name, role, frozenset(scope)), expires, revoked)


async def test_authenticate_outcomes():
    secrets_ = {name: new_secret() for name in ("good", "revoked", "expired", "future")}
    ids = {name: new_key_id() for name in secrets_}
    store = _Store(
        {
            ids["good"]: _stored(ids["good"], secrets_["good"], scope=("resnet",)),
            ids["revoked"]: _stored(ids["revoked"], secrets_["revoked"], revoked=900.0),
            ids["expired"]: _stored(ids["expired"], secrets_["expired"], expires=1_000.0),
            ids["future"]: _stored(ids["future"], secrets_["future"], expires=1_000.5),
        }
    )
    auth = Authenticator(store, AuthSettings(bootstrap_admin_token=SecretStr(BOOT)))  # type: ignore[arg-type]

    def header(name: str) -> str:
        return f"Bearer {format_token(ids[name], secrets_[name])}"

    principal = await auth.authenticate(header("good"))
    assert principal == Principal(ids["good"], f"key-{ids['good']}", auth_pb2.ROLE_INVOKER, frozenset({"resnet"}))
    assert (await auth.authenticate(header("future"))).key_id == ids["future"]
    assert await auth.authenticate(f"Bearer {BOOT}") == BOOTSTRAP_ADMIN
    cases = {
        header("revoked"): f"API key {ids['revoked']} was revoked at 1970-01-01T00:15:00Z",
        header("expired"): f"API key {ids['expired']} expired at 1970-01-01T00:16:40Z",
        f"Bearer {format_token(new_key_id(), new_secret())}": "unknown API key",
        f"Bearer {format_token(ids['good'], secrets_['revoked'])}": f"invalid secret for API key {ids['good']}",
        f"Bearer {BOOT}x": "malformed API key",
        "Bearer aimaas_nothex_" + "a" * 43: "malformed API key",
    }
    for value, message in cases.items():
        with pytest.raises(Unauthenticated, match=message) as info:
            await auth.authenticate(value)
        assert not any(s in info.value.message for s in secrets_.values())
    # check = authenticate + authorize
    assert (await auth.check(header("good"), I, "resnet")).key_id == ids["good"]
    with pytest.raises(PermissionDenied):
        await auth.check(header("good"), W, "resnet")


async def test_unknown_key_before_first_load_is_unavailable_but_bootstrap_works():
    auth = Authenticator(_Store({}, loaded=False), AuthSettings(bootstrap_admin_token=SecretStr(BOOT)))  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="not loaded yet"):
        await auth.authenticate(f"Bearer {format_token(new_key_id(), new_secret())}")
    assert await auth.authenticate(f"Bearer {BOOT}") == BOOTSTRAP_ADMIN


async def test_without_store_only_bootstrap_authenticates():
    auth = Authenticator(None, AuthSettings(bootstrap_admin_token=SecretStr(BOOT)))
    assert (await auth.authenticate(f"Bearer {BOOT}")).role == auth_pb2.ROLE_ADMIN
    with pytest.raises(Unauthenticated, match="unknown API key"):
        await auth.authenticate(f"Bearer {format_token(new_key_id(), new_secret())}")
    no_bootstrap = Authenticator(None, AuthSettings())
    with pytest.raises(Unauthenticated, match="malformed"):
        await no_bootstrap.authenticate(f"Bearer {BOOT}")


async def test_disabled_auth_is_anonymous_admin_whatever_the_header():
    auth = Authenticator(None, AuthSettings(enabled=False))
    for header in (None, "", "Basic x", "Bearer garbage"):
        principal = await auth.authenticate(header)
        assert principal == ANONYMOUS_ADMIN
        for permission in Permission:
            auth.authorize(principal, permission, "any-model")


# -- settings ----------------------------------------------------------------------------------------


def test_bootstrap_token_validation():
    assert AuthSettings(bootstrap_admin_token=SecretStr("")).bootstrap_admin_token is None
    assert AuthSettings().enabled is True and AuthSettings().bootstrap_admin_token is None
    for bad in ("short", " " + "x" * 40, "x" * 31):
        with pytest.raises(ValidationError, match="at least 32 characters"):
            AuthSettings(bootstrap_admin_token=SecretStr(bad))
    settings = AuthSettings(bootstrap_admin_token=SecretStr(BOOT))
    assert BOOT not in repr(settings) and BOOT not in settings.model_dump_json()


def test_auth_settings_from_environment(monkeypatch):
    class _ProcessSettings(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="AIMAAS_", env_nested_delimiter="__")
        auth: AuthSettings = AuthSettings()

    monkeypatch.setenv("AIMAAS_AUTH__ENABLED", "false")
    monkeypatch.setenv("AIMAAS_AUTH__BOOTSTRAP_ADMIN_TOKEN", BOOT)
    monkeypatch.setenv("AIMAAS_AUTH__MAX_KEY_TTL_SECONDS", "3600")
    settings = _ProcessSettings()
    assert settings.auth.enabled is False
    assert settings.auth.bootstrap_admin_token.get_secret_value() == BOOT
    assert settings.auth.max_key_ttl_seconds == 3600


# -- create validation -------------------------------------------------------------------------------


def test_validate_new_key_accepts_and_normalises():
    assert validate_new_key("ci", auth_pb2.ROLE_INVOKER, ["b", "a", "b"], 0, 0) == ["a", "b"]
    assert validate_new_key("ci", auth_pb2.ROLE_ADMIN, [], 60, 3600) == []


@pytest.mark.parametrize(
    "name,role,scope,ttl,max_ttl,message",
    [
        ("", auth_pb2.ROLE_INVOKER, [], 0, 0, "name is required"),
        ("  ", auth_pb2.ROLE_INVOKER, [], 0, 0, "name is required"),
        ("x" * 129, auth_pb2.ROLE_INVOKER, [], 0, 0, "at most 128"),
        ("a\nb", auth_pb2.ROLE_INVOKER, [], 0, 0, "printable"),
        ("ci", auth_pb2.ROLE_UNSPECIFIED, [], 0, 0, "role is required"),
        ("ci", 17, [], 0, 0, r"role is required.*unknown\(17\)"),
        ("ci", auth_pb2.ROLE_INVOKER, ["Bad_Name"], 0, 0, "invalid model_scope model name 'Bad_Name'"),
        ("ci", auth_pb2.ROLE_INVOKER, [""], 0, 0, "invalid model_scope model name"),
        ("ci", auth_pb2.ROLE_INVOKER, [f"m{i}" for i in range(257)], 0, 0, "at most 256 models"),
        ("ci", auth_pb2.ROLE_INVOKER, [], -1, 0, "non-negative"),
        ("ci", auth_pb2.ROLE_INVOKER, [], 0, 3600, "between 1 and 3600"),
        ("ci", auth_pb2.ROLE_INVOKER, [], 3601, 3600, "between 1 and 3600"),
    ],
)
def test_validate_new_key_errors(name, role, scope, ttl, max_ttl, message):
    with pytest.raises(InvalidArgument, match=message):
        validate_new_key(name, role, scope, ttl, max_ttl)


# -- gRPC method permissions -------------------------------------------------------------------------


def test_every_rpc_has_an_explicit_permission():
    services = [
        grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
        registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
        scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"],
        monitor_pb2.DESCRIPTOR.services_by_name["MonitorService"],
        auth_pb2.DESCRIPTOR.services_by_name["AuthService"],
    ]
    public = {"ServerLive", "ServerReady"}
    for service in services:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            if method.name in public:
                assert method_permission(path) is None
            else:
                assert path in METHOD_PERMISSIONS, f"{path} has no explicit permission"


def test_method_permission_examples():
    assert method_permission("/grpc.health.v1.Health/Check") is None
    assert method_permission("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert method_permission("/inference.GRPCInferenceService/ModelInfer") is I
    assert method_permission("/inference.GRPCInferenceService/ModelMetadata") is R
    assert method_permission("/aimaas.registry.v1.RegistryService/CreateModel") is W
    assert method_permission("/aimaas.scheduler.v1.SchedulerService/ListDeployments") is R
    assert method_permission("/aimaas.auth.v1.AuthService/ListApiKeys") is A
    assert method_permission("/some.New/Method") is A  # fail closed


# -- secrets never reach the logs ------------------------------------------------------------------


def test_logs_redact_tokens_and_authorization(capsys):
    import json

    import structlog

    from services.common.logs import configure_logging
    from services.common.settings import LogSettings

    token = format_token(new_key_id(), new_secret())
    try:
        log = configure_logging(LogSettings(), "test")
        log.info(f"request with {token} in the message", authorization=f"Bearer {token}", token=token,
                 bootstrap_admin_token=BOOT, url=f"http://x/?key={token}", detail={"n": 1})
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        structlog.reset_defaults()
    event = json.loads(line)
    assert token not in line and token.split("_", 2)[2] not in line and BOOT not in line
    assert event["authorization"] == event["token"] == event["bootstrap_admin_token"] == "[redacted]"
    assert event["event"] == "request with aimaas_[redacted] in the message"
    assert event["url"] == "http://x/?key=aimaas_[redacted]"


def test_model_fields_name_real_fields_and_extract_models():
    from services.common.auth.grpc_auth import MODEL_FIELDS, request_models

    for method, (message_type, paths) in MODEL_FIELDS.items():
        assert method in METHOD_PERMISSIONS, method
        assert request_models((message_type, paths), message_type()) == []  # empty: nothing named
        assert request_models((message_type, paths), b"") == []
    apply = scheduler_pb2.ApplyDeploymentRequest(spec=scheduler_pb2.DeploymentSpec(name="web", model="resnet"))
    fields = MODEL_FIELDS["/aimaas.scheduler.v1.SchedulerService/ApplyDeployment"]
    assert request_models(fields, apply) == ["web", "resnet"]
    assert request_models(fields, apply.SerializeToString()) == ["web", "resnet"]  # raw passthrough bytes
    upload = registry_pb2.UploadVersionRequest(metadata=registry_pb2.UploadVersionMetadata(model="bert"))
    assert request_models(MODEL_FIELDS["/aimaas.registry.v1.RegistryService/UploadVersion"], upload) == ["bert"]
    infer = grpc_predict_v2_pb2.ModelInferRequest(model_name="mlp")
    assert request_models(MODEL_FIELDS["/inference.GRPCInferenceService/ModelInfer"], infer.SerializeToString()) == ["mlp"]
    with pytest.raises(InvalidArgument, match="malformed CreateModelRequest"):
        request_models(MODEL_FIELDS["/aimaas.registry.v1.RegistryService/CreateModel"], b"\xff\xff\xff")
