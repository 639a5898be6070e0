"""Registry against a real etcd and real object stores (local directory and an S3 server)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from aimaas.registry.v1 import registry_pb2 as pb
from aimaas.scheduler.v1 import scheduler_pb2
from aimaas.types.v1 import types_pb2
from services.common.etcd import KeyBuilder, to_json
from tests.support.models import mlp_bytes, mlp_model
from tests.support.registry import registry_settings, running_registry, sha256, upload, upload_requests

MODEL = mlp_bytes()


@pytest.fixture
async def registry(etcd_settings, store_settings):
    async with running_registry(registry_settings(etcd_settings, store_settings)) as running:
        yield running


@pytest.fixture
async def stub(registry):
    return registry[1]


async def expect_error(call, code: grpc.StatusCode, fragment: str = ""):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert fragment.lower() in (info.value.details() or "").lower(), info.value.details()
    return info.value


# ------------------------------------------------------------------ models


async def test_model_lifecycle(stub):
    created = await stub.CreateModel(pb.CreateModelRequest(name="fraud", description="d", labels={"team": "risk"}))
    assert created.model.name == "fraud" and created.model.created.seconds > 0
    got = await stub.GetModel(pb.GetModelRequest(name="fraud"))
    assert got.model.labels == {"team": "risk"}
    updated = await stub.UpdateModel(
        pb.UpdateModelRequest(name="fraud", description="new", update_description=True)
    )
    assert updated.model.description == "new" and updated.model.labels == {"team": "risk"}
    updated = await stub.UpdateModel(pb.UpdateModelRequest(name="fraud", labels={"a": "b"}, update_labels=True))
    assert updated.model.labels == {"a": "b"}
    await stub.DeleteModel(pb.DeleteModelRequest(name="fraud"))
    await expect_error(stub.GetModel(pb.GetModelRequest(name="fraud")), grpc.StatusCode.NOT_FOUND, "fraud")


@pytest.mark.parametrize("name", ["", "Upper", "1abc", "a_b", "ends-", "x" * 64, "a/b", "a b"])
async def test_invalid_model_names_are_rejected(stub, name):
    await expect_error(stub.CreateModel(pb.CreateModelRequest(name=name)), grpc.StatusCode.INVALID_ARGUMENT, "name")


async def test_duplicate_model_and_errors(stub):
    await stub.CreateModel(pb.CreateModelRequest(name="m"))
    await expect_error(stub.CreateModel(pb.CreateModelRequest(name="m")), grpc.StatusCode.ALREADY_EXISTS, "exists")
    await expect_error(stub.DeleteModel(pb.DeleteModelRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "nope")
    await expect_error(
        stub.UpdateModel(pb.UpdateModelRequest(name="m")), grpc.StatusCode.INVALID_ARGUMENT, "nothing to update"
    )
    await expect_error(
        stub.CreateModel(pb.CreateModelRequest(name="n", labels={"bad key!": "v"})),
        grpc.StatusCode.INVALID_ARGUMENT, "label",
    )


async def test_list_models_paginates_and_filters(stub):
    names = [f"model-{i:02d}" for i in range(7)]
    for i, name in enumerate(names):
        await stub.CreateModel(pb.CreateModelRequest(name=name, labels={"parity": str(i % 2)}))
    # Versions share the key prefix of models: they must not show up as models.
    await upload(stub, "model-00", MODEL)
    seen, token = [], ""
    while True:
        page = await stub.ListModels(pb.ListModelsRequest(page=types_pb2.PageRequest(page_size=3, page_token=token)))
        assert len(page.models) <= 3
        seen += [m.name for m in page.models]
        token = page.page.next_page_token
        if not token:
            break
    assert seen == names
    odd = await stub.ListModels(pb.ListModelsRequest(label_selector={"parity": "1"}))
    assert [m.name for m in odd.models] == names[1::2]
    await expect_error(
        stub.ListModels(pb.ListModelsRequest(page=types_pb2.PageRequest(page_token="%%%"))),
        grpc.StatusCode.INVALID_ARGUMENT, "page_token",
    )


async def test_delete_refused_while_a_deployment_uses_the_model(registry, etcd_settings):
    app, stub = registry
    await upload(stub, "used", MODEL)
    keys = KeyBuilder(etcd_settings.namespace)
    spec = scheduler_pb2.DeploymentSpec(name="used-endpoint", model="used")
    await app.etcd.put(keys.deployment("used-endpoint"), to_json(spec))
    await expect_error(
        stub.DeleteModel(pb.DeleteModelRequest(name="used")), grpc.StatusCode.FAILED_PRECONDITION, "used-endpoint"
    )
    await app.etcd.delete(keys.deployment("used-endpoint"))
    await stub.DeleteModel(pb.DeleteModelRequest(name="used"))
    # The versions went with it: a new model of the same name starts over at version 1.
    again = await upload(stub, "used", MODEL)
    assert again.version.version == 1


# ---------------------------------------------------------------- versions


async def test_upload_records_signature_and_downloads_back(stub):
    response = await upload(stub, "mlp", MODEL, expected_sha256=sha256(MODEL), expected_size_bytes=len(MODEL),
                            description="first", labels={"k": "v"})
    version = response.version
    assert (version.model, version.version, version.sha256, version.size_bytes) == ("mlp", 1, sha256(MODEL), len(MODEL))
    assert version.format == types_pb2.MODEL_FORMAT_ONNX
    assert [(t.name, t.datatype, list(t.shape)) for t in version.signature.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in version.signature.outputs] == [("y", "FP32", [-1, 3])]
    assert version.format_details["opset.ai.onnx"] == "17"
    assert not response.deduplicated

    messages = [m async for m in stub.DownloadVersion(pb.DownloadVersionRequest(model="mlp", version=1))]
    assert messages[0].version == version
    assert b"".join(m.chunk for m in messages[1:]) == MODEL
    ranged = [m async for m in stub.DownloadVersion(pb.DownloadVersionRequest(model="mlp", version=1, offset=10, length=20))]
    assert b"".join(m.chunk for m in ranged[1:]) == MODEL[10:30]
    got = await stub.GetVersion(pb.GetVersionRequest(model="mlp", version=1))
    assert got.version == version


async def test_same_bytes_are_stored_once(stub, registry):
    first = await upload(stub, "a", MODEL)
    second = await upload(stub, "b", MODEL)
    assert not first.deduplicated and second.deduplicated
    assert second.version.version == 1 and second.version.sha256 == first.version.sha256
    orphans = await stub.ListOrphanBlobs(pb.ListOrphanBlobsRequest())
    assert list(orphans.blobs) == []


async def test_concurrent_uploads_get_distinct_numbers(stub):
    await stub.CreateModel(pb.CreateModelRequest(name="busy"))
    models = [mlp_bytes(seed=i) for i in range(8)]
    results = await asyncio.gather(*(upload(stub, "busy", data) for data in models))
    numbers = sorted(r.version.version for r in results)
    assert numbers == list(range(1, 9))
    by_digest = {r.version.sha256: r.version.version for r in results}
    assert len(by_digest) == 8
    listed = await stub.ListVersions(pb.ListVersionsRequest(model="busy", page=types_pb2.PageRequest(page_size=5)))
    assert [v.version for v in listed.versions] == [1, 2, 3, 4, 5]
    rest = await stub.ListVersions(pb.ListVersionsRequest(model="busy", page=types_pb2.PageRequest(page_token=listed.page.next_page_token)))
    assert [v.version for v in rest.versions] == [6, 7, 8] and not rest.page.next_page_token


async def _assert_nothing_recorded(stub, model: str):
    versions = await stub.ListVersions(pb.ListVersionsRequest(model=model, include_archived=True))
    assert list(versions.versions) == []
    assert list((await stub.ListOrphanBlobs(pb.ListOrphanBlobsRequest())).blobs) == []


async def test_digest_mismatch_records_nothing(stub, registry):
    app, _ = registry
    await stub.CreateModel(pb.CreateModelRequest(name="m"))
    await expect_error(upload(stub, "m", MODEL, expected_sha256="0" * 64), grpc.StatusCode.INVALID_ARGUMENT, "sha256 mismatch")
    await _assert_nothing_recorded(stub, "m")
    assert [info async for info in app.store.list("uploads/")] == []


@pytest.mark.parametrize(
    ("data", "metadata", "fragment"),
    [
        (b"", {}, "empty"),
        (b"this is not a model at all" * 10, {}, "not a valid ONNX model or TensorRT plan"),
        (MODEL[: len(MODEL) // 2], {}, "truncated"),
        (MODEL[:-10], {"expected_size_bytes": len(MODEL)}, "truncated"),
        (b"\x00" * 100, {"format": types_pb2.MODEL_FORMAT_ONNX}, "not a valid ONNX model"),
        (MODEL, {"expected_sha256": "xyz"}, "expected_sha256"),
        (MODEL, {"aliases": ["latest"]}, "reserved"),
    ],
    ids=["empty", "garbage", "truncated-onnx", "short-upload", "declared-onnx-garbage", "bad-digest", "reserved-alias"],
)
async def test_bad_uploads_are_rejected_precisely(stub, data, metadata, fragment):
    await stub.CreateModel(pb.CreateModelRequest(name="m"))
    await expect_error(upload(stub, "m", data, create_model=False, **metadata), grpc.StatusCode.INVALID_ARGUMENT, fragment)
    await _assert_nothing_recorded(stub, "m")


async def test_a_refused_upload_that_would_create_its_model_leaves_no_model(stub):
    await expect_error(upload(stub, "fresh", b"garbage" * 10, create_model=True), grpc.StatusCode.INVALID_ARGUMENT, "not a valid")
    await expect_error(stub.GetModel(pb.GetModelRequest(name="fresh")), grpc.StatusCode.NOT_FOUND, "fresh")
    # The first good upload creates the model with its first version, in one transaction.
    response = await upload(stub, "fresh", MODEL, create_model=True)
    assert response.version.version == 1
    assert (await stub.GetModel(pb.GetModelRequest(name="fresh"))).model.latest_version == 1


async def test_upload_protocol_errors(stub):
    await expect_error(stub.UploadVersion(iter([]), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "empty upload")
    await expect_error(
        stub.UploadVersion(iter([pb.UploadVersionRequest(chunk=b"abc")]), timeout=10),
        grpc.StatusCode.INVALID_ARGUMENT, "first upload message",
    )
    await expect_error(upload(stub, "missing", MODEL, create_model=False), grpc.StatusCode.NOT_FOUND, "missing")
    await expect_error(upload(stub, "Bad Name", MODEL), grpc.StatusCode.INVALID_ARGUMENT, "name")
    twice = [
        pb.UploadVersionRequest(metadata=pb.UploadVersionMetadata(model="m", create_model=True)),
        pb.UploadVersionRequest(metadata=pb.UploadVersionMetadata(model="m")),
    ]
    await expect_error(stub.UploadVersion(iter(twice), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, "only be sent once")


async def test_size_limit(etcd_settings, local_store_settings):
    settings = registry_settings(etcd_settings, local_store_settings, max_artifact_bytes=len(MODEL) - 1)
    async with running_registry(settings) as (_, stub):
        await expect_error(upload(stub, "m", MODEL), grpc.StatusCode.INVALID_ARGUMENT, "limit")
        await expect_error(
            upload(stub, "m", MODEL[:10], expected_size_bytes=len(MODEL)), grpc.StatusCode.INVALID_ARGUMENT, "limit"
        )


async def test_a_client_that_disappears_mid_upload_leaves_no_version(stub, registry):
    app, _ = registry
    await stub.CreateModel(pb.CreateModelRequest(name="m"))
    blocker = asyncio.Event()

    async def requests():
        for request in upload_requests("m", MODEL, chunk_size=256):
            yield request
            if request.chunk:
                break
        await blocker.wait()  # never sends the rest

    call = stub.UploadVersion(requests(), timeout=30)
    await asyncio.sleep(0.5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.5)
    await _assert_nothing_recorded(stub, "m")
    assert [info async for info in app.store.list("uploads/")] == []


async def test_unknown_versions_and_archive(stub):
    await upload(stub, "m", MODEL)
    await expect_error(stub.GetVersion(pb.GetVersionRequest(model="m", version=9)), grpc.StatusCode.NOT_FOUND, "version 9")
    await expect_error(stub.GetVersion(pb.GetVersionRequest(model="zz", version=1)), grpc.StatusCode.NOT_FOUND, "'zz'")
    await expect_error(stub.GetVersion(pb.GetVersionRequest(model="m", version=0)), grpc.StatusCode.INVALID_ARGUMENT, "[1, ")
    # Beyond the key schema's width: a precise error, not INTERNAL from the key builder.
    for huge in (10**10, 2**64 - 1):
        await expect_error(
            stub.GetVersion(pb.GetVersionRequest(model="m", version=huge)), grpc.StatusCode.INVALID_ARGUMENT, "[1, "
        )
    await expect_error(
        stub.ResolveVersion(pb.ResolveVersionRequest(model="m", reference="99999999999")),
        grpc.StatusCode.INVALID_ARGUMENT, "[1, ",
    )
    archived = await stub.ArchiveVersion(pb.ArchiveVersionRequest(model="m", version=1))
    assert archived.version.state == pb.VERSION_STATE_ARCHIVED
    assert list((await stub.ListVersions(pb.ListVersionsRequest(model="m"))).versions) == []
    assert len((await stub.ListVersions(pb.ListVersionsRequest(model="m", include_archived=True))).versions) == 1
    await expect_error(
        stub.SetAlias(pb.SetAliasRequest(model="m", alias="prod", version=1)), grpc.StatusCode.FAILED_PRECONDITION, "archived"
    )
    await expect_error(stub.ResolveVersion(pb.ResolveVersionRequest(model="m", reference="latest")), grpc.StatusCode.NOT_FOUND, "no active")


# ----------------------------------------------------------------- aliases


async def test_alias_compare_and_swap(stub):
    for seed in range(3):
        await upload(stub, "m", mlp_bytes(seed=seed))
    set1 = await stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=1))
    assert set1.alias.version == 1
    # Creating again without naming the current target is a conflict.
    await expect_error(
        stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=2)), grpc.StatusCode.ABORTED, "points to version 1"
    )
    await stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=2, expected_version=1))
    await expect_error(
        stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=3, expected_version=1)),
        grpc.StatusCode.ABORTED, "points to version 2",
    )
    await stub.SetAlias(pb.SetAliasRequest(model="m", alias="production", version=3, force=True))
    assert (await stub.GetAlias(pb.GetAliasRequest(model="m", alias="production"))).alias.version == 3
    await expect_error(
        stub.SetAlias(pb.SetAliasRequest(model="m", alias="canary", version=7)), grpc.StatusCode.NOT_FOUND, "version 7"
    )
    await expect_error(
        stub.SetAlias(pb.SetAliasRequest(model="m", alias="canary", version=1, expected_version=2)), grpc.StatusCode.ABORTED, "does not exist"
    )

    resolved = await stub.ResolveVersion(pb.ResolveVersionRequest(model="m", reference="production"))
    assert resolved.version.version == 3
    assert (await stub.ResolveVersion(pb.ResolveVersionRequest(model="m", reference="2"))).version.version == 2
    assert (await stub.ResolveVersion(pb.ResolveVersionRequest(model="m", reference="latest"))).version.version == 3
    await expect_error(stub.ResolveVersion(pb.ResolveVersionRequest(model="m", reference="nope")), grpc.StatusCode.NOT_FOUND, "nope")

    await expect_error(
        stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="production", expected_version=1)), grpc.StatusCode.ABORTED, "version 1"
    )
    await stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="production", expected_version=3))
    await expect_error(stub.GetAlias(pb.GetAliasRequest(model="m", alias="production")), grpc.StatusCode.NOT_FOUND, "production")
    await expect_error(stub.DeleteAlias(pb.DeleteAliasRequest(model="m", alias="production")), grpc.StatusCode.NOT_FOUND, "production")


async def test_concurrent_alias_moves_only_one_wins(stub):
    for seed in range(3):
        await upload(stub, "m", mlp_bytes(seed=seed))
    await stub.SetAlias(pb.SetAliasRequest(model="m", alias="prod", version=1))
    attempts = [
        stub.SetAlias(pb.SetAliasRequest(model="m", alias="prod", version=v, expected_version=1)) for v in (2, 3) * 4
    ]
    results = await asyncio.gather(*attempts, return_exceptions=True)
    winners = [r for r in results if not isinstance(r, Exception)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == 7
    assert all(r.code() == grpc.StatusCode.ABORTED for r in losers)


async def test_upload_can_set_aliases(stub):
    response = await upload(stub, "m", MODEL, aliases=["staging"])
    aliases = (await stub.ListAliases(pb.ListAliasesRequest(model="m"))).aliases
    assert [(a.name, a.version) for a in aliases] == [("staging", response.version.version)]
    model = await stub.GetModel(pb.GetModelRequest(name="m"))
    assert [a.name for a in model.aliases] == ["staging"]


# ------------------------------------------------------------ orphan blobs


async def test_orphan_blobs_are_found_and_removed(stub, registry):
    app, _ = registry
    await upload(stub, "m", MODEL)
    await upload(stub, "keep", mlp_bytes(seed=5))
    await stub.DeleteModel(pb.DeleteModelRequest(name="m"))
    orphans = (await stub.ListOrphanBlobs(pb.ListOrphanBlobsRequest())).blobs
    assert [o.sha256 for o in orphans] == [sha256(MODEL)]
    # Young orphans are protected (an upload may be about to reference them).
    none = await stub.DeleteOrphanBlobs(pb.DeleteOrphanBlobsRequest(min_age_seconds=3600))
    assert list(none.deleted) == []
    await asyncio.sleep(1.1)
    dry = await stub.DeleteOrphanBlobs(pb.DeleteOrphanBlobsRequest(min_age_seconds=1, dry_run=True))
    assert [o.sha256 for o in dry.deleted] == [sha256(MODEL)]
    assert await app.store.exists(f"blobs/sha256/{sha256(MODEL)}")
    done = await stub.DeleteOrphanBlobs(pb.DeleteOrphanBlobsRequest(min_age_seconds=1))
    assert [o.sha256 for o in done.deleted] == [sha256(MODEL)]
    assert not await app.store.exists(f"blobs/sha256/{sha256(MODEL)}")
    assert await app.store.exists(f"blobs/sha256/{sha256(mlp_bytes(seed=5))}")


# ------------------------------------------------- health and reflection


async def test_reflection_lists_the_registry(registry):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    app, _ = registry
    async with grpc.aio.insecure_channel(app.grpc.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        async for response in responses:
            names = {s.name for s in response.list_services_response.service}
            break
    assert {"aimaas.registry.v1.RegistryService", "grpc.health.v1.Health"} <= names


def test_onnx_signature_matches_the_full_parse():
    from services.registry.inspect import ArtifactInspector

    model = mlp_model(inputs=5, outputs=2)
    inspector = ArtifactInspector(types_pb2.MODEL_FORMAT_UNSPECIFIED)
    data = model.SerializeToString()
    for start in range(0, len(data), 3):
        inspector.feed(data[start : start + 3])
    signature = inspector.finish().signature
    assert [i.name for i in signature.inputs] == [i.name for i in model.graph.input]
    assert [o.name for o in signature.outputs] == [o.name for o in model.graph.output]
