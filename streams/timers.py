"""Timers over the conversations a worker holds: idle auto-close and SLA breaches.

A Faust timer scans the conversation states this worker holds and sends
commands; it never writes events itself (the conversation agent stays the single
writer). Command ids derive from the state they were decided on, so two workers (or
a standby replica) noticing the same thing send the same command, applied once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.records import CloseConversation, Command, FlagSlaBreach
from schemas.time import now_ms
from streams.app import KefuApp
from streams.lifecycle import Conversation

log = logging.getLogger(__name__)
_NAMESPACE = uuid.UUID("e2a7c4d1-3b5f-4c8a-9e6d-7f1b0c2d4a58")


@dataclass(frozen=True, slots=True)
class Deadlines:
    idle_close_ms: int = 600_000
    first_response_ms: int = 120_000
    next_response_ms: int = 300_000


def due(state: Conversation, deadlines: Deadlines, now: int) -> list[Command]:
    """What is overdue for one conversation at ``now``: pure, so it is tested alone."""
    if state.status != "open":
        return []
    out: list[Command] = []
    if state.unanswered_since and state.breached_since != state.unanswered_since:
        kind = "first" if state.replies == 0 else "next"
        limit = deadlines.first_response_ms if kind == "first" else deadlines.next_response_ms
        deadline = state.unanswered_since + limit
        if now >= deadline:
            out.append(
                FlagSlaBreach(
                    command_id=str(
                        uuid.uuid5(_NAMESPACE, f"{state.conversation_id}/sla/{deadline}")
                    ),
                    conversation_id=state.conversation_id,
                    tenant_id=state.tenant_id,
                    issued_at=now,
                    kind=kind,
                    due_at=deadline,
                )
            )
    if state.last_activity_at and now - state.last_activity_at >= deadlines.idle_close_ms:
        out.append(
            CloseConversation(
                command_id=str(uuid.uuid5(_NAMESPACE, f"{state.conversation_id}/idle/{state.seq}")),
                conversation_id=state.conversation_id,
                tenant_id=state.tenant_id,
                issued_at=now,
                reason="idle",
                closed_by="system",
            )
        )
    return out


def next_due(state: Conversation, deadlines: Deadlines) -> int | None:
    """When ``due`` will next have something for this state (None: never, as it
    stands): the timer re-reads a conversation only when that time comes or its state
    changes, instead of decoding every conversation every tick."""
    if state.status != "open":
        return None
    times = []
    if state.unanswered_since and state.breached_since != state.unanswered_since:
        first = state.replies == 0
        limit = deadlines.first_response_ms if first else deadlines.next_response_ms
        times.append(state.unanswered_since + limit)
    if state.last_activity_at:
        times.append(state.last_activity_at + deadlines.idle_close_ms)
    return min(times) if times else None


def install(
    kefu: KefuApp, deadlines_for: Callable[[str, str], Deadlines], interval: float = 1.0
) -> Any:
    """``deadlines_for(tenant, priority)``: per-tenant, per-priority limits."""
    store = kefu.conversations
    # conversation id -> (the stored state object it was computed from, next due time)
    known: dict[str, tuple[Any, int | None]] = {}

    async def check_deadlines() -> None:
        now = now_ms()
        seen: dict[str, tuple[Any, int | None]] = {}
        for conversation_id, stored in store.items():
            if not stored:
                continue
            entry = known.get(conversation_id)
            if entry is not None and entry[0] is stored:
                seen[conversation_id] = entry
                if entry[1] is None or entry[1] > now:
                    continue
            state = Conversation.from_json(stored)
            deadlines = deadlines_for(state.tenant_id, state.priority)
            seen[conversation_id] = (stored, next_due(state, deadlines))
            for command in due(state, deadlines, now):
                await kefu.commands_out.send(key=conversation_id, value=command)
        known.clear()
        known.update(seen)

    return kefu.app.timer(interval, name="kefu.deadlines")(check_deadlines)
