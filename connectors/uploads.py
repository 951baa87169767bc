"""Uploads held for a message: stored at once, remembered for a day under an id in
Redis (scoped to tenant and conversation), claimed by the message that lists them.
Shared by the REST, web chat and console edges (``connectors/files_api.py``,
``rest_api.py``, ``webchat.py``, ``console.py``)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, UploadFile, status

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


def files_of(request: Request) -> Files:
    files: Files | None = getattr(request.app.state, "files", None)
    if files is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "attachments are not configured")
    return files


_upload_key = upload_key


async def _read_limited(upload: UploadFile, limit: int) -> bytes:
    """The file's bytes, or 413 as soon as they pass ``limit`` (with the limit)."""
    chunks, size = [], 0
    while chunk := await upload.read(256 * 1024):
        size += len(chunk)
        if size > limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"attachment over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def store_upload(
    request: Request,
    tenant: str,
    conversation: str,
    channel: str,
    upload: UploadFile,
    customer: str = "",
) -> dict[str, Any]:
    """Accept one uploaded file for ``conversation`` (``customer``'s: their data key
    seals it); the JSON the client gets."""
    files = files_of(request)
    data = await _read_limited(upload, files.policy.limit_for(channel))
    try:
        attachment = await accept(
            files.store,
            data,
            name=upload.filename or "",
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
