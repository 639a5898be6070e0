"""Registry domain logic: models, immutable versions, aliases, artifacts.

Records live in etcd as protobuf JSON (keys from the one KeyBuilder); artifact bytes live in the
object store under content-addressed keys. A version becomes visible only in the etcd transaction
that allocates its number, after every byte is stored and verified, so a crash mid-upload leaves
at most an unreferenced blob, which `list_orphan_blobs` finds.
"""

from __future__ import annotations

import asyncio
import base64
import re
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime, timedelta

import structlog
from google.protobuf.timestamp_pb2 import Timestamp

from aimaas.registry.v1 import registry_pb2 as pb
from aimaas.scheduler.v1 import scheduler_pb2
from aimaas.types.v1 import types_pb2
from services.common.aio import prefetch
from services.common.errors import AlreadyExists, Conflict, FailedPrecondition, InvalidArgument, NotFound
from services.common.names import NAME_RE, validate_labels, validate_name
from services.common.etcd import Compare, EtcdClient, KeyValue, Op, from_json, to_json
from services.common.etcd.keys import MAX_VERSION
from services.common.objectstore import DigestMismatch, ObjectStore, SizeLimitExceeded
from services.common.objectstore.keys import BLOBS_PREFIX, UPLOADS_PREFIX, blob_key, parse_blob_key, upload_key
from services.registry.inspect import ArtifactInspector, InvalidArtifact

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_ALIASES = frozenset({"latest"})
_DEFAULT_PAGE_SIZE = 100
_MAX_PAGE_SIZE = 1000
_MAX_DESCRIPTION = 4096
# Optimistic-concurrency retries for version allocation under contention.
_MAX_ALLOCATION_ATTEMPTS = 64
_DEFAULT_ORPHAN_MIN_AGE = timedelta(hours=1)
# Upload chunks read ahead of the store (memory: this many chunks, ~1 MiB each).
_UPLOAD_READ_AHEAD = 4


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def validate_description(description: str) -> None:
    if len(description) > _MAX_DESCRIPTION:
        raise InvalidArgument(f"description is longer than {_MAX_DESCRIPTION} characters")


def validate_alias_name(alias: str) -> None:
    validate_name("alias", alias)
    if alias in _RESERVED_ALIASES:
        raise InvalidArgument(f"alias name {alias!r} is reserved")


def _page_size(page: types_pb2.PageRequest) -> int:
    if page.page_size == 0:
        return _DEFAULT_PAGE_SIZE
    return min(page.page_size, _MAX_PAGE_SIZE)


def _encode_token(last: str) -> str:
    return base64.urlsafe_b64encode(last.encode()).decode()


def _decode_token(token: str) -> str | None:
    if not token:
        return None
    try:
        cursor = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("invalid page_token: pass next_page_token from a previous response") from exc
    if not (NAME_RE.match(cursor) or cursor.isdigit()):
        raise InvalidArgument("invalid page_token: pass next_page_token from a previous response")
    return cursor


