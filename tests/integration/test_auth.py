"""API keys against a real etcd: create/list/revoke across two stores (watch), expiry, corrupt records,
etcd outages (the cache keeps serving), and the FastAPI dependency."""

from __future__ import annotations

import asyncio
import contextlib
import json

import fastapi
import httpx
import pytest
from pydantic import SecretStr

from aimaas.auth.v1 import auth_pb2
from services.common.auth import ApiKeyStore, AuthSettings, Authenticator, Permission, Principal, require
from services.common.auth.tokens import new_key_id, new_secret, format_token
from services.common.errors import AimaasError, InvalidArgument, NotFound, Unauthenticated, Unavailable, http_status_for
from services.common.etcd import EtcdClient, EtcdUnavailable
from services.common.settings import EtcdSettings
from tests.support.scheduler import eventually

BOOT = "boot-" + "x" * 40


@contextlib.asynccontextmanager
async def running_store(settings: EtcdSettings, **kwargs):
    etcd = EtcdClient(settings)
    store = ApiKeyStore(etcd, **kwargs)
    await store.start()
    try:
        yield store
    finally:
        await store.stop()
        await etcd.close()


async def outcome(auth: Authenticator, token: str) -> str:
    """'ok', or the refusal message."""
    try:
        await auth.authenticate(f"Bearer {token}")
    except (Unauthenticated, Unavailable) as exc:
        return exc.message
    return "ok"


async def test_create_list_revoke_across_two_gateways(etcd_settings):
    async with running_store(etcd_settings) as store_a, running_store(etcd_settings) as store_b:
        auth_a, auth_b = Authenticator(store_a, AuthSettings()), Authenticator(store_b, AuthSettings())
        key, token = await store_a.create("ci-bot", auth_pb2.ROLE_INVOKER, ["resnet"], 0)
        assert token.startswith(f"aimaas_{key.id}_") and not key.secret_hash
        assert key.name == "ci-bot" and list(key.model_scope) == ["resnet"] and not key.HasField("expires")

        # The creating gateway serves the key at once; another one within a watch round-trip.
        principal = await auth_a.authenticate(f"Bearer {token}")
        assert principal == Principal(key.id, "ci-bot", auth_pb2.ROLE_INVOKER, frozenset({"resnet"}))
        await eventually(lambda: _accepted(auth_b, token), 5, "key visible on the second gateway")

        # Stored: the hash, never the secret; readable JSON.
        raw = (await store_a._etcd.get(store_a._etcd.keys.api_key(key.id))).value
        record = json.loads(raw)
        assert record["secret_hash"].startswith("hmac-sha256$") and token.split("_", 2)[2] not in raw.decode()
        assert record["role"] == "ROLE_INVOKER"

        listed = await store_b.list()
        assert [k.id for k in listed] == [key.id] and not listed[0].secret_hash
        assert (await store_b.get(key.id)).name == "ci-bot"

        revoked = await store_b.revoke(key.id)
        assert revoked.HasField("revoked") and not revoked.secret_hash
        assert "was revoked at" in await outcome(auth_b, token)  # the revoking gateway: at once
        await eventually(lambda: _refused(auth_a, token, "was revoked at"), 5, "revocation on the other gateway")
        assert (await store_a.revoke(key.id)).revoked == revoked.revoked  # idempotent
        assert (await store_a.list())[0].HasField("revoked")


async def _accepted(auth: Authenticator, token: str) -> bool:
    return await outcome(auth, token) == "ok"


async def _refused(auth: Authenticator, token: str, message: str) -> bool:
    return message in await outcome(auth, token)


async def test_admin_errors(etcd_settings):
    async with running_store(etcd_settings, max_ttl_seconds=60) as store:
        with pytest.raises(NotFound, match="API key '0123456789abcdef' not found"):
            await store.revoke("0123456789abcdef")
        with pytest.raises(NotFound, match="not found"):
            await store.revoke("../../etc")
        with pytest.raises(InvalidArgument, match="id is required"):
            await store.revoke("")
        with pytest.raises(InvalidArgument, match="between 1 and 60"):
            await store.create("long", auth_pb2.ROLE_VIEWER, [], 0)
        with pytest.raises(InvalidArgument, match="role is required"):
            await store.create("x", auth_pb2.ROLE_UNSPECIFIED, [], 10)
        assert await store.list() == []


async def test_expiry(etcd_settings):
    now = [1_000_000.0]
    async with running_store(etcd_settings, clock=lambda: now[0]) as store:
        auth = Authenticator(store, AuthSettings())
        key, token = await store.create("short", auth_pb2.ROLE_VIEWER, [], 30)
        assert key.expires.seconds == 1_000_030
        assert await outcome(auth, token) == "ok"
        now[0] += 29.9
        assert await outcome(auth, token) == "ok"
        now[0] += 0.1
        assert await outcome(auth, token) == f"API key {key.id} expired at 1970-01-12T13:47:10Z"


