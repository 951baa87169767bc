"""Erasing a customer over HTTP: ``POST /v1/admin/privacy/erase``.

Who may call: as for ``/v1/admin/config`` (``connectors/admin_config.py``): a signed-in
tenant admin (session cookie and CSRF token) or the tenant's admin key, on their own
tenant; an operator on any tenant given as ``?tenant=``. Agents and API keys get 401 or
403. The work is ``kefu privacy erase``'s (``kefu/erasure.py``, injected by the shell
as ``app.state.privacy``): the customer's data keys shredded, ``CustomerErased`` on each
of their conversations (the read models redact on it), their files deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field

from connectors.admin_config import Admin
from connectors.keystore import KeysUnavailable, UnknownCustomer

router = APIRouter(prefix="/v1/admin/privacy", tags=["admin: privacy"])


class Eraser(Protocol):
    async def erase(
        self, tenant: str, customer: str, requested_by: str, reason: str = "request"
    ) -> Mapping[str, Any]: ...


class EraseIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    customer_id: str = Field(min_length=1, max_length=256, description="the channel's id")
    reason: str = Field(default="request", max_length=200)


@router.post("/erase")
async def erase_customer(body: EraseIn, caller: Admin, request: Request) -> dict[str, Any]:
    """Erase a customer of the tenant: every personal field of their events reads as
    "[erased]" from now on (in every replay too), the read models are redacted within
    moments, their files are deleted; the events stay on the log, so the audit still
    verifies. 404 when the tenant has no such customer."""
    eraser: Eraser | None = getattr(request.app.state, "privacy", None)
    if eraser is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "erasure is not configured")
    try:
        done = await eraser.erase(caller.tenant, body.customer_id, caller.who, body.reason)
    except UnknownCustomer as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except KeysUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    return {"status": "erased", **done}
