"""Tenant administration, ``/v1/admin/...``: API keys (list, issue, revoke) and agents
(presence seen by routing, forcing an agent's presence).

Its own credential: the tenant's admin key (``tenants.<t>.admin_keys``, hashes).
Neither an API key (customer API, integrations) nor an agent's console token is
accepted here, and an admin key is accepted nowhere else, so a leaked integration key
cannot mint keys and an admin key cannot post customer messages.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, status
from pydantic import BaseModel, ConfigDict, Field

from connectors.agent_commands import presence_command
from connectors.auth import KeyRing, Principal, presented_key, require
from connectors.routing_api import AgentId, PresenceIn
from schemas.keys import agents_key

router = APIRouter(prefix="/v1/admin", tags=["admin"])
KeyId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")]


async def admin_of(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_admin_key: Annotated[str | None, Header()] = None,
) -> Principal:
    return await require(request, "admin", presented_key(authorization, x_admin_key))


Admin = Annotated[Principal, Depends(admin_of)]


class NewKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(default="", max_length=100, description="what the key is for")


class NewKey(BaseModel):
    id: str
    key: str = Field(description="shown once: only its SHA-256 is kept")
    role: str = "api"


def _ring(request: Request) -> KeyRing:
    ring: KeyRing = request.app.state.services.tenants
    if ring.store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "key store not available")
    return ring


@router.get("/keys")
async def list_keys(admin: Admin, request: Request) -> dict[str, Any]:
    """The tenant's keys (ids, roles, where they come from), never their hashes."""
    ring = _ring(request)
    assert ring.store is not None
    issued = await ring.store.list(admin.tenant)
    return {"tenant": admin.tenant, "keys": [*ring.configured(admin.tenant), *issued]}


@router.post("/keys", status_code=status.HTTP_201_CREATED, response_model=NewKey)
async def add_key(body: NewKeyIn, admin: Admin, request: Request) -> NewKey:
    """Issue a new API key (rotation: issue, move clients over, revoke the old one)."""
    ring = _ring(request)
    assert ring.store is not None
    key_id, key = await ring.store.add(admin.tenant, "api", body.label)
    return NewKey(id=key_id, key=key)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: KeyId, admin: Admin, request: Request) -> dict[str, Any]:
    ring = _ring(request)
    assert ring.store is not None
    if any(k["id"] == key_id for k in ring.configured(admin.tenant)):
        raise HTTPException(
            status.HTTP_409_CONFLICT, "a key from the settings: remove it from the config"
        )
    if not await ring.store.revoke(admin.tenant, key_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such key")
    return {"id": key_id, "revoked": True}


@router.get("/agents")
async def list_agents(admin: Admin, request: Request) -> dict[str, Any]:
    """Agents' presence and capacity as routing last saw them."""
    raw = await request.app.state.services.redis.hgetall(agents_key(admin.tenant))
    agents = {}
    for agent, value in raw.items():
        try:
            agents[agent.decode()] = json.loads(value)
        except ValueError:
            continue
    return {"tenant": admin.tenant, "agents": agents}


@router.put("/agents/{agent_id}/presence", status_code=status.HTTP_202_ACCEPTED)
async def set_agent_presence(
    agent_id: AgentId, body: PresenceIn, admin: Admin, request: Request
) -> dict[str, str]:
    """Set any agent's presence (e.g. take a departed agent offline)."""
    command = presence_command(
        admin.tenant, agent_id, body.presence, body.team, body.capacity, body.skills
    )
    await request.app.state.services.publisher.publish_routing(command)
    return {"status": "accepted", "command_id": command.command_id}