async def test_corrupt_records_are_ignored(etcd_settings):
    etcd = EtcdClient(etcd_settings)
    try:
        bad_id, other_id = new_key_id(), new_key_id()
        await etcd.put(etcd.keys.api_key(bad_id), b"{not json")
        await etcd.put(etcd.keys.api_key(other_id), json.dumps({"id": other_id, "secret_hash": "plain"}).encode())
        async with running_store(etcd_settings) as store:
            auth = Authenticator(store, AuthSettings())
            key, token = await store.create("fine", auth_pb2.ROLE_VIEWER, [], 0)
            assert await outcome(auth, token) == "ok"
            assert await outcome(auth, format_token(bad_id, new_secret())) == f"unknown API key {bad_id}"
            assert await outcome(auth, format_token(other_id, new_secret())) == f"unknown API key {other_id}"
            # A record arriving corrupt through the watch is ignored the same way.
            await etcd.put(etcd.keys.api_key(key.id), b"[]")
            await eventually(lambda: _refused(auth, token, "unknown API key"), 5, "corrupt update dropped")
            assert {k.id for k in await store.list()} >= {other_id}
    finally:
        await etcd.close()


async def test_cache_keeps_serving_while_etcd_is_down(restartable_etcd):
    settings = EtcdSettings(endpoints=restartable_etcd.endpoint, timeout_seconds=1)
    async with running_store(settings) as store_a, running_store(settings) as store_b:
        auth_a = Authenticator(store_a, AuthSettings())
        _, keep = await store_a.create("keep", auth_pb2.ROLE_INVOKER, [], 0)
        doomed, doomed_token = await store_a.create("doomed", auth_pb2.ROLE_INVOKER, [], 0)

        restartable_etcd.stop()
        for _ in range(3):
            assert await outcome(auth_a, keep) == "ok"
            assert await outcome(auth_a, doomed_token) == "ok"
            await asyncio.sleep(0.3)
        with pytest.raises(EtcdUnavailable):
            await store_a.create("during-outage", auth_pb2.ROLE_VIEWER, [], 0)
        assert http_status_for(Unavailable("x").code) == 503

        restartable_etcd.start()
        # A revocation made after the outage (through another gateway) reaches this one via the resumed watch.
        await eventually(lambda: _revoke(store_b, doomed.id), 10, "revoke after restart")
        await eventually(lambda: _refused(auth_a, doomed_token, "was revoked"), 10, "revocation after the outage")
        assert await outcome(auth_a, keep) == "ok"


async def _revoke(store: ApiKeyStore, key_id: str) -> bool:
    try:
        await store.revoke(key_id)
    except EtcdUnavailable:
        return False
    return True


async def test_start_during_outage_then_load(restartable_etcd):
    settings = EtcdSettings(endpoints=restartable_etcd.endpoint, timeout_seconds=1)
    async with running_store(settings) as writer:
        _, token = await writer.create("early", auth_pb2.ROLE_VIEWER, [], 0)
    restartable_etcd.stop()
    async with running_store(settings) as store:
        auth = Authenticator(store, AuthSettings(bootstrap_admin_token=SecretStr(BOOT)))
        assert not store.loaded
        assert "not loaded yet" in await outcome(auth, token)
        assert await outcome(auth, BOOT) == "ok"  # the bootstrap admin needs no etcd
        restartable_etcd.start()
        await eventually(lambda: store.loaded, 10, "keys loaded once etcd is back")
        assert await outcome(auth, token) == "ok"


# -- FastAPI dependency -------------------------------------------------------------------------------


def _app(auth: Authenticator | None, *, on_state: Authenticator | None = None) -> fastapi.FastAPI:
    app = fastapi.FastAPI()
    if on_state is not None:
        app.state.authenticator = on_state

    @app.exception_handler(AimaasError)
    async def _error(_request, exc: AimaasError):
        return fastapi.responses.JSONResponse({"error": exc.message}, status_code=http_status_for(exc.code))

    @app.post("/v2/models/{model_name}/infer")
    async def infer(model_name: str, principal: Principal = require(Permission.INFER, auth)):
        return {"model": model_name, "key": principal.key_id}

    @app.get("/v1/keys", dependencies=[require(Permission.ADMIN, auth)])
    async def keys():
        return {"ok": True}

    return app


async def _call(app: fastapi.FastAPI, method: str, path: str, token: str | None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.request(method, path, headers=headers)
    return response.status_code, response.json()


async def test_fastapi_dependency(etcd_settings):
    async with running_store(etcd_settings) as store:
        auth = Authenticator(store, AuthSettings(bootstrap_admin_token=SecretStr(BOOT)))
        _, scoped = await store.create("scoped", auth_pb2.ROLE_INVOKER, ["resnet"], 0)
        _, viewer = await store.create("viewer", auth_pb2.ROLE_VIEWER, [], 0)
        for app in (_app(auth), _app(None, on_state=auth)):
            assert await _call(app, "POST", "/v2/models/resnet/infer", scoped) == (200, {"model": "resnet", "key": scoped[7:23]})
            status, body = await _call(app, "POST", "/v2/models/bert/infer", scoped)
            assert (status, body["error"]) == (403, f"API key {scoped[7:23]} is not scoped to model 'bert'")
            status, body = await _call(app, "POST", "/v2/models/resnet/infer", viewer)
            assert status == 403 and "lacks the infer permission" in body["error"]
            status, body = await _call(app, "POST", "/v2/models/resnet/infer", None)
            assert status == 401 and body["error"].startswith("missing API key")
            assert (await _call(app, "GET", "/v1/keys", scoped))[0] == 403
            assert await _call(app, "GET", "/v1/keys", BOOT) == (200, {"ok": True})
        open_app = _app(Authenticator(None, AuthSettings(enabled=False)))
        assert await _call(open_app, "POST", "/v2/models/bert/infer", None) == (200, {"model": "bert", "key": "anonymous"})
        assert (await _call(open_app, "GET", "/v1/keys", "garbage"))[0] == 200
