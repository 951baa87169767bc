"""The commands a human agent issues (presence, reply, note, handoff, close), built in one
place so the REST routing API and the console's WebSocket publish the same records
with the same id derivations."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from schemas.records import AddNote, CloseConversation, HandOff, RecordReply, SetAgentPresence
from schemas.time import now_ms


def new_command_id() -> str:
    return str(uuid.uuid4())


def presence_command(
    tenant: str, agent_id: str, presence: str, team: str, capacity: int, skills: Sequence[str]
) -> SetAgentPresence:
    return SetAgentPresence(
        command_id=new_command_id(),
        tenant_id=tenant,
        queue=f"{tenant}:{team}",
        issued_at=now_ms(),
        agent_id=agent_id,
        presence=presence,
        capacity=capacity,
        skills=list(skills),
    )


def reply_command(
    tenant: str, conversation_id: str, agent_id: str, text: str, message_id: str | None
) -> RecordReply:
    # The id derives from the agent's own message id, so a resend is dropped upstream.
    message_id = message_id or str(uuid.uuid4())
    return RecordReply(
        command_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{agent_id}/{message_id}")),
        conversation_id=conversation_id,
        tenant_id=tenant,
        issued_at=now_ms(),
        in_reply_to="",
        text=text,
        author=agent_id,
        responder="agent",
        confidence=1.0,
    )


def note_command(
    tenant: str, conversation_id: str, agent_id: str, text: str, note_id: str | None
) -> AddNote:
    # As a reply's: the id derives from the agent's own note id, so a resend is dropped.
    note_id = note_id or str(uuid.uuid4())
    return AddNote(
        command_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}/{agent_id}/note/{note_id}")),
        conversation_id=conversation_id,
        tenant_id=tenant,
        issued_at=now_ms(),
        author=agent_id,
        text=text,
    )


def handoff_command(
    tenant: str,
    conversation_id: str,
    to: str,
    team: str,
    reason: str,
    requested_by: str,
    agent: str = "",
) -> HandOff:
    return HandOff(
        command_id=new_command_id(),
        conversation_id=conversation_id,
        tenant_id=tenant,
        issued_at=now_ms(),
        to=to,
        team=team,
        reason=reason or f"requested by {requested_by}",
        requested_by=requested_by,
        agent=agent,
    )


def close_command(
    tenant: str, conversation_id: str, closed_by: str, reason: str
) -> CloseConversation:
    return CloseConversation(
        command_id=new_command_id(),
        conversation_id=conversation_id,
        tenant_id=tenant,
        issued_at=now_ms(),
        reason=reason,
        closed_by=closed_by,
    )
