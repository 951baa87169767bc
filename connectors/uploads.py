"""Uploads held for a message: stored at once, remembered for a day under an id in
Redis (scoped to tenant and conversation), claimed by the message that lists them.
Shared by the REST, web chat and console edges (``connectors/files_api.py``,
``rest_api.py``, ``webchat.py``, ``console.py``).

An upload's body comes in either shape (:class:`UploadBody`): ``multipart/form-data``
(a ``file`` part, the other fields as form fields: an HTML form, ``curl -F``), or the
file's bytes as the whole body (any other ``Content-Type``; the fields in the query
string, the file's name in ``?name=`` or ``Content-Disposition``: no multipart parsing,
the cheaper request, which the pages send)."""

from __future__ import annotations

import email.message
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from connectors.attachments import (
    AttachmentPolicy,
    AttachmentRejected,
    Quota,
    UrlSigner,
    accept,
    valid_upload_id,
    with_urls,
)
from connectors.blobs import BlobStore
from connectors.thumbnails import Thumbnails
from schemas.keys import upload_key
from schemas.records import Attachment

UPLOAD_TTL_S = 24 * 3600
MAX_ATTACHMENTS = 10  # per message


@dataclass(frozen=True, slots=True)
class Files:
    """The gateway's attachment parts (``app.state.files``)."""

    store: BlobStore
    signer: UrlSigner
    policy: AttachmentPolicy
    quota: Quota | None = None
    thumbnail_concurrency: int = 2  # thumbnails made at once by the download route
    thumbnails: Thumbnails | None = None  # made with the app's Redis (gateway lifespan)


def files_of(request: Request) -> Files:
    files: Files | None = getattr(request.app.state, "files", None)
    if files is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "attachments are not configured")
    return files


_upload_key = upload_key
Fields = TypeVar("Fields", bound=BaseModel)
MAX_NAME_QUERY = 1024  # ``?name=`` (cut to MAX_NAME characters when stored)


class UploadBody:
    """An upload's request body, multipart or raw (module docstring): its fields, then
    its bytes, read once the caller has checked who is asking."""

    def __init__(
        self, request: Request, fields: Mapping[str, str], file: UploadFile | None, raw: bool
    ) -> None:
        self._request = request
        self._file = file
        self.fields = fields
        self.raw = raw

    @classmethod
    async def of(cls, request: Request) -> UploadBody:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            form: FormData = await request.form(max_files=1, max_fields=16)
            file = form.get("file")
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            if not isinstance(file, UploadFile):
                await form.close()
                raise RequestValidationError(
                    [{"type": "missing", "loc": ("body", "file"), "msg": "Field required"}]
                )
            return cls(request, fields, file, raw=False)
        return cls(request, request.query_params, None, raw=True)

    def validated(self, model: type[Fields]) -> Fields:
        """The fields as ``model``; 422 as FastAPI words it when they are not."""
        try:
            return model.model_validate(dict(self.fields))
        except ValidationError as exc:
            where = "query" if self.raw else "body"
            errors = exc.errors(include_url=False, include_context=False)
            raise RequestValidationError(
                [{**error, "loc": (where, *error["loc"])} for error in errors]
            ) from None

    @property
    def name(self) -> str:
        if self._file is not None:
            return self._file.filename or ""
        named = self.fields.get("name", "")[:MAX_NAME_QUERY]
        if named:
            return named
        disposition = self._request.headers.get("content-disposition", "")
        if not disposition:
            return ""
        header = email.message.Message()
        try:
            header["content-disposition"] = disposition
            return str(header.get_filename() or "")[:MAX_NAME_QUERY]
        except (ValueError, LookupError, UnicodeError):  # a stranger's header
            return ""

    async def read(self, limit: int) -> bytes:
        """The file's bytes, or 413 as soon as they pass ``limit`` (with the limit)."""
        chunks, size = [], 0
        too_large = HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE, f"attachment over {limit} bytes"
        )
        if self._file is None:
            async for chunk in self._request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
            return b"".join(chunks)
        try:
            while chunk := await self._file.read(256 * 1024):
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        finally:
            await self._file.close()
        return b"".join(chunks)