class ModelRegistry:
    def __init__(self, etcd: EtcdClient, store: ObjectStore, *, max_artifact_bytes: int, logger=None) -> None:
        self._etcd = etcd
        self._keys = etcd.keys
        self._store = store
        self._max_artifact_bytes = max_artifact_bytes
        self._log = logger or structlog.get_logger("registry")

    # ----------------------------------------------------------------- models

    async def _read_model(self, name: str) -> tuple[pb.Model, KeyValue]:
        validate_name("model", name)
        record = await self._etcd.get(self._keys.model(name))
        if record is None:
            raise NotFound(f"model {name!r} not found")
        return from_json(record.value, pb.Model), record

    async def create_model(self, name: str, description: str = "", labels: dict[str, str] | None = None) -> pb.Model:
        validate_name("model", name)
        validate_description(description)
        validate_labels(labels)
        now = _now()
        model = pb.Model(name=name, description=description, labels=labels or {}, created=now, updated=now)
        if not await self._etcd.create(self._keys.model(name), to_json(model)):
            raise AlreadyExists(f"model {name!r} already exists")
        self._log.info("model created", model=name)
        return model

    async def get_model(self, name: str) -> tuple[pb.Model, list[pb.Alias]]:
        model, _ = await self._read_model(name)
        return model, await self.list_aliases(name)

    async def list_models(
        self, page: types_pb2.PageRequest, label_selector: dict[str, str] | None = None
    ) -> tuple[list[pb.Model], str]:
        size = _page_size(page)
        cursor = _decode_token(page.page_token)
        start_after = self._keys.model(cursor) if cursor else None
        prefix = self._keys.models_prefix()
        models: list[pb.Model] = []
        # Model records share their prefix with version and alias records: scan in batches.
        while True:
            batch = await self._etcd.get_prefix(prefix, limit=max(size * 4, 256), start_after=start_after)
            for record in batch:
                start_after = record.key
                name = self._keys.parse_model_key(record.key)
                if name is None:
                    continue
                model = from_json(record.value, pb.Model)
                if label_selector and any(model.labels.get(k) != v for k, v in label_selector.items()):
                    continue
                models.append(model)
                if len(models) == size:
                    return models, _encode_token(name)
            if len(batch) < max(size * 4, 256):
                return models, ""

    async def update_model(
        self,
        name: str,
        *,
        description: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> pb.Model:
        if description is not None:
            validate_description(description)
        if labels is not None:
            validate_labels(labels)
        for _ in range(_MAX_ALLOCATION_ATTEMPTS):
            model, record = await self._read_model(name)
            if description is not None:
                model.description = description
            if labels is not None:
                model.ClearField("labels")
                model.labels.update(labels)
            model.updated.CopyFrom(_now())
            if await self._etcd.compare_and_swap(record.key, to_json(model), expected_mod_revision=record.mod_revision):
                return model
        raise Conflict(f"model {name!r} is being changed concurrently; retry")

    async def deployments_using(self, model: str) -> list[str]:
        names = []
        for record in await self._etcd.get_prefix(self._keys.deployments_prefix()):
            spec = from_json(record.value, scheduler_pb2.DeploymentSpec)
            if spec.model == model:
                names.append(spec.name)
        return names

    async def delete_model(self, name: str) -> None:
        _, record = await self._read_model(name)
        users = await self.deployments_using(name)
        if users:
            raise FailedPrecondition(
                f"model {name!r} is used by deployment(s) {', '.join(sorted(users))}; delete them first"
            )
        # Blobs stay: other versions may share them; unreferenced ones are orphans for cleanup.
        result = await self._etcd.transaction(
            [Compare.mod_revision(record.key, "==", record.mod_revision)],
            [Op.delete(record.key), Op.delete_prefix(self._keys.model(name) + "/")],
        )
        if not result.succeeded:
            raise Conflict(f"model {name!r} changed while being deleted; retry")
        self._log.info("model deleted", model=name)

    # --------------------------------------------------------------- versions

    async def upload_version(
        self, metadata: pb.UploadVersionMetadata, chunks: AsyncIterable[bytes]
    ) -> tuple[pb.ModelVersion, bool]:
        """Store, verify and inspect an artifact, then record it as the next version of a model."""
        validate_name("model", metadata.model)
        validate_description(metadata.description)
        validate_labels(dict(metadata.labels))
        for alias in metadata.aliases:
            validate_alias_name(alias)
        expected_sha = metadata.expected_sha256.lower()
        if expected_sha and not _SHA256_RE.match(expected_sha):
            raise InvalidArgument("expected_sha256 must be 64 hexadecimal characters")
        if metadata.expected_size_bytes > self._max_artifact_bytes:
            raise InvalidArgument(
                f"artifact of {metadata.expected_size_bytes} bytes exceeds the limit of {self._max_artifact_bytes} bytes"
            )
        if metadata.format not in (types_pb2.MODEL_FORMAT_UNSPECIFIED, types_pb2.MODEL_FORMAT_ONNX, types_pb2.MODEL_FORMAT_TENSORRT_PLAN):
            raise InvalidArgument(f"unknown model format {metadata.format}")
        # Fail fast, before any byte is stored, when the model is missing. A model created for this
        # upload is written with its first version (_record_version): a refused upload leaves nothing.
        if await self._etcd.get(self._keys.model(metadata.model)) is None and not metadata.create_model:
            raise NotFound(f"model {metadata.model!r} not found (set create_model to create it)")

        inspector = ArtifactInspector(metadata.format)

        async def inspected() -> AsyncIterator[bytes]:
            # Read ahead so receiving the next chunk overlaps hashing and storing this one.
            async for chunk in prefetch(chunks, _UPLOAD_READ_AHEAD):
                inspector.feed(chunk)
                yield chunk

        staging = upload_key(uuid.uuid4().hex)
        try:
            try:
                stored = await self._store.put_stream(
                    staging, inspected(), expected_sha256=expected_sha or None, max_bytes=self._max_artifact_bytes
                )
            except DigestMismatch as exc:
                raise InvalidArgument(
                    f"sha256 mismatch: expected {exc.expected}, the uploaded bytes hash to {exc.actual}"
                ) from exc
            except SizeLimitExceeded as exc:
                raise InvalidArgument(f"artifact exceeds the limit of {self._max_artifact_bytes} bytes") from exc
            if metadata.expected_size_bytes and stored.size != metadata.expected_size_bytes:
                raise InvalidArgument(
                    f"truncated or oversized upload: expected {metadata.expected_size_bytes} bytes, received {stored.size}"
                )
            try:
                inspection = inspector.finish()
            except InvalidArtifact as exc:
                raise InvalidArgument(str(exc)) from exc
            moved = await self._store.promote(staging, blob_key(stored.sha256))
        except BaseException:
            # Shielded: a caller that hangs up cancels this task, but the staging object must go.
            await asyncio.shield(self._store.delete(staging))
            raise
        version = pb.ModelVersion(
            model=metadata.model,
            sha256=stored.sha256,
            size_bytes=stored.size,
            format=inspection.format,
            signature=inspection.signature,
            state=pb.VERSION_STATE_ACTIVE,
            description=metadata.description,
            labels=dict(metadata.labels),
            format_details=inspection.details,
            task=inspection.task,
        )
        version = await self._record_version(version, list(metadata.aliases), create_model=metadata.create_model)
        self._log.info(
            "version uploaded", model=version.model, version=version.version, sha256=version.sha256,
            size_bytes=version.size_bytes, deduplicated=not moved,
        )
        return version, not moved

    async def _record_version(
        self, version: pb.ModelVersion, aliases: list[str], *, create_model: bool = False
    ) -> pb.ModelVersion:
        """Allocate the next version number and write the record (and aliases) atomically; with
        `create_model`, a missing model is created in the same transaction."""
        key = self._keys.model(version.model)
        for _ in range(_MAX_ALLOCATION_ATTEMPTS):
            now = _now()
            try:
                model, record = await self._read_model(version.model)
                guard = Compare.mod_revision(key, "==", record.mod_revision)
            except NotFound:
                if not create_model:
                    raise
                model = pb.Model(name=version.model, created=now)
                guard = Compare.create_revision(key, "==", 0)  # still missing when written
            model.latest_version += 1
            model.updated.CopyFrom(now)
            version.version = model.latest_version
            version.created.CopyFrom(now)
            ops = [
                Op.put(key, to_json(model)),
                Op.put(self._keys.version(version.model, version.version), to_json(version)),
            ]
            for alias in aliases:
                entry = pb.Alias(model=version.model, name=alias, version=version.version, updated=now)
                ops.append(Op.put(self._keys.alias(version.model, alias), to_json(entry)))
            result = await self._etcd.transaction([guard], ops)
            if result.succeeded:
                if guard.target == "create_revision":
                    self._log.info("model created", model=version.model)
                return version
        raise Conflict(f"too many concurrent uploads to model {version.model!r}; retry")

    async def get_version(self, model: str, version: int) -> pb.ModelVersion:
        validate_name("model", model)
        if not 1 <= version <= MAX_VERSION:
            raise InvalidArgument(f"version must be a number in [1, {MAX_VERSION}], got {version}")
        record = await self._etcd.get(self._keys.version(model, version))
        if record is None:
            await self._read_model(model)  # NOT_FOUND names the model when that is what is missing
            raise NotFound(f"version {version} of model {model!r} not found")
        return from_json(record.value, pb.ModelVersion)

    async def list_versions(
        self, model: str, page: types_pb2.PageRequest, include_archived: bool = False
    ) -> tuple[list[pb.ModelVersion], str]:
        await self._read_model(model)
        size = _page_size(page)
        cursor = _decode_token(page.page_token)
        after_version = int(cursor) if cursor and cursor.isdigit() else 0
        records = await self._etcd.get_prefix(self._keys.versions_prefix(model))
        # Keys sort lexically ("10" < "9"): order by number.
        versions = sorted((from_json(r.value, pb.ModelVersion) for r in records), key=lambda v: v.version)
        selected = [
            v for v in versions
            if v.version > after_version and (include_archived or v.state != pb.VERSION_STATE_ARCHIVED)
        ]
        page_items = selected[:size]
        token = _encode_token(str(page_items[-1].version)) if len(selected) > size else ""
        return page_items, token

    async def archive_version(self, model: str, version: int) -> pb.ModelVersion:
        for _ in range(_MAX_ALLOCATION_ATTEMPTS):
            await self.get_version(model, version)  # precise NOT_FOUND / INVALID_ARGUMENT
            record = await self._etcd.get(self._keys.version(model, version))
            if record is None:
                continue
            current = from_json(record.value, pb.ModelVersion)
            if current.state == pb.VERSION_STATE_ARCHIVED:
                return current
            current.state = pb.VERSION_STATE_ARCHIVED
            if await self._etcd.compare_and_swap(record.key, to_json(current), expected_mod_revision=record.mod_revision):
                return current
        raise Conflict(f"version {version} of model {model!r} is being changed concurrently; retry")

    async def download_version(
        self, model: str, version: int, offset: int = 0, length: int = 0, chunk_size: int = 1 << 20
    ) -> tuple[pb.ModelVersion, AsyncIterator[bytes]]:
        record = await self.get_version(model, version)
        if offset > record.size_bytes:
            raise InvalidArgument(f"offset {offset} is past the end of the {record.size_bytes}-byte artifact")
        stream = self._store.get_stream(
            blob_key(record.sha256), offset=offset, length=length or None, chunk_size=chunk_size
        )
        return record, stream

    # ---------------------------------------------------------------- aliases

    async def set_alias(
        self, model: str, alias: str, version: int, *, expected_version: int = 0, force: bool = False
    ) -> pb.Alias:
        validate_alias_name(alias)
        target = await self.get_version(model, version)
        if target.state == pb.VERSION_STATE_ARCHIVED:
            raise FailedPrecondition(f"version {version} of model {model!r} is archived")
        key = self._keys.alias(model, alias)
        entry = pb.Alias(model=model, name=alias, version=version, updated=_now())
        current = await self._etcd.get(key)
        compares = [Compare.create_revision(self._keys.version(model, version), ">", 0)]
        if force:
            pass
        elif current is None:
            if expected_version:
                raise Conflict(f"alias {alias!r} of model {model!r} does not exist (expected version {expected_version})")
            compares.append(Compare.create_revision(key, "==", 0))
        else:
            current_version = from_json(current.value, pb.Alias).version
            if current_version != expected_version:
                raise Conflict(
                    f"alias {alias!r} of model {model!r} points to version {current_version}, "
                    f"not the expected {expected_version or 'none'}"
                )
            compares.append(Compare.mod_revision(key, "==", current.mod_revision))
        result = await self._etcd.transaction(compares, [Op.put(key, to_json(entry))])
        if not result.succeeded:
            raise Conflict(f"alias {alias!r} of model {model!r} changed concurrently; read it again and retry")
        self._log.info("alias set", model=model, alias=alias, version=version)
        return entry

    async def get_alias(self, model: str, alias: str) -> pb.Alias:
        validate_name("model", model)
        validate_alias_name(alias)
        record = await self._etcd.get(self._keys.alias(model, alias))
        if record is None:
            await self._read_model(model)
            raise NotFound(f"alias {alias!r} of model {model!r} not found")
        return from_json(record.value, pb.Alias)

    async def list_aliases(self, model: str) -> list[pb.Alias]:
        validate_name("model", model)
        records = await self._etcd.get_prefix(self._keys.aliases_prefix(model))
        return [from_json(r.value, pb.Alias) for r in records]

    async def delete_alias(self, model: str, alias: str, expected_version: int = 0) -> None:
        current = await self._etcd.get(self._keys.alias(model, alias)) if NAME_RE.match(alias) else None
        if current is None:
            await self.get_alias(model, alias)  # raises the precise NOT_FOUND / INVALID_ARGUMENT
            return
        if expected_version and from_json(current.value, pb.Alias).version != expected_version:
            raise Conflict(f"alias {alias!r} of model {model!r} does not point to version {expected_version}")
        if not await self._etcd.compare_and_delete(current.key, expected_mod_revision=current.mod_revision):
            raise Conflict(f"alias {alias!r} of model {model!r} changed concurrently; retry")

    async def resolve(self, model: str, reference: str) -> pb.ModelVersion:
        reference = reference.strip()
        if not reference:
            raise InvalidArgument("version reference is empty: give a number, 'latest' or an alias")
        if reference.isdigit():
            return await self.get_version(model, int(reference))
        if reference == "latest":
            model_record, _ = await self._read_model(model)
            # Numbers are never reused: walk down from the newest to the first active version.
            for number in range(model_record.latest_version, 0, -1):
                record = await self._etcd.get(self._keys.version(model, number))
                if record is not None:
                    candidate = from_json(record.value, pb.ModelVersion)
                    if candidate.state == pb.VERSION_STATE_ACTIVE:
                        return candidate
            raise NotFound(f"model {model!r} has no active versions")
        alias = await self.get_alias(model, reference)
        return await self.get_version(model, alias.version)

    # ------------------------------------------------------------ orphan blobs

    async def _referenced_digests(self) -> set[str]:
        digests = set()
        for record in await self._etcd.get_prefix(self._keys.models_prefix()):
            if self._keys.parse_version_key(record.key) is not None:
                digests.add(from_json(record.value, pb.ModelVersion).sha256)
        return digests

    async def list_orphan_blobs(self) -> list[pb.OrphanBlob]:
        referenced = await self._referenced_digests()
        orphans = []
        async for info in self._store.list(BLOBS_PREFIX):
            digest = parse_blob_key(info.key)
            if digest is not None and digest not in referenced:
                stamp = Timestamp()
                stamp.FromDatetime(info.last_modified)
                orphans.append(pb.OrphanBlob(sha256=digest, size_bytes=info.size, last_modified=stamp))
        return orphans

    async def delete_orphan_blobs(self, min_age_seconds: int = 0, dry_run: bool = False) -> list[pb.OrphanBlob]:
        min_age = timedelta(seconds=min_age_seconds) if min_age_seconds else _DEFAULT_ORPHAN_MIN_AGE
        cutoff = datetime.now(UTC) - min_age
        deleted = []
        for orphan in await self.list_orphan_blobs():
            if orphan.last_modified.ToDatetime(tzinfo=UTC) > cutoff:
                continue
            # Re-check right before deleting: an upload may have recorded a version meanwhile.
            if orphan.sha256 in await self._referenced_digests():
                continue
            if not dry_run:
                await self._store.delete(blob_key(orphan.sha256))
            deleted.append(orphan)
        # Staging objects of uploads that crashed mid-stream.
        async for info in self._store.list(UPLOADS_PREFIX):
            if info.last_modified <= cutoff and not dry_run:
                await self._store.delete(info.key)
        return deleted
