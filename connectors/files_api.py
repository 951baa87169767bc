"""Uploads and downloads of attachments at the gateway.

- ``POST /v1/uploads`` (API key; multipart ``file`` + ``customer_id``, or the file as
  the body with ``?customer_id=&name=``): the REST channel's upload; answers an
  ``attachment_id`` that a following ``POST /v1/messages`` lists in ``attachments``.
- ``POST /v1/chat/uploads`` (the widget's customer id and signature, as its socket;
  multipart or raw as above): the web chat's upload; the id goes in the socket's
  message frame.
- ``GET /v1/files/{key}?exp=&sig=``: a blob by its signed, expiring link. Images are
  shown inline; everything else, SVG and HTML included, is a download under a CSP that
  runs nothing, with ``nosniff``. A thumbnail not made yet is made then
  (``connectors/thumbnails.py``); one whose image does not decode answers 422.

An upload is stored at once (content-addressed, in its conversation's prefix) and
remembered for a day under its id in Redis, scoped to its tenant and conversation: a
message can only attach its own conversation's uploads. Nothing is published until the
message is.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from connectors.attachments import DOWNLOAD_ONLY, AttachmentRejected
from connectors.auth import client_ip, customer_verified, refuse_disabled
from connectors.blobs import BlobMissing, valid_key
from connectors.identity import conversation_id_for
from connectors.rate_limit import RateLimiter
from connectors.rest_api import CHANNEL as API_CHANNEL
from connectors.rest_api import Tenant
from connectors.sealed_blobs import BlobErased, BlobUnreadable
from connectors.thumbnails import source_of
from connectors.uploads import UploadBody, files_of, store_upload, upload_openapi

log = logging.getLogger(__name__)
router = APIRouter(tags=["attachments"])
# The console's agent upload (connectors/console.py) shares the larger body limit.
UPLOAD_PATHS = ("/v1/uploads", "/v1/chat/uploads", "/v1/console/uploads")


class ApiUpload(BaseModel):
    customer_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:@\-]+$")


class ChatUpload(BaseModel):
    tenant: str = Field(min_length=1, max_length=128)
    customer: str = Field(min_length=1, max_length=128)
    signature: str = Field(default="", max_length=256)


@router.post(
    "/v1/uploads", status_code=status.HTTP_201_CREATED, openapi_extra=upload_openapi(ApiUpload)
)
async def upload_api(request: Request, tenant: Tenant) -> dict[str, Any]:
    """Upload a file for a customer's next ``POST /v1/messages`` (its ``attachments``):
    multipart (``file``, ``customer_id``), or the file as the body (any other
    ``Content-Type``) with ``?customer_id=`` and ``?name=`` (the cheaper request)."""
    body = await UploadBody.of(request)
    customer_id = body.validated(ApiUpload).customer_id
    conversation = conversation_id_for(tenant, API_CHANNEL, customer_id)
    return await store_upload(request, tenant, conversation, API_CHANNEL, body, customer_id)


@router.post(
    "/v1/chat/uploads",
    status_code=status.HTTP_201_CREATED,
    openapi_extra=upload_openapi(ChatUpload),
)
async def upload_chat(request: Request) -> dict[str, Any]:
    """The web chat's upload: authenticated like its socket (customer id + signature);
    multipart, or the file as the body with the fields in the query string."""
    body = await UploadBody.of(request)
    fields = body.validated(ChatUpload)
    tenant, customer, signature = fields.tenant, fields.customer, fields.signature
    services = request.app.state.services
    if tenant not in services.tenants.ids:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown tenant")
    refuse_disabled(request.app, tenant)
    if not customer_verified(services.tenants.config, tenant, customer, signature):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "customer signature required")
    limiter: RateLimiter | None = getattr(request.app.state, "limiter", None)
    if limiter is not None:
        await limiter.enforce(tenant, f"ip:{client_ip(request)}")
    conversation = conversation_id_for(tenant, "web", customer)
    return await store_upload(request, tenant, conversation, "web", body, customer)


def download_headers(content_type: str, name: str) -> dict[str, str]:
    inline = content_type.startswith("image/") and content_type not in DOWNLOAD_ONLY
    disposition = "inline" if inline else "attachment"
    quoted = name.replace('"', "").encode("ascii", "ignore").decode() or "attachment"
    return {
        "Content-Disposition": f'{disposition}; filename="{quoted}"',
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "private, max-age=3600",
        "Cross-Origin-Resource-Policy": "same-site",
    }


@router.get("/v1/files/{key:path}", response_class=Response)
async def download(
    key: str, request: Request, exp: int = 0, sig: str = "", name: str = ""
) -> Response:
    """A blob by its signed link (403 when the signature is wrong or expired)."""
    files = files_of(request)
    if not valid_key(key) or not files.signer.verify(key, exp, sig):
        return JSONResponse({"detail": "invalid or expired link"}, status_code=403)
    try:
        if files.thumbnails is not None and source_of(key) is not None:
            blob = await files.thumbnails.get(key)  # made now if it is not yet
        else:
            blob = await files.store.get(key)
    except AttachmentRejected as exc:  # a thumbnail of pixels that do not decode
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)
    except BlobErased:  # a copy outlived the purge: its customer's key is gone
        return JSONResponse(
            {"detail": "file erased: its customer's data was erased"}, status_code=410
        )
    except BlobUnreadable:
        log.warning("blob %s does not open under its key (damaged or moved)", key)
        return JSONResponse({"detail": "file cannot be opened (damaged or moved)"}, status_code=500)
    except BlobMissing:
        return JSONResponse({"detail": "file deleted"}, status_code=410)
    content_type = blob.content_type
    if content_type in DOWNLOAD_ONLY or not content_type.isascii():
        content_type = "application/octet-stream"
    return Response(
        blob.data,
        media_type=content_type,
        headers=download_headers(blob.content_type, name or key.rsplit("/", 1)[-1]),
    )