def upload_openapi(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``openapi_extra`` of an upload route whose fields are ``model``: both
    bodies, and the query fields of the raw one."""
    schema = model.model_json_schema()
    fields: dict[str, Any] = schema.get("properties", {})
    raw_only = "With a raw body (not multipart): "
    parameters = [
        {"in": "query", "name": name, "required": False, "schema": field}
        | {"description": f"{raw_only}the form field {name}"}
        for name, field in fields.items()
    ]
    parameters.append(
        {
            "in": "query",
            "name": "name",
            "required": False,
            "schema": {"type": "string", "maxLength": MAX_NAME_QUERY},
            "description": f"{raw_only}the file's name (or Content-Disposition's filename)",
        }
    )
    form = {
        "type": "object",
        "properties": {**fields, "file": {"type": "string", "format": "binary"}},
        "required": [*schema.get("required", []), "file"],
    }
    return {
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": form},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
    }


async def store_upload(
    request: Request,
    tenant: str,
    conversation: str,
    channel: str,
    upload: UploadBody,
    customer: str = "",
) -> dict[str, Any]:
    """Accept one uploaded file for ``conversation`` (``customer``'s: their data key
    seals it); the JSON the client gets."""
    files = files_of(request)
    data = await upload.read(files.policy.limit_for(channel))
    try:
        attachment = await accept(
            files.store,
            data,
            name=upload.name,
            tenant=tenant,
            conversation=conversation,
            channel=channel,
            policy=files.policy,
            quota=files.quota,
            customer=customer,
        )
    except AttachmentRejected as exc:
        raise HTTPException(exc.status, exc.reason) from exc
    upload_id = secrets.token_urlsafe(18)
    record = {"conversation_id": conversation, "attachment": attachment.to_avro()}
    redis = request.app.state.services.redis
    await redis.set(_upload_key(tenant, upload_id), json.dumps(record), ex=UPLOAD_TTL_S)
    shown = with_urls([attachment.to_avro()], files.signer)[0]
    return {"attachment_id": upload_id, **shown}


class UploadRefused(ValueError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def claim_upload_ids(
    redis: Any, tenant: str, conversation: str, upload_ids: list[str]
) -> tuple[Attachment, ...]:
    """The attachments of a message's upload ids; :class:`UploadRefused` naming the first
    that is unknown, expired, another tenant's or another conversation's."""
    if not upload_ids:
        return ()
    if len(upload_ids) > MAX_ATTACHMENTS:
        raise UploadRefused(f"at most {MAX_ATTACHMENTS} attachments")
    if not all(valid_upload_id(u) for u in upload_ids):
        raise UploadRefused("malformed attachment id")
    found = await redis.mget([_upload_key(tenant, u) for u in upload_ids])
    out = []
    for upload_id, raw in zip(upload_ids, found, strict=True):
        record = json.loads(raw) if raw else None
        if record is None or record["conversation_id"] != conversation:
            raise UploadRefused(f"unknown or expired attachment id: {upload_id}")
        out.append(Attachment.from_avro(record["attachment"]))
    return tuple(out)


async def claim_uploads(
    request: Request, tenant: str, conversation: str, upload_ids: list[str]
) -> tuple[Attachment, ...]:
    """:func:`claim_upload_ids` at an HTTP edge: 400 with the reason."""
    try:
        return await claim_upload_ids(
            request.app.state.services.redis, tenant, conversation, upload_ids
        )
    except UploadRefused as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, exc.reason) from exc


def shown_messages(stored: list[bytes], state: Any, notes: bool = False) -> list[dict[str, Any]]:
    """The Redis list's messages as a reader gets them: attachments with signed links.
    Agents' internal notes (role "note") only where ``notes`` (the agent console): by
    default, so a customer-facing reader never shows one."""
    files = getattr(state, "files", None)
    out = []
    for raw in stored:
        message = json.loads(raw)
        if message.get("role") == "note" and not notes:
            continue
        if files is not None and message.get("attachments"):
            message["attachments"] = with_urls(message["attachments"], files.signer, absolute=True)
        out.append(message)
    return out
