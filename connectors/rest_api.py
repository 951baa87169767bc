"""REST channel: ``POST /v1/messages`` in, replies out by signed webhook (delivery) or
``GET /v1/conversations/{id}``. Authenticated by a per-tenant API key."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.auth import presented_key, require
from connectors.identity import command_id_for, conversation_id_for
from connectors.uploads import MAX_ATTACHMENTS, claim_uploads, shown_messages
from schemas.keys import conversation_key, messages_key
from schemas.records import ReceiveMessage
from schemas.time import now_ms

router = APIRouter(prefix="/v1", tags=["messages"])
CHANNEL = "api"
_ID = r"^[A-Za-z0-9_.:@\-]+$"


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer_id: str = Field(min_length=1, max_length=128, pattern=_ID)
    text: str = Field(default="", max_length=8000)
    message_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=_ID,
        description="Your id for this message: a resend with the same id is not a duplicate",
    )
    language: str | None = Field(default=None, max_length=16)
    attachments: list[str] = Field(
        default_factory=list,
        max_length=MAX_ATTACHMENTS,
        description="attachment_id of each file uploaded with POST /v1/uploads",
    )

    @model_validator(mode="after")
    def _has_content(self) -> MessageIn:
        if not self.text.strip() and not self.attachments:
            raise ValueError("a message needs text or attachments")
        return self


class Accepted(BaseModel):
    status: str = "accepted"
    conversation_id: str
    message_id: str
    command_id: str


async def tenant_of(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> str:
    """The tenant of an API key (never an admin key or agent token), rate-limited per
    tenant and per key (429); connectors/auth.py."""
    principal = await require(request, "api", presented_key(authorization, x_api_key))
    return principal.tenant


Tenant = Annotated[str, Depends(tenant_of)]


@router.post("/messages", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted)
async def post_message(body: MessageIn, tenant: Tenant, request: Request) -> Accepted:
    message_id = body.message_id or str(uuid.uuid4())
    conversation_id = conversation_id_for(tenant, CHANNEL, body.customer_id)
    attachments = await claim_uploads(request, tenant, conversation_id, body.attachments)
    command = ReceiveMessage(
        command_id=command_id_for(tenant, CHANNEL, message_id),
        conversation_id=conversation_id,
        tenant_id=tenant,
        issued_at=now_ms(),
        channel=CHANNEL,
        customer_id=body.customer_id,
        text=body.text,
        channel_message_id=message_id,
        language=body.language,
        attachments=attachments,
    )
    await request.app.state.services.publisher.publish(command)
    return Accepted(
        conversation_id=command.conversation_id,
        message_id=message_id,
        command_id=command.command_id,
    )


@router.get("/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, tenant: Tenant, request: Request) -> Any:
    redis = request.app.state.services.redis
    state = await redis.hgetall(conversation_key(tenant, conversation_id))
    if not state:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such conversation")
    messages = await redis.lrange(messages_key(tenant, conversation_id), 0, -1)
    return {
        "conversation": {k.decode(): v.decode() for k, v in state.items()},
        "messages": shown_messages(messages, request.app.state),
    }
