"""Routing and lifecycle over REST, for the agent console and admin tools: agent
presence, handoff and transfer, close, agent replies, ratings. Authenticated by the
tenant's API key; every call publishes one command and answers 202. Commands the
pipeline must refuse (unknown conversation, an agent who is not assigned, another
tenant's conversation) are rejected there, to the dead-letter topic with the reason.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field

from connectors.agent_commands import (
    close_command,
    handoff_command,
    new_command_id,
    presence_command,
    reply_command,
)
from connectors.rest_api import Tenant
from schemas.keys import conversation_key
from schemas.records import (
    RateConversation,
)
from schemas.time import now_ms

router = APIRouter(prefix="/v1", tags=["routing"])
_ID = r"^[A-Za-z0-9_.:@\-]+$"
ConversationId = Annotated[str, Path(min_length=1, max_length=128, pattern=_ID)]
AgentId = Annotated[str, Path(min_length=1, max_length=64, pattern=_ID)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PresenceIn(_Body):
    presence: Literal["online", "away", "offline"]
    capacity: int = Field(default=3, ge=0, le=100)
    team: str = Field(default="default", min_length=1, max_length=64, pattern=_ID)
    skills: list[Annotated[str, Field(min_length=1, max_length=32)]] = Field(
        default_factory=list, max_length=32
    )


class HandOffIn(_Body):
    to: Literal["human", "ai"]
    team: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9_.:@\-]*$")
    agent: str = Field(
        default="",
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:@\-]*$",
        description="Transfer to this agent (when they can take it; else normal routing)",
    )
    reason: str = Field(default="", max_length=200)
    requested_by: str = Field(min_length=1, max_length=64)


class CloseIn(_Body):
    closed_by: str = Field(min_length=1, max_length=64)
    reason: str = Field(default="resolved", max_length=200)


class AgentReplyIn(_Body):
    agent_id: str = Field(min_length=1, max_length=64, pattern=_ID)
    text: str = Field(min_length=1, max_length=8000)
    message_id: str | None = Field(default=None, max_length=128, pattern=_ID)


class RatingIn(_Body):
    rating: int = Field(ge=1, le=5)
    comment: str = Field(default="", max_length=2000)


class Accepted(BaseModel):
    status: str = "accepted"
    command_id: str


async def _known(request: Request, tenant: str, conversation_id: str) -> None:
    """404 at the edge for a conversation this tenant does not have (or another
    tenant's): the read model knows every conversation a client has been told about."""
    redis = request.app.state.services.redis
    if not await redis.exists(conversation_key(tenant, conversation_id)):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such conversation")


@router.put(
    "/agents/{agent_id}/presence", status_code=status.HTTP_202_ACCEPTED, response_model=Accepted
)
async def set_presence(
    agent_id: AgentId, body: PresenceIn, tenant: Tenant, request: Request
) -> Accepted:
    command = presence_command(
        tenant, agent_id, body.presence, body.team, body.capacity, body.skills
    )
    await request.app.state.services.publisher.publish_routing(command)
    return Accepted(command_id=command.command_id)


@router.post(
    "/conversations/{conversation_id}/handoff",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
)
async def hand_off(
    conversation_id: ConversationId, body: HandOffIn, tenant: Tenant, request: Request
) -> Accepted:
    await _known(request, tenant, conversation_id)
    command = handoff_command(
        tenant,
        conversation_id,
        body.to,
        body.team,
        body.reason,
        body.requested_by,
        body.agent,
    )
    await request.app.state.services.publisher.publish(command)
    return Accepted(command_id=command.command_id)


@router.post(
    "/conversations/{conversation_id}/close",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
)
async def close(
    conversation_id: ConversationId, body: CloseIn, tenant: Tenant, request: Request
) -> Accepted:
    await _known(request, tenant, conversation_id)
    command = close_command(tenant, conversation_id, body.closed_by, body.reason)
    await request.app.state.services.publisher.publish(command)
    return Accepted(command_id=command.command_id)


@router.post(
    "/conversations/{conversation_id}/replies",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
)
async def agent_reply(
    conversation_id: ConversationId, body: AgentReplyIn, tenant: Tenant, request: Request
) -> Accepted:
    await _known(request, tenant, conversation_id)
    command = reply_command(tenant, conversation_id, body.agent_id, body.text, body.message_id)
    await request.app.state.services.publisher.publish(command)
    return Accepted(command_id=command.command_id)


@router.post(
    "/conversations/{conversation_id}/rating",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Accepted,
)
async def rate(
    conversation_id: ConversationId, body: RatingIn, tenant: Tenant, request: Request
) -> Accepted:
    await _known(request, tenant, conversation_id)
    command = RateConversation(
        command_id=new_command_id(),
        conversation_id=conversation_id,
        tenant_id=tenant,
        issued_at=now_ms(),
        rating=body.rating,
        comment=body.comment,
    )
    await request.app.state.services.publisher.publish(command)
    return Accepted(command_id=command.command_id)
